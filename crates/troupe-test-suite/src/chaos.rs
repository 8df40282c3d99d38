//! Chaos rounds: a fault injected again and again under load, with every message's runs and
//! result counted.
//!
//! A round sends a mix of messages ([`Chaos`]: fast, slow, failing once, delayed), starts two
//! worker processes ([`kill::spawn`]), injects the [`Fault`] once a third
//! of them have run, and waits until every message has run. It counts messages never run
//! (lost), runs beyond the first (duplicates), results that were not stored, and the time
//! from the end of the fault until the last message ran (recovery: how long the fault held
//! work up, the redelivery of what a dead worker held included).
//!
//! Link faults put a [`FaultProxy`] between the workers and the server: the children are
//! started with [`SERVER`] set and the backend's [`KillBackend::open`] passes its URL through
//! [`behind_proxy`]. Runs are recorded where the fault cannot reach (the backend's
//! [`Runs`], opened directly, or a file).
//!
//! The number of rounds is [`ChaosRounds::rounds`], or `TROUPE_CHAOS_ROUNDS` when set (CI runs
//! a few; `TROUPE_CHAOS_ROUNDS=10` is the published setting). When `TROUPE_CHAOS_REPORT` names
//! a file, each run appends its summary there as one JSON line. With `TROUPE_CHAOS_AT_DEFAULTS`
//! set, the backends open their brokers at the default lease and heartbeat timeouts
//! ([`at_defaults`]). With `TROUPE_CHAOS_LOGS` set, every round prints what its workers logged
//! (a round that loses messages always does; `TROUPE_CHILD_LOG` sets their level, default
//! `warn`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use troupe_core::middleware::current_message;
use troupe_core::{Actor, ActorError, ActorOptions, Broker, Message, SendOptions};

use crate::kill::{self, KillBackend, Role, Runs, Spawned};
use crate::servers::NetHosts;

/// The environment variable that tells a child the proxy's address (`host:port`) to use in
/// place of its server's.
pub const SERVER: &str = "TROUPE_CHAOS_SERVER";

/// The address of the server `url` names (its host resolved, its port or `default_port`).
///
/// # Panics
/// When the URL has no host or the host does not resolve.
pub async fn server_of(url: &str, default_port: u16) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let target = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    tokio::net::lookup_host(&target)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("{target} resolves"))
}

/// Whether `TROUPE_CHAOS_AT_DEFAULTS` is set: the backends' tests then open their brokers with
/// the default lease or heartbeat timeout rather than the short ones that keep the suite quick,
/// to measure the recovery users get (a dead worker's messages come back after it).
#[must_use]
pub fn at_defaults() -> bool {
    std::env::var_os("TROUPE_CHAOS_AT_DEFAULTS").is_some()
}

/// `url` with its host and port replaced by the proxy's when this process was started behind
/// one ([`SERVER`] set), else `url` unchanged. User, password, path and query are kept.
#[must_use]
pub fn behind_proxy(url: &str) -> String {
    match std::env::var(SERVER) {
        Ok(addr) => with_server(url, &addr),
        Err(_) => url.to_owned(),
    }
}

/// `url` with the host and port of its authority replaced by `addr`.
#[must_use]
pub fn with_server(url: &str, addr: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{tail}")
}

/// A TCP proxy on loopback that forwards to one server until told to fail: it can stop
/// forwarding while keeping every connection open (a stalled link: nothing is closed, nothing
/// arrives) and cut every connection it carries (a dropped link). New connections are
/// accepted throughout; while stalled, they carry nothing either. It can also black-hole the
/// connections it carries now: they stay open and carry nothing, for good, while new ones work
/// (a path that died without a word, which only a time-out or a heartbeat can notice).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    /// Forwarding on, and the black-hole generation: a link born in an earlier one is dead.
    forwarding: watch::Sender<(bool, u64)>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on a free loopback port.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into(), upstream).await
    }

    /// [`FaultProxy::start`], listening on `ip` (a bridge's address, for other network
    /// namespaces) instead of loopback.
    ///
    /// # Panics
    /// When no port can be bound on `ip`.
    pub async fn start_on(ip: std::net::IpAddr, upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.expect("a port for the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (forwarding, _) = watch::channel((true, 0_u64));
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let (forwarding, links) = (forwarding.clone(), Arc::clone(&links));
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let born = forwarding.borrow().1;
                    let link = tokio::spawn(carry(client, upstream, forwarding.subscribe(), born));
                    if let Ok(mut links) = links.lock() {
                        links.retain(|l| !l.is_finished());
                        links.push(link.abort_handle());
                    }
                }
            }
        });
        Self {
            addr,
            forwarding,
            links,
            accept,
        }
    }

    /// Where clients connect.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding; every connection stays open.
    pub fn stall(&self) {
        self.forwarding.send_modify(|(on, _)| *on = false);
    }

    /// Forwards again.
    pub fn resume(&self) {
        self.forwarding.send_modify(|(on, _)| *on = true);
    }

    /// The connections carried now forward nothing from here on and their client side is never
    /// closed by the proxy (its server side closes 20 s later, as a server notices a silent
    /// peer); connections made after it are carried as usual.
    pub fn black_hole(&self) {
        self.forwarding.send_modify(|(_, generation)| *generation += 1);
    }

    /// Closes every connection it carries (new ones are accepted).
    pub fn cut(&self) {
        if let Ok(mut links) = self.links.lock() {
            for link in links.drain(..) {
                link.abort();
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Carries one connection both ways while forwarding is on; ends (closing both sides) when
/// either side closes.
async fn carry(client: TcpStream, upstream: SocketAddr, forwarding: watch::Receiver<(bool, u64)>, born: u64) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut superseded = forwarding.clone();
    tokio::select! {
        () = pump(&mut client_read, &mut server_write, forwarding.clone(), born) => return,
        () = pump(&mut server_read, &mut client_write, forwarding, born) => return,
        () = async {
            let _ = superseded.wait_for(|(_, generation)| *generation != born).await;
            tokio::time::sleep(SERVER_NOTICES_SILENCE).await;
        } => {}
    }
    // Black-holed: the server's side closes (it noticed the silence); the client's side stays
    // open and silent until the proxy cuts it.
    drop((server_read, server_write));
    std::future::pending::<()>().await;
    drop((client_read, client_write));
}

/// How long after a black hole the server's side of each connection closes, as a server
/// notices a silent peer: RabbitMQ after two missed heartbeats (20 s at Troupe's 10 s),
/// PostgreSQL by TCP keepalives when the server sets them, Redis with its `timeout`. (The
/// proxy's kernel answers keepalives, so without this the server would hold every black-holed
/// connection for good, and PostgreSQL would run out of connection slots after a few rounds.)
const SERVER_NOTICES_SILENCE: Duration = Duration::from_secs(20);

async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mut forwarding: watch::Receiver<(bool, u64)>,
    born: u64,
) {
    let mut buf = vec![0_u8; 64 * 1024];
    let live = move |(on, generation): &(bool, u64)| *on && *generation == born;
    loop {
        if forwarding.wait_for(live).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // A stall that began during the read holds what was read.
        if forwarding.wait_for(live).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The network brokers' link chaos tests, the same four everywhere: `run(fault, name)` runs the
/// rounds of one fault (`name` names its queues) and asserts what the broker promises. A
/// server restart ([`Fault::RestartServer`]) needs a private server, which each backend's test
/// starts itself (`chaos_server_restarted`).
///
/// ```text
/// troupe_test_suite::network_chaos_tests!(chaos);
/// ```
#[macro_export]
macro_rules! network_chaos_tests {
    ($run:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn chaos_sigkill_a_worker() {
            $run($crate::chaos::Fault::KillWorker, "chaos-kill").await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn chaos_link_cut() {
            $run($crate::chaos::Fault::CutLink, "chaos-cut").await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn chaos_link_stalled_then_cut() {
            $run(
                $crate::chaos::Fault::StallLink(::std::time::Duration::from_secs(3)),
                "chaos-stall",
            )
            .await;
        }

        /// Every connection black-holed (open, silent, for good): the workers must notice
        /// by a time-out or a heartbeat and reconnect.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn chaos_link_stalled_for_good() {
            $run($crate::chaos::Fault::BlackHoleLink, "chaos-blackhole").await;
        }

        /// One of three worker hosts (network namespaces) cut off while it holds messages,
        /// then back: the other two take its messages over, and it comes back holding
        /// messages it no longer owns.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn chaos_host_cut_off() {
            $run($crate::chaos::Fault::CutHost, "chaos-host").await;
        }
    };
}

/// What the messages of a round do, by kind ([`Chaos`]'s second argument).
pub mod kinds {
    /// Runs for about 5 ms.
    pub const FAST: u64 = 0;
    /// Runs for about 150 ms.
    pub const SLOW: u64 = 1;
    /// Fails its first attempt (retried after 100 ms), then runs fast.
    pub const FAILING: u64 = 2;
    /// Sent with a 300 ms delay, then runs fast.
    pub const DELAYED: u64 = 3;
}

/// The actor of the chaos rounds: `chaos(n, kind)` behaves as its [`kinds`] says, records one
/// run of `n` and returns `n` (stored as its result when the app has a result backend).
pub struct Chaos<R> {
    queue: String,
    runs: Arc<R>,
    store_results: bool,
}

impl<R> Clone for Chaos<R> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
            runs: Arc::clone(&self.runs),
            store_results: self.store_results,
        }
    }
}

impl<R> std::fmt::Debug for Chaos<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chaos")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl<R: Runs> Chaos<R> {
    /// The actor on `queue`, recording into `runs`, storing its results when `store_results`
    /// (its app must then have a result backend).
    #[must_use]
    pub fn new(queue: &str, runs: Arc<R>, store_results: bool) -> Self {
        Self {
            queue: queue.to_owned(),
            runs,
            store_results,
        }
    }
}

impl<R: Runs> Actor for Chaos<R> {
    type Args = (u64, u64);
    type Output = u64;

    fn name(&self) -> &str {
        "chaos"
    }

    fn arg_names(&self) -> &[&str] {
        &["n", "kind"]
    }

    fn options(&self) -> ActorOptions {
        let options = ActorOptions::new().queue_name(self.queue.clone());
        if self.store_results {
            options.store_results(true)
        } else {
            options
        }
    }

    async fn call(&self, (n, kind): (u64, u64)) -> Result<u64, ActorError> {
        match kind {
            kinds::SLOW => tokio::time::sleep(Duration::from_millis(150)).await,
            kinds::FAILING if current_message().is_none_or(|m| m.retries() == 0) => {
                return Err(ActorError::new("Flaky", "fails its first attempt"));
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
        self.runs.record(n).await?;
        Ok(n)
    }
}

/// The fault a round injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// SIGKILL one of the two worker processes mid-batch, and start another in its place.
    KillWorker,
    /// Close every connection between the workers and the server (they reconnect).
    CutLink,
    /// Stop forwarding between the workers and the server for this long without closing
    /// anything, then close every connection (what a failed network path does before TCP or
    /// a timeout notices).
    StallLink(Duration),
    /// Black-hole every connection between the workers and the server: open, silent, for good
    /// on the workers' side (new connections work; the server's side closes after 20 s, as a
    /// server notices a silent peer). Recovery is how long the workers take to notice and
    /// reconnect.
    BlackHoleLink,
    /// Restart the server (the backend's test kills it with SIGKILL and starts it again on the
    /// same port and data, with persistence on); see [`ChaosRounds::restart_with`].
    RestartServer,
    /// Three worker hosts (network namespaces, [`NetHosts`]) instead of two worker processes
    /// on this one; one host's link is taken down (a pulled cable: nothing is closed) while it
    /// holds messages, and brought up again once the other two have run every message, so
    /// the cut-off host comes back holding messages it no longer owns. Needs root.
    CutHost,
}

impl Fault {
    /// Its name in reports.
    #[must_use]
    pub fn name(&self) -> String {
        match self {
            Self::KillWorker => "SIGKILL a worker".into(),
            Self::CutLink => "link cut".into(),
            Self::StallLink(d) => format!("link stalled {} s, then cut", d.as_secs_f64()),
            Self::BlackHoleLink => "link stalled for good (never cut)".into(),
            Self::RestartServer => "server killed and restarted".into(),
            Self::CutHost => "one of three worker hosts cut off, then back".into(),
        }
    }
}

/// A number of rounds of one fault.
#[derive(Clone, Debug)]
pub struct ChaosRounds {
    fault: Fault,
    rounds: u32,
    messages: u64,
    restart: Option<Restart>,
    child_env: Vec<(&'static str, String)>,
    name: Option<String>,
    after_round: Option<Restart>,
    side_server: Option<(&'static str, SocketAddr)>,
}

/// A blocking step a test supplies: how it restarts its server for [`Fault::RestartServer`]
/// (returning once the server accepts connections again), or what it does after each round.
#[derive(Clone)]
struct Restart(Arc<dyn Fn() + Send + Sync>);

impl Restart {
    /// Runs the step off the async threads.
    async fn run(&self, what: &str) {
        let step = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || step())
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

impl std::fmt::Debug for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Restart")
    }
}

/// What [`ChaosRounds::run`] counted.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ChaosReport {
    /// The backend's name.
    pub broker: &'static str,
    /// The fault's name.
    pub fault: String,
    /// Rounds run.
    pub rounds: u32,
    /// Messages sent over all rounds.
    pub messages: u64,
    /// Messages that never ran.
    pub lost: u64,
    /// Runs beyond a message's first, over all rounds.
    pub duplicates: u64,
    /// Results that were not stored (when the backend has a result backend).
    pub results_missing: u64,
    /// Messages dead-lettered (none of the round's messages should be: the failing ones
    /// succeed on their retry).
    pub dead: u64,
    /// Per round, the time from the end of the fault until the last message had run.
    pub recovery: Vec<Duration>,
}

impl ChaosReport {
    /// Panics when a message or a result was lost.
    ///
    /// # Panics
    /// On a lost message or a missing result.
    pub fn assert_nothing_lost(&self) {
        assert_eq!(
            (self.lost, self.results_missing, self.dead),
            (0, 0, 0),
            "{} under {}: lost messages, missing results, dead letters",
            self.broker,
            self.fault
        );
    }

    /// The longest recovery of the rounds.
    #[must_use]
    pub fn max_recovery(&self) -> Duration {
        self.recovery.iter().copied().max().unwrap_or_default()
    }

    /// The median recovery of the rounds.
    #[must_use]
    pub fn median_recovery(&self) -> Duration {
        let mut all = self.recovery.clone();
        all.sort_unstable();
        all.get(all.len() / 2).copied().unwrap_or_default()
    }
}

impl ChaosRounds {
    /// `fault`, three rounds (or `TROUPE_CHAOS_ROUNDS`) of 200 messages.
    #[must_use]
    pub fn new(fault: Fault) -> Self {
        let rounds = rounds_from_env(3);
        Self {
            fault,
            rounds,
            messages: 200,
            restart: None,
            child_env: Vec::new(),
            name: None,
            after_round: None,
            side_server: None,
        }
    }

    /// A server the worker processes use besides the broker, out of the fault's reach (where
    /// they record runs, or store results): in a [`Fault::CutHost`] round the hosts reach it
    /// through a proxy on the management bridge, which is never cut, whose address they find
    /// in `key`.
    #[must_use]
    pub fn side_server(mut self, key: &'static str, server: SocketAddr) -> Self {
        self.side_server = Some((key, server));
        self
    }

    /// Runs `after` at the end of every round, once its counts are taken: to start again a
    /// node the round's fault killed, say, so that the fault itself is only the kill.
    #[must_use]
    pub fn after_round(mut self, after: impl Fn() + Send + Sync + 'static) -> Self {
        self.after_round = Some(Restart(Arc::new(after)));
        self
    }

    /// Names the fault in the report (default [`Fault::name`]).
    #[must_use]
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets `key` to `value` in the worker processes' environment (a URL naming every node of a
    /// cluster, say, for a restart without a proxy).
    #[must_use]
    pub fn child_env(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.child_env.push((key, value.into()));
        self
    }

    /// How [`Fault::RestartServer`] restarts the server: `restart` kills it and starts it again
    /// (same port, same data), returning once it accepts connections. The workers reach it
    /// through the proxy (which injects nothing in this fault) when [`ChaosRounds::run`] is
    /// given the server's address, else directly (a cluster, whose URL names every node: see
    /// [`ChaosRounds::child_env`]).
    #[must_use]
    pub fn restart_with(mut self, restart: impl Fn() + Send + Sync + 'static) -> Self {
        self.restart = Some(Restart(Arc::new(restart)));
        self
    }

    /// A [`Fault::RestartServer`] that only kills: `kill` kills a server and returns what
    /// `bring_back` needs (its port, say), which brings it back after the round (a failed-over
    /// master as a replica of the one promoted).
    #[must_use]
    pub fn kill_then_bring_back<T: Send + 'static>(
        self,
        kill: impl Fn() -> T + Send + Sync + 'static,
        bring_back: impl Fn(T) + Send + Sync + 'static,
    ) -> Self {
        let killed = Arc::new(Mutex::new(None));
        let taken = Arc::clone(&killed);
        self.restart_with(move || {
            let victim = kill();
            if let Ok(mut killed) = killed.lock() {
                *killed = Some(victim);
            }
        })
        .after_round(move || {
            let victim = taken.lock().ok().and_then(|mut killed| killed.take());
            if let Some(victim) = victim {
                bring_back(victim);
            }
        })
    }

    /// Runs `rounds` rounds unless `TROUPE_CHAOS_ROUNDS` is set.
    #[must_use]
    pub fn rounds(mut self, rounds: u32) -> Self {
        if std::env::var("TROUPE_CHAOS_ROUNDS").is_err() {
            self.rounds = rounds;
        }
        self
    }

    /// Sends `messages` per round.
    #[must_use]
    pub fn messages(mut self, messages: u64) -> Self {
        self.messages = messages;
        self
    }

    /// Runs the rounds on `place`, each on a queue of its own named after `queue`; `server` is
    /// the address a link fault's proxy forwards to. Returns the counts; the caller asserts
    /// what its broker promises ([`ChaosReport::assert_nothing_lost`]).
    ///
    /// # Panics
    /// When the broker or the children fail, or a link fault is asked for without `server`.
    pub async fn run<B: KillBackend>(
        &self,
        backend: &B,
        place: &str,
        queue: &str,
        server: Option<SocketAddr>,
    ) -> ChaosReport {
        let (broker, runs) = backend.open(place).await;
        runs.prepare().await;
        let runs = Arc::new(runs);
        let results = backend.results(place).await;
        let hosts = matches!(self.fault, Fault::CutHost).then(|| NetHosts::start(3));
        let proxy = match (self.fault, server, &hosts) {
            (Fault::KillWorker, _, _) | (Fault::RestartServer, None, _) => None,
            (_, Some(server), Some(hosts)) => Some(FaultProxy::start_on(hosts.data_gateway(), server).await),
            (_, Some(server), None) => Some(FaultProxy::start(server).await),
            (_, None, _) => panic!("{} needs the server's address for its proxy", self.fault.name()),
        };
        let mut env: Vec<(&str, String)> = proxy.iter().map(|p| (SERVER, p.addr().to_string())).collect();
        env.extend(self.child_env.iter().cloned());
        let _runs_proxy = match (&hosts, self.side_server) {
            (Some(hosts), Some((key, server))) => {
                let proxy = FaultProxy::start_on(hosts.management_gateway(), server).await;
                env.push((key, proxy.addr().to_string()));
                Some(proxy)
            }
            _ => None,
        };
        // Where each worker process runs: on this host, or on host `i` of `hosts`.
        let spawn = |i: usize, queue: &str| match &hosts {
            Some(hosts) => kill::spawn_in(&hosts.prefix(i), &Role::Worker, place, queue, &env),
            None => kill::spawn_with(&Role::Worker, place, queue, &env),
        };
        let mut report = ChaosReport {
            broker: B::NAME,
            fault: self.name.clone().unwrap_or_else(|| self.fault.name()),
            rounds: self.rounds,
            messages: 0,
            lost: 0,
            duplicates: 0,
            results_missing: 0,
            dead: 0,
            recovery: Vec::new(),
        };
        for round in 0..self.rounds {
            let queue = format!("{queue}-{round}");
            let chaos = Chaos::new(&queue, Arc::clone(&runs), results.is_some());
            let mut builder = troupe_core::App::builder(Arc::new(broker.clone())).actor(chaos.clone());
            if let Some(results) = &results {
                builder = builder.results(Arc::clone(results));
            }
            let app = builder.build().expect("app");
            let base = (u64::from(round) + 1) * 1_000_000;
            let mut sent: Vec<(u64, Message)> = Vec::new();
            for k in 0..self.messages {
                let n = base + k;
                let kind = k % 4;
                let mut options = SendOptions::new()
                    .min_backoff(Duration::from_millis(100))
                    .max_backoff(Duration::from_secs(1))
                    .max_retries(100);
                if kind == kinds::DELAYED {
                    options = options.delay(Duration::from_millis(300));
                }
                let message = app.send_with_options(&chaos, (n, kind), options).await.expect("send");
                sent.push((n, message.message().clone()));
            }
            let all = usize::try_from(self.messages).expect("a count");
            let in_round = |counts: HashMap<u64, u64>| -> HashMap<u64, u64> {
                counts
                    .into_iter()
                    .filter(|(n, _)| (base..base + self.messages).contains(n))
                    .collect()
            };
            let mut workers: Vec<Spawned> = (0..hosts.as_ref().map_or(2, |_| 3)).map(|i| spawn(i, &queue)).collect();

            // Inject the fault once a third have run.
            let deadline = Instant::now() + Duration::from_secs(60);
            while in_round(runs.counts().await).len() < all / 3 {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: the workers ran too little in 60 s: {}",
                    workers.iter().map(Spawned::log).collect::<Vec<_>>().join("\n")
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            match self.fault {
                Fault::KillWorker => {
                    workers[0].kill();
                    workers[0] = spawn(0, &queue);
                }
                Fault::CutLink => proxy.as_ref().expect("a proxy").cut(),
                Fault::BlackHoleLink => proxy.as_ref().expect("a proxy").black_hole(),
                Fault::CutHost => hosts.as_ref().expect("the hosts").cut(0),
                Fault::RestartServer => {
                    self.restart
                        .as_ref()
                        .expect("ChaosRounds::restart_with for a restart")
                        .run("the restart")
                        .await;
                }
                Fault::StallLink(stall) => {
                    let proxy = proxy.as_ref().expect("a proxy");
                    proxy.stall();
                    tokio::time::sleep(stall).await;
                    proxy.cut();
                    proxy.resume();
                }
            }
            let fault_ended = Instant::now();

            let deadline = fault_ended + Duration::from_secs(120);
            let mut done = in_round(runs.counts().await);
            while done.len() < all && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
                done = in_round(runs.counts().await);
            }
            let recovered = fault_ended.elapsed();
            // Results are stored before the ack: wait for them before the workers go.
            let mut results_missing = 0;
            if let Some(backend) = &results {
                // A store still retrying after the fault holds its message unacked: wait for
                // it rather than count a late result as lost (30 s in all, not per result).
                let results_deadline = Instant::now() + Duration::from_secs(30);
                for (n, message) in &sent {
                    let result = loop {
                        let wait = results_deadline
                            .saturating_duration_since(Instant::now())
                            .max(Duration::from_millis(10));
                        // This process's own connections see a server restart too.
                        match backend.get(message, Some(wait)).await {
                            Err(e) if e.is_transient() && Instant::now() < results_deadline => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            other => break other,
                        }
                    };
                    match result {
                        Ok(value) if value == json!(n) => {}
                        other => {
                            results_missing += 1;
                            let stats = broker.stats(&queue).await;
                            eprintln!("round {round}: the result of {n} is {other:?}; the queue: {stats:?}");
                        }
                    }
                }
            }
            if let Some(hosts) = &hosts {
                // The cut-off host comes back holding messages the others ran: its late acks
                // must change nothing (fencing: a late nack must not dead-letter, a late retry
                // runs again and is counted), and what it runs again is counted below.
                let before: u64 = in_round(runs.counts().await).values().sum();
                hosts.restore(0);
                tokio::time::sleep(CUT_HOST_BACK_FOR).await;
                let after: u64 = in_round(runs.counts().await).values().sum();
                eprintln!(
                    "round {round}: the cut-off host came back ({} of {} messages had run); {} runs after",
                    done.len(),
                    self.messages,
                    after.saturating_sub(before)
                );
            }
            // Late duplicates (a redelivery racing the end) are counted too.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let done = in_round(runs.counts().await);
            let logs: Vec<String> = workers.iter().map(Spawned::log).collect();
            for worker in &mut workers {
                worker.kill();
            }
            let lost = self.messages - u64::try_from(done.len()).expect("a count");
            let duplicates: u64 = done.values().map(|c| c - 1).sum();
            if lost == 0 && std::env::var_os("TROUPE_CHAOS_LOGS").is_some() {
                eprintln!("round {round}: the workers said:\n{}", logs.join("\n"));
            }
            if lost > 0 {
                let missing: Vec<(u64, u64)> = (base..base + self.messages)
                    .filter(|n| !done.contains_key(n))
                    .map(|n| (n, (n - base) % 4))
                    .collect();
                eprintln!(
                    "round {round}: {lost} lost (number, kind): {missing:?}; the queue: {:?}; the workers said:\n{}",
                    broker.stats(&queue).await,
                    logs.join("\n")
                );
            }
            report.messages += self.messages;
            report.lost += lost;
            report.duplicates += duplicates;
            report.results_missing += results_missing;
            let dead = {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match broker.dead_letters(&queue, 10_000).await {
                        Err(e) if e.is_transient() && Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        other => break other.expect("dead letters"),
                    }
                }
            };
            for letter in dead.iter().take(5) {
                eprintln!("round {round}: dead-lettered {}: {}", letter.id, letter.reason);
            }
            report.dead += u64::try_from(dead.len()).expect("a count");
            report.recovery.push(recovered);
            if let Some(after) = &self.after_round {
                after.run("the end of the round").await;
            }
        }
        eprintln!(
            "CHAOS {} | {} | rounds {} | messages {} | lost {} | duplicates {} | results missing {} | dead-lettered {} | recovery median {:.2} s, max {:.2} s",
            report.broker,
            report.fault,
            report.rounds,
            report.messages,
            report.lost,
            report.duplicates,
            report.results_missing,
            report.dead,
            report.median_recovery().as_secs_f64(),
            report.max_recovery().as_secs_f64(),
        );
        if let Ok(path) = std::env::var("TROUPE_CHAOS_REPORT") {
            let line = json!({
                "broker": report.broker,
                "fault": report.fault,
                "rounds": report.rounds,
                "messages": report.messages,
                "lost": report.lost,
                "duplicates": report.duplicates,
                "results_missing": report.results_missing,
                "dead": report.dead,
                "recovery_median_s": report.median_recovery().as_secs_f64(),
                "recovery_max_s": report.max_recovery().as_secs_f64(),
            });
            append_report(&path, &line);
        }
        report
    }
}

/// What [`produce_through`] saw.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FailoverSends {
    /// The ids of the sends that returned `Ok`.
    pub confirmed: std::collections::HashSet<String>,
    /// How long the fault took.
    pub fault_took: Duration,
    /// When the last send failed, counted from the start of the fault.
    pub last_failure: Option<Duration>,
    /// From the first failed send to the last.
    pub failing_for: Option<Duration>,
    /// Sends confirmed after the last failed one.
    pub since_failure: usize,
    /// The longest time between two confirmed sends (a send fails, or waits while its
    /// connection is made again).
    pub longest_gap: Duration,
}

impl FailoverSends {
    /// How many confirmed sends are not waiting in `queue` (lost at the failover).
    ///
    /// # Panics
    /// When the queue cannot be read.
    pub async fn missing_from(&self, broker: &dyn Broker, queue: &str) -> usize {
        let waiting: std::collections::HashSet<String> = broker
            .peek(queue, troupe_core::Waiting::Ready, 0, self.confirmed.len() + 1000)
            .await
            .expect("peek the queue")
            .into_iter()
            .map(|m| m.message_id)
            .collect();
        self.confirmed.difference(&waiting).count()
    }
}

/// A producer through a failover: sends one message at a time with `send` (which returns the
/// sent message's id), without a pause, for 1 s; runs `fault` (a blocking step: kill a server,
/// promote another) while it goes on; sends for `after` more; then stops. Every failed send
/// must fail with a transient error (else this panics).
///
/// # Panics
/// On a send that fails with a permanent error, or a fault that panics.
pub async fn produce_through<S, F>(send: S, fault: impl FnOnce() + Send + 'static, after: Duration) -> FailoverSends
where
    S: Fn() -> F + Send + 'static,
    F: Future<Output = troupe_core::Result<String>> + Send,
{
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fault_began = Arc::new(Mutex::new(None::<Instant>));
    let producer = tokio::spawn({
        let (stop, fault_began) = (Arc::clone(&stop), Arc::clone(&fault_began));
        async move {
            let mut confirmed = std::collections::HashSet::new();
            let (mut first_failure, mut last_failure) = (None::<Instant>, None::<Instant>);
            let (mut since_failure, mut last_ok, mut longest_gap) = (0_usize, Instant::now(), Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match send().await {
                    Ok(id) => {
                        confirmed.insert(id);
                        since_failure += 1;
                        longest_gap = longest_gap.max(last_ok.elapsed());
                        last_ok = Instant::now();
                    }
                    Err(e) => {
                        assert!(e.is_transient(), "a send fails only with a transient error: {e}");
                        first_failure.get_or_insert_with(Instant::now);
                        last_failure = Some(Instant::now());
                        since_failure = 0;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            let began = fault_began.lock().ok().and_then(|b| *b);
            FailoverSends {
                confirmed,
                fault_took: Duration::ZERO,
                last_failure: last_failure.zip(began).map(|(l, b)| l.saturating_duration_since(b)),
                failing_for: first_failure.zip(last_failure).map(|(f, l)| l - f),
                since_failure,
                longest_gap,
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let began = Instant::now();
    if let Ok(mut b) = fault_began.lock() {
        *b = Some(began);
    }
    tokio::task::spawn_blocking(fault).await.expect("the fault");
    let fault_took = began.elapsed();
    tokio::time::sleep(after).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut sends = producer.await.expect("the producer");
    sends.fault_took = fault_took;
    sends
}

/// How long a [`Fault::CutHost`] round lets the cut-off host run after its link is back,
/// before the runs are counted.
const CUT_HOST_BACK_FOR: Duration = Duration::from_secs(3);

/// The rounds a chaos test runs: `TROUPE_CHAOS_ROUNDS`, else `default`.
#[must_use]
pub fn rounds_from_env(default: u32) -> u32 {
    std::env::var("TROUPE_CHAOS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

/// Appends `line` to the report file `path` (`TROUPE_CHAOS_REPORT`).
pub(crate) fn append_report(path: &str, line: &serde_json::Value) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("the chaos report file");
    std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes()).expect("write the chaos report");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_is_replaced_and_the_rest_kept() {
        assert_eq!(
            with_server("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=5", "127.0.0.1:4000"),
            "amqp://guest:guest@127.0.0.1:4000/%2f?heartbeat=5"
        );
        assert_eq!(
            with_server("redis://127.0.0.1:6379", "127.0.0.1:4000"),
            "redis://127.0.0.1:4000"
        );
        assert_eq!(
            with_server("postgres://postgres@localhost/test", "127.0.0.1:4000"),
            "postgres://postgres@127.0.0.1:4000/test"
        );
    }

    #[tokio::test]
    async fn the_proxy_forwards_stalls_and_cuts() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0_u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let proxy = FaultProxy::start(upstream).await;
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut buf = [0_u8; 5];
        client.write_all(b"hello").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        proxy.stall();
        client.write_all(b"again").await.unwrap();
        let stalled = tokio::time::timeout(Duration::from_millis(300), client.read_exact(&mut buf)).await;
        assert!(stalled.is_err(), "nothing comes back while stalled");
        proxy.resume();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");

        proxy.black_hole();
        client.write_all(b"never").await.unwrap();
        let silent = tokio::time::timeout(Duration::from_millis(300), client.read_exact(&mut buf)).await;
        assert!(silent.is_err(), "nothing comes back through a black hole");
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        fresh.write_all(b"fresh").await.unwrap();
        fresh.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"fresh", "a new connection is carried");

        proxy.cut();
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "the connection is closed: {n:?}");
    }
}
