//! Faults on PostgreSQL: a worker SIGKILLed mid-batch loses nothing; a restart of the server
//! under a running worker is survived; bad URLs, a missing database and missing privileges are
//! one clear line each.
//!
//! The restart test restarts the machine's cluster with `pg_ctlcluster`; `.config/nextest.toml`
//! makes it run alone. The crash test runs this binary again as the worker
//! (`troupe_test_suite::kill`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use troupe_core::Broker;
use troupe_postgres::{PostgresBroker, PostgresOptions, PostgresStore};
use troupe_test_suite::chaos::{self, ChaosRounds, Fault};
use troupe_test_suite::kill::{self, FileRuns, KillBackend, MidBatchKill};
use troupe_test_suite::servers::{PgBouncer, PostgresNode, PostgresPair};
use troupe_test_suite::{COUNT_QUEUE, Count, counting_app};
use troupe_worker::Worker;

/// The queue of the [`Count`] actor.
const QUEUE: &str = COUNT_QUEUE;

fn url() -> String {
    std::env::var("TROUPE_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn options(schema: &str) -> PostgresOptions {
    // A chaos round's workers reach the server through its fault proxy.
    options_at(&chaos::behind_proxy(&url()), schema)
}

fn options_at(url: &str, schema: &str) -> PostgresOptions {
    let options = PostgresOptions::from_url(url).unwrap().schema(schema);
    if chaos::at_defaults() {
        return options;
    }
    // The crash test bounds its duplicates to the killed worker's prefetch window, so its lease
    // (3 s, renewed every 1 s) outlasts the pauses of a loaded CI machine: with 1 s, the live
    // worker's renewal once came late and its own claimed messages ran twice.
    let lease = if schema.starts_with(KILL_SCHEMA) { 3 } else { 1 };
    options
        .lease(Duration::from_secs(lease))
        .poll_interval(Duration::from_millis(50))
}

/// The schema prefix of the crash test (a longer lease, see `options`).
const KILL_SCHEMA: &str = "troupe_k_";

/// A schema (the place) with a 1 s lease (3 s for the crash test); runs are recorded in
/// `<temp dir>/<schema>.log`. On the machine's server (through the chaos proxy in a chaos
/// round's worker processes), or on `server` (a private one).
#[derive(Default)]
struct Postgres {
    server: Option<String>,
}

/// The environment variable that gives a chaos round's worker processes their URL when it is
/// not the machine's server (a primary and standby pair's).
const BROKER_URL: &str = "TROUPE_CHAOS_POSTGRES_URL";

impl Postgres {
    fn options(&self, schema: &str) -> PostgresOptions {
        match self.server.clone().or_else(|| std::env::var(BROKER_URL).ok()) {
            Some(url) => options_at(&url, schema),
            None => options(schema),
        }
    }
}

impl KillBackend for Postgres {
    type Broker = PostgresBroker;
    type Runs = FileRuns;
    const NAME: &'static str = "PostgreSQL";

    async fn open(&self, schema: &str) -> (PostgresBroker, FileRuns) {
        (
            PostgresBroker::open(self.options(schema)).await.unwrap(),
            FileRuns::temp(schema),
        )
    }

    async fn state(&self, schema: &str) -> Option<std::sync::Arc<dyn troupe_core::StateBackend>> {
        let store = PostgresStore::open(&self.options(schema)).await.unwrap();
        Some(troupe_postgres::PostgresState::from_store(store).into_dyn())
    }

    async fn results(&self, schema: &str) -> Option<std::sync::Arc<dyn troupe_core::ResultBackend>> {
        let store = PostgresStore::open(&self.options(schema)).await.unwrap();
        Some(troupe_postgres::PostgresResults::from_store(store).into_dyn())
    }
}

/// The worker process of the crash test.
#[test]
fn child() {
    kill::child(&Postgres::default());
}

fn schema() -> String {
    format!("troupe_t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_loses_nothing() {
    let schema = schema().replacen("troupe_t_", KILL_SCHEMA, 1);
    MidBatchKill::default().run(&Postgres::default(), &schema, QUEUE).await;
    FileRuns::temp(&schema).remove();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_mid_send_many_loses_no_confirmed_message() {
    let schema = schema();
    let report = kill::producer_kill(&Postgres::default(), &schema, QUEUE).await;
    // One transaction per call: the call cut short sent all of its messages or none.
    assert!(
        report.unconfirmed_ran.iter().all(|n| n % kill::PRODUCER_BATCH == 0),
        "a send_many call is all or nothing: {report:?}"
    );
    FileRuns::temp(&schema).remove();
}

/// Chaos rounds (`troupe_test_suite::chaos`): a worker SIGKILLed, the link cut, the link
/// stalled then cut or for good, each while two worker processes run a mix of messages that store results.
async fn chaos(fault: Fault, name: &str) {
    let schema = schema();
    let server = chaos::server_of(&url(), 5432).await;
    let report = ChaosRounds::new(fault)
        .run(&Postgres::default(), &schema, name, Some(server))
        .await;
    FileRuns::temp(&schema).remove();
    report.assert_nothing_lost();
}

troupe_test_suite::network_chaos_tests!(chaos);

/// Chaos rounds of a PostgreSQL crash: a private server stopped as a crash stops it
/// (`pg_ctl stop -m immediate`) and started again on its data (recovering from its WAL) while
/// two workers run. Nothing committed may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_server_restarted() {
    let node = Arc::new(PostgresNode::new());
    node.start();
    // The workers' URL is the machine's with the proxy's address: the same database name.
    let database = url()
        .rsplit_once('/')
        .map(|(_, db)| db.split('?').next().unwrap_or("test").to_owned())
        .unwrap();
    let admin = PgPool::connect(&node.url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{database}\"")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let url = format!("postgres://postgres@127.0.0.1:{}/{database}", node.port());
    let schema = schema();
    let restart = {
        let node = Arc::clone(&node);
        move || {
            node.kill();
            node.start();
        }
    };
    let report = ChaosRounds::new(Fault::RestartServer)
        .restart_with(restart)
        .run(
            &Postgres {
                server: Some(url.clone()),
            },
            &schema,
            "chaos-restart",
            Some(chaos::server_of(&url, node.port()).await),
        )
        .await;
    FileRuns::temp(&schema).remove();
    report.assert_nothing_lost();
}

/// Chaos rounds through PgBouncer in transaction mode (`pool_mode=transaction`, LISTEN over
/// `listen_url`): a PgBouncer of the test's own is killed (SIGKILL: every client and server
/// connection dropped at once) and started again while two workers run through it. Nothing
/// committed may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_pgbouncer_killed() {
    let bouncer = Arc::new(PgBouncer::new());
    bouncer.start();
    let direct = url().replace(':', "%3A").replace('/', "%2F").replace('@', "%40");
    let url = format!(
        "{}?pool_mode=transaction&listen_url={direct}",
        bouncer.url("transaction")
    );
    let schema = schema();
    let restart = {
        let bouncer = Arc::clone(&bouncer);
        move || {
            bouncer.kill();
            bouncer.start();
        }
    };
    let report = ChaosRounds::new(Fault::RestartServer)
        .named("PgBouncer (transaction pooling) killed and started again")
        .restart_with(restart)
        .child_env(BROKER_URL, url.clone())
        .run(&Postgres { server: Some(url) }, &schema, "chaos-pgbouncer", None)
        .await;
    FileRuns::temp(&schema).remove();
    report.assert_nothing_lost();
}

/// The database name of the machine's URL, for a private server the workers reach as they
/// reach the machine's.
fn database() -> String {
    url()
        .rsplit_once('/')
        .map(|(_, db)| db.split('?').next().unwrap_or("test").to_owned())
        .unwrap()
}

/// Chaos rounds of a PostgreSQL failover: a primary and its synchronous standby of the test's
/// own; each round kills the primary as a crash does and promotes the standby while two
/// workers run, their URL naming both servers with `target_session_attrs=read-write`; after
/// the round the killed node is rebuilt as the new primary's standby. Nothing committed may be
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_primary_failed_over() {
    let pair = Arc::new(PostgresPair::start(&database()));
    let url = pair.url("?target_session_attrs=read-write");
    let schema = schema();
    let fail_over = {
        let pair = Arc::clone(&pair);
        move || pair.fail_over()
    };
    let rebuild = {
        let pair = Arc::clone(&pair);
        move || pair.rebuild_standby()
    };
    let report = ChaosRounds::new(Fault::RestartServer)
        .named("primary killed, standby promoted")
        .restart_with(fail_over)
        .after_round(rebuild)
        .child_env(BROKER_URL, url.clone())
        .run(&Postgres { server: Some(url) }, &schema, "chaos-failover", None)
        .await;
    FileRuns::temp(&schema).remove();
    report.assert_nothing_lost();
}

/// A producer sending one message at a time to a URL naming a standby first and the primary
/// second: it uses the primary, its sends fail with transient errors while the primary is
/// killed and the standby promoted, then go to the promoted standby. Every confirmed send is
/// there (synchronous replication).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_follows_a_promoted_standby() {
    let pair = Arc::new(PostgresPair::start(&database()));
    let schema = schema();
    let broker = PostgresBroker::open(
        PostgresOptions::from_url(&pair.url("?target_session_attrs=read-write&connect_timeout=2s"))
            .unwrap()
            .schema(&schema),
    )
    .await
    .unwrap();
    let (app, count) = counting_app(Arc::new(broker.clone()));
    let send = move || {
        let (app, count) = (app.clone(), Arc::clone(&count));
        async move { Ok(app.send(&Count(count), ()).await?.message().message_id.clone()) }
    };
    let failing = Arc::clone(&pair);
    let sends = chaos::produce_through(send, move || failing.fail_over(), Duration::from_secs(4)).await;
    let lost = sends.missing_from(&broker, QUEUE).await;
    eprintln!(
        "POSTGRES failover producer | sent {} | lost {lost} | no send confirmed for {:?} | last failed send {:?} after the kill | failover took {:?}",
        sends.confirmed.len(),
        sends.longest_gap,
        sends.last_failure,
        sends.fault_took
    );
    assert_eq!(lost, 0, "confirmed sends missing on the promoted standby");
    assert!(
        sends.since_failure > 0,
        "sends went on after the failover: none was confirmed after the last failed one"
    );
    // A send may fail (its connection died under it) or wait (its pool reconnecting, until
    // the pools move to the promoted standby): either way the producer went on within 3 s.
    assert!(
        sends.longest_gap >= sends.fault_took && sends.longest_gap < sends.fault_took + Duration::from_secs(3),
        "the producer met the failover and sent again within 3 s of its end: no send confirmed for {:?}, failover took {:?}",
        sends.longest_gap,
        sends.fault_took
    );
    let e = PostgresBroker::open(
        PostgresOptions::from_url(&format!(
            "postgres://postgres@127.0.0.1:{}/{}?target_session_attrs=read-write&connect_timeout=2s",
            pair.primary().port(),
            database()
        ))
        .unwrap()
        .schema(&schema),
    )
    .await;
    assert!(e.is_ok(), "the promoted standby is a primary: {:?}", e.err());
    broker.close().await.unwrap();
}

/// A URL naming a standby before the primary: with `target_session_attrs=read-write` Troupe
/// uses the primary; with no server that fits, one line names what each said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_urls_use_the_server_that_accepts_writes() {
    let pair = PostgresPair::start(&database());
    let standby_port = pair.standby().port();
    let url = format!(
        "postgres://postgres@127.0.0.1:{standby_port},127.0.0.1:{}/{}?target_session_attrs=read-write",
        pair.primary().port(),
        database()
    );
    let schema = schema();
    let broker = PostgresBroker::open(PostgresOptions::from_url(&url).unwrap().schema(&schema))
        .await
        .unwrap();
    let (app, count) = counting_app(Arc::new(broker.clone()));
    app.send(&Count(Arc::clone(&count)), ()).await.unwrap();
    let on_primary = pair.primary().sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'troupe' AND datname = '{}'",
        database()
    ));
    assert_ne!(on_primary, "0", "Troupe's connections are on the primary");
    broker.close().await.unwrap();

    let only_standby = format!(
        "postgres://postgres:s3cret@127.0.0.1:{standby_port},127.0.0.1:{}/{}?target_session_attrs=read-write&connect_timeout=2s",
        troupe_test_suite::servers::free_port(),
        database()
    );
    let e = PostgresBroker::connect(&only_standby).await.unwrap_err();
    let text = one_line(&e);
    assert!(
        text.contains("read-only") && text.contains("target_session_attrs=read-write") && !text.contains("s3cret"),
        "{text}"
    );
    assert!(
        e.is_transient(),
        "no primary yet is a connection error (a failover may be under way): {text}"
    );
}

fn pg_ctlcluster(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("the machine's PostgreSQL cluster (/etc/postgresql)")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .expect("a cluster version");
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", action])
        .status()
        .unwrap();
    assert!(status.success(), "pg_ctlcluster {action} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_survives_a_restart_of_the_shared_server() {
    let schema = schema();
    let broker = PostgresBroker::open(options(&schema)).await.unwrap();
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
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pg_ctlcluster("restart");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match app.send(&Count(Arc::clone(&count)), ()).await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "could not send after the restart: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while count.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the worker did not resume after the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing is lost: whatever the restart interrupted (a claim, an ack, a send whose reply was
    // lost) comes back and runs; the queue drains.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = broker.stats(QUEUE).await.unwrap();
        if stats.pending() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "messages left after the restart: {stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop().await;
}

fn one_line(e: &troupe_core::Error) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "{s}");
    s
}

#[tokio::test]
async fn bad_urls_missing_databases_and_privileges_are_one_clear_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = PostgresBroker::connect(&format!(
        "postgres://postgres:s3cret@127.0.0.1:{port}/test?connect_timeout=2s"
    ))
    .await
    .unwrap_err();
    let text = one_line(&e);
    assert!(
        text.contains("cannot use PostgreSQL") && !text.contains("s3cret"),
        "{text}"
    );
    assert!(e.is_transient(), "an unreachable server is a connection error: {text}");

    let e = PostgresBroker::connect("postgres://postgres@127.0.0.1:5432/troupe_no_such_db")
        .await
        .unwrap_err();
    let text = one_line(&e);
    assert!(text.contains("does not exist") && text.contains("createdb"), "{text}");

    let admin = PgPool::connect(&url()).await.unwrap();
    let _ = sqlx::query("CREATE ROLE troupe_limited LOGIN").execute(&admin).await;
    let limited = url().replacen("postgres@", "troupe_limited@", 1);
    let e = PostgresBroker::connect(&format!("{limited}?schema={}", schema()))
        .await
        .unwrap_err();
    let text = one_line(&e);
    assert!(
        text.contains("permission denied") && text.contains("privilege"),
        "{text}"
    );

    let e = PostgresBroker::connect("postgres://h/db?lease=soon").await.unwrap_err();
    assert!(one_line(&e).contains("lease"), "{e}");
}

/// Two producer processes race on the same unique messages; each is enqueued once and two
/// worker processes run each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_messages_across_processes() {
    let schema = schema();
    troupe_test_suite::kill::unique_across_processes(&Postgres::default(), &schema, QUEUE, 200).await;
    FileRuns::temp(&schema).remove();
}

/// Two processes share one `ConcurrentRateLimiter` (limit 1): no two holds overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_mutex_across_processes() {
    let schema = schema();
    troupe_test_suite::kill::mutex_across_processes(&Postgres::default(), &schema, "mutex", 40).await;
    FileRuns::temp(&schema).remove();
}

/// A group across a SIGKILL mid-group: every child runs, the completion callback once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_survives_a_sigkill_mid_group() {
    let schema = schema();
    troupe_test_suite::kill::group_across_a_kill(&Postgres::default(), &schema, "group", 200).await;
    FileRuns::temp(&schema).remove();
}

/// Two processes hammer a bucket limiter, then a window limiter: no second over the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_bucket_and_window_across_processes() {
    let schema = schema();
    troupe_test_suite::kill::limits_across_processes(&Postgres::default(), &schema, "limits").await;
    FileRuns::temp(&schema).remove();
}
