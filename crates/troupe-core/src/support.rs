//! Building blocks shared by broker implementations.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};

type Job<I, O> = (I, oneshot::Sender<Result<O>>);

/// Gathers requests submitted by many tasks and hands them to one async handler in batches,
/// so a backend answers them in one round trip; each submitter gets the answer to its own
/// request (the handler returns one output per request, in order).
pub struct Gather<I, O> {
    tx: mpsc::UnboundedSender<Job<I, O>>,
    backend: &'static str,
}

impl<I, O> Clone for Gather<I, O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            backend: self.backend,
        }
    }
}

impl<I, O> fmt::Debug for Gather<I, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gather")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl<I: Send + 'static, O: Send + 'static> Gather<I, O> {
    /// Starts the gathering task: it takes what is waiting (at most `max_batch` requests),
    /// calls `handler` once, and answers every submitter of the batch. The task ends when every
    /// clone is dropped. Needs a tokio runtime.
    pub fn spawn<F, Fut>(backend: &'static str, max_batch: usize, handler: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>>> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job<I, O>>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut items = vec![first.0];
                let mut waiters = vec![first.1];
                while items.len() < max_batch.max(1) {
                    match rx.try_recv() {
                        Ok((item, done)) => {
                            items.push(item);
                            waiters.push(done);
                        }
                        Err(_) => break,
                    }
                }
                match handler(items).await {
                    Ok(outputs) => {
                        let mut outputs = outputs.into_iter();
                        for done in waiters {
                            let _ = done.send(outputs.next().ok_or_else(|| {
                                Error::backend(
                                    backend,
                                    ErrorKind::Other,
                                    "a batched call answered fewer requests than it got",
                                )
                            }));
                        }
                    }
                    Err(e) => {
                        let e = Arc::new(e);
                        for done in waiters {
                            let _ = done.send(Err(shared_failure(backend, &e)));
                        }
                    }
                }
            }
        });
        Self { tx, backend }
    }

    /// Whether the gathering task is gone (its runtime ended): calls would fail.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Submits one request and waits for its answer.
    ///
    /// # Errors
    /// The handler's error for that batch, or a connection error when the gathering task is
    /// gone (its runtime ended, or every other clone was dropped).
    pub async fn call(&self, item: I) -> Result<O> {
        self.submit(item).await
    }

    /// Submits one request now (it joins the next batch) and returns its answer to await
    /// later: a caller can start a request and go on.
    pub fn submit(&self, item: I) -> impl Future<Output = Result<O>> + Send + 'static {
        let (done, wait) = oneshot::channel();
        let sent = self.tx.send((item, done)).is_ok();
        let backend = self.backend;
        async move {
            if !sent {
                return Err(Error::backend(
                    backend,
                    ErrorKind::Connection,
                    "the batching task is gone",
                ));
            }
            wait.await
                .map_err(|_| Error::backend(backend, ErrorKind::Connection, "the batching task stopped"))?
        }
    }
}

/// Gathers items submitted by many tasks (acks, nacks, requeues) and hands them to one async
/// handler in batches, so a broker writes them in one round trip; every submitter waits for the
/// outcome of its batch.
pub struct Batcher<T> {
    inner: Gather<T, ()>,
}

impl<T> Clone for Batcher<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for Batcher<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("backend", &self.inner.backend)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the batching task: it takes what is waiting (at most `max_batch` items), calls
    /// `handler` once, and reports its result to every submitter of the batch. The task ends
    /// when every clone of the batcher is dropped. Needs a tokio runtime.
    pub fn spawn<F, Fut>(backend: &'static str, max_batch: usize, handler: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send,
    {
        let inner = Gather::spawn(backend, max_batch, move |items: Vec<T>| {
            let n = items.len();
            let written = handler(items);
            async move { written.await.map(|()| vec![(); n]) }
        });
        Self { inner }
    }

    /// Submits one item and waits for the outcome of the batch it went into.
    ///
    /// # Errors
    /// The handler's error for that batch, or a connection error when the broker is gone.
    pub async fn submit(&self, item: T) -> Result<()> {
        self.inner.call(item).await
    }
}

/// One batch's error, shared by every submitter of the batch: displays as the original and
/// continues its source chain.
#[derive(Debug)]
struct SharedError(Arc<Error>);

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// The error a submitter gets when its batch failed with `error`: the same backend, kind and
/// message (so the same `Display`), with `error` itself as the source, so its chain is kept.
fn shared_failure(backend: &'static str, error: &Arc<Error>) -> Error {
    let (backend, message) = match &**error {
        Error::Backend { backend, message, .. } => (*backend, message.clone()),
        other => (backend, other.to_string()),
    };
    Error::Backend {
        backend,
        kind: error.kind(),
        message,
        source: Some(Box::new(SharedError(Arc::clone(error)))),
    }
}

/// Runs `op` again while it fails with a transient error, after `first` doubling up to `max`
/// between tries, until it has waited `give_up_after` in all (when set) or `stop` is
/// cancelled; each retry is logged as `could not {what}`. Returns the last outcome (on `stop`,
/// the last error).
///
/// # Errors
/// A permanent error at once; a transient one once the time is up or `stop` fires.
// An `async fn` would hold every argument twice in its future (the argument and the body's
// local), which every settled message's future carries.
#[allow(clippy::manual_async_fn)]
pub fn retry_transient<T, F, Fut>(
    what: &str,
    backoff: (std::time::Duration, std::time::Duration),
    give_up_after: Option<std::time::Duration>,
    stop: Option<&CancellationToken>,
    op: F,
) -> impl Future<Output = Result<T>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    // The first try inline, the retries boxed: they are rare, and their loop (the error kept,
    // the pause, a second try's future) inline would grow every caller's future (each settled
    // message's) by its size.
    async move {
        match op().await {
            Err(e) if e.is_transient() && give_up_after.is_none_or(|limit| !limit.is_zero()) => {
                Box::pin(retry_after(e, what, backoff, give_up_after, stop, op)).await
            }
            other => other,
        }
    }
}

/// [`retry_transient`] after its first try failed with the transient `error`.
async fn retry_after<T, F, Fut>(
    mut error: Error,
    what: &str,
    (first, max): (std::time::Duration, std::time::Duration),
    give_up_after: Option<std::time::Duration>,
    stop: Option<&CancellationToken>,
    op: F,
) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut backoff = first;
    let mut waited = std::time::Duration::ZERO;
    loop {
        tracing::warn!(error = %error, "could not {what}; retrying in {backoff:?}");
        let pause = tokio::time::sleep(backoff);
        let stopped = match stop {
            Some(stop) => {
                tokio::select! {
                    () = stop.cancelled() => true,
                    () = pause => false,
                }
            }
            None => {
                pause.await;
                false
            }
        };
        if stopped {
            return Err(error);
        }
        waited += backoff;
        backoff = (backoff * 2).min(max);
        match op().await {
            Err(e) if e.is_transient() && give_up_after.is_none_or(|limit| waited < limit) => error = e,
            other => return other,
        }
    }
}

/// Wake-ups per queue: consumers wait on their queue's [`Notify`]; enqueues and notifications
/// from the server wake them.
#[derive(Debug, Default)]
pub struct Wakers {
    by_queue: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Wakers {
    /// The wake-up of `queue`.
    #[must_use]
    pub fn get(&self, queue: &str) -> Arc<Notify> {
        self.by_queue
            .lock()
            .map(|mut w| Arc::clone(w.entry(queue.to_owned()).or_default()))
            .unwrap_or_default()
    }

    /// Wakes the consumers of `queue` that wait now.
    pub fn wake(&self, queue: &str) {
        let notify = self.by_queue.lock().ok().and_then(|w| w.get(queue).cloned());
        if let Some(n) = notify {
            n.notify_waiters();
        }
    }

    /// Wakes every waiting consumer.
    pub fn wake_all(&self) {
        let all: Vec<Arc<Notify>> = self
            .by_queue
            .lock()
            .map(|w| w.values().cloned().collect())
            .unwrap_or_default();
        for n in all {
            n.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn batches_concurrent_submissions() {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let batcher = Batcher::spawn("test", 100, move |items: Vec<u32>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move {
                if items.contains(&13) {
                    Err(Error::backend("test", ErrorKind::Timeout, "unlucky"))
                } else {
                    Ok(())
                }
            }
        });
        let tasks: Vec<_> = (0..50u32)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.submit(i + 100).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert!(calls.load(Ordering::SeqCst) <= 50);
        let err = batcher.submit(13).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
    }

    /// A cause of a cause, to find at the end of a chain.
    #[derive(Debug)]
    struct Deep;

    impl fmt::Display for Deep {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("disk full")
        }
    }

    impl std::error::Error for Deep {}

    #[derive(Debug)]
    struct Client(Deep);

    impl fmt::Display for Client {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("write failed")
        }
    }

    impl std::error::Error for Client {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        let mut out = vec![e.to_string()];
        let mut next = e.source();
        while let Some(cause) = next {
            out.push(cause.to_string());
            next = cause.source();
        }
        out
    }

    #[tokio::test]
    async fn every_waiter_gets_the_batch_error_with_its_source_chain() {
        let original = || {
            let e = Client(Deep);
            Error::backend_with_source("test", ErrorKind::Timeout, format!("cannot ack: {e}"), e)
        };
        let batcher = Batcher::spawn("batcher", 100, move |_: Vec<u32>| async move { Err(original()) });
        let tasks: Vec<_> = (0..5u32)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.submit(i).await })
            })
            .collect();
        for t in tasks {
            let err = t.await.unwrap().unwrap_err();
            assert_eq!(err.to_string(), original().to_string());
            assert_eq!(err.kind(), ErrorKind::Timeout);
            assert_eq!(chain(&err), chain(&original()), "the same chain, each cause once");
            let deepest = std::iter::successors(std::error::Error::source(&err), |e| e.source()).last();
            assert!(deepest.is_some_and(|e| e.downcast_ref::<Deep>().is_some()), "{err:?}");
            let source = err.backend_source().map(ToString::to_string);
            assert_eq!(source, Some(original().to_string()), "the original is the source");
        }
    }
}

/// What a worker asks of a delivery claimed from a table or list, for brokers that settle
/// through a [`Batcher`]. Exhaustive on purpose: a broker must handle every kind.
#[derive(Debug)]
pub enum SettleOp {
    /// Processed: remove it.
    Ack,
    /// Dead-letter it with the message as the worker last saw it (when it decoded).
    Nack {
        /// The re-encoded message, if any.
        body: Option<Vec<u8>>,
        /// Why.
        reason: String,
    },
    /// Return it to its queue.
    Requeue,
}

/// One settle request: the delivery's key (row id and attempt, say) and what to do.
#[derive(Debug)]
pub struct Settle<K> {
    /// Which delivery (fenced: a stale key matches nothing).
    pub key: K,
    /// What to do.
    pub op: SettleOp,
}

/// An [`AckHandle`](crate::AckHandle) that sends its settle requests to a [`Batcher`].
pub struct BatchedAck<K> {
    batcher: Batcher<Settle<K>>,
    key: K,
    encoder: Arc<dyn crate::Encoder>,
}

impl<K: fmt::Debug> fmt::Debug for BatchedAck<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchedAck")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl<K> BatchedAck<K> {
    /// A handle for the delivery `key`; nacks re-encode the message with `encoder`.
    #[must_use]
    pub fn new(batcher: Batcher<Settle<K>>, key: K, encoder: Arc<dyn crate::Encoder>) -> Self {
        Self { batcher, key, encoder }
    }
}

#[async_trait::async_trait]
impl<K: Clone + fmt::Debug + Send + Sync + 'static> crate::AckHandle for BatchedAck<K> {
    async fn ack(&self) -> Result<()> {
        self.batcher
            .submit(Settle {
                key: self.key.clone(),
                op: SettleOp::Ack,
            })
            .await
    }

    async fn nack(&self, message: Option<&crate::Message>, reason: &str) -> Result<()> {
        let body = match message {
            Some(m) => Some(self.encoder.encode(m)?),
            None => None,
        };
        self.batcher
            .submit(Settle {
                key: self.key.clone(),
                op: SettleOp::Nack {
                    body,
                    reason: reason.to_owned(),
                },
            })
            .await
    }

    async fn requeue(&self) -> Result<()> {
        self.batcher
            .submit(Settle {
                key: self.key.clone(),
                op: SettleOp::Requeue,
            })
            .await
    }
}

/// Calls `check` until it returns a value or `timeout` passes (then `None`), sleeping `poll`
/// between calls and waking early when `wake` is notified: the blocking read of backends whose
/// server cannot block (SQL tables).
///
/// # Errors
/// The first error `check` returns.
pub async fn poll_until<T, F, Fut>(
    timeout: std::time::Duration,
    poll: std::time::Duration,
    wake: Option<&Notify>,
    mut check: F,
) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = wake.map(Notify::notified);
        tokio::pin!(notified);
        if let Some(n) = notified.as_mut().as_pin_mut() {
            n.enable();
        }
        if let Some(value) = check().await? {
            return Ok(Some(value));
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        let nap = tokio::time::sleep(poll.min(deadline - now));
        match notified.as_mut().as_pin_mut() {
            Some(n) => {
                tokio::select! {
                    () = n => {}
                    () = nap => {}
                }
            }
            None => nap.await,
        }
    }
}
