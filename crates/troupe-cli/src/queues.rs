//! `troupe queues` and `troupe workers`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use troupe::{QueueStats, WorkerInfo};

use crate::context::Context;
use crate::output::{self, Cell, ago, count, out};
use crate::{Failure, Outcome};

#[derive(Debug, Args)]
pub(crate) struct QueuesArgs {
    /// Only these queues (repeat the flag); they are shown even when the broker does not list
    /// them.
    #[arg(long = "queue", short = 'q')]
    queues: Vec<String>,
    /// Refresh in place until interrupted (with --json: one document per line per refresh).
    #[arg(long, short = 'w')]
    watch: bool,
    /// How often --watch refreshes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    interval: Duration,
}

/// One queue's row.
struct Row {
    name: String,
    stats: QueueStats,
}

/// The queues to show: those named, else every queue the broker or a live worker knows.
async fn queue_names(ctx: &Context, named: &[String], workers: &[WorkerInfo]) -> Result<Vec<String>, Failure> {
    if !named.is_empty() {
        let mut names = Vec::new();
        for q in named {
            let q = troupe::queue::q_name(q).to_owned();
            troupe::queue::validate_queue_name(&q)?;
            if !names.contains(&q) {
                names.push(q);
            }
        }
        return Ok(names);
    }
    let mut names: std::collections::BTreeSet<String> = ctx.broker.queue_names().await?.into_iter().collect();
    for w in workers {
        names.extend(w.queues.iter().cloned());
    }
    Ok(names.into_iter().collect())
}

async fn rows(ctx: &Context, named: &[String]) -> Result<Vec<Row>, Failure> {
    let workers = ctx.broker.workers().await?;
    // Messages live workers hold, per queue: RabbitMQ knows only its own consumers' unacked
    // messages, so the workers' heartbeats fill in.
    let mut held: BTreeMap<&str, u64> = BTreeMap::new();
    for w in &workers {
        for (q, n) in &w.in_flight {
            *held.entry(q.as_str()).or_default() += n;
        }
    }
    let mut out = Vec::new();
    for name in queue_names(ctx, named, &workers).await? {
        let mut stats = ctx.broker.stats(&name).await?;
        stats.in_flight = stats.in_flight.max(held.get(name.as_str()).copied().unwrap_or(0));
        out.push(Row { name, stats });
    }
    Ok(out)
}

fn json_rows(rows: &[Row]) -> serde_json::Value {
    json!({
        "queues": rows.iter().map(|r| json!({
            "name": r.name,
            "ready": r.stats.ready,
            "delayed": r.stats.delayed,
            "in_flight": r.stats.in_flight,
            "dead": r.stats.dead,
        })).collect::<Vec<_>>()
    })
}

fn render(rows: &[Row]) -> String {
    let mut table = output::table(["queue", "ready", "delayed", "in flight", "dead"]);
    for r in rows {
        table.add_row(vec![
            Cell::new(&r.name),
            Cell::new(r.stats.ready),
            Cell::new(r.stats.delayed),
            Cell::new(r.stats.in_flight),
            count(r.stats.dead, true),
        ]);
    }
    if rows.is_empty() {
        return "no queues (name one with --queue)".to_owned();
    }
    table.to_string()
}

pub(crate) async fn run(ctx: &Context, args: &QueuesArgs) -> Outcome {
    if !args.watch {
        let rows = rows(ctx, &args.queues).await?;
        if ctx.json {
            output::print_json(&json_rows(&rows));
        } else {
            out!("{}", render(&rows));
        }
        return Ok(());
    }
    let terminal = std::io::stdout().is_terminal();
    let mut shown_lines = 0;
    loop {
        let rows = rows(ctx, &args.queues).await?;
        if ctx.json {
            out!("{}", json_rows(&rows));
        } else {
            let text = format!("{}\n{}", output::time(troupe::now_ms()), render(&rows));
            if terminal && shown_lines > 0 {
                // Back over what was shown, then clear to the end of the screen.
                output::write_out(format_args!("\x1b[{shown_lines}A\x1b[J"));
            }
            out!("{text}");
            shown_lines = text.lines().count();
        }
        tokio::select! {
            () = tokio::time::sleep(args.interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

pub(crate) async fn workers(ctx: &Context) -> Outcome {
    let workers = ctx.broker.workers().await?;
    if ctx.json {
        let list = serde_json::to_value(&workers).map_err(|e| Failure::Error(e.to_string()))?;
        output::print_json(&json!({ "workers": list }));
        return Ok(());
    }
    if workers.is_empty() {
        out!("no live workers");
        return Ok(());
    }
    let mut table = output::table([
        "worker",
        "host",
        "pid",
        "queues",
        "in flight",
        "concurrency",
        "processed",
        "up",
        "last beat",
    ]);
    for w in &workers {
        let in_flight: Vec<String> = w
            .in_flight
            .iter()
            .filter(|(q, n)| **n > 0 && !q.ends_with(".DQ"))
            .map(|(q, n)| format!("{q}: {n}"))
            .collect();
        table.add_row(vec![
            Cell::new(w.id.get(..8).unwrap_or(&w.id)),
            Cell::new(&w.hostname),
            Cell::new(w.pid),
            Cell::new(w.queues.join(", ")),
            Cell::new(if in_flight.is_empty() {
                "0".to_owned()
            } else {
                in_flight.join(", ")
            }),
            Cell::new(w.concurrency),
            Cell::new(w.processed),
            Cell::new(ago(w.started_at).trim_end_matches(" ago")),
            Cell::new(ago(w.beat_at)),
        ]);
    }
    out!("{table}");
    Ok(())
}
