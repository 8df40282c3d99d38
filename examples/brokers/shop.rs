//! The same small app on every broker (`examples/broker_*.rs` choose the broker): an actor with
//! retries and stored results, a delayed message, a message that ends in the dead letters, and
//! `App::join` to wait until the queue is drained. Only the URLs differ between brokers.

use std::io::Write;
use std::time::{Duration, Instant};

use troupe::prelude::*;

/// The queue every message of this app goes to.
pub(crate) const QUEUE: &str = "shop";

/// Prices a line of an order. "flaky" items fail on their first attempt (retried after 100 ms),
/// "broken" ones fail for good (straight to the dead letters).
#[troupe::actor(
    queue_name = "shop",
    max_retries = 3,
    min_backoff = "100ms",
    max_backoff = "1s",
    store_results = true
)]
async fn price(item: String, quantity: u64) -> Result<u64, ActorError> {
    let attempt = current_message().map_or(0, |m| m.retries()) + 1;
    if item.starts_with("flaky") && attempt == 1 {
        return Err(ActorError::new(
            "Timeout",
            format!("the price list timed out for {item}"),
        ));
    }
    if item.starts_with("broken") {
        return Err(ActorError::fail_permanently(ActorError::new(
            "UnknownItem",
            format!("no price for {item}"),
        )));
    }
    let cents = 100 + 10 * u64::try_from(item.len()).unwrap_or(0);
    Ok(cents * quantity)
}

/// What a run did.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    /// The results, by item, in the order sent.
    pub(crate) totals: Vec<(String, u64)>,
    /// The items that failed, with the error stored as their result.
    pub(crate) failures: Vec<(String, String)>,
    /// Dead letters of the queue after the run: (message id, reason).
    pub(crate) dead: Vec<(String, String)>,
    /// How long the delayed message took from its send to its result.
    pub(crate) delayed_after: Duration,
    /// How long the whole batch took to drain.
    pub(crate) drained_in: Duration,
}

/// Runs the app once on `broker_url`, with results in `results_url`, printing what happens to
/// `out`. Starts from an empty queue and no dead letters (earlier runs' are purged).
///
/// # Errors
/// A broker or results backend that cannot be reached, or a run that does not finish in 30 s.
pub(crate) async fn run(
    broker_url: &str,
    results_url: &str,
    out: &mut impl Write,
) -> Result<Summary, Box<dyn std::error::Error + Send + Sync>> {
    let broker = connect(broker_url).await?;
    let results = connect_results(results_url).await?;
    let app = App::builder(broker.clone()).results(results).actor(Price).build()?;
    app.declare_queue(QUEUE).await?;
    broker.purge(QUEUE).await?;
    broker.purge_dead_letters(QUEUE).await?;
    writeln!(
        out,
        "broker {} ({}), results in {}",
        troupe::redact_url(broker_url),
        broker.backend(),
        troupe::redact_url(results_url)
    )?;

    let worker = Worker::builder(app.clone()).concurrency(4).start().await?;
    let started = Instant::now();
    let items = [("apple", 3), ("pear", 2), ("flaky-melon", 1), ("broken-kiwi", 1)];
    let mut sent = Vec::new();
    for (item, quantity) in items {
        sent.push((item, Price.send(&app, item.to_owned(), quantity).await?));
    }
    let delay = Duration::from_millis(500);
    // Timed from the call: its eta is set when the message is built, before the send returns.
    let late_sent = Instant::now();
    let late = Price
        .send_with_options(&app, "late-fig".to_owned(), 4, SendOptions::new().delay(delay))
        .await?;
    writeln!(out, "sent {} messages, one delayed by {delay:?}", items.len() + 1)?;

    // Wait until nothing is ready, delayed or in flight; the broken item is expected to fail,
    // so do not stop at the first dead letter.
    app.join_with(QUEUE, Duration::from_secs(30), JoinOptions::new().fail_fast(false))
        .await?;
    let mut summary = Summary {
        drained_in: started.elapsed(),
        ..Summary::default()
    };
    writeln!(out, "queue {QUEUE} drained in {:?}", summary.drained_in)?;

    sent.push(("late-fig", late));
    for (item, sent) in &sent {
        match sent.wait(Duration::from_secs(5)).await {
            Ok(total) => {
                writeln!(out, "  {item}: {total} cents")?;
                summary.totals.push(((*item).to_owned(), total));
            }
            Err(e) => {
                writeln!(out, "  {item}: failed: {e}")?;
                summary.failures.push(((*item).to_owned(), e.to_string()));
            }
        }
    }
    summary.delayed_after = late_sent.elapsed();
    for dead in broker.dead_letters(QUEUE, 10).await? {
        writeln!(out, "dead letter {}: {}", dead.id, dead.reason)?;
        summary.dead.push((dead.id, dead.reason));
    }
    worker.stop().await;
    broker.close().await?;
    Ok(summary)
}

/// The `main` of every `broker_*` example: runs the app on the URLs given as arguments, or
/// these defaults.
pub(crate) async fn main_with(default_broker: &str, default_results: &str) -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let broker_url = args.next().unwrap_or_else(|| default_broker.to_owned());
    let results_url = args.next().unwrap_or_else(|| default_results.to_owned());
    match run(&broker_url, &results_url, &mut std::io::stdout()).await {
        Ok(summary) => {
            println!(
                "done: {} lines priced, {} failed, {} dead letter(s); drained in {:?}, the delayed line priced {:?} after it was sent",
                summary.totals.len(),
                summary.failures.len(),
                summary.dead.len(),
                summary.drained_in,
                summary.delayed_after
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
