//! Ports of `tests/middleware/test_time_limit.py`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use troupe::{App, MemoryBroker};

use crate::support::{eventually, join_failed, lock, start};

/// dramatiq tests/middleware/test_time_limit.py::test_time_limits_are_handled
///
/// An async actor cannot catch the interrupt as Python code does; it is dropped at an `.await`,
/// so a drop guard stands in for the `except TimeLimitExceeded` clean-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_time_limits_are_handled() {
    static TIME_LIMITS_EXCEEDED: AtomicUsize = AtomicUsize::new(0);
    static SUCCESSES: AtomicUsize = AtomicUsize::new(0);

    /// Counts an interruption when dropped before it is disarmed.
    struct OnInterrupt(bool);

    impl Drop for OnInterrupt {
        fn drop(&mut self) {
            if self.0 {
                TIME_LIMITS_EXCEEDED.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    #[troupe::actor(time_limit = "10ms", max_retries = 0)]
    async fn do_work() {
        let mut guard = OnInterrupt(true);
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        guard.0 = false;
        SUCCESSES.fetch_add(1, Ordering::SeqCst);
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(DoWork)
        .build()
        .expect("app");
    DoWork.send(&app).await.expect("send");
    let worker = start(&app, 2).await;
    let reason = join_failed(&broker, "default").await;
    worker.stop().await;
    assert!(reason.contains("TimeLimitExceeded"), "{reason}");
    assert_eq!(TIME_LIMITS_EXCEEDED.load(Ordering::SeqCst), 1);
    assert_eq!(SUCCESSES.load(Ordering::SeqCst), 0);
}

/// dramatiq tests/middleware/test_time_limit.py::test_time_limits_are_handled, with a blocking
/// (`fn`) actor.
///
/// Python interrupts the thread; blocking Rust code cannot be interrupted, so Troupe abandons
/// it: the message fails with `TimeLimitExceeded` at once and its worker slot is freed (with
/// one slot, the next message runs while the blocking call still sleeps), while the thread runs
/// to its end and its result is discarded.
///
/// The blocking call holds until the test has seen the dead letter (Python's test sleeps a fixed
/// time instead): a fixed sleep let a starved runtime notice the call's end before the timer, so
/// the message succeeded on a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_time_limits_are_handled_in_sync_actors() {
    static SLEEPY_STARTED: AtomicBool = AtomicBool::new(false);
    static SLEEPY_DONE: AtomicBool = AtomicBool::new(false);
    static RELEASE: AtomicBool = AtomicBool::new(false);
    static QUICK_SAW: Mutex<Option<(bool, bool)>> = Mutex::new(None);

    #[troupe::actor(time_limit = "100ms", max_retries = 0)]
    fn sleepy() {
        SLEEPY_STARTED.store(true, Ordering::SeqCst);
        // Held well past the 100 ms limit; bounded so a failing test cannot hang a thread.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !RELEASE.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        SLEEPY_DONE.store(true, Ordering::SeqCst);
    }

    #[troupe::actor]
    async fn quick() {
        let seen = (
            SLEEPY_STARTED.load(Ordering::SeqCst),
            SLEEPY_DONE.load(Ordering::SeqCst),
        );
        *lock(&QUICK_SAW) = Some(seen);
    }

    let broker = MemoryBroker::new();
    let app = App::builder(broker.clone().into_dyn())
        .actor(Sleepy)
        .actor(Quick)
        .build()
        .expect("app");
    Sleepy.send(&app).await.expect("send");
    Quick.send(&app).await.expect("send");
    let worker = start(&app, 1).await;
    let reason = join_failed(&broker, "default").await;
    RELEASE.store(true, Ordering::SeqCst);
    assert!(reason.contains("TimeLimitExceeded"), "{reason}");
    assert_eq!(
        *lock(&QUICK_SAW),
        Some((true, false)),
        "the next message ran after the blocking one started and before it ended"
    );
    assert!(
        eventually(|| SLEEPY_DONE.load(Ordering::SeqCst)).await,
        "the abandoned call runs to its end"
    );
    worker.stop().await;
}
