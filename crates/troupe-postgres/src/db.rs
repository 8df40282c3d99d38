//! Connection settings, migrations and error mapping shared by the broker and the backends.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, Postgres};
use sqlx::{AssertSqlSafe, Executor, Row};
use troupe_core::tls::{TlsFiles, TlsSettingNames, path_from_query, tls_hint};
use troupe_core::{Error, ErrorKind, redact_url};
use troupe_sql::{SqlOptions, parse_query};

use crate::hosts::{self, Fence, Follower, TargetSessionAttrs, split_hosts};
use crate::pooling::{Db, PoolMode, Setting, Statements, set_statement};

pub(crate) const BACKEND: &str = "postgres";

/// The schema version this crate writes; older schemas are migrated on connect.
pub(crate) const SCHEMA_VERSION: i64 = 4;

/// Settings of a PostgreSQL database used by Troupe.
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// The server URL (`postgres://user:pass@host:port/db?sslmode=...`), without Troupe's own
    /// query settings.
    pub url: String,
    /// The schema Troupe's tables live in (default `troupe`); created if missing.
    pub schema: String,
    /// How long a worker's claim on a message lasts without renewal; a killed worker's
    /// messages return to their queue after this (default 30 s).
    pub lease: Duration,
    /// How often idle consumers poll, as a fallback to LISTEN/NOTIFY (default 250 ms).
    pub poll_interval: Duration,
    /// How long dead letters are kept (default 7 days).
    pub dead_letter_ttl: Duration,
    /// Largest accepted message (default 1 MiB).
    pub max_message_size: usize,
    /// Connections in the pool (default 10).
    pub max_connections: u32,
    /// How long connecting may take before the server counts as unreachable (default 5 s).
    pub connect_timeout: Duration,
    /// Which server to use when the URL names several (`target_session_attrs`, default
    /// [`TargetSessionAttrs::Any`]); see [`PostgresOptions::from_url`].
    pub target_session_attrs: TargetSessionAttrs,
    /// How the connections reach the server (`pool_mode`, default [`PoolMode::Session`]:
    /// directly or through a session pooler); [`PoolMode::Transaction`] behind PgBouncer's
    /// transaction pooling.
    pub pool_mode: PoolMode,
    /// A URL reaching the server directly, for LISTEN when [`pool_mode`](Self::pool_mode) is
    /// [`PoolMode::Transaction`] (a transaction pooler cannot carry LISTEN); without it, idle
    /// consumers poll every `poll_interval`. Unused in session mode.
    pub listen_url: Option<String>,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .field("dead_letter_ttl", &self.dead_letter_ttl)
            .field("max_message_size", &self.max_message_size)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("target_session_attrs", &self.target_session_attrs)
            .field("pool_mode", &self.pool_mode)
            .field("listen_url", &self.listen_url.as_deref().map(redact_url))
            .finish()
    }
}

impl PostgresOptions {
    /// Defaults for `url`.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "troupe".into(),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
            dead_letter_ttl: Duration::from_secs(7 * 24 * 3600),
            max_message_size: troupe_core::DEFAULT_MAX_MESSAGE_SIZE,
            max_connections: 10,
            connect_timeout: Duration::from_secs(5),
            target_session_attrs: TargetSessionAttrs::Any,
            pool_mode: PoolMode::Session,
            listen_url: None,
        }
    }

    /// Parses `postgres://` or `postgresql://` URLs, with Troupe settings in the query:
    /// `schema`, `lease`, `poll_interval`, `dead_letter_ttl`, `connect_timeout` (durations such
    /// as `30s`), `max_message_size` (bytes), `max_connections`. Other settings (`sslmode`, ...)
    /// go to the driver.
    ///
    /// A URL may name several servers, as libpq's do
    /// (`postgres://USER@HOST1:5432,HOST2:5432/DATABASE?target_session_attrs=read-write`):
    /// Troupe uses the first that answers or, with `target_session_attrs=read-write` (or
    /// `primary`), the first that accepts writes, and checks it every second; when it stops
    /// answering or fitting (a failover promoted a standby), every pool moves to the first
    /// server that fits and connections to the old one are closed.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad part (password redacted).
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let lower = url.to_ascii_lowercase();
        if !lower.starts_with("postgres://") && !lower.starts_with("postgresql://") {
            return Err(Error::Config(format!(
                "{:?} is not a PostgreSQL URL; use postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                redact_url(url)
            )));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut options = Self::new(base);
        let mut passthrough = Vec::new();
        let mut common = options.common();
        let mut tls = TlsFiles::default();
        parse_query("PostgreSQL", query, &mut common, &[], |s| {
            match s.key {
                "schema" => options.schema = s.value.to_owned(),
                "connect_timeout" => options.connect_timeout = s.duration()?,
                "target_session_attrs" => options.target_session_attrs = TargetSessionAttrs::parse(s.value)?,
                "pool_mode" => options.pool_mode = PoolMode::parse(s.value)?,
                "listen_url" => options.listen_url = Some(listen_url(s.value)?),
                // The driver's, checked here so a missing file is named before connecting.
                "sslrootcert" | "sslcert" | "sslkey" => {
                    if s.value != "system" {
                        let path = Some(path_from_query(s.value));
                        match s.key {
                            "sslrootcert" => tls.ca_file = path,
                            "sslcert" => tls.cert_file = path,
                            _ => tls.key_file = path,
                        }
                    }
                    passthrough.push(s.pair);
                }
                // Anything else (sslmode, ...) is the driver's.
                _ => passthrough.push(s.pair),
            }
            Ok(true)
        })?;
        options.set_common(common);
        if !passthrough.is_empty() {
            options.url = format!("{base}?{}", passthrough.join("&"));
        }
        validate_schema(&options.schema)?;
        tls.read(&TLS_NAMES)?;
        options.host_connect_options()?;
        options.listen_connect_options()?;
        Ok(options)
    }

    /// Sets the schema.
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets which server to use when the URL names several.
    #[must_use]
    pub fn target_session_attrs(mut self, attrs: TargetSessionAttrs) -> Self {
        self.target_session_attrs = attrs;
        self
    }

    /// Sets how the connections reach the server.
    #[must_use]
    pub fn pool_mode(mut self, mode: PoolMode) -> Self {
        self.pool_mode = mode;
        self
    }

    /// Sets the direct URL LISTEN uses under transaction pooling.
    #[must_use]
    pub fn listen_url(mut self, url: impl Into<String>) -> Self {
        self.listen_url = Some(url.into());
        self
    }

    /// The connect options of each server the URL names (one for most URLs).
    pub(crate) fn host_connect_options(&self) -> Result<Vec<PgConnectOptions>, Error> {
        split_hosts(&self.url)?
            .iter()
            .map(|url| {
                PgConnectOptions::from_str(url)
                    .map(troupe_connect_options)
                    .map_err(|e| Error::Config(format!("bad PostgreSQL URL {:?}: {e}", redact_url(&self.url))))
            })
            .collect()
    }

    /// The connect options of `listen_url`, used under transaction pooling (`None`: none
    /// given, or session mode, where LISTEN goes over the main pool's server).
    pub(crate) fn listen_connect_options(&self) -> Result<Option<PgConnectOptions>, Error> {
        let Some(url) = self
            .listen_url
            .as_deref()
            .filter(|_| self.pool_mode == PoolMode::Transaction)
        else {
            return Ok(None);
        };
        PgConnectOptions::from_str(url)
            .map(|o| Some(troupe_connect_options(o)))
            .map_err(|e| {
                Error::Config(format!(
                    "bad listen_url {:?} in the PostgreSQL URL: {e}",
                    redact_url(url)
                ))
            })
    }

    /// The settings of the main pool's sessions (or transactions, under transaction pooling).
    pub(crate) fn settings(&self) -> Vec<Setting> {
        vec![("search_path", self.schema.clone())]
    }

    /// The channel NOTIFY wake-ups go on.
    pub(crate) fn channel(&self) -> String {
        format!("troupe_{}", self.schema)
    }
}

troupe_sql::impl_sql_options!(PostgresOptions);

impl FromStr for PostgresOptions {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::from_url(s)
    }
}

/// Troupe's settings on a server's connect options: its application name, and no startup
/// parameter a pooler would refuse (PgBouncer accepts only a few: sqlx's default
/// `extra_float_digits` is not one of them, and Troupe's settings are made after connecting).
fn troupe_connect_options(options: PgConnectOptions) -> PgConnectOptions {
    options.application_name("troupe").extra_float_digits(None)
}

/// A `listen_url` value: a PostgreSQL URL, percent-encoded or not.
fn listen_url(value: &str) -> Result<String, Error> {
    let url = percent_encoding::percent_decode_str(value)
        .decode_utf8_lossy()
        .into_owned();
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        Ok(url)
    } else {
        Err(Error::Config(format!(
            "listen_url {:?} is not a PostgreSQL URL; give the server's own address (not the pooler's), percent-encoded: listen_url=postgres%3A%2F%2FUSER%40HOST%3A5432%2FDATABASE",
            redact_url(&url)
        )))
    }
}

fn validate_schema(schema: &str) -> Result<(), Error> {
    let mut chars = schema.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && schema.len() <= 50;
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "schema {schema:?} is not a plain lowercase identifier ([a-z_][a-z0-9_]*, at most 50 characters)"
        )))
    }
}

/// How long one statement (or one transaction) of Troupe's may wait for the server. A link
/// that stalls for good (a silent firewall, a dead NAT entry, a frozen VM) leaves a statement
/// waiting until TCP gives up, which with nothing unsent is never; and sqlx pings a connection
/// that went back to its pool with no time-out, so the pool slot would be lost with it. Past
/// this, the statement fails as a transient error and its connection is dropped.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the ping of a connection that sat idle may take before the connection is closed
/// and another is used.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// What a timed statement returned, as a Troupe result: sqlx's errors get `what` as context.
pub(crate) trait Outcome {
    /// The value of a success.
    type Value;
    /// `self` with sqlx's errors mapped.
    fn into_result(self, what: &str) -> Result<Self::Value, Error>;
    /// Whether the statement succeeded (its transaction commits).
    fn succeeded(&self) -> bool;
}

impl<T> Outcome for Result<T, sqlx::Error> {
    type Value = T;
    fn into_result(self, what: &str) -> Result<T, Error> {
        self.map_err(|e| db_error(what, e))
    }
    fn succeeded(&self) -> bool {
        self.is_ok()
    }
}

impl<T> Outcome for Result<T, Error> {
    type Value = T;
    fn into_result(self, _: &str) -> Result<T, Error> {
        self
    }
    fn succeeded(&self) -> bool {
        self.is_ok()
    }
}

/// Ends the transaction a timed statement ran in under transaction pooling: commits it when
/// the statement succeeded, rolls it back otherwise.
pub(crate) async fn end_transaction(tx: sqlx::Transaction<'_, Postgres>, succeeded: bool) -> Result<(), sqlx::Error> {
    if succeeded {
        tx.commit().await
    } else {
        tx.rollback().await
    }
}

/// A connection of a pool held by [`timed!`]. Unless its statement finished, dropping it closes
/// the connection instead of returning it to the pool: a statement cut short (by the time-out,
/// or by a caller that stopped waiting) leaves the connection mid-reply, and sqlx would ping
/// it on its way back with no time-out, holding the pool slot for good on a silent link.
pub(crate) struct Held {
    conn: PoolConnection<Postgres>,
    finished: bool,
    /// Under transaction pooling, what the statement's transaction starts with.
    begin: Option<AssertSqlSafe<Arc<str>>>,
}

impl Held {
    /// A connection of `db`'s pool (the pool's acquire time-out bounds the wait).
    pub(crate) async fn acquire(db: &Db, what: &str) -> Result<Self, Error> {
        let conn = db.pool().acquire().await.map_err(|e| db_error(what, e))?;
        Ok(Self {
            conn,
            finished: false,
            begin: db.begin(),
        })
    }

    /// The connection, for the statement.
    pub(crate) fn conn(&mut self) -> &mut sqlx::PgConnection {
        &mut self.conn
    }

    /// Under transaction pooling, what the statement's transaction starts with (`None`: the
    /// statement runs on its own).
    pub(crate) fn begin(&mut self) -> Option<AssertSqlSafe<Arc<str>>> {
        self.begin.take()
    }

    /// The statement's outcome (`Err`: its transaction could not begin or end), or a transient
    /// time-out error (the connection is then closed).
    pub(crate) fn finish<O: Outcome>(
        mut self,
        outcome: Result<Result<O, sqlx::Error>, tokio::time::error::Elapsed>,
        what: &str,
    ) -> Result<O::Value, Error> {
        let Ok(done) = outcome else {
            return Err(Error::backend(
                BACKEND,
                ErrorKind::Timeout,
                format!(
                    "{what}: PostgreSQL did not answer in {} s; the connection was closed (a stalled link?) and the work is retried",
                    QUERY_TIMEOUT.as_secs()
                ),
            ));
        };
        self.finished = true;
        done.map_err(|e| db_error(what, e))?.into_result(what)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.close_on_drop();
            return;
        }
        // sqlx pings every connection given back, with no time-out, before the pool takes it
        // again: a link that went silent just after the statement's reply would hold the pool
        // slot for good (seen in the stall-for-good chaos rounds: a worker's writer pool, both
        // slots stuck, could not ack for minutes). The return gets `PING_TIMEOUT`; past it the
        // connection is dropped and its slot freed.
        let release = self.conn.return_to_pool();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if tokio::time::timeout(PING_TIMEOUT, release).await.is_err() {
                    tracing::debug!("a connection given back to the pool did not answer its ping; dropped");
                }
            });
        }
    }
}

/// Runs `$body`, a future using `$conn: &mut PgConnection` (a connection of `$db`, a
/// [`Db`]) and returning an sqlx or a Troupe result, within [`QUERY_TIMEOUT`]; see [`Held`].
/// Under transaction pooling the statement runs in a transaction of its own that starts with
/// the pool's settings and commits when it succeeded. Every statement of this crate on a pool
/// runs through it.
macro_rules! timed {
    ($db:expr, $what:expr, |$conn:ident| $body:expr) => {{
        let what: &str = $what;
        let mut held = $crate::db::Held::acquire($db, what).await?;
        let outcome = match held.begin() {
            None => {
                let $conn = held.conn();
                ::tokio::time::timeout($crate::db::QUERY_TIMEOUT, async { Ok::<_, ::sqlx::Error>($body.await) }).await
            }
            Some(begin) => {
                let conn = held.conn();
                ::tokio::time::timeout($crate::db::QUERY_TIMEOUT, async {
                    let mut tx = ::sqlx::Connection::begin_with(conn, begin).await?;
                    let out = {
                        let $conn: &mut ::sqlx::PgConnection = &mut tx;
                        $body.await
                    };
                    let succeeded = $crate::db::Outcome::succeeded(&out);
                    $crate::db::end_transaction(tx, succeeded).await?;
                    Ok(out)
                })
                .await
            }
        };
        held.finish(outcome, what)
    }};
}
pub(crate) use timed;

/// Maps an sqlx error to a Troupe error with `what` as context.
pub(crate) fn db_error(what: &str, e: sqlx::Error) -> Error {
    let kind = kind_of(&e);
    let hint = pooler_hint(&e);
    Error::backend_with_source(BACKEND, kind, format!("{what}: {e}{hint}"), e)
}

/// What to fix when `e` is what prepared statements do through a transaction pooler that
/// Troupe was not told about: another client's server connection has no statement of that
/// name, or already has one.
fn pooler_hint(e: &sqlx::Error) -> &'static str {
    let sqlx::Error::Database(db) = e else { return "" };
    let prepared = matches!(db.code().as_deref(), Some("26000" | "42P05")) && db.message().contains("sqlx_s_");
    if prepared {
        "; is this a transaction pooler (PgBouncer's pool_mode = transaction)? add pool_mode=transaction to the URL (and open the results and state backends from the URL or the broker's store(), not a bare pool)"
    } else {
        ""
    }
}

fn kind_of(e: &sqlx::Error) -> ErrorKind {
    match e {
        sqlx::Error::PoolTimedOut => ErrorKind::Timeout,
        // A protocol error is a connection out of step with the server (a reply cut off when
        // the link dropped): worth retrying, like the I/O error it usually follows.
        sqlx::Error::Io(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => ErrorKind::Connection,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // connection exceptions, admin shutdown, cannot connect now, crash shutdown
            Some(code) if code.starts_with("08") || code.starts_with("57P") => ErrorKind::Connection,
            // serialization failure, deadlock: try again
            Some("40001" | "40P01") => ErrorKind::Timeout,
            // read_only_sql_transaction: the server became a standby (a failover); the
            // follower moves the pools to the new primary.
            Some("25006") => ErrorKind::Connection,
            Some("42501" | "3D000" | "28000" | "28P01" | "3F000") => ErrorKind::Config,
            _ => ErrorKind::Other,
        },
        sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } => ErrorKind::Serialization,
        sqlx::Error::RowNotFound => ErrorKind::NotFound,
        sqlx::Error::Configuration(_) => ErrorKind::Config,
        _ => ErrorKind::Other,
    }
}

/// The TLS settings' names in a PostgreSQL URL: libpq's, which the driver reads.
const TLS_NAMES: TlsSettingNames = TlsSettingNames::new("PostgreSQL", "sslrootcert", "sslcert", "sslkey");

fn connect_error(options: &PostgresOptions, e: sqlx::Error) -> Error {
    let url = redact_url(&options.url);
    let code = match &e {
        sqlx::Error::Database(db) => db.code().map(|c| c.to_string()),
        _ => None,
    };
    let tls = tls_hint(&format!("{e} {e:?}"), &TLS_NAMES);
    let hint = match code.as_deref() {
        _ if tls.is_some() => tls.as_deref().unwrap_or_default(),
        Some("3D000") => "the database does not exist; create it (createdb) or fix the URL",
        Some("28000" | "28P01") => {
            "authentication failed; check the user and password in the URL (or the client certificate `sslcert` the server's pg_hba.conf asks for)"
        }
        Some("42501") => "the role lacks a privilege Troupe needs (CREATE on the database, or on the schema)",
        _ if matches!(e, sqlx::Error::Tls(_)) => {
            "the TLS handshake failed; check `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in the URL"
        }
        _ if format!("{e}").contains("unsupported startup parameter") => {
            "a pooler refused a startup parameter of the URL (PgBouncer accepts few); remove it from the URL, or list it in the pooler's ignore_startup_parameters"
        }
        _ if matches!(e, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) => {
            "check that the server runs and the host and port are right"
        }
        _ => "check the URL",
    };
    Error::backend_with_source(
        BACKEND,
        kind_of(&e),
        format!("cannot use PostgreSQL at {url}: {e}; {hint}"),
        e,
    )
}

/// Pool settings shared by every pool of this crate. sqlx pings a connection before each
/// acquire by default: a round trip per statement, which halves the rate of one-at-a-time
/// enqueues. Connections are pinged only after they sat idle for a while (when a restarted
/// server may have dropped them); a connection that broke while in use fails its statement,
/// which callers treat as a transient error, and the pool drops it.
///
/// In session mode each new connection makes the pool's `settings` (`SET`) before its first
/// use; under transaction pooling they are made per transaction instead (see [`Db`]), since a
/// session setting would land on whichever server connection the pooler picked. (They are not
/// sent as the `options` startup parameter, which PgBouncer refuses.)
///
/// With a `fence` (the URL names several servers), a connection made before the pools moved to
/// another server is closed instead of used.
pub(crate) fn pool_options(fence: Option<Arc<Fence>>, mode: PoolMode, settings: &[Setting]) -> PgPoolOptions {
    let set: Option<Arc<str>> =
        (mode == PoolMode::Session && !settings.is_empty()).then(|| set_statement(settings, false).into());
    PgPoolOptions::new()
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            let set = set.clone();
            Box::pin(async move {
                if let Some(set) = set {
                    sqlx::raw_sql(AssertSqlSafe(set)).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .before_acquire(move |conn, meta| {
            let stale = fence.as_ref().is_some_and(|fence| fence.stale(meta.age));
            Box::pin(async move {
                if stale {
                    return Ok(false);
                }
                if meta.idle_for >= PING_IDLE_AFTER {
                    // A silent link fails the ping; the pool closes the connection.
                    tokio::time::timeout(PING_TIMEOUT, sqlx::Connection::ping(conn))
                        .await
                        .map_err(|_| sqlx::Error::PoolTimedOut)??;
                }
                Ok(true)
            })
        })
}

/// How long a pooled connection may sit idle before it is pinged on acquire.
const PING_IDLE_AFTER: Duration = Duration::from_secs(5);

/// The side pools (claims, writer): the main pool's server and settings plus their own.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Side {
    /// Claims only, on sessions that commit asynchronously (`synchronous_commit = off`).
    /// Safe: a claim lost in a server crash leaves its row ready (or its lease expires), and an
    /// ack is durable only after everything written before it in the WAL, claims included.
    Claims,
    /// The writer task (acks, requeues, nacks). Its statements join a batch of ids with the
    /// in-flight rows, and the planner's row estimate for in-flight rows comes from whenever
    /// the table was last analyzed (often: none in flight). A generic plan (which sqlx's
    /// prepared statements get after five runs) then loops over every in-flight row for each
    /// acked one: 40 ms per batch of 128 with 1,024 in flight. Planning each run with its own
    /// array (`force_custom_plan`) hashes instead: under 1 ms.
    Writer,
}

impl Side {
    /// This side's settings: the main pool's and its own.
    fn settings(self, options: &PostgresOptions) -> Vec<Setting> {
        let mut settings = options.settings();
        settings.push(match self {
            Self::Claims => ("synchronous_commit", "off".to_owned()),
            Self::Writer => ("plan_cache_mode", "force_custom_plan".to_owned()),
        });
        settings
    }

    /// A small pool of this side on `main`'s server, connected now; it follows `follower`.
    pub(crate) async fn open(
        self,
        main: &Db,
        options: &PostgresOptions,
        follower: Option<&Follower>,
    ) -> Result<Db, Error> {
        let settings = self.settings(options);
        let pool = pool_options(follower.map(Follower::fence), options.pool_mode, &settings)
            .max_connections(2)
            .acquire_timeout(options.connect_timeout)
            .connect_with((*main.pool().connect_options()).clone())
            .await
            .map_err(|e| connect_error(options, e))?;
        if let Some(follower) = follower {
            follower.add(&pool);
        }
        Ok(Db::new(pool, options.pool_mode, &settings))
    }

    /// A small pool of this side beside `main`, connecting on first use.
    pub(crate) fn beside(self, main: &Db, options: &PostgresOptions) -> Db {
        let settings = self.settings(options);
        let pool = pool_options(None, options.pool_mode, &settings)
            .max_connections(2)
            .acquire_timeout(options.connect_timeout)
            .connect_lazy_with((*main.pool().connect_options()).clone());
        Db::new(pool, options.pool_mode, &settings)
    }
}

/// Opens the main pool (its settings: search_path = the schema) and migrates the schema.
pub(crate) async fn open(options: &PostgresOptions) -> Result<Db, Error> {
    Ok(open_following(options).await?.0)
}

/// [`open`], and when the URL names several servers, the follower that keeps the pool (and
/// the side pools added to it) on one that fits `target_session_attrs`.
pub(crate) async fn open_following(options: &PostgresOptions) -> Result<(Db, Option<Arc<Follower>>), Error> {
    let hosts = options.host_connect_options()?;
    let (connect, follower) = if hosts.len() > 1 {
        let (current, probe) = hosts::find(&hosts, options.target_session_attrs, options.connect_timeout)
            .await
            .map_err(|e| {
                Error::backend(
                    BACKEND,
                    ErrorKind::Connection,
                    format!("cannot use PostgreSQL at {}: {e}", redact_url(&options.url)),
                )
            })?;
        let follower = Follower::new(hosts, current, options.target_session_attrs, options.connect_timeout);
        (follower.current_options(), Some((follower, probe)))
    } else {
        let Some(host) = hosts.into_iter().next() else {
            return Err(Error::Config(format!("{:?} names no server", redact_url(&options.url))));
        };
        (host, None)
    };
    let settings = options.settings();
    let pool = pool_options(follower.as_ref().map(|(f, _)| f.fence()), options.pool_mode, &settings)
        .max_connections(options.max_connections.max(2))
        .acquire_timeout(options.connect_timeout)
        .connect_with(connect)
        .await
        .map_err(|e| connect_error(options, e))?;
    migrate(&pool, options).await?;
    let follower = follower.map(|(follower, probe)| {
        follower.add(&pool);
        Arc::clone(&follower).watch(probe);
        follower
    });
    Ok((Db::new(pool, options.pool_mode, &settings), follower))
}

fn migrations(schema: &str) -> Vec<String> {
    vec![
        // 1: every queue in one jobs table, results, state and events.
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.queues (name text PRIMARY KEY);
        CREATE TABLE IF NOT EXISTS {schema}.jobs (
            id bigserial PRIMARY KEY,
            queue text NOT NULL,
            message_id text NOT NULL,
            priority integer NOT NULL DEFAULT 0,
            state smallint NOT NULL,
            available_at timestamptz NOT NULL DEFAULT now(),
            attempt integer NOT NULL DEFAULT 0,
            lease_owner text,
            lease_until timestamptz,
            reason text,
            failed_at timestamptz,
            enqueued_at timestamptz NOT NULL DEFAULT now(),
            body bytea NOT NULL
        );
        CREATE INDEX IF NOT EXISTS jobs_ready ON {schema}.jobs (queue, priority, id) WHERE state = 0;
        CREATE INDEX IF NOT EXISTS jobs_delayed ON {schema}.jobs (queue, available_at) WHERE state = 3;
        CREATE INDEX IF NOT EXISTS jobs_leased ON {schema}.jobs (lease_until) WHERE state = 1;
        CREATE INDEX IF NOT EXISTS jobs_owner ON {schema}.jobs (lease_owner) WHERE state = 1;
        CREATE INDEX IF NOT EXISTS jobs_dead ON {schema}.jobs (queue, failed_at) WHERE state = 2;
        CREATE TABLE IF NOT EXISTS {schema}.results (
            key text PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz NOT NULL
        );
        CREATE INDEX IF NOT EXISTS results_expiry ON {schema}.results (expires_at);
        CREATE TABLE IF NOT EXISTS {schema}.state (
            key text PRIMARY KEY, value bigint NOT NULL, expires_at timestamptz NOT NULL
        );
        CREATE TABLE IF NOT EXISTS {schema}.events (key text PRIMARY KEY, expires_at timestamptz NOT NULL);"
        ),
        // 2: task records, their cancellation requests and unique keys. Record times are
        // milliseconds as the tracking wrote them; expiries are the server's. Message ids
        // sort bytewise (COLLATE "C"), as pages and cursors order them on every backend.
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.tasks (
            message_id text COLLATE \"C\" PRIMARY KEY,
            actor text NOT NULL,
            queue text NOT NULL,
            status text NOT NULL,
            version bigint NOT NULL,
            enqueued_at bigint NOT NULL,
            started_at bigint,
            finished_at bigint,
            updated_at bigint NOT NULL,
            eta bigint,
            attempts bigint NOT NULL DEFAULT 0,
            error_type text,
            error text,
            worker text,
            progress jsonb,
            args jsonb,
            expires_at timestamptz NOT NULL
        );
        CREATE INDEX IF NOT EXISTS tasks_status_actor ON {schema}.tasks (status, actor, enqueued_at, message_id);
        CREATE INDEX IF NOT EXISTS tasks_status_queue ON {schema}.tasks (status, queue, enqueued_at, message_id);
        CREATE INDEX IF NOT EXISTS tasks_status ON {schema}.tasks (status, enqueued_at, message_id);
        CREATE INDEX IF NOT EXISTS tasks_actor ON {schema}.tasks (actor, enqueued_at, message_id);
        CREATE INDEX IF NOT EXISTS tasks_queue ON {schema}.tasks (queue, enqueued_at, message_id);
        CREATE INDEX IF NOT EXISTS tasks_enqueued ON {schema}.tasks (enqueued_at, message_id);
        CREATE INDEX IF NOT EXISTS tasks_expiry ON {schema}.tasks (expires_at);
        CREATE TABLE IF NOT EXISTS {schema}.cancels (
            message_id text PRIMARY KEY, mode text NOT NULL, expires_at timestamptz NOT NULL
        );
        CREATE INDEX IF NOT EXISTS cancels_expiry ON {schema}.cancels (expires_at);
        CREATE TABLE IF NOT EXISTS {schema}.unique_keys (
            key text PRIMARY KEY, message_id text NOT NULL, expires_at timestamptz NOT NULL
        );
        CREATE INDEX IF NOT EXISTS unique_keys_expiry ON {schema}.unique_keys (expires_at);"
        ),
        // 3: the holders of concurrent rate-limit slots, each with its lease's end, and the
        // parties that arrived at group barriers, with their outcomes.
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.slots (
            key text NOT NULL, holder text NOT NULL, expires_at timestamptz NOT NULL,
            PRIMARY KEY (key, holder)
        );
        CREATE TABLE IF NOT EXISTS {schema}.arrivals (
            key text NOT NULL, party text NOT NULL, outcome text NOT NULL, expires_at timestamptz NOT NULL,
            PRIMARY KEY (key, party)
        );"
        ),
        // 4: live workers' latest heartbeats (JSON), for `troupe workers` and the dashboard.
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.workers (
            id text PRIMARY KEY, info text NOT NULL, expires_at bigint NOT NULL
        );"
        ),
    ]
}

async fn migrate(pool: &PgPool, options: &PostgresOptions) -> Result<(), Error> {
    let schema = options.schema.as_str();
    let sql = Statements::new(options.pool_mode);
    let mut tx = pool.begin().await.map_err(|e| connect_error(options, e))?;
    // One migrator at a time, even with many workers starting together.
    sql.query("SELECT pg_advisory_xact_lock(hashtext('troupe migrations'))")
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("lock the migrations", e))?;
    tx.execute(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}; CREATE TABLE IF NOT EXISTS {schema}.meta (key text PRIMARY KEY, value text NOT NULL)"
    )))
    .await
    .map_err(|e| connect_error(options, e))?;
    let version: i64 = sql
        .query(AssertSqlSafe(format!(
            "SELECT value FROM {schema}.meta WHERE key = 'schema_version'"
        )))
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db_error("read the schema version", e))?
        .and_then(|r| r.try_get::<String, _>(0).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(Error::Config(format!(
            "schema {schema} was written by a newer Troupe (version {version}, this one knows {SCHEMA_VERSION}); upgrade troupe-postgres"
        )));
    }
    for (i, migration) in migrations(schema)
        .into_iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        sqlx::raw_sql(AssertSqlSafe(migration))
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(&format!("migration {}", i + 1), e))?;
    }
    sql.query(AssertSqlSafe(format!(
        "INSERT INTO {schema}.meta (key, value) VALUES ('schema_version', $1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )))
    .bind(SCHEMA_VERSION.to_string())
    .execute(&mut *tx)
    .await
    .map_err(|e| db_error("write the schema version", e))?;
    tx.commit().await.map_err(|e| db_error("commit the migrations", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statement answered, then the link goes silent before the connection is given back:
    /// the pool's slot is freed after the release's time-out instead of being held for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::unwrap_used)]
    async fn a_link_that_goes_silent_after_a_reply_does_not_hold_its_pool_slot() {
        use troupe_test_suite::chaos::{FaultProxy, server_of, with_server};
        let url =
            std::env::var("TROUPE_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let proxy = FaultProxy::start(server_of(&url, 5432).await).await;
        let options = PgConnectOptions::from_str(&with_server(&url, &proxy.addr().to_string())).unwrap();
        let pool = pool_options(None, PoolMode::Session, &[])
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(20))
            .connect_with(options)
            .await
            .unwrap();
        let pool = Db::direct(pool);
        let mut held = Held::acquire(&pool, "a statement").await.unwrap();
        let outcome = {
            let conn = held.conn();
            tokio::time::timeout(QUERY_TIMEOUT, async {
                Ok(sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(conn).await)
            })
            .await
        };
        proxy.black_hole();
        assert_eq!(held.finish(outcome, "a statement").unwrap(), 1);
        let started = std::time::Instant::now();
        let mut again = Held::acquire(&pool, "another statement").await.unwrap();
        let outcome = {
            let conn = again.conn();
            tokio::time::timeout(QUERY_TIMEOUT, async {
                Ok(sqlx::query_scalar::<_, i32>("SELECT 2").fetch_one(conn).await)
            })
            .await
        };
        assert_eq!(again.finish(outcome, "another statement").unwrap(), 2);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the slot came back after {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn parses_urls() {
        let o =
            PostgresOptions::from_url("postgres://u:secret@h:5432/db?schema=jobs&lease=5s&sslmode=disable").unwrap();
        assert_eq!(o.schema, "jobs");
        assert_eq!(o.lease, Duration::from_secs(5));
        assert_eq!(o.url, "postgres://u:secret@h:5432/db?sslmode=disable");
        assert!(!format!("{o:?}").contains("secret"));
        assert!(PostgresOptions::from_url("postgres://h/db?schema=Bad-Name").is_err());
        let e = PostgresOptions::from_url("mysql://u:pw@h/db").unwrap_err().to_string();
        assert!(e.contains("not a PostgreSQL URL") && !e.contains("pw"), "{e}");
    }
}
