//! Several real processes on one database file: workers killed with SIGKILL mid-batch lose
//! nothing, and workers and producers in separate processes share the file without "database is
//! locked" errors.
//!
//! The test binary runs itself as the child processes (`TROUPE_SQLITE_ROLE`), filtered to the
//! `child` test.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlx::{Row, SqlitePool};
use troupe_core::{Actor, ActorError, ActorOptions, App, Broker};
use troupe_sqlite::{SqliteBroker, SqliteOptions};
use troupe_worker::Worker;

const QUEUE: &str = "crash";
static POOL: OnceLock<SqlitePool> = OnceLock::new();

/// Records each run in the `processed` table, after a short pause.
struct Record;

impl Actor for Record {
    type Args = (u64,);
    type Output = ();
    fn name(&self) -> &str {
        "record"
    }
    fn arg_names(&self) -> &[&str] {
        &["n"]
    }
    fn options(&self) -> ActorOptions {
        ActorOptions::new().queue_name(QUEUE)
    }
    async fn call(&self, (n,): (u64,)) -> Result<(), ActorError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let pool = POOL.get().ok_or_else(|| ActorError::msg("no pool"))?;
        sqlx::query("INSERT INTO processed (n, pid) VALUES (?1, ?2)")
            .bind(i64::try_from(n).unwrap_or(-1))
            .bind(i64::from(std::process::id()))
            .execute(pool)
            .await?;
        Ok(())
    }
}

fn options(path: &Path) -> SqliteOptions {
    SqliteOptions::new(path).lease(Duration::from_secs(1))
}

async fn app(path: &Path) -> (SqliteBroker, App) {
    let broker = SqliteBroker::open(options(path)).await.expect("open");
    let _ = POOL.set(broker.pool().clone());
    let app = App::builder(Arc::new(broker.clone()))
        .actor(Record)
        .build()
        .expect("app");
    (broker, app)
}

/// The child processes: a worker (`worker`) that runs until killed, or a producer
/// (`producer`) that enqueues `TROUPE_SQLITE_FROM..TROUPE_SQLITE_TO` and exits.
#[test]
fn child() {
    let Ok(role) = std::env::var("TROUPE_SQLITE_ROLE") else {
        return;
    };
    let path = std::path::PathBuf::from(std::env::var("TROUPE_SQLITE_DB").unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let (_broker, app) = app(&path).await;
        match role.as_str() {
            "worker" => {
                let _worker = Worker::builder(app)
                    .concurrency(4)
                    .fetch_timeout(Duration::from_millis(200))
                    .start()
                    .await
                    .expect("worker");
                eprintln!("child: worker started");
                std::future::pending::<()>().await;
            }
            "producer" => {
                let from: u64 = std::env::var("TROUPE_SQLITE_FROM").unwrap().parse().unwrap();
                let to: u64 = std::env::var("TROUPE_SQLITE_TO").unwrap().parse().unwrap();
                for n in from..to {
                    app.send(&Record, (n,)).await.expect("enqueue");
                }
                eprintln!("child: produced {from}..{to}");
            }
            other => panic!("unknown role {other}"),
        }
    });
}

struct Spawned {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

fn spawn(role: &str, db: &Path, env: &[(&str, String)]) -> Spawned {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child", "--exact", "--nocapture", "--test-threads", "1"])
        .env("TROUPE_SQLITE_ROLE", role)
        .env("TROUPE_SQLITE_DB", db)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Spawned { child, log }
}

async fn counts(pool: &SqlitePool) -> HashMap<i64, i64> {
    sqlx::query("SELECT n, COUNT(*) FROM processed GROUP BY n")
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1)))
        .collect()
}

async fn wait_for(pool: &SqlitePool, distinct: usize, timeout: Duration) -> HashMap<i64, i64> {
    let deadline = Instant::now() + timeout;
    loop {
        let c = counts(pool).await;
        if c.len() >= distinct || Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn setup() -> (tempfile::TempDir, std::path::PathBuf, SqliteBroker, App) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("troupe.db");
    let (broker, app) = app(&path).await;
    sqlx::query("CREATE TABLE processed (n INTEGER NOT NULL, pid INTEGER NOT NULL)")
        .execute(broker.pool())
        .await
        .unwrap();
    (dir, path, broker, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_loses_nothing() {
    const N: u64 = 300;
    let (_dir, path, broker, app) = setup().await;
    for n in 0..N {
        app.send(&Record, (n,)).await.unwrap();
    }
    let mut first = spawn("worker", &path, &[]);
    let before = wait_for(broker.pool(), 60, Duration::from_secs(30)).await;
    assert!(
        before.len() >= 60,
        "the first worker processed {} messages",
        before.len()
    );
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    let at_kill = counts(broker.pool()).await.len();
    let stats = broker.stats(QUEUE).await.unwrap();
    assert!(
        stats.in_flight > 0 || at_kill == usize::try_from(N).unwrap(),
        "the kill came mid-batch: {stats:?}"
    );

    let mut second = spawn("worker", &path, &[]);
    let done = wait_for(broker.pool(), usize::try_from(N).unwrap(), Duration::from_secs(60)).await;
    second.child.kill().unwrap();
    second.child.wait().unwrap();

    let missing: Vec<u64> = (0..N)
        .filter(|n| !done.contains_key(&i64::try_from(*n).unwrap()))
        .collect();
    assert!(missing.is_empty(), "lost messages: {missing:?}");
    let duplicates: i64 = done.values().map(|c| c - 1).sum();
    eprintln!(
        "SIGKILL crash test: {N} messages, {at_kill} processed before the kill, {duplicates} processed twice, none lost"
    );
    // Only what the killed worker held (at most its prefetch window of 8) can run twice.
    assert!(duplicates <= 8, "{duplicates} duplicates");
    let stats = broker.stats(QUEUE).await.unwrap();
    assert_eq!((stats.pending(), stats.dead), (0, 0), "{stats:?}");
    let log = first.log.lock().unwrap().join("\n") + &second.log.lock().unwrap().join("\n");
    assert!(!log.contains("locked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_producers_in_separate_processes_share_the_file() {
    let (_dir, path, broker, _app) = setup().await;
    let workers: Vec<Spawned> = (0..2).map(|_| spawn("worker", &path, &[])).collect();
    let producers: Vec<Spawned> = (0..2)
        .map(|i| {
            spawn(
                "producer",
                &path,
                &[
                    ("TROUPE_SQLITE_FROM", (i * 250).to_string()),
                    ("TROUPE_SQLITE_TO", ((i + 1) * 250).to_string()),
                ],
            )
        })
        .collect();
    for mut p in producers {
        let status = p.child.wait().unwrap();
        assert!(
            status.success(),
            "producer failed: {}",
            p.log.lock().unwrap().join("\n")
        );
    }
    let done = wait_for(broker.pool(), 500, Duration::from_secs(60)).await;
    let mut logs = String::new();
    for mut w in workers {
        w.child.kill().unwrap();
        w.child.wait().unwrap();
        logs.push_str(&w.log.lock().unwrap().join("\n"));
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
