//! The task store's statements on SQLite (`troupe_tasks`, `troupe_cancels`, `troupe_unique`),
//! called by [`SqliteStore`](crate::SqliteStore)'s `Store` methods. Times are the client's
//! clock in milliseconds, as everywhere in this crate. Every write is one statement (atomic on
//! its own), or a `BEGIN IMMEDIATE` transaction, which holds the database's write lock.

use std::time::Duration;

use sqlx::query::Query;
use sqlx::sqlite::{Sqlite, SqliteArguments, SqliteRow};
use sqlx::{AssertSqlSafe, Row, SqlitePool};
use troupe_core::{Error, Result, TaskFilter, TaskQuery};
use troupe_sql::ms;
use troupe_sql::tasks::{SqlArg, TaskCountRow, TaskRow, TaskWhere, TaskWrite, distinct_records};

use crate::db::{db_error, now};

/// The columns of a [`TaskRow`], in its order.
macro_rules! task_columns {
    () => {
        "message_id, actor, queue, status, enqueued_at, started_at, finished_at, updated_at, eta, attempts, \
         error_type, error, worker, progress, args"
    };
}

/// The upsert of a batch of writes, bound as one JSON array (?1) of rows in
/// [`write_row`]'s order; ?2 is now. One statement text whatever the batch's size, so each
/// connection prepares it once (a statement with a placeholder per value costs a parse per
/// size and a bind lookup that grows with the square of the values). An expired record is
/// replaced whole; a live one takes the write only when it is not cancelled and not newer,
/// keeping what the write leaves out. `RETURNING` names the records written.
const RECORD: &str = "INSERT INTO troupe_tasks AS t (message_id, actor, queue, status, version, enqueued_at,
        started_at, finished_at, updated_at, eta, attempts, error_type, error, worker, progress, args, expires_at)
    SELECT w.value ->> 0, w.value ->> 1, w.value ->> 2, w.value ->> 3, w.value ->> 4, w.value ->> 5,
        w.value ->> 6, w.value ->> 7, w.value ->> 5, w.value ->> 8, w.value ->> 9, w.value ->> 10,
        w.value ->> 11, w.value ->> 12, NULL, w.value ->> 13, w.value ->> 14
    FROM json_each(?1) AS w WHERE true
    ON CONFLICT (message_id) DO UPDATE SET
        actor = CASE WHEN t.expires_at <= ?2 THEN excluded.actor ELSE t.actor END,
        queue = CASE WHEN t.expires_at <= ?2 THEN excluded.queue ELSE t.queue END,
        status = excluded.status,
        version = excluded.version,
        enqueued_at = CASE WHEN t.expires_at <= ?2 THEN excluded.enqueued_at ELSE t.enqueued_at END,
        started_at = CASE WHEN t.expires_at <= ?2 THEN excluded.started_at
            ELSE coalesce(excluded.started_at, t.started_at) END,
        finished_at = CASE WHEN t.expires_at <= ?2 THEN excluded.finished_at
            ELSE coalesce(excluded.finished_at, t.finished_at) END,
        updated_at = excluded.updated_at,
        eta = excluded.eta,
        attempts = excluded.attempts,
        error_type = CASE WHEN t.expires_at <= ?2 OR excluded.error IS NOT NULL THEN excluded.error_type
            ELSE t.error_type END,
        error = CASE WHEN t.expires_at <= ?2 THEN excluded.error ELSE coalesce(excluded.error, t.error) END,
        worker = CASE WHEN t.expires_at <= ?2 THEN excluded.worker ELSE coalesce(excluded.worker, t.worker) END,
        progress = CASE WHEN t.expires_at <= ?2 THEN NULL ELSE t.progress END,
        args = CASE WHEN t.expires_at <= ?2 THEN excluded.args ELSE coalesce(excluded.args, t.args) END,
        expires_at = excluded.expires_at
    WHERE t.expires_at <= ?2 OR (t.status <> 'cancelled' AND excluded.version >= t.version)
    RETURNING message_id";

/// One write's 15 values (the last is `expires`), in the order [`RECORD`] reads them.
fn write_row(w: &TaskWrite<'_>, expires: i64) -> serde_json::Value {
    serde_json::json!([
        w.message_id,
        w.actor,
        w.queue,
        w.status,
        w.version,
        w.at,
        w.started_at,
        w.finished_at,
        w.eta,
        w.attempts,
        w.error_type,
        w.error,
        w.worker,
        w.args,
        expires
    ])
}

/// Runs [`RECORD`] for `writes` (distinct message ids) on `conn`; the ids it wrote.
async fn record_rows(
    conn: &mut sqlx::SqliteConnection,
    writes: &[TaskWrite<'_>],
    retention: Duration,
) -> Result<std::collections::HashSet<String>> {
    let t = now();
    let expires = t.saturating_add(ms(retention));
    let rows: Vec<serde_json::Value> = writes.iter().map(|w| write_row(w, expires)).collect();
    let rows = serde_json::to_string(&rows).map_err(|e| Error::Encode(format!("task records: {e}")))?;
    let written = sqlx::query(RECORD)
        .bind(rows)
        .bind(t)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| db_error("record tasks", e))?;
    written
        .iter()
        .map(|row| row.try_get::<String, _>(0))
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(|e| db_error("record tasks", e))
}

/// Writes task records in one transaction: one statement for the whole batch when its message
/// ids are distinct, else one per write, in order (each then sees the one before).
pub(crate) async fn record(pool: &SqlitePool, writes: &[TaskWrite<'_>], retention: Duration) -> Result<Vec<bool>> {
    let distinct = distinct_records(writes);
    if let [w] = writes {
        // One statement is atomic on its own.
        let mut conn = pool.acquire().await.map_err(|e| db_error("record a task", e))?;
        let written = record_rows(&mut conn, writes, retention).await?;
        return Ok(vec![written.contains(w.message_id)]);
    }
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| db_error("begin recording tasks", e))?;
    let applied = if distinct {
        let written = record_rows(&mut tx, writes, retention).await?;
        writes.iter().map(|w| written.contains(w.message_id)).collect()
    } else {
        let mut applied = Vec::with_capacity(writes.len());
        for w in writes {
            let written = record_rows(&mut tx, std::slice::from_ref(w), retention).await?;
            applied.push(written.contains(w.message_id));
        }
        applied
    };
    tx.commit().await.map_err(|e| db_error("commit task records", e))?;
    Ok(applied)
}

pub(crate) async fn set_progress(
    pool: &SqlitePool,
    message_id: &str,
    progress: &str,
    at: i64,
    retention: Duration,
) -> Result<bool> {
    let t = now();
    let done = sqlx::query(
        "UPDATE troupe_tasks SET progress = ?2, updated_at = ?3, expires_at = ?4
         WHERE message_id = ?1 AND expires_at > ?5",
    )
    .bind(message_id)
    .bind(progress)
    .bind(at)
    .bind(t.saturating_add(ms(retention)))
    .bind(t)
    .execute(pool)
    .await
    .map_err(|e| db_error("store a task's progress", e))?;
    Ok(done.rows_affected() == 1)
}

fn task_row(r: &SqliteRow) -> std::result::Result<TaskRow, sqlx::Error> {
    Ok(TaskRow {
        message_id: r.try_get(0)?,
        actor: r.try_get(1)?,
        queue: r.try_get(2)?,
        status: r.try_get(3)?,
        enqueued_at: r.try_get(4)?,
        started_at: r.try_get(5)?,
        finished_at: r.try_get(6)?,
        updated_at: r.try_get(7)?,
        eta: r.try_get(8)?,
        attempts: r.try_get(9)?,
        error_type: r.try_get(10)?,
        error: r.try_get(11)?,
        worker: r.try_get(12)?,
        progress: r.try_get(13)?,
        args: r.try_get(14)?,
    })
}

pub(crate) async fn task(pool: &SqlitePool, message_id: &str) -> Result<Option<TaskRow>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM troupe_tasks WHERE message_id = ?1 AND expires_at > ?2"
    ))
    .bind(message_id)
    .bind(now())
    .fetch_optional(pool)
    .await
    .map_err(|e| db_error("read a task", e))?;
    row.as_ref()
        .map(task_row)
        .transpose()
        .map_err(|e| db_error("read a task", e))
}

fn mark(n: usize) -> String {
    format!("?{n}")
}

/// Binds the values of `w` after those already bound.
fn bind_where<'q>(mut query: Query<'q, Sqlite, SqliteArguments>, w: &TaskWhere) -> Query<'q, Sqlite, SqliteArguments> {
    for arg in &w.args {
        query = match arg {
            SqlArg::Text(text) => query.bind(text.as_str()),
            SqlArg::Int(n) => query.bind(*n),
        };
    }
    query
}

pub(crate) async fn tasks(pool: &SqlitePool, query: &TaskQuery) -> Result<Vec<TaskRow>> {
    let w = TaskWhere::new(&query.filter, query.after.as_ref(), 2, mark);
    // Only placeholders are formatted in: every value is bound.
    let sql = format!(
        concat!(
            "SELECT ",
            task_columns!(),
            " FROM troupe_tasks WHERE expires_at > ?1{} ORDER BY enqueued_at DESC, message_id DESC LIMIT ?{}"
        ),
        w.sql,
        w.next(2)
    );
    let limit = i64::try_from(query.page_size()).unwrap_or(i64::MAX);
    let rows = bind_where(sqlx::query(AssertSqlSafe(sql)).bind(now()), &w)
        .bind(limit)
        .fetch_all(pool)
        .await
        .map_err(|e| db_error("read a page of tasks", e))?;
    rows.iter()
        .map(task_row)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| db_error("read a page of tasks", e))
}

pub(crate) async fn task_counts(pool: &SqlitePool, scope: &TaskFilter) -> Result<Vec<TaskCountRow>> {
    let w = TaskWhere::new(scope, None, 2, mark);
    // Only placeholders are formatted in: every value is bound.
    let sql = format!(
        "SELECT status, actor, queue, count(*) FROM troupe_tasks WHERE expires_at > ?1{} GROUP BY status, actor, queue",
        w.sql
    );
    let rows = bind_where(sqlx::query(AssertSqlSafe(sql)).bind(now()), &w)
        .fetch_all(pool)
        .await
        .map_err(|e| db_error("count tasks", e))?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(|e| db_error("count tasks", e))
}

pub(crate) async fn delete_task(pool: &SqlitePool, message_id: &str) -> Result<bool> {
    let row = sqlx::query("DELETE FROM troupe_tasks WHERE message_id = ?1 RETURNING expires_at > ?2")
        .bind(message_id)
        .bind(now())
        .fetch_optional(pool)
        .await
        .map_err(|e| db_error("delete a task", e))?;
    let live: Option<i64> = row
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(|e| db_error("delete a task", e))?;
    Ok(live.is_some_and(|l| l != 0))
}

pub(crate) async fn expire_tasks(pool: &SqlitePool, limit: i64) -> Result<u64> {
    let t = now();
    let mut deleted = 0;
    for (i, (what, sql)) in [
        (
            "expire tasks",
            "DELETE FROM troupe_tasks WHERE rowid IN
             (SELECT rowid FROM troupe_tasks WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
        ),
        (
            "expire cancellation requests",
            "DELETE FROM troupe_cancels WHERE message_id IN
             (SELECT message_id FROM troupe_cancels WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
        ),
        (
            "expire unique keys",
            "DELETE FROM troupe_unique WHERE key IN
             (SELECT key FROM troupe_unique WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let done = sqlx::query(sql)
            .bind(t)
            .bind(limit)
            .execute(pool)
            .await
            .map_err(|e| db_error(what, e))?;
        if i == 0 {
            deleted = done.rows_affected();
        }
    }
    Ok(deleted)
}

pub(crate) async fn mark_cancelled(
    pool: &SqlitePool,
    message_id: &str,
    at: i64,
    retention: Duration,
) -> Result<Option<String>> {
    // The write lock is held from the read to the commit: nothing changes the row between.
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| db_error("begin a cancellation", e))?;
    let t = now();
    let before: Option<String> =
        sqlx::query_scalar("SELECT status FROM troupe_tasks WHERE message_id = ?1 AND expires_at > ?2")
            .bind(message_id)
            .bind(t)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db_error("read a task to cancel", e))?;
    if before.is_some() {
        sqlx::query(
            "UPDATE troupe_tasks SET status = 'cancelled', finished_at = ?2, updated_at = ?2, eta = NULL,
                expires_at = ?3
             WHERE message_id = ?1 AND status IN ('enqueued', 'delayed', 'retrying')",
        )
        .bind(message_id)
        .bind(at)
        .bind(t.saturating_add(ms(retention)))
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("cancel a task", e))?;
    }
    tx.commit().await.map_err(|e| db_error("commit a cancellation", e))?;
    Ok(before)
}

pub(crate) async fn request_cancel(pool: &SqlitePool, message_id: &str, mode: &str, ttl: Duration) -> Result<()> {
    sqlx::query(
        "INSERT INTO troupe_cancels (message_id, mode, expires_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (message_id) DO UPDATE SET mode = excluded.mode, expires_at = excluded.expires_at",
    )
    .bind(message_id)
    .bind(mode)
    .bind(now().saturating_add(ms(ttl)))
    .execute(pool)
    .await
    .map_err(|e| db_error("request a cancellation", e))?;
    Ok(())
}

pub(crate) async fn cancels(pool: &SqlitePool, message_ids: &[String]) -> Result<Vec<(String, String)>> {
    let ids = serde_json::to_string(message_ids).map_err(|e| Error::Encode(format!("message ids: {e}")))?;
    let rows = sqlx::query(
        "SELECT message_id, mode FROM troupe_cancels
         WHERE message_id IN (SELECT value FROM json_each(?1)) AND expires_at > ?2",
    )
    .bind(ids)
    .bind(now())
    .fetch_all(pool)
    .await
    .map_err(|e| db_error("read cancellation requests", e))?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(|e| db_error("read cancellation requests", e))
}

pub(crate) async fn claim_unique(pool: &SqlitePool, key: &str, message_id: &str, ttl: Duration) -> Result<String> {
    // One statement: the conflict branch keeps a live holder, or takes the key over when it
    // expired or is ours; either way the row returned names the holder.
    let t = now();
    sqlx::query_scalar(
        "INSERT INTO troupe_unique AS u (key, message_id, expires_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET
            message_id = CASE WHEN u.expires_at <= ?4 OR u.message_id = excluded.message_id
                THEN excluded.message_id ELSE u.message_id END,
            expires_at = CASE WHEN u.expires_at <= ?4 OR u.message_id = excluded.message_id
                THEN excluded.expires_at ELSE u.expires_at END
         RETURNING message_id",
    )
    .bind(key)
    .bind(message_id)
    .bind(t.saturating_add(ms(ttl)))
    .bind(t)
    .fetch_one(pool)
    .await
    .map_err(|e| db_error("claim a unique key", e))
}

pub(crate) async fn release_unique(pool: &SqlitePool, key: &str, message_id: &str) -> Result<()> {
    sqlx::query("DELETE FROM troupe_unique WHERE key = ?1 AND message_id = ?2")
        .bind(key)
        .bind(message_id)
        .execute(pool)
        .await
        .map_err(|e| db_error("release a unique key", e))?;
    Ok(())
}
