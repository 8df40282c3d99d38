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
use troupe_sql::tasks::{SqlArg, TaskCountRow, TaskRow, TaskWhere, TaskWrite};

use crate::db::{db_error, now};

/// The columns of a [`TaskRow`], in its order.
macro_rules! task_columns {
    () => {
        "message_id, actor, queue, status, enqueued_at, started_at, finished_at, updated_at, eta, attempts, \
         error_type, error, worker, progress, args"
    };
}

/// The upsert of one write: ?16 is now. An expired record is replaced whole; a live one takes
/// the write only when it is not cancelled and not newer, keeping what the write leaves out.
const RECORD: &str = "INSERT INTO troupe_tasks AS t (message_id, actor, queue, status, version, enqueued_at,
        started_at, finished_at, updated_at, eta, attempts, error_type, error, worker, progress, args, expires_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?6, ?9, ?10, ?11, ?12, ?13, NULL, ?14, ?15)
    ON CONFLICT (message_id) DO UPDATE SET
        actor = CASE WHEN t.expires_at <= ?16 THEN excluded.actor ELSE t.actor END,
        queue = CASE WHEN t.expires_at <= ?16 THEN excluded.queue ELSE t.queue END,
        status = excluded.status,
        version = excluded.version,
        enqueued_at = CASE WHEN t.expires_at <= ?16 THEN excluded.enqueued_at ELSE t.enqueued_at END,
        started_at = CASE WHEN t.expires_at <= ?16 THEN excluded.started_at
            ELSE coalesce(excluded.started_at, t.started_at) END,
        finished_at = CASE WHEN t.expires_at <= ?16 THEN excluded.finished_at
            ELSE coalesce(excluded.finished_at, t.finished_at) END,
        updated_at = excluded.updated_at,
        eta = excluded.eta,
        attempts = excluded.attempts,
        error_type = CASE WHEN t.expires_at <= ?16 OR excluded.error IS NOT NULL THEN excluded.error_type
            ELSE t.error_type END,
        error = CASE WHEN t.expires_at <= ?16 THEN excluded.error ELSE coalesce(excluded.error, t.error) END,
        worker = CASE WHEN t.expires_at <= ?16 THEN excluded.worker ELSE coalesce(excluded.worker, t.worker) END,
        progress = CASE WHEN t.expires_at <= ?16 THEN NULL ELSE t.progress END,
        args = CASE WHEN t.expires_at <= ?16 THEN excluded.args ELSE coalesce(excluded.args, t.args) END,
        expires_at = excluded.expires_at
    WHERE t.expires_at <= ?16 OR (t.status <> 'cancelled' AND excluded.version >= t.version)";

fn record_query<'q>(w: &TaskWrite<'_>, retention: Duration) -> Query<'q, Sqlite, SqliteArguments> {
    let t = now();
    bind_write(sqlx::query(RECORD), w, t.saturating_add(ms(retention))).bind(t)
}

/// Binds one write's 15 values (the last is `expires`), in the order of [`RECORD`]'s
/// parameters ?1..?15.
fn bind_write<'q>(
    query: Query<'q, Sqlite, SqliteArguments>,
    w: &TaskWrite<'_>,
    expires: i64,
) -> Query<'q, Sqlite, SqliteArguments> {
    query
        .bind(w.message_id)
        .bind(w.actor)
        .bind(w.queue)
        .bind(w.status)
        .bind(w.version)
        .bind(w.at)
        .bind(w.started_at)
        .bind(w.finished_at)
        .bind(w.eta)
        .bind(w.attempts)
        .bind(w.error_type)
        .bind(w.error)
        .bind(w.worker)
        .bind(w.args.clone())
        .bind(expires)
}

/// Rows per multi-row upsert (15 parameters each, well under SQLite's limit).
const ROWS_PER_STATEMENT: usize = 256;

/// The multi-row form of [`RECORD`] for `rows` writes: each row's 15 values are numbered
/// parameters, now is the last; `RETURNING` names the rows it applied to.
fn record_many_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO troupe_tasks AS t (message_id, actor, queue, status, version, enqueued_at, started_at, \
         finished_at, updated_at, eta, attempts, error_type, error, worker, progress, args, expires_at) VALUES ",
    );
    for r in 0..rows {
        let b = r * 15;
        if r > 0 {
            sql.push(',');
        }
        sql.push_str(&format!(
            "(?{}, ?{}, ?{}, ?{}, ?{}, ?{}, ?{}, ?{}, ?{}, ?{}, ?{}, ?{}, ?{}, ?{}, NULL, ?{}, ?{})",
            b + 1,
            b + 2,
            b + 3,
            b + 4,
            b + 5,
            b + 6,
            b + 7,
            b + 8,
            b + 6,
            b + 9,
            b + 10,
            b + 11,
            b + 12,
            b + 13,
            b + 14,
            b + 15
        ));
    }
    let conflict = RECORD.split_once("ON CONFLICT").map_or("", |(_, rest)| rest);
    sql.push_str(" ON CONFLICT");
    sql.push_str(&conflict.replace("?16", &format!("?{}", rows * 15 + 1)));
    sql.push_str(" RETURNING message_id");
    sql
}

/// Writes distinct records with one statement per [`ROWS_PER_STATEMENT`], in one transaction.
async fn record_distinct(pool: &SqlitePool, writes: &[TaskWrite<'_>], retention: Duration) -> Result<Vec<bool>> {
    let t = now();
    let expires = t.saturating_add(ms(retention));
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| db_error("begin recording tasks", e))?;
    let mut applied = std::collections::HashSet::new();
    for chunk in writes.chunks(ROWS_PER_STATEMENT) {
        let sql = record_many_sql(chunk.len());
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for w in chunk {
            query = bind_write(query, w, expires);
        }
        let rows = query
            .bind(t)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| db_error("record tasks", e))?;
        for row in rows {
            let id: String = row.try_get(0).map_err(|e| db_error("record tasks", e))?;
            applied.insert(id);
        }
    }
    tx.commit().await.map_err(|e| db_error("commit task records", e))?;
    Ok(writes.iter().map(|w| applied.contains(w.message_id)).collect())
}

pub(crate) async fn record(pool: &SqlitePool, writes: &[TaskWrite<'_>], retention: Duration) -> Result<Vec<bool>> {
    let distinct = writes
        .iter()
        .map(|w| w.message_id)
        .collect::<std::collections::HashSet<_>>()
        .len()
        == writes.len();
    if writes.len() > 1 && distinct {
        return record_distinct(pool, writes, retention).await;
    }
    if let [w] = writes {
        let done = record_query(w, retention)
            .execute(pool)
            .await
            .map_err(|e| db_error("record a task", e))?;
        return Ok(vec![done.rows_affected() == 1]);
    }
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| db_error("begin recording tasks", e))?;
    let mut applied = Vec::with_capacity(writes.len());
    for w in writes {
        let done = record_query(w, retention)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("record a task", e))?;
        applied.push(done.rows_affected() == 1);
    }
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
