//! Several servers in one URL, as libpq reads them
//! (`postgres://USER@HOST1:5432,HOST2:5432/DB?target_session_attrs=read-write`): Troupe uses
//! the first server that answers (and, with `read-write`, accepts writes), and a watcher moves
//! every pool of a broker to another server when that one stops being fit (a failover promoted
//! a standby). sqlx reads one host per URL; the list is split here.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{Connection, PgConnection, Row};
use troupe_core::{Error, ErrorKind, redact_url};

use crate::db::{BACKEND, PING_TIMEOUT};

/// Which server of a URL naming several Troupe uses (libpq's `target_session_attrs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetSessionAttrs {
    /// The first server that accepts a connection (the default).
    #[default]
    Any,
    /// The first server that accepts writes: a primary, not a standby in recovery and not
    /// read-only (`read-write` or `primary` in a URL).
    ReadWrite,
}

impl TargetSessionAttrs {
    /// Parses a URL's `target_session_attrs`.
    ///
    /// # Errors
    /// [`Error::Config`] for values Troupe cannot use (it writes, so not `read-only`, `standby`
    /// or `prefer-standby`) or does not know.
    pub fn parse(value: &str) -> Result<Self, Error> {
        match value {
            "any" => Ok(Self::Any),
            "read-write" | "primary" => Ok(Self::ReadWrite),
            "read-only" | "standby" | "prefer-standby" => Err(Error::Config(format!(
                "target_session_attrs={value} cannot be used: Troupe writes to its server; use read-write (or any)"
            ))),
            _ => Err(Error::Config(format!(
                "unknown target_session_attrs {value:?}; use read-write or any"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::ReadWrite => "read-write",
        }
    }
}

/// The one-host URLs of `url`: one per host of its host list (`h1:p1,h2:p2`), each with the
/// URL's user, database and settings; `url` itself when it names one host.
pub(crate) fn split_hosts(url: &str) -> Result<Vec<String>, Error> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(vec![url.to_owned()]);
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    if !hosts.contains(',') {
        return Ok(vec![url.to_owned()]);
    }
    hosts
        .split(',')
        .map(|host| {
            if host.is_empty() {
                return Err(Error::Config(format!(
                    "{:?} names an empty host; separate hosts with single commas (postgres://USER@HOST1:PORT,HOST2:PORT/DATABASE)",
                    redact_url(url)
                )));
            }
            Ok(match userinfo {
                Some(userinfo) => format!("{scheme}://{userinfo}@{host}{tail}"),
                None => format!("{scheme}://{host}{tail}"),
            })
        })
        .collect()
}

/// `HOST:PORT` of a server, for messages.
fn address(options: &PgConnectOptions) -> String {
    format!("{}:{}", options.get_host(), options.get_port())
}

/// Marks the connections made before the pools moved to another server, so they are closed
/// instead of used.
#[derive(Debug)]
pub(crate) struct Fence {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last move, plus one (0: never moved).
    moved: AtomicU64,
}

impl Fence {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            moved: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether a connection `age` old was made before the last move.
    pub(crate) fn stale(&self, age: Duration) -> bool {
        let moved = self.moved.load(Ordering::Acquire);
        let made = self
            .now()
            .saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
        moved != 0 && made < moved
    }

    fn mark(&self) {
        self.moved.store(self.now() + 1, Ordering::Release);
    }
}

/// Whether the server `conn` is on is one Troupe may use under `attrs`. Simple queries (one
/// message, nothing prepared), so a check through a transaction pooler stays on one server.
async fn fits(conn: &mut PgConnection, attrs: TargetSessionAttrs) -> Result<bool, sqlx::Error> {
    match attrs {
        TargetSessionAttrs::Any => sqlx::raw_sql("SELECT 1").execute(conn).await.map(|_| true),
        // A standby in recovery reports its sessions read-only too; libpq's read-write asks
        // `transaction_read_only`, its `primary` asks `pg_is_in_recovery()`: both, here.
        TargetSessionAttrs::ReadWrite => {
            sqlx::raw_sql("SELECT NOT (pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on')")
                .fetch_one(conn)
                .await?
                .try_get::<bool, _>(0)
        }
    }
}

/// The first of `hosts` that fits `attrs`, with a connection to it; an error naming what each
/// host said when none does.
pub(crate) async fn find(
    hosts: &[PgConnectOptions],
    attrs: TargetSessionAttrs,
    connect_timeout: Duration,
) -> Result<(usize, PgConnection), Error> {
    let mut tried = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let probe = async {
            let mut conn = PgConnection::connect_with(host).await?;
            let fit = fits(&mut conn, attrs).await?;
            Ok::<_, sqlx::Error>((conn, fit))
        };
        match tokio::time::timeout(connect_timeout, probe).await {
            Ok(Ok((conn, true))) => return Ok((i, conn)),
            Ok(Ok((conn, false))) => {
                let _ = tokio::time::timeout(PING_TIMEOUT, conn.close()).await;
                tried.push(format!("{} is read-only (a standby?)", address(host)));
            }
            Ok(Err(e)) => tried.push(format!("{}: {e}", address(host))),
            Err(_) => tried.push(format!(
                "{} did not answer in {} s",
                address(host),
                connect_timeout.as_secs_f64()
            )),
        }
    }
    Err(Error::backend(
        BACKEND,
        ErrorKind::Connection,
        format!(
            "no PostgreSQL server of {} fits target_session_attrs={} ({}); check that one runs as a primary (a failover may be under way)",
            hosts.len(),
            attrs.name(),
            tried.join("; ")
        ),
    ))
}

/// How often the watcher checks that the server in use still fits.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Keeps the pools of one broker (or one backend) on a server that fits: checks the server in
/// use every second on a connection of its own and, when it no longer answers or fits, finds
/// the first of the hosts that does, points every pool at it and fences their older
/// connections.
pub(crate) struct Follower {
    hosts: Vec<PgConnectOptions>,
    attrs: TargetSessionAttrs,
    connect_timeout: Duration,
    current: AtomicUsize,
    fence: Arc<Fence>,
    /// The pools that follow, the main pool first (each makes its own settings on connect).
    pools: Mutex<Vec<PgPool>>,
}

impl std::fmt::Debug for Follower {
    // No connect options: they hold the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("hosts", &self.hosts.iter().map(address).collect::<Vec<_>>())
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// A follower of `hosts`, using `current` now (not watching yet).
    pub(crate) fn new(
        hosts: Vec<PgConnectOptions>,
        current: usize,
        attrs: TargetSessionAttrs,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            hosts,
            attrs,
            connect_timeout,
            current: AtomicUsize::new(current),
            fence: Arc::new(Fence::new()),
            pools: Mutex::new(Vec::new()),
        })
    }

    /// The fence of the pools that follow.
    pub(crate) fn fence(&self) -> Arc<Fence> {
        Arc::clone(&self.fence)
    }

    /// The main pool's connect options on the server in use.
    pub(crate) fn current_options(&self) -> PgConnectOptions {
        self.hosts[self.current.load(Ordering::Acquire)].clone()
    }

    /// Makes `pool` (the main pool first) follow.
    pub(crate) fn add(&self, pool: &PgPool) {
        if let Ok(mut pools) = self.pools.lock() {
            pools.push(pool.clone());
        }
    }

    /// Watches until the main pool is closed; `probe` is a connection to the server in use.
    pub(crate) fn watch(self: Arc<Self>, probe: PgConnection) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let mut probe = Some(probe);
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                let closed = self
                    .pools
                    .lock()
                    .map_or(true, |pools| pools.first().is_none_or(PgPool::is_closed));
                if closed {
                    return;
                }
                if let Some(conn) = probe.as_mut() {
                    let check = tokio::time::timeout(PING_TIMEOUT, fits(conn, self.attrs)).await;
                    if matches!(check, Ok(Ok(true))) {
                        continue;
                    }
                }
                // The server in use no longer answers or fits: drop the probe (without its
                // goodbye, which a silent link would hold up) and find one that does.
                drop(probe.take());
                match find(&self.hosts, self.attrs, self.connect_timeout).await {
                    Ok((i, conn)) => {
                        probe = Some(conn);
                        if i != self.current.load(Ordering::Acquire) {
                            self.move_to(i);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "PostgreSQL: no server fits yet; looking again in 1 s"),
                }
            }
        });
    }

    /// Points every pool at host `i` and fences the connections made before.
    fn move_to(&self, i: usize) {
        let main = self.hosts[i].clone();
        if let Ok(pools) = self.pools.lock() {
            for pool in pools.iter() {
                pool.set_connect_options(main.clone());
            }
        }
        self.current.store(i, Ordering::Release);
        // After the pools point at the new server: a connection made in between is fenced
        // needlessly, never the other way round.
        self.fence.mark();
        tracing::warn!(
            server = %address(&self.hosts[i]),
            target_session_attrs = self.attrs.name(),
            "PostgreSQL: the server in use stopped answering or fitting; moved to another"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn host_lists_split_into_one_url_per_host() {
        assert_eq!(
            split_hosts("postgres://u:p,w@a:1,b,[::1]:3/db?sslmode=disable").unwrap(),
            vec![
                "postgres://u:p,w@a:1/db?sslmode=disable",
                "postgres://u:p,w@b/db?sslmode=disable",
                "postgres://u:p,w@[::1]:3/db?sslmode=disable",
            ]
        );
        assert_eq!(
            split_hosts("postgres://a:1,b:2").unwrap(),
            vec!["postgres://a:1", "postgres://b:2"]
        );
        assert_eq!(split_hosts("postgres://u@h:1/db").unwrap(), vec!["postgres://u@h:1/db"]);
        let e = split_hosts("postgres://u:secret@a:1,,b:2/db").unwrap_err().to_string();
        assert!(e.contains("empty host") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn target_session_attrs_troupe_cannot_use_are_refused() {
        assert_eq!(
            TargetSessionAttrs::parse("primary").ok(),
            Some(TargetSessionAttrs::ReadWrite)
        );
        assert_eq!(TargetSessionAttrs::parse("any").ok(), Some(TargetSessionAttrs::Any));
        let e = TargetSessionAttrs::parse("standby")
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("Troupe writes"), "{e}");
        assert!(TargetSessionAttrs::parse("whatever").is_err());
    }

    #[test]
    fn connections_made_before_a_move_are_stale() {
        let fence = Fence::new();
        assert!(
            !fence.stale(Duration::from_secs(3600)),
            "nothing is stale before a move"
        );
        std::thread::sleep(Duration::from_millis(20));
        fence.mark();
        assert!(fence.stale(Duration::from_millis(15)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!fence.stale(Duration::from_millis(5)));
    }
}
