//! Dramatiq's queue topology: the arguments of `Q`, `Q.DQ` and `Q.XQ`, declaring them (once per
//! broker, again after a reconnect) and forgetting them.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection};
use troupe_core::queue::{dq_name, xq_name};
use troupe_core::{Error, Result};

use crate::broker::Inner;
use crate::conn::{QueueType, timed};

/// A queue name as AMQP wants it (at most 255 bytes).
pub(crate) fn short(name: &str) -> Result<ShortString> {
    ShortString::try_new(name).map_err(|_| Error::InvalidQueueName(name.to_owned()))
}

/// An integer argument as pika sends it: a signed 32-bit `I` when it fits, else a 64-bit `l`.
/// RabbitMQ compares integer arguments by value, whatever their width.
fn int_argument(v: i64) -> AMQPValue {
    i32::try_from(v).map_or(AMQPValue::LongLongInt(v), AMQPValue::LongInt)
}

impl Inner {
    /// Dramatiq's arguments of `Q.DQ` (and of `Q`, less its delivery limit): dead letters go
    /// to `Q.XQ`; with quorum queues, `x-queue-type`.
    fn queue_arguments(&self, canonical: &str) -> FieldTable {
        let mut args = self.typed_arguments();
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

    /// Dramatiq's arguments of `Q.XQ` (with quorum queues, `x-queue-type`).
    fn dead_letter_arguments(&self) -> FieldTable {
        let mut args = self.typed_arguments();
        args.insert("x-message-ttl".into(), int_argument(self.options.dead_message_ttl_ms()));
        args
    }

    /// `x-queue-type` for quorum queues; nothing for classic ones (Dramatiq declares none).
    fn typed_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.options.queue_type == QueueType::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(QueueType::Quorum.as_str().into()),
            );
        }
        args
    }

    /// Declares `Q`, `Q.DQ` and `Q.XQ` on `ch`, in Dramatiq's order.
    async fn declare_on(&self, ch: &Channel, canonical: &str) -> Result<()> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let args = self.queue_arguments(canonical);
        let mut canonical_args = args.clone();
        if let Some(limit) = self.options.effective_delivery_limit() {
            canonical_args.insert("x-delivery-limit".into(), int_argument(i64::from(limit)));
        }
        for (name, args) in [
            (canonical.to_owned(), canonical_args),
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
    pub(crate) async fn ensure_declared(&self, canonical: &str) -> Result<()> {
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

    pub(crate) fn forget_declared(&self, canonical: &str) {
        if let Ok(mut declared) = self.declared.lock() {
            declared.remove(canonical);
        }
    }

    /// After a reconnect: declares again every queue declared before (the server may have lost
    /// them). A queue that fails is forgotten, so its next use declares it.
    pub(crate) async fn redeclare_all(&self, conn: &Connection) {
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
}
