//! The Redis broker.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::Notify;
use troupe_core::queue::{dq_name, q_name, validate_queue_name, xq_name};
use troupe_core::support::{Batcher, Wakers};
use troupe_core::{
    AckHandle, Broker, Capabilities, Consumer, ConsumerOptions, DeadLetter, Delivery, Encoder, Error, ErrorKind,
    JsonEncoder, Message, QueueStats, Result, Waiting, WorkerInfo, decode_delivery, encode_checked, now_ms,
    prepare_for_delay_queue,
};

use crate::conn::{BACKEND, RedisConnection, RedisOptions, ms, now, redis_error};

/// Most rids settled in one script call.
const SETTLE_BATCH: usize = 500;
/// Dead letters expired per step of maintenance.
const CHUNK: usize = 1000;

static DISPATCH: OnceLock<redis::Script> = OnceLock::new();

fn dispatch() -> &'static redis::Script {
    DISPATCH.get_or_init(|| redis::Script::new(include_str!("dispatch.lua")))
}

/// A broker on Redis with Python Dramatiq's key layout: a Dramatiq worker and a Troupe worker
/// can share its queues, in both directions. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Inner {
    options: RedisOptions,
    conn: RedisConnection,
    encoder: Arc<dyn Encoder>,
    process_id: String,
    consumers: AtomicU64,
    /// Consumers alive in this process: (worker id, queue). Their heartbeats and maintenance.
    live: Mutex<HashSet<(String, String)>>,
    wakers: Wakers,
    settle: Batcher<Settle>,
    background: OnceLock<()>,
    closed: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No connection internals: they could carry credentials.
        f.debug_struct("RedisBroker")
            .field("options", &self.options)
            .field("process_id", &self.process_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Op {
    Ack,
    Nack(Vec<u8>),
    Requeue,
}

#[derive(Debug)]
struct Settle {
    owner: Arc<Owner>,
    rid: String,
    op: Op,
}

/// The consumer a fetched message belongs to: its worker id and queue, shared by every
/// message it fetched (so settling one allocates no copies of them).
#[derive(Debug, Hash, PartialEq, Eq)]
struct Owner {
    worker: String,
    queue: String,
}

impl RedisBroker {
    /// Connects to the server a `redis://` URL names (see [`RedisOptions::from_url`]).
    ///
    /// # Errors
    /// A bad URL, or an unreachable server (one line, password redacted).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::open(RedisOptions::from_url(url)?).await
    }

    /// Connects with these options.
    ///
    /// # Errors
    /// An unreachable server.
    pub async fn open(options: RedisOptions) -> Result<Self> {
        let mut conn = options.connection().await?;
        dispatch()
            .load_async(&mut conn)
            .await
            .map_err(|e| redis_error("load the dispatch script", e))?;
        let settle_conn = conn.clone();
        let namespace = options.namespace.clone();
        let settle = Batcher::spawn(BACKEND, SETTLE_BATCH, move |batch: Vec<Settle>| {
            let conn = settle_conn.clone();
            let namespace = namespace.clone();
            async move { settle(conn, &namespace, batch).await }
        });
        let inner = Arc::new(Inner {
            options,
            conn,
            encoder: Arc::new(JsonEncoder),
            process_id: uuid::Uuid::new_v4().to_string(),
            consumers: AtomicU64::new(0),
            live: Mutex::new(HashSet::new()),
            wakers: Wakers::default(),
            settle,
            background: OnceLock::new(),
            closed: AtomicBool::new(false),
        });
        Ok(Self { inner })
    }

    /// The options it was opened with.
    #[must_use]
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    /// A shared connection (multiplexed, reconnecting, healing a silent link).
    #[must_use]
    pub fn connection(&self) -> RedisConnection {
        self.inner.conn.clone()
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.inner.options.namespace)
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(Error::backend(BACKEND, ErrorKind::Connection, "the broker was closed"));
        }
        Ok(())
    }

    /// Writes raw bytes as a ready message of `queue`, bypassing the encoder (to test what
    /// workers do with bad input).
    ///
    /// # Errors
    /// A Redis error.
    pub async fn enqueue_raw(&self, queue: &str, bytes: Vec<u8>) -> Result<()> {
        let rid = uuid::Uuid::new_v4().to_string();
        call::<i64>(&self.inner, "enqueue", queue, "", |inv| {
            inv.arg(rid.as_str()).arg(bytes.as_slice());
        })
        .await
        .map(|_| ())
    }

    /// Runs maintenance now on `queue` (and its delay queue): requeues the unacked messages of
    /// consumers whose heartbeat is older than the timeout, and expires old dead letters.
    /// Returns how many messages came back.
    ///
    /// # Errors
    /// A Redis error.
    pub async fn maintain(&self, queue: &str) -> Result<u64> {
        let mut back = 0;
        for q in [q_name(queue).to_owned(), dq_name(queue)] {
            back += maintain(&self.inner, &q).await?;
        }
        Ok(back)
    }

    fn waker(&self, queue: &str) -> Arc<Notify> {
        self.inner.wakers.get(queue)
    }

    fn start_background(&self) {
        if self.inner.background.set(()).is_err() {
            return;
        }
        tokio::spawn(heartbeat_loop(Arc::downgrade(&self.inner)));
        tokio::spawn(wake_loop(Arc::downgrade(&self.inner)));
    }
}

/// The most messages one `enqueue` script call carries.
const ENQUEUE_CHUNK: usize = 500;

/// A fresh redis message id (uuid4) for a message of this priority. A message with a non-zero
/// priority gets `P<priority>:<uuid4>`, which names its lane list (`ns:q.P<priority>`) to the
/// dispatch script, so a requeued or recovered message goes back to its own lane; priority 0
/// gets a bare uuid4 and Dramatiq's plain list, as Python Dramatiq writes.
fn redis_message_id(priority: i32) -> String {
    let id = uuid::Uuid::new_v4();
    if priority == 0 {
        id.to_string()
    } else {
        format!("P{priority}:{id}")
    }
}

/// Calls the dispatch script: `command` on `queue` as `worker`, with extra arguments.
async fn call<T: redis::FromRedisValue>(
    inner: &Inner,
    command: &str,
    queue: &str,
    worker: &str,
    args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
) -> Result<T> {
    let mut invocation = dispatch().prepare_invoke();
    invocation
        .key(inner.options.namespace.as_str())
        .arg(command)
        .arg(now())
        .arg(queue)
        .arg(worker);
    args(&mut invocation);
    let mut conn = inner.conn.clone();
    invocation
        .invoke_async(&mut conn)
        .await
        .map_err(|e| redis_error(&format!("{command} on {queue}"), e))
}

async fn maintain(inner: &Inner, queue: &str) -> Result<u64> {
    let back: u64 = call(inner, "maintenance", queue, "", |inv| {
        inv.arg(ms(inner.options.heartbeat_timeout))
            .arg(ms(inner.options.dead_message_ttl))
            .arg(CHUNK);
    })
    .await?;
    if back > 0 {
        tracing::warn!(
            queue,
            messages = back,
            "requeued the unacked messages of dead consumers"
        );
    }
    Ok(back)
}

/// Heartbeats for this process's consumers, and maintenance of the queues they consume.
async fn heartbeat_loop(weak: Weak<Inner>) {
    let mut last_maintenance = std::time::Instant::now() - Duration::from_secs(3600);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::Relaxed) {
            return;
        }
        let beat = (inner.options.heartbeat_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let live: Vec<(String, String)> = inner
            .live
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default();
        for (worker, queue) in &live {
            if let Err(e) = call::<i64>(&inner, "heartbeat", queue, worker, |_| {}).await {
                tracing::warn!(error = %e, "Redis heartbeat failed; retrying");
                break;
            }
        }
        if last_maintenance.elapsed() >= inner.options.maintenance_interval {
            last_maintenance = std::time::Instant::now();
            let queues: HashSet<&String> = live.iter().map(|(_, q)| q).collect();
            for queue in queues {
                if let Err(e) = maintain(&inner, queue).await {
                    tracing::warn!(%queue, error = %e, "Redis maintenance failed; retrying at the next interval");
                }
            }
        }
        let nap = beat.min(inner.options.maintenance_interval);
        drop(inner);
        tokio::time::sleep(nap).await;
    }
}

/// Listens for wake-ups published on enqueue, so idle consumers start at once.
async fn wake_loop(weak: Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (options, pattern) = {
            let Some(inner) = weak.upgrade() else { return };
            if inner.closed.load(Ordering::Relaxed) {
                return;
            }
            (
                inner.options.clone(),
                format!("{}:__troupe_wake__:*", inner.options.namespace),
            )
        };
        let subscribed = async {
            let client = options.client().await?;
            let mut pubsub = client
                .get_async_pubsub()
                .await
                .map_err(|e| redis_error("subscribe", e))?;
            pubsub
                .psubscribe(&pattern)
                .await
                .map_err(|e| redis_error("subscribe", e))?;
            Ok::<_, Error>(pubsub)
        }
        .await;
        match subscribed {
            Ok(pubsub) => {
                backoff = Duration::from_millis(100);
                let prefix_len = pattern.len() - 1;
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let Some(inner) = weak.upgrade() else { return };
                    let channel = msg.get_channel_name();
                    if let Some(queue) = channel.get(prefix_len..) {
                        inner.wakers.wake(queue);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "wake-up subscription failed; consumers poll meanwhile"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Settles a batch: one script call per (consumer, queue, kind), pipelined together.
async fn settle(mut conn: RedisConnection, namespace: &str, batch: Vec<Settle>) -> Result<()> {
    let mut groups: HashMap<(Arc<Owner>, &'static str), Vec<Settle>> = HashMap::new();
    for s in batch {
        let kind = match s.op {
            Op::Ack => "ack",
            Op::Nack(_) => "nack",
            Op::Requeue => "requeue",
        };
        groups.entry((Arc::clone(&s.owner), kind)).or_default().push(s);
    }
    let mut pipe = redis::pipe();
    for ((owner, kind), items) in &groups {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(dispatch().get_hash())
            .arg(1)
            .arg(namespace)
            .arg(*kind)
            .arg(now())
            .arg(owner.queue.as_str())
            .arg(owner.worker.as_str());
        for s in items {
            cmd.arg(s.rid.as_str());
            if let Op::Nack(body) = &s.op {
                cmd.arg(body.as_slice());
            }
        }
        pipe.add_command(cmd).ignore();
    }
    let mut result: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
    if let Err(e) = &result
        && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
    {
        let _ = dispatch().load_async(&mut conn).await;
        result = pipe.query_async(&mut conn).await;
    }
    result.map_err(|e| redis_error("settle messages", e))
}

#[async_trait]
impl Broker for RedisBroker {
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
        self.check_open()?;
        // Queues exist implicitly in Redis, as in Dramatiq; Troupe also names them in a set of
        // its own so `queue_names` lists a queue before it holds a message.
        let queue = q_name(queue);
        validate_queue_name(queue)?;
        let mut conn = self.inner.conn.clone();
        let _: () = redis::cmd("SADD")
            .arg(self.key(QUEUES_KEY))
            .arg(queue)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("declare a queue", e))?;
        Ok(())
    }

    async fn enqueue(&self, message: Message, delay: Option<Duration>) -> Result<Message> {
        let mut enqueued = self.enqueue_many(vec![(message, delay)]).await?;
        enqueued
            .pop()
            .ok_or_else(|| Error::backend(BACKEND, ErrorKind::Other, "enqueue returned no message"))
    }

    async fn enqueue_many(&self, messages: Vec<(Message, Option<Duration>)>) -> Result<Vec<Message>> {
        self.check_open()?;
        let mut prepared = Vec::with_capacity(messages.len());
        for (message, delay) in messages {
            let mut message = prepare_for_delay_queue(message, delay);
            // A fresh redis_message_id on every enqueue (retries and delayed moves too), as Dramatiq.
            let rid = redis_message_id(message.priority());
            message.options.insert("redis_message_id".into(), rid.clone().into());
            let body = encode_checked(
                self.inner.encoder.as_ref(),
                &message,
                self.inner.options.max_message_size,
            )?;
            prepared.push((message, rid, body));
        }
        // One script call per run of messages bound for the same queue, at most ENQUEUE_CHUNK
        // messages each, so a huge batch never holds the server for long.
        let mut start = 0;
        while start < prepared.len() {
            let queue = prepared[start].0.queue_name.as_str();
            let mut end = start + 1;
            while end < prepared.len() && end - start < ENQUEUE_CHUNK && prepared[end].0.queue_name == queue {
                end += 1;
            }
            let run = &prepared[start..end];
            call::<i64>(&self.inner, "enqueue", queue, "", |inv| {
                for (_, rid, body) in run {
                    inv.arg(rid.as_str()).arg(body.as_slice());
                }
            })
            .await?;
            start = end;
        }
        Ok(prepared.into_iter().map(|(message, _, _)| message).collect())
    }

    async fn consume(&self, queue: &str, _options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        self.check_open()?;
        validate_queue_name(q_name(queue))?;
        let n = self.inner.consumers.fetch_add(1, Ordering::Relaxed);
        let worker = format!("{}-{n}", self.inner.process_id);
        if let Ok(mut live) = self.inner.live.lock() {
            live.insert((worker.clone(), queue.to_owned()));
        }
        call::<i64>(&self.inner, "heartbeat", queue, &worker, |_| {}).await?;
        self.start_background();
        Ok(Box::new(RedisConsumer {
            broker: self.clone(),
            owner: Arc::new(Owner {
                worker: worker.clone(),
                queue: queue.to_owned(),
            }),
            queue: queue.to_owned(),
            worker,
            waker: self.waker(queue),
            idle_polls: 0,
        }))
    }

    async fn purge(&self, queue: &str) -> Result<()> {
        self.check_open()?;
        call::<i64>(&self.inner, "purge", q_name(queue), "", |_| {})
            .await
            .map(|_| ())
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats> {
        self.check_open()?;
        // One script call: the ready count adds up the plain list and the priority lanes.
        let (ready, queued, delayed, dead): (u64, u64, u64, u64) =
            call(&self.inner, "stats", q_name(queue), "", |_| {}).await?;
        Ok(QueueStats::new(ready, delayed, queued.saturating_sub(ready), dead))
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        self.check_open()?;
        Ok(read_dead(self, queue, limit)
            .await?
            .into_iter()
            .map(|(_, d)| d)
            .collect())
    }

    async fn requeue_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        self.check_open()?;
        let xq = self.key(&xq_name(queue));
        let mut moved = 0;
        for (rid, letter) in read_dead(self, queue, usize::MAX).await? {
            if !ids.is_empty() && !ids.contains(&letter.id) {
                continue;
            }
            let Ok(mut message) = letter.message else { continue };
            message.options.insert("retries".into(), 0.into());
            message.queue_name = q_name(queue).to_owned();
            self.enqueue(message, None).await?;
            let mut conn = self.inner.conn.clone();
            let _: () = redis::pipe()
                .zrem(&xq, &rid)
                .hdel(format!("{xq}.msgs"), &rid)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error("remove a requeued dead letter", e))?;
            moved += 1;
        }
        Ok(moved)
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<u64> {
        self.check_open()?;
        let xq = self.key(&xq_name(queue));
        let mut conn = self.inner.conn.clone();
        let (count, (), ()): (u64, (), ()) = redis::pipe()
            .atomic()
            .zcard(&xq)
            .del(&xq)
            .del(format!("{xq}.msgs"))
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("purge dead letters", e))?;
        Ok(count)
    }

    async fn peek(&self, queue: &str, which: Waiting, offset: usize, limit: usize) -> Result<Vec<Message>> {
        self.check_open()?;
        let canonical = q_name(queue);
        let base = self.key(&match which {
            Waiting::Delayed => dq_name(canonical),
            _ => canonical.to_owned(),
        });
        let mut conn = self.inner.conn.clone();
        // Delivery order: the negative lanes, the plain list, the positive lanes.
        let lanes: Vec<i64> = redis::cmd("ZRANGE")
            .arg(format!("{base}.lanes"))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("list priority lanes", e))?;
        let mut lists: Vec<String> = lanes
            .iter()
            .filter(|p| **p < 0)
            .map(|p| format!("{base}.P{p}"))
            .collect();
        lists.push(base.clone());
        lists.extend(lanes.iter().filter(|p| **p > 0).map(|p| format!("{base}.P{p}")));
        let (mut skip, mut rids) = (offset, Vec::new());
        for list in lists {
            if rids.len() >= limit {
                break;
            }
            let len: usize = redis::cmd("LLEN")
                .arg(&list)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error("count a queue", e))?;
            if skip >= len {
                skip -= len;
                continue;
            }
            let stop = skip + (limit - rids.len()) - 1;
            let got: Vec<String> = redis::cmd("LRANGE")
                .arg(&list)
                .arg(skip)
                .arg(stop)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error("list a queue", e))?;
            skip = 0;
            rids.extend(got);
        }
        if rids.is_empty() {
            return Ok(Vec::new());
        }
        let bodies: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(format!("{base}.msgs"))
            .arg(&rids)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("read messages", e))?;
        Ok(bodies
            .into_iter()
            .flatten()
            .filter_map(|b| self.inner.encoder.decode(&b).ok())
            .map(|mut m| {
                m.queue_name = canonical.to_owned();
                m
            })
            .collect())
    }

    async fn delete_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        self.check_open()?;
        if ids.is_empty() {
            return Ok(0);
        }
        let xq = self.key(&xq_name(queue));
        let rids: Vec<String> = read_dead(self, queue, usize::MAX)
            .await?
            .into_iter()
            .filter(|(_, letter)| ids.contains(&letter.id))
            .map(|(rid, _)| rid)
            .collect();
        if rids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.inner.conn.clone();
        let (removed, ()): (u64, ()) = redis::pipe()
            .atomic()
            .zrem(&xq, &rids)
            .hdel(format!("{xq}.msgs"), &rids)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("delete dead letters", e))?;
        Ok(removed)
    }

    async fn queue_names(&self) -> Result<Vec<String>> {
        self.check_open()?;
        let mut conn = self.inner.conn.clone();
        let prefix = self.key("");
        let mut names: std::collections::BTreeSet<String> = redis::cmd("SMEMBERS")
            .arg(self.key(QUEUES_KEY))
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("list queues", e))?;
        // Queues of Python peers (or from before the set): every body hash names its queue.
        // Scanning reads the whole keyspace, so only a small database is scanned.
        let keys: u64 = redis::cmd("DBSIZE")
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("count keys", e))?;
        if keys > SCAN_QUEUES_UP_TO {
            return Ok(names.into_iter().collect());
        }
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*.msgs"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error("scan for queues", e))?;
            for key in keys {
                let Some(name) = key.strip_prefix(&prefix).and_then(|k| k.strip_suffix(".msgs")) else {
                    continue;
                };
                let name = q_name(name.strip_suffix(".XQ").unwrap_or(name));
                if !name.starts_with("__") && validate_queue_name(name).is_ok() {
                    names.insert(name.to_owned());
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(names.into_iter().collect())
    }

    async fn beat(&self, worker: &WorkerInfo) -> Result<()> {
        self.check_open()?;
        let info = serde_json::to_string(worker).map_err(|e| Error::Encode(e.to_string()))?;
        let mut conn = self.inner.conn.clone();
        let _: () = redis::pipe()
            .hset(self.key(WORKERS_KEY), &worker.id, info)
            .zadd(self.key(WORKERS_EXPIRY_KEY), &worker.id, worker.expires_at)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("store a worker heartbeat", e))?;
        Ok(())
    }

    async fn forget_worker(&self, id: &str) -> Result<()> {
        self.check_open()?;
        let mut conn = self.inner.conn.clone();
        let _: () = redis::pipe()
            .hdel(self.key(WORKERS_KEY), id)
            .zrem(self.key(WORKERS_EXPIRY_KEY), id)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("delete a worker heartbeat", e))?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.check_open()?;
        let mut conn = self.inner.conn.clone();
        let now = now_ms();
        let expired: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.key(WORKERS_EXPIRY_KEY))
            .arg("-inf")
            .arg(now)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("list expired workers", e))?;
        if !expired.is_empty() {
            let _: () = redis::pipe()
                .hdel(self.key(WORKERS_KEY), &expired)
                .zrem(self.key(WORKERS_EXPIRY_KEY), &expired)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_error("delete expired worker heartbeats", e))?;
        }
        let infos: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(self.key(WORKERS_KEY))
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("list workers", e))?;
        Ok(infos
            .values()
            .filter_map(|info| serde_json::from_str::<WorkerInfo>(info).ok())
            .filter(|w| w.live_at(now))
            .collect())
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.wakers.wake_all();
        Ok(())
    }
}

/// `queue_names` scans for queues only Python peers use when the database holds at most this
/// many keys (a scan reads every key).
const SCAN_QUEUES_UP_TO: u64 = 100_000;

/// Troupe's set of declared queue names (Python Dramatiq neither reads nor writes it).
const QUEUES_KEY: &str = "__troupe_queues__";
/// Live workers' latest heartbeats: a hash of worker id -> JSON.
const WORKERS_KEY: &str = "__troupe_workers__";
/// When each worker's heartbeat expires: a sorted set of worker id by ms.
const WORKERS_EXPIRY_KEY: &str = "__troupe_workers__.expiry";

async fn read_dead(broker: &RedisBroker, queue: &str, limit: usize) -> Result<Vec<(String, DeadLetter)>> {
    let xq = broker.key(&xq_name(queue));
    let mut conn = broker.inner.conn.clone();
    let stop = isize::try_from(limit).unwrap_or(isize::MAX).saturating_sub(1);
    let entries: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(&xq)
        .arg(0)
        .arg(stop)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .map_err(|e| redis_error("list dead letters", e))?;
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let rids: Vec<&String> = entries.iter().map(|(r, _)| r).collect();
    let bodies: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
        .arg(format!("{xq}.msgs"))
        .arg(&rids)
        .query_async(&mut conn)
        .await
        .map_err(|e| redis_error("read dead letters", e))?;
    Ok(entries
        .iter()
        .zip(bodies)
        .map(|((rid, score), body)| {
            let message = match body {
                // Decoded as a worker would, so an oversized or undecodable body shows why it died.
                Some(b) => decode_delivery(broker.inner.encoder.as_ref(), &b, broker.inner.options.max_message_size),
                None => Err("the message body is missing".to_owned()),
            };
            let reason = match &message {
                Ok(m) => m.option_str("traceback").unwrap_or("dead-lettered").to_owned(),
                Err(e) => format!("undecodable message: {e}"),
            };
            let id = message.as_ref().map_or_else(|_| rid.clone(), |m| m.message_id.clone());
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let failed_at = *score as u64;
            (rid.clone(), DeadLetter::new(id, message, reason, failed_at))
        })
        .collect())
}

fn parse_error(what: &str, e: &dyn std::fmt::Display) -> Error {
    Error::backend(BACKEND, ErrorKind::Protocol, format!("{what}: {e}"))
}

#[derive(Debug)]
struct RedisConsumer {
    broker: RedisBroker,
    owner: Arc<Owner>,
    queue: String,
    worker: String,
    waker: Arc<Notify>,
    idle_polls: u32,
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn fetch(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        self.broker.check_open()?;
        let inner = Arc::clone(&self.broker.inner);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let pairs: Vec<redis::Value> = call(&inner, "fetch", &self.queue, &self.worker, |inv| {
                inv.arg(max.max(1));
            })
            .await?;
            let deliveries = self.deliveries(&inner, pairs).await?;
            if !deliveries.is_empty() {
                self.idle_polls = 0;
                return Ok(deliveries);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            // Woken at once by Troupe producers; polls with backoff (5 ms doubling to
            // max_poll_interval) for producers that do not publish, such as Python Dramatiq.
            self.idle_polls = self.idle_polls.saturating_add(1);
            let backoff = Duration::from_millis(5)
                .saturating_mul(1 << self.idle_polls.min(10))
                .min(inner.options.max_poll_interval);
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(backoff.min(deadline - now)) => {}
            }
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        let inner = &self.broker.inner;
        if let Ok(mut live) = inner.live.lock() {
            live.remove(&(self.worker.clone(), self.queue.clone()));
        }
        if inner.closed.load(Ordering::Relaxed) {
            return Ok(());
        }
        call::<i64>(inner, "requeue", &self.queue, &self.worker, |_| {}).await?;
        call::<i64>(inner, "forget", &self.queue, &self.worker, |_| {}).await?;
        Ok(())
    }
}

/// The fetch script's answer, read: each fetched id with its message (or why its bytes did
/// not decode), and the ids whose bodies were gone.
pub(crate) struct FetchReply {
    pub(crate) fetched: Vec<(String, std::result::Result<Message, String>)>,
    pub(crate) missing: Vec<String>,
}

/// Reads the fetch script's answer: a flat list of (id, body or nil) pairs. A reply of another
/// shape is an error; a body that does not decode is kept with its reason (it goes to the dead
/// letters).
pub(crate) fn read_fetch_reply(
    encoder: &dyn troupe_core::Encoder,
    values: Vec<redis::Value>,
    max_message_size: usize,
) -> Result<FetchReply> {
    let mut reply = FetchReply {
        fetched: Vec::with_capacity(values.len() / 2),
        missing: Vec::new(),
    };
    let mut it = values.into_iter();
    while let (Some(rid), Some(body)) = (it.next(), it.next()) {
        let rid: String = redis::from_redis_value(rid).map_err(|e| parse_error("read a fetched id", &e))?;
        let body: Option<Vec<u8>> =
            redis::from_redis_value(body).map_err(|e| parse_error("read a fetched message", &e))?;
        match body {
            Some(body) => {
                let message = decode_delivery(encoder, &body, max_message_size);
                reply.fetched.push((rid, message));
            }
            // An id whose body is gone (Dramatiq #266): dropped from the consumer's ack set.
            None => reply.missing.push(rid),
        }
    }
    Ok(reply)
}

impl RedisConsumer {
    async fn deliveries(&self, inner: &Arc<Inner>, values: Vec<redis::Value>) -> Result<Vec<Delivery>> {
        let FetchReply { fetched, missing } =
            read_fetch_reply(inner.encoder.as_ref(), values, inner.options.max_message_size)?;
        let mut out = Vec::with_capacity(fetched.len());
        for (rid, message) in fetched {
            let handle = RedisAck {
                settle: inner.settle.clone(),
                owner: Arc::clone(&self.owner),
                rid,
                encoder: Arc::clone(&inner.encoder),
            };
            out.push(Delivery::new(self.queue.clone(), message, false, Box::new(handle)));
        }
        if !missing.is_empty() {
            call::<i64>(inner, "ack", &self.queue, &self.worker, |inv| {
                for rid in &missing {
                    inv.arg(rid.as_str());
                }
            })
            .await?;
        }
        Ok(out)
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        // Stop heartbeating for this consumer: what it holds comes back after the heartbeat
        // timeout, as if its process had died.
        if let Ok(mut live) = self.broker.inner.live.lock() {
            live.remove(&(self.worker.clone(), self.queue.clone()));
        }
    }
}

#[derive(Debug)]
struct RedisAck {
    settle: Batcher<Settle>,
    owner: Arc<Owner>,
    rid: String,
    encoder: Arc<dyn Encoder>,
}

impl RedisAck {
    async fn send(&self, op: Op) -> Result<()> {
        self.settle
            .submit(Settle {
                owner: Arc::clone(&self.owner),
                rid: self.rid.clone(),
                op,
            })
            .await
    }
}

#[async_trait]
impl AckHandle for RedisAck {
    async fn ack(&self) -> Result<()> {
        self.send(Op::Ack).await
    }

    async fn nack(&self, message: Option<&Message>, reason: &str) -> Result<()> {
        // The dead letter keeps the message as the worker last saw it, with the reason as its
        // traceback (what Dramatiq's dashboard shows). Undecodable bytes stay as they were.
        let body = match message {
            Some(m) => {
                let mut m = m.clone();
                if m.option_str("traceback") != Some(reason) {
                    m.options.insert("traceback".into(), reason.into());
                }
                self.encoder.encode(&m)?
            }
            None => Vec::new(),
        };
        self.send(Op::Nack(body)).await
    }

    async fn requeue(&self) -> Result<()> {
        self.send(Op::Requeue).await
    }
}
