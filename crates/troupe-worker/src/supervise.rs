//! `--processes N`: a supervisor that runs N worker processes of the same binary, restarts one
//! that dies, forwards SIGINT/SIGTERM, and waits for all of them on shutdown.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::process::{Child, Command};

use crate::exit_code;

/// Set in a supervised worker process's environment: its index (0..N). A process that has it
/// runs a worker itself instead of supervising.
pub const PROCESS_ENV: &str = "TROUPE_WORKER_PROCESS";

/// Whether this process is one a [`Supervisor`] started.
#[must_use]
pub fn is_supervised() -> bool {
    std::env::var_os(PROCESS_ENV).is_some()
}

/// A process that exits with one of these codes this soon after starting is refused, not
/// restarted: its arguments or its broker are wrong, and restarting would not fix them.
const STARTUP: Duration = Duration::from_secs(10);

/// A process that ran this long restarts after the shortest backoff again.
const STABLE: Duration = Duration::from_secs(30);

/// Runs N worker processes of the current executable with the current arguments (each with
/// [`PROCESS_ENV`] set to its index), as `dramatiq --processes N` does.
///
/// - A process that exits while the supervisor is not shutting down is started again after a
///   backoff (1 s, doubling up to 30 s; back to 1 s once a process ran 30 s), with a log line.
/// - One that exits with code 2 (bad arguments) or 3 (broker unreachable) within 10 s of
///   starting stops the supervisor with that code: the others are stopped first.
/// - SIGINT and SIGTERM are forwarded to every process (a second signal too: the processes
///   exit at once), and the supervisor returns when all have exited: 0 when every one exited
///   cleanly, else the first non-zero code (1 for a process killed by a signal).
#[derive(Debug)]
#[must_use]
#[non_exhaustive]
pub struct Supervisor {
    processes: usize,
    env: Vec<(String, OsString)>,
    min_backoff: Duration,
    max_backoff: Duration,
}

struct Running {
    child: Child,
    pid: u32,
    started: Instant,
}

impl Supervisor {
    /// A supervisor of `processes` worker processes.
    pub fn new(processes: usize) -> Self {
        Self {
            processes: processes.max(1),
            env: Vec::new(),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }

    /// Sets a variable in every process's environment.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The first and longest wait before a dead process is started again (default 1 s, 30 s).
    pub fn restart_backoff(mut self, first: Duration, longest: Duration) -> Self {
        self.min_backoff = first;
        self.max_backoff = longest.max(first);
        self
    }

    fn spawn(&self, index: usize) -> std::io::Result<Running> {
        let exe = std::env::current_exe()?;
        let mut command = Command::new(exe);
        command
            .args(std::env::args_os().skip(1))
            .env(PROCESS_ENV, index.to_string());
        // A process group of their own: a terminal's Ctrl-C (sent to the foreground group)
        // reaches the supervisor alone, which forwards it once; a process seeing it twice
        // would take it for the second signal and exit at once.
        #[cfg(unix)]
        command.process_group(0);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let child = command.spawn()?;
        let pid = child.id().unwrap_or(0);
        tracing::info!(process = index, pid, "worker process started");
        Ok(Running {
            child,
            pid,
            started: Instant::now(),
        })
    }

    /// Runs the processes until a signal stops them all; returns the exit code (see the type's
    /// docs). `on_exit` is told the pid of every process that exits.
    pub async fn run(self, mut on_exit: impl FnMut(u32) + Send) -> u8 {
        let mut running: Vec<Option<Running>> = Vec::with_capacity(self.processes);
        for i in 0..self.processes {
            match self.spawn(i) {
                Ok(r) => running.push(Some(r)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a worker process");
                    signal_all(&running, Signal::Terminate);
                    wait_all(&mut running, &mut on_exit).await;
                    return exit_code::BAD_ARGUMENTS;
                }
            }
        }
        let mut backoff = vec![self.min_backoff; self.processes];
        let mut restarts: FuturesUnordered<std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send>>> =
            FuturesUnordered::new();
        let mut signals = Signals::new();
        loop {
            let exited = {
                tokio::select! {
                    signal = signals.next() => Err(signal),
                    Some(index) = restarts.next() => Ok(Err(index)),
                    Some((i, status)) = first_exit(&mut running) => Ok(Ok((i, status))),
                }
            };
            match exited {
                Err(signal) => {
                    tracing::info!("stopping the worker processes");
                    signal_all(&running, signal);
                    let code = shut_down(&mut running, &mut signals, &mut on_exit).await;
                    return code;
                }
                Ok(Err(index)) => match self.spawn(index) {
                    Ok(r) => running[index] = Some(r),
                    Err(e) => {
                        tracing::error!(process = index, error = %e, "cannot restart a worker process");
                        let wait = backoff[index];
                        backoff[index] = (wait * 2).min(self.max_backoff);
                        restarts.push(Box::pin(async move {
                            tokio::time::sleep(wait).await;
                            index
                        }));
                    }
                },
                Ok(Ok((i, status))) => {
                    let Some(gone) = running[i].take() else { continue };
                    on_exit(gone.pid);
                    let code = status.as_ref().ok().and_then(std::process::ExitStatus::code);
                    let lived = gone.started.elapsed();
                    if lived < STARTUP
                        && matches!(
                            code.and_then(|c| u8::try_from(c).ok()),
                            Some(exit_code::BAD_ARGUMENTS | exit_code::BROKER_UNREACHABLE)
                        )
                    {
                        let code = code.and_then(|c| u8::try_from(c).ok()).unwrap_or(exit_code::KILLED);
                        tracing::error!(
                            process = i,
                            code,
                            "a worker process could not start; stopping the others"
                        );
                        signal_all(&running, Signal::Terminate);
                        wait_all(&mut running, &mut on_exit).await;
                        return code;
                    }
                    if lived >= STABLE {
                        backoff[i] = self.min_backoff;
                    }
                    let wait = backoff[i];
                    backoff[i] = (wait * 2).min(self.max_backoff);
                    let how = match &status {
                        Ok(s) => describe(s),
                        Err(e) => format!("was lost ({e})"),
                    };
                    tracing::warn!(
                        process = i,
                        pid = gone.pid,
                        "worker process {how}; starting another in {wait:?}"
                    );
                    restarts.push(Box::pin(async move {
                        tokio::time::sleep(wait).await;
                        i
                    }));
                }
            }
        }
    }
}

/// The first of the running processes to exit: its index and status (`None` when none runs).
async fn first_exit(running: &mut [Option<Running>]) -> Option<(usize, std::io::Result<std::process::ExitStatus>)> {
    let mut waits: FuturesUnordered<_> = running
        .iter_mut()
        .enumerate()
        .filter_map(|(i, r)| r.as_mut().map(|r| (i, r)))
        .map(|(i, r)| async move { (i, r.child.wait().await) })
        .collect();
    waits.next().await
}

fn describe(status: &std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("was killed by signal {signal}");
        }
    }
    match status.code() {
        Some(code) => format!("exited with code {code}"),
        None => "exited".to_owned(),
    }
}

/// Forwards the signal to every process, waits for all of them (forwarding further signals
/// too), and returns the exit code.
async fn shut_down(
    running: &mut [Option<Running>],
    signals: &mut Signals,
    on_exit: &mut (impl FnMut(u32) + Send),
) -> u8 {
    let mut code = exit_code::OK;
    loop {
        if running.iter().all(Option::is_none) {
            return code;
        }
        let next = tokio::select! {
            signal = signals.next() => Err(signal),
            Some(done) = first_exit(running) => Ok(done),
        };
        match next {
            Err(signal) => {
                tracing::warn!("second signal: the worker processes exit now");
                signal_all(running, signal);
            }
            Ok((i, status)) => {
                if let Some(gone) = running[i].take() {
                    on_exit(gone.pid);
                }
                let this = match status {
                    Ok(s) => s.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(exit_code::KILLED),
                    Err(_) => exit_code::KILLED,
                };
                if code == exit_code::OK {
                    code = this;
                }
            }
        }
    }
}

async fn wait_all(running: &mut [Option<Running>], on_exit: &mut (impl FnMut(u32) + Send)) {
    for r in running.iter_mut() {
        if let Some(mut gone) = r.take() {
            let _ = gone.child.wait().await;
            on_exit(gone.pid);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Signal {
    Interrupt,
    Terminate,
}

fn signal_all(running: &[Option<Running>], signal: Signal) {
    #[cfg(unix)]
    {
        use nix::sys::signal::{Signal as S, kill};
        use nix::unistd::Pid;
        let s = match signal {
            Signal::Interrupt => S::SIGINT,
            Signal::Terminate => S::SIGTERM,
        };
        for r in running.iter().flatten() {
            if let Ok(pid) = i32::try_from(r.pid) {
                let _ = kill(Pid::from_raw(pid), s);
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (running, signal);
    }
}

/// SIGINT and SIGTERM, as they arrive.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok(),
        }
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            if let Some(term) = self.term.as_mut() {
                return tokio::select! {
                    _ = tokio::signal::ctrl_c() => Signal::Interrupt,
                    _ = term.recv() => Signal::Terminate,
                };
            }
        }
        let _ = tokio::signal::ctrl_c().await;
        Signal::Interrupt
    }
}
