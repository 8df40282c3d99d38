//! Servers a test runs for itself, on free ports, so it can crash, restart or reconfigure them
//! without touching the machine's servers the other tests share.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Panics with what went wrong: these are test fixtures.
pub(crate) fn check<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Runs `cmd` to its end (`what` names it if it cannot start); panics with `failed` and its
/// stderr unless it succeeds.
pub(crate) fn succeed(cmd: &mut Command, what: &str, failed: &str) -> std::process::Output {
    let out = check(cmd.output(), what);
    assert!(
        out.status.success(),
        "{failed}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A free TCP port on the loopback interface.
///
/// # Panics
/// When no port can be bound.
#[must_use]
pub fn free_port() -> u16 {
    let listener = check(std::net::TcpListener::bind("127.0.0.1:0"), "free port");
    check(listener.local_addr(), "free port").port()
}

/// Waits until something listens on `127.0.0.1:port`.
///
/// # Panics
/// After `within`, with the last lines of `log`.
pub fn wait_for_port(port: u16, within: Duration, what: &str, log: &Path) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            panic!(
                "{what} did not start on port {port} within {within:?}; {} ends:\n{tail}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A RabbitMQ node of a test's own: its own name, ports and data directory. It runs as the
/// `rabbitmq` user, as the Debian scripts want, and is killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct RabbitmqNode {
    dir: PathBuf,
    name: String,
    port: u16,
    node_port: u16,
    dist_port: u16,
}

impl RabbitmqNode {
    /// A node serving plain AMQP on [`RabbitmqNode::port`] (not started yet).
    #[must_use]
    pub fn new() -> Self {
        let mut node = Self::with_config(|_| String::new());
        node.node_port = node.port;
        node
    }

    /// A node whose `rabbitmq.conf` is `config(port)`: a TLS listener on `port`, say. Its plain
    /// AMQP listener is on another port, unused.
    ///
    /// # Panics
    /// When its directory cannot be made.
    #[must_use]
    pub fn with_config(config: impl FnOnce(u16) -> String) -> Self {
        let name = format!("troupe-node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = std::env::temp_dir().join(&name);
        check(std::fs::create_dir_all(&dir), "node directory");
        let port = free_port();
        check(std::fs::write(dir.join("enabled_plugins"), "[].\n"), "enabled_plugins");
        check(std::fs::write(dir.join("rabbitmq.conf"), config(port)), "rabbitmq.conf");
        let status = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status();
        assert!(status.is_ok_and(|s| s.success()), "chown {dir:?} to rabbitmq");
        Self {
            dir,
            name,
            port,
            node_port: free_port(),
            dist_port: free_port(),
        }
    }

    /// The port it serves on (plain AMQP, or what its configuration made of it).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its Erlang node name.
    #[must_use]
    pub fn name(&self) -> String {
        format!("{}@localhost", self.name)
    }

    /// Its URL for plain AMQP, user guest.
    #[must_use]
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node (again, on the same data) and waits until it listens.
    ///
    /// # Panics
    /// When `rabbitmq-server` is missing or the node does not listen within 90 s.
    pub fn start(&self) {
        let _ = std::fs::remove_file(self.dir.join("pid"));
        let dir = self.dir.display();
        let script = format!(
            "RABBITMQ_NODENAME={name} \
             RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT={port} RABBITMQ_DIST_PORT={dist} \
             RABBITMQ_MNESIA_BASE={dir}/mnesia RABBITMQ_LOG_BASE={dir}/log \
             RABBITMQ_ENABLED_PLUGINS_FILE={dir}/enabled_plugins RABBITMQ_CONFIG_FILE={dir}/rabbitmq \
             RABBITMQ_PID_FILE={dir}/pid /usr/lib/rabbitmq/bin/rabbitmq-server -detached",
            name = self.name(),
            port = self.node_port,
            dist = self.dist_port,
        );
        let status = check(
            as_rabbitmq(&script)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status(),
            "su and rabbitmq-server must be installed (they are on the project's machines)",
        );
        assert!(status.success(), "rabbitmq-server -detached failed");
        wait_for_port(
            self.port,
            Duration::from_secs(90),
            "the private RabbitMQ node",
            &self.log_path(),
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.name()))
    }

    /// What the node logged (every start so far) about its recoveries and errors: after a
    /// kill, RabbitMQ says which messages it dropped ("... after unclean shutdown").
    #[must_use]
    pub fn recovery_log(&self) -> Vec<String> {
        const NEEDLES: [&str; 4] = ["unclean", "dropped", "crash", "rror"];
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .filter(|line| NEEDLES.iter().any(|n| line.contains(n)))
            .map(str::to_owned)
            .collect()
    }

    /// Runs `rabbitmqctl -n NODE ARGS` as the `rabbitmq` user (whose Erlang cookie every node
    /// shares).
    ///
    /// # Panics
    /// When it fails, with what it printed.
    pub fn ctl(&self, args: &[&str]) {
        let command = format!(
            "/usr/lib/rabbitmq/bin/rabbitmqctl -n {} {}",
            self.name(),
            args.join(" ")
        );
        let out = check(
            as_rabbitmq(&command).output(),
            "su and rabbitmqctl must be installed (they are on the project's machines)",
        );
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} on {} failed: {}{}",
            self.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGKILLs the node (a crash, not a clean stop) and waits until its port is closed.
    pub fn kill(&self) {
        let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) else {
            return;
        };
        let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(self.dir.join("pid"));
    }
}

/// `sh -c command` as the `rabbitmq` user in its home, as the Debian scripts and `rabbitmqctl`
/// want (its Erlang cookie is every node's).
fn as_rabbitmq(command: &str) -> Command {
    let mut cmd = Command::new("su");
    cmd.args([
        "rabbitmq",
        "-s",
        "/bin/sh",
        "-c",
        &format!("cd /var/lib/rabbitmq && HOME=/var/lib/rabbitmq {command}"),
    ]);
    cmd
}

/// A RabbitMQ cluster of a test's own: [`RabbitmqNode`]s on loopback (one Erlang cookie, the
/// `rabbitmq` user's), the first started alone and the others joined to it.
#[derive(Debug)]
pub struct RabbitmqCluster {
    nodes: Vec<RabbitmqNode>,
}

impl RabbitmqCluster {
    /// Starts `size` nodes and joins them into one cluster.
    ///
    /// # Panics
    /// When a node does not start or `rabbitmqctl` cannot join it.
    #[must_use]
    pub fn start(size: usize) -> Self {
        let nodes: Vec<RabbitmqNode> = (0..size.max(1)).map(|_| RabbitmqNode::new()).collect();
        for node in &nodes {
            node.start();
        }
        let first = nodes[0].name();
        for node in &nodes[1..] {
            for args in [
                vec!["stop_app"],
                vec!["join_cluster", first.as_str()],
                vec!["start_app"],
            ] {
                node.ctl(&args);
            }
        }
        Self { nodes }
    }

    /// Its nodes, the first one first.
    #[must_use]
    pub fn nodes(&self) -> &[RabbitmqNode] {
        &self.nodes
    }

    /// One URL per node, separated by `;` (Troupe's failover URL), each with `query` (such as
    /// `?queue_type=quorum`, or empty).
    #[must_use]
    pub fn url(&self, query: &str) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}{query}", n.url()))
            .collect::<Vec<_>>()
            .join(";")
    }
}

impl Default for RabbitmqNode {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RabbitmqNode {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sets `path`'s permission bits.
pub(crate) fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    check(
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)),
        "permissions",
    );
}

pub(crate) fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn uid_of(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Runs `program` as `user` when this process is root (the servers refuse to run as root, or
/// switch users themselves), as is otherwise.
pub(crate) fn command_as(user: &str, program: &str) -> Command {
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", user, "--", program]);
        c
    } else {
        Command::new(program)
    }
}

/// Gives `path` (and what is under it) to `user` when running as root.
pub(crate) fn give_to(user: &str, path: &Path) {
    if !running_as_root() {
        return;
    }
    let Some((uid, gid)) = uid_of(user) else {
        panic!("the user {user} does not exist; install the server's package")
    };
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        check(std::os::unix::fs::chown(&p, Some(uid), Some(gid)), "chown");
        if p.is_dir() {
            for entry in check(std::fs::read_dir(&p), "read_dir").flatten() {
                stack.push(entry.path());
            }
        }
    }
}

/// A PostgreSQL instance of a test's own (`initdb` in a temporary directory, user `postgres`,
/// trust authentication on loopback), started on a free port; stopped on drop. It runs as the
/// `postgres` user when the test runs as root.
#[derive(Debug)]
pub struct PostgresNode {
    dir: PathBuf,
    port: u16,
}

impl PostgresNode {
    /// A new data directory in a temporary directory (not started yet).
    ///
    /// # Panics
    /// When `initdb` is missing or fails.
    #[must_use]
    pub fn new() -> Self {
        Self::in_dir(std::env::temp_dir().join(format!(
            "troupe-pg-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        )))
    }

    /// A new data directory, `dir/data` (not started yet); `dir` is removed on drop.
    ///
    /// # Panics
    /// When `initdb` is missing or fails.
    #[must_use]
    pub fn in_dir(dir: PathBuf) -> Self {
        let node = Self::prepared(dir);
        let dir = &node.dir;
        succeed(
            command_as("postgres", "initdb").args([
                "-D",
                &dir.join("data").display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ]),
            "initdb must be installed (PostgreSQL's server package)",
            "initdb failed",
        );
        node
    }

    /// A node in `dir` with no data directory yet.
    fn prepared(dir: PathBuf) -> Self {
        check(std::fs::create_dir_all(&dir), "node directory");
        set_mode(&dir, 0o755);
        give_to("postgres", &dir);
        Self { dir, port: free_port() }
    }

    /// A streaming standby of `primary` (a `pg_basebackup` of it, with `standby.signal`), not
    /// started yet.
    ///
    /// # Panics
    /// When `pg_basebackup` fails.
    #[must_use]
    pub fn standby_of(primary: &Self) -> Self {
        let node = Self::prepared(std::env::temp_dir().join(format!(
            "troupe-pg-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        )));
        node.copy(primary);
        node
    }

    /// Makes this node (stopped) a new standby of `primary`: its data is replaced by a
    /// `pg_basebackup` of `primary`'s.
    ///
    /// # Panics
    /// When `pg_basebackup` fails.
    pub fn rebuild_as_standby_of(&self, primary: &Self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.data());
        self.copy(primary);
    }

    fn copy(&self, primary: &Self) {
        succeed(
            command_as("postgres", "pg_basebackup")
                .args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "postgres"])
                .args(["-D", &self.data().display().to_string()])
                .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]),
            "pg_basebackup must be installed (PostgreSQL's client package)",
            "pg_basebackup failed",
        );
    }

    /// Promotes this standby to a primary (`pg_ctl promote`, waiting until it is one).
    ///
    /// # Panics
    /// When the promotion fails.
    pub fn promote(&self) {
        succeed(
            command_as("postgres", "pg_ctl").args([
                "-D",
                &self.data().display().to_string(),
                "-w",
                "-t",
                "60",
                "promote",
            ]),
            "pg_ctl",
            "pg_ctl promote failed",
        );
    }

    /// Runs `statement` with `psql` (database `postgres`); what it printed, trimmed.
    ///
    /// # Panics
    /// When the statement fails.
    pub fn sql(&self, statement: &str) -> String {
        let out = succeed(
            Command::new("psql")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                ])
                .args(["-v", "ON_ERROR_STOP=1", "-qAt", "-c", statement]),
            "psql must be installed (PostgreSQL's client package)",
            statement,
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Its data directory (the configuration files, and certificates a configuration names).
    #[must_use]
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The port it serves on.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL (database `postgres`, user `postgres`).
    #[must_use]
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again, on the same data: after [`PostgresNode::kill`], it recovers
    /// from its WAL first) and waits until it accepts connections.
    ///
    /// # Panics
    /// When `pg_ctl` is missing or the server does not start within 60 s.
    pub fn start(&self) {
        self.start_with("-c max_connections=200");
    }

    /// [`PostgresNode::start`] with other server options (`-c name=value ...`).
    ///
    /// # Panics
    /// As [`PostgresNode::start`].
    pub fn start_with(&self, options: &str) {
        let data = self.data();
        let log = self.dir.join("postgres.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 {options}",
            self.port,
            data.display()
        );
        let out = check(
            command_as("postgres", "pg_ctl")
                .args(["-D", &data.display().to_string(), "-l", &log.display().to_string()])
                .args(["-o", &options, "-w", "-t", "60", "start"])
                .output(),
            "pg_ctl must be installed (PostgreSQL's server package)",
        );
        if !out.status.success() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!(
                "PostgreSQL did not start: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Stops the server as a crash does (`pg_ctl stop -m immediate`: no checkpoint, every
    /// connection dropped at once).
    pub fn kill(&self) {
        let _ = command_as("postgres", "pg_ctl")
            .args([
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Default for PostgresNode {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PostgresNode {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL primary and its streaming standby of a test's own, replicating synchronously
/// (`synchronous_standby_names = '*'`: a commit returns once the standby has it, so a
/// failover loses nothing committed). [`PostgresPair::fail_over`] kills the primary and
/// promotes the standby; [`PostgresPair::rebuild_standby`] makes the killed node the new
/// primary's standby.
#[derive(Debug)]
pub struct PostgresPair {
    nodes: [PostgresNode; 2],
    /// Which of `nodes` is the primary.
    primary: std::sync::atomic::AtomicUsize,
    database: String,
}

impl PostgresPair {
    /// Starts the pair with an empty `database` on it.
    ///
    /// # Panics
    /// When a server does not start or the standby does not stream within 30 s.
    #[must_use]
    pub fn start(database: &str) -> Self {
        let primary = PostgresNode::new();
        primary.start();
        primary.sql(&format!("CREATE DATABASE \"{database}\""));
        let standby = PostgresNode::standby_of(&primary);
        standby.start();
        let pair = Self {
            nodes: [primary, standby],
            primary: std::sync::atomic::AtomicUsize::new(0),
            database: database.to_owned(),
        };
        pair.replicate_synchronously();
        pair
    }

    fn index(&self) -> usize {
        self.primary.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The primary now.
    #[must_use]
    pub fn primary(&self) -> &PostgresNode {
        &self.nodes[self.index()]
    }

    /// The standby now.
    #[must_use]
    pub fn standby(&self) -> &PostgresNode {
        &self.nodes[1 - self.index()]
    }

    /// A URL naming both servers (the first node first, whichever is the primary), with
    /// `query` (`?...`) after.
    #[must_use]
    pub fn url(&self, query: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}{query}",
            self.nodes[0].port(),
            self.nodes[1].port(),
            self.database
        )
    }

    /// Kills the primary (`pg_ctl stop -m immediate`) and promotes the standby, which then
    /// commits without waiting for a standby; returns once it accepts writes.
    pub fn fail_over(&self) {
        let old = self.index();
        self.nodes[old].kill();
        let new = &self.nodes[1 - old];
        new.promote();
        new.sql("ALTER SYSTEM RESET synchronous_standby_names");
        new.sql("SELECT pg_reload_conf()");
        self.primary.store(1 - old, std::sync::atomic::Ordering::SeqCst);
    }

    /// Makes the node [`PostgresPair::fail_over`] killed a standby of the new primary and
    /// waits until the primary replicates to it synchronously.
    ///
    /// # Panics
    /// When the standby does not start or stream within 30 s.
    pub fn rebuild_standby(&self) {
        let primary = self.index();
        let standby = &self.nodes[1 - primary];
        standby.rebuild_as_standby_of(&self.nodes[primary]);
        standby.start();
        self.replicate_synchronously();
    }

    fn replicate_synchronously(&self) {
        let primary = self.primary();
        let deadline = Instant::now() + Duration::from_secs(30);
        while primary.sql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") != "1" {
            assert!(Instant::now() < deadline, "the standby did not stream within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'");
        primary.sql("SELECT pg_reload_conf()");
        while primary.sql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") != "1" {
            assert!(
                Instant::now() < deadline,
                "the standby did not become synchronous within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A `redis-server` of a test's own on `127.0.0.1:port`, nothing saved (no snapshots, no
/// append-only file unless `args` asks), its files and its log (`redis.log`) in `dir`, with
/// `args` after; returns once it answers.
///
/// # Panics
/// When `redis-server` is missing or does not start within 10 s.
#[must_use]
pub fn redis_server(port: u16, dir: &Path, args: &[&str]) -> std::process::Child {
    let log = dir.join("redis.log");
    let child = check(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn(),
        "redis-server must be installed (it is on the project's machines)",
    );
    wait_for_port(port, Duration::from_secs(10), "redis-server", &log);
    child
}

/// The master name the sentinels of [`RedisSentinels`] watch.
pub const SENTINEL_MASTER: &str = "troupe";

/// A Redis master, its replica and three sentinels of a test's own, on free loopback ports
/// (the machine's `redis-server`, the sentinels in `--sentinel` mode with a quorum of 2 and a
/// master counted down after 1 s without an answer). Killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct RedisSentinels {
    dir: PathBuf,
    sentinels: Vec<u16>,
    processes: std::sync::Mutex<std::collections::HashMap<u16, std::process::Child>>,
}

impl RedisSentinels {
    /// Starts the master, its replica and the sentinels, and returns once the sentinels agree
    /// they are three and know the replica.
    ///
    /// # Panics
    /// When a server does not start or the set does not come together within 30 s.
    #[must_use]
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "troupe-sentinel-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        check(std::fs::create_dir_all(&dir), "a directory for Redis Sentinel");
        let set = Self {
            dir,
            sentinels: (0..3).map(|_| free_port()).collect(),
            processes: std::sync::Mutex::default(),
        };
        let (master, replica) = (free_port(), free_port());
        set.start_node(master, None);
        set.start_node(replica, Some(master));
        for &port in &set.sentinels {
            let config = set.dir.join(format!("sentinel-{port}.conf"));
            check(
                std::fs::write(
                    &config,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {dir}/sentinel-{port}.log\n\
                         sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master} 2\n\
                         sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                         sentinel failover-timeout {SENTINEL_MASTER} 5000\n",
                        dir = set.dir.display()
                    ),
                ),
                "the sentinel's configuration",
            );
            let child = check(
                Command::new("redis-server")
                    .arg(&config)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn(),
                "redis-server --sentinel (install redis-server)",
            );
            set.processes().insert(port, child);
            wait_for_port(
                port,
                Duration::from_secs(10),
                "a Redis sentinel",
                &set.dir.join(format!("sentinel-{port}.log")),
            );
        }
        set.wait_until("the sentinels agree they are three and know the synced replica", || {
            set.replica_ready(replica)
        });
        set
    }

    /// The sentinels' URL: `redis+sentinel://` with every sentinel, the master name, database
    /// 0, then `query` (such as `?namespace=x`, or empty).
    #[must_use]
    pub fn url(&self, query: &str) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+sentinel://{}/{SENTINEL_MASTER}/0{query}", hosts.join(","))
    }

    /// The master's port, as the first sentinel names it.
    ///
    /// # Panics
    /// When the sentinel does not answer.
    #[must_use]
    pub fn master_port(&self) -> u16 {
        master_of(self.sentinels[0]).unwrap_or_else(|| panic!("the sentinel on {} names no master", self.sentinels[0]))
    }

    /// Kills the master (SIGKILL) and returns its port once every sentinel names another
    /// master and that one says it is a master.
    ///
    /// # Panics
    /// When the failover does not finish within 30 s.
    pub fn kill_master(&self) -> u16 {
        let old = self.master_port();
        if let Some(mut child) = self.processes().remove(&old) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.wait_until("the sentinels promote the replica", || {
            let named: Vec<Option<u16>> = self.sentinels.iter().map(|&s| master_of(s)).collect();
            named.iter().all(|m| m.is_some_and(|p| p != old) && *m == named[0])
                && named[0].is_some_and(|p| cli(p, &["ROLE"]).starts_with("master"))
        });
        old
    }

    /// Starts the node on `port` again (after [`RedisSentinels::kill_master`]) as a replica of
    /// the current master, and returns once it has synced and every sentinel counts it.
    ///
    /// # Panics
    /// When it does not start or sync within 30 s.
    pub fn restart_as_replica(&self, port: u16) {
        let master = self.master_port();
        self.start_node(port, Some(master));
        self.wait_until("the old master syncs as a replica", || self.replica_ready(port));
    }

    /// Whether the replica on `port` has synced with its master and receives its writes, and
    /// every sentinel counts the three of them and that one replica.
    fn replica_ready(&self, port: u16) -> bool {
        cli(port, &["INFO", "replication"]).contains("master_link_status:up")
            && streams_to_its_replicas(self.master_port())
            && self.sentinels.iter().all(|&s| {
                cli(s, &["SENTINEL", "CKQUORUM", SENTINEL_MASTER]).starts_with("OK 3 ")
                    && sentinel_field(s, "num-slaves").as_deref() == Some("1")
            })
    }

    /// The processes, by port.
    fn processes(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u16, std::process::Child>> {
        self.processes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn start_node(&self, port: u16, replica_of: Option<u16>) {
        let data = self.dir.join(port.to_string());
        check(std::fs::create_dir_all(&data), "a Redis data directory");
        let master = replica_of.map(|m| m.to_string());
        // A replica syncs at once (Redis waits 5 s by default for more replicas to share it).
        let mut args = vec!["--repl-diskless-sync-delay", "0"];
        if let Some(master) = &master {
            args.extend(["--replicaof", "127.0.0.1", master.as_str()]);
        }
        let child = redis_server(port, &data, &args);
        self.processes().insert(port, child);
    }

    fn wait_until(&self, what: &str, done: impl Fn() -> bool) {
        wait_until(what, done, || {
            let logs: Vec<String> = self
                .sentinels
                .iter()
                .map(|p| {
                    let text = std::fs::read_to_string(self.dir.join(format!("sentinel-{p}.log"))).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    format!("sentinel {p}:\n{}", lines[lines.len().saturating_sub(15)..].join("\n"))
                })
                .collect();
            logs.join("\n")
        });
    }
}

impl Drop for RedisSentinels {
    fn drop(&mut self) {
        for (_, mut child) in self.processes().drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the master on `port` streams its writes to a replica: a write (`SET` of a probe
/// key, one this node serves when it is a cluster node) and then `WAIT 1` on the same
/// connection, which returns 1 once a replica acknowledged that write. A replica that has just
/// loaded the master's snapshot says its link is up, but its master buffers the writes that
/// follow until the replica's first acknowledgement (up to a second later): a master killed in
/// that second takes them with it, and the promoted replica never had them (seen: a chaos
/// round's whole queue and every result lost that way, the round's fault 0.85 s after the
/// replica synced). `WAIT` alone does not tell: for a client that wrote nothing it counts such
/// a replica at once, and so does the master's `INFO replication`.
fn streams_to_its_replicas(port: u16) -> bool {
    for i in 0..64 {
        let answer = cli_script(port, &format!("SET troupe-test-stream-probe-{i} 1\nWAIT 1 200\n"));
        let mut lines = answer.lines().map(str::trim);
        match lines.next() {
            Some("OK") => return lines.next() == Some("1"),
            // A cluster node refuses a key of another node's slot: try another key.
            Some(first) if first.contains("MOVED") => {}
            _ => return false,
        }
    }
    false
}

/// What `redis-cli -p port` prints for the commands of `script` (one per line), sent on one
/// connection (empty when it fails).
fn cli_script(port: u16, script: &str) -> String {
    use std::io::Write as _;
    let child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return String::new();
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    child
        .wait_with_output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Polls `done` every 100 ms for up to 30 s; past that, panics with `what` and what `state`
/// says then (logs, the servers' view).
fn wait_until(what: &str, done: impl Fn() -> bool, state: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s\n{}", state());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What `redis-cli -p port args…` prints (empty when it fails).
fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The master's port as the sentinel on `sentinel` names it.
fn master_of(sentinel: u16) -> Option<u16> {
    let answer = cli(sentinel, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER]);
    answer.lines().nth(1)?.trim().parse().ok()
}

/// A field of `SENTINEL MASTER` (its answer alternates names and values).
fn sentinel_field(sentinel: u16, name: &str) -> Option<String> {
    let answer = cli(sentinel, &["SENTINEL", "MASTER", SENTINEL_MASTER]);
    let lines: Vec<&str> = answer.lines().collect();
    let at = lines.iter().position(|l| l.trim() == name)?;
    lines.get(at + 1).map(|v| v.trim().to_owned())
}

/// Several "hosts" on this machine: network namespaces, each joined to this one by two veth
/// pairs on two bridges. The data bridge carries the broker's traffic (through a proxy bound
/// on its gateway, since the servers listen on loopback); [`NetHosts::cut`] takes a host's data
/// link down (its packets go nowhere, nothing is closed: a pulled cable). The management bridge
/// is never cut (what a test records of the runs goes over it). Needs root (`ip netns`);
/// removed on drop.
#[derive(Debug)]
pub struct NetHosts {
    id: String,
    /// The third octet of the data subnet `10.213.N.0/24`; the management subnet is `N + 1`.
    subnet: u8,
    count: usize,
}

impl NetHosts {
    /// `count` hosts.
    ///
    /// # Panics
    /// When not run as root, or `ip` fails.
    #[must_use]
    pub fn start(count: usize) -> Self {
        assert!(
            running_as_root(),
            "network namespaces need root (ip netns); run the suite as root"
        );
        let used = String::from_utf8_lossy(&check(Command::new("ip").args(["-o", "addr"]).output(), "ip addr").stdout)
            .into_owned();
        let id = uuid::Uuid::new_v4().simple().to_string()[..6].to_owned();
        let start = u8::from_str_radix(&id[..2], 16).unwrap_or(0) & 0x7e;
        let subnet = (0..64)
            .map(|k| start.wrapping_add(2 * k) & 0xfe)
            .find(|n| !used.contains(&format!("10.213.{n}.")) && !used.contains(&format!("10.213.{}.", n + 1)))
            .expect("a free 10.213.N.0/24 pair");
        let hosts = Self { id, subnet, count };
        for (bridge, net) in [(hosts.bridge("d"), subnet), (hosts.bridge("m"), subnet + 1)] {
            ip(&["link", "add", &bridge, "type", "bridge"]);
            ip(&["addr", "add", &format!("10.213.{net}.1/24"), "dev", &bridge]);
            ip(&["link", "set", &bridge, "up"]);
        }
        for i in 0..count {
            let ns = hosts.namespace(i);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            for (kind, net) in [("d", subnet), ("m", subnet + 1)] {
                let (outside, inside) = (hosts.veth(kind, i), format!("eth{kind}"));
                ip(&[
                    "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &ns,
                ]);
                ip(&["link", "set", &outside, "master", &hosts.bridge(kind)]);
                ip(&["link", "set", &outside, "up"]);
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("10.213.{net}.{}/24", i + 2),
                    "dev",
                    &inside,
                ]);
                ip(&["-n", &ns, "link", "set", &inside, "up"]);
            }
        }
        hosts
    }

    fn bridge(&self, kind: &str) -> String {
        format!("trb{kind}{}", self.id)
    }

    fn veth(&self, kind: &str, i: usize) -> String {
        format!("trv{kind}{}{i}", self.id)
    }

    fn namespace(&self, i: usize) -> String {
        format!("troupe-{}-{i}", self.id)
    }

    /// This machine's address on the data bridge (where the hosts reach a proxy to a server).
    #[must_use]
    pub fn data_gateway(&self) -> std::net::IpAddr {
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 213, self.subnet, 1))
    }

    /// This machine's address on the management bridge.
    #[must_use]
    pub fn management_gateway(&self) -> std::net::IpAddr {
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 213, self.subnet + 1, 1))
    }

    /// The command prefix that runs a program on host `i` (`ip netns exec NAME`).
    #[must_use]
    pub fn prefix(&self, i: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.namespace(i)]
    }

    /// Takes host `i`'s data link down.
    pub fn cut(&self, i: usize) {
        ip(&["link", "set", &self.veth("d", i), "down"]);
    }

    /// Brings host `i`'s data link up again.
    pub fn restore(&self, i: usize) {
        ip(&["link", "set", &self.veth("d", i), "up"]);
    }
}

impl Drop for NetHosts {
    fn drop(&mut self) {
        for i in 0..self.count {
            let _ = Command::new("ip").args(["netns", "del", &self.namespace(i)]).status();
        }
        for kind in ["d", "m"] {
            let _ = Command::new("ip").args(["link", "del", &self.bridge(kind)]).status();
        }
    }
}

/// Runs `ip ARGS`.
fn ip(args: &[&str]) {
    let out = check(
        Command::new("ip").args(args).output(),
        "ip must be installed (iproute2)",
    );
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The ports of the shared Redis Cluster of [`redis_cluster_url`] (its bus ports are these plus
/// 10,000).
pub const REDIS_CLUSTER_PORTS: [u16; 3] = [7379, 7380, 7381];

/// A URL (`redis+cluster://…`, no query) naming the nodes of a Redis Cluster of three masters
/// on loopback ([`REDIS_CLUSTER_PORTS`], the machine's `redis-server`, nothing saved), started
/// when it is not up, daemonized and kept for the next tests (each test process would
/// otherwise start its own). One process at a time starts it (a lock directory).
///
/// # Panics
/// When `redis-server` or `redis-cli` is missing, or the cluster is not up within 60 s.
#[must_use]
pub fn redis_cluster_url() -> String {
    let url = format!(
        "redis+cluster://{}",
        REDIS_CLUSTER_PORTS.map(|p| format!("127.0.0.1:{p}")).join(",")
    );
    let up = || REDIS_CLUSTER_PORTS.iter().all(|&port| cluster_state_ok(port));
    if up() {
        return url;
    }
    let base = std::env::temp_dir().join("troupe-redis-cluster");
    check(std::fs::create_dir_all(&base), "the cluster's directory");
    let _lock = StartLock::take(&base, "the Redis Cluster");
    let deadline = Instant::now() + Duration::from_secs(60);
    if !up() {
        for &port in &REDIS_CLUSTER_PORTS {
            let _ = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "shutdown", "nosave"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let dir = base.join(port.to_string());
            let _ = std::fs::remove_dir_all(&dir);
            check(std::fs::create_dir_all(&dir), "a cluster node's directory");
            // Daemonized: the process started exits once the server runs on its own.
            let mut started = redis_server(
                port,
                &dir,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "yes",
                ],
            );
            let _ = started.wait();
        }
        let nodes: Vec<String> = REDIS_CLUSTER_PORTS.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = check(
            Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&nodes)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output(),
            "redis-cli must be installed (redis-tools)",
        );
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        while !up() {
            assert!(Instant::now() < deadline, "the Redis Cluster was not up within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    url
}

/// A lock directory held while one test process starts a server the others share (removed on
/// drop, also when the start panics).
struct StartLock(PathBuf);

impl StartLock {
    /// Takes the lock `dir/lock`, waiting up to 60 s for another process that holds it (a lock
    /// older than that was left by a process that died while starting `what`).
    fn take(dir: &Path, what: &str) -> Self {
        let lock = dir.join("lock");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::create_dir(&lock).is_err() {
            let stale = std::fs::metadata(&lock)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(60)));
            if stale {
                let _ = std::fs::remove_dir(&lock);
            }
            assert!(
                Instant::now() < deadline,
                "another test held {what}'s start lock for 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self(lock)
    }
}

impl Drop for StartLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The port of the shared PgBouncer of [`pgbouncer_url`].
pub const PGBOUNCER_PORT: u16 = 6439;

/// A URL (`postgres://postgres@127.0.0.1:6439/…`, no query) reaching the machine's PostgreSQL
/// through the shared [`PgBouncer`] on [`PGBOUNCER_PORT`] with `pool_mode` (`transaction` or
/// `session`). Started when it is not up (or runs another configuration), daemonized and kept
/// for the next tests; one process at a time starts it (a lock directory).
///
/// # Panics
/// As [`PgBouncer::start`].
#[must_use]
pub fn pgbouncer_url(pool_mode: &str) -> String {
    let bouncer = PgBouncer {
        dir: std::env::temp_dir().join("troupe-pgbouncer"),
        port: PGBOUNCER_PORT,
        shared: true,
    };
    let current =
        || bouncer.up() && std::fs::read_to_string(bouncer.config_file()).is_ok_and(|c| c == bouncer.config());
    if !current() {
        check(std::fs::create_dir_all(&bouncer.dir), "PgBouncer's directory");
        let _lock = StartLock::take(&bouncer.dir, "PgBouncer");
        if !current() {
            // One started with another configuration (an older test build): stopped first.
            bouncer.kill();
            bouncer.start();
        }
    }
    bouncer.url(pool_mode)
}

/// A PgBouncer (Debian's `pgbouncer`) in front of the machine's PostgreSQL (`127.0.0.1:5432`,
/// database `test`): databases `test_transaction` (`pool_mode = transaction`, 8 server
/// connections) and `test_session` (`pool_mode = session`, 20), idle server connections closed
/// after 5 s (the machine's server has 100 connection slots, and the chaos tests running beside
/// need most of them), trust authentication, no `ignore_startup_parameters`. It runs
/// daemonized as the `postgres` user (PgBouncer refuses to run as root). A test's own (on a
/// free port, [`PgBouncer::new`]) is killed on drop.
#[derive(Debug)]
pub struct PgBouncer {
    dir: PathBuf,
    port: u16,
    /// The shared one of [`pgbouncer_url`]: kept on drop.
    shared: bool,
}

impl PgBouncer {
    /// One of a test's own on a free port (not started yet).
    #[must_use]
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "troupe-pgbouncer-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        check(std::fs::create_dir_all(&dir), "PgBouncer's directory");
        Self {
            dir,
            port: free_port(),
            shared: false,
        }
    }

    /// Its URL for `pool_mode` (`transaction` or `session`), no query.
    #[must_use]
    pub fn url(&self, pool_mode: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/test_{pool_mode}", self.port)
    }

    /// The port it serves on.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    fn config_file(&self) -> PathBuf {
        self.dir.join("pgbouncer.ini")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pgbouncer.pid")
    }

    fn config(&self) -> String {
        let database = |mode: &str, size: u32| {
            format!("test_{mode} = host=127.0.0.1 port=5432 dbname=test pool_mode={mode} pool_size={size}\n")
        };
        format!(
            "[databases]\n{}{}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {}\nlogfile = {}\npidfile = {}\n\
             max_client_conn = 2000\nserver_idle_timeout = 5\nadmin_users = postgres\n",
            database("transaction", 8),
            database("session", 20),
            self.port,
            self.dir.join("userlist.txt").display(),
            self.dir.join("pgbouncer.log").display(),
            self.pid_file().display()
        )
    }

    fn up(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    /// Starts it (again) and waits until it accepts connections.
    ///
    /// # Panics
    /// When `pgbouncer` is missing or does not start within 30 s.
    pub fn start(&self) {
        check(
            std::fs::write(self.config_file(), self.config()),
            "PgBouncer's configuration",
        );
        check(
            std::fs::write(self.dir.join("userlist.txt"), "\"postgres\" \"\"\n"),
            "PgBouncer's user list",
        );
        give_to("postgres", &self.dir);
        let program = if Path::new("/usr/sbin/pgbouncer").exists() {
            "/usr/sbin/pgbouncer"
        } else {
            "pgbouncer"
        };
        succeed(
            command_as("postgres", program).args(["-d", &self.config_file().display().to_string()]),
            "pgbouncer must be installed (apt-get install pgbouncer; scripts/test does it)",
            "pgbouncer did not start",
        );
        wait_for_port(
            self.port,
            Duration::from_secs(30),
            "PgBouncer",
            &self.dir.join("pgbouncer.log"),
        );
    }

    /// Kills it (SIGKILL: every client and server connection dropped at once) and waits until
    /// its port is free.
    pub fn kill(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.pid_file()) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            let _ = std::fs::remove_file(self.pid_file());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.up() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Default for PgBouncer {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if !self.shared {
            self.kill();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether the cluster node on `port` says the cluster is up.
fn cluster_state_ok(port: u16) -> bool {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster", "info"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok"))
}

/// A Redis Cluster of a test's own: three masters, each with one replica, on free loopback
/// ports (bus ports free too), nodes failed after 1 s without an answer. Killed (SIGKILL) on
/// drop. [`RedisClusterSet::kill_master_of`] kills the master serving a key's slot and returns
/// once its replica serves it; [`RedisClusterSet::restart`] starts a killed node again on its
/// data, where it rejoins as a replica.
#[derive(Debug)]
pub struct RedisClusterSet {
    dir: PathBuf,
    /// Each node's port and bus port.
    nodes: Vec<(u16, u16)>,
    processes: std::sync::Mutex<std::collections::HashMap<u16, std::process::Child>>,
}

impl RedisClusterSet {
    /// Starts the six nodes and joins them (`redis-cli --cluster create … --cluster-replicas 1`).
    ///
    /// # Panics
    /// When a node does not start, or the cluster is not up with every replica synced in 30 s.
    #[must_use]
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "troupe-cluster-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        // Twelve distinct ports: each held open until all are chosen (free_port alone may give
        // the same port twice, as it closes the one it found).
        let held: Vec<std::net::TcpListener> = (0..12)
            .map(|_| check(std::net::TcpListener::bind("127.0.0.1:0"), "a free port"))
            .collect();
        let ports: Vec<u16> = held
            .iter()
            .map(|l| check(l.local_addr(), "a free port").port())
            .collect();
        drop(held);
        let set = Self {
            dir,
            nodes: ports.chunks(2).map(|pair| (pair[0], pair[1])).collect(),
            processes: std::sync::Mutex::default(),
        };
        for &(port, _) in &set.nodes {
            set.start_node(port);
        }
        let nodes: Vec<String> = set.nodes.iter().map(|(p, _)| format!("127.0.0.1:{p}")).collect();
        succeed(
            Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&nodes)
                .args(["--cluster-replicas", "1", "--cluster-yes"]),
            "redis-cli must be installed (redis-tools)",
            "redis-cli --cluster create failed",
        );
        set.wait_until("the cluster is up and every replica synced", || set.settled());
        set
    }

    /// `redis+cluster://` naming every node, with `query` (`?…`) after.
    #[must_use]
    pub fn url(&self, query: &str) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(|(p, _)| format!("127.0.0.1:{p}")).collect();
        format!("redis+cluster://{}{query}", nodes.join(","))
    }

    /// Kills (SIGKILL) the master serving `key`'s slot and returns its port once another node
    /// serves the slot and the cluster is up.
    ///
    /// # Panics
    /// When no failover happens within 30 s.
    pub fn kill_master_of(&self, key: &str) -> u16 {
        let old = self.serving(key).expect("a master serves the key's slot");
        if let Some(mut child) = self.processes().remove(&old) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.wait_until("a replica takes over the slot", || {
            self.serving(key).is_some_and(|p| p != old)
                && self
                    .live()
                    .iter()
                    .all(|&p| cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        });
        old
    }

    /// Starts the node on `port` again on its data (it rejoins as a replica) and returns once
    /// it has synced.
    ///
    /// # Panics
    /// When it does not start or sync within 30 s.
    pub fn restart(&self, port: u16) {
        self.start_node(port);
        self.wait_until("the restarted node syncs as a replica", || self.settled());
    }

    /// The port of the master serving `key`'s slot, as a live node says.
    fn serving(&self, key: &str) -> Option<u16> {
        let live = self.live();
        let asked = *live.first()?;
        let slot: u32 = cli(asked, &["CLUSTER", "KEYSLOT", key]).parse().ok()?;
        cli(asked, &["CLUSTER", "NODES"]).lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let master = fields.get(2)?.split(',').any(|f| f == "master") && !fields.get(2)?.contains("fail");
            let serves = fields.iter().skip(8).any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                matches!((a.parse::<u32>(), b.parse::<u32>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
            });
            (master && serves)
                .then(|| fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok())
                .flatten()
        })
    }

    /// Whether every live node says the cluster is up, every live replica has synced and every
    /// master streams its writes to its replica.
    fn settled(&self) -> bool {
        self.live().iter().all(|&p| {
            let replication = cli(p, &["INFO", "replication"]);
            cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
                && (replication.contains("role:master") || replication.contains("master_link_status:up"))
        }) && self
            .live()
            .iter()
            .filter(|&&p| cli(p, &["INFO", "replication"]).contains("role:slave"))
            .count()
            == 3
            && self
                .live()
                .iter()
                .filter(|&&p| cli(p, &["INFO", "replication"]).contains("role:master"))
                .all(|&p| streams_to_its_replicas(p))
    }

    fn live(&self) -> Vec<u16> {
        let mut live: Vec<u16> = self.processes().keys().copied().collect();
        live.sort_unstable();
        live
    }

    fn processes(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u16, std::process::Child>> {
        self.processes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn start_node(&self, port: u16) {
        let bus = self
            .nodes
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(0, |(_, b)| *b)
            .to_string();
        let data = self.dir.join(port.to_string());
        check(std::fs::create_dir_all(&data), "a Redis data directory");
        let child = redis_server(
            port,
            &data,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                // A replica always stands for election when its master fails, however long
                // since it last heard from it (by default it declines after 10 node timeouts
                // plus a ping period: a test's failover must happen, not depend on that).
                "--cluster-replica-validity-factor",
                "0",
                "--cluster-port",
                &bus,
                "--repl-diskless-sync-delay",
                "0",
            ],
        );
        self.processes().insert(port, child);
    }

    fn wait_until(&self, what: &str, done: impl Fn() -> bool) {
        wait_until(&format!("Redis Cluster: {what}"), done, || {
            let nodes = self.live().first().map(|&p| cli(p, &["CLUSTER", "NODES"]));
            // What each live node's log says about elections and links (why a replica did not
            // take over: votes denied, too long without its master, ...).
            let logs: String = self
                .live()
                .iter()
                .map(|&port| {
                    let log =
                        std::fs::read_to_string(self.dir.join(port.to_string()).join("redis.log")).unwrap_or_default();
                    let lines: Vec<&str> = log
                        .lines()
                        .filter(|l| {
                            ["ailover", "election", "vote", "MASTER", "master", "FAIL", "epoch"]
                                .iter()
                                .any(|w| l.contains(w))
                        })
                        .collect();
                    let tail = lines[lines.len().saturating_sub(12)..].join("\n  ");
                    format!("\nlog of {port}:\n  {tail}")
                })
                .collect();
            format!("nodes: {}{logs}", nodes.unwrap_or_default())
        });
    }
}

impl Drop for RedisClusterSet {
    fn drop(&mut self) {
        for (_, mut child) in self.processes().drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
