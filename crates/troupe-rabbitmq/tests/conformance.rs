//! The conformance suite against the machine's RabbitMQ (`TROUPE_RABBITMQ_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`), with `max_priority` 10 unless the URL sets one;
//! then again with quorum queues (module `quorum`: no priorities, delivery limit 20).
//! Every case uses queue names of its own, and deletes them when it ends (the broker under test
//! is wrapped in [`Cleanup`]). A missing server fails the tests; it never skips them.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use troupe_core::queue::q_name;
use troupe_core::{
    Broker, Capabilities, Consumer, ConsumerOptions, DeadLetter, Encoder, Message, QueueStats, Result, Waiting,
    WorkerInfo,
};
use troupe_rabbitmq::{QueueType, RabbitmqBroker, RabbitmqOptions};
use troupe_test_suite::{Harness, RawEnqueue, TestBroker};

/// The broker's options: the URL's, with priority queues (`max_priority` 10 unless the URL sets
/// one), so the priority cases hold; every case's queues are its own, so their arguments never
/// clash with another declaration.
fn options() -> RabbitmqOptions {
    let url = std::env::var("TROUPE_RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let options = RabbitmqOptions::from_url(&url).expect("TROUPE_RABBITMQ_URL");
    let max_priority = options.max_priority.or(Some(10));
    options
        .max_priority(max_priority)
        .max_message_size(64 * 1024)
        .connection_name(format!("troupe-conformance-{}", uuid::Uuid::new_v4().simple()))
}

struct RabbitmqHarness {
    queue_type: QueueType,
}

impl Harness for RabbitmqHarness {
    fn setup(&self) -> BoxFuture<'_, TestBroker> {
        Box::pin(async {
            let options = match self.queue_type {
                QueueType::Quorum => options().max_priority(None).queue_type(QueueType::Quorum),
                _ => options(),
            };
            let limit = options.max_message_size;
            let broker = RabbitmqBroker::open(options)
                .await
                .expect("RabbitMQ must be running for these tests (scripts/test starts it)");
            let raw_broker = broker.clone();
            let raw: RawEnqueue = Arc::new(move |queue, bytes| {
                let b = raw_broker.clone();
                Box::pin(async move { b.enqueue_raw(&queue, bytes).await })
            });
            // A dropped consumer's channel closes at once: redelivery takes milliseconds.
            let broker = Cleanup {
                broker,
                queues: Mutex::new(HashSet::new()),
            };
            TestBroker::new(Arc::new(broker), raw, Duration::from_secs(3), limit)
        })
    }
}

troupe_test_suite::broker_conformance!(RabbitmqHarness {
    queue_type: QueueType::Classic
});

/// The same cases on quorum queues.
mod quorum {
    use super::{QueueType, RabbitmqHarness};

    troupe_test_suite::broker_conformance!(RabbitmqHarness {
        queue_type: QueueType::Quorum
    });
}

/// The broker under test, remembering the queues a case uses so it can delete them (with their
/// `.DQ` and `.XQ`) when the case drops its last handle on it.
#[derive(Debug)]
struct Cleanup {
    broker: RabbitmqBroker,
    queues: Mutex<HashSet<String>>,
}

impl Cleanup {
    fn saw(&self, queue: &str) {
        self.queues.lock().unwrap().insert(q_name(queue).to_owned());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues: Vec<String> = self.queues.lock().unwrap().drain().collect();
        if queues.is_empty() {
            return;
        }
        let options = self.broker.options().clone();
        // The case's runtime may be shutting down: delete from a runtime of our own.
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let broker = RabbitmqBroker::open(options).await.unwrap();
                for queue in queues {
                    broker.delete_queue(&queue).await.unwrap();
                }
                broker.close().await.unwrap();
            });
        })
        .join();
        if cleaned.is_err() && !std::thread::panicking() {
            panic!("could not delete the queues of the case");
        }
    }
}

#[async_trait]
impl Broker for Cleanup {
    fn backend(&self) -> &'static str {
        self.broker.backend()
    }

    fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    fn encoder(&self) -> Arc<dyn Encoder> {
        self.broker.encoder()
    }

    async fn declare_queue(&self, queue: &str) -> Result<()> {
        self.saw(queue);
        self.broker.declare_queue(queue).await
    }

    async fn enqueue(&self, message: Message, delay: Option<Duration>) -> Result<Message> {
        self.saw(&message.queue_name);
        self.broker.enqueue(message, delay).await
    }

    async fn enqueue_many(&self, messages: Vec<(Message, Option<Duration>)>) -> Result<Vec<Message>> {
        for (message, _) in &messages {
            self.saw(&message.queue_name);
        }
        self.broker.enqueue_many(messages).await
    }

    async fn consume(&self, queue: &str, options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        self.saw(queue);
        self.broker.consume(queue, options).await
    }

    async fn purge(&self, queue: &str) -> Result<()> {
        self.broker.purge(queue).await
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats> {
        self.broker.stats(queue).await
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        self.broker.dead_letters(queue, limit).await
    }

    async fn requeue_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        self.broker.requeue_dead_letters(queue, ids).await
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<u64> {
        self.broker.purge_dead_letters(queue).await
    }

    async fn peek(&self, queue: &str, which: Waiting, offset: usize, limit: usize) -> Result<Vec<Message>> {
        self.broker.peek(queue, which, offset, limit).await
    }

    async fn delete_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        self.broker.delete_dead_letters(queue, ids).await
    }

    async fn queue_names(&self) -> Result<Vec<String>> {
        self.broker.queue_names().await
    }

    async fn beat(&self, worker: &WorkerInfo) -> Result<()> {
        self.broker.beat(worker).await
    }

    async fn forget_worker(&self, id: &str) -> Result<()> {
        self.broker.forget_worker(id).await
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.broker.workers().await
    }

    async fn close(&self) -> Result<()> {
        self.broker.close().await
    }
}

/// One delivery of `consumer`, waiting up to 5 s for it.
async fn fetch_one(consumer: &mut Box<dyn Consumer>) -> Option<troupe_core::Delivery> {
    for _ in 0..50 {
        if let Some(delivery) = consumer.fetch(1, Duration::from_millis(100)).await.unwrap().pop() {
            return Some(delivery);
        }
    }
    None
}

/// Acks go through the channel's coalescer, not lapin's per-delivery acker: a delivery acked
/// once is not nacked (no dead letter), requeued or acked again after it, and it does not come
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_acked_once_is_settled_once() {
    let tb = Harness::setup(&RabbitmqHarness {
        queue_type: QueueType::Classic,
    })
    .await;
    let q = troupe_test_suite::unique_queue("once");
    tb.broker.declare_queue(&q).await.unwrap();
    tb.broker
        .enqueue(Message::new(q.as_str(), "a", Vec::new(), serde_json::Map::new()), None)
        .await
        .unwrap();
    let mut consumer = tb.broker.consume(&q, ConsumerOptions::new(8)).await.unwrap();
    let delivery = fetch_one(&mut consumer).await.expect("the message was delivered");
    let message = delivery.message().unwrap().clone();
    delivery.ack().await.unwrap();
    assert!(delivery.nack(Some(&message), "again").await.is_err());
    assert!(delivery.requeue().await.is_err());
    assert!(delivery.ack().await.is_err());
    // The channel is still fine: a second message is delivered and acked on it.
    tb.broker
        .enqueue(Message::new(q.as_str(), "a", Vec::new(), serde_json::Map::new()), None)
        .await
        .unwrap();
    fetch_one(&mut consumer)
        .await
        .expect("a second message")
        .ack()
        .await
        .unwrap();
    consumer.close().await.unwrap();
    assert!(
        tb.broker.dead_letters(&q, 10).await.unwrap().is_empty(),
        "no dead letter"
    );
    let stats = tb.broker.stats(&q).await.unwrap();
    assert_eq!(stats.pending(), 0, "nothing came back: {stats:?}");
}
