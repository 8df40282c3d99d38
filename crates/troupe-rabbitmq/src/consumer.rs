//! Consumers: one channel each on the consumers' connection, fetching deliveries, and what a
//! consumer shares with the ack handles of its deliveries (the count of deliveries it holds).

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use troupe_core::queue::{q_name, validate_queue_name};
use troupe_core::support::Batcher;
use troupe_core::{Consumer, ConsumerOptions, Delivery, Error, ErrorKind, Result, decode_delivery};

use crate::ack::RabbitmqAck;
use crate::broker::Inner;
use crate::conn::{BACKEND, is_not_found, timed};
use crate::topology::short;

/// AMQP's largest prefetch count (a 16-bit short).
const MAX_PREFETCH: usize = 65_535;

/// The most acks one coalesced write takes.
const ACK_BATCH: usize = 1_024;

/// The channel's deliveries in hand, shared by the consumer, its ack handles and the ack
/// coalescer.
#[derive(Debug, Default)]
struct Held {
    /// Delivery tags handed out and not yet settled (no ack, nack or reject of theirs written
    /// yet): what the consumer holds, and what a coalesced ack must not reach.
    tags: BTreeSet<u64>,
    closed: bool,
}

/// What a consumer shares with the ack handles of its deliveries.
#[derive(Debug)]
pub(crate) struct ConsumerShared {
    pub(crate) queue: String,
    pub(crate) channel: Channel,
    held: Arc<Mutex<Held>>,
    /// Acks of this channel, coalesced.
    acks: Batcher<u64>,
}

impl ConsumerShared {
    /// Deliveries held unacked; none once the channel is gone (RabbitMQ took them back).
    pub(crate) fn held(&self) -> u64 {
        if !self.channel.status().connected() {
            return 0;
        }
        self.held
            .lock()
            .map(|h| if h.closed { 0 } else { h.tags.len() as u64 })
            .unwrap_or(0)
    }

    fn delivered(&self, tag: u64) {
        if let Ok(mut held) = self.held.lock() {
            held.tags.insert(tag);
        }
    }

    /// Acks the delivery `tag` of this channel, coalesced with the acks other tasks ask for
    /// meanwhile (see [`ack_coalesced`]); completes once its frame is written.
    pub(crate) async fn ack(&self, tag: u64) -> Result<()> {
        self.acks.submit(tag).await
    }

    /// The delivery `tag` is settled (its frame written, or it never will be): it is no longer
    /// held, and coalesced acks may reach past it.
    pub(crate) fn forget(&self, tag: u64) {
        if let Ok(mut held) = self.held.lock() {
            held.tags.remove(&tag);
        }
    }

    fn closed(&self) {
        if let Ok(mut held) = self.held.lock() {
            held.closed = true;
        }
    }
}

/// Writes the acks of `tags` (one channel's) in as few frames as is safe. RabbitMQ's
/// `basic.ack` with `multiple` acks every unacked delivery of the channel up to its tag, in one
/// frame that costs the server about half the work per message of one ack each. So the tags
/// below the channel's lowest delivery still in hand (not in this batch, not settled) go in one
/// multiple ack; the others one by one. A delivery being nacked or rejected stays held
/// until its frame is written, so a multiple ack never reaches it.
async fn ack_coalesced(channel: Channel, held: Arc<Mutex<Held>>, mut tags: Vec<u64>) -> Result<()> {
    tags.sort_unstable();
    tags.dedup();
    let run = {
        let held = held.lock().map_err(|_| poisoned_lock())?;
        // Walk the held tags from the lowest while they are this batch's.
        let mut mine = tags.iter().peekable();
        let mut boundary = None;
        for &tag in &held.tags {
            if mine.peek() == Some(&&tag) {
                mine.next();
            } else {
                boundary = Some(tag);
                break;
            }
        }
        boundary.map_or(tags.len(), |b| tags.partition_point(|&t| t < b))
    };
    let (together, alone) = tags.split_at(run);
    let mut frames = Vec::with_capacity(1 + alone.len());
    if let Some(&last) = together.last() {
        let multiple = together.len() > 1;
        frames.push(channel.basic_ack(last, BasicAckOptions { multiple }));
    }
    for &tag in alone {
        frames.push(channel.basic_ack(tag, BasicAckOptions { multiple: false }));
    }
    let written = futures::future::join_all(frames).await;
    if let Ok(mut held) = held.lock() {
        for tag in &tags {
            held.tags.remove(tag);
        }
    }
    match written.into_iter().find_map(std::result::Result::err) {
        None => Ok(()),
        Some(e) => Err(Error::backend_with_source(
            BACKEND,
            ErrorKind::Other,
            format!("cannot ack the message: {e}; RabbitMQ redelivers it"),
            e,
        )),
    }
}

fn poisoned_lock() -> Error {
    Error::backend(
        BACKEND,
        ErrorKind::Other,
        "cannot ack the message: a thread panicked while holding the consumer's delivery tags; RabbitMQ redelivers it",
    )
}

/// A consumer: its own channel on the consumers' connection, with `basic_qos(prefetch)` and
/// manual acks.
pub(crate) struct RabbitmqConsumer {
    broker: Arc<Inner>,
    shared: Arc<ConsumerShared>,
    stream: lapin::Consumer,
    /// The queue's name as AMQP takes it, for a new `basic.consume` after a resize.
    name: lapin::types::ShortString,
    /// The `basic.qos` prefetch the stream was started with.
    prefetch: u16,
    /// The stream a resize replaced: cancelled, but what RabbitMQ sent it before the cancel
    /// still arrives there and is taken before the new stream's.
    draining: Option<lapin::Consumer>,
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
    /// Starts consuming `queue` on a channel of its own on the consumers' connection, with
    /// `basic_qos(prefetch)` and manual acks, declaring the queue first if needed.
    pub(crate) async fn start(inner: &Arc<Inner>, queue: &str, options: ConsumerOptions) -> Result<Self> {
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
                    let held = Arc::new(Mutex::new(Held::default()));
                    let acks = {
                        let (channel, held) = (ch.clone(), Arc::clone(&held));
                        Batcher::spawn(BACKEND, ACK_BATCH, move |tags: Vec<u64>| {
                            ack_coalesced(channel.clone(), Arc::clone(&held), tags)
                        })
                    };
                    let shared = Arc::new(ConsumerShared {
                        queue: queue.to_owned(),
                        channel: ch,
                        held,
                        acks,
                    });
                    if let Ok(mut consumers) = inner.consumers.lock() {
                        consumers.retain(|c| c.strong_count() > 0);
                        consumers.push(Arc::downgrade(&shared));
                    }
                    return Ok(RabbitmqConsumer {
                        broker: Arc::clone(inner),
                        shared,
                        stream,
                        name,
                        prefetch,
                        draining: None,
                        failed: None,
                    });
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
        self.shared.delivered(d.delivery_tag);
        let handle = RabbitmqAck {
            broker: Arc::clone(&self.broker),
            consumer: Arc::clone(&self.shared),
            tag: d.delivery_tag,
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
        let mut out = Vec::new();
        // What the stream a resize replaced still holds comes first; it ends once RabbitMQ
        // confirmed the cancel and everything sent before it arrived.
        while let Some(draining) = self.draining.as_mut() {
            match draining.next().now_or_never() {
                Some(Some(Ok(d))) => {
                    out.push(self.delivery(d));
                    if out.len() >= max.max(1) {
                        return Ok(out);
                    }
                }
                Some(Some(Err(e))) => {
                    self.draining = None;
                    let e = self.lost(&e.to_string());
                    if out.is_empty() {
                        return Err(e);
                    }
                    self.failed = Some(e);
                    return Ok(out);
                }
                Some(None) => self.draining = None,
                None => break,
            }
        }
        let wait = if out.is_empty() { timeout } else { Duration::ZERO };
        let Ok(mut next) = tokio::time::timeout(wait, self.stream.next()).await else {
            return Ok(out);
        };
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

    async fn set_prefetch(&mut self, prefetch: usize) -> Result<()> {
        let prefetch = u16::try_from(prefetch.clamp(1, MAX_PREFETCH)).unwrap_or(u16::MAX);
        if prefetch == self.prefetch || self.draining.is_some() {
            // Unchanged, or the last resize is still draining: the next one resizes.
            return Ok(());
        }
        self.broker.check_open()?;
        let ch = self.shared.channel.clone();
        // A consumer's `basic.qos` is fixed when it starts (and quorum queues refuse a
        // channel-wide one), so a resize starts a new consumer on the same channel with the new
        // prefetch and cancels the old one. Deliveries already sent stay on this channel: their
        // acks still apply, and the old stream yields them before it ends.
        timed(
            self.broker.timeout(),
            "set the prefetch",
            ch.basic_qos(prefetch, BasicQosOptions { global: false }),
        )
        .await?;
        let tag = format!("troupe-{}", uuid::Uuid::new_v4().simple());
        let stream = timed(
            self.broker.timeout(),
            &format!("consume {}", self.shared.queue),
            ch.basic_consume(
                self.name.clone(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let old = std::mem::replace(&mut self.stream, stream);
        self.prefetch = prefetch;
        timed(
            self.broker.timeout(),
            "cancel the consumer",
            ch.basic_cancel(old.tag(), BasicCancelOptions::default()),
        )
        .await?;
        self.draining = Some(old);
        Ok(())
    }

    async fn close(self: Box<Self>) -> Result<()> {
        let ch = self.shared.channel.clone();
        let result = if ch.status().connected() {
            // Cancelled first: a quorum queue applies the cancel after the acks sent before it,
            // while a channel closed at once may give back deliveries whose acks it had not
            // applied yet (seen: six acked messages ready again after a close; each would run
            // twice). A cancel that fails leaves that to the close.
            let _ = timed(
                self.broker.timeout(),
                "cancel the consumer",
                ch.basic_cancel(self.stream.tag(), BasicCancelOptions::default()),
            )
            .await;
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
