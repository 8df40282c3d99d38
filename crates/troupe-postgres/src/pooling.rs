//! How Troupe's statements reach PostgreSQL: directly (or through a pooler that keeps one
//! server connection per client session), or through a pooler that lends a server connection
//! for one transaction at a time (PgBouncer's `pool_mode = transaction`).
//!
//! Under transaction pooling nothing may outlive a transaction: session settings
//! (`search_path`, `synchronous_commit`), prepared statements and LISTEN would land on
//! whichever server connection the pooler picked and be lost or, worse, be seen by another
//! client. So in that mode every statement of this crate runs inside an explicit transaction
//! that starts with `SET LOCAL` of the pool's settings, unprepared (sqlx's unnamed statement,
//! parsed again each time), and LISTEN goes over a direct connection (`listen_url`) or not at
//! all (consumers poll).

use std::sync::Arc;

use sqlx::postgres::{PgArguments, PgPool, PgRow, Postgres};
use sqlx::query::{Query, QueryScalar};
use sqlx::{AssertSqlSafe, FromRow, SqlSafeStr};
use troupe_core::Error;

/// How Troupe's connections reach PostgreSQL (`pool_mode` in the URL; default
/// [`PoolMode::Session`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolMode {
    /// Directly, or through a pooler that gives each client one server connection for its
    /// whole session (PgBouncer's `pool_mode = session`): session settings are made once per
    /// connection, statements are prepared once per connection, and LISTEN wakes idle
    /// consumers.
    #[default]
    Session,
    /// Through a pooler that lends a server connection for one transaction at a time
    /// (PgBouncer's `pool_mode = transaction`): every statement runs in a transaction of its
    /// own that starts with the settings (`SET LOCAL`), statements are not prepared ahead,
    /// and LISTEN needs a direct connection (`listen_url`); without one, idle consumers poll
    /// every `poll_interval`. Each statement then takes four round trips instead of one.
    Transaction,
}

impl PoolMode {
    /// Parses a `pool_mode` URL value.
    pub(crate) fn parse(value: &str) -> Result<Self, Error> {
        match value {
            "session" => Ok(Self::Session),
            "transaction" => Ok(Self::Transaction),
            "statement" => Err(Error::Config(
                "pool_mode=statement cannot work: Troupe needs transactions (claims, acks, barriers); run the pooler's pool in transaction or session mode".into(),
            )),
            other => Err(Error::Config(format!(
                "unknown pool_mode {:?} in the PostgreSQL URL; use `session` (direct, or a session pooler) or `transaction` (PgBouncer's pool_mode = transaction)",
                other.escape_debug().to_string()
            ))),
        }
    }
}

/// A session setting of one of this crate's pools (`search_path`, `synchronous_commit`, ...).
pub(crate) type Setting = (&'static str, String);

/// The SQL setting `settings` for a session (`SET`) or for the current transaction
/// (`SET LOCAL`). Values are identifiers or keywords checked where they are made (a schema
/// name is `[a-z_][a-z0-9_]*`).
pub(crate) fn set_statement(settings: &[Setting], local: bool) -> String {
    let set = if local { "SET LOCAL" } else { "SET" };
    settings
        .iter()
        .map(|(name, value)| format!("{set} {name} TO {value}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Builds this crate's statements: prepared once per connection and kept (named), or, under
/// transaction pooling, unnamed and parsed on each run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Statements {
    prepared: bool,
}

impl Statements {
    /// Statements for `mode`.
    pub(crate) fn new(mode: PoolMode) -> Self {
        Self {
            prepared: mode == PoolMode::Session,
        }
    }

    /// A statement (as `sqlx::query`).
    pub(crate) fn query<'q>(self, sql: impl SqlSafeStr) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(sql).persistent(self.prepared)
    }

    /// A statement whose rows are one value (as `sqlx::query_scalar`).
    pub(crate) fn scalar<'q, O>(self, sql: impl SqlSafeStr) -> QueryScalar<'q, Postgres, O, PgArguments>
    where
        (O,): for<'r> FromRow<'r, PgRow>,
    {
        sqlx::query_scalar(sql).persistent(self.prepared)
    }
}

/// One of this crate's pools, with how its statements run.
#[derive(Clone, Debug)]
pub(crate) struct Db {
    pool: PgPool,
    /// Under transaction pooling, what each statement's transaction starts with (`BEGIN` and
    /// the pool's settings as `SET LOCAL`).
    begin: Option<Arc<str>>,
}

impl Db {
    /// `pool` (whose connections have their settings) for statements run directly.
    pub(crate) fn direct(pool: PgPool) -> Self {
        Self { pool, begin: None }
    }

    /// `pool` in `mode`; `settings` are the pool's, made per transaction under transaction
    /// pooling (the connections made them otherwise).
    pub(crate) fn new(pool: PgPool, mode: PoolMode, settings: &[Setting]) -> Self {
        let begin = (mode == PoolMode::Transaction).then(|| {
            let set = set_statement(settings, true);
            Arc::from(if set.is_empty() {
                "BEGIN".to_owned()
            } else {
                format!("BEGIN; {set}")
            })
        });
        Self { pool, begin }
    }

    /// The pool.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How this pool's statements are built.
    pub(crate) fn statements(&self) -> Statements {
        Statements {
            prepared: self.begin.is_none(),
        }
    }

    /// Under transaction pooling, what each statement's transaction starts with.
    pub(crate) fn begin(&self) -> Option<AssertSqlSafe<Arc<str>>> {
        self.begin.as_ref().map(|b| AssertSqlSafe(Arc::clone(b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_modes() {
        assert_eq!(PoolMode::parse("transaction").unwrap(), PoolMode::Transaction);
        assert_eq!(PoolMode::parse("session").unwrap(), PoolMode::Session);
        assert!(
            PoolMode::parse("statement")
                .unwrap_err()
                .to_string()
                .contains("transactions")
        );
        let e = PoolMode::parse("tx").unwrap_err().to_string();
        assert!(e.contains("`transaction`"), "{e}");
    }

    #[test]
    fn settings_as_statements() {
        let settings = [
            ("search_path", "jobs".to_owned()),
            ("synchronous_commit", "off".to_owned()),
        ];
        assert_eq!(
            set_statement(&settings, true),
            "SET LOCAL search_path TO jobs; SET LOCAL synchronous_commit TO off"
        );
        assert_eq!(set_statement(&settings[..1], false), "SET search_path TO jobs");
    }
}
