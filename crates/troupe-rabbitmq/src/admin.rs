//! Administration on the publishing connection: message counts and stats, purges, and the dead
//! letters (reading, requeueing and purging them).

use std::collections::HashSet;
use std::sync::Weak;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use md5::{Digest, Md5};
use troupe_core::queue::{dq_name, q_name, validate_queue_name, xq_name};
use troupe_core::{DeadLetter, Error, Message, QueueStats, Result, Waiting, decode_delivery, prepare_for_delay_queue};

use crate::broker::Inner;
use crate::conn::{QueueType, is_not_found, timed};
use crate::topology::short;

impl Inner {
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

    /// Closes `ch`, which puts back the `returned` messages it read unacked from `queue`. A
    /// classic queue has them back before it confirms the close; a quorum queue applies the
    /// return through its Raft log a moment later, so this waits (up to 2 s) until `queue`
    /// counts at least `returned` messages again, so that a count or a read right after sees
    /// them.
    async fn close_returning(&self, ch: Channel, queue: &str, returned: u64) {
        self.close_channel(ch).await;
        if self.options.queue_type != QueueType::Quorum || returned == 0 {
            return;
        }
        let Ok(ch) = self.temp_channel().await else { return };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            match self.count_on(&ch, queue).await {
                Ok(count) if count < returned => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => break,
            }
        }
        self.close_channel(ch).await;
    }

    /// The message count of `name` by a passive declare on `ch` (a 404 closes `ch`).
    async fn count_on(&self, ch: &Channel, name: &str) -> Result<u64> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let q = timed(
            self.timeout(),
            &format!("count the messages of {name}"),
            ch.queue_declare(short(name)?, passive, FieldTable::default()),
        )
        .await?;
        Ok(u64::from(q.message_count()))
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
            match self.count_on(&channel, name).await {
                Ok(count) => out.push(count),
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

    /// [`Broker::purge`](troupe_core::Broker::purge): empties `queue`, its delay queue and its
    /// dead letters.
    pub(crate) async fn purge(&self, queue: &str) -> Result<()> {
        self.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        let mut ch = self.temp_channel().await?;
        let mut result = Ok(());
        for name in [canonical.to_owned(), dq_name(canonical), xq_name(canonical)] {
            if let Err(e) = self.purge_one(&mut ch, &name).await {
                result = Err(e);
                break;
            }
        }
        self.close_channel(ch).await;
        result
    }

    /// [`Broker::stats`](troupe_core::Broker::stats) of `queue`.
    pub(crate) async fn stats(&self, queue: &str) -> Result<QueueStats> {
        self.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        let dq = dq_name(canonical);
        let counts = self
            .counts(&[canonical.to_owned(), dq.clone(), xq_name(canonical)])
            .await?;
        let (ready, delayed, dead) = (counts[0], counts[1], counts[2]);
        // Delayed messages a worker of this broker holds until their eta count as delayed,
        // as on Redis.
        Ok(QueueStats::new(
            ready,
            delayed + self.held(&dq),
            self.held(canonical),
            dead,
        ))
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

    /// [`Broker::dead_letters`](troupe_core::Broker::dead_letters): peeks at up to `limit` of them.
    pub(crate) async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        self.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        let xq = short(&xq_name(canonical))?;
        let ch = self.temp_channel().await?;
        let mut out = Vec::new();
        let mut result = Ok(());
        // Peeked without ack; closing the channel puts them all back, in order.
        while out.len() < limit {
            match timed(
                self.timeout(),
                "read the dead letters",
                ch.basic_get(xq.clone(), BasicGetOptions { no_ack: false }),
            )
            .await
            {
                Ok(Some(got)) => out.push(self.dead_letter_of(&got.delivery)),
                Ok(None) => break,
                Err(e) if is_not_found(&e) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.close_returning(ch, xq.as_str(), u64::try_from(out.len()).unwrap_or(u64::MAX))
            .await;
        result.map(|()| out)
    }

    /// [`Broker::peek`](troupe_core::Broker::peek): reads up to `offset + limit` messages of
    /// the queue without acking them and closes the channel, which puts them all back.
    pub(crate) async fn peek(&self, queue: &str, which: Waiting, offset: usize, limit: usize) -> Result<Vec<Message>> {
        self.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        let name = match which {
            Waiting::Delayed => dq_name(canonical),
            _ => canonical.to_owned(),
        };
        let name = short(&name)?;
        let ch = self.temp_channel().await?;
        let (mut seen, mut out, mut result) = (0_u64, Vec::new(), Ok(()));
        while out.len() < limit {
            match timed(
                self.timeout(),
                "read the queue",
                ch.basic_get(name.clone(), BasicGetOptions { no_ack: false }),
            )
            .await
            {
                Ok(Some(got)) => {
                    seen += 1;
                    if usize::try_from(seen).unwrap_or(usize::MAX) > offset
                        && let Ok(mut m) = self.encoder.decode(&got.delivery.data)
                    {
                        m.queue_name = canonical.to_owned();
                        out.push(m);
                    }
                }
                Ok(None) => break,
                Err(e) if is_not_found(&e) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.close_returning(ch, name.as_str(), seen).await;
        result.map(|()| out)
    }

    /// [`Broker::requeue_dead_letters`](troupe_core::Broker::requeue_dead_letters): moves those
    /// with these ids (all of them when `ids` is empty) back to `queue`.
    pub(crate) async fn requeue_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        self.take_dead_letters(queue, ids, true).await
    }

    /// [`Broker::delete_dead_letters`](troupe_core::Broker::delete_dead_letters).
    pub(crate) async fn delete_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.take_dead_letters(queue, ids, false).await
    }

    /// Takes the dead letters with these ids (all of them when `ids` is empty) out of the
    /// dead-letter queue, putting each back on `queue` first when `requeue` (undecodable bytes
    /// can only be deleted).
    async fn take_dead_letters(&self, queue: &str, ids: &[String], requeue: bool) -> Result<u64> {
        self.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        self.ensure_declared(canonical).await?;
        let xq = short(&xq_name(canonical))?;
        let mut wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let all = ids.is_empty();
        let ch = self.temp_channel().await?;
        let (mut moved, mut kept) = (0, 0_u64);
        let result = async {
            while all || !wanted.is_empty() {
                let got = timed(
                    self.timeout(),
                    "read the dead letters",
                    ch.basic_get(xq.clone(), BasicGetOptions { no_ack: false }),
                )
                .await?;
                let Some(got) = got else { break };
                let letter = self.dead_letter_of(&got.delivery);
                if !all && !wanted.remove(letter.id.as_str()) {
                    kept += 1;
                    continue;
                }
                if requeue {
                    // Undecodable bytes stay in the dead letters.
                    let Ok(mut message) = letter.message else {
                        kept += 1;
                        continue;
                    };
                    message.options.insert("retries".into(), 0.into());
                    message.queue_name = canonical.to_owned();
                    let message = prepare_for_delay_queue(message, None);
                    let body = self.encoder.encode(&message)?;
                    // Confirmed before the dead letter is removed.
                    self.publish(canonical, canonical, &body, self.properties(&message), true)
                        .await?;
                }
                timed(
                    self.timeout(),
                    "remove a dead letter",
                    got.delivery.acker.ack(BasicAckOptions::default()),
                )
                .await?;
                moved += 1;
            }
            Ok::<_, Error>(())
        }
        .await;
        // The dead letters read but not taken go back, in order.
        self.close_returning(ch, xq.as_str(), kept).await;
        result.map(|()| moved)
    }

    /// [`Broker::purge_dead_letters`](troupe_core::Broker::purge_dead_letters) of `queue`.
    pub(crate) async fn purge_dead_letters(&self, queue: &str) -> Result<u64> {
        self.check_open()?;
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        let mut ch = self.temp_channel().await?;
        let result = self.purge_one(&mut ch, &xq_name(canonical)).await;
        self.close_channel(ch).await;
        result
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
