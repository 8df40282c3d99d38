//! TLS fixtures: a test PKI and TLS-only servers of Redis, PostgreSQL and RabbitMQ, started on
//! free ports of their own (the machine's servers are never touched) and stopped on drop.
//!
//! The PKI holds a CA, a server certificate for `localhost` and `127.0.0.1`, a client
//! certificate, and a second CA that signed none of them (the "wrong" one). Every server asks
//! for a client certificate signed by the CA and serves nothing in plain text.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::servers::{PostgresNode, RabbitmqNode, check, free_port, give_to, set_mode, wait_for_port};

/// A test PKI in a directory of its own (removed on drop).
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    /// The CA that signed the server and client certificates (PEM).
    pub ca: PathBuf,
    /// The server's certificate, for `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    /// The server certificate's key.
    pub server_key: PathBuf,
    /// A client certificate the CA signed.
    pub client_cert: PathBuf,
    /// The client certificate's key.
    pub client_key: PathBuf,
    /// A CA that signed none of these.
    pub other_ca: PathBuf,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = check(CertificateParams::new(Vec::<String>::new()), "CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = check(KeyPair::generate(), "CA key");
    let cert = check(params.self_signed(&key), "CA certificate");
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(names: &[&str], common_name: &str, issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = check(CertificateParams::new(names), "certificate params");
    params.distinguished_name.push(DnType::CommonName, common_name);
    let key = check(KeyPair::generate(), "key");
    let cert = check(params.signed_by(&key, issuer), "certificate");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    /// Generates a fresh PKI under the system's temporary directory.
    ///
    /// # Panics
    /// When a file cannot be written.
    #[must_use]
    pub fn generate() -> Self {
        let dir = std::env::temp_dir().join(format!("troupe-pki-{}", uuid::Uuid::new_v4().simple()));
        check(std::fs::create_dir_all(&dir), "PKI directory");
        // The servers run as their own users (postgres, rabbitmq): they read the files here.
        set_mode(&dir, 0o755);
        let (ca_pem, issuer) = ca("Troupe test CA");
        let (other_pem, _) = ca("Troupe other CA");
        let (server_cert, server_key) = leaf(&["localhost", "127.0.0.1"], "localhost", &issuer);
        let (client_cert, client_key) = leaf(&[], "troupe-client", &issuer);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            check(std::fs::write(&path, text), "PKI file");
            set_mode(&path, 0o644);
            path
        };
        Self {
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
            other_ca: write("other-ca.pem", &other_pem),
            dir,
        }
    }

    /// The directory the files are in.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

enum Kind {
    Redis(Child),
    Postgres(PostgresNode),
    Rabbitmq(RabbitmqNode),
}

/// A TLS-only server for one test, stopped on drop.
pub struct TlsServer {
    /// The port it serves TLS on (127.0.0.1).
    pub port: u16,
    dir: PathBuf,
    kind: Kind,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

fn server_dir(pki: &Pki, name: &str) -> PathBuf {
    let dir = pki.dir().join(name);
    check(std::fs::create_dir_all(&dir), "server directory");
    set_mode(&dir, 0o755);
    dir
}

impl TlsServer {
    /// `redis-server` serving only TLS, requiring a client certificate the PKI's CA signed.
    ///
    /// # Panics
    /// When `redis-server` is missing or does not start.
    #[must_use]
    pub fn redis(pki: &Pki) -> Self {
        let port = free_port();
        let dir = server_dir(pki, "redis");
        let log = dir.join("redis.log");
        let path = |p: &Path| p.display().to_string();
        let child = check(
            Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--tls-cert-file", &path(&pki.server_cert)])
                .args(["--tls-key-file", &path(&pki.server_key)])
                .args(["--tls-ca-cert-file", &path(&pki.ca)])
                .args(["--tls-auth-clients", "yes", "--save", "", "--appendonly", "no"])
                .args(["--logfile", &path(&log)])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn(),
            "redis-server must be installed (it is on the project's machines)",
        );
        let server = Self {
            port,
            dir,
            kind: Kind::Redis(child),
        };
        wait_for_port(port, Duration::from_secs(10), "redis-server (TLS)", &log);
        server
    }

    /// A PostgreSQL instance of its own (`initdb` in a temporary directory) that accepts only
    /// TLS connections with a client certificate the PKI's CA signed, user `postgres`, no
    /// password.
    ///
    /// # Panics
    /// When `initdb` or `pg_ctl` are missing or the server does not start.
    #[must_use]
    pub fn postgres(pki: &Pki) -> Self {
        let dir = server_dir(pki, "postgres");
        let node = PostgresNode::in_dir(dir.clone());
        let data = node.data();
        // The server's key must belong to the server's user, readable by it alone.
        for (from, name) in [
            (&pki.server_cert, "server.crt"),
            (&pki.server_key, "server.key"),
            (&pki.ca, "root.crt"),
        ] {
            check(std::fs::copy(from, data.join(name)), "copy a TLS file");
        }
        let mut hba = check(std::fs::File::create(data.join("pg_hba.conf")), "pg_hba.conf");
        check(
            hba.write_all(
                b"local all all trust\n\
                  hostssl all all 127.0.0.1/32 trust clientcert=verify-ca\n\
                  hostssl all all ::1/128 trust clientcert=verify-ca\n\
                  host all all 0.0.0.0/0 reject\n",
            ),
            "pg_hba.conf",
        );
        give_to("postgres", &dir);
        set_mode(&data.join("server.key"), 0o600);
        node.start_with(
            "-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key -c ssl_ca_file=root.crt \
             -c fsync=off -c max_connections=50",
        );
        Self {
            port: node.port(),
            dir,
            kind: Kind::Postgres(node),
        }
    }

    /// A RabbitMQ node of its own ([`RabbitmqNode`]) whose only AMQP listener is TLS, asking
    /// for a client certificate the PKI's CA signed; user guest/guest.
    ///
    /// # Panics
    /// When `rabbitmq-server` is missing or the node does not start within 90 s.
    #[must_use]
    pub fn rabbitmq(pki: &Pki) -> Self {
        let node = RabbitmqNode::with_config(|port| {
            format!(
                "listeners.ssl.default = {port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n\
                 loopback_users = none\n",
                pki.ca.display(),
                pki.server_cert.display(),
                pki.server_key.display(),
            )
        });
        node.start();
        Self {
            port: node.port(),
            dir: server_dir(pki, "rabbitmq"),
            kind: Kind::Rabbitmq(node),
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        match &mut self.kind {
            Kind::Redis(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            // Stopped before its directory goes.
            Kind::Postgres(node) => node.kill(),
            Kind::Rabbitmq(node) => node.kill(),
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
