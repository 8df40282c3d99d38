//! Conformance cases for rate limiters and barriers ([`troupe_core::limits`]): the same on
//! every state backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use troupe_core::limits::{
    Barrier, BucketRateLimiter, ConcurrentRateLimiter, RATE_LIMIT_EXCEEDED, WhenLimited, WindowRateLimiter,
};
use troupe_core::{ErrorAction, StateBackend, now_ms};

fn key(prefix: &str) -> String {
    crate::unique_queue(prefix)
}

/// Waits until `limiter` has a free slot (a dropped guard's release is sent in the
/// background), taking and giving it back; panics after `within`.
async fn frees_within(limiter: &ConcurrentRateLimiter, within: Duration, what: &str) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(guard) = limiter.try_acquire().await.expect("acquire") {
            guard.release().await.expect("release");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the slot was not freed within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sleeps until just after the start of the next whole `unit` of wall-clock time (ms), so a
/// case's acquires fall in one bucket or second.
async fn align(unit: u64) {
    let now = now_ms();
    tokio::time::sleep(Duration::from_millis(unit - now % unit + 5)).await;
}

/// A concurrent limiter admits `limit` holders, no more, and a released slot can be taken again.
pub async fn rate_limit_concurrent_admits_up_to_its_limit(backend: Arc<dyn StateBackend>) {
    let limiter = ConcurrentRateLimiter::new(backend, key("limit"), 2);
    let a = limiter.try_acquire().await.expect("acquire").expect("first slot");
    let b = limiter.try_acquire().await.expect("acquire").expect("second slot");
    assert_ne!(a.holder(), b.holder());
    assert!(
        limiter.try_acquire().await.expect("acquire").is_none(),
        "a third holder of a limit of 2"
    );
    a.release().await.expect("release");
    let c = limiter
        .try_acquire()
        .await
        .expect("acquire")
        .expect("the released slot");
    assert!(limiter.try_acquire().await.expect("acquire").is_none());
    b.release().await.expect("release");
    limiter
        .try_acquire()
        .await
        .expect("acquire")
        .expect("b's slot")
        .release()
        .await
        .expect("release");
    drop(c);
    frees_within(&limiter, Duration::from_secs(5), "dropped guard").await;
}

/// A guard's slot is released when it is dropped, when its holder panics, and when its
/// holder's future is cancelled.
pub async fn rate_limit_concurrent_guard_releases_on_drop_panic_and_cancel(backend: Arc<dyn StateBackend>) {
    let limiter = ConcurrentRateLimiter::new(backend, key("guard"), 1);
    drop(limiter.try_acquire().await.expect("acquire").expect("slot"));
    frees_within(&limiter, Duration::from_secs(5), "drop").await;

    let l = limiter.clone();
    let panicked = tokio::spawn(async move {
        let _slot = l.try_acquire().await.expect("acquire").expect("slot");
        panic!("the actor fails while it holds the slot");
    })
    .await;
    assert!(panicked.is_err_and(|e| e.is_panic()));
    frees_within(&limiter, Duration::from_secs(5), "panic").await;

    let l = limiter.clone();
    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    let holder = tokio::spawn(async move {
        let _slot = l.try_acquire().await.expect("acquire").expect("slot");
        let _ = held_tx.send(());
        std::future::pending::<()>().await;
    });
    held_rx.await.expect("the holder took the slot");
    assert!(
        limiter.try_acquire().await.expect("acquire").is_none(),
        "held by the pending task"
    );
    holder.abort();
    assert!(holder.await.is_err_and(|e| e.is_cancelled()));
    frees_within(&limiter, Duration::from_secs(5), "cancel").await;
}

/// A holder that died without releasing (it never renews) loses its slot when its lease runs
/// out, even while live holders keep the key busy.
pub async fn rate_limit_concurrent_dead_holder_frees_with_its_lease(backend: Arc<dyn StateBackend>) {
    let k = key("dead");
    // Two seconds: a guard renews every third of its lease, and on a loaded CI machine a renewal
    // of a one-second lease came late once (the live guard lost its slot).
    let lease = Duration::from_secs(2);
    // The dead holder: a slot taken straight from the backend, never renewed nor released.
    assert!(
        backend
            .acquire_slot(&k, "killed-worker", 2, lease)
            .await
            .expect("dead holder")
    );
    let limiter = ConcurrentRateLimiter::new(Arc::clone(&backend), k, 2).lease(lease);
    let live = limiter.try_acquire().await.expect("acquire").expect("the second slot");
    assert!(
        limiter.try_acquire().await.expect("acquire").is_none(),
        "both slots are held"
    );
    // The live guard renews every third of its lease; the dead one's runs out.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let third = limiter
        .try_acquire()
        .await
        .expect("acquire")
        .expect("the dead holder's slot once its lease ran out");
    assert!(
        limiter.try_acquire().await.expect("acquire").is_none(),
        "the live guard kept its slot by renewing it"
    );
    assert!(
        !backend
            .renew_slot(limiter.key(), "killed-worker", lease)
            .await
            .expect("renew"),
        "a lapsed holder cannot renew"
    );
    live.release().await.expect("release");
    third.release().await.expect("release");
}

/// Holders racing from many tasks (each with its own acquires) never exceed the limit, and
/// every one of them gets its turn.
pub async fn rate_limit_concurrent_contention_never_exceeds_its_limit(backend: Arc<dyn StateBackend>) {
    let limiter = ConcurrentRateLimiter::new(backend, key("race"), 2);
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (limiter, inside, most) = (limiter.clone(), Arc::clone(&inside), Arc::clone(&most));
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                let slot = limiter
                    .acquire(WhenLimited::Wait(Duration::from_secs(30)))
                    .await
                    .expect("a slot within 30 s");
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                slot.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        t.await.expect("holder");
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} holders at once under a limit of 2");
    assert!(most >= 1);
}

/// When the limit is reached, `Retry` fails with `RateLimitExceeded` (retried by `Retries`),
/// `Skip` skips, and `Wait` gets the slot once it is released within the wait.
pub async fn rate_limit_when_limited_retries_skips_or_waits(backend: Arc<dyn StateBackend>) {
    let limiter = ConcurrentRateLimiter::new(backend, key("when"), 1);
    let held = limiter.try_acquire().await.expect("acquire").expect("slot");
    let e = limiter.acquire(WhenLimited::Retry).await.expect_err("limited");
    assert_eq!(e.type_name(), RATE_LIMIT_EXCEEDED);
    assert_eq!(e.action(), ErrorAction::Fail);
    let e = limiter.acquire(WhenLimited::Skip).await.expect_err("limited");
    assert_eq!(e.action(), ErrorAction::Skip);
    let e = limiter
        .acquire(WhenLimited::Wait(Duration::from_millis(150)))
        .await
        .expect_err("still held after the wait");
    assert_eq!(e.type_name(), RATE_LIMIT_EXCEEDED);
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        held.release().await.expect("release");
    });
    let got = limiter
        .acquire(WhenLimited::Wait(Duration::from_secs(10)))
        .await
        .expect("the slot once released");
    releaser.await.expect("releaser");
    got.release().await.expect("release");
}

/// A bucket limiter admits `limit` acquires per bucket and again in the next bucket.
pub async fn rate_limit_bucket_admits_its_limit_per_bucket(backend: Arc<dyn StateBackend>) {
    let limiter = BucketRateLimiter::new(backend, key("bucket"), 3, Duration::from_secs(1));
    align(1000).await;
    for i in 0..3 {
        assert!(limiter.try_acquire().await.expect("acquire"), "acquire {i} of 3");
    }
    assert!(!limiter.try_acquire().await.expect("acquire"), "a fourth in one bucket");
    assert!(limiter.acquire(WhenLimited::Retry).await.is_err());
    align(1000).await;
    assert!(limiter.try_acquire().await.expect("acquire"), "the next bucket");
    // A wait covers the time to the next bucket.
    for _ in 0..2 {
        limiter.try_acquire().await.expect("acquire");
    }
    limiter
        .acquire(WhenLimited::Wait(Duration::from_millis(1500)))
        .await
        .expect("room in the next bucket");
}

/// A window limiter counts acquires over its whole sliding window of seconds.
pub async fn rate_limit_window_admits_its_limit_per_window(backend: Arc<dyn StateBackend>) {
    let limiter = WindowRateLimiter::new(backend, key("window"), 3, Duration::from_secs(2));
    align(1000).await;
    for i in 0..3 {
        assert!(limiter.try_acquire().await.expect("acquire"), "acquire {i} of 3");
    }
    assert!(!limiter.try_acquire().await.expect("acquire"), "a fourth in the window");
    // One second on, the first second is still in the 2 s window.
    align(1000).await;
    assert!(
        !limiter.try_acquire().await.expect("acquire"),
        "the window still holds 3"
    );
    // Two seconds on, it has slid past them.
    align(1000).await;
    assert!(limiter.try_acquire().await.expect("acquire"), "the window slid");
}

/// A barrier clears when its last party arrives, waking the parties that wait.
pub async fn barrier_clears_when_every_party_arrives(backend: Arc<dyn StateBackend>) {
    let k = key("barrier");
    let barrier = Barrier::new(Arc::clone(&backend), k.clone()).ttl(Duration::from_secs(60));
    assert!(barrier.create(3).await.expect("create"));
    assert!(
        !barrier.create(3).await.expect("create again"),
        "an existing barrier is kept"
    );
    let waiter = {
        let b = barrier.clone();
        tokio::spawn(async move { b.wait(Duration::from_secs(20)).await })
    };
    // The waiter is the first party: its arrival counts the barrier down to 2 (a fixed sleep
    // was too short on a loaded machine).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while backend.get(&k).await.expect("get") != Some(2) {
        assert!(tokio::time::Instant::now() < deadline, "the waiter arrived within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!barrier.arrive().await.expect("arrive"), "the second of three");
    assert!(!waiter.is_finished(), "the waiter waits for the third");
    assert!(barrier.arrive().await.expect("arrive"), "the third clears it");
    assert!(waiter.await.expect("join").expect("wait"), "the waiter is woken");
}

/// A wait returns false when the other parties do not arrive in time.
pub async fn barrier_wait_times_out(backend: Arc<dyn StateBackend>) {
    let barrier = Barrier::new(backend, key("barrier")).ttl(Duration::from_secs(60));
    assert!(barrier.create(2).await.expect("create"));
    assert!(!barrier.wait(Duration::from_millis(200)).await.expect("wait"));
    assert!(barrier.arrive().await.expect("the second clears it"));
}

/// A party's arrival counts once however often it comes (a child redelivered after a crash),
/// keeps its outcome, and mixes with Dramatiq's plain counter steps (a Python worker's).
pub async fn barrier_arrivals_count_each_party_once(backend: Arc<dyn StateBackend>) {
    let ttl = Duration::from_secs(60);
    let k = key("arrive");
    let barrier = Barrier::new(Arc::clone(&backend), k.clone()).ttl(ttl);
    assert!(barrier.create(3).await.expect("create"));
    let a = backend.arrive(&k, "a", "\"first\"", ttl).await.expect("arrive");
    assert_eq!((a.counted, a.cleared, a.clearer), (true, false, false));
    let again = backend.arrive(&k, "a", "\"again\"", ttl).await.expect("arrive");
    assert_eq!(
        (again.counted, again.cleared),
        (false, false),
        "a repeated arrival counts nothing"
    );
    // A Python party: Dramatiq's `decr(key, 1, minimum=1)`.
    assert!(backend.decr(&k, 1, 1, ttl).await.expect("decr"));
    let c = backend.arrive(&k, "c", "\"third\"", ttl).await.expect("arrive");
    assert_eq!(
        (c.counted, c.cleared, c.clearer),
        (true, true, true),
        "the last party clears it"
    );
    let late = backend.arrive(&k, "c", "\"third\"", ttl).await.expect("arrive");
    assert_eq!(
        (late.counted, late.cleared, late.clearer),
        (false, true, true),
        "a repeat of the clearer sees it cleared, by itself"
    );
    let other = backend.arrive(&k, "a", "\"again\"", ttl).await.expect("arrive");
    assert_eq!(
        (other.counted, other.cleared, other.clearer),
        (false, true, false),
        "a repeat of another party sees it cleared, not by itself"
    );
    assert!(
        backend
            .wait(&format!("{k}@events"), Duration::from_millis(100))
            .await
            .expect("wait"),
        "clearing notifies the barrier's events"
    );
    let mut arrivals = backend.arrivals(&k).await.expect("arrivals");
    arrivals.sort();
    assert_eq!(
        arrivals,
        [
            ("a".to_owned(), "\"first\"".to_owned()),
            ("c".to_owned(), "\"third\"".to_owned())
        ]
    );
    let other = key("arrive");
    assert!(backend.arrivals(&other).await.expect("arrivals").is_empty());
}

/// `coordination` lists a limiter's live holders and a barrier's arrivals, for the dashboard.
pub async fn coordination_lists_holders_and_arrivals(backend: Arc<dyn StateBackend>) {
    let slots = key("held");
    let lease = Duration::from_secs(60);
    assert!(
        backend
            .acquire_slot(&slots, "holder-a", 3, lease)
            .await
            .expect("acquire")
    );
    assert!(
        backend
            .acquire_slot(&slots, "holder-b", 3, lease)
            .await
            .expect("acquire")
    );
    let barrier = key("gate");
    let ttl = Duration::from_secs(60);
    assert!(backend.add(&barrier, 3, ttl).await.expect("create"));
    backend.arrive(&barrier, "party-1", "ok", ttl).await.expect("arrive");
    backend.arrive(&barrier, "party-2", "ok", ttl).await.expect("arrive");
    let seen = backend.coordination(100_000).await.expect("coordination");
    let held = seen
        .slots
        .iter()
        .find(|s| s.key == slots)
        .expect("the limiter is listed");
    assert_eq!(held.holders, ["holder-a", "holder-b"]);
    let gate = seen
        .barriers
        .iter()
        .find(|b| b.key == barrier)
        .expect("the barrier is listed");
    assert_eq!((gate.arrived, gate.cleared), (2, false));
    backend.arrive(&barrier, "party-3", "ok", ttl).await.expect("arrive");
    backend.release_slot(&slots, "holder-a", lease).await.expect("release");
    let seen = backend.coordination(100_000).await.expect("coordination");
    let gate = seen
        .barriers
        .iter()
        .find(|b| b.key == barrier)
        .expect("the barrier is listed");
    assert_eq!((gate.arrived, gate.cleared), (3, true));
    let held = seen
        .slots
        .iter()
        .find(|s| s.key == slots)
        .expect("the limiter is listed");
    assert_eq!(held.holders, ["holder-b"], "a released slot is gone");
    backend.release_slot(&slots, "holder-b", lease).await.expect("release");
}
