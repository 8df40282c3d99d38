//! Quorum queues (`?queue_type=quorum`) against the machine's RabbitMQ: what is declared, and
//! the delivery limit that dead-letters a message redelivered too often. (The whole
//! conformance suite also runs on quorum queues: `conformance.rs`, module `quorum`.)

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use troupe_core::{Broker, ConsumerOptions, Message};
use troupe_rabbitmq::{QueueType, RabbitmqBroker, RabbitmqOptions};
use troupe_test_suite::unique_queue;

fn url() -> String {
    std::env::var("TROUPE_RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn quorum_broker(url: &str) -> RabbitmqBroker {
    RabbitmqBroker::open(RabbitmqOptions::from_url(url).unwrap())
        .await
        .expect("RabbitMQ must be running for these tests (scripts/test starts it)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_are_declared_as_quorum_queues() {
    let queue = unique_queue("quorum_declared");
    let broker = quorum_broker(&format!("{}?queue_type=quorum", url())).await;
    broker.declare_queue(&queue).await.unwrap();
    // Declaring the same names as classic queues (Dramatiq's arguments) is refused: RabbitMQ
    // says which argument differs.
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let mut dramatiq = FieldTable::default();
    dramatiq.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    dramatiq.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(format!("{queue}.XQ").into()),
    );
    let mut dead = FieldTable::default();
    dead.insert("x-message-ttl".into(), AMQPValue::LongInt(604_800_000));
    for (name, args) in [
        (queue.clone(), dramatiq.clone()),
        (format!("{queue}.DQ"), dramatiq),
        (format!("{queue}.XQ"), dead),
    ] {
        let ch = conn.create_channel().await.unwrap();
        let err = ch
            .queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .expect_err("a classic declaration of a quorum queue is refused");
        assert!(err.to_string().contains("x-queue-type"), "{name}: {err}");
    }
    conn.close(200, "done".into()).await.unwrap();
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await.unwrap();
}

/// A message whose worker never settles it (it dies, or loses its link, each time) comes back
/// until the delivery limit, then RabbitMQ dead-letters it to `Q.XQ` with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redelivered_past_the_delivery_limit_is_dead_lettered() {
    let queue = unique_queue("quorum_limit");
    let broker = quorum_broker(&format!("{}?queue_type=quorum&delivery_limit=2", url())).await;
    let message = Message::new(&queue, "poison", vec![], serde_json::Map::new());
    broker.enqueue(message.clone(), None).await.unwrap();
    let mut deliveries = 0;
    for _ in 0..10 {
        let mut consumer = broker.consume(&queue, ConsumerOptions::new(1)).await.unwrap();
        let got = consumer.fetch(1, Duration::from_secs(2)).await.unwrap();
        if got.is_empty() {
            break;
        }
        deliveries += 1;
        // Dropped unsettled with its consumer: RabbitMQ takes it back and counts a delivery.
        drop(got);
        consumer.close().await.unwrap();
    }
    assert_eq!(deliveries, 3, "delivered once, then redelivered up to the limit of 2");
    let mut dead = Vec::new();
    for _ in 0..50 {
        dead = broker.dead_letters(&queue, 10).await.unwrap();
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].id, message.message_id);
    assert!(dead[0].reason.contains("delivery_limit"), "{}", dead[0].reason);
    broker.delete_queue(&queue).await.unwrap();
    broker.close().await.unwrap();
}

#[test]
fn quorum_settings_that_cannot_work_are_refused_in_one_line() {
    let refused = |url: &str| {
        let err = RabbitmqOptions::from_url(url).unwrap_err().to_string();
        assert!(!err.contains('\n'), "{err}");
        err
    };
    let err = refused("amqp://localhost/%2f?queue_type=quorum&max_priority=10");
    assert!(err.contains("quorum") && err.contains("max_priority"), "{err}");
    let err = refused("amqp://localhost/%2f?delivery_limit=5");
    assert!(err.contains("queue_type=quorum"), "{err}");
    let err = refused("amqp://localhost/%2f?queue_type=stream");
    assert!(err.contains("classic or quorum"), "{err}");
    let options = RabbitmqOptions::from_url("amqp://localhost/%2f?queue_type=quorum&delivery_limit=0").unwrap();
    assert_eq!(options.queue_type, QueueType::Quorum);
    assert_eq!(options.delivery_limit, Some(0));
}
