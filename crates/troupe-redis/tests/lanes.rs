//! Priority lanes on the machine's Redis (`TROUPE_REDIS_URL`, default
//! `redis://127.0.0.1:6379/0`), a namespace per test: the keys a message of each priority lands
//! in (priority 0 exactly Dramatiq's), the fetch order across lanes, and that requeue, recovery
//! of a dead consumer's messages, delays, stats and purge all keep to the lanes.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{Map, json};
use troupe_core::{Broker, Consumer, ConsumerOptions, Delivery, Message};
use troupe_redis::RedisConnection;
use troupe_redis::{RedisBroker, RedisOptions};

const FETCH: Duration = Duration::from_millis(300);

async fn broker() -> (RedisBroker, String, RedisConnection) {
    let url = std::env::var("TROUPE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let ns = format!("troupe-lanes-{}", uuid::Uuid::new_v4().simple());
    let options = RedisOptions::from_url(&url)
        .unwrap()
        .namespace(&ns)
        .heartbeat_timeout(Duration::from_millis(300));
    let broker = RedisBroker::open(options)
        .await
        .expect("Redis must be running for these tests (scripts/test starts it)");
    let conn = broker.connection();
    (broker, ns, conn)
}

fn message(tag: &str, priority: i32) -> Message {
    Message::new("q", "a", vec![json!(tag)], Map::new()).with_priority(priority)
}

async fn send(broker: &RedisBroker, items: &[(&str, i32)]) -> Vec<Message> {
    broker.declare_queue("q").await.unwrap();
    let mut sent = Vec::new();
    for (tag, priority) in items {
        sent.push(broker.enqueue(message(tag, *priority), None).await.unwrap());
    }
    sent
}

fn tags(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| d.message().unwrap().args[0].as_str().unwrap().to_owned())
        .collect()
}

async fn fetch(consumer: &mut Box<dyn Consumer>, n: usize) -> Vec<Delivery> {
    consumer.fetch(n, FETCH).await.unwrap()
}

async fn list(conn: &mut RedisConnection, key: &str) -> Vec<String> {
    redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap()
}

async fn lanes(conn: &mut RedisConnection, ns: &str) -> Vec<String> {
    redis::cmd("ZRANGE")
        .arg(format!("{ns}:q.lanes"))
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap()
}

fn rid(message: &Message) -> String {
    message.option_str("redis_message_id").unwrap().to_owned()
}

#[tokio::test]
async fn priority_zero_keeps_dramatiqs_layout_and_others_get_lanes() {
    let (broker, ns, mut conn) = broker().await;
    let sent = send(&broker, &[("plain", 0), ("urgent", -5), ("lazy", 3)]).await;
    // Priority 0: a bare uuid4 on ns:q, no troupe_priority option; Python reads it as its own.
    let plain = rid(&sent[0]);
    assert!(uuid::Uuid::parse_str(&plain).is_ok(), "{plain}");
    assert!(!sent[0].options.contains_key("troupe_priority"));
    assert_eq!(list(&mut conn, &format!("{ns}:q")).await, [plain]);
    // Others: a lane list each, named in the lanes set; the rid names its lane.
    let urgent = rid(&sent[1]);
    assert!(urgent.starts_with("P-5:"), "{urgent}");
    assert_eq!(list(&mut conn, &format!("{ns}:q.P-5")).await, [urgent]);
    assert_eq!(list(&mut conn, &format!("{ns}:q.P3")).await, [rid(&sent[2])]);
    assert_eq!(lanes(&mut conn, &ns).await, ["-5", "3"]);
    // Every body is in the one hash, as Dramatiq keeps them.
    let bodies: u64 = redis::cmd("HLEN")
        .arg(format!("{ns}:q.msgs"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(bodies, 3);
    let stats = broker.stats("q").await.unwrap();
    assert_eq!(
        (stats.ready, stats.in_flight),
        (3, 0),
        "lane messages are ready: {stats:?}"
    );
}

#[tokio::test]
async fn fetch_drains_negative_lanes_then_the_plain_list_then_positive_lanes() {
    let (broker, ns, mut conn) = broker().await;
    send(
        &broker,
        &[
            ("p10", 10),
            ("z1", 0),
            ("m1a", -1),
            ("p3", 3),
            ("m10", -10),
            ("z2", 0),
            ("m1b", -1),
        ],
    )
    .await;
    let mut consumer = broker.consume("q", ConsumerOptions::new(10)).await.unwrap();
    // One script call takes across lanes, in order.
    let first = fetch(&mut consumer, 4).await;
    assert_eq!(tags(&first), ["m10", "m1a", "m1b", "z1"]);
    // The emptied lanes left the lanes set.
    assert_eq!(lanes(&mut conn, &ns).await, ["3", "10"]);
    let rest = fetch(&mut consumer, 10).await;
    assert_eq!(tags(&rest), ["z2", "p3", "p10"]);
    let stats = broker.stats("q").await.unwrap();
    assert_eq!((stats.ready, stats.in_flight), (0, 7), "{stats:?}");
    for d in first.iter().chain(&rest) {
        d.ack().await.unwrap();
    }
    assert_eq!(broker.stats("q").await.unwrap().pending(), 0);
    assert!(lanes(&mut conn, &ns).await.is_empty());
}

#[tokio::test]
async fn a_requeued_message_goes_back_to_the_head_of_its_own_lane() {
    let (broker, ns, mut conn) = broker().await;
    send(&broker, &[("a", -2), ("b", -2), ("c", -2), ("plain", 0)]).await;
    let mut consumer = broker.consume("q", ConsumerOptions::new(10)).await.unwrap();
    let got = fetch(&mut consumer, 2).await;
    assert_eq!(tags(&got), ["a", "b"]);
    for d in got.iter().rev() {
        d.requeue().await.unwrap();
    }
    assert_eq!(
        list(&mut conn, &format!("{ns}:q")).await.len(),
        1,
        "not on the plain list"
    );
    assert_eq!(list(&mut conn, &format!("{ns}:q.P-2")).await.len(), 3);
    let again = fetch(&mut consumer, 10).await;
    assert_eq!(tags(&again), ["a", "b", "c", "plain"]);
    // Closing returns what the consumer holds to its lanes too.
    consumer.close().await.unwrap();
    assert_eq!(list(&mut conn, &format!("{ns}:q.P-2")).await.len(), 3);
    assert_eq!(lanes(&mut conn, &ns).await, ["-2"]);
}

#[tokio::test]
async fn a_dead_consumers_messages_come_back_to_their_lanes() {
    let (broker, ns, mut conn) = broker().await;
    send(&broker, &[("urgent", -7), ("plain", 0)]).await;
    let mut consumer = broker.consume("q", ConsumerOptions::new(10)).await.unwrap();
    assert_eq!(tags(&fetch(&mut consumer, 10).await), ["urgent", "plain"]);
    // Dropped without closing: its heartbeat stops, as if its process died.
    drop(consumer);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(broker.maintain("q").await.unwrap(), 2);
    assert_eq!(list(&mut conn, &format!("{ns}:q.P-7")).await.len(), 1);
    assert_eq!(list(&mut conn, &format!("{ns}:q")).await.len(), 1);
    let mut consumer = broker.consume("q", ConsumerOptions::new(10)).await.unwrap();
    assert_eq!(tags(&fetch(&mut consumer, 10).await), ["urgent", "plain"]);
}

#[tokio::test]
async fn delayed_messages_wait_in_delay_queue_lanes_and_purge_clears_every_lane() {
    let (broker, ns, mut conn) = broker().await;
    broker.declare_queue("q").await.unwrap();
    broker
        .enqueue(message("later", -3), Some(Duration::from_secs(60)))
        .await
        .unwrap();
    broker
        .enqueue(message("later-plain", 0), Some(Duration::from_secs(60)))
        .await
        .unwrap();
    // Not on Dramatiq's .DQ list, where a Python worker would move it to the plain list.
    assert_eq!(list(&mut conn, &format!("{ns}:q.DQ.P-3")).await.len(), 1);
    assert_eq!(list(&mut conn, &format!("{ns}:q.DQ")).await.len(), 1);
    assert_eq!(broker.stats("q").await.unwrap().delayed, 2);
    let mut consumer = broker.consume("q.DQ", ConsumerOptions::new(10)).await.unwrap();
    let held = fetch(&mut consumer, 10).await;
    assert_eq!(tags(&held), ["later", "later-plain"]);
    for d in &held {
        d.requeue().await.unwrap();
    }
    consumer.close().await.unwrap();
    send(&broker, &[("now", 4), ("now-plain", 0)]).await;
    broker.purge("q").await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:q*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "purge left {keys:?}");
    assert_eq!(broker.stats("q").await.unwrap().pending(), 0);
}
