//! Redis Sentinel: a `redis+sentinel://` URL names the sentinels and the name of the master
//! they watch; every new connection asks them which server is the master now, and checks that
//! the server it reaches says it is one (redis-rs's `Sentinel` does both).

use std::time::Duration;

use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use troupe_core::{Error, ErrorKind, redact_url};

use crate::cluster::host_list;
use crate::conn::{BACKEND, kind_of};

/// The scheme of a URL naming sentinels.
pub(crate) const SCHEME: &str = "redis+sentinel://";

/// The sentinels' port when a URL gives none.
const DEFAULT_PORT: u16 = 26379;

const FORM: &str = "redis+sentinel://[:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/MASTER_NAME[/DB]";

/// Whether `url` names sentinels rather than one server.
pub(crate) fn is_sentinel_url(url: &str) -> bool {
    url.get(..SCHEME.len())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SCHEME))
}

/// What a `redis+sentinel://` URL says: where the sentinels are, the master's name, and how to
/// log in to the master (password, user, database).
#[derive(Clone)]
pub(crate) struct SentinelUrl {
    sentinels: Vec<String>,
    master: String,
    redis: redis::RedisConnectionInfo,
}

impl SentinelUrl {
    /// Parses `redis+sentinel://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/MASTER_NAME[/DB]`
    /// (Troupe's own query settings already taken out); the password is the master's.
    pub(crate) fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| {
            Error::Config(format!(
                "bad Redis Sentinel URL {:?}: {why}; use {FORM}",
                redact_url(url)
            ))
        };
        let rest = url.get(SCHEME.len()..).ok_or_else(|| bad("not a sentinel URL"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !query.is_empty() {
            return Err(bad(&format!(
                "unknown settings {query:?} (a sentinel URL takes Troupe's settings only)"
            )));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
            None => (String::new(), authority),
        };
        let sentinels: Vec<String> = host_list(hosts, DEFAULT_PORT)
            .map_err(|why| bad(&why))?
            .into_iter()
            .map(|(host, port)| format!("redis://{host}:{port}"))
            .collect();
        let mut segments = path.split('/').filter(|s| !s.is_empty());
        let master = segments.next().ok_or_else(|| bad("it names no master"))?.to_owned();
        let db = segments.next().unwrap_or("0");
        if segments.next().is_some() {
            return Err(bad("its path has more than a master name and a database"));
        }
        if db.parse::<u32>().is_err() {
            return Err(bad(&format!("the database {db:?} is not a number")));
        }
        for sentinel in &sentinels {
            redis::Client::open(sentinel.as_str()).map_err(|e| bad(&e.to_string()))?;
        }
        // The master's login, read by redis-rs from a URL of the same form.
        let template = format!("redis://{userinfo}127.0.0.1/{db}");
        let redis = redis::Client::open(template.as_str())
            .map_err(|e| bad(&e.to_string()))?
            .get_connection_info()
            .redis_settings()
            .clone();
        Ok(Self {
            sentinels,
            master,
            redis,
        })
    }

    /// A client for the current master: the first sentinel that knows it names it, and the
    /// server there must answer `ROLE` as a master. A transient error while no sentinel answers
    /// or a failover is under way; [`Error::Config`] when the sentinels know no master of that
    /// name.
    pub(crate) async fn master(&self, within: Duration) -> Result<redis::Client, Error> {
        let hosts = self
            .sentinels
            .iter()
            .map(|s| s.trim_start_matches("redis://"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut sentinel = Sentinel::build(self.sentinels.clone())
            .map_err(|e| Error::Config(format!("bad Redis Sentinel addresses {hosts}: {e}")))?;
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(self.redis.clone());
        match tokio::time::timeout(within, sentinel.async_master_for(&self.master, Some(&node))).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e))
                if e.kind() == redis::ErrorKind::MasterNameNotFoundBySentinel && self.unknown_name(within).await =>
            {
                Err(Error::Config(format!(
                    "the Redis sentinels at {hosts} watch no master named {:?}; check the name in the URL against their `sentinel monitor` lines",
                    self.master
                )))
            }
            Ok(Err(e)) => Err(Error::backend_with_source(
                BACKEND,
                match kind_of(&e) {
                    // A sentinel naming a server that is not (yet) a master: a failover.
                    ErrorKind::Protocol => ErrorKind::Connection,
                    kind => kind,
                },
                format!(
                    "cannot reach the Redis master {:?} through the sentinels at {hosts}: {e}; check that the sentinels and the master run",
                    self.master
                ),
                e,
            )),
            Err(_) => Err(Error::backend(
                BACKEND,
                ErrorKind::Timeout,
                format!(
                    "cannot reach the Redis master {:?} through the sentinels at {hosts}: no answer within {within:?}",
                    self.master
                ),
            )),
        }
    }

    /// Whether a sentinel that answers says it watches no master of this name (rather than
    /// naming one that is down or not yet promoted, as during a failover).
    async fn unknown_name(&self, within: Duration) -> bool {
        for sentinel in &self.sentinels {
            let asked = async {
                let client = redis::Client::open(sentinel.as_str())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(&self.master)
                    .query_async::<redis::Value>(&mut conn)
                    .await
            };
            match tokio::time::timeout(within, asked).await {
                Ok(Ok(_)) => return false,
                Ok(Err(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) => {
                    return true;
                }
                _ => {}
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sentinel_urls() {
        let s = SentinelUrl::parse("redis+sentinel://:pw@a:26380,b,[::1]:5/mymaster/3").unwrap();
        assert_eq!(s.sentinels, ["redis://a:26380", "redis://b:26379", "redis://[::1]:5"]);
        assert_eq!(s.master, "mymaster");
        assert_eq!(s.redis.db(), 3);
        assert_eq!(s.redis.password(), Some("pw"));
        let s = SentinelUrl::parse("REDIS+SENTINEL://h/m").unwrap();
        assert_eq!((s.redis.db(), s.redis.password()), (0, None));
        for (url, says) in [
            ("redis+sentinel://h", "names no master"),
            ("redis+sentinel://h/", "names no master"),
            ("redis+sentinel://h,/m", "host is empty"),
            ("redis+sentinel://h/m/x", "not a number"),
            ("redis+sentinel://h/m/1/2", "more than"),
            ("redis+sentinel://:secret@h/m?protocol=resp3", "unknown settings"),
        ] {
            let e = SentinelUrl::parse(url).err().unwrap().to_string();
            assert!(
                e.contains(says) && e.contains(FORM) && !e.contains("secret"),
                "{url}: {e}"
            );
        }
    }
}
