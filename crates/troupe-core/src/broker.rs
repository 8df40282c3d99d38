//! The broker: the transport every backend implements.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::encoder::Encoder;
use crate::error::{Error, Result};
use crate::message::{Message, duration_ms, now_ms};
use crate::queue;

/// The default limit on an encoded message's size (1 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// What a broker does natively, so the worker knows what it must do itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Delayed messages stay invisible until due on the server (SQL brokers). When false the
    /// broker uses Dramatiq's delay queues (`q.DQ` with `eta`) and the worker holds delayed
    /// messages until due.
    pub native_delays: bool,
    /// The broker delivers a queue's ready messages by priority, most urgent first (FIFO
    /// within a priority). False when it delivers in arrival order whatever the priority
    /// (RabbitMQ without `max_priority`, or with quorum queues); a worker still orders what it
    /// has prefetched.
    pub broker_priorities: bool,
}

impl Capabilities {
    /// Capabilities of a broker that uses delay queues.
    #[must_use]
    pub fn delay_queues() -> Self {
        Self {
            native_delays: false,
            broker_priorities: true,
        }
    }

    /// Capabilities of a broker that delays messages server-side.
    #[must_use]
    pub fn native_delays() -> Self {
        Self {
            native_delays: true,
            broker_priorities: true,
        }
    }

    /// The same, for a broker that delivers in arrival order whatever the priority.
    #[must_use]
    pub fn without_broker_priorities(mut self) -> Self {
        self.broker_priorities = false;
        self
    }
}

/// Message counts of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Ready to be consumed.
    pub ready: u64,
    /// Waiting for their eta.
    pub delayed: u64,
    /// Delivered to a consumer and not yet acked.
    pub in_flight: u64,
    /// In the dead letters.
    pub dead: u64,
    /// Whether a count is an estimate ([`Broker::quick_stats`] on a very long queue).
    pub approximate: bool,
}

impl QueueStats {
    /// Counts from their parts.
    #[must_use]
    pub fn new(ready: u64, delayed: u64, in_flight: u64, dead: u64) -> Self {
        Self {
            ready,
            delayed,
            in_flight,
            dead,
            approximate: false,
        }
    }

    /// Messages not yet finished: ready, delayed and in flight.
    #[must_use]
    pub fn pending(&self) -> u64 {
        self.ready + self.delayed + self.in_flight
    }
}

/// A dead-lettered message with why it died.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The id to requeue it by: the message id when the body decoded, else a broker id.
    pub id: String,
    /// The message, or why its bytes did not decode.
    pub message: std::result::Result<Message, String>,
    /// The reason it was dead-lettered.
    pub reason: String,
    /// When, in ms since the epoch.
    pub failed_at: u64,
}

impl DeadLetter {
    /// A dead letter from its parts.
    #[must_use]
    pub fn new(id: String, message: std::result::Result<Message, String>, reason: String, failed_at: u64) -> Self {
        Self {
            id,
            message,
            reason,
            failed_at,
        }
    }
}

/// Options for [`Broker::consume`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// At most this many deliveries unacked at once (the worker also enforces it).
    pub prefetch: usize,
}

impl ConsumerOptions {
    /// Options with the given prefetch.
    #[must_use]
    pub fn new(prefetch: usize) -> Self {
        Self { prefetch }
    }
}

/// How a delivery is acknowledged; each broker implements it for its deliveries.
#[async_trait]
pub trait AckHandle: Send + Sync + fmt::Debug {
    /// The message was processed: remove it.
    async fn ack(&self) -> Result<()>;
    /// The message failed: move it to the dead letters with `reason`. `message` is the message
    /// as the worker last saw it (with `retries` and `traceback` set), when it decoded.
    async fn nack(&self, message: Option<&Message>, reason: &str) -> Result<()>;
    /// Return the message to its queue unprocessed (not a retry).
    async fn requeue(&self) -> Result<()>;
}

/// One message handed to a consumer.
#[derive(Debug)]
pub struct Delivery {
    queue: String,
    message: std::result::Result<Message, String>,
    redelivered: bool,
    handle: Box<dyn AckHandle>,
}

impl Delivery {
    /// A delivery from the queue it came from, its decoded message (or why decoding failed),
    /// whether it was delivered before, and its ack handle.
    #[must_use]
    pub fn new(
        queue: impl Into<String>,
        message: std::result::Result<Message, String>,
        redelivered: bool,
        handle: Box<dyn AckHandle>,
    ) -> Self {
        Self {
            queue: queue.into(),
            message,
            redelivered,
            handle,
        }
    }

    /// The queue it was consumed from (`q` or `q.DQ`).
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The message, or why its bytes could not be decoded.
    pub fn message(&self) -> std::result::Result<&Message, &str> {
        self.message.as_ref().map_err(String::as_str)
    }

    /// Takes the message out (or the decode failure).
    pub fn take_message(&mut self) -> std::result::Result<Message, String> {
        // An empty placeholder: a string literal here would allocate once per message.
        std::mem::replace(&mut self.message, Err(String::new()))
    }

    /// Whether the broker delivered it before (after a crash or a requeue).
    #[must_use]
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Acknowledges it.
    ///
    /// # Errors
    /// A broker error; transient ones may be retried.
    pub async fn ack(&self) -> Result<()> {
        self.handle.ack().await
    }

    /// Dead-letters it with `reason`.
    ///
    /// # Errors
    /// A broker error; transient ones may be retried.
    pub async fn nack(&self, message: Option<&Message>, reason: &str) -> Result<()> {
        self.handle.nack(message, reason).await
    }

    /// Returns it to its queue unprocessed.
    ///
    /// # Errors
    /// A broker error.
    pub async fn requeue(&self) -> Result<()> {
        self.handle.requeue().await
    }

    /// Its ack handle alone, once the message was taken: what a worker keeps until it settles
    /// the message (16 bytes, where the delivery keeps the room of a message).
    #[must_use]
    pub fn into_handle(self) -> Box<dyn AckHandle> {
        self.handle
    }
}

/// A stream of deliveries from one queue.
///
/// Closing (or dropping) a consumer returns every delivery it handed out and that was neither
/// acked nor nacked to the queue, as RabbitMQ does when a channel closes.
#[async_trait]
pub trait Consumer: Send + fmt::Debug {
    /// Waits up to `timeout` for deliveries and returns at most `max` of them (none on time-out).
    async fn fetch(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivery>>;
    /// Closes the consumer, returning unacknowledged deliveries to the queue.
    async fn close(self: Box<Self>) -> Result<()>;
    /// The worker's window for this consumer changed to `prefetch` messages (an adaptive
    /// window grew or shrank). A broker that pushes messages resizes what it lets the server
    /// send ahead (RabbitMQ's `basic.qos`); the default does nothing, since a broker that is
    /// polled fetches only what [`Consumer::fetch`] asks for.
    async fn set_prefetch(&mut self, prefetch: usize) -> Result<()> {
        let _ = prefetch;
        Ok(())
    }
}

/// A message broker.
///
/// Object-safe: applications hold it as `Arc<dyn Broker>`. Middleware hooks are not the broker's
/// job; the [`App`](crate::App) runs them around [`Broker::enqueue`].
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug + 'static {
    /// The backend's name ("memory", "redis", ...).
    fn backend(&self) -> &'static str;

    /// What the broker does natively.
    fn capabilities(&self) -> Capabilities;

    /// The encoder it writes messages with.
    fn encoder(&self) -> Arc<dyn Encoder>;

    /// Creates `queue` (and its delay and dead-letter queues) if needed. Idempotent.
    async fn declare_queue(&self, queue: &str) -> Result<()>;

    /// Enqueues `message`, after `delay` if given. Returns the message as enqueued (a delay-queue
    /// broker sets `queue_name` to `q.DQ` and `options.eta`).
    async fn enqueue(&self, message: Message, delay: Option<Duration>) -> Result<Message>;

    /// Enqueues several messages, each after its own delay, in as few round trips as the
    /// backend allows, and returns them as enqueued, in order. Messages of one queue are
    /// consumed in the order given.
    ///
    /// SQL brokers write the whole batch in one transaction (all or nothing). Other brokers may
    /// have stored a prefix of the batch when they return an error, as a loop of
    /// [`Broker::enqueue`] would. The default is such a loop.
    async fn enqueue_many(&self, messages: Vec<(Message, Option<Duration>)>) -> Result<Vec<Message>> {
        let mut enqueued = Vec::with_capacity(messages.len());
        for (message, delay) in messages {
            enqueued.push(self.enqueue(message, delay).await?);
        }
        Ok(enqueued)
    }

    /// Starts consuming `queue` (a canonical queue or its `.DQ`).
    async fn consume(&self, queue: &str, options: ConsumerOptions) -> Result<Box<dyn Consumer>>;

    /// Removes every message of `queue`, its delay queue and its dead letters.
    async fn purge(&self, queue: &str) -> Result<()>;

    /// Counts of `queue` (canonical name).
    async fn stats(&self, queue: &str) -> Result<QueueStats>;

    /// Counts of `queue` for a display that must stay fast on any queue (the dashboard): exact
    /// up to a broker's threshold, estimated past it (`approximate` set). The default is
    /// [`stats`](Self::stats); PostgreSQL, where counting a million rows takes a fifth of a
    /// second, estimates counts past 10,000 from the planner's statistics.
    async fn quick_stats(&self, queue: &str) -> Result<QueueStats> {
        self.stats(queue).await
    }

    /// Up to `limit` dead letters of `queue`, oldest first.
    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>>;

    /// Puts the dead letters with these ids (all of them when `ids` is empty) back on `queue`,
    /// with `retries` reset. Returns how many moved.
    async fn requeue_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64>;

    /// Deletes the dead letters of `queue`. Returns how many.
    async fn purge_dead_letters(&self, queue: &str) -> Result<u64>;

    /// Up to `limit` messages of `queue` waiting in `which` state, after the first `offset`:
    /// ready ones in delivery order, delayed ones as the broker keeps them (by eta on SQL
    /// brokers, in arrival order in a delay queue). For inspection (the dashboard): they stay
    /// where they are, except that RabbitMQ, which can only read a queue by taking from it,
    /// returns them at once (they then count as redelivered). Undecodable bodies are left out;
    /// delayed messages a worker already holds until their eta are not in the queue.
    async fn peek(&self, queue: &str, which: Waiting, offset: usize, limit: usize) -> Result<Vec<Message>>;

    /// Deletes the dead letters of `queue` with these ids (as in [`DeadLetter::id`]). Returns
    /// how many. An empty `ids` deletes nothing (see [`purge_dead_letters`](Self::purge_dead_letters)).
    async fn delete_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64>;

    /// The queues this broker knows of (canonical names, sorted, without `.DQ`/`.XQ`): declared
    /// ones on SQL brokers; on Redis those Troupe declared, and those holding messages when the
    /// database has at most 100,000 keys (finding queues only Python peers use takes a scan of
    /// every key); on RabbitMQ those this broker declared and those live workers consume (AMQP
    /// cannot list a server's queues).
    async fn queue_names(&self) -> Result<Vec<String>>;

    /// Records a live worker's heartbeat: [`workers`](Self::workers) lists it until
    /// `worker.expires_at` passes without another beat.
    async fn beat(&self, worker: &WorkerInfo) -> Result<()>;

    /// Removes a worker from [`workers`](Self::workers) (it stopped).
    async fn forget_worker(&self, id: &str) -> Result<()>;

    /// The live workers (their latest heartbeats that have not expired), by id.
    async fn workers(&self) -> Result<Vec<WorkerInfo>>;

    /// Closes connections. Further calls fail.
    async fn close(&self) -> Result<()>;
}

/// Which waiting messages [`Broker::peek`] lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Waiting {
    /// Ready to be consumed.
    Ready,
    /// Waiting for their eta.
    Delayed,
}

/// A worker's heartbeat, as [`Broker::beat`] stores it and [`Broker::workers`] lists it.
/// Serialized as JSON with these field names (the `troupe workers --json` document).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// Unique per worker run (a UUID).
    pub id: String,
    /// The host name.
    pub hostname: String,
    /// The process id.
    pub pid: u32,
    /// The queues it consumes (canonical names).
    pub queues: Vec<String>,
    /// Messages it holds per queue: prefetched, running or being acked.
    pub in_flight: std::collections::BTreeMap<String, u64>,
    /// Actors it runs at once.
    pub concurrency: u64,
    /// Messages it has finished since it started.
    #[serde(default)]
    pub processed: u64,
    /// Its last hour, per minute with activity: `[minute since the epoch, messages processed,
    /// messages dead-lettered]`, oldest first.
    #[serde(default)]
    pub minutes: Vec<[u64; 3]>,
    /// When it started, ms since the epoch.
    pub started_at: u64,
    /// When this heartbeat was sent, ms since the epoch.
    pub beat_at: u64,
    /// When it counts as dead without another beat, ms since the epoch.
    pub expires_at: u64,
    /// The Troupe version it runs.
    pub version: String,
}

impl WorkerInfo {
    /// A heartbeat of this process (host name and pid filled in) at `now`, live for `ttl`.
    #[must_use]
    pub fn new(id: impl Into<String>, queues: Vec<String>, concurrency: u64, ttl: Duration) -> Self {
        let now = now_ms();
        let (hostname, pid) = crate::middleware::worker_id()
            .rsplit_once(':')
            .map_or(("localhost".to_owned(), std::process::id()), |(h, p)| {
                (h.to_owned(), p.parse().unwrap_or_else(|_| std::process::id()))
            });
        Self {
            id: id.into(),
            hostname,
            pid,
            queues,
            in_flight: std::collections::BTreeMap::new(),
            concurrency,
            processed: 0,
            minutes: Vec::new(),
            started_at: now,
            beat_at: now,
            expires_at: now.saturating_add(duration_ms(ttl)),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// Whether it is still live at `now` (ms since the epoch).
    #[must_use]
    pub fn live_at(&self, now: u64) -> bool {
        self.expires_at > now
    }

    /// Messages it holds on every queue.
    #[must_use]
    pub fn total_in_flight(&self) -> u64 {
        self.in_flight.values().sum()
    }
}

/// Prepares a message for a delay-queue broker: `queue_name` becomes `q.DQ` and `options.eta`
/// is now + `delay` in ms. Without a delay the message goes to its canonical queue and any
/// stale `eta` is removed.
#[must_use]
pub fn prepare_for_delay_queue(mut message: Message, delay: Option<Duration>) -> Message {
    match delay {
        Some(delay) => {
            message.queue_name = queue::dq_name(&message.queue_name);
            message.set_eta(now_ms().saturating_add(duration_ms(delay)));
        }
        None => {
            message.queue_name = queue::q_name(&message.queue_name).to_owned();
            message.clear_eta();
        }
    }
    message
}

/// Decodes delivered bytes the same way in every broker: size limit first, then the encoder.
///
/// # Errors
/// The reason, for the dead letters.
pub fn decode_delivery(encoder: &dyn Encoder, bytes: &[u8], max_size: usize) -> std::result::Result<Message, String> {
    if bytes.len() > max_size {
        return Err(Error::MessageTooLarge {
            size: bytes.len(),
            limit: max_size,
        }
        .to_string());
    }
    encoder.decode(bytes).map_err(|e| e.to_string())
}

/// Encodes a message and checks it against the size limit.
///
/// # Errors
/// [`Error::Encode`] or [`Error::MessageTooLarge`].
pub fn encode_checked(encoder: &dyn Encoder, message: &Message, max_size: usize) -> Result<Vec<u8>> {
    let bytes = encoder.encode(message)?;
    if bytes.len() > max_size {
        return Err(Error::MessageTooLarge {
            size: bytes.len(),
            limit: max_size,
        });
    }
    Ok(bytes)
}
