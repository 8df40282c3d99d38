//! The dashboard in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`; `scripts/test` installs them) driven over WebDriver, against real
//! brokers (SQLite, Redis, PostgreSQL, RabbitMQ with Redis state). Each test keeps a screenshot
//! of the page it checked in `artifacts/screenshots/` (or `$TROUPE_ARTIFACTS`). A missing
//! browser or server fails the tests; it never skips them.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use troupe::prelude::*;
use troupe::{ActorError, ActorOptions, TaskTracking};
use troupe_dashboard::{Dashboard, DashboardServer};

const WAIT: Duration = Duration::from_secs(20);

/// A chromedriver and a headless Chromium session; both end when dropped.
struct Browser {
    client: Client,
    driver: Child,
}

impl Browser {
    async fn start() -> Self {
        // A loaded machine (a cold build beside the tests) can keep Chromium from answering in
        // time ("chrome not reachable"): a new driver and browser are tried twice more.
        let mut attempt = 1;
        loop {
            match Self::try_start().await {
                Ok(browser) => return browser,
                Err(e) if attempt < 3 => {
                    eprintln!("starting Chromium failed (attempt {attempt}): {e}; trying again");
                    attempt += 1;
                }
                Err(e) => panic!("a Chromium session: {e}"),
            }
        }
    }

    async fn try_start() -> Result<Self, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver must be installed (apt-get install chromium chromium-driver; scripts/test does it)");
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() >= deadline {
                let _ = driver.kill();
                let _ = driver.wait();
                return Err("chromedriver did not start".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]}),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => Ok(Self { client, driver }),
            Err(e) => {
                let _ = driver.kill();
                let _ = driver.wait();
                Err(e.to_string())
            }
        }
    }

    /// Saves a screenshot of the current page as `name`.png.
    async fn screenshot(&self, name: &str) {
        let dir = std::env::var("TROUPE_ARTIFACTS").map_or_else(
            |_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../artifacts/screenshots"),
            |d| std::path::PathBuf::from(d).join("screenshots"),
        );
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .text()
            .await
            .unwrap()
    }

    /// Waits until `css` matches an element whose text `check` accepts, without reloading (the
    /// page's live refresh brings changes in).
    async fn wait_text(&self, css: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(el) = self.client.find(Locator::Css(css)).await
                && let Ok(text) = el.text().await
                && check(&text)
            {
                return text;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what} ({css})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn redis_url() -> String {
    std::env::var("TROUPE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Broker and state URLs for `backend`, isolated per test; the temporary directory lives as
/// long as the test.
fn urls(backend: &str) -> (String, String, Option<tempfile::TempDir>) {
    let ns = format!("troupe-dash-{}", uuid::Uuid::new_v4().simple());
    match backend {
        "sqlite" => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("dash.db").display());
            (url.clone(), url, Some(dir))
        }
        "redis" => {
            let url = format!("{}?namespace={ns}", redis_url());
            (url.clone(), url, None)
        }
        "postgres" => {
            let url = std::env::var("TROUPE_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
            let url = format!("{url}?schema=troupe_dash");
            (url.clone(), url, None)
        }
        "rabbitmq" => {
            let url =
                std::env::var("TROUPE_RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
            (url, format!("{}?namespace={ns}", redis_url()), None)
        }
        other => panic!("no backend {other}"),
    }
}

fn unique_queue() -> String {
    format!("dash_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// An actor on a queue of the test's: "fail-once" fails its first run, "always" always fails,
/// "sleep" waits a minute (until cancelled), anything else succeeds.
#[derive(Clone)]
struct Job {
    queue: String,
    runs: Arc<AtomicUsize>,
    failed_once: Arc<AtomicUsize>,
}

impl Job {
    fn new(queue: &str) -> Self {
        Self {
            queue: queue.to_owned(),
            runs: Arc::default(),
            failed_once: Arc::default(),
        }
    }
}

impl Actor for Job {
    type Args = (Value,);
    type Output = ();

    fn name(&self) -> &str {
        "job"
    }

    fn options(&self) -> ActorOptions {
        let mut o = ActorOptions::new();
        o.queue_name = self.queue.clone();
        o.max_retries = Some(0);
        o
    }

    async fn call(&self, (arg,): (Value,)) -> Result<(), ActorError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        match arg.as_str() {
            Some("fail-once") if self.failed_once.fetch_add(1, Ordering::SeqCst) == 0 => {
                Err(ActorError::new("Refused", "refused the first time"))
            }
            Some("always") => Err(ActorError::new("Refused", "always refused")),
            Some("sleep") => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

struct Setup {
    app: App,
    job: Job,
    queue: String,
    server: DashboardServer,
    _dir: Option<tempfile::TempDir>,
}

impl Setup {
    async fn new(backend: &str) -> Self {
        let (broker_url, state_url, dir) = urls(backend);
        let queue = unique_queue();
        let job = Job::new(&queue);
        let app = App::builder(troupe::connect(&broker_url).await.unwrap())
            .state(troupe::connect_state(&state_url).await.unwrap())
            .track_tasks(TaskTracking::default())
            .actor(job.clone())
            .build()
            .unwrap();
        app.declare_queue(&queue).await.unwrap();
        let server = Dashboard::new(app.clone())
            .start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Self {
            app,
            job,
            queue,
            server,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.local_addr())
    }

    async fn worker(&self) -> troupe::worker::WorkerHandle {
        Worker::builder(self.app.clone())
            .concurrency(2)
            .fetch_timeout(Duration::from_millis(200))
            .heartbeat(Duration::from_millis(500))
            .shutdown_timeout(Duration::from_secs(5))
            .start()
            .await
            .unwrap()
    }
}

/// The overview shows the counts the broker reports.
async fn overview_shows_the_broker_counts(backend: &str) {
    let s = Setup::new(backend).await;
    for i in 0..3 {
        s.app.send(&s.job, (json!(i),)).await.unwrap();
    }
    for i in 0..2 {
        s.app
            .send_with_options(&s.job, (json!(i),), SendOptions::new().delay(Duration::from_secs(3600)))
            .await
            .unwrap();
    }
    let stats = s.app.broker().stats(&s.queue).await.unwrap();
    assert_eq!((stats.ready, stats.delayed), (3, 2));
    let browser = Browser::start().await;
    browser.client.goto(&s.url("/")).await.unwrap();
    let row = format!("tr[data-queue='{}']", s.queue);
    assert_eq!(browser.text(&format!("{row} .ready")).await, stats.ready.to_string());
    assert_eq!(
        browser.text(&format!("{row} .delayed")).await,
        stats.delayed.to_string()
    );
    assert_eq!(browser.text(&format!("{row} .dead")).await, stats.dead.to_string());
    browser.screenshot(&format!("overview-{backend}")).await;
    // The queue's page lists its ready messages, and its delayed ones with their eta.
    browser
        .client
        .goto(&s.url(&format!("/queues/{}", s.queue)))
        .await
        .unwrap();
    assert_eq!(
        browser
            .client
            .find_all(Locator::Css("#messages tbody tr"))
            .await
            .unwrap()
            .len(),
        3
    );
    browser
        .client
        .goto(&s.url(&format!("/queues/{}?state=delayed", s.queue)))
        .await
        .unwrap();
    let delayed = browser.text("#messages tbody").await;
    assert_eq!(delayed.lines().count(), 2, "{delayed}");
    assert!(delayed.contains("UTC") && delayed.contains("in "), "etas: {delayed}");
    browser.screenshot(&format!("queue-delayed-{backend}")).await;
    // Rate limiters and group barriers, from the state backend.
    let state = s.app.state().unwrap();
    let limiter = format!("{}-limiter", s.queue);
    let barrier = format!("{}-barrier", s.queue);
    let lease = Duration::from_secs(60);
    assert!(state.acquire_slot(&limiter, "holder-1", 2, lease).await.unwrap());
    assert!(state.add(&barrier, 3, lease).await.unwrap());
    state.arrive(&barrier, "child-1", "ok", lease).await.unwrap();
    browser.client.goto(&s.url("/coordination")).await.unwrap();
    let slots = browser.text("#slots").await;
    assert!(slots.contains(&limiter) && slots.contains("holder-1"), "{slots}");
    let barriers = browser.text("#barriers").await;
    assert!(barriers.contains(&format!("{barrier} 1 not yet")), "{barriers}");
    browser.screenshot(&format!("coordination-{backend}")).await;
    state.release_slot(&limiter, "holder-1", lease).await.unwrap();
}

/// A dead letter appears on the open dead-letters page while a worker runs; requeued from the
/// page, it succeeds.
async fn a_dead_letter_appears_and_is_requeued_from_the_page(backend: &str) {
    let s = Setup::new(backend).await;
    let worker = s.worker().await;
    let browser = Browser::start().await;
    browser
        .client
        .goto(&s.url(&format!("/dead?queue={}", s.queue)))
        .await
        .unwrap();
    assert!(browser.text("#letters").await.contains("No dead letters"));
    let sent = s.app.send(&s.job, (json!("fail-once"),)).await.unwrap();
    let id = sent.message_id().to_owned();
    let row = format!("tr.letter[data-id='{id}']");
    let text = browser
        .wait_text(&row, "the dead letter to appear", |t| {
            t.contains("refused the first time")
        })
        .await;
    assert!(text.contains("job"), "{text}");
    browser.screenshot(&format!("dead-letter-{backend}")).await;
    browser
        .client
        .find(Locator::Css(&format!("{row} input[type=checkbox]")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .client
        .find(Locator::Css("#requeue-selected"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait_text("#done", "the requeue's report", |t| t == "requeued 1")
        .await;
    let deadline = Instant::now() + WAIT;
    while s.job.runs.load(Ordering::SeqCst) < 2 || s.app.broker().stats(&s.queue).await.unwrap().pending() > 0 {
        assert!(Instant::now() < deadline, "the requeued message ran again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let task = s.app.task(&id).await.unwrap().unwrap();
    assert_eq!(task.status, TaskStatus::Succeeded);
    assert_eq!(s.app.broker().stats(&s.queue).await.unwrap().dead, 0);
    browser
        .wait_text("#letters", "the dead letters to empty", |t| {
            t.contains("No dead letters")
        })
        .await;
    // The overview's chart counts the last hour from the worker's heartbeats: two runs, one of
    // them dead-lettered.
    let sum = "return Array.from(document.querySelectorAll('#throughput title')).reduce((acc, t) => { \
               const m = t.textContent.match(/(\\d+) processed, (\\d+) failed/); \
               return [acc[0] + Number(m[1]), acc[1] + Number(m[2])]; }, [0, 0]);";
    let deadline = Instant::now() + WAIT;
    loop {
        browser.client.goto(&s.url("/")).await.unwrap();
        let counted = browser.client.execute(sum, vec![]).await.unwrap();
        if counted == json!([2, 1]) {
            break;
        }
        assert!(Instant::now() < deadline, "the chart counts what ran: {counted}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    browser.screenshot(&format!("overview-busy-{backend}")).await;
    worker.stop().await;
}

/// A running task is cancelled from its page: the worker stops it and the page says so.
async fn a_running_task_is_cancelled_from_its_page(backend: &str) {
    let s = Setup::new(backend).await;
    let worker = s.worker().await;
    let sent = s.app.send(&s.job, (json!("sleep"),)).await.unwrap();
    let id = sent.message_id().to_owned();
    let deadline = Instant::now() + WAIT;
    while s
        .app
        .task(&id)
        .await
        .unwrap()
        .is_none_or(|t| t.status != TaskStatus::Running)
    {
        assert!(Instant::now() < deadline, "the task runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let browser = Browser::start().await;
    browser
        .client
        .goto(&s.url(&format!("/queues/{}/messages/{id}", s.queue)))
        .await
        .unwrap();
    assert_eq!(browser.text("#task-status").await, "running");
    browser
        .client
        .find(Locator::Css("#cancel"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait_text("#task-status", "the page to show it cancelled", |t| t == "cancelled")
        .await;
    browser.screenshot(&format!("cancelled-{backend}")).await;
    assert_eq!(s.app.task(&id).await.unwrap().unwrap().status, TaskStatus::Cancelled);
    worker.stop().await;
    assert_eq!(s.job.runs.load(Ordering::SeqCst), 1);
}

/// Message contents that are markup show as text on every page and run nothing.
async fn a_script_payload_runs_nothing(backend: &str) {
    let s = Setup::new(backend).await;
    let script = "<script>window.__pwned = 1</script>";
    let attribute = "\"><img src=x onerror=\"window.__pwned=2\">";
    let a = s.app.send(&s.job, (json!(script),)).await.unwrap();
    let b = s.app.send(&s.job, (json!(attribute),)).await.unwrap();
    let browser = Browser::start().await;
    let pages = [
        format!("/queues/{}", s.queue),
        format!("/queues/{}/messages/{}", s.queue, a.message_id()),
        format!("/queues/{}/messages/{}", s.queue, b.message_id()),
        "/tasks".to_owned(),
    ];
    // What each page shows as text: the script, the attribute breaker (JSON-escaped), both.
    let shown: [&[&str]; 4] = [
        &[script, "<img src=x onerror="],
        &[script],
        &["<img src=x onerror="],
        &[],
    ];
    for (page, texts) in pages.iter().zip(shown) {
        browser.client.goto(&s.url(page)).await.unwrap();
        let body = browser.text("main").await;
        for text in texts {
            assert!(body.contains(text), "{page} shows {text:?} as text: {body}");
        }
        let ran = browser
            .client
            .execute(
                "return [window.__pwned === undefined, document.querySelectorAll('main img, main script').length];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(ran, json!([true, 0]), "{page} ran or inserted markup from a message");
    }
    browser
        .client
        .goto(&s.url(&format!("/queues/{}/messages/{}", s.queue, b.message_id())))
        .await
        .unwrap();
    assert!(
        browser.text("#args").await.contains("<img src=x onerror="),
        "shown as text"
    );
    browser.screenshot(&format!("script-payload-{backend}")).await;
}

macro_rules! browser_tests {
    ($($backend:ident),*) => {
        $(
            mod $backend {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn overview_shows_the_broker_counts() {
                    super::overview_shows_the_broker_counts(stringify!($backend)).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn a_dead_letter_appears_and_is_requeued_from_the_page() {
                    super::a_dead_letter_appears_and_is_requeued_from_the_page(stringify!($backend)).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn a_running_task_is_cancelled_from_its_page() {
                    super::a_running_task_is_cancelled_from_its_page(stringify!($backend)).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn a_script_payload_runs_nothing() {
                    super::a_script_payload_runs_nothing(stringify!($backend)).await;
                }
            }
        )*
    };
}

browser_tests!(sqlite, redis, postgres, rabbitmq);
