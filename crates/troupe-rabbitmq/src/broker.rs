//! The RabbitMQ broker, its consumers and their ack handles.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use md5::{Digest, Md5};
use troupe_core::queue::{dq_name, q_name, validate_queue_name, xq_name};
use troupe_core::{
    AckHandle, Broker, Capabilities, Consumer, ConsumerOptions, DeadLetter, Delivery, Encoder, Error, ErrorKind,
    JsonEncoder, Message, QueueStats, Result, decode_delivery, encode_checked, prepare_for_delay_queue,
};

use crate::conn::{BACKEND, Link, RabbitmqOptions, closed_error, is_not_found, timed};

/// Publishes are attempted this many times on connection errors (as Dramatiq's
/// `MAX_ENQUEUE_ATTEMPTS`), and as many times when RabbitMQ returns the message as unroutable.
const MAX_PUBLISH_ATTEMPTS: u32 = 6;

/// AMQP's largest prefetch count (a 16-bit short).
const MAX_PREFETCH: usize = 65_535;

/// A broker on RabbitMQ with Python Dramatiq's topology: a Dramatiq worker and a Troupe worker
/// can share its queues, in both directions. Cheap to clone.
///
/// See the [crate documentation](crate) for the topology, the connections it keeps and what
/// happens on a lost connection.
#[derive(Clone, Debug)]
pub struct RabbitmqBroker {
    inner: Arc<Inner>,
}

struct Inner {
    options: RabbitmqOptions,
    name: String,
    /// Publishing and administration (declares, stats, dead letters).
    publish: Link,
    /// Every consumer's channel: a connection of its own, so a publisher blocked by a resource
    /// alarm never stops consumers from acking.
    consume: Link,
    /// The shared publishing channel in confirm mode.
    confirming: tokio::sync::Mutex<Option<Channel>>,
    /// The shared publishing channel without confirms, when `confirm_delivery` is off (dead
    /// letters are still published with confirms, before the original is acked).
    plain: tokio::sync::Mutex<Option<Channel>>,
    /// Canonical queues this broker declared (with their `.DQ` and `.XQ`).
    declared: Mutex<HashSet<String>>,
    consumers: Mutex<Vec<Weak<ConsumerShared>>>,
    encoder: Arc<dyn Encoder>,
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

enum Published {
    Stored,
    Returned,
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

/// A queue name as AMQP wants it (at most 255 bytes).
fn short(name: &str) -> Result<ShortString> {
    ShortString::try_new(name).map_err(|_| Error::InvalidQueueName(name.to_owned()))
}

/// Dramatiq's properties: persistent, nothing else.
fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// The properties a message is published with: persistent, with `broker_priority` if set.
fn properties_of(message: &Message) -> BasicProperties {
    let props = persistent();
    match message.option_u64("broker_priority") {
        Some(p) => props.with_priority(u8::try_from(p).unwrap_or(u8::MAX)),
        None => props,
    }
}

/// An integer argument as pika sends it: a signed 32-bit `I` when it fits, else a 64-bit `l`.
/// RabbitMQ compares integer arguments by value, whatever their width.
fn int_argument(v: i64) -> AMQPValue {
    i32::try_from(v).map_or(AMQPValue::LongLongInt(v), AMQPValue::LongInt)
}

fn now_secs() -> u64 {
    troupe_core::now_ms() / 1000
}

impl Inner {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(closed_error());
        }
        Ok(())
    }

    fn timeout(&self) -> Duration {
        self.options.operation_timeout
    }

    /// Dramatiq's arguments of `Q` and `Q.DQ`.
    fn queue_arguments(&self, canonical: &str) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(xq_name(canonical).into()),
        );
        if let Some(p) = self.options.max_priority {
            args.insert("x-max-priority".into(), int_argument(i64::from(p)));
        }
        args
    }

    /// Dramatiq's arguments of `Q.XQ`.
    fn dead_letter_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), int_argument(self.options.dead_message_ttl_ms()));
        args
    }

    /// The publishing connection; after a reconnect, declares again what was declared.
    async fn publish_conn(&self) -> Result<Arc<Connection>> {
        self.check_open()?;
        let live = self.publish.get().await?;
        if live.reconnected {
            self.redeclare_all(&live.conn).await;
        }
        Ok(live.conn)
    }

    /// A short-lived channel for administration: a failed passive declare or a refused
    /// declaration closes its channel, never the shared publishing one.
    async fn temp_channel(&self) -> Result<Channel> {
        let conn = self.publish_conn().await?;
        timed(self.timeout(), "open a channel", conn.create_channel()).await
    }

    async fn close_channel(&self, ch: Channel) {
        if ch.status().connected() {
            let _ = timed(self.timeout(), "close a channel", ch.close(200, "OK".into())).await;
        }
    }

    /// Declares `Q`, `Q.DQ` and `Q.XQ` on `ch`, in Dramatiq's order.
    async fn declare_on(&self, ch: &Channel, canonical: &str) -> Result<()> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let args = self.queue_arguments(canonical);
        for (name, args) in [
            (canonical.to_owned(), args.clone()),
            (dq_name(canonical), args),
            (xq_name(canonical), self.dead_letter_arguments()),
        ] {
            timed(
                self.timeout(),
                &format!("declare queue {name}"),
                ch.queue_declare(short(&name)?, durable, args),
            )
            .await?;
        }
        Ok(())
    }

    /// Declares `canonical` (and its `.DQ` and `.XQ`) unless this broker already did.
    async fn ensure_declared(&self, canonical: &str) -> Result<()> {
        if self.declared.lock().is_ok_and(|d| d.contains(canonical)) {
            return Ok(());
        }
        let ch = self.temp_channel().await?;
        let result = self.declare_on(&ch, canonical).await;
        self.close_channel(ch).await;
        result?;
        if let Ok(mut declared) = self.declared.lock() {
            declared.insert(canonical.to_owned());
        }
        Ok(())
    }

    fn forget_declared(&self, canonical: &str) {
        if let Ok(mut declared) = self.declared.lock() {
            declared.remove(canonical);
        }
    }

    /// After a reconnect: declares again every queue declared before (the server may have lost
    /// them). A queue that fails is forgotten, so its next use declares it.
    async fn redeclare_all(&self, conn: &Connection) {
        let names: Vec<String> = self
            .declared
            .lock()
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default();
        let mut ch: Option<Channel> = None;
        for name in names {
            let channel = match ch.take() {
                Some(c) if c.status().connected() => c,
                _ => match timed(self.timeout(), "open a channel", conn.create_channel()).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot declare the queues again after a reconnect; they will be declared on their next use");
                        if let Ok(mut declared) = self.declared.lock() {
                            declared.clear();
                        }
                        return;
                    }
                },
            };
            if let Err(e) = self.declare_on(&channel, &name).await {
                tracing::warn!(queue = %name, error = %e, "cannot declare the queue again after a reconnect");
                self.forget_declared(&name);
            }
            ch = Some(channel);
        }
        if let Some(c) = ch {
            self.close_channel(c).await;
        }
    }

    /// The shared publishing channel, with or without confirms, opened (again) when needed.
    async fn publisher(&self, confirm: bool) -> Result<Channel> {
        let mut slot = if confirm { &self.confirming } else { &self.plain }.lock().await;
        if let Some(ch) = slot.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        *slot = None;
        let conn = self.publish_conn().await?;
        let ch = timed(self.timeout(), "open the publishing channel", conn.create_channel()).await?;
        if confirm {
            timed(
                self.timeout(),
                "turn on publisher confirms",
                ch.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?;
        }
        *slot = Some(ch.clone());
        Ok(ch)
    }

    async fn publish_once(
        &self,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        confirm: bool,
    ) -> Result<Published> {
        let ch = self.publisher(confirm).await?;
        // Without confirms nobody would see a returned message: no `mandatory` (as Dramatiq).
        let options = BasicPublishOptions {
            mandatory: confirm,
            immediate: false,
        };
        let rk = short(routing_key)?;
        let confirmation = timed(self.timeout(), &format!("publish to {routing_key}"), async {
            ch.basic_publish("".into(), rk, options, body, props).await?.await
        })
        .await?;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(Published::Stored),
            Confirmation::Ack(Some(_)) => Ok(Published::Returned),
            Confirmation::Nack(_) => Err(Error::backend(
                BACKEND,
                ErrorKind::Other,
                format!("RabbitMQ refused the message for {routing_key} (negative publisher confirm)"),
            )),
        }
    }

    /// Publishes to `routing_key` (`canonical` or one of its `.DQ`/`.XQ`) on the default
    /// exchange, declaring the queues first if needed. With `confirm`, returns once RabbitMQ
    /// has the message, and a message returned as unroutable (a deleted queue) is declared
    /// again and published again. Lost connections are retried on a new one.
    async fn publish(
        &self,
        canonical: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        confirm: bool,
    ) -> Result<()> {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            self.check_open()?;
            let result = match self.ensure_declared(canonical).await {
                Ok(()) => self.publish_once(routing_key, body, props.clone(), confirm).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(Published::Stored) => return Ok(()),
                Ok(Published::Returned) => {
                    tracing::warn!(
                        queue = routing_key,
                        "RabbitMQ returned the message as unroutable (was the queue deleted?); declaring the queues again"
                    );
                    self.forget_declared(canonical);
                    if attempt >= MAX_PUBLISH_ATTEMPTS {
                        return Err(Error::backend(
                            BACKEND,
                            ErrorKind::NotFound,
                            format!(
                                "RabbitMQ kept returning the message for queue {routing_key} as unroutable; check that nothing deletes the queue"
                            ),
                        ));
                    }
                }
                // A lost connection is retried on a new one. A time-out is not: RabbitMQ may
                // have the message already, or be blocking publishers on a resource alarm.
                Err(e) if e.kind() == ErrorKind::Connection && attempt < MAX_PUBLISH_ATTEMPTS => {
                    tracing::warn!(queue = routing_key, error = %e, "publish failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => return Err(e),
            }
            attempt += 1;
        }
    }

    /// Publishes a batch (canonical queue, routing key, body, properties) on the shared
    /// channel without waiting between messages, then waits for every confirm, as a batched
    /// confirm loop does. A message the server returned as unroutable, or one whose publish
    /// met a lost connection, is sent again alone through [`Inner::publish`] with its retries.
    async fn publish_many(&self, items: &[(String, String, Vec<u8>, BasicProperties)], confirm: bool) -> Result<()> {
        let mut declared = HashSet::new();
        for (canonical, ..) in items {
            if declared.insert(canonical.as_str()) {
                self.ensure_declared(canonical).await?;
            }
        }
        let ch = self.publisher(confirm).await?;
        let options = BasicPublishOptions {
            mandatory: confirm,
            immediate: false,
        };
        let mut pending = Vec::with_capacity(items.len());
        for (_, routing_key, body, props) in items {
            let rk = short(routing_key)?;
            pending.push(
                timed(
                    self.timeout(),
                    &format!("publish to {routing_key}"),
                    ch.basic_publish("".into(), rk, options, body, props.clone()),
                )
                .await,
            );
        }
        for ((canonical, routing_key, body, props), sent) in items.iter().zip(pending) {
            let confirmed = match sent {
                Ok(confirm) => timed(self.timeout(), &format!("publish to {routing_key}"), confirm).await,
                Err(e) => Err(e),
            };
            match confirmed {
                Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => {}
                Ok(Confirmation::Nack(_)) => {
                    return Err(Error::backend(
                        BACKEND,
                        ErrorKind::Other,
                        format!("RabbitMQ refused the message for {routing_key} (negative publisher confirm)"),
                    ));
                }
                Ok(Confirmation::Ack(Some(_))) => {
                    self.publish(canonical, routing_key, body, props.clone(), confirm)
                        .await?;
                }
                Err(e) if e.kind() == ErrorKind::Connection => {
                    self.publish(canonical, routing_key, body, props.clone(), confirm)
                        .await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A message made ready to publish: bound for its delay queue when delayed, its canonical
    /// queue checked, encoded within the size limit.
    fn prepare(&self, message: Message, delay: Option<Duration>) -> Result<(Message, String, Vec<u8>)> {
        let message = prepare_for_delay_queue(message, delay);
        let canonical = message.canonical_queue().to_owned();
        validate_queue_name(&canonical)?;
        let body = encode_checked(self.encoder.as_ref(), &message, self.options.max_message_size)?;
        Ok((message, canonical, body))
    }

    /// The deliveries this broker's live consumers of `queue` hold unacked.
    fn held(&self, queue: &str) -> u64 {
        self.consumers
            .lock()
            .map(|consumers| {
                consumers
                    .iter()
                    .filter_map(Weak::upgrade)
                    .filter(|c| c.queue == queue)
                    .map(|c| c.held())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Message counts of `names` (0 for a queue that does not exist), by passive declares.
    async fn counts(&self, names: &[String]) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(names.len());
        let mut ch: Option<Channel> = None;
        for name in names {
            let channel = match ch.take() {
                Some(c) if c.status().connected() => c,
                _ => self.temp_channel().await?,
            };
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            match timed(
                self.timeout(),
                &format!("count the messages of {name}"),
                channel.queue_declare(short(name)?, passive, FieldTable::default()),
            )
            .await
            {
                Ok(q) => out.push(u64::from(q.message_count())),
                // 404 closed the channel; the next name opens another.
                Err(e) if is_not_found(&e) => out.push(0),
                Err(e) => {
                    self.close_channel(channel).await;
                    return Err(e);
                }
            }
            ch = Some(channel);
        }
        if let Some(c) = ch {
            self.close_channel(c).await;
        }
        Ok(out)
    }

    /// Purges `name`; 0 when it does not exist. Reopens `ch` when a 404 closed it.
    async fn purge_one(&self, ch: &mut Channel, name: &str) -> Result<u64> {
        if !ch.status().connected() {
            *ch = self.temp_channel().await?;
        }
        match timed(
            self.timeout(),
            &format!("purge {name}"),
            ch.queue_purge(short(name)?, QueuePurgeOptions::default()),
        )
        .await
        {
            Ok(n) => Ok(u64::from(n)),
            Err(e) if is_not_found(&e) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// A dead letter from its delivery (peeked with `basic_get`).
    fn dead_letter_of(&self, delivery: &lapin::message::Delivery) -> DeadLetter {
        // Decoded as a worker would, so an oversized or undecodable body shows why it died.
        let message = decode_delivery(self.encoder.as_ref(), &delivery.data, self.options.max_message_size);
        let reason = match &message {
            Ok(m) => m
                .option_str("traceback")
                .map_or_else(|| death_reason(&delivery.properties), str::to_owned),
            Err(e) => format!("undecodable message: {e}"),
        };
        let id = match &message {
            Ok(m) => m.message_id.clone(),
            Err(_) => format!("md5:{:x}", Md5::digest(&delivery.data)),
        };
        DeadLetter::new(id, message, reason, failed_at(&delivery.properties))
    }
}

/// The first `x-death` entry RabbitMQ adds when it dead-letters a message itself.
fn first_death(props: &BasicProperties) -> Option<&FieldTable> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        },
        _ => None,
    }
}

/// Why RabbitMQ dead-lettered a message that carries no `traceback`.
fn death_reason(props: &BasicProperties) -> String {
    let reason = first_death(props).and_then(|d| match d.inner().get("reason") {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        _ => None,
    });
    match reason {
        Some(r) => format!("dead-lettered by RabbitMQ ({r})"),
        None => "dead-lettered".to_owned(),
    }
}

/// When it was dead-lettered, in ms: Troupe's `timestamp` property, else RabbitMQ's `x-death`
/// time, else 0 (unknown).
fn failed_at(props: &BasicProperties) -> u64 {
    let secs = props.timestamp().or_else(|| {
        first_death(props).and_then(|d| match d.inner().get("time") {
            Some(AMQPValue::Timestamp(t)) => Some(*t),
            _ => None,
        })
    });
    secs.map_or(0, |s| s.saturating_mul(1000))
}

#[async_trait]
impl Broker for RabbitmqBroker {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::delay_queues()
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
                properties_of(&message),
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
            items.push((canonical, message.queue_name.clone(), body, properties_of(&message)));
            enqueued.push(message);
        }
        self.inner
            .publish_many(&items, self.inner.options.confirm_delivery)
            .await?;
        Ok(enqueued)
    }

    async fn consume(&self, queue: &str, options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        let inner = &self.inner;
        inner.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        let name = short(queue)?;
        let prefetch = u16::try_from(options.prefetch.clamp(1, MAX_PREFETCH)).unwrap_or(u16::MAX);
        let mut attempt = 0;
        loop {
            attempt += 1;
            inner.ensure_declared(canonical).await?;
            let live = inner.consume.get().await?;
            let ch = timed(inner.timeout(), "open a consumer channel", live.conn.create_channel()).await?;
            let started = async {
                timed(
                    inner.timeout(),
                    "set the prefetch",
                    ch.basic_qos(prefetch, BasicQosOptions { global: false }),
                )
                .await?;
                let tag = format!("troupe-{}", uuid::Uuid::new_v4().simple());
                timed(
                    inner.timeout(),
                    &format!("consume {queue}"),
                    ch.basic_consume(
                        name.clone(),
                        tag.into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    ),
                )
                .await
            }
            .await;
            match started {
                Ok(stream) => {
                    let shared = Arc::new(ConsumerShared {
                        queue: queue.to_owned(),
                        channel: ch,
                        counts: Mutex::new(Counts::default()),
                    });
                    if let Ok(mut consumers) = inner.consumers.lock() {
                        consumers.retain(|c| c.strong_count() > 0);
                        consumers.push(Arc::downgrade(&shared));
                    }
                    return Ok(Box::new(RabbitmqConsumer {
                        broker: Arc::clone(inner),
                        shared,
                        stream,
                        failed: None,
                    }));
                }
                Err(e) if is_not_found(&e) && attempt < 2 => {
                    // The queue vanished after this broker declared it: declare it again.
                    tracing::warn!(queue, "the queue is gone; declaring it again");
                    inner.forget_declared(canonical);
                }
                Err(e) => {
                    inner.close_channel(ch).await;
                    return Err(e);
                }
            }
        }
    }

    async fn purge(&self, queue: &str) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        let mut ch = inner.temp_channel().await?;
        let mut result = Ok(());
        for name in [canonical.to_owned(), dq_name(canonical), xq_name(canonical)] {
            if let Err(e) = inner.purge_one(&mut ch, &name).await {
                result = Err(e);
                break;
            }
        }
        inner.close_channel(ch).await;
        result
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats> {
        let inner = &self.inner;
        inner.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        let dq = dq_name(canonical);
        let counts = inner
            .counts(&[canonical.to_owned(), dq.clone(), xq_name(canonical)])
            .await?;
        let (ready, delayed, dead) = (counts[0], counts[1], counts[2]);
        // Delayed messages a worker of this broker holds until their eta count as delayed,
        // as on Redis.
        Ok(QueueStats::new(
            ready,
            delayed + inner.held(&dq),
            inner.held(canonical),
            dead,
        ))
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        let inner = &self.inner;
        inner.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        let xq = short(&xq_name(canonical))?;
        let ch = inner.temp_channel().await?;
        let mut out = Vec::new();
        let mut result = Ok(());
        // Peeked without ack; closing the channel puts them all back, in order.
        while out.len() < limit {
            match timed(
                inner.timeout(),
                "read the dead letters",
                ch.basic_get(xq.clone(), BasicGetOptions { no_ack: false }),
            )
            .await
            {
                Ok(Some(got)) => out.push(inner.dead_letter_of(&got.delivery)),
                Ok(None) => break,
                Err(e) if is_not_found(&e) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        inner.close_channel(ch).await;
        result.map(|()| out)
    }

    async fn requeue_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        let inner = &self.inner;
        inner.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        inner.ensure_declared(canonical).await?;
        let xq = short(&xq_name(canonical))?;
        let mut wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let all = ids.is_empty();
        let ch = inner.temp_channel().await?;
        let mut moved = 0;
        let result = async {
            while all || !wanted.is_empty() {
                let got = timed(
                    inner.timeout(),
                    "read the dead letters",
                    ch.basic_get(xq.clone(), BasicGetOptions { no_ack: false }),
                )
                .await?;
                let Some(got) = got else { break };
                let letter = inner.dead_letter_of(&got.delivery);
                if !all && !wanted.remove(letter.id.as_str()) {
                    continue;
                }
                // Undecodable bytes stay in the dead letters.
                let Ok(mut message) = letter.message else { continue };
                message.options.insert("retries".into(), 0.into());
                message.queue_name = canonical.to_owned();
                let message = prepare_for_delay_queue(message, None);
                let body = inner.encoder.encode(&message)?;
                // Confirmed before the dead letter is removed.
                inner
                    .publish(canonical, canonical, &body, properties_of(&message), true)
                    .await?;
                timed(
                    inner.timeout(),
                    "remove a requeued dead letter",
                    got.delivery.acker.ack(BasicAckOptions::default()),
                )
                .await?;
                moved += 1;
            }
            Ok::<_, Error>(())
        }
        .await;
        // The dead letters read but not moved go back, in order.
        inner.close_channel(ch).await;
        result.map(|()| moved)
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<u64> {
        let inner = &self.inner;
        inner.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        let mut ch = inner.temp_channel().await?;
        let result = inner.purge_one(&mut ch, &xq_name(canonical)).await;
        inner.close_channel(ch).await;
        result
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.publish.close().await;
        self.inner.consume.close().await;
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Counts {
    unsettled: u64,
    closed: bool,
}

/// What a consumer shares with the ack handles of its deliveries.
#[derive(Debug)]
struct ConsumerShared {
    queue: String,
    channel: Channel,
    counts: Mutex<Counts>,
}

impl ConsumerShared {
    /// Deliveries held unacked; none once the channel is gone (RabbitMQ took them back).
    fn held(&self) -> u64 {
        if !self.channel.status().connected() {
            return 0;
        }
        self.counts
            .lock()
            .map(|c| if c.closed { 0 } else { c.unsettled })
            .unwrap_or(0)
    }

    fn delivered(&self) {
        if let Ok(mut c) = self.counts.lock() {
            c.unsettled += 1;
        }
    }

    fn settled(&self) {
        if let Ok(mut c) = self.counts.lock() {
            c.unsettled = c.unsettled.saturating_sub(1);
        }
    }

    fn closed(&self) {
        if let Ok(mut c) = self.counts.lock() {
            c.closed = true;
            c.unsettled = 0;
        }
    }
}

/// A consumer: its own channel on the consumers' connection, with `basic_qos(prefetch)` and
/// manual acks.
struct RabbitmqConsumer {
    broker: Arc<Inner>,
    shared: Arc<ConsumerShared>,
    stream: lapin::Consumer,
    /// An error met after a batch was already taken: returned by the next fetch.
    failed: Option<Error>,
}

impl std::fmt::Debug for RabbitmqConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitmqConsumer")
            .field("queue", &self.shared.queue)
            .field("channel", &self.shared.channel.id())
            .finish_non_exhaustive()
    }
}

impl RabbitmqConsumer {
    /// The consumer is dead (channel closed, connection lost, consumer cancelled): a
    /// connection error, so the worker makes a new consumer.
    fn lost(&self, cause: &str) -> Error {
        Error::backend(
            BACKEND,
            ErrorKind::Connection,
            format!(
                "the consumer of {} stopped: {cause}; its unacked messages go back to the queue",
                self.shared.queue
            ),
        )
    }

    fn delivery(&self, d: lapin::message::Delivery) -> Delivery {
        let message = decode_delivery(
            self.broker.encoder.as_ref(),
            &d.data,
            self.broker.options.max_message_size,
        );
        self.shared.delivered();
        let handle = RabbitmqAck {
            broker: Arc::clone(&self.broker),
            consumer: Arc::clone(&self.shared),
            acker: d.acker,
            settled: AtomicBool::new(false),
        };
        Delivery::new(self.shared.queue.clone(), message, d.redelivered, Box::new(handle))
    }
}

#[async_trait]
impl Consumer for RabbitmqConsumer {
    async fn fetch(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        self.broker.check_open()?;
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if !self.shared.channel.status().connected() {
            return Err(self.lost("its channel closed"));
        }
        let Ok(mut next) = tokio::time::timeout(timeout, self.stream.next()).await else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        loop {
            let failure = match next {
                Some(Ok(d)) => {
                    out.push(self.delivery(d));
                    None
                }
                Some(Err(e)) => Some(self.lost(&e.to_string())),
                None => Some(self.lost("RabbitMQ cancelled it (was the queue deleted?)")),
            };
            if let Some(e) = failure {
                if out.is_empty() {
                    return Err(e);
                }
                self.failed = Some(e);
                break;
            }
            if out.len() >= max.max(1) {
                break;
            }
            // What else is already buffered, without waiting.
            match self.stream.next().now_or_never() {
                Some(item) => next = item,
                None => break,
            }
        }
        Ok(out)
    }

    async fn close(self: Box<Self>) -> Result<()> {
        let ch = self.shared.channel.clone();
        let result = if ch.status().connected() {
            // RabbitMQ puts the unacked deliveries back before it confirms the close.
            timed(
                self.broker.timeout(),
                "close the consumer's channel",
                ch.close(200, "consumer closed".into()),
            )
            .await
        } else {
            Ok(())
        };
        self.shared.closed();
        match result {
            // A channel that died meanwhile is closed as well.
            Err(e) if e.kind() == ErrorKind::Connection => Ok(()),
            other => other,
        }
    }
}

impl Drop for RabbitmqConsumer {
    fn drop(&mut self) {
        self.shared.closed();
        let ch = self.shared.channel.clone();
        if ch.status().connected()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // Dropped without close (a crash, a cancelled task): close the channel so RabbitMQ
            // returns the unacked deliveries now. Without a runtime, lapin closes it once the
            // last handle on it is gone.
            runtime.spawn(async move {
                let _ = ch.close(200, "consumer dropped".into()).await;
            });
        }
    }
}

/// Acks, nacks and requeues one delivery on the channel it came from.
struct RabbitmqAck {
    broker: Arc<Inner>,
    consumer: Arc<ConsumerShared>,
    acker: lapin::Acker,
    settled: AtomicBool,
}

impl std::fmt::Debug for RabbitmqAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitmqAck")
            .field("queue", &self.consumer.queue)
            .finish_non_exhaustive()
    }
}

impl RabbitmqAck {
    /// Runs one of ack, nack or reject. A delivery tag only means something on its channel, so
    /// no failure here is transient: once the channel is gone, RabbitMQ redelivers the message.
    async fn settle(&self, what: &str, op: impl std::future::Future<Output = lapin::Result<bool>>) -> Result<()> {
        let poisoned = self.acker.poisoned();
        let result = op.await;
        if !self.settled.swap(true, Ordering::SeqCst) {
            self.consumer.settled();
        }
        match result {
            Ok(true) => Ok(()),
            Ok(false) if poisoned || self.acker.poisoned() => Err(self.gone(what)),
            Ok(false) => Err(Error::backend(
                BACKEND,
                ErrorKind::Other,
                format!("cannot {what} the message: it was already acked, nacked or requeued"),
            )),
            Err(e) => Err(Error::backend_with_source(
                BACKEND,
                ErrorKind::Other,
                format!("cannot {what} the message: {e}; RabbitMQ redelivers it"),
                e,
            )),
        }
    }

    fn gone(&self, what: &str) -> Error {
        Error::backend(
            BACKEND,
            ErrorKind::Other,
            format!(
                "cannot {what} the message: the channel that delivered it closed (lost connection or closed consumer); RabbitMQ redelivers it"
            ),
        )
    }

    /// Publishes the message as the worker last saw it, with its reason as `traceback`, to the
    /// dead letters.
    async fn dead_letter(&self, message: &Message, reason: &str) -> Result<()> {
        let mut message = message.clone();
        if message.option_str("traceback") != Some(reason) {
            message.options.insert("traceback".into(), reason.into());
        }
        let body = self.broker.encoder.encode(&message)?;
        let canonical = q_name(&self.consumer.queue);
        // The timestamp says when it died (dead_letters' `failed_at`).
        let props = persistent().with_timestamp(now_secs());
        // Confirmed before the original is acked.
        self.broker
            .publish(canonical, &xq_name(canonical), &body, props, true)
            .await
    }
}

#[async_trait]
impl AckHandle for RabbitmqAck {
    async fn ack(&self) -> Result<()> {
        self.settle("ack", self.acker.ack(BasicAckOptions::default())).await
    }

    async fn nack(&self, message: Option<&Message>, reason: &str) -> Result<()> {
        if !self.acker.usable() {
            // Publishing the dead letter now would duplicate a message RabbitMQ redelivers.
            return Err(self.gone("nack"));
        }
        if let Some(message) = message {
            match self.dead_letter(message, reason).await {
                Ok(()) => return self.settle("nack", self.acker.ack(BasicAckOptions::default())).await,
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot publish the dead letter with its reason; RabbitMQ dead-letters the message as delivered"
                ),
            }
        }
        // RabbitMQ dead-letters it to Q.XQ itself (the queue's x-dead-letter-routing-key).
        self.settle(
            "nack",
            self.acker.nack(BasicNackOptions {
                multiple: false,
                requeue: false,
            }),
        )
        .await
    }

    async fn requeue(&self) -> Result<()> {
        self.settle("requeue", self.acker.reject(BasicRejectOptions { requeue: true }))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_arguments_as_pika_sends_them() {
        assert_eq!(int_argument(604_800_000), AMQPValue::LongInt(604_800_000));
        assert_eq!(int_argument(10), AMQPValue::LongInt(10));
        assert_eq!(int_argument(1 << 40), AMQPValue::LongLongInt(1 << 40));
    }

    #[test]
    fn priorities_come_from_broker_priority() {
        let m = Message::new("q", "a", vec![], serde_json::Map::new()).with_option("broker_priority", 7);
        assert_eq!(*properties_of(&m).priority(), Some(7));
        assert_eq!(*properties_of(&m).delivery_mode(), Some(2));
        let m = m.with_option("broker_priority", 1000);
        assert_eq!(*properties_of(&m).priority(), Some(255));
        let m = Message::new("q", "a", vec![], serde_json::Map::new());
        assert_eq!(*properties_of(&m).priority(), None);
    }
}
