//! Ack handles: acking, nacking (to the dead letters, with the reason) and requeueing one
//! delivery on the channel it came from.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use troupe_core::queue::{q_name, xq_name};
use troupe_core::{AckHandle, Error, ErrorKind, Message, Result};

use crate::broker::Inner;
use crate::conn::BACKEND;
use crate::consumer::ConsumerShared;
use crate::publish::persistent;

fn now_secs() -> u64 {
    troupe_core::now_ms() / 1000
}

/// Acks, nacks and requeues one delivery on the channel it came from.
pub(crate) struct RabbitmqAck {
    pub(crate) broker: Arc<Inner>,
    pub(crate) consumer: Arc<ConsumerShared>,
    /// Its delivery tag on the consumer's channel.
    pub(crate) tag: u64,
    pub(crate) acker: lapin::Acker,
    pub(crate) settled: AtomicBool,
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
    ///
    /// Bounded by the operation time-out: the frame is only written, never answered, so a
    /// settle that does not finish met a connection dying under it (seen after a dropped link:
    /// an ack that never returned held up a worker's delayed messages until it was restarted).
    async fn settle(&self, what: &str, op: impl std::future::Future<Output = Result<bool>>) -> Result<()> {
        let poisoned = self.acker.poisoned() || !self.consumer.channel.status().connected();
        let limit = self.broker.timeout();
        let outcome = if poisoned {
            Ok(Ok(false))
        } else if self.settled.load(Ordering::SeqCst) {
            // Settled before: a second frame for its tag would be a channel error.
            Ok(Ok(false))
        } else {
            tokio::time::timeout(limit, op).await
        };
        // Its frame is written (or will not be): no longer held, and coalesced acks may reach
        // past it.
        self.consumer.forget(self.tag);
        self.settled.store(true, Ordering::SeqCst);
        let Ok(result) = outcome else {
            return Err(Error::backend(
                BACKEND,
                ErrorKind::Other,
                format!(
                    "cannot {what} the message: its channel did not take the {what} within {limit:?} (a lost or stalled connection); RabbitMQ redelivers it"
                ),
            ));
        };
        match result {
            Ok(true) => Ok(()),
            Ok(false) if poisoned || self.acker.poisoned() => Err(self.gone(what)),
            Ok(false) => Err(Self::already(what)),
            Err(e) => Err(e),
        }
    }

    /// One of the acker's operations, its error said as a settle error.
    async fn with_acker(what: &str, op: impl std::future::Future<Output = lapin::Result<bool>>) -> Result<bool> {
        op.await.map_err(|e| {
            Error::backend_with_source(
                BACKEND,
                ErrorKind::Other,
                format!("cannot {what} the message: {e}; RabbitMQ redelivers it"),
                e,
            )
        })
    }

    fn already(what: &str) -> Error {
        Error::backend(
            BACKEND,
            ErrorKind::Other,
            format!("cannot {what} the message: it was already acked, nacked or requeued"),
        )
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
        // Coalesced with the channel's other acks (one frame for many).
        self.settle("ack", async { self.consumer.ack(self.tag).await.map(|()| true) })
            .await
    }

    async fn nack(&self, message: Option<&Message>, reason: &str) -> Result<()> {
        if !self.acker.usable() {
            // Publishing the dead letter now would duplicate a message RabbitMQ redelivers.
            return Err(self.gone("nack"));
        }
        if self.settled.load(Ordering::SeqCst) {
            // Acked before (acks go through the channel's coalescer, not the acker): a dead
            // letter now would be a copy of a message that already finished.
            return Err(Self::already("nack"));
        }
        if let Some(message) = message {
            match self.dead_letter(message, reason).await {
                Ok(()) => {
                    let ack = Self::with_acker("nack", self.acker.ack(BasicAckOptions::default()));
                    return self.settle("nack", ack).await;
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot publish the dead letter with its reason; RabbitMQ dead-letters the message as delivered"
                ),
            }
        }
        // RabbitMQ dead-letters it to Q.XQ itself (the queue's x-dead-letter-routing-key).
        let nack = self.acker.nack(BasicNackOptions {
            multiple: false,
            requeue: false,
        });
        self.settle("nack", Self::with_acker("nack", nack)).await
    }

    async fn requeue(&self) -> Result<()> {
        let reject = self.acker.reject(BasicRejectOptions { requeue: true });
        self.settle("requeue", Self::with_acker("requeue", reject)).await
    }
}
