//! An email pipeline with OCR fan-out and a monitoring middleware, after a team that moved its
//! hand-written PostgreSQL task table to Dramatiq: `process_email` (queue `email`) parses an
//! incoming email and sends one `ocr_attachment` message (queue `ocr`) per attachment; both retry
//! up to 3 times with exponential backoff. A user-written `TaskMonitoringMiddleware` logs the
//! start, the end and the duration of every message, and counts them per actor.
//!
//! Scanned attachments (`*-scan.*`) hit a busy OCR engine on their first attempt and succeed on
//! the retry, so the log shows the Retries middleware at work.
//!
//! ```text
//! cargo run --example email_pipeline                                     # ./troupe-email-pipeline.db
//! cargo run --example email_pipeline -- --broker-url sqlite:///tmp/e.db  # any broker URL
//! cargo run --example email_pipeline -- --broker-url memory://
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use troupe::prelude::*;
use troupe::redact_url;

/// The error type of `run`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Queues this example consumes.
pub const QUEUES: [&str; 2] = ["email", "ocr"];

/// Command-line flags.
#[derive(Clone, Debug, clap::Parser)]
#[command(about = "Email pipeline with OCR fan-out and a monitoring middleware")]
pub struct Args {
    /// Broker URL (sqlite://PATH, memory://, ...).
    #[arg(long, env = "TROUPE_BROKER_URL", default_value = "sqlite://troupe-email-pipeline.db")]
    pub broker_url: String,
    /// Messages processed at once.
    #[arg(short, long, default_value_t = 4)]
    pub concurrency: usize,
}

/// An incoming email, as the API endpoint hands it over.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Email {
    /// Our id for it.
    pub email_id: String,
    /// The mailbox owner.
    pub user_id: String,
    /// Who sent it.
    pub sender: String,
    /// Its subject.
    pub subject: String,
    /// Attachment file names.
    pub attachments: Vec<String>,
}

/// The emails this run processes: 7 attachments, 3 of them scans.
#[must_use]
pub fn sample_emails() -> Vec<Email> {
    let email = |id: &str, sender: &str, subject: &str, attachments: &[&str]| Email {
        email_id: id.to_owned(),
        user_id: "user-42".to_owned(),
        sender: sender.to_owned(),
        subject: subject.to_owned(),
        attachments: attachments.iter().map(|a| (*a).to_owned()).collect(),
    };
    vec![
        email("e-1001", "billing@acme.test", "Invoice March", &["invoice-march.pdf"]),
        email(
            "e-1002",
            "legal@acme.test",
            "Signed contract",
            &["contract-scan.jpg", "appendix.pdf"],
        ),
        email("e-1003", "team@acme.test", "Team lunch on Friday", &[]),
        email(
            "e-1004",
            "travel@acme.test",
            "Expense receipts",
            &["receipt-1-scan.png", "receipt-2-scan.png", "summary.xlsx"],
        ),
        email("e-1005", "hr@acme.test", "Passport copy", &["passport.pdf"]),
    ]
}

// The seed team used `max_retries=3, min_backoff=1000, max_backoff=60000` (1 s to 60 s); the
// backoffs here are 100 ms to 1 s so the demo finishes in a second or two.

/// Parses an email and fans out one OCR message per attachment. Returns the attachment count.
#[troupe::actor(queue_name = "email", max_retries = 3, min_backoff = "100ms", max_backoff = "1s")]
async fn process_email(email: Email) -> Result<usize, ActorError> {
    // Parsing, spam filtering and storing the email would go here.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let app = current_app()?;
    for file_name in &email.attachments {
        OcrAttachment
            .send(&app, email.email_id.clone(), file_name.clone())
            .await?;
    }
    Ok(email.attachments.len())
}

/// Recognises the text of one attachment. Scans fail on their first attempt (the OCR engine is
/// busy) and succeed when retried.
#[troupe::actor(queue_name = "ocr", max_retries = 3, min_backoff = "100ms", max_backoff = "1s")]
async fn ocr_attachment(email_id: String, file_name: String) -> Result<String, ActorError> {
    let attempt = current_message().map_or(0, |m| m.retries()) + 1;
    tokio::time::sleep(Duration::from_millis(15 + 3 * (file_name.len() as u64 % 5))).await;
    if file_name.contains("-scan.") && attempt == 1 {
        return Err(ActorError::new(
            "OcrEngineBusy",
            format!("OCR engine busy while reading {file_name} of {email_id}"),
        ));
    }
    Ok(format!("{file_name}: {} words recognised", 40 * file_name.len()))
}

/// Counts and timings of one actor, as the monitoring middleware saw them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActorStats {
    /// The actor's queue.
    pub queue: String,
    /// Messages started (retries included).
    pub started: u64,
    /// Attempts that succeeded.
    pub succeeded: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// Time spent in the actor, all attempts.
    pub total: Duration,
    /// The longest attempt.
    pub max: Duration,
}

#[derive(Debug, Default)]
struct Monitor {
    lines: Vec<String>,
    stats: BTreeMap<String, ActorStats>,
}

/// The seed's `TaskMonitoringMiddleware`: logs the start, the end and the duration of every
/// message with its actor, queue, id and retries, and keeps per-actor counts. Log lines collect
/// in a shared buffer that `run` prints as it goes (workers run on other tasks, so they cannot
/// write to `run`'s output themselves).
#[derive(Clone, Debug, Default)]
pub struct TaskMonitoringMiddleware {
    inner: Arc<Mutex<Monitor>>,
}

impl TaskMonitoringMiddleware {
    fn with<R>(&self, f: impl FnOnce(&mut Monitor) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Takes the log lines written since the last call.
    pub fn take_lines(&self) -> Vec<String> {
        self.with(|m| std::mem::take(&mut m.lines))
    }

    /// The per-actor counts so far.
    #[must_use]
    pub fn stats(&self) -> BTreeMap<String, ActorStats> {
        self.with(|m| m.stats.clone())
    }
}

#[troupe::async_trait]
impl Middleware for TaskMonitoringMiddleware {
    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let message = cx.message();
        let actor = message.actor_name.clone();
        let queue = message.queue_name.clone();
        let id: String = message.message_id.chars().take(8).collect();
        let retries = message.retries();
        self.with(|m| {
            m.lines.push(format!(
                "start   {actor:<14} queue={queue:<5} id={id} retries={retries}"
            ));
            let stats = m.stats.entry(actor.clone()).or_default();
            stats.queue.clone_from(&queue);
            stats.started += 1;
        });
        let started = Instant::now();
        let outcome = next.run(cx).await;
        let took = started.elapsed();
        let status = match &outcome {
            Outcome::Success(_) => "ok".to_owned(),
            Outcome::Failure(e) => format!("failed: {e}"),
            _ => "skipped".to_owned(),
        };
        self.with(|m| {
            m.lines.push(format!(
                "finish  {actor:<14} queue={queue:<5} id={id} retries={retries} in {} - {status}",
                ms(took)
            ));
            let stats = m.stats.entry(actor).or_default();
            if outcome.is_success() {
                stats.succeeded += 1;
            } else if outcome.error().is_some() {
                stats.failed += 1;
            }
            stats.total += took;
            stats.max = stats.max.max(took);
        });
        outcome
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Emails sent.
    pub emails: usize,
    /// Their attachments (OCR jobs expected).
    pub attachments: usize,
    /// Per-actor counts from the monitoring middleware.
    pub actors: BTreeMap<String, ActorStats>,
    /// Monitoring log lines printed.
    pub log_lines: usize,
}

/// Sends the sample emails, runs a worker until everything is processed, and prints the
/// monitoring log and the per-actor counts to `out`.
///
/// # Errors
/// A broker that cannot be reached, or processing that does not finish within 30 s.
pub async fn run(args: Args, out: &mut dyn Write) -> Result<Summary, BoxError> {
    let started = Instant::now();
    let broker = troupe::connect(&args.broker_url).await?;
    let monitor = TaskMonitoringMiddleware::default();
    let app = App::builder(broker)
        .middleware(monitor.clone())
        .actor(ProcessEmail)
        .actor(OcrAttachment)
        .build()?;
    writeln!(out, "broker: {}", redact_url(&args.broker_url))?;

    // Producer: what the API endpoint does for each incoming email.
    let emails = sample_emails();
    let attachments = emails.iter().map(|e| e.attachments.len()).sum();
    for email in emails.iter().cloned() {
        ProcessEmail.send(&app, email).await?;
    }
    writeln!(
        out,
        "sent {} emails with {attachments} attachments in total\n",
        emails.len()
    )?;

    // Worker: consumes both queues until the batch is done, printing the monitor's log.
    let worker = Worker::builder(app.clone())
        .concurrency(args.concurrency)
        .start()
        .await?;
    let mut log_lines = 0;
    let drained = wait_until_drained(&app, Duration::from_secs(30), || {
        let lines = monitor.take_lines();
        log_lines += lines.len();
        lines.iter().try_for_each(|l| writeln!(out, "  [monitor] {l}"))
    })
    .await;
    worker.stop().await;
    for line in monitor.take_lines() {
        log_lines += 1;
        writeln!(out, "  [monitor] {line}")?;
    }
    drained?;

    let actors = monitor.stats();
    writeln!(out, "\nper-actor summary:")?;
    writeln!(
        out,
        "  {:<15} {:<6} {:>5} {:>4} {:>7} {:>9} {:>9} {:>9}",
        "actor", "queue", "runs", "ok", "failed", "total", "avg", "max"
    )?;
    for (actor, s) in &actors {
        let avg = s.total / u32::try_from(s.started.max(1)).unwrap_or(u32::MAX);
        writeln!(
            out,
            "  {actor:<15} {:<6} {:>5} {:>4} {:>7} {:>9} {:>9} {:>9}",
            s.queue,
            s.started,
            s.succeeded,
            s.failed,
            ms(s.total),
            ms(avg),
            ms(s.max)
        )?;
    }
    writeln!(out, "\ndone in {}", ms(started.elapsed()))?;
    Ok(Summary {
        emails: emails.len(),
        attachments,
        actors,
        log_lines,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

/// Waits until no message of [`QUEUES`] is ready, delayed or in flight, calling `tick` every
/// 50 ms.
async fn wait_until_drained(
    app: &App,
    timeout: Duration,
    mut tick: impl FnMut() -> std::io::Result<()>,
) -> Result<(), BoxError> {
    let deadline = Instant::now() + timeout;
    loop {
        tick()?;
        let mut pending = 0;
        for queue in QUEUES {
            pending += app.broker().stats(queue).await?.pending();
        }
        if pending == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{pending} messages still pending after {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = <Args as clap::Parser>::parse();
    let summary = run(args, &mut std::io::stdout()).await?;
    let ocr = summary.actors.get("ocr_attachment").map_or(0, |s| s.succeeded);
    if ocr < summary.attachments as u64 {
        return Err(format!("only {ocr} of {} attachments were recognised", summary.attachments).into());
    }
    Ok(())
}
