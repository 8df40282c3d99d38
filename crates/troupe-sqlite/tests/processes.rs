//! Several real processes on one database file: workers killed with SIGKILL mid-batch lose
//! nothing, and workers and producers in separate processes share the file without "database is
//! locked" errors.
//!
//! The test binary runs itself as the child processes (`troupe_test_suite::kill`), filtered to
//! the `child` test.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{Row, SqlitePool};
use troupe_core::{ActorError, Broker};
use troupe_sqlite::{SqliteBroker, SqliteOptions};
use troupe_test_suite::chaos::{self, ChaosRounds, Fault};
use troupe_test_suite::kill::{self, KillBackend, MidBatchKill, Role, Runs};
use troupe_worker::WorkerBuilder;

const QUEUE: &str = "crash";

/// Runs recorded in the `processed` table, with the pid of the process that ran them.
struct Processed(SqlitePool);

impl Runs for Processed {
    async fn prepare(&self) {
        sqlx::query("CREATE TABLE processed (n INTEGER NOT NULL, pid INTEGER NOT NULL)")
            .execute(&self.0)
            .await
            .unwrap();
    }

    async fn record(&self, n: u64) -> Result<(), ActorError> {
        sqlx::query("INSERT INTO processed (n, pid) VALUES (?1, ?2)")
            .bind(i64::try_from(n).unwrap_or(-1))
            .bind(i64::from(std::process::id()))
            .execute(&self.0)
            .await?;
        Ok(())
    }

    async fn counts(&self) -> HashMap<u64, u64> {
        let ns: Vec<i64> = sqlx::query_scalar("SELECT n FROM processed")
            .fetch_all(&self.0)
            .await
            .unwrap();
        kill::tally(ns.into_iter().map(|n| n.try_into().unwrap()))
    }
}

/// A database file (the place) with a 1 s lease; the child's worker fetches for 200 ms at most.
struct Sqlite;

impl KillBackend for Sqlite {
    type Broker = SqliteBroker;
    type Runs = Processed;
    const NAME: &'static str = "SQLite";

    async fn open(&self, path: &str) -> (SqliteBroker, Processed) {
        let options = if chaos::at_defaults() {
            SqliteOptions::new(path)
        } else {
            SqliteOptions::new(path).lease(Duration::from_secs(1))
        };
        let broker = SqliteBroker::open(options).await.expect("open");
        let runs = Processed(broker.pool().clone());
        (broker, runs)
    }

    fn worker(&self, builder: WorkerBuilder) -> WorkerBuilder {
        builder.fetch_timeout(Duration::from_millis(200))
    }

    async fn state(&self, path: &str) -> Option<std::sync::Arc<dyn troupe_core::StateBackend>> {
        let pool = troupe_sqlite::open(&SqliteOptions::new(path)).await.expect("open");
        Some(troupe_sqlite::SqliteState::from_pool(pool).into_dyn())
    }

    async fn results(&self, path: &str) -> Option<std::sync::Arc<dyn troupe_core::ResultBackend>> {
        let pool = troupe_sqlite::open(&SqliteOptions::new(path)).await.expect("open");
        Some(troupe_sqlite::SqliteResults::from_pool(pool).into_dyn())
    }
}

/// The child processes: workers that run until killed, and producers.
#[test]
fn child() {
    kill::child(&Sqlite);
}

fn db() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("troupe.db").to_string_lossy().into_owned();
    (dir, path)
}

/// Unmounts a filesystem the test mounted (lazily, whatever still has it open).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The disk under SQLite fills up under load (a 32 MiB tmpfs this test mounts; mounting needs
/// root, as on the project's machines and CI): sends fail with a one-line error while it is
/// full, the worker process keeps running, and once space is freed every confirmed message runs
/// and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_sends_clearly_and_loses_nothing() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("small");
    std::fs::create_dir(&mount).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(&mount)
        .status()
        .expect("mount must be installed");
    assert!(
        status.success(),
        "mounting a 32 MiB tmpfs needs root (the project's machines and CI run as root)"
    );
    let _unmount = Unmount(mount.clone());
    let path = mount.join("troupe.db").to_string_lossy().into_owned();
    let (broker, runs) = Sqlite.open(&path).await;
    runs.prepare().await;
    let runs = std::sync::Arc::new(runs);
    let record = kill::Record::new(QUEUE, std::sync::Arc::clone(&runs));
    let app = troupe_core::App::builder(std::sync::Arc::new(broker.clone()))
        .actor(record.clone())
        .build()
        .unwrap();
    app.declare_queue(QUEUE).await.unwrap();
    let mut worker = kill::spawn(&Role::Worker, &path, QUEUE);
    // Under load: a backlog the worker is still working through when the disk fills.
    let mut confirmed: Vec<u64> = Vec::new();
    for n in 0..2_000 {
        app.send(&record, (n,)).await.expect("a send before the disk fills");
        confirmed.push(n);
    }

    // Take all but 256 KiB of the space.
    let filler = mount.join("filler");
    {
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0_u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let len = file.metadata().unwrap().len();
        file.set_len(len.saturating_sub(256 * 1024)).unwrap();
    }

    let mut refused = None;
    for n in 2_000..100_000 {
        match app.send(&record, (n,)).await {
            Ok(_) => confirmed.push(n),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("the disk filled up").to_string();
    eprintln!("full: {err}");
    assert!(err.contains("full"), "{err}");
    assert!(!err.contains('\n'), "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(worker.is_running(), "the worker survives a full disk: {}", worker.log());

    // Space freed: sends succeed again, and everything confirmed runs.
    std::fs::remove_file(&filler).unwrap();
    let first_after = confirmed.len() as u64 + 1_000_000;
    for n in first_after..first_after + 100 {
        app.send(&record, (n,)).await.expect("a send once space was freed");
        confirmed.push(n);
    }
    let done = kill::wait_runs(runs.as_ref(), confirmed.len(), Duration::from_secs(60)).await;
    let lost: Vec<u64> = confirmed.iter().copied().filter(|n| !done.contains_key(n)).collect();
    let duplicates: u64 = done.values().map(|c| c - 1).sum();
    assert!(worker.is_running(), "the worker kept running: {}", worker.log());
    let log = worker.log();
    worker.kill();
    assert!(
        log.contains("disk is full"),
        "the worker met the full disk (else this test proved nothing): {log}"
    );
    let dead = broker.dead_letters(QUEUE, 100).await.unwrap();
    eprintln!(
        "CHAOS SQLite | disk full, then freed | messages {} (confirmed) | lost {} | duplicates {duplicates} | dead-lettered {}",
        confirmed.len(),
        lost.len(),
        dead.len()
    );
    assert!(
        lost.is_empty(),
        "confirmed sends lost: {lost:?}; the worker said:\n{log}\nthe queue: {:?}",
        broker.stats(QUEUE).await
    );
    assert!(
        dead.is_empty(),
        "nothing is dead-lettered for a full disk: {:?}",
        dead.iter().map(|d| &d.reason).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_mid_send_many_loses_no_confirmed_message() {
    let (_dir, path) = db();
    let report = kill::producer_kill(&Sqlite, &path, QUEUE).await;
    // One transaction per call: the call cut short sent all of its messages or none.
    assert!(
        report.unconfirmed_ran.iter().all(|n| n % kill::PRODUCER_BATCH == 0),
        "a send_many call is all or nothing: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_loses_nothing() {
    let (_dir, path) = db();
    let report = MidBatchKill::default().while_holding().run(&Sqlite, &path, QUEUE).await;
    assert!(
        report.stats_at_kill.in_flight > 0 || report.at_kill == usize::try_from(report.messages).unwrap(),
        "the kill came mid-batch: {:?}",
        report.stats_at_kill
    );
    let stats = report.broker.stats(QUEUE).await.unwrap();
    assert_eq!((stats.pending(), stats.dead), (0, 0), "{stats:?}");
    assert!(!report.log.contains("locked"), "{}", report.log);
}

/// Chaos rounds (`troupe_test_suite::chaos`): one of two worker processes SIGKILLed while they
/// run a mix of messages that store results (a file has no link to cut).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigkill_a_worker() {
    let (_dir, path) = db();
    ChaosRounds::new(Fault::KillWorker)
        .run(&Sqlite, &path, "chaos-kill", None)
        .await
        .assert_nothing_lost();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_producers_in_separate_processes_share_the_file() {
    let (_dir, path) = db();
    let (broker, runs) = Sqlite.open(&path).await;
    runs.prepare().await;
    let workers: Vec<kill::Spawned> = (0..2).map(|_| kill::spawn(&Role::Worker, &path, QUEUE)).collect();
    let producers: Vec<kill::Spawned> = (0..2)
        .map(|i| kill::spawn(&Role::Producer(i * 250..(i + 1) * 250), &path, QUEUE))
        .collect();
    for mut p in producers {
        let status = p.wait();
        assert!(status.success(), "producer failed: {}", p.log());
    }
    let done = kill::wait_runs(&runs, 500, Duration::from_secs(60)).await;
    let mut logs = String::new();
    for mut w in workers {
        w.kill();
        logs.push_str(&w.log());
    }
    assert_eq!(done.len(), 500, "every message ran");
    assert!(
        done.values().all(|c| *c == 1),
        "without crashes every message runs exactly once"
    );
    assert!(!logs.contains("locked") && !logs.contains("busy"), "{logs}");
    let by_pid: std::collections::HashSet<i64> = sqlx::query("SELECT DISTINCT pid FROM processed")
        .fetch_all(broker.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<i64, _>(0))
        .collect();
    assert_eq!(by_pid.len(), 2, "both worker processes took work");
}

/// Two producer processes race on the same unique messages; each is enqueued once and two
/// worker processes run each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_messages_across_processes() {
    let (_dir, path) = db();
    kill::unique_across_processes(&Sqlite, &path, "unique", 200).await;
}

/// Two processes share one `ConcurrentRateLimiter` (limit 1): no two holds overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_mutex_across_processes() {
    let (_dir, path) = db();
    kill::mutex_across_processes(&Sqlite, &path, "mutex", 40).await;
}

/// A group across a SIGKILL mid-group: every child runs, the completion callback once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_survives_a_sigkill_mid_group() {
    let (_dir, path) = db();
    kill::group_across_a_kill(&Sqlite, &path, "group", 200).await;
}

/// Two processes hammer a bucket limiter, then a window limiter: no second over the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_bucket_and_window_across_processes() {
    let (_dir, path) = db();
    kill::limits_across_processes(&Sqlite, &path, "limits").await;
}
