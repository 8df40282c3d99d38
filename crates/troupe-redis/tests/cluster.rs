//! Redis Cluster beyond the conformance cases (which run on it too, in `conformance.rs`):
//! namespaces spread over the masters while each stays on one, and a misconfigured cluster
//! URL is one clear line. The cluster (three masters on loopback) is started by the test suite
//! when it is not up.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use troupe_core::{Broker, Message};
use troupe_redis::{RedisBroker, RedisOptions};
use troupe_test_suite::servers::{REDIS_CLUSTER_PORTS, redis_cluster_url};

fn cluster_url() -> String {
    std::env::var("TROUPE_REDIS_CLUSTER_URL").unwrap_or_else(|_| redis_cluster_url())
}

/// How many keys of `namespace` the node on `port` holds.
async fn keys_on(port: u16, namespace: &str) -> usize {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cursor: u64 = 0;
    let mut count = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{namespace}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        count += keys.len();
        if next == 0 {
            return count;
        }
        cursor = next;
    }
}

/// Twelve namespaces, a message each: every namespace's keys are on exactly one master, and
/// the namespaces are spread over more than one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_spread_over_the_masters_and_each_stays_on_one() {
    let url = cluster_url();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut homes: BTreeMap<String, u16> = BTreeMap::new();
    for i in 0..12 {
        let namespace = format!("{{spread-{run}-{i}}}");
        let broker = RedisBroker::open(RedisOptions::from_url(&url).unwrap().namespace(namespace.clone()))
            .await
            .unwrap();
        broker.declare_queue("default").await.unwrap();
        broker
            .enqueue(
                Message::new("default", "noop", vec![serde_json::json!(i)], serde_json::Map::new()),
                None,
            )
            .await
            .unwrap();
        let mut on = Vec::new();
        for port in REDIS_CLUSTER_PORTS {
            if keys_on(port, &namespace).await > 0 {
                on.push(port);
            }
        }
        assert_eq!(on.len(), 1, "{namespace}'s keys are on one master: {on:?}");
        homes.insert(namespace, on[0]);
        broker.purge("default").await.unwrap();
        broker.close().await.unwrap();
    }
    let used: BTreeSet<u16> = homes.values().copied().collect();
    eprintln!("REDIS CLUSTER | 12 namespaces over masters {used:?}");
    assert!(used.len() > 1, "the namespaces spread over the masters: {homes:?}");
}

/// A namespace without a hash tag, an abort prefix in another slot, a cluster URL naming a
/// server that is not a cluster node and a single-server URL naming a cluster node are each
/// refused in one line that says how to fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_urls_say_what_is_wrong_in_one_line() {
    let url = cluster_url();
    let e = RedisBroker::connect(&format!("{url}?namespace=plain"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hash-tagged") && e.contains("namespace={plain}") && !e.contains('\n'),
        "{e}"
    );
    let e = RedisBroker::connect(&format!("{url}?namespace={{app}}&abort_namespace=app:aborts:"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("abort_namespace") && e.contains("{app}:aborts:"), "{e}");
    // The default namespace is hash-tagged: a cluster URL with nothing else works.
    let options = RedisOptions::from_url(&url).unwrap();
    assert_eq!(options.namespace, "{dramatiq}");
    let single = std::env::var("TROUPE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let port = single
        .rsplit_once(':')
        .and_then(|(_, p)| p.split('/').next())
        .unwrap_or("6379")
        .to_owned();
    let e = RedisBroker::connect(&format!("redis+cluster://127.0.0.1:{port}"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a Redis Cluster node") && e.contains("redis://"), "{e}");
    let e = RedisBroker::connect(&format!("redis://127.0.0.1:{}/0", REDIS_CLUSTER_PORTS[0]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is a Redis Cluster node") && e.contains("redis+cluster://"),
        "{e}"
    );
}
