//! `troupe tasks list|show|cancel|stats`.

use std::time::Duration;

use clap::{Args, Subcommand};
use comfy_table::Color;
use serde_json::json;
use troupe::{CancelMode, CancelOutcome, TaskFilter, TaskQuery, TaskRecord, TaskStatus};

use crate::context::Context;
use crate::output::{self, Cell, ago, coloured, cut, out};
use crate::{Failure, Outcome};

#[derive(Debug, Subcommand)]
pub(crate) enum TasksCommand {
    /// Lists task records, newest first.
    List {
        #[command(flatten)]
        filter: Filter,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Shows one task's record: state, times, attempts, error, progress, arguments.
    Show {
        /// The message id.
        id: String,
    },
    /// Cancels a message: pending, it never runs; running, its worker stops it.
    Cancel {
        /// The message id.
        id: String,
        /// Cancel only if it has not started; a running one goes on.
        #[arg(long)]
        pending_only: bool,
    },
    /// Counts per status, actor and queue (of every task kept, or of one actor or queue).
    Stats {
        /// Only tasks of this actor.
        #[arg(long)]
        actor: Option<String>,
        /// Only tasks of this queue.
        #[arg(long = "queue", short = 'q')]
        queue: Option<String>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct Filter {
    /// Only tasks in this state (enqueued, delayed, running, retrying, succeeded, failed,
    /// skipped, cancelled).
    #[arg(long)]
    status: Option<TaskStatus>,
    /// Only tasks of this actor.
    #[arg(long)]
    actor: Option<String>,
    /// Only tasks of this queue.
    #[arg(long = "queue", short = 'q')]
    queue: Option<String>,
    /// Only tasks sent within this ("1h", "2d").
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
}

impl Filter {
    fn to_filter(&self) -> TaskFilter {
        let mut f = TaskFilter::new();
        if let Some(s) = self.status {
            f = f.status(s);
        }
        if let Some(a) = &self.actor {
            f = f.actor(a.clone());
        }
        if let Some(q) = &self.queue {
            f = f.queue(troupe::queue::q_name(q).to_owned());
        }
        if let Some(d) = self.since {
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            f = f.since(troupe::now_ms().saturating_sub(ms));
        }
        f
    }
}

fn status_cell(status: TaskStatus) -> Cell {
    let color = match status {
        TaskStatus::Succeeded => Color::Green,
        TaskStatus::Failed => Color::Red,
        TaskStatus::Running => Color::Cyan,
        TaskStatus::Retrying => Color::Yellow,
        TaskStatus::Cancelled | TaskStatus::Skipped => Color::DarkGrey,
        _ => Color::Reset,
    };
    coloured(status, color)
}

pub(crate) async fn run(ctx: &Context, command: TasksCommand) -> Outcome {
    let app = ctx.tasks_app()?;
    match command {
        TasksCommand::List { filter, limit } => {
            let page = app.tasks(&TaskQuery::new(filter.to_filter()).limit(limit)).await?;
            if ctx.json {
                output::print_json(&json!({ "tasks": page.tasks }));
                return Ok(());
            }
            if page.tasks.is_empty() {
                out!("no tasks");
                return Ok(());
            }
            let mut table = output::table([
                "message id",
                "actor",
                "queue",
                "status",
                "attempts",
                "sent",
                "updated",
                "error",
            ]);
            for t in &page.tasks {
                table.add_row(vec![
                    Cell::new(&t.message_id),
                    Cell::new(&t.actor),
                    Cell::new(&t.queue),
                    status_cell(t.status),
                    Cell::new(t.attempts),
                    Cell::new(ago(t.enqueued_at)),
                    Cell::new(ago(t.updated_at)),
                    Cell::new(t.error.as_deref().map(|e| cut(e, 50)).unwrap_or_default()),
                ]);
            }
            out!("{table}");
            Ok(())
        }
        TasksCommand::Show { id } => {
            let Some(task) = app.task(&id).await? else {
                return Err(Failure::Error(format!(
                    "no task record for {id} (unknown id, expired, or the workers do not track task states)"
                )));
            };
            if ctx.json {
                output::print_json(&json!(task));
            } else {
                show(&task);
            }
            Ok(())
        }
        TasksCommand::Cancel { id, pending_only } => {
            let mode = if pending_only {
                CancelMode::Pending
            } else {
                CancelMode::Abort
            };
            let outcome = app.cancel_with(&id, mode).await?;
            let (name, text) = match &outcome {
                CancelOutcome::Cancelled => ("cancelled", "cancelled: it will not run".to_owned()),
                CancelOutcome::Aborting => ("aborting", "running: its worker is stopping it".to_owned()),
                CancelOutcome::Running => ("running", "running: it goes on (--pending-only)".to_owned()),
                CancelOutcome::Finished(s) => ("finished", format!("already finished ({s}): nothing to cancel")),
                CancelOutcome::Unknown => (
                    "unknown",
                    "no record of it; the request is kept, so a worker that receives it skips it".to_owned(),
                ),
                _ => ("other", format!("{outcome:?}")),
            };
            if ctx.json {
                let status = match &outcome {
                    CancelOutcome::Finished(s) => Some(*s),
                    _ => None,
                };
                output::print_json(&json!({ "message_id": id, "outcome": name, "status": status }));
            } else {
                out!("{id}: {text}");
            }
            Ok(())
        }
        TasksCommand::Stats { actor, queue } => {
            let filter = Filter {
                status: None,
                actor,
                queue,
                since: None,
            };
            let counts = app.task_counts(&filter.to_filter()).await?;
            if ctx.json {
                output::print_json(&json!({
                    "total": counts.total(),
                    "by_status": counts.by_status,
                    "by_actor": counts.by_actor,
                    "by_queue": counts.by_queue,
                }));
                return Ok(());
            }
            let mut table = output::table(["status", "tasks"]);
            for status in TaskStatus::ALL {
                table.add_row(vec![status_cell(status), Cell::new(counts.status(status))]);
            }
            table.add_row(vec![Cell::new("total"), Cell::new(counts.total())]);
            out!("{table}");
            Ok(())
        }
    }
}

fn show(t: &TaskRecord) {
    out!("message id: {}", t.message_id);
    out!("actor:      {}", t.actor);
    out!("queue:      {}", t.queue);
    out!("status:     {}", t.status);
    out!("attempts:   {}", t.attempts);
    out!("sent:       {}", output::time(t.enqueued_at));
    if let Some(s) = t.started_at {
        out!("started:    {}", output::time(s));
    }
    if let Some(f) = t.finished_at {
        out!("finished:   {}", output::time(f));
    }
    if let Some(eta) = t.eta {
        out!("eta:        {} ({})", output::time(eta), ago(eta));
    }
    if let Some(w) = &t.worker {
        out!("worker:     {w}");
    }
    if let Some(p) = &t.progress {
        out!("progress:   {p}");
    }
    if let Some(a) = &t.args {
        out!("arguments:  {a}");
    }
    if let Some(e) = &t.error {
        out!(
            "error:      {}{e}",
            t.error_type.as_deref().map(|t| format!("{t}: ")).unwrap_or_default()
        );
    }
}
