//! The metrics of a real run, scraped over HTTP, against what ran; and the merge of several
//! processes' metrics.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use troupe_core::middleware::Retries;
use troupe_core::{Actor, ActorError, ActorOptions, App, MemoryBroker, SendOptions};
use troupe_prometheus::{Prometheus, merge};
use troupe_worker::Worker;

/// "ok" succeeds, "bad" fails for good, "flaky" fails its first attempt.
#[derive(Clone, Default)]
struct Job {
    flaky_runs: Arc<AtomicUsize>,
}

impl Actor for Job {
    type Args = (String,);
    type Output = ();

    fn name(&self) -> &str {
        "job"
    }

    fn options(&self) -> ActorOptions {
        let mut options = ActorOptions::new();
        options.queue_name = "metrics".into();
        options.max_retries = Some(3);
        options
    }

    async fn call(&self, (kind,): (String,)) -> Result<(), ActorError> {
        match kind.as_str() {
            "bad" => Err(ActorError::fail_permanently(ActorError::new("Bad", "bad input"))),
            "flaky" if self.flaky_runs.fetch_add(1, Ordering::SeqCst) == 0 => {
                Err(ActorError::new("Flaky", "try again"))
            }
            _ => Ok(()),
        }
    }
}

/// `GET /metrics` over a plain TCP connection; the body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// The value of the sample `series` (name and labels, as printed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.parse().unwrap())
}

const LABELS: &str = r#"{actor_name="job",queue_name="metrics"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_counts_what_ran() {
    let metrics = Prometheus::new().unwrap();
    let job = Job::default();
    let app = App::builder(MemoryBroker::new().into_dyn())
        .middleware_arc(metrics.middleware())
        .retries(
            Retries::default()
                .min_backoff(Duration::from_millis(10))
                .max_backoff(Duration::from_millis(50)),
        )
        .actor(job.clone())
        .build()
        .unwrap();
    let server = metrics
        .serve("127.0.0.1:0".parse().unwrap(), app.clone())
        .await
        .unwrap();
    let worker = Worker::builder(app.clone())
        .concurrency(4)
        .fetch_timeout(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    for _ in 0..5 {
        app.send(&job, ("ok".into(),)).await.unwrap();
    }
    for _ in 0..2 {
        app.send(&job, ("bad".into(),)).await.unwrap();
    }
    app.send(&job, ("flaky".into(),)).await.unwrap();
    app.send_with_options(
        &job,
        ("ok".into(),),
        SendOptions::new().delay(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    app.join_with(
        "metrics",
        Duration::from_secs(10),
        troupe_core::JoinOptions::new().fail_fast(false),
    )
    .await
    .unwrap();
    let text = scrape(server.local_addr()).await;
    let value = |name: &str| sample(&text, &format!("{name}{LABELS}")).unwrap_or_else(|| panic!("{name} in {text}"));
    // 6 ok (one delayed), 2 bad, flaky twice.
    assert_eq!(value("dramatiq_messages_total"), 10.0, "{text}");
    assert_eq!(value("dramatiq_message_errors_total"), 3.0);
    assert_eq!(value("dramatiq_message_retries_total"), 1.0);
    assert_eq!(value("dramatiq_message_rejects_total"), 2.0);
    assert_eq!(value("dramatiq_messages_inprogress"), 0.0);
    assert_eq!(value("dramatiq_delayed_messages_inprogress"), 0.0);
    assert_eq!(value("dramatiq_message_duration_milliseconds_count"), 10.0);
    // Dramatiq's buckets, every one of them.
    for le in [
        "5", "10", "25", "50", "75", "100", "250", "500", "750", "1000", "2500", "5000", "7500", "10000", "30000",
        "60000", "600000", "900000", "+Inf",
    ] {
        let series = format!(
            r#"dramatiq_message_duration_milliseconds_bucket{{actor_name="job",queue_name="metrics",le="{le}"}}"#
        );
        assert!(sample(&text, &series).is_some(), "bucket {le} in {text}");
    }
    assert_eq!(
        sample(&text, r#"troupe_queue_messages{queue_name="metrics",state="dead"}"#),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"troupe_queue_messages{queue_name="metrics",state="ready"}"#),
        Some(0.0)
    );
    worker.stop().await;
}

#[test]
fn merge_sums_counters_keeps_shared_gauges_and_drops_dead_gauges() {
    let one = "# HELP dramatiq_messages_total The total.\n# TYPE dramatiq_messages_total counter\n\
               dramatiq_messages_total{actor_name=\"a\",queue_name=\"q\"} 3\n\
               # HELP dramatiq_messages_inprogress In progress.\n# TYPE dramatiq_messages_inprogress gauge\n\
               dramatiq_messages_inprogress{actor_name=\"a\",queue_name=\"q\"} 2\n\
               # TYPE dramatiq_message_duration_milliseconds histogram\n\
               dramatiq_message_duration_milliseconds_bucket{le=\"5\"} 1\n\
               dramatiq_message_duration_milliseconds_count 3\n\
               # TYPE troupe_queue_messages gauge\ntroupe_queue_messages{queue_name=\"q\",state=\"ready\"} 7\n";
    let two = one
        .replace("} 3\n", "} 4\n")
        .replace("state=\"ready\"} 7", "state=\"ready\"} 6");
    let merged = merge(&[(one.to_owned(), true), (two, true), (one.to_owned(), false)]);
    assert_eq!(
        sample(&merged, "dramatiq_messages_total{actor_name=\"a\",queue_name=\"q\"}"),
        Some(10.0),
        "{merged}"
    );
    assert_eq!(
        sample(
            &merged,
            "dramatiq_messages_inprogress{actor_name=\"a\",queue_name=\"q\"}"
        ),
        Some(4.0),
        "dead gauges drop out"
    );
    assert_eq!(
        sample(&merged, "dramatiq_message_duration_milliseconds_bucket{le=\"5\"}"),
        Some(3.0)
    );
    assert_eq!(
        sample(&merged, "dramatiq_message_duration_milliseconds_count"),
        Some(9.0)
    );
    assert_eq!(
        sample(&merged, "troupe_queue_messages{queue_name=\"q\",state=\"ready\"}"),
        Some(7.0),
        "the largest, not the sum"
    );
    assert!(merged.contains("# HELP dramatiq_messages_total The total.\n# TYPE dramatiq_messages_total counter\n"));
}
