//! Faults on Redis: a worker SIGKILLed mid-batch loses nothing, a Redis restart under a running
//! worker is survived, and passwords never appear in errors.
//!
//! The restart test runs its own `redis-server` on a free port, so the machine's Redis (used by
//! the other tests in parallel) is never stopped. The crash test runs this binary again as the
//! worker process (`troupe_test_suite::kill`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use troupe_core::ActorError;
use troupe_redis::{RedisBroker, RedisOptions};
use troupe_test_suite::chaos::{self, ChaosRounds, Fault};
use troupe_test_suite::kill::{self, KillBackend, MidBatchKill, Runs};
use troupe_test_suite::servers::{RedisClusterSet, RedisSentinels, free_port, redis_server};
use troupe_test_suite::{COUNT_QUEUE, Count, counting_app};
use troupe_worker::Worker;

/// The queue of the [`Count`] actor.
const QUEUE: &str = COUNT_QUEUE;

fn url() -> String {
    std::env::var("TROUPE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Runs counted per argument in the hash `<namespace>:processed`.
struct Processed {
    key: String,
    conn: MultiplexedConnection,
}

impl Runs for Processed {
    async fn record(&self, n: u64) -> Result<(), ActorError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("HINCRBY")
            .arg(&self.key)
            .arg(n)
            .arg(1)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn counts(&self) -> HashMap<u64, u64> {
        let mut conn = self.conn.clone();
        redis::cmd("HGETALL")
            .arg(&self.key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

/// A namespace (the place) with a 1 s heartbeat timeout, on the machine's Redis (through the
/// chaos proxy in a chaos round's worker processes) or on `server` (a private one, or
/// [`BROKER_URL`] in a worker process); runs are recorded on the machine's Redis either way.
#[derive(Default)]
struct Redis {
    server: Option<String>,
}

/// The environment variable that gives a chaos round's worker processes their broker's URL
/// when it is not the machine's Redis (a Sentinel set's).
const BROKER_URL: &str = "TROUPE_CHAOS_REDIS_BROKER_URL";

/// The environment variable that gives a chaos round's worker processes on other hosts the
/// address at which they reach the machine's Redis out of the fault's reach (for their runs
/// and their state).
const SIDE_SERVER: &str = "TROUPE_CHAOS_REDIS_SIDE";

/// The machine's Redis as this process reaches it outside the fault: directly, or through
/// [`SIDE_SERVER`] from another host.
fn side_url() -> String {
    match std::env::var(SIDE_SERVER) {
        Ok(addr) => chaos::with_server(&url(), &addr),
        Err(_) => url(),
    }
}

impl Redis {
    /// The broker's and result backend's URL.
    fn broker_url(&self) -> String {
        self.server
            .clone()
            .or_else(|| std::env::var(BROKER_URL).ok())
            .unwrap_or_else(|| chaos::behind_proxy(&url()))
    }
}

impl KillBackend for Redis {
    type Broker = RedisBroker;
    type Runs = Processed;
    const NAME: &'static str = "Redis";

    async fn open(&self, ns: &str) -> (RedisBroker, Processed) {
        // A chaos round's workers reach Redis through its fault proxy; the runs go direct.
        let mut options = RedisOptions::from_url(&self.broker_url()).unwrap().namespace(ns);
        if !chaos::at_defaults() {
            options = options
                .heartbeat_timeout(Duration::from_secs(1))
                .maintenance_interval(Duration::from_millis(200));
        }
        let client = redis::Client::open(side_url()).unwrap();
        let runs = Processed {
            key: format!("{ns}:processed"),
            conn: client.get_multiplexed_async_connection().await.unwrap(),
        };
        (RedisBroker::open(options).await.unwrap(), runs)
    }

    async fn state(&self, ns: &str) -> Option<std::sync::Arc<dyn troupe_core::StateBackend>> {
        let options = RedisOptions::from_url(&self.server.clone().unwrap_or_else(side_url))
            .unwrap()
            .namespace(ns);
        Some(troupe_redis::RedisState::open(options).await.unwrap().into_dyn())
    }

    async fn results(&self, ns: &str) -> Option<std::sync::Arc<dyn troupe_core::ResultBackend>> {
        let options = RedisOptions::from_url(&self.broker_url()).unwrap().namespace(ns);
        Some(troupe_redis::RedisResults::open(options).await.unwrap().into_dyn())
    }
}

/// The worker process of the crash test.
#[test]
fn child() {
    kill::child(&Redis::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_loses_nothing() {
    let ns = format!("troupe-crash-{}", uuid::Uuid::new_v4().simple());
    MidBatchKill::default().run(&Redis::default(), &ns, QUEUE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_mid_send_many_loses_no_confirmed_message() {
    let ns = format!("troupe-producer-{}", uuid::Uuid::new_v4().simple());
    kill::producer_kill(&Redis::default(), &ns, QUEUE).await;
}

/// Chaos rounds (`troupe_test_suite::chaos`): a worker SIGKILLed, the link cut, the link
/// stalled then cut or for good, each while two worker processes run a mix of messages that store results.
async fn chaos(fault: Fault, name: &str) {
    let ns = format!("troupe-chaos-{}", uuid::Uuid::new_v4().simple());
    let server = chaos::server_of(&url(), 6379).await;
    ChaosRounds::new(fault)
        .side_server(SIDE_SERVER, server)
        .run(&Redis::default(), &ns, name, Some(server))
        .await
        .assert_nothing_lost();
}

/// Chaos rounds of a Redis restart: a private server with the append-only file synced on every
/// write (`appendfsync always`), killed with SIGKILL and started again on its data while two
/// workers run. Nothing acknowledged may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_server_restarted() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let start = {
        let dir = dir.path().to_owned();
        move || redis_server(port, &dir, &["--appendonly", "yes", "--appendfsync", "always"])
    };
    let server = Arc::new(std::sync::Mutex::new(start()));
    let ns = format!("troupe-chaos-{}", uuid::Uuid::new_v4().simple());
    let url = format!("redis://127.0.0.1:{port}/0");
    let restart = {
        let server = Arc::clone(&server);
        move || {
            let mut server = server.lock().unwrap();
            server.kill().unwrap();
            server.wait().unwrap();
            *server = start();
        }
    };
    let report = ChaosRounds::new(Fault::RestartServer)
        .restart_with(restart)
        .run(
            &Redis { server: Some(url) },
            &ns,
            "chaos-restart",
            Some(chaos::server_of(&format!("redis://127.0.0.1:{port}"), port).await),
        )
        .await;
    let mut server = server.lock().unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
    report.assert_nothing_lost();
}

troupe_test_suite::network_chaos_tests!(chaos);

/// Chaos rounds of a Redis Sentinel failover: a master, its replica and three sentinels of the
/// test's own; each round SIGKILLs the master while two workers run (their URL names the
/// sentinels), returns once the sentinels have promoted the replica, and after the round starts
/// the killed node again as the new master's replica. Replication is asynchronous, so a write
/// the master took in its last moment may be gone; the workers' writes come in order, so the
/// promoted replica holds a prefix of them, which loses no message (a move, a retry and a
/// result are written before the ack that ends their message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sentinel_master_killed() {
    let set = Arc::new(RedisSentinels::start());
    let url = set.url("");
    let ns = format!("troupe-chaos-{}", uuid::Uuid::new_v4().simple());
    let (killer, restarter) = (Arc::clone(&set), Arc::clone(&set));
    let report = ChaosRounds::new(Fault::RestartServer)
        .named("master killed, Sentinel failover")
        .kill_then_bring_back(
            move || killer.kill_master(),
            move |port| restarter.restart_as_replica(port),
        )
        .child_env(BROKER_URL, url.clone())
        .run(&Redis { server: Some(url) }, &ns, "chaos-sentinel", None)
        .await;
    report.assert_nothing_lost();
}

/// Chaos rounds of a Redis Cluster failover: three masters with a replica each, of the test's
/// own; each round SIGKILLs the master serving the namespace's slot while two workers run
/// (their URL names every node), returns once its replica serves the slot, and after the round
/// starts the killed node again, which rejoins as a replica. As with Sentinel, replication is
/// asynchronous and the workers' writes come in order, so no message may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_cluster_master_killed() {
    let set = Arc::new(RedisClusterSet::start());
    let url = set.url("");
    let ns = format!("{{troupe-chaos-{}}}", uuid::Uuid::new_v4().simple());
    let (killer, restarter, key) = (Arc::clone(&set), Arc::clone(&set), ns.clone());
    let report = ChaosRounds::new(Fault::RestartServer)
        .named("the namespace's master killed, cluster failover")
        .kill_then_bring_back(move || killer.kill_master_of(&key), move |port| restarter.restart(port))
        .child_env(BROKER_URL, url.clone())
        .run(&Redis { server: Some(url) }, &ns, "chaos-cluster", None)
        .await;
    report.assert_nothing_lost();
}

/// A producer sending one message at a time through sentinels while the master is killed:
/// its sends fail with transient errors during the failover, then go to the promoted
/// replica. Counts the sends that returned `Ok` and are not on the promoted master (what
/// asynchronous replication can lose at failover) and how long sends failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_follows_a_sentinel_failover() {
    let set = Arc::new(RedisSentinels::start());
    let ns = format!("troupe-sentinel-{}", uuid::Uuid::new_v4().simple());
    let broker = RedisBroker::connect(&set.url(&format!("?namespace={ns}")))
        .await
        .unwrap();
    let (app, count) = counting_app(Arc::new(broker.clone()));
    let send = move || {
        let (app, count) = (app.clone(), Arc::clone(&count));
        async move { Ok(app.send(&Count(count), ()).await?.message().message_id.clone()) }
    };
    let killer = Arc::clone(&set);
    let sends = chaos::produce_through(
        send,
        move || {
            let _ = killer.kill_master();
        },
        Duration::from_secs(3),
    )
    .await;
    let lost = sends.missing_from(&broker, QUEUE).await;
    eprintln!(
        "SENTINEL producer | sent {} | lost {lost} | sends failing for {:?} | failover took {:?}",
        sends.confirmed.len(),
        sends.failing_for,
        sends.fault_took
    );
    assert!(
        sends
            .last_failure
            .is_some_and(|d| d < sends.fault_took + Duration::from_secs(2)),
        "the producer met the failover and sent again within 2 s of its end: last failure {:?} after the kill, failover took {:?}",
        sends.last_failure,
        sends.fault_took
    );
    assert!(
        sends.since_failure > 0,
        "sends went on after the failover: none was confirmed after the last failed one"
    );
}

/// Through sentinels: messages go to the master they name, and a master name they do not
/// watch is refused in one line that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_urls_reach_the_master_they_name() {
    let set = RedisSentinels::start();
    let broker = RedisBroker::connect(&set.url("?namespace=sentinel-basics"))
        .await
        .unwrap();
    let (app, count) = counting_app(Arc::new(broker.clone()));
    app.send(&Count(Arc::clone(&count)), ()).await.unwrap();
    let master = redis::Client::open(format!("redis://127.0.0.1:{}/0", set.master_port())).unwrap();
    let mut conn = master.get_multiplexed_async_connection().await.unwrap();
    let queued: i64 = redis::cmd("LLEN")
        .arg(format!("sentinel-basics:{QUEUE}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(queued, 1, "the message is on the master the sentinels name");

    let wrong = set.url("").replace("/troupe/", "/nosuchmaster/");
    let err = RedisBroker::connect(&wrong).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, troupe_core::Error::Config(_)) && text.contains("nosuchmaster") && !text.contains('\n'),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_survives_a_redis_restart() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut server = redis_server(port, dir.path(), &[]);
    let options = RedisOptions::from_url(&format!("redis://127.0.0.1:{port}/0"))
        .unwrap()
        .heartbeat_timeout(Duration::from_secs(2))
        .maintenance_interval(Duration::from_millis(200));
    let broker = RedisBroker::open(options).await.unwrap();
    let (app, count) = counting_app(Arc::new(broker.clone()));
    let worker = Worker::builder(app.clone())
        .concurrency(2)
        .fetch_timeout(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    app.send(&Count(Arc::clone(&count)), ()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count.load(std::sync::atomic::Ordering::SeqCst) < 1 {
        assert!(Instant::now() < deadline, "processed before the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    server.kill().unwrap();
    server.wait().unwrap();
    // While Redis is down, sends fail with a connection error (not a panic, not a hang).
    let err = app.send(&Count(Arc::clone(&count)), ()).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut server = redis_server(port, dir.path(), &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let sent = loop {
        match app.send(&Count(Arc::clone(&count)), ()).await {
            Ok(sent) => break sent,
            Err(e) => {
                assert!(Instant::now() < deadline, "could not send after the restart: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while count.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the worker did not resume after the restart ({sent:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await;
    server.kill().unwrap();
    server.wait().unwrap();
}

#[tokio::test]
async fn passwords_never_appear_in_errors() {
    let port = free_port();
    let err = RedisBroker::connect(&format!("redis://:hunter2secret@127.0.0.1:{port}/0?connect_timeout=1s"))
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("hunter2secret"), "{text}");
    let options = RedisOptions::from_url("redis://:hunter2secret@127.0.0.1:1/0").unwrap();
    assert!(!format!("{options:?}").contains("hunter2secret"));
    assert!(err.to_string().contains("cannot connect to Redis"), "{err}");
    assert!(!err.to_string().contains('\n'));
}

/// Two producer processes race on the same unique messages; each is enqueued once and two
/// worker processes run each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_messages_across_processes() {
    let ns = format!("troupe-unique-{}", uuid::Uuid::new_v4().simple());
    troupe_test_suite::kill::unique_across_processes(&Redis::default(), &ns, QUEUE, 200).await;
}

/// Two processes share one `ConcurrentRateLimiter` (limit 1): no two holds overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_mutex_across_processes() {
    let ns = format!("troupe-coord-{}", uuid::Uuid::new_v4().simple());
    troupe_test_suite::kill::mutex_across_processes(&Redis::default(), &ns, "mutex", 40).await;
}

/// A group across a SIGKILL mid-group: every child runs, the completion callback once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_survives_a_sigkill_mid_group() {
    let ns = format!("troupe-coord-{}", uuid::Uuid::new_v4().simple());
    troupe_test_suite::kill::group_across_a_kill(&Redis::default(), &ns, "group", 200).await;
}

/// Two processes hammer a bucket limiter, then a window limiter: no second over the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_bucket_and_window_across_processes() {
    let ns = format!("troupe-coord-{}", uuid::Uuid::new_v4().simple());
    troupe_test_suite::kill::limits_across_processes(&Redis::default(), &ns, "limits").await;
}
