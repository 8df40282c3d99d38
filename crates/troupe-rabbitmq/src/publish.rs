//! Publishing: the shared publishing channels, single and batch publishes with their retries,
//! and the properties and encoding a message is published with.

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation};
use troupe_core::queue::validate_queue_name;
use troupe_core::{Error, ErrorKind, Message, Result, encode_checked, prepare_for_delay_queue, priority};

use crate::broker::Inner;
use crate::conn::{BACKEND, QueueType, timed};
use crate::topology::short;

/// Publishes are attempted this many times on connection errors (as Dramatiq's
/// `MAX_ENQUEUE_ATTEMPTS`), and as many times when RabbitMQ returns the message as unroutable.
const MAX_PUBLISH_ATTEMPTS: u32 = 6;

enum Published {
    Stored,
    Returned,
}

/// Dramatiq's properties: persistent, nothing else.
pub(crate) fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// The AMQP priority a message is published with, if any:
///
/// - Dramatiq's own `broker_priority` option when set (from a Python producer or
///   `SendOptions::broker_priority`): that value, as Dramatiq publishes it;
/// - else a Troupe priority p < 0 (more urgent than default) on queues declared with
///   `max_priority`: `ceil(-p * max_priority / 10)`, capped at `max_priority`;
/// - else none, exactly as Dramatiq publishes (p >= 0, or no `max_priority`: RabbitMQ ignores
///   the property on a queue without `x-max-priority`).
pub(crate) fn amqp_priority(message: &Message, max_priority: Option<u8>) -> Option<u8> {
    if let Some(p) = message.broker_priority() {
        return Some(u8::try_from(p).unwrap_or(u8::MAX));
    }
    let priority = message.priority();
    let max = max_priority?;
    if priority >= 0 {
        return None;
    }
    let scaled = (priority.unsigned_abs() * u32::from(max)).div_ceil(priority::MAX.unsigned_abs());
    Some(u8::try_from(scaled).map_or(max, |p| p.min(max)))
}

/// The properties a message is published with: persistent, with its [`amqp_priority`].
pub(crate) fn properties_of(message: &Message, max_priority: Option<u8>) -> BasicProperties {
    let props = persistent();
    match amqp_priority(message, max_priority) {
        Some(p) => props.with_priority(p),
        None => props,
    }
}

/// A negative publisher confirm: RabbitMQ could not take the message now (a quorum queue
/// without a leader while its cluster elects one, a queue whose process or node is down). A
/// transient error: publishing again later succeeds once the queue is back.
fn refused(routing_key: &str) -> Error {
    Error::backend(
        BACKEND,
        ErrorKind::Connection,
        format!(
            "RabbitMQ refused the message for {routing_key} for now (negative publisher confirm: the queue is unavailable, e.g. a quorum queue electing a leader or a node down)"
        ),
    )
}

impl Inner {
    /// The properties `message` is published with (see [`amqp_priority`]). A message more urgent
    /// than default (priority < 0) on a broker without `max_priority` gets none, and one warning
    /// per queue says how to have RabbitMQ honour it.
    pub(crate) fn properties(&self, message: &Message) -> BasicProperties {
        let max_priority = self.options.max_priority;
        if max_priority.is_none() && message.priority() < 0 && message.broker_priority().is_none() {
            let canonical = message.canonical_queue();
            let first = self
                .priority_warned
                .lock()
                .map(|mut warned| warned.insert(canonical.to_owned()))
                .unwrap_or(false);
            if first {
                let fix = match self.options.queue_type {
                    QueueType::Quorum => {
                        "quorum queues have no priorities on RabbitMQ 3.x: use classic queues with max_priority for priorities"
                    }
                    _ => {
                        "set max_priority in the broker URL (e.g. ?max_priority=10) on every producer and worker of this queue (queues declared without it must be deleted first)"
                    }
                };
                tracing::warn!(
                    queue = canonical,
                    priority = message.priority(),
                    "a prioritized message was published to a queue without priorities, so RabbitMQ delivers it in arrival order: {fix}"
                );
            }
        }
        properties_of(message, max_priority)
    }

    /// The shared publishing channel, with or without confirms, opened (again) when needed.
    pub(crate) async fn publisher(&self, confirm: bool) -> Result<Channel> {
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

    /// Stops using `ch` for publishing (a later publish opens a new channel) and closes it.
    /// After a negative confirm: on RabbitMQ 3.10, a channel that began publishing to a quorum
    /// queue while the queue was electing a leader went on being refused after the election
    /// (seen in the cluster chaos rounds), while a new channel is accepted.
    pub(crate) async fn discard_publisher(&self, ch: &Channel, confirm: bool) {
        {
            let mut slot = if confirm { &self.confirming } else { &self.plain }.lock().await;
            if slot.as_ref().is_some_and(|current| current.id() == ch.id()) {
                *slot = None;
            }
        }
        self.close_channel(ch.clone()).await;
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
            Confirmation::Nack(_) => {
                self.discard_publisher(&ch, confirm).await;
                Err(refused(routing_key))
            }
        }
    }

    /// Publishes to `routing_key` (`canonical` or one of its `.DQ`/`.XQ`) on the default
    /// exchange, declaring the queues first if needed. With `confirm`, returns once RabbitMQ
    /// has the message, and a message returned as unroutable (a deleted queue) is declared
    /// again and published again. Lost connections are retried on a new one.
    pub(crate) async fn publish(
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
                // A lost connection is retried on a new one, a refusal (negative confirm) after
                // a pause. A time-out is not: RabbitMQ may have the message already, or be
                // blocking publishers on a resource alarm.
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
    /// met a lost connection or a negative confirm, is sent again alone through [`Inner::publish`] with its retries.
    pub(crate) async fn publish_many(
        &self,
        items: &[(String, String, Vec<u8>, BasicProperties)],
        confirm: bool,
    ) -> Result<()> {
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
                    self.discard_publisher(&ch, confirm).await;
                    self.publish(canonical, routing_key, body, props.clone(), confirm)
                        .await?;
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
    pub(crate) fn prepare(&self, message: Message, delay: Option<Duration>) -> Result<(Message, String, Vec<u8>)> {
        let message = prepare_for_delay_queue(message, delay);
        let canonical = message.canonical_queue().to_owned();
        validate_queue_name(&canonical)?;
        let body = encode_checked(self.encoder.as_ref(), &message, self.options.max_message_size)?;
        Ok((message, canonical, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Message {
        Message::new("q", "a", vec![], serde_json::Map::new())
    }

    #[test]
    fn priorities_come_from_broker_priority() {
        let m = message().with_option("broker_priority", 7);
        assert_eq!(*properties_of(&m, None).priority(), Some(7));
        assert_eq!(*properties_of(&m, None).delivery_mode(), Some(2));
        let m = m.with_option("broker_priority", 1000);
        assert_eq!(*properties_of(&m, Some(10)).priority(), Some(255));
        assert_eq!(*properties_of(&message(), None).priority(), None);
        assert_eq!(*properties_of(&message(), Some(10)).priority(), None);
    }

    #[test]
    fn troupe_priorities_map_onto_max_priority() {
        let at = |p: i32, max: Option<u8>| amqp_priority(&message().with_priority(p), max);
        // Default and less urgent: no property at all, as Dramatiq publishes.
        for p in [0, 1, 5, 10] {
            assert_eq!(at(p, Some(10)), None, "{p}");
        }
        assert_eq!(at(-1, Some(10)), Some(1));
        assert_eq!(at(-5, Some(10)), Some(5));
        assert_eq!(at(-10, Some(10)), Some(10));
        assert_eq!(at(-1, Some(1)), Some(1));
        assert_eq!(at(-1, Some(255)), Some(26));
        assert_eq!(at(-10, Some(255)), Some(255));
        assert_eq!(at(-3, Some(4)), Some(2));
        // Out of range: clamped to -10 first.
        assert_eq!(
            amqp_priority(&message().with_option("troupe_priority", -99), Some(10)),
            Some(10)
        );
        // No max_priority: RabbitMQ would ignore it.
        assert_eq!(at(-5, None), None);
        // Dramatiq's broker_priority wins.
        let m = message().with_priority(-10).with_option("broker_priority", 2);
        assert_eq!(amqp_priority(&m, Some(10)), Some(2));
    }
}
