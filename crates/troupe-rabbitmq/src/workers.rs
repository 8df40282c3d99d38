//! Live workers on RabbitMQ. AMQP has no way to list a server's queues or keep a value per key,
//! so heartbeats go to a stream, `troupe.workers` (RabbitMQ ≥ 3.9; kept an hour in small
//! segments): each worker appends its latest [`WorkerInfo`] every few seconds, and a reader
//! replays the last minute of the stream, keeping each worker's latest entry. A worker that
//! stops appends a tombstone. AMQP cannot ask where a stream ends, so a reader first appends a
//! probe of its own and reads until it meets it. Python Dramatiq neither reads nor writes the
//! stream.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use troupe_core::{Error, Result, WorkerInfo, now_ms};

use crate::broker::Inner;
use crate::conn::{Link, timed};
use crate::publish::persistent;

/// The stream the heartbeats go to.
pub(crate) const WORKERS_STREAM: &str = "troupe.workers";

/// How far back a reader replays: longer than any heartbeat's time to live.
const REPLAY: &str = "1m";

/// A reader gives up when its probe has not come back within this long.
const READ_LIMIT: Duration = Duration::from_secs(5);

/// One entry of the stream: a heartbeat, a worker that stopped, or a reader's probe.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Entry {
    Beat(WorkerInfo),
    Gone { id: String, gone: bool },
    Probe { probe: String },
}

fn stream_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
    args.insert("x-max-age".into(), AMQPValue::LongString("1h".into()));
    args.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(1_000_000),
    );
    args
}

impl Inner {
    async fn workers_channel(&self) -> Result<lapin::Channel> {
        let ch = self.temp_channel().await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        if let Err(e) = timed(
            self.timeout(),
            "declare the troupe.workers stream",
            ch.queue_declare(WORKERS_STREAM.into(), durable, stream_args()),
        )
        .await
        {
            self.close_channel(ch).await;
            return Err(e);
        }
        Ok(ch)
    }

    async fn append(&self, entry: &Entry) -> Result<()> {
        let ch = self.workers_channel().await?;
        let result = self.append_on(&ch, entry).await;
        self.close_channel(ch).await;
        result
    }

    async fn append_on(&self, ch: &lapin::Channel, entry: &Entry) -> Result<()> {
        let body = serde_json::to_vec(entry).map_err(|e| Error::Encode(e.to_string()))?;
        timed(self.timeout(), "append to the troupe.workers stream", async {
            ch.basic_publish(
                "".into(),
                WORKERS_STREAM.into(),
                BasicPublishOptions::default(),
                &body,
                persistent(),
            )
            .await?
            .await
        })
        .await
        .map(|_| ())
    }

    /// [`Broker::beat`](troupe_core::Broker::beat).
    pub(crate) async fn beat(&self, worker: &WorkerInfo) -> Result<()> {
        self.check_open()?;
        self.append(&Entry::Beat(worker.clone())).await
    }

    /// [`Broker::forget_worker`](troupe_core::Broker::forget_worker).
    pub(crate) async fn forget_worker(&self, id: &str) -> Result<()> {
        self.check_open()?;
        self.append(&Entry::Gone {
            id: id.to_owned(),
            gone: true,
        })
        .await
    }

    /// [`Broker::workers`](troupe_core::Broker::workers): replays the stream's last minute, on
    /// a connection of its own (RabbitMQ answers a read of a stream it is still creating with
    /// a connection error; it must not take the publishing connection down). Tried three times.
    pub(crate) async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.check_open()?;
        // Creates the stream when it is missing.
        let ch = self.workers_channel().await?;
        self.close_channel(ch).await;
        let mut attempt = 1;
        loop {
            let link = Link::new(self.options.clone(), "troupe workers reader".to_owned());
            let result = async {
                let conn = link.get().await?.conn;
                let ch = timed(self.timeout(), "open a channel", conn.create_channel()).await?;
                self.replay(&ch).await
            }
            .await;
            link.close().await;
            match result {
                Ok(latest) => {
                    let now = now_ms();
                    return Ok(latest.into_values().filter(|w| w.live_at(now)).collect());
                }
                Err(e) if attempt < 3 => {
                    tracing::debug!(error = %e, "reading the troupe.workers stream failed; retrying");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn replay(&self, ch: &lapin::Channel) -> Result<BTreeMap<String, WorkerInfo>> {
        timed(
            self.timeout(),
            "set the stream reader's prefetch",
            ch.basic_qos(1000, BasicQosOptions { global: false }),
        )
        .await?;
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), AMQPValue::LongString(REPLAY.into()));
        let tag = format!("troupe-workers-{}", uuid::Uuid::new_v4().simple());
        // The end of what to read: everything appended before this probe.
        let probe = uuid::Uuid::new_v4().simple().to_string();
        self.append_on(ch, &Entry::Probe { probe: probe.clone() }).await?;
        let mut consumer = timed(
            self.timeout(),
            "read the troupe.workers stream",
            ch.basic_consume(WORKERS_STREAM.into(), tag.into(), BasicConsumeOptions::default(), args),
        )
        .await?;
        let mut latest = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + READ_LIMIT;
        loop {
            let Ok(next) = tokio::time::timeout_at(deadline, consumer.next()).await else {
                return Err(Error::backend(
                    crate::conn::BACKEND,
                    troupe_core::ErrorKind::Timeout,
                    format!("reading the troupe.workers stream did not reach its end within {READ_LIMIT:?}"),
                ));
            };
            let Some(delivery) = next else {
                return Err(Error::backend(
                    crate::conn::BACKEND,
                    troupe_core::ErrorKind::Connection,
                    "the troupe.workers stream reader was cancelled by the server",
                ));
            };
            let delivery = delivery.map_err(|e| crate::conn::amqp_error("read a worker heartbeat", e))?;
            match serde_json::from_slice::<Entry>(&delivery.data) {
                Ok(Entry::Beat(info)) => {
                    latest.insert(info.id.clone(), info);
                }
                Ok(Entry::Gone { id, .. }) => {
                    latest.remove(&id);
                }
                Ok(Entry::Probe { probe: seen }) if seen == probe => return Ok(latest),
                Ok(Entry::Probe { .. }) | Err(_) => {}
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
    }
}
