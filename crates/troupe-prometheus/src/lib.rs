//! Prometheus metrics for Troupe workers, with Python Dramatiq's metric names, labels and
//! histogram buckets, so the Grafana boards and alerts a team has for Dramatiq keep working:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `dramatiq_messages_total` | counter | `queue_name`, `actor_name` |
//! | `dramatiq_message_errors_total` | counter | `queue_name`, `actor_name` |
//! | `dramatiq_message_retries_total` | counter (retries enqueued) | `queue_name`, `actor_name` |
//! | `dramatiq_message_rejects_total` | counter (dead-lettered) | `queue_name`, `actor_name` |
//! | `dramatiq_messages_inprogress` | gauge | `queue_name`, `actor_name` |
//! | `dramatiq_delayed_messages_inprogress` | gauge (held until their eta) | `queue_name`, `actor_name` |
//! | `dramatiq_message_duration_milliseconds` | histogram, Dramatiq's buckets | `queue_name`, `actor_name` |
//! | `troupe_queue_messages` | gauge (the broker's counts, read at each scrape) | `queue_name`, `state` = ready, delayed, in_flight, dead |
//!
//! [`Prometheus`] is the middleware; [`Prometheus::serve`] answers `GET /metrics` (Dramatiq's
//! exposition server listens on port 9191, on every interface). Worker binaries get both from the
//! `--metrics-bind ADDR` flag (`troupe::run_worker`), summed over the processes of
//! `--processes` ([`merge`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use troupe_core::{App, MemoryBroker};
//! use troupe_prometheus::Prometheus;
//!
//! let metrics = Prometheus::new()?;
//! // First in the list (outermost), as Dramatiq places it: it sees every attempt.
//! let app = App::builder(MemoryBroker::new().into_dyn())
//!     .build()?
//!     .with_outer_middleware(metrics.middleware());
//! let server = metrics.serve("127.0.0.1:0".parse()?, app).await?;
//! println!("metrics on http://{}/metrics", server.local_addr());
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use troupe_core::middleware::{Next, Outcome, ProcessContext};
use troupe_core::{App, Error, Message, Middleware, Result};

/// Dramatiq's duration buckets, in milliseconds.
pub const DURATION_BUCKETS: [f64; 18] = [
    5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0, 7500.0, 10000.0, 30000.0, 60000.0,
    600000.0, 900000.0,
];

/// Dramatiq's labels.
const LABELS: [&str; 2] = ["queue_name", "actor_name"];

/// Gauges whose samples are the same in every process (the broker's counts): [`merge`] keeps
/// their largest value instead of summing them.
const SHARED_GAUGES: [&str; 1] = ["troupe_queue_messages"];

/// The metrics of one process, and the middleware that counts them. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Prometheus {
    inner: Arc<Metrics>,
}

#[derive(Debug)]
struct Metrics {
    registry: Registry,
    total: IntCounterVec,
    errors: IntCounterVec,
    retries: IntCounterVec,
    rejects: IntCounterVec,
    in_progress: IntGaugeVec,
    delayed: IntGaugeVec,
    duration: HistogramVec,
    queue: IntGaugeVec,
    /// Delayed messages this worker holds (by id), counted in `delayed` until moved to their
    /// queue.
    held: std::sync::Mutex<std::collections::HashSet<String>>,
}

fn metrics_error(e: prometheus::Error) -> Error {
    Error::Config(format!("cannot register the Prometheus metrics: {e}"))
}

impl Prometheus {
    /// The metrics, in a registry of their own.
    ///
    /// # Errors
    /// Never in practice (a metric registered twice).
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &LABELS).map_err(metrics_error)?;
            registry.register(Box::new(c.clone())).map_err(metrics_error)?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).map_err(metrics_error)?;
            registry.register(Box::new(g.clone())).map_err(metrics_error)?;
            Ok(g)
        };
        let total = counter("dramatiq_messages_total", "The total number of messages processed.")?;
        let errors = counter("dramatiq_message_errors_total", "The total number of errored messages.")?;
        let retries = counter(
            "dramatiq_message_retries_total",
            "The total number of retried messages.",
        )?;
        let rejects = counter(
            "dramatiq_message_rejects_total",
            "The total number of dead-lettered messages.",
        )?;
        let in_progress = gauge(
            "dramatiq_messages_inprogress",
            "The number of messages in progress.",
            &LABELS,
        )?;
        let delayed = gauge(
            "dramatiq_delayed_messages_inprogress",
            "The number of delayed messages in memory.",
            &LABELS,
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "dramatiq_message_duration_milliseconds",
                "The time spent processing messages.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &LABELS,
        )
        .map_err(metrics_error)?;
        registry.register(Box::new(duration.clone())).map_err(metrics_error)?;
        let queue = gauge(
            "troupe_queue_messages",
            "Messages in a queue, by state (ready, delayed, in_flight, dead), as the broker counts them.",
            &["queue_name", "state"],
        )?;
        Ok(Self {
            inner: Arc::new(Metrics {
                registry,
                total,
                errors,
                retries,
                rejects,
                in_progress,
                delayed,
                duration,
                queue,
                held: std::sync::Mutex::default(),
            }),
        })
    }

    /// The registry holding the metrics (to add your own, or gather them elsewhere).
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The middleware counting into these metrics; put it first (outermost), as Dramatiq does,
    /// so it sees every attempt.
    #[must_use]
    pub fn middleware(&self) -> Arc<dyn Middleware> {
        Arc::new(self.clone())
    }

    /// Reads the broker's counts of `app`'s queues into `troupe_queue_messages`. A queue whose
    /// counts cannot be read keeps its last values (the error is logged).
    pub async fn refresh_queues(&self, app: &App) {
        for queue in app.queues() {
            match app.broker().stats(&queue).await {
                Ok(stats) => {
                    for (state, n) in [
                        ("ready", stats.ready),
                        ("delayed", stats.delayed),
                        ("in_flight", stats.in_flight),
                        ("dead", stats.dead),
                    ] {
                        self.inner
                            .queue
                            .with_label_values(&[queue.as_str(), state])
                            .set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                }
                Err(e) => tracing::warn!(%queue, error = %e, "cannot read the queue's counts for the metrics"),
            }
        }
    }

    /// The metrics in Prometheus' text exposition format.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.inner.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Serves `GET /metrics` on `addr` (the queues' counts refreshed at each scrape) until the
    /// returned server is dropped or stopped.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn serve(&self, addr: SocketAddr, app: App) -> Result<MetricsServer> {
        let metrics = self.clone();
        serve_with(addr, move || {
            let metrics = metrics.clone();
            let app = app.clone();
            async move {
                metrics.refresh_queues(&app).await;
                metrics.render()
            }
        })
        .await
    }

    /// Writes the metrics to `path` every `every` (and once at once), refreshing the queues'
    /// counts each time, until the returned handle is dropped: how a process of `--processes`
    /// hands its metrics to the supervisor, which [`merge`]s them.
    #[must_use]
    pub fn write_every(&self, path: &Path, every: Duration, app: App) -> WriterHandle {
        let metrics = self.clone();
        let path = path.to_owned();
        let task = tokio::spawn(async move {
            loop {
                metrics.refresh_queues(&app).await;
                if let Err(e) = write_atomically(&path, &metrics.render()) {
                    tracing::warn!(error = %e, path = %path.display(), "cannot write the metrics file");
                }
                tokio::time::sleep(every).await;
            }
        });
        WriterHandle { task }
    }

    fn labels(message: &Message) -> [String; 2] {
        [
            troupe_core::queue::q_name(&message.queue_name).to_owned(),
            message.actor_name.clone(),
        ]
    }
}

/// Stops [`Prometheus::write_every`] when dropped.
#[derive(Debug)]
pub struct WriterHandle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// A running `/metrics` server; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on (the port chosen when bound to port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `GET /metrics` on `addr`, answering with what `render` returns.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve_with<F, Fut>(addr: SocketAddr, render: F) -> Result<MetricsServer>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::Config(format!(
            "cannot serve metrics on {addr}: {e}; choose a free address with --metrics-bind"
        ))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("metrics server address: {e}")))?;
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                    render().await,
                )
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    Ok(MetricsServer { addr, task })
}

/// Sums the text expositions of several processes into one: counters, histograms and the
/// in-progress gauges add up; `troupe_queue_messages` (the broker's counts, the same in every
/// process) keeps its largest value. An exposition with `live` false is a process that exited:
/// its counters and histograms still count (so totals never go backwards when a process is
/// replaced), its gauges do not.
#[must_use]
pub fn merge(expositions: &[(String, bool)]) -> String {
    struct Family {
        help: Option<String>,
        kind: String,
        samples: BTreeMap<String, f64>,
    }
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for (text, live) in expositions {
        let mut kinds: BTreeMap<&str, &str> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some((name, kind)) = rest.split_once(' ') {
                    kinds.insert(name, kind);
                    families
                        .entry(name.to_owned())
                        .or_insert_with(|| Family {
                            help: None,
                            kind: String::new(),
                            samples: BTreeMap::new(),
                        })
                        .kind = kind.to_owned();
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                if let Some((name, help)) = rest.split_once(' ') {
                    let family = families.entry(name.to_owned()).or_insert_with(|| Family {
                        help: None,
                        kind: "untyped".to_owned(),
                        samples: BTreeMap::new(),
                    });
                    family.help.get_or_insert_with(|| help.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else { continue };
            let name = series.split('{').next().unwrap_or(series);
            // A histogram's samples are `<family>_bucket`, `_sum`, `_count`.
            let family_name = [
                name,
                name.trim_end_matches("_bucket"),
                name.trim_end_matches("_sum"),
                name.trim_end_matches("_count"),
            ]
            .into_iter()
            .find(|n| kinds.contains_key(n))
            .unwrap_or(name);
            let kind = kinds.get(family_name).copied().unwrap_or("untyped");
            if kind == "gauge" && !live {
                continue;
            }
            let Some(family) = families.get_mut(family_name) else {
                continue;
            };
            let slot = family.samples.entry(series.to_owned()).or_insert(0.0);
            if SHARED_GAUGES.contains(&family_name) {
                *slot = slot.max(value);
            } else {
                *slot += value;
            }
        }
    }
    let mut out = String::new();
    for (name, family) in &families {
        if let Some(help) = &family.help {
            out.push_str(&format!("# HELP {name} {help}\n"));
        }
        out.push_str(&format!("# TYPE {name} {}\n", family.kind));
        for (series, value) in &family.samples {
            out.push_str(&format!("{series} {value}\n"));
        }
    }
    out
}

/// Serves `GET /metrics` on `addr` with the [`merge`] of the `*.prom` files in `dir`: those
/// named `live-*.prom` count as live processes, `dead-*.prom` as exited ones (see
/// [`mark_exited`]).
///
/// # Errors
/// The address cannot be bound.
pub async fn serve_merged(addr: SocketAddr, dir: std::path::PathBuf) -> Result<MetricsServer> {
    serve_with(addr, move || {
        let dir = dir.clone();
        async move {
            let mut expositions = Vec::new();
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !name.ends_with(".prom") {
                        continue;
                    }
                    if let Ok(text) = std::fs::read_to_string(entry.path()) {
                        expositions.push((text, name.starts_with("live-")));
                    }
                }
            }
            merge(&expositions)
        }
    })
    .await
}

/// The metrics file of the process `pid` in `dir`, while it lives.
#[must_use]
pub fn live_file(dir: &Path, pid: u32) -> std::path::PathBuf {
    dir.join(format!("live-{pid}.prom"))
}

/// Marks the metrics file of the process `pid` as an exited process's: its counters keep
/// counting in the merge, its gauges no longer do.
pub fn mark_exited(dir: &Path, pid: u32) {
    let _ = std::fs::rename(live_file(dir, pid), dir.join(format!("dead-{pid}.prom")));
}

/// Counts a message in progress until dropped (a panicking actor included).
struct InProgress(prometheus::IntGauge);

impl InProgress {
    fn start(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait]
impl Middleware for Prometheus {
    async fn after_enqueue(&self, _app: &App, message: &Message, delay: Option<Duration>) {
        // A retry is enqueued with its backoff as the delay. Dramatiq also counts the move of a
        // delayed retry from the delay queue to its queue (an enqueue without a delay), so a
        // retry counted twice there; here each retry counts once, on every broker.
        if message.retries() > 0 && delay.is_some() {
            self.inner.retries.with_label_values(&Self::labels(message)).inc();
        }
        // A held delayed message that came due is enqueued on its queue by this worker.
        if delay.is_none()
            && self
                .inner
                .held
                .lock()
                .is_ok_and(|mut held| held.remove(&message.message_id))
        {
            self.inner.delayed.with_label_values(&Self::labels(message)).dec();
        }
    }

    async fn before_delay_message(&self, _app: &App, message: &Message) {
        if self
            .inner
            .held
            .lock()
            .is_ok_and(|mut held| held.insert(message.message_id.clone()))
        {
            self.inner.delayed.with_label_values(&Self::labels(message)).inc();
        }
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let labels = Self::labels(cx.message());
        let in_progress = InProgress::start(self.inner.in_progress.with_label_values(&labels));
        self.inner.total.with_label_values(&labels).inc();
        let started = std::time::Instant::now();
        let outcome = next.run(cx).await;
        self.inner
            .duration
            .with_label_values(&labels)
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        drop(in_progress);
        if matches!(outcome, Outcome::Failure(_)) {
            self.inner.errors.with_label_values(&labels).inc();
        }
        outcome
    }

    async fn after_nack(&self, cx: &ProcessContext, _outcome: &Outcome) {
        self.inner.rejects.with_label_values(&Self::labels(cx.message())).inc();
    }
}
