//! Command-line flags for worker binaries, as Dramatiq's CLI has them.

use std::time::Duration;

use crate::WorkerBuilder;

/// Dramatiq's exit codes.
pub mod exit_code {
    /// Clean shutdown.
    pub const OK: u8 = 0;
    /// Killed by a second signal.
    pub const KILLED: u8 = 1;
    /// Bad arguments or configuration.
    pub const BAD_ARGUMENTS: u8 = 2;
    /// The broker could not be reached at start.
    pub const BROKER_UNREACHABLE: u8 = 3;
}

/// Flags for a worker's `main`, Dramatiq style. Flatten it into your own clap parser, or
/// parse it alone with `WorkerArgs::parse()`.
///
/// ```
/// use clap::Parser;
/// use troupe_worker::WorkerArgs;
///
/// let args = WorkerArgs::parse_from(["worker", "--concurrency", "4", "--queues", "emails", "--queues", "ocr"]);
/// assert_eq!(args.concurrency, Some(4));
/// assert_eq!(args.queues, vec!["emails", "ocr"]);
///
/// let args = WorkerArgs::parse_from(["worker", "--results-url", "sqlite://r.db", "--state-url", "memory://"]);
/// assert_eq!(args.results_url.as_deref(), Some("sqlite://r.db"));
/// assert_eq!(args.state_url.as_deref(), Some("memory://"));
/// ```
///
/// `--broker-url`, `--results-url` and `--state-url` also come from `TROUPE_BROKER_URL`,
/// `TROUPE_RESULTS_URL` and `TROUPE_STATE_URL`; a flag wins over its variable.
#[derive(Clone, Debug, clap::Parser)]
#[command(about = "Run a Troupe worker")]
#[non_exhaustive]
pub struct WorkerArgs {
    /// Broker URL (memory://, sqlite://PATH, redis://HOST, amqp://HOST, postgres://HOST).
    #[arg(long, env = "TROUPE_BROKER_URL")]
    pub broker_url: Option<String>,

    /// Results backend URL (memory://, sqlite://PATH, redis://HOST, postgres://HOST); none by
    /// default.
    #[arg(long, env = "TROUPE_RESULTS_URL")]
    pub results_url: Option<String>,

    /// State backend URL (memory://, sqlite://PATH, redis://HOST, postgres://HOST); none by
    /// default.
    #[arg(long, env = "TROUPE_STATE_URL")]
    pub state_url: Option<String>,

    /// Messages processed at once (default 8 per core).
    #[arg(short = 'c', long, visible_alias = "threads")]
    pub concurrency: Option<usize>,

    /// Only consume these queues (repeat the flag, or separate with commas).
    #[arg(short = 'Q', long, value_delimiter = ',')]
    pub queues: Vec<String>,

    /// Messages held per queue, running ones included: a fixed window (default: adapts to the
    /// queue's rate, from 2 × concurrency up to 256; see `WorkerBuilder::prefetch`).
    #[arg(long)]
    pub prefetch: Option<usize>,

    /// Delayed messages held per queue until their eta (default min(1000 × concurrency,
    /// 8000); Dramatiq's `dramatiq_delay_queue_prefetch`).
    #[arg(long)]
    pub delay_prefetch: Option<usize>,

    /// How long a graceful shutdown waits for running actors ("30s", "10m").
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub shutdown_timeout: Duration,

    /// Run this many worker processes of this binary, supervised: one that dies is started
    /// again, SIGINT/SIGTERM reach all of them (Dramatiq's `--processes`; default 1, no
    /// supervisor).
    #[arg(short = 'p', long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub processes: u16,

    /// Serve Prometheus metrics (Dramatiq's names) on this address at `/metrics`, e.g.
    /// `127.0.0.1:9191` (Dramatiq's port is 9191); with `--processes`, the sum over the
    /// processes.
    #[arg(long, env = "TROUPE_METRICS_BIND")]
    pub metrics_bind: Option<std::net::SocketAddr>,

    /// More logging: -v for debug, -vv for trace.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl WorkerArgs {
    /// Parses the process's arguments; on a bad flag prints the usage and exits with code 2.
    #[must_use]
    pub fn from_env() -> Self {
        <Self as clap::Parser>::parse()
    }

    /// Applies the flags to a worker builder.
    pub fn apply(&self, mut builder: WorkerBuilder) -> WorkerBuilder {
        if let Some(n) = self.concurrency {
            builder = builder.concurrency(n);
        }
        if !self.queues.is_empty() {
            builder = builder.queues(self.queues.clone());
        }
        if let Some(n) = self.prefetch {
            builder = builder.prefetch(n);
        }
        if let Some(n) = self.delay_prefetch {
            builder = builder.delay_prefetch(n);
        }
        builder.shutdown_timeout(self.shutdown_timeout)
    }
}

/// Sets up logging to stderr: info by default, debug with `verbose` 1, trace with 2;
/// `RUST_LOG` overrides; colours only when stderr is a terminal. Does nothing if a subscriber
/// is already set.
pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: piped or collected logs stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
