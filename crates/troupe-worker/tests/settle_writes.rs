//! The worker's side of two middleware hooks: `on_prefetch` is called for a ready message
//! before it is processed, and the writes a middleware leaves with
//! `ProcessContext::before_settle` are awaited before the ack; when one fails on a transient
//! error the message is returned to its queue and runs again, on any other error it is
//! dead-lettered with the error as its reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use troupe_core::middleware::{Next, Outcome, ProcessContext};
use troupe_core::{
    Actor, ActorError, ActorOptions, App, Broker, Error, ErrorKind, MemoryBroker, Message, Middleware, async_trait,
};
use troupe_worker::Worker;

/// Counts its runs.
struct Counted {
    runs: Arc<AtomicUsize>,
}

impl Actor for Counted {
    type Args = ();
    type Output = ();

    fn name(&self) -> &str {
        "counted"
    }

    fn options(&self) -> ActorOptions {
        ActorOptions::new().queue_name("settle")
    }

    async fn call(&self, (): ()) -> Result<(), ActorError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Logs the hooks in the order they ran; its settle write fails the first `failures` times,
/// with a transient (connection) error unless `permanent`.
#[derive(Debug, Default)]
struct Log {
    events: Arc<Mutex<Vec<String>>>,
    failures: usize,
    permanent: bool,
    writes: Arc<AtomicUsize>,
}

impl Log {
    fn push(events: &Mutex<Vec<String>>, event: &str) {
        events.lock().unwrap().push(event.to_owned());
    }
}

#[async_trait]
impl Middleware for Log {
    fn on_prefetch(&self, _app: &App, _message: &Message) {
        Self::push(&self.events, "prefetch");
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        Self::push(&self.events, "process");
        let outcome = next.run(cx).await;
        let (events, writes, failures) = (Arc::clone(&self.events), Arc::clone(&self.writes), self.failures);
        let permanent = self.permanent;
        cx.before_settle(async move {
            let n = writes.fetch_add(1, Ordering::SeqCst);
            if n < failures {
                Self::push(&events, "write failed");
                if permanent {
                    return Err(Error::Config("the store refused the write".into()));
                }
                return Err(Error::backend(
                    "test",
                    ErrorKind::Connection,
                    "the store's connection dropped",
                ));
            }
            Self::push(&events, "write");
            Ok(())
        });
        outcome
    }

    async fn after_ack(&self, _cx: &ProcessContext, _outcome: &Outcome) {
        Self::push(&self.events, "ack");
    }

    async fn after_nack(&self, _cx: &ProcessContext, _outcome: &Outcome) {
        Self::push(&self.events, "nack");
    }
}

async fn run(failures: usize) -> (Vec<String>, usize, MemoryBroker) {
    run_with(failures, false).await
}

async fn run_with(failures: usize, permanent: bool) -> (Vec<String>, usize, MemoryBroker) {
    let runs = Arc::new(AtomicUsize::new(0));
    let log = Arc::new(Log {
        failures,
        permanent,
        ..Log::default()
    });
    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .middleware(Arc::clone(&log))
        .actor(Counted {
            runs: Arc::clone(&runs),
        })
        .build()
        .unwrap();
    app.send(
        &Counted {
            runs: Arc::clone(&runs),
        },
        (),
    )
    .await
    .unwrap();
    let worker = Worker::builder(app.clone())
        .concurrency(1)
        .fetch_timeout(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    // A dead-lettered message fails the join, unless it was dead-lettered before the join's
    // first look (then the caller checks the dead letters).
    let joined = app.join("settle", Duration::from_secs(10)).await;
    assert!(joined.is_ok() || permanent, "{joined:?}");
    worker.stop().await;
    let events = log.events.lock().unwrap().clone();
    (events, runs.load(Ordering::SeqCst), broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_waits_for_the_settle_writes() {
    let (events, runs, broker) = run(0).await;
    assert_eq!(runs, 1);
    assert_eq!(events, ["prefetch", "process", "write", "ack"]);
    let stats = broker.stats("settle").await.unwrap();
    assert_eq!((stats.pending(), stats.dead), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_settle_write_returns_the_message_to_its_queue() {
    let (events, runs, broker) = run(1).await;
    assert_eq!(runs, 2, "requeued after the failed write, then run again");
    assert_eq!(
        events,
        [
            "prefetch",
            "process",
            "write failed",
            "prefetch",
            "process",
            "write",
            "ack"
        ]
    );
    assert_eq!(broker.stats("settle").await.unwrap().dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_write_that_cannot_succeed_dead_letters_the_message_with_its_reason() {
    let (events, runs, broker) = run_with(usize::MAX, true).await;
    assert_eq!(runs, 1, "not run again: the same write would fail again");
    assert_eq!(events, ["prefetch", "process", "write failed", "nack"]);
    let dead = broker.dead_letters("settle", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("the store refused the write"),
        "{}",
        dead[0].reason
    );
}

/// Overrides `after_process` and `after_ack`, counting their calls, and says whether it
/// declares after-hooks.
#[derive(Debug)]
struct AfterHooks {
    declared: bool,
    calls: Arc<AtomicUsize>,
}

#[async_trait]
impl Middleware for AfterHooks {
    fn after_hooks(&self) -> bool {
        self.declared
    }

    async fn after_process(&self, _cx: &mut ProcessContext, _outcome: &Outcome) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }

    async fn after_ack(&self, _cx: &ProcessContext, _outcome: &Outcome) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_hooks_run_only_on_middleware_that_declares_them() {
    let declared = Arc::new(AtomicUsize::new(0));
    let undeclared = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let broker = MemoryBroker::new();
    let app = App::builder(broker.into_dyn())
        .middleware(AfterHooks {
            declared: true,
            calls: Arc::clone(&declared),
        })
        // Through an Arc too: the pointer forwards the declaration.
        .middleware(Arc::new(AfterHooks {
            declared: false,
            calls: Arc::clone(&undeclared),
        }))
        .actor(Counted {
            runs: Arc::clone(&runs),
        })
        .build()
        .unwrap();
    for _ in 0..3 {
        app.send(
            &Counted {
                runs: Arc::clone(&runs),
            },
            (),
        )
        .await
        .unwrap();
    }
    let worker = Worker::builder(app.clone())
        .concurrency(2)
        .fetch_timeout(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    app.join("settle", Duration::from_secs(10)).await.unwrap();
    worker.stop().await;
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    // after_process and after_ack for each of the three messages.
    assert_eq!(declared.load(Ordering::SeqCst), 6);
    assert_eq!(undeclared.load(Ordering::SeqCst), 0);
}
