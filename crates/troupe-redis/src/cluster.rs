//! Redis Cluster: a `redis+cluster://` URL names some nodes of a cluster (seeds). A Troupe
//! namespace is hash-tagged (`{app}`), so every key of it (queues, acks, heartbeats, task
//! records, and in cluster mode results, rate-limit state and cancellation requests too) is in
//! one hash slot, on one master: every connection is made to the master that serves the
//! namespace's slot at the time, found by asking the seeds (`CLUSTER KEYSLOT`, `CLUSTER
//! SLOTS`), and made again after a `MOVED` (the slot moved, or a failover promoted a replica)
//! or a lost server. Different namespaces spread over the cluster's masters.

use std::time::Duration;

use troupe_core::{Error, ErrorKind, redact_url};

use crate::conn::{BACKEND, kind_of};

/// The scheme of a URL naming cluster nodes.
pub(crate) const SCHEME: &str = "redis+cluster://";

/// The nodes' port when a URL gives none.
const DEFAULT_PORT: u16 = 6379;

const FORM: &str = "redis+cluster://[:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]?namespace={APP}";

/// The namespace a cluster URL gets when it names none: Dramatiq's, hash-tagged.
pub(crate) const DEFAULT_NAMESPACE: &str = "{dramatiq}";

/// Whether `url` names cluster nodes.
pub(crate) fn is_cluster_url(url: &str) -> bool {
    url.get(..SCHEME.len())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SCHEME))
}

/// The hash tag of `key` as Redis Cluster reads it: the text between the first `{` and the
/// next `}` when not empty.
pub(crate) fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

/// Checks that a cluster namespace is hash-tagged and that the cancellation requests' prefix
/// (`abort_namespace`) has the same tag, so all of them are in one slot.
pub(crate) fn check_namespaces(namespace: &str, abort_namespace: &str) -> Result<(), Error> {
    let Some(tag) = hash_tag(namespace) else {
        return Err(Error::Config(format!(
            "on Redis Cluster the namespace must be hash-tagged so all its keys are in one slot: use namespace={{{namespace}}} instead of {namespace:?}"
        )));
    };
    if hash_tag(abort_namespace) != Some(tag) {
        return Err(Error::Config(format!(
            "on Redis Cluster abort_namespace must have the namespace's hash tag {{{tag}}} (e.g. {namespace}:aborts:), not {abort_namespace:?}"
        )));
    }
    Ok(())
}

/// What a `redis+cluster://` URL says: the seed nodes and how to log in (password, user).
#[derive(Clone)]
pub(crate) struct ClusterUrl {
    seeds: Vec<(String, u16)>,
    userinfo: String,
}

impl ClusterUrl {
    /// Parses `redis+cluster://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]…][/0]` (Troupe's own
    /// query settings already taken out).
    pub(crate) fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| {
            Error::Config(format!(
                "bad Redis Cluster URL {:?}: {why}; use {FORM}",
                redact_url(url)
            ))
        };
        let rest = url.get(SCHEME.len()..).ok_or_else(|| bad("not a cluster URL"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !query.is_empty() {
            return Err(bad(&format!(
                "unknown settings {query:?} (a cluster URL takes Troupe's settings only)"
            )));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !matches!(path.trim_end_matches('/'), "" | "0") {
            return Err(bad("Redis Cluster has database 0 only"));
        }
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
            None => (String::new(), authority),
        };
        let seeds = host_list(hosts, DEFAULT_PORT).map_err(|why| bad(&why))?;
        let parsed = Self { seeds, userinfo };
        for (host, port) in &parsed.seeds {
            redis::Client::open(parsed.node_url(host, *port).as_str()).map_err(|e| bad(&e.to_string()))?;
        }
        Ok(parsed)
    }

    fn node_url(&self, host: &str, port: u16) -> String {
        format!("redis://{}{host}:{port}/0", self.userinfo)
    }

    /// A client for the master that serves `namespace`'s slot now, as the first seed that
    /// answers says. A transient error while no seed answers, the slot has no master (a
    /// failover under way) or the cluster is not ready.
    pub(crate) async fn node_for(&self, namespace: &str, within: Duration) -> Result<redis::Client, Error> {
        let mut tried = Vec::new();
        for (host, port) in &self.seeds {
            let asked = async {
                let client = redis::Client::open(self.node_url(host, *port).as_str())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                let slot: i64 = redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(namespace)
                    .query_async(&mut conn)
                    .await?;
                let slots: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn).await?;
                Ok::<_, redis::RedisError>((slot, slots))
            };
            match tokio::time::timeout(within, asked).await {
                Ok(Ok((slot, slots))) => match master_of(slot, &slots) {
                    Some((ip, master_port)) => {
                        // A node that does not know its own address announces none.
                        let ip = if ip.is_empty() { host.clone() } else { ip };
                        return redis::Client::open(self.node_url(&ip, master_port).as_str()).map_err(|e| {
                            Error::Config(format!("bad Redis Cluster node address {ip}:{master_port}: {e}"))
                        });
                    }
                    None => tried.push(format!("{host}:{port} knows no master for slot {slot}")),
                },
                Ok(Err(e)) => {
                    if kind_of(&e) == ErrorKind::Protocol && e.to_string().contains("cluster support disabled") {
                        return Err(Error::Config(format!(
                            "{host}:{port} is not a Redis Cluster node (cluster support disabled); use redis:// for a single server"
                        )));
                    }
                    tried.push(format!("{host}:{port}: {e}"));
                }
                Err(_) => tried.push(format!("{host}:{port} did not answer within {within:?}")),
            }
        }
        Err(Error::backend(
            BACKEND,
            ErrorKind::Connection,
            format!(
                "cannot find the Redis Cluster master of namespace {namespace:?} ({}); check that the nodes run and the cluster is up",
                tried.join("; ")
            ),
        ))
    }
}

/// The `HOST[:PORT]` entries of a comma-separated host list (`[::1]:7000` for IPv6), with
/// `default_port` where none is given; why not, for the caller's message.
pub(crate) fn host_list(hosts: &str, default_port: u16) -> Result<Vec<(String, u16)>, String> {
    hosts
        .split(',')
        .map(|host| {
            if host.is_empty() {
                return Err("a host is empty".to_owned());
            }
            let split = match host.rfind(']') {
                Some(end) => host[end..].rfind(':').map(|i| end + i),
                None => host.rfind(':'),
            };
            match split {
                Some(i) => host[i + 1..]
                    .parse()
                    .map(|port| (host[..i].to_owned(), port))
                    .map_err(|_| format!("the port of {host:?} is not a number")),
                None => Ok((host.to_owned(), default_port)),
            }
        })
        .collect()
}

/// The master (address, port) serving `slot` in a `CLUSTER SLOTS` reply: ranges of
/// `[start, end, [ip, port, id, …], replicas…]`.
fn master_of(slot: i64, slots: &[Vec<redis::Value>]) -> Option<(String, u16)> {
    slots.iter().find_map(|range| {
        let start: i64 = redis::from_redis_value(range.first()?.clone()).ok()?;
        let end: i64 = redis::from_redis_value(range.get(1)?.clone()).ok()?;
        if !(start..=end).contains(&slot) {
            return None;
        }
        let master: Vec<redis::Value> = redis::from_redis_value(range.get(2)?.clone()).ok()?;
        let ip: String = redis::from_redis_value(master.first()?.clone()).ok()?;
        let port: u16 = redis::from_redis_value(master.get(1)?.clone()).ok()?;
        Some((ip, port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_urls() {
        let c = ClusterUrl::parse("redis+cluster://:pw@a:7000,b,[::1]:7002").unwrap();
        assert_eq!(
            c.seeds,
            [("a".into(), 7000), ("b".into(), 6379), ("[::1]".into(), 7002)]
        );
        assert_eq!(c.node_url("a", 7000), "redis://:pw@a:7000/0");
        assert!(ClusterUrl::parse("REDIS+CLUSTER://h/0").is_ok());
        for (url, says) in [
            ("redis+cluster://h,/", "host is empty"),
            ("redis+cluster://h/1", "database 0 only"),
            ("redis+cluster://h:port", "not a number"),
            ("redis+cluster://:secret@h?protocol=resp3", "unknown settings"),
        ] {
            let e = ClusterUrl::parse(url).err().unwrap().to_string();
            assert!(
                e.contains(says) && e.contains(FORM) && !e.contains("secret"),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn namespaces_must_share_one_hash_tag() {
        assert_eq!(hash_tag("{app}"), Some("app"));
        assert_eq!(hash_tag("x{app}:y"), Some("app"));
        assert_eq!(hash_tag("{}app"), None);
        assert_eq!(hash_tag("app"), None);
        assert!(check_namespaces("{app}", "{app}:aborts:").is_ok());
        let e = check_namespaces("app", "app:aborts:").unwrap_err().to_string();
        assert!(e.contains("namespace={app}"), "{e}");
        let e = check_namespaces("{app}", "dramatiq:aborts:").unwrap_err().to_string();
        assert!(e.contains("abort_namespace") && e.contains("{app}:aborts:"), "{e}");
    }

    #[test]
    fn the_master_of_a_slot_is_read_from_cluster_slots() {
        use redis::Value::{Array, BulkString, Int};
        let node = |ip: &str, port| Array(vec![BulkString(ip.into()), Int(port), BulkString(b"id".to_vec())]);
        let slots = vec![
            vec![Int(0), Int(5460), node("10.0.0.1", 7000), node("10.0.0.4", 7003)],
            vec![Int(5461), Int(10922), node("10.0.0.2", 7001)],
        ];
        assert_eq!(master_of(5461, &slots), Some(("10.0.0.2".into(), 7001)));
        assert_eq!(master_of(0, &slots), Some(("10.0.0.1".into(), 7000)));
        assert_eq!(master_of(16000, &slots), None);
    }
}
