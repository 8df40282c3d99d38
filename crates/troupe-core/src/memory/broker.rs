use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::broker::{
    AckHandle, Broker, Capabilities, Consumer, ConsumerOptions, DEFAULT_MAX_MESSAGE_SIZE, DeadLetter, Delivery,
    QueueStats, Waiting, WorkerInfo, decode_delivery, encode_checked, prepare_for_delay_queue,
};
use crate::encoder::{Encoder, JsonEncoder};
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Message, now_ms};
use crate::queue::{dq_name, q_name, validate_queue_name};

const BACKEND: &str = "memory";

/// An in-memory broker with Dramatiq's `StubBroker` semantics: queues and their `.DQ` delay
/// queues, dead letters with reasons, and [`join`](MemoryBroker::join), which waits until a
/// queue is drained and re-raises the first failure.
///
/// Messages are stored encoded, so what a worker sees went through the same encoder as on a
/// real broker. Ready messages are delivered lowest [priority](crate::priority) first, FIFO
/// within a priority.
#[derive(Clone, Debug)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    encoder: Arc<dyn Encoder>,
    max_message_size: usize,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, QueueState>,
    dead: HashMap<String, Vec<DeadLetter>>,
    workers: HashMap<String, WorkerInfo>,
    next_id: u64,
    consumers: u64,
    closed: bool,
}

#[derive(Debug, Default)]
struct QueueState {
    ready: Ready,
    unacked: HashMap<u64, (Entry, u64)>,
}

#[derive(Clone, Debug)]
struct Entry {
    id: u64,
    priority: i32,
    bytes: Arc<[u8]>,
    redelivered: bool,
}

/// Ready messages: one FIFO lane per priority, the lowest delivered first.
#[derive(Debug, Default)]
struct Ready {
    lanes: BTreeMap<i32, VecDeque<Entry>>,
    len: usize,
}

impl Ready {
    fn len(&self) -> usize {
        self.len
    }

    fn push_back(&mut self, entry: Entry) {
        self.lanes.entry(entry.priority).or_default().push_back(entry);
        self.len += 1;
    }

    fn push_front(&mut self, entry: Entry) {
        self.lanes.entry(entry.priority).or_default().push_front(entry);
        self.len += 1;
    }

    /// Takes up to `n` entries, lowest priority first.
    fn take(&mut self, n: usize) -> Vec<Entry> {
        let mut out = Vec::with_capacity(n.min(self.len));
        while out.len() < n {
            let Some(mut lane) = self.lanes.first_entry() else {
                break;
            };
            let want = n - out.len();
            let k = want.min(lane.get().len());
            out.extend(lane.get_mut().drain(..k));
            if lane.get().is_empty() {
                lane.remove();
            }
        }
        self.len -= out.len();
        out
    }

    fn clear(&mut self) {
        self.lanes.clear();
        self.len = 0;
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A broker with the JSON encoder and the 1 MiB message limit.
    #[must_use]
    pub fn new() -> Self {
        Self::with_encoder(Arc::new(JsonEncoder))
    }

    /// A broker with another encoder.
    #[must_use]
    pub fn with_encoder(encoder: Arc<dyn Encoder>) -> Self {
        Self {
            inner: Arc::new(Inner {
                encoder,
                max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
            }),
        }
    }

    /// A broker with another message size limit.
    #[must_use]
    pub fn with_max_message_size(self, limit: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                encoder: Arc::clone(&self.inner.encoder),
                max_message_size: limit,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
            }),
        }
    }

    /// This broker as a shared trait object.
    #[must_use]
    pub fn into_dyn(self) -> Arc<dyn Broker> {
        Arc::new(self)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.inner.lock()
    }

    /// Puts raw bytes on a queue, bypassing the encoder (to test what workers do with bad input).
    ///
    /// # Errors
    /// [`Error::QueueNotFound`] when the queue was not declared.
    pub fn enqueue_raw(&self, queue: &str, bytes: Vec<u8>) -> Result<()> {
        let mut state = self.lock()?;
        state.push(queue, 0, bytes.into())?;
        drop(state);
        self.inner.changed.notify_waiters();
        Ok(())
    }

    /// Waits until `queue` and its delay queue hold no unfinished message (in-flight ones
    /// included), then fails with the first dead letter of the queue, if any (Dramatiq's
    /// `join(fail_fast=True)`).
    ///
    /// # Errors
    /// [`Error::QueueNotFound`], [`Error::QueueJoinTimeout`], or [`Error::MessageFailed`].
    pub async fn join(&self, queue: &str, timeout: Duration) -> Result<()> {
        self.join_with(queue, timeout, true).await
    }

    /// [`join`](Self::join), choosing whether dead letters are an error.
    ///
    /// # Errors
    /// As [`join`](Self::join).
    pub async fn join_with(&self, queue: &str, timeout: Duration, fail_fast: bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let canonical = q_name(queue).to_owned();
        let delay = dq_name(queue);
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.lock()?;
                let pending = |name: &str| -> Result<usize> {
                    let q = state
                        .queues
                        .get(name)
                        .ok_or_else(|| Error::QueueNotFound(name.to_owned()))?;
                    Ok(q.ready.len() + q.unacked.len())
                };
                if pending(&canonical)? + pending(&delay)? == 0 {
                    if let Some(dead) = state.dead.get(&canonical).and_then(|d| d.first()).filter(|_| fail_fast) {
                        let (message_id, actor_name) = match &dead.message {
                            Ok(m) => (m.message_id.clone(), m.actor_name.clone()),
                            Err(_) => (dead.id.clone(), String::from("<undecodable>")),
                        };
                        return Err(Error::MessageFailed {
                            message_id,
                            actor_name,
                            reason: dead.reason.clone(),
                        });
                    }
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::QueueJoinTimeout(canonical));
            }
        }
    }

    /// The dead letters of `queue` (canonical name), oldest first.
    #[must_use]
    pub fn dead_letters_of(&self, queue: &str) -> Vec<DeadLetter> {
        self.lock()
            .map(|s| s.dead.get(q_name(queue)).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Drops every queued message and every dead letter; queues stay declared.
    pub fn flush_all(&self) {
        if let Ok(mut state) = self.lock() {
            for q in state.queues.values_mut() {
                q.ready.clear();
                q.unacked.clear();
            }
            for d in state.dead.values_mut() {
                d.clear();
            }
        }
        self.inner.changed.notify_waiters();
    }
}

impl Inner {
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        let state = self.state.lock().map_err(|_| {
            Error::backend(
                BACKEND,
                ErrorKind::Other,
                "the broker's state lock was poisoned by a panic",
            )
        })?;
        if state.closed {
            return Err(Error::backend(BACKEND, ErrorKind::Connection, "the broker was closed"));
        }
        Ok(state)
    }
}

impl State {
    fn queue(&mut self, name: &str) -> Result<&mut QueueState> {
        self.queues
            .get_mut(name)
            .ok_or_else(|| Error::QueueNotFound(name.to_owned()))
    }

    fn push(&mut self, queue: &str, priority: i32, bytes: Arc<[u8]>) -> Result<()> {
        self.next_id += 1;
        let id = self.next_id;
        self.queue(queue)?.ready.push_back(Entry {
            id,
            priority,
            bytes,
            redelivered: false,
        });
        Ok(())
    }

    fn return_unacked(&mut self, queue: &str, id: u64) -> bool {
        // A new id per delivery attempt: a late ack from the earlier holder cannot touch the
        // message once it has been delivered again.
        self.next_id += 1;
        let fresh = self.next_id;
        let Some(q) = self.queues.get_mut(queue) else {
            return false;
        };
        match q.unacked.remove(&id) {
            Some((mut entry, _)) => {
                entry.redelivered = true;
                entry.id = fresh;
                q.ready.push_front(entry);
                true
            }
            None => false,
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
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
        let canonical = q_name(queue);
        validate_queue_name(canonical)?;
        let mut state = self.lock()?;
        state.queues.entry(canonical.to_owned()).or_default();
        state.queues.entry(dq_name(canonical)).or_default();
        state.dead.entry(canonical.to_owned()).or_default();
        Ok(())
    }

    async fn enqueue(&self, message: Message, delay: Option<Duration>) -> Result<Message> {
        let mut enqueued = self.enqueue_many(vec![(message, delay)]).await?;
        enqueued
            .pop()
            .ok_or_else(|| Error::backend("memory", ErrorKind::Other, "enqueue returned no message"))
    }

    async fn enqueue_many(&self, messages: Vec<(Message, Option<Duration>)>) -> Result<Vec<Message>> {
        let mut encoded = Vec::with_capacity(messages.len());
        for (message, delay) in messages {
            let message = prepare_for_delay_queue(message, delay);
            let bytes = encode_checked(self.inner.encoder.as_ref(), &message, self.inner.max_message_size)?;
            encoded.push((message, bytes));
        }
        let mut enqueued = Vec::with_capacity(encoded.len());
        let pushed = {
            let mut state = self.lock()?;
            encoded.into_iter().try_for_each(|(message, bytes)| {
                state.push(&message.queue_name, message.priority(), bytes.into())?;
                enqueued.push(message);
                Ok::<_, crate::Error>(())
            })
        };
        self.inner.changed.notify_waiters();
        pushed.map(|()| enqueued)
    }

    async fn consume(&self, queue: &str, _options: ConsumerOptions) -> Result<Box<dyn Consumer>> {
        let mut state = self.lock()?;
        state.queue(queue)?;
        state.consumers += 1;
        let id = state.consumers;
        Ok(Box::new(MemoryConsumer {
            broker: self.clone(),
            queue: queue.to_owned(),
            id,
            delivered: Arc::new(Mutex::new(HashSet::new())),
        }))
    }

    async fn purge(&self, queue: &str) -> Result<()> {
        let canonical = q_name(queue);
        let mut state = self.lock()?;
        for name in [canonical.to_owned(), dq_name(canonical)] {
            if let Some(q) = state.queues.get_mut(&name) {
                q.ready.clear();
            }
        }
        if let Some(d) = state.dead.get_mut(canonical) {
            d.clear();
        }
        drop(state);
        self.inner.changed.notify_waiters();
        Ok(())
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats> {
        let canonical = q_name(queue);
        let state = self.lock()?;
        let count = |name: &str| {
            state
                .queues
                .get(name)
                .map_or((0, 0), |q| (q.ready.len() as u64, q.unacked.len() as u64))
        };
        let (ready, in_flight) = count(canonical);
        let (delayed, delayed_in_flight) = count(&dq_name(canonical));
        let dead = state.dead.get(canonical).map_or(0, |d| d.len() as u64);
        Ok(QueueStats::new(ready, delayed + delayed_in_flight, in_flight, dead))
    }

    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        let state = self.lock()?;
        Ok(state
            .dead
            .get(q_name(queue))
            .map(|d| d.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn requeue_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        let canonical = q_name(queue).to_owned();
        let taken: Vec<DeadLetter> = {
            let mut state = self.lock()?;
            let Some(dead) = state.dead.get_mut(&canonical) else {
                return Ok(0);
            };
            let (take, keep): (Vec<_>, Vec<_>) = dead.drain(..).partition(|d| ids.is_empty() || ids.contains(&d.id));
            *dead = keep;
            take
        };
        let mut moved = 0;
        for letter in taken {
            if let Ok(mut message) = letter.message {
                message.set_retries(0);
                message.clear_eta();
                message.queue_name.clone_from(&canonical);
                self.enqueue(message, None).await?;
                moved += 1;
            }
        }
        Ok(moved)
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<u64> {
        let mut state = self.lock()?;
        Ok(state
            .dead
            .get_mut(q_name(queue))
            .map_or(0, |d| d.drain(..).count() as u64))
    }

    async fn peek(&self, queue: &str, which: Waiting, offset: usize, limit: usize) -> Result<Vec<Message>> {
        let name = match which {
            Waiting::Delayed => dq_name(q_name(queue)),
            _ => q_name(queue).to_owned(),
        };
        let bytes: Vec<Arc<[u8]>> = {
            let state = self.lock()?;
            state.queues.get(&name).map_or_else(Vec::new, |q| {
                q.ready
                    .lanes
                    .values()
                    .flatten()
                    .skip(offset)
                    .take(limit)
                    .map(|e| Arc::clone(&e.bytes))
                    .collect()
            })
        };
        Ok(bytes
            .iter()
            .filter_map(|b| self.inner.encoder.decode(b).ok())
            .map(|mut m| {
                m.queue_name = q_name(&m.queue_name).to_owned();
                m
            })
            .collect())
    }

    async fn delete_dead_letters(&self, queue: &str, ids: &[String]) -> Result<u64> {
        let mut state = self.lock()?;
        let Some(dead) = state.dead.get_mut(q_name(queue)) else {
            return Ok(0);
        };
        let before = dead.len();
        dead.retain(|d| !ids.contains(&d.id));
        Ok((before - dead.len()) as u64)
    }

    async fn queue_names(&self) -> Result<Vec<String>> {
        let state = self.lock()?;
        let mut names: Vec<String> = state
            .queues
            .keys()
            .chain(state.dead.keys())
            .filter(|q| !q.ends_with(".DQ") && !q.ends_with(".XQ"))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        names.sort();
        Ok(names)
    }

    async fn beat(&self, worker: &WorkerInfo) -> Result<()> {
        self.lock()?.workers.insert(worker.id.clone(), worker.clone());
        Ok(())
    }

    async fn forget_worker(&self, id: &str) -> Result<()> {
        self.lock()?.workers.remove(id);
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let now = now_ms();
        let mut state = self.lock()?;
        state.workers.retain(|_, w| w.live_at(now));
        let mut workers: Vec<WorkerInfo> = state.workers.values().cloned().collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(workers)
    }

    async fn close(&self) -> Result<()> {
        if let Ok(mut state) = self.inner.state.lock() {
            state.closed = true;
        }
        self.inner.changed.notify_waiters();
        Ok(())
    }
}

#[derive(Debug)]
struct MemoryConsumer {
    broker: MemoryBroker,
    queue: String,
    id: u64,
    delivered: Arc<Mutex<HashSet<u64>>>,
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn fetch(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.broker.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let entries: Vec<Entry> = {
                let mut state = self.broker.lock()?;
                let consumer = self.id;
                let q = state.queue(&self.queue)?;
                let entries: Vec<Entry> = q.ready.take(max);
                for e in &entries {
                    q.unacked.insert(e.id, (e.clone(), consumer));
                }
                entries
            };
            if !entries.is_empty() {
                if let Ok(mut delivered) = self.delivered.lock() {
                    delivered.extend(entries.iter().map(|e| e.id));
                }
                let encoder = self.broker.inner.encoder.as_ref();
                let limit = self.broker.inner.max_message_size;
                return Ok(entries
                    .into_iter()
                    .map(|e| {
                        let message = decode_delivery(encoder, &e.bytes, limit);
                        let handle = MemoryAck {
                            broker: self.broker.clone(),
                            queue: self.queue.clone(),
                            id: e.id,
                            bytes: Arc::clone(&e.bytes),
                            delivered: Arc::clone(&self.delivered),
                        };
                        Delivery::new(self.queue.clone(), message, e.redelivered, Box::new(handle))
                    })
                    .collect());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        let ids: Vec<u64> = self
            .delivered
            .lock()
            .map(|mut d| d.drain().collect())
            .unwrap_or_default();
        if ids.is_empty() {
            return;
        }
        if let Ok(mut state) = self.broker.inner.state.lock() {
            let mut ids = ids;
            ids.sort_unstable_by(|a, b| b.cmp(a));
            for id in ids {
                state.return_unacked(&self.queue, id);
            }
        }
        self.broker.inner.changed.notify_waiters();
    }
}

#[derive(Debug)]
struct MemoryAck {
    broker: MemoryBroker,
    queue: String,
    id: u64,
    bytes: Arc<[u8]>,
    delivered: Arc<Mutex<HashSet<u64>>>,
}

impl MemoryAck {
    fn finish(&self) -> Result<bool> {
        if let Ok(mut delivered) = self.delivered.lock() {
            delivered.remove(&self.id);
        }
        let mut state = self.broker.lock()?;
        Ok(state.queue(&self.queue)?.unacked.remove(&self.id).is_some())
    }
}

#[async_trait]
impl AckHandle for MemoryAck {
    async fn ack(&self) -> Result<()> {
        self.finish()?;
        self.broker.inner.changed.notify_waiters();
        Ok(())
    }

    async fn nack(&self, message: Option<&Message>, reason: &str) -> Result<()> {
        let encoder = self.broker.inner.encoder.as_ref();
        let message = match message {
            Some(m) => Ok(m.clone()),
            None => decode_delivery(encoder, &self.bytes, usize::MAX),
        };
        let id = message
            .as_ref()
            .map_or_else(|_| format!("raw-{}", self.id), |m| m.message_id.clone());
        if let Ok(mut delivered) = self.delivered.lock() {
            delivered.remove(&self.id);
        }
        {
            // One lock for both steps: a join never sees the message neither in flight nor
            // dead (it returned Ok before the dead letter was there).
            let mut state = self.broker.lock()?;
            if state.queue(&self.queue)?.unacked.remove(&self.id).is_some() {
                state
                    .dead
                    .entry(q_name(&self.queue).to_owned())
                    .or_default()
                    .push(DeadLetter::new(id, message, reason.to_owned(), now_ms()));
            }
        }
        self.broker.inner.changed.notify_waiters();
        Ok(())
    }

    async fn requeue(&self) -> Result<()> {
        if let Ok(mut delivered) = self.delivered.lock() {
            delivered.remove(&self.id);
        }
        self.broker.lock()?.return_unacked(&self.queue, self.id);
        self.broker.inner.changed.notify_waiters();
        Ok(())
    }
}
