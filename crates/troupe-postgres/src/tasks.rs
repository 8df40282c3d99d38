//! The task store's statements on PostgreSQL (`tasks`, `cancels`, `unique_keys` in Troupe's
//! schema), called by [`PostgresStore`](crate::PostgresStore)'s `Store` methods on a connection
//! they hold within the statement time-out (`db::timed!`). Record times
//! are the milliseconds the tracking wrote; expiries are the server's (`now()`), as for results
//! and state. Every write is one statement, atomic under concurrency (batches of records are
//! one transaction).

use std::time::Duration;

use sqlx::postgres::{PgArguments, PgRow, Postgres};
use sqlx::query::Query;

use crate::pooling::Statements;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};
use troupe_core::{Result, TaskFilter, TaskQuery};
use troupe_sql::ms;
use troupe_sql::tasks::{SqlArg, TaskCountRow, TaskRow, TaskWhere, TaskWrite, distinct_records};

use crate::db::db_error;

/// The columns of a [`TaskRow`], in its order (JSON as text).
macro_rules! task_columns {
    () => {
        "message_id, actor, queue, status, enqueued_at, started_at, finished_at, updated_at, eta, attempts, \
         error_type, error, worker, progress::text, args::text"
    };
}

/// What an upsert does with a record that exists: an expired record is replaced whole; a live
/// one takes the write only when it is not cancelled and not newer, keeping what the write
/// leaves out. The conflict branch sees the row locked and current, so concurrent writes
/// apply in turn.
macro_rules! on_conflict {
    () => {
        "ON CONFLICT (message_id) DO UPDATE SET
        actor = CASE WHEN t.expires_at <= now() THEN excluded.actor ELSE t.actor END,
        queue = CASE WHEN t.expires_at <= now() THEN excluded.queue ELSE t.queue END,
        status = excluded.status,
        version = excluded.version,
        enqueued_at = CASE WHEN t.expires_at <= now() THEN excluded.enqueued_at ELSE t.enqueued_at END,
        started_at = CASE WHEN t.expires_at <= now() THEN excluded.started_at
            ELSE coalesce(excluded.started_at, t.started_at) END,
        finished_at = CASE WHEN t.expires_at <= now() THEN excluded.finished_at
            ELSE coalesce(excluded.finished_at, t.finished_at) END,
        updated_at = excluded.updated_at,
        eta = excluded.eta,
        attempts = excluded.attempts,
        error_type = CASE WHEN t.expires_at <= now() OR excluded.error IS NOT NULL THEN excluded.error_type
            ELSE t.error_type END,
        error = CASE WHEN t.expires_at <= now() THEN excluded.error ELSE coalesce(excluded.error, t.error) END,
        worker = CASE WHEN t.expires_at <= now() THEN excluded.worker ELSE coalesce(excluded.worker, t.worker) END,
        progress = CASE WHEN t.expires_at <= now() THEN NULL ELSE t.progress END,
        args = CASE WHEN t.expires_at <= now() THEN excluded.args ELSE coalesce(excluded.args, t.args) END,
        expires_at = excluded.expires_at
    WHERE t.expires_at <= now() OR (t.status <> 'cancelled' AND excluded.version >= t.version)"
    };
}

/// The upsert of one write.
const RECORD: &str = concat!(
    "INSERT INTO tasks AS t (message_id, actor, queue, status, version, enqueued_at,
        started_at, finished_at, updated_at, eta, attempts, error_type, error, worker, progress, args, expires_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $6, $9, $10, $11, $12, $13, NULL, $14::jsonb,
        now() + $15 * interval '1 millisecond') ",
    on_conflict!()
);

/// The upsert of a batch of writes to distinct records, each value an array with one element
/// per write ($15 is the retention): one statement and one round trip whatever the batch's
/// size. `RETURNING` names the records written. (Two writes to one record cannot share it:
/// PostgreSQL refuses to update a row twice in one statement.)
const RECORD_MANY: &str = concat!(
    "INSERT INTO tasks AS t (message_id, actor, queue, status, version, enqueued_at,
        started_at, finished_at, updated_at, eta, attempts, error_type, error, worker, progress, args, expires_at)
    SELECT w.message_id, w.actor, w.queue, w.status, w.version, w.at, w.started_at, w.finished_at, w.at, w.eta,
        w.attempts, w.error_type, w.error, w.worker, NULL, w.args::jsonb, now() + $15 * interval '1 millisecond'
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[], $8::int8[],
        $9::int8[], $10::int8[], $11::text[], $12::text[], $13::text[], $14::text[])
        AS w(message_id, actor, queue, status, version, at, started_at, finished_at, eta, attempts, error_type,
            error, worker, args) ",
    on_conflict!(),
    " RETURNING message_id"
);

fn record_query<'q>(st: Statements, w: &TaskWrite<'_>, retention: Duration) -> Query<'q, Postgres, PgArguments> {
    st.query(RECORD)
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
        .bind(w.args.as_deref())
        .bind(ms(retention))
}

/// [`RECORD_MANY`] for `writes` (distinct message ids), bound column by column.
fn record_many_query<'q>(
    st: Statements,
    writes: &[TaskWrite<'_>],
    retention: Duration,
) -> Query<'q, Postgres, PgArguments> {
    fn column<'w, T>(writes: &[TaskWrite<'w>], f: impl Fn(&TaskWrite<'w>) -> T) -> Vec<T> {
        writes.iter().map(f).collect()
    }
    let owned = |text: Option<&str>| text.map(str::to_owned);
    st.query(RECORD_MANY)
        .bind(column(writes, |w| w.message_id.to_owned()))
        .bind(column(writes, |w| w.actor.to_owned()))
        .bind(column(writes, |w| w.queue.to_owned()))
        .bind(column(writes, |w| w.status.to_owned()))
        .bind(column(writes, |w| w.version))
        .bind(column(writes, |w| w.at))
        .bind(column(writes, |w| w.started_at))
        .bind(column(writes, |w| w.finished_at))
        .bind(column(writes, |w| w.eta))
        .bind(column(writes, |w| w.attempts))
        .bind(column(writes, |w| owned(w.error_type)))
        .bind(column(writes, |w| owned(w.error)))
        .bind(column(writes, |w| owned(w.worker)))
        .bind(column(writes, |w| w.args.clone()))
        .bind(ms(retention))
}

/// Writes task records: one statement for one write or for a batch of distinct records, else
/// one statement per write in one transaction, in order (each then sees the one before).
pub(crate) async fn record(
    st: Statements,
    conn: &mut PgConnection,
    writes: &[TaskWrite<'_>],
    retention: Duration,
) -> Result<Vec<bool>> {
    if let [w] = writes {
        let done = record_query(st, w, retention)
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error("record a task", e))?;
        return Ok(vec![done.rows_affected() == 1]);
    }
    let distinct = distinct_records(writes);
    if distinct {
        let rows = record_many_query(st, writes, retention)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| db_error("record tasks", e))?;
        let written = rows
            .iter()
            .map(|row| row.try_get::<String, _>(0))
            .collect::<std::result::Result<std::collections::HashSet<_>, _>>()
            .map_err(|e| db_error("record tasks", e))?;
        return Ok(writes.iter().map(|w| written.contains(w.message_id)).collect());
    }
    let mut tx = conn.begin().await.map_err(|e| db_error("begin recording tasks", e))?;
    let mut applied = Vec::with_capacity(writes.len());
    for w in writes {
        let done = record_query(st, w, retention)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("record a task", e))?;
        applied.push(done.rows_affected() == 1);
    }
    tx.commit().await.map_err(|e| db_error("commit task records", e))?;
    Ok(applied)
}

pub(crate) async fn set_progress(
    st: Statements,
    conn: &mut PgConnection,
    message_id: &str,
    progress: &str,
    at: i64,
    retention: Duration,
) -> Result<bool> {
    let done = st
        .query(
            "UPDATE tasks SET progress = $2::jsonb, updated_at = $3, expires_at = now() + $4 * interval '1 millisecond'
         WHERE message_id = $1 AND expires_at > now()",
        )
        .bind(message_id)
        .bind(progress)
        .bind(at)
        .bind(ms(retention))
        .execute(&mut *conn)
        .await
        .map_err(|e| db_error("store a task's progress", e))?;
    Ok(done.rows_affected() == 1)
}

fn task_row(r: &PgRow) -> std::result::Result<TaskRow, sqlx::Error> {
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

pub(crate) async fn task(st: Statements, conn: &mut PgConnection, message_id: &str) -> Result<Option<TaskRow>> {
    let row = st
        .query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE message_id = $1 AND expires_at > now()"
        ))
        .bind(message_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| db_error("read a task", e))?;
    row.as_ref()
        .map(task_row)
        .transpose()
        .map_err(|e| db_error("read a task", e))
}

fn mark(n: usize) -> String {
    format!("${n}")
}

/// Binds the values of `w` after those already bound.
fn bind_where<'q>(mut query: Query<'q, Postgres, PgArguments>, w: &TaskWhere) -> Query<'q, Postgres, PgArguments> {
    for arg in &w.args {
        query = match arg {
            SqlArg::Text(text) => query.bind(text.as_str()),
            SqlArg::Int(n) => query.bind(*n),
        };
    }
    query
}

pub(crate) async fn tasks(st: Statements, conn: &mut PgConnection, query: &TaskQuery) -> Result<Vec<TaskRow>> {
    let w = TaskWhere::new(&query.filter, query.after.as_ref(), 1, mark);
    // Only placeholders are formatted in: every value is bound.
    let sql = format!(
        concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE expires_at > now(){} ORDER BY enqueued_at DESC, message_id DESC LIMIT ${}"
        ),
        w.sql,
        w.next(1)
    );
    let limit = i64::try_from(query.page_size()).unwrap_or(i64::MAX);
    let rows = bind_where(st.query(AssertSqlSafe(sql)), &w)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| db_error("read a page of tasks", e))?;
    rows.iter()
        .map(task_row)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| db_error("read a page of tasks", e))
}

pub(crate) async fn task_counts(
    st: Statements,
    conn: &mut PgConnection,
    scope: &TaskFilter,
) -> Result<Vec<TaskCountRow>> {
    let w = TaskWhere::new(scope, None, 1, mark);
    // Only placeholders are formatted in: every value is bound.
    let sql = format!(
        "SELECT status, actor, queue, count(*) FROM tasks WHERE expires_at > now(){} GROUP BY status, actor, queue",
        w.sql
    );
    let rows = bind_where(st.query(AssertSqlSafe(sql)), &w)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| db_error("count tasks", e))?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(|e| db_error("count tasks", e))
}

pub(crate) async fn delete_task(st: Statements, conn: &mut PgConnection, message_id: &str) -> Result<bool> {
    let live: Option<bool> = st
        .scalar("DELETE FROM tasks WHERE message_id = $1 RETURNING expires_at > now()")
        .bind(message_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| db_error("delete a task", e))?;
    Ok(live.unwrap_or(false))
}

pub(crate) async fn expire_tasks(st: Statements, conn: &mut PgConnection, limit: i64) -> Result<u64> {
    let mut deleted = 0;
    for (i, (what, sql)) in [
        (
            "expire tasks",
            "DELETE FROM tasks WHERE message_id IN
             (SELECT message_id FROM tasks WHERE expires_at <= now() ORDER BY expires_at LIMIT $1)",
        ),
        (
            "expire cancellation requests",
            "DELETE FROM cancels WHERE message_id IN
             (SELECT message_id FROM cancels WHERE expires_at <= now() ORDER BY expires_at LIMIT $1)",
        ),
        (
            "expire unique keys",
            "DELETE FROM unique_keys WHERE key IN
             (SELECT key FROM unique_keys WHERE expires_at <= now() ORDER BY expires_at LIMIT $1)",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let done = st
            .query(sql)
            .bind(limit)
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error(what, e))?;
        if i == 0 {
            deleted = done.rows_affected();
        }
    }
    Ok(deleted)
}

pub(crate) async fn mark_cancelled(
    st: Statements,
    conn: &mut PgConnection,
    message_id: &str,
    at: i64,
    retention: Duration,
) -> Result<Option<String>> {
    // `old` locks the live row and reads its current status (waiting for a writer holding
    // it); the update cancels it only when that status was pending.
    st.scalar(
        "WITH old AS (
            SELECT message_id, status FROM tasks WHERE message_id = $1 AND expires_at > now() FOR UPDATE
         ), cancelled AS (
            UPDATE tasks t SET status = 'cancelled', finished_at = $2, updated_at = $2, eta = NULL,
                expires_at = now() + $3 * interval '1 millisecond'
            FROM old
            WHERE t.message_id = old.message_id AND old.status IN ('enqueued', 'delayed', 'retrying')
         )
         SELECT status FROM old",
    )
    .bind(message_id)
    .bind(at)
    .bind(ms(retention))
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| db_error("cancel a task", e))
}

pub(crate) async fn request_cancel(
    st: Statements,
    conn: &mut PgConnection,
    message_id: &str,
    mode: &str,
    ttl: Duration,
) -> Result<()> {
    st.query(
        "INSERT INTO cancels (message_id, mode, expires_at) VALUES ($1, $2, now() + $3 * interval '1 millisecond')
         ON CONFLICT (message_id) DO UPDATE SET mode = excluded.mode, expires_at = excluded.expires_at",
    )
    .bind(message_id)
    .bind(mode)
    .bind(ms(ttl))
    .execute(&mut *conn)
    .await
    .map_err(|e| db_error("request a cancellation", e))?;
    Ok(())
}

pub(crate) async fn cancels(
    st: Statements,
    conn: &mut PgConnection,
    message_ids: &[String],
) -> Result<Vec<(String, String)>> {
    let rows = st
        .query("SELECT message_id, mode FROM cancels WHERE message_id = ANY($1) AND expires_at > now()")
        .bind(message_ids)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| db_error("read cancellation requests", e))?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(|e| db_error("read cancellation requests", e))
}

pub(crate) async fn claim_unique(
    st: Statements,
    conn: &mut PgConnection,
    key: &str,
    message_id: &str,
    ttl: Duration,
) -> Result<String> {
    // One statement: the conflict branch locks the current row (a concurrent claim's, once it
    // commits) and keeps a live holder, or takes the key over when it expired or is ours;
    // either way the row returned names the holder. (A plain read after a refused upsert could
    // miss a holder committed after the statement's snapshot.)
    st.scalar(
        "INSERT INTO unique_keys AS u (key, message_id, expires_at)
         VALUES ($1, $2, now() + $3 * interval '1 millisecond')
         ON CONFLICT (key) DO UPDATE SET
            message_id = CASE WHEN u.expires_at <= now() OR u.message_id = excluded.message_id
                THEN excluded.message_id ELSE u.message_id END,
            expires_at = CASE WHEN u.expires_at <= now() OR u.message_id = excluded.message_id
                THEN excluded.expires_at ELSE u.expires_at END
         RETURNING message_id",
    )
    .bind(key)
    .bind(message_id)
    .bind(ms(ttl))
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| db_error("claim a unique key", e))
}

pub(crate) async fn release_unique(st: Statements, conn: &mut PgConnection, key: &str, message_id: &str) -> Result<()> {
    st.query("DELETE FROM unique_keys WHERE key = $1 AND message_id = $2")
        .bind(key)
        .bind(message_id)
        .execute(&mut *conn)
        .await
        .map_err(|e| db_error("release a unique key", e))?;
    Ok(())
}
