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
            "cd /var/lib/rabbitmq && HOME=/var/lib/rabbitmq RABBITMQ_NODENAME={name} \
             RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT={port} RABBITMQ_DIST_PORT={dist} \
             RABBITMQ_MNESIA_BASE={dir}/mnesia RABBITMQ_LOG_BASE={dir}/log \
             RABBITMQ_ENABLED_PLUGINS_FILE={dir}/enabled_plugins RABBITMQ_CONFIG_FILE={dir}/rabbitmq \
             RABBITMQ_PID_FILE={dir}/pid /usr/lib/rabbitmq/bin/rabbitmq-server -detached",
            name = self.name(),
            port = self.node_port,
            dist = self.dist_port,
        );
        let status = check(
            Command::new("su")
                .args(["rabbitmq", "-s", "/bin/sh", "-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status(),
            "su and rabbitmq-server must be installed (they are on the project's machines)",
        );
        assert!(status.success(), "rabbitmq-server -detached failed");
        let log = self.dir.join("log").join(format!("{}.log", self.name()));
        wait_for_port(self.port, Duration::from_secs(90), "the private RabbitMQ node", &log);
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
