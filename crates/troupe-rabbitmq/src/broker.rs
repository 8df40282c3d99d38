//! The RabbitMQ broker: its shared state, its constructors, the channels it opens on the
//! publishing connection, and the `Broker` implementation, which delegates to the other modules.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use lapin::{Channel, Connection};
use troupe_core::queue::{dq_name, q_name, validate_queue_name, xq_name};
use troupe_core::{
    Broker, Capabilities, Consumer, ConsumerOptions, DeadLetter, Encoder, JsonEncoder, Message, QueueStats, Result,
    Waiting, WorkerInfo,
};

use crate::conn::{BACKEND, Link, RabbitmqOptions, closed_error, timed};
use crate::consumer::{ConsumerShared, RabbitmqConsumer};
use crate::publish::persistent;
use crate::topology::short;

/// A broker on RabbitMQ with Python Dramatiq's topology: a Dramatiq worker and a Troupe worker
/// can share its queues, in both directions. Cheap to clone.
///
/// See the [crate documentation](crate) for the topology, the connections it keeps and what
/// happens on a lost connection.
#[derive(Clone, Debug)]
pub struct RabbitmqBroker {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) options: RabbitmqOptions,
    name: String,
    /// Publishing and administration (declares, stats, dead letters).
    publish: Link,
    /// Every consumer's channel: a connection of its own, so a publisher blocked by a resource
    /// alarm never stops consumers from acking.
    pub(crate) consume: Link,
    /// The shared publishing channel in confirm mode.
    pub(crate) confirming: tokio::sync::Mutex<Option<Channel>>,
    /// The shared publishing channel without confirms, when `confirm_delivery` is off (dead
    /// letters are still published with confirms, before the original is acked).
    pub(crate) plain: tokio::sync::Mutex<Option<Channel>>,
    /// Canonical queues this broker declared (with their `.DQ` and `.XQ`).
    pub(crate) declared: Mutex<HashSet<String>>,
    pub(crate) consumers: Mutex<Vec<Weak<ConsumerShared>>>,
    pub(crate) encoder: Arc<dyn Encoder>,
    /// Queues already warned about prioritized messages without `max_priority`.
    pub(crate) priority_warned: Mutex<HashSet<String>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No connection internals: they could carry credentials.
        f.debug_struct("RabbitmqBroker")
            .field("options", &self.options)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RabbitmqBroker {
    /// Connects to the server an `amqp://` URL names (see [`RabbitmqOptions::from_url`]).
    ///
    /// # Errors
    /// A bad URL, or an unreachable server (one line, password redacted).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(RabbitmqOptions::from_url(url)?).await
    }

    /// Connects with these options. The publishing connection is opened at once, so an
    /// unreachable server fails here; the consumers' connection opens with the first consumer.
    ///
    /// # Errors
    /// Bad options, or an unreachable server.
    pub async fn open(options: RabbitmqOptions) -> Result<Self> {
        options.validate()?;
        let name = options.connection_name.clone().unwrap_or_else(|| {
            format!(
                "troupe-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });
        let inner = Arc::new(Inner {
            publish: Link::new(options.clone(), format!("{name} publish")),
            consume: Link::new(options.clone(), format!("{name} consume")),
            options,
            name,
            confirming: tokio::sync::Mutex::new(None),
            plain: tokio::sync::Mutex::new(None),
            declared: Mutex::new(HashSet::new()),
            consumers: Mutex::new(Vec::new()),
            encoder: Arc::new(JsonEncoder),
            priority_warned: Mutex::new(HashSet::new()),
            closed: AtomicBool::new(false),
        });
        inner.publisher(inner.options.confirm_delivery).await?;
        Ok(Self { inner })
    }

    /// The options it was opened with.
    #[must_use]
    pub fn options(&self) -> &RabbitmqOptions {
        &self.inner.options
    }

    /// The `connection_name` its connections carry (followed by ` publish` or ` consume`).
    #[must_use]
    pub fn connection_name(&self) -> &str {
        &self.inner.name
    }

    /// Publishes raw bytes to `queue` (a canonical queue or its `.DQ`), bypassing the encoder
    /// (to test what workers do with bad input).
    ///
    /// # Errors
    /// A bad queue name or a broker error.
    pub async fn enqueue_raw(&self, queue: &str, bytes: Vec<u8>) -> Result<()> {
        self.inner.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        let confirm = self.inner.options.confirm_delivery;
        self.inner
            .publish(canonical, queue, &bytes, persistent(), confirm)
            .await
    }

    /// Deletes `queue`, its delay queue and its dead letters from RabbitMQ, messages included
    /// (an operator's tool; Dramatiq has none). The broker declares them again when it next
    /// uses them.
    ///
    /// # Errors
    /// A bad queue name or a broker error.
    pub async fn delete_queue(&self, queue: &str) -> Result<()> {
        self.inner.check_open()?;
        let canonical = q_name(queue).to_owned();
        validate_queue_name(&canonical)?;
        self.inner.forget_declared(&canonical);
        let ch = self.inner.temp_channel().await?;
        let mut result = Ok(());
        for name in [canonical.clone(), dq_name(&canonical), xq_name(&canonical)] {
            let deleted = timed(
                self.inner.options.operation_timeout,
                &format!("delete queue {name}"),
                ch.queue_delete(short(&name)?, lapin::options::QueueDeleteOptions::default()),
            )
            .await;
            if let Err(e) = deleted {
                result = Err(e);
                break;
            }
        }
        self.inner.close_channel(ch).await;
        result
    }
}

impl Inner {
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(closed_error());
        }
        Ok(())
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.options.operation_timeout
    }

    /// The publishing connection; after a reconnect, declares again what was declared.
    pub(crate) async fn publish_conn(&self) -> Result<Arc<Connection>> {
        self.check_open()?;
        let live = self.publish.get().await?;
        if live.reconnected {
            self.redeclare_all(&live.conn).await;
        }
        Ok(live.conn)
    }

    /// A short-lived channel for administration: a failed passive declare or a refused
    /// declaration closes its channel, never the shared publishing one.
    pub(crate) async fn temp_channel(&self) -> Result<Channel> {
        let conn = self.publish_conn().await?;
        timed(self.timeout(), "open a channel", conn.create_channel()).await
    }

    pub(crate) async fn close_channel(&self, ch: Channel) {
        if ch.status().connected() {
            let _ = timed(self.timeout(), "close a channel", ch.close(200, "OK".into())).await;
        }
    }
}

#[async_trait]
impl Broker for RabbitmqBroker {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        if self.inner.options.max_priority.is_some() {
            Capabilities::delay_queues()
        } else {
            Capabilities::delay_queues().without_broker_priorities()
        }
    }

    fn encoder(&self) -> Arc<dyn Encoder> {
        Arc::clone(&self.inner.encoder)
    }

    async fn declare_queue(&self, queue: &str) -> Result<()> {
        self.inner.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        self.inner.ensure_declared(canonical).await
    }

    async fn enqueue(&self, message: Message, delay: Option<Duration>) -> Result<Message> {
        self.inner.check_open()?;
        let (message, canonical, body) = self.inner.prepare(message, delay)?;
        self.inner
            .publish(
                &canonical,
                &message.queue_name,
                &body,
                self.inner.properties(&message),
                self.inner.options.confirm_delivery,
            )
            .await?;
        Ok(message)
    }

    async fn enqueue_many(&self, messages: Vec<(Message, Option<Duration>)>) -> Result<Vec<Message>> {
        self.inner.check_open()?;
        let mut items = Vec::with_capacity(messages.len());
        let mut enqueued = Vec::with_capacity(messages.len());
        for (message, delay) in messages {
            let (message, canonical, body) = self.inner.prepare(message, delay)?;
            let props = self.inner.properties(&message);
            items.push((canonical, message.queue_name.clone(), body, props));
            enqueued.push(message);
        }
        self.inner
            .publish_many(&items, self.inner.options.confirm_delivery)
            .await?;
        Ok(enqueued)
    }

    async fn consume(&self, queue: &str, options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(RabbitmqConsumer::start(&self.inner, queue, options).await?))
    }

    async fn purge(&self, queue: &str) -> Result<()> {
        self.inner.purge(queue).await
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats> {
        self.inner.stats(queue).await
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        self.inner.dead_letters(queue, limit).await
    }

    async fn requeue_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        self.inner.requeue_dead_letters(queue, ids).await
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<u64> {
        self.inner.purge_dead_letters(queue).await
    }

    async fn peek(&self, queue: &str, which: Waiting, offset: usize, limit: usize) -> Result<Vec<Message>> {
        self.inner.peek(queue, which, offset, limit).await
    }

    async fn delete_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        self.inner.delete_dead_letters(queue, ids).await
    }

    async fn queue_names(&self) -> Result<Vec<String>> {
        // AMQP cannot list a server's queues: those this broker declared and those live
        // workers consume.
        let mut names: std::collections::BTreeSet<String> = self
            .inner
            .declared
            .lock()
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default();
        for worker in self.inner.workers().await? {
            names.extend(worker.queues);
        }
        Ok(names.into_iter().collect())
    }

    async fn beat(&self, worker: &WorkerInfo) -> Result<()> {
        self.inner.beat(worker).await
    }

    async fn forget_worker(&self, id: &str) -> Result<()> {
        self.inner.forget_worker(id).await
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.inner.workers().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.publish.close().await;
        self.inner.consume.close().await;
        Ok(())
    }
}
