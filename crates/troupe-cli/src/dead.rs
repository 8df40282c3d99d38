//! `troupe dead list|show|requeue|purge`.

use std::io::IsTerminal;
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use troupe::DeadLetter;

use crate::context::Context;
use crate::output::{self, Cell, ago, cut, out};
use crate::{Failure, Outcome, confirm};

/// How many ids one requeue or delete call carries.
const CHUNK: usize = 200;

#[derive(Debug, Subcommand)]
pub(crate) enum DeadCommand {
    /// Lists dead letters, oldest first.
    List {
        #[command(flatten)]
        filter: Filter,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Shows one dead letter: its message, reason and traceback.
    Show {
        /// Its id (the message id, as `dead list` shows it).
        id: String,
        /// Its queue (default: search every queue).
        #[arg(long = "queue", short = 'q')]
        queue: Option<String>,
    },
    /// Puts dead letters back on their queue with their retries reset: the ids given, else
    /// every one the filters match.
    Requeue(Bulk),
    /// Deletes dead letters: the ids given, else every one the filters match.
    Purge(Bulk),
}

#[derive(Debug, Args)]
pub(crate) struct Filter {
    /// Only these queues (repeat the flag; default: every queue).
    #[arg(long = "queue", short = 'q')]
    queues: Vec<String>,
    /// Only messages of this actor.
    #[arg(long)]
    actor: Option<String>,
    /// Only those that died longer ago than this ("1h", "2d").
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// Only those that died within this ("30m").
    #[arg(long, value_parser = humantime::parse_duration)]
    newer_than: Option<Duration>,
}

#[derive(Debug, Args)]
pub(crate) struct Bulk {
    /// The dead letters' ids (default: every one the filters match).
    ids: Vec<String>,
    #[command(flatten)]
    filter: Filter,
    /// Do not ask for confirmation (required for a bulk action when stdin is not a terminal).
    #[arg(long, short = 'y')]
    yes: bool,
}

impl Filter {
    fn narrows(&self) -> bool {
        self.actor.is_some() || self.older_than.is_some() || self.newer_than.is_some()
    }

    fn matches(&self, letter: &DeadLetter, now: u64) -> bool {
        if let Some(actor) = &self.actor
            && letter.message.as_ref().map_or(true, |m| &m.actor_name != actor)
        {
            return false;
        }
        let age = now.saturating_sub(letter.failed_at);
        if self.older_than.is_some_and(|d| u128::from(age) < d.as_millis()) {
            return false;
        }
        if self.newer_than.is_some_and(|d| u128::from(age) > d.as_millis()) {
            return false;
        }
        true
    }
}

/// The queues to look in: those named, else every queue the broker knows.
async fn queues(ctx: &Context, named: &[String]) -> Result<Vec<String>, Failure> {
    if named.is_empty() {
        return Ok(ctx.broker.queue_names().await?);
    }
    named
        .iter()
        .map(|q| {
            let q = troupe::queue::q_name(q).to_owned();
            troupe::queue::validate_queue_name(&q)?;
            Ok(q)
        })
        .collect()
}

/// The dead letters matching `filter` (with `ids`, only those), per queue, at most `limit`.
async fn matching(
    ctx: &Context,
    filter: &Filter,
    ids: &[String],
    limit: usize,
) -> Result<Vec<(String, DeadLetter)>, Failure> {
    let now = troupe::now_ms();
    let fetch = if filter.narrows() || !ids.is_empty() {
        usize::MAX
    } else {
        limit
    };
    let mut out = Vec::new();
    for queue in queues(ctx, &filter.queues).await? {
        for letter in ctx.broker.dead_letters(&queue, fetch).await? {
            if out.len() >= limit {
                return Ok(out);
            }
            if (ids.is_empty() || ids.contains(&letter.id)) && filter.matches(&letter, now) {
                out.push((queue.clone(), letter));
            }
        }
    }
    Ok(out)
}

fn letter_json(queue: &str, letter: &DeadLetter) -> Value {
    let (message, error) = match &letter.message {
        Ok(m) => (serde_json::to_value(m).unwrap_or(Value::Null), Value::Null),
        Err(e) => (Value::Null, Value::String(e.clone())),
    };
    json!({
        "id": letter.id,
        "queue": queue,
        "actor": letter.message.as_ref().ok().map(|m| m.actor_name.clone()),
        "failed_at": letter.failed_at,
        "reason": letter.reason,
        "message": message,
        "error": error,
    })
}

pub(crate) async fn run(ctx: &Context, command: DeadCommand) -> Outcome {
    match command {
        DeadCommand::List { filter, limit } => list(ctx, &filter, limit).await,
        DeadCommand::Show { id, queue } => show(ctx, &id, queue).await,
        DeadCommand::Requeue(bulk) => act(ctx, &bulk, Action::Requeue).await,
        DeadCommand::Purge(bulk) => act(ctx, &bulk, Action::Delete).await,
    }
}

async fn list(ctx: &Context, filter: &Filter, limit: usize) -> Outcome {
    let letters = matching(ctx, filter, &[], limit).await?;
    if ctx.json {
        let list: Vec<Value> = letters.iter().map(|(q, l)| letter_json(q, l)).collect();
        output::print_json(&json!({ "dead_letters": list }));
        return Ok(());
    }
    if letters.is_empty() {
        out!("no dead letters");
        return Ok(());
    }
    let mut table = output::table(["id", "queue", "actor", "died", "reason"]);
    for (queue, letter) in &letters {
        table.add_row(vec![
            Cell::new(&letter.id),
            Cell::new(queue),
            Cell::new(
                letter
                    .message
                    .as_ref()
                    .map_or("(undecodable)", |m| m.actor_name.as_str()),
            ),
            Cell::new(ago(letter.failed_at)),
            Cell::new(cut(&letter.reason, 60)),
        ]);
    }
    out!("{table}");
    Ok(())
}

async fn show(ctx: &Context, id: &str, queue: Option<String>) -> Outcome {
    let filter = Filter {
        queues: queue.into_iter().collect(),
        actor: None,
        older_than: None,
        newer_than: None,
    };
    let found = matching(ctx, &filter, &[id.to_owned()], 1).await?;
    let Some((queue, letter)) = found.into_iter().next() else {
        return Err(Failure::Error(format!(
            "no dead letter with id {id}; `troupe dead list` shows the ids"
        )));
    };
    if ctx.json {
        output::print_json(&letter_json(&queue, &letter));
        return Ok(());
    }
    out!("id:        {}", letter.id);
    out!("queue:     {queue}");
    out!(
        "died:      {} ({})",
        output::time(letter.failed_at),
        ago(letter.failed_at)
    );
    match &letter.message {
        Ok(m) => {
            out!("actor:     {}", m.actor_name);
            out!("args:      {}", Value::Array(m.args.clone()));
            out!("kwargs:    {}", Value::Object(m.kwargs.clone()));
            out!("retries:   {}", m.retries());
            let mut options = m.options.clone();
            let traceback = options.shift_remove("traceback");
            out!("options:   {}", Value::Object(options.into_iter().collect()));
            out!("reason:    {}", letter.reason.lines().next().unwrap_or(""));
            if let Some(Value::String(tb)) = traceback {
                out!("traceback:\n{tb}");
            } else if letter.reason.lines().count() > 1 {
                out!("traceback:\n{}", letter.reason);
            }
        }
        Err(e) => {
            out!("message:   undecodable ({e})");
            out!("reason:    {}", letter.reason);
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Action {
    Requeue,
    Delete,
}

async fn act(ctx: &Context, bulk: &Bulk, action: Action) -> Outcome {
    let verb = if action == Action::Requeue { "requeue" } else { "delete" };
    // Every dead letter of the queues, unfiltered: a queue's purge is one call.
    if action == Action::Delete && bulk.ids.is_empty() && !bulk.filter.narrows() {
        let queues = queues(ctx, &bulk.filter.queues).await?;
        let mut total = 0;
        for q in &queues {
            total += ctx.broker.stats(q).await?.dead;
        }
        if total > 0
            && !confirm(
                &format!("delete all {total} dead letters of {}?", queues.join(", ")),
                bulk.yes,
            )?
        {
            return Err(Failure::Error("nothing deleted".into()));
        }
        let mut deleted = 0;
        for q in &queues {
            deleted += ctx.broker.purge_dead_letters(q).await?;
        }
        return report(ctx, action, total, deleted);
    }
    let letters = matching(ctx, &bulk.filter, &bulk.ids, usize::MAX).await?;
    if letters.is_empty() {
        if bulk.ids.is_empty() {
            return report(ctx, action, 0, 0);
        }
        return Err(Failure::Error(format!(
            "no dead letter matches {}; `troupe dead list` shows the ids",
            bulk.ids.join(", ")
        )));
    }
    if bulk.ids.is_empty() && !confirm(&format!("{verb} {} dead letters?", letters.len()), bulk.yes)? {
        return Err(Failure::Error(format!("nothing to {verb}: not confirmed")));
    }
    let progress = if !ctx.json && std::io::stderr().is_terminal() && letters.len() > CHUNK {
        let bar = ProgressBar::new(letters.len() as u64);
        if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta} left)") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("{verb}ing"));
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut by_queue: std::collections::BTreeMap<&str, Vec<String>> = std::collections::BTreeMap::new();
    for (q, letter) in &letters {
        by_queue.entry(q.as_str()).or_default().push(letter.id.clone());
    }
    let mut done = 0;
    for (queue, ids) in by_queue {
        for chunk in ids.chunks(CHUNK) {
            done += match action {
                Action::Requeue => ctx.broker.requeue_dead_letters(queue, chunk).await?,
                Action::Delete => ctx.broker.delete_dead_letters(queue, chunk).await?,
            };
            progress.inc(chunk.len() as u64);
        }
    }
    progress.finish_and_clear();
    report(ctx, action, letters.len() as u64, done)
}

fn report(ctx: &Context, action: Action, matched: u64, done: u64) -> Outcome {
    let key = if action == Action::Requeue {
        "requeued"
    } else {
        "deleted"
    };
    if ctx.json {
        output::print_json(&json!({ "matched": matched, key: done }));
    } else {
        out!("{key} {done} of {matched} dead letters");
    }
    if action == Action::Requeue && done < matched {
        eprintln!(
            "troupe: {} dead letters were not requeued (undecodable bytes stay dead; delete them with `troupe dead purge ID`)",
            matched - done
        );
    }
    Ok(())
}
