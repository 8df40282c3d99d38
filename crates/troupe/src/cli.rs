//! `run_worker`: the `main` of a worker binary, with Dramatiq's flags and exit codes.

use std::process::ExitCode;
use std::sync::Arc;

use troupe_core::{App, AppBuilder, Broker, Error, ErrorKind, Result, ResultBackend, StateBackend, redact_url};
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
/// `build` gets the broker only; a worker that stores results or keeps state uses
/// [`run_worker_with`], which also connects `--results-url` and `--state-url`. Given either
/// flag (or `TROUPE_RESULTS_URL`/`TROUPE_STATE_URL`), `run_worker` refuses to start (exit
/// code 2) rather than ignore it.
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
    let given: Vec<&str> = [
        (args.results_url.is_some(), "--results-url (TROUPE_RESULTS_URL)"),
        (args.state_url.is_some(), "--state-url (TROUPE_STATE_URL)"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect();
    if !given.is_empty() {
        eprintln!(
            "error: {} given, but this worker builds its app from the broker alone (troupe::run_worker); build it with troupe::run_worker_with to use them",
            given.join(" and ")
        );
        return exit_code::BAD_ARGUMENTS;
    }
    run_worker_status_with(args, |backends| build(backends.broker)).await
}

/// What [`run_worker_with`] connected from the flags, for the app factory.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Backends {
    /// The broker (`--broker-url`, or [`DEFAULT_BROKER_URL`]).
    pub broker: Arc<dyn Broker>,
    /// The results backend, when `--results-url` (or `TROUPE_RESULTS_URL`) is given.
    pub results: Option<Arc<dyn ResultBackend>>,
    /// The state backend, when `--state-url` (or `TROUPE_STATE_URL`) is given.
    pub state: Option<Arc<dyn StateBackend>>,
}

impl Backends {
    /// `App::builder(broker)` with the results and state backends that were given.
    pub fn app_builder(self) -> AppBuilder {
        let mut builder = App::builder(self.broker);
        if let Some(results) = self.results {
            builder = builder.results(results);
        }
        if let Some(state) = self.state {
            builder = builder.state(state);
        }
        builder
    }
}

/// [`run_worker`] with results and state: also connects `--results-url` and `--state-url`
/// (`TROUPE_RESULTS_URL`, `TROUPE_STATE_URL`) when given and hands every backend to `build`.
/// A results or state backend that cannot be reached at start exits with code 3, a bad URL
/// with code 2; URLs are printed without their password.
///
/// ```no_run
/// use troupe::prelude::*;
///
/// #[troupe::actor(store_results = true)]
/// async fn add(x: i64, y: i64) -> i64 { x + y }
///
/// #[tokio::main]
/// async fn main() -> std::process::ExitCode {
///     // worker --broker-url redis://localhost --results-url redis://localhost
///     let args = troupe::worker::WorkerArgs::from_env();
///     troupe::run_worker_with(args, |backends| backends.app_builder().actor(Add).build()).await
/// }
/// ```
pub async fn run_worker_with<F>(args: WorkerArgs, build: F) -> ExitCode
where
    F: FnOnce(Backends) -> Result<App>,
{
    ExitCode::from(run_worker_status_with(args, build).await)
}

/// [`run_worker_with`], returning the exit code as a number (see [`worker::exit_code`](crate::worker::exit_code)).
pub async fn run_worker_status_with<F>(args: WorkerArgs, build: F) -> u8
where
    F: FnOnce(Backends) -> Result<App>,
{
    init_logging(args.verbose);
    if args.processes > 1 && !troupe_worker::is_supervised() {
        return supervise(&args).await;
    }
    let url = args.broker_url.clone().unwrap_or_else(|| DEFAULT_BROKER_URL.to_owned());
    let broker = match crate::connect(&url).await {
        Ok(broker) => broker,
        Err(e) => return start_failure("the broker", &url, &e),
    };
    let results = match &args.results_url {
        Some(url) => match crate::connect_results(url).await {
            Ok(results) => Some(results),
            Err(e) => return start_failure("the results backend", url, &e),
        },
        None => None,
    };
    let state = match &args.state_url {
        Some(url) => match crate::connect_state(url).await {
            Ok(state) => Some(state),
            Err(e) => return start_failure("the state backend", url, &e),
        },
        None => None,
    };
    let app = match build(Backends { broker, results, state }) {
        Ok(app) => app,
        Err(e) => {
            eprintln!("error: {e}");
            return exit_code::BAD_ARGUMENTS;
        }
    };
    let (app, _metrics) = match with_metrics(&args, app).await {
        Ok(with) => with,
        Err(code) => return code,
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

/// Prints why connecting to `what` at `url` failed; returns the exit code: 2 for a bad URL or
/// setting, 3 for a server that cannot be reached.
fn start_failure(what: &str, url: &str, e: &Error) -> u8 {
    if e.kind() == ErrorKind::Config {
        eprintln!("error: {e}");
        exit_code::BAD_ARGUMENTS
    } else {
        eprintln!("error: cannot reach {what} at {}: {e}", redact_url(url));
        exit_code::BROKER_UNREACHABLE
    }
}

/// Where a supervisor (`--processes`) tells its worker processes to write their metrics.
#[cfg(feature = "prometheus")]
const METRICS_DIR_ENV: &str = "TROUPE_METRICS_DIR";

/// `--processes N`: runs N worker processes of this binary (see [`troupe_worker::Supervisor`]);
/// with `--metrics-bind`, serves the sum of their metrics.
async fn supervise(args: &WorkerArgs) -> u8 {
    let supervisor = troupe_worker::Supervisor::new(usize::from(args.processes));
    let Some(bind) = args.metrics_bind else {
        return supervisor.run(|_| {}).await;
    };
    #[cfg(feature = "prometheus")]
    {
        let dir = std::env::temp_dir().join(format!("troupe-metrics-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("error: cannot create {} for the processes' metrics: {e}", dir.display());
            return exit_code::BAD_ARGUMENTS;
        }
        let server = match troupe_prometheus::serve_merged(bind, dir.clone()).await {
            Ok(server) => server,
            Err(e) => {
                eprintln!("error: {e}");
                return exit_code::BAD_ARGUMENTS;
            }
        };
        tracing::info!(addr = %server.local_addr(), "serving the worker processes' metrics at /metrics");
        let exited = dir.clone();
        let code = supervisor
            .env(METRICS_DIR_ENV, dir.as_os_str())
            .run(move |pid| troupe_prometheus::mark_exited(&exited, pid))
            .await;
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
        code
    }
    #[cfg(not(feature = "prometheus"))]
    {
        let _ = (bind, supervisor);
        eprintln!("error: --metrics-bind needs troupe's `prometheus` feature; enable it in Cargo.toml");
        exit_code::BAD_ARGUMENTS
    }
}

/// `--metrics-bind`: the app with the metrics middleware first, and what keeps the metrics
/// served (or, in a supervised process, written for the supervisor) while it lives.
async fn with_metrics(
    args: &WorkerArgs,
    app: App,
) -> std::result::Result<(App, Option<Box<dyn std::any::Any + Send>>), u8> {
    let Some(bind) = args.metrics_bind else {
        return Ok((app, None));
    };
    #[cfg(feature = "prometheus")]
    {
        let metrics = match troupe_prometheus::Prometheus::new() {
            Ok(m) => m,
            Err(e) => {
                eprintln!("error: {e}");
                return Err(exit_code::BAD_ARGUMENTS);
            }
        };
        let app = app.with_outer_middleware(metrics.middleware());
        if let Some(dir) = std::env::var_os(METRICS_DIR_ENV).filter(|_| troupe_worker::is_supervised()) {
            let file = troupe_prometheus::live_file(std::path::Path::new(&dir), std::process::id());
            let writer = metrics.write_every(&file, std::time::Duration::from_secs(1), app.clone());
            return Ok((app, Some(Box::new(writer))));
        }
        match metrics.serve(bind, app.clone()).await {
            Ok(server) => {
                tracing::info!(addr = %server.local_addr(), "serving metrics at /metrics");
                Ok((app, Some(Box::new(server))))
            }
            Err(e) => {
                eprintln!("error: {e}");
                Err(exit_code::BAD_ARGUMENTS)
            }
        }
    }
    #[cfg(not(feature = "prometheus"))]
    {
        let _ = (bind, app);
        eprintln!("error: --metrics-bind needs troupe's `prometheus` feature; enable it in Cargo.toml");
        Err(exit_code::BAD_ARGUMENTS)
    }
}
