//! `troupe`: look at and act on a Troupe (or Python Dramatiq) broker from a shell.
//!
//! ```text
//! troupe --broker-url redis://127.0.0.1:6379 queues
//! troupe dead list --queue emails --older-than 1h
//! troupe enqueue send_email --args '["a@example.com"]' --queue emails --delay 10s
//! troupe --state-url postgres://... tasks list --status failed
//! ```
//!
//! Human tables by default; `--json` prints one JSON document (documented in
//! `docs/operations.md`). Exit codes: 0 success, 1 a broker or input error (one line on
//! stderr), 2 bad usage.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

mod context;
mod dead;
mod output;
mod queues;
mod tasks;

use context::Context;
use output::out;

/// Look at and act on the queues, dead letters, tasks and workers of a Troupe broker.
#[derive(Debug, Parser)]
#[command(name = "troupe", version, propagate_version = true)]
struct Cli {
    /// Broker URL (sqlite://PATH, redis://HOST, amqp://HOST, postgres://HOST).
    #[arg(long, global = true, env = "TROUPE_BROKER_URL", hide_env_values = true)]
    broker_url: Option<String>,

    /// State backend URL, for `tasks` (default: the broker URL when it is SQLite, Redis or
    /// PostgreSQL).
    #[arg(long, global = true, env = "TROUPE_STATE_URL", hide_env_values = true)]
    state_url: Option<String>,

    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Per queue: messages ready, delayed, in flight and dead.
    Queues(queues::QueuesArgs),
    /// The dead letters: list, show, requeue, purge.
    #[command(subcommand)]
    Dead(dead::DeadCommand),
    /// Enqueues a message for an actor by name, as Python's `send_with_options` would; prints
    /// its id.
    Enqueue(EnqueueArgs),
    /// Task states (needs a state backend with task tracking): list, show, cancel, stats.
    #[command(subcommand)]
    Tasks(tasks::TasksCommand),
    /// Live workers: their queues, what they hold, their last heartbeat.
    Workers,
    /// Deletes every message of a queue: ready, delayed and dead.
    Purge(PurgeArgs),
    /// Serves the web dashboard: queues, messages, dead letters, task states, workers.
    Dashboard(DashboardArgs),
    /// Prints a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
struct EnqueueArgs {
    /// The actor's name.
    actor: String,
    /// Positional arguments, a JSON array.
    #[arg(long, default_value = "[]")]
    args: String,
    /// Keyword arguments, a JSON object.
    #[arg(long)]
    kwargs: Option<String>,
    /// The queue.
    #[arg(long, short = 'q', default_value = "default")]
    queue: String,
    /// Run it after this delay ("10s", "5m").
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// Its priority: lower runs first, -10..=10.
    #[arg(long, allow_hyphen_values = true)]
    priority: Option<i32>,
    /// More message options, a JSON object (`{"max_retries": 3}`).
    #[arg(long)]
    options: Option<String>,
    /// Record the message's task state from now, as an app with task tracking does, so
    /// `troupe tasks show ID` finds it before a worker takes it (needs a state backend).
    #[arg(long)]
    track: bool,
}

#[derive(Debug, Args)]
struct DashboardArgs {
    /// Where to listen; any address but loopback needs --token.
    #[arg(long, default_value = "127.0.0.1:8787")]
    bind: std::net::SocketAddr,
    /// The token to ask for (asked once on a login page).
    #[arg(long, env = "TROUPE_DASHBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Args)]
struct PurgeArgs {
    /// The queue.
    queue: String,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    yes: bool,
}

/// A failure: what to print and how to exit.
#[derive(Debug)]
enum Failure {
    /// A broker or input error: exit 1.
    Error(String),
    /// Bad usage: exit 2.
    Usage(String),
}

impl From<troupe::Error> for Failure {
    fn from(e: troupe::Error) -> Self {
        Self::Error(e.to_string())
    }
}

type Outcome = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("troupe: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Error(message)) => {
            eprintln!("troupe: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("troupe: {message}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Outcome {
    if let Command::Completions { shell } = cli.command {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "troupe", &mut script);
        output::write_out(format_args!("{}", String::from_utf8_lossy(&script)));
        return Ok(());
    }
    let ctx = Context::connect(cli.broker_url.as_deref(), cli.state_url.as_deref(), cli.json).await?;
    let result = match cli.command {
        Command::Queues(args) => queues::run(&ctx, &args).await,
        Command::Dead(command) => dead::run(&ctx, command).await,
        Command::Enqueue(args) => enqueue(&ctx, args).await,
        Command::Tasks(command) => tasks::run(&ctx, command).await,
        Command::Workers => queues::workers(&ctx).await,
        Command::Purge(args) => purge(&ctx, &args).await,
        Command::Dashboard(args) => dashboard(&ctx, args).await,
        Command::Completions { .. } => Ok(()),
    };
    ctx.close().await;
    result
}

fn parse_json(what: &str, text: &str) -> Result<serde_json::Value, Failure> {
    serde_json::from_str(text).map_err(|e| Failure::Usage(format!("{what} is not valid JSON ({e}): {text}")))
}

async fn enqueue(ctx: &Context, args: EnqueueArgs) -> Outcome {
    let serde_json::Value::Array(positional) = parse_json("--args", &args.args)? else {
        return Err(Failure::Usage(
            "--args must be a JSON array, such as '[1, \"two\"]'".into(),
        ));
    };
    let kwargs = match args.kwargs.as_deref().map(|k| parse_json("--kwargs", k)).transpose()? {
        None => serde_json::Map::new(),
        Some(serde_json::Value::Object(map)) => map,
        Some(_) => {
            return Err(Failure::Usage(
                "--kwargs must be a JSON object, such as '{\"to\": \"a@b.c\"}'".into(),
            ));
        }
    };
    let mut message = troupe::Message::new(args.queue.as_str(), args.actor.as_str(), positional, kwargs);
    match args
        .options
        .as_deref()
        .map(|o| parse_json("--options", o))
        .transpose()?
    {
        None => {}
        Some(serde_json::Value::Object(map)) => message.options.extend(map),
        Some(_) => {
            return Err(Failure::Usage(
                "--options must be a JSON object, such as '{\"max_retries\": 3}'".into(),
            ));
        }
    }
    if let Some(priority) = args.priority {
        let (min, max) = (troupe::priority::MIN, troupe::priority::MAX);
        if !(min..=max).contains(&priority) {
            return Err(Failure::Usage(format!(
                "--priority {priority} is out of range; use {min}..={max} (lower runs first)"
            )));
        }
        message = message.with_priority(priority);
    }
    let sent = if args.track {
        ctx.tracking_app()?.enqueue(message, args.delay).await?
    } else {
        ctx.app().enqueue(message, args.delay).await?
    };
    if ctx.json {
        output::print_json(&serde_json::json!({
            "message_id": sent.message_id,
            "queue": troupe::queue::q_name(&sent.queue_name),
            "actor": sent.actor_name,
            // SQL brokers delay in the database and leave no eta in the message.
            "eta": sent.options.get("eta").cloned().or_else(|| {
                args.delay.map(|d| serde_json::Value::from(troupe::now_ms() + u64::try_from(d.as_millis()).unwrap_or(0)))
            }),
        }));
    } else {
        out!("{}", sent.message_id);
    }
    Ok(())
}

async fn dashboard(ctx: &Context, args: DashboardArgs) -> Outcome {
    let mut dashboard = troupe_dashboard::Dashboard::new(ctx.app().clone());
    if let Some(token) = args.token {
        dashboard = dashboard.token(token);
    }
    let server = dashboard.start(args.bind).await.map_err(|e| match e {
        troupe::Error::Config(m) => Failure::Usage(m),
        other => Failure::from(other),
    })?;
    eprintln!(
        "troupe: the dashboard is on http://{}/ (Ctrl-C stops it)",
        server.local_addr()
    );
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return Ok(());
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    Ok(())
}

/// Asks "`question` [y/N]" on a terminal; without one, `yes` must be given.
pub(crate) fn confirm(question: &str, yes: bool) -> Result<bool, Failure> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Usage(format!(
            "{question}: refusing without --yes when stdin is not a terminal"
        )));
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| Failure::Error(format!("cannot read the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

async fn purge(ctx: &Context, args: &PurgeArgs) -> Outcome {
    let queue = troupe::queue::q_name(&args.queue).to_owned();
    troupe::queue::validate_queue_name(&queue)?;
    let before = ctx.broker.stats(&queue).await?;
    let question = format!(
        "delete every message of {queue} ({} ready, {} delayed, {} dead)?",
        before.ready, before.delayed, before.dead
    );
    if !confirm(&question, args.yes)? {
        return Err(Failure::Error("not purged".into()));
    }
    ctx.broker.purge(&queue).await?;
    if ctx.json {
        output::print_json(&serde_json::json!({
            "queue": queue,
            "purged": {"ready": before.ready, "delayed": before.delayed, "dead": before.dead},
        }));
    } else {
        out!(
            "purged {queue}: {} ready, {} delayed, {} dead",
            before.ready,
            before.delayed,
            before.dead
        );
    }
    Ok(())
}
