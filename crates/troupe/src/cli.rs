//! `run_worker`: the `main` of a worker binary, with Dramatiq's flags and exit codes.

use std::process::ExitCode;
use std::sync::Arc;

use troupe_core::{App, Broker, ErrorKind, Result, redact_url};
use troupe_worker::{Worker, WorkerArgs, exit_code, init_logging};

/// The broker URL used when neither `--broker-url` nor `TROUPE_BROKER_URL` is given: the
/// embedded SQLite file `troupe.db` in the working directory.
#[cfg(feature = "broker-sqlite")]
pub const DEFAULT_BROKER_URL: &str = "sqlite://troupe.db";
/// The broker URL used when neither `--broker-url` nor `TROUPE_BROKER_URL` is given.
#[cfg(not(feature = "broker-sqlite"))]
pub const DEFAULT_BROKER_URL: &str = "memory://";

/// Runs a worker from command-line flags until SIGINT/SIGTERM: connects to `--broker-url`,
/// builds the app with `build`, and returns Dramatiq's exit codes (0 clean, 2 bad arguments
/// or configuration, 3 broker unreachable at start). Errors are one line on stderr.
///
/// ```no_run
/// use troupe::prelude::*;
///
/// #[troupe::actor]
/// async fn hello(name: String) { println!("hello {name}") }
///
/// #[tokio::main]
/// async fn main() -> std::process::ExitCode {
///     let args = troupe::worker::WorkerArgs::from_env();
///     troupe::run_worker(args, |broker| App::builder(broker).actor(Hello).build()).await
/// }
/// ```
pub async fn run_worker<F>(args: WorkerArgs, build: F) -> ExitCode
where
    F: FnOnce(Arc<dyn Broker>) -> Result<App>,
{
    ExitCode::from(run_worker_status(args, build).await)
}

/// [`run_worker`], returning the exit code as a number (see [`worker::exit_code`](crate::worker::exit_code)).
pub async fn run_worker_status<F>(args: WorkerArgs, build: F) -> u8
where
    F: FnOnce(Arc<dyn Broker>) -> Result<App>,
{
    init_logging(args.verbose);
    let url = args.broker_url.clone().unwrap_or_else(|| DEFAULT_BROKER_URL.to_owned());
    let broker = match crate::connect(&url).await {
        Ok(broker) => broker,
        Err(e) if e.kind() == ErrorKind::Config => {
            eprintln!("error: {e}");
            return exit_code::BAD_ARGUMENTS;
        }
        Err(e) => {
            eprintln!("error: cannot reach the broker at {}: {e}", redact_url(&url));
            return exit_code::BROKER_UNREACHABLE;
        }
    };
    let app = match build(broker) {
        Ok(app) => app,
        Err(e) => {
            eprintln!("error: {e}");
            return exit_code::BAD_ARGUMENTS;
        }
    };
    match args.apply(Worker::builder(app)).run().await {
        Ok(()) => exit_code::OK,
        Err(e) if e.kind() == ErrorKind::Config => {
            eprintln!("error: {e}");
            exit_code::BAD_ARGUMENTS
        }
        Err(e) => {
            eprintln!("error: cannot start the worker: {e}");
            exit_code::BROKER_UNREACHABLE
        }
    }
}
