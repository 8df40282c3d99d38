//! `rediss://` with a real handshake: a `redis-server` of this test's own serving only TLS and
//! asking for a client certificate, a test CA given in the URL as redis-py names it
//! (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`). Messages run and results are stored over it;
//! a wrong CA, a missing client certificate and bad settings are refused in one clear line.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use troupe_redis::{RedisBroker, RedisOptions, RedisResults, RedisState};
use troupe_test_suite::tls::{Pki, TlsServer};
use troupe_test_suite::{RawEnqueue, TestBroker};

fn url(server: &TlsServer, ca: &std::path::Path, client: Option<(&std::path::Path, &std::path::Path)>) -> String {
    let mut url = format!(
        "rediss://127.0.0.1:{}/0?ssl_ca_certs={}&connect_timeout=5s",
        server.port,
        ca.display()
    );
    if let Some((cert, key)) = client {
        url.push_str(&format!(
            "&ssl_certfile={}&ssl_keyfile={}",
            cert.display(),
            key.display()
        ));
    }
    url
}

async fn test_broker(url: &str) -> TestBroker {
    let options = RedisOptions::from_url(url)
        .unwrap()
        .namespace(format!("troupe-tls-{}", uuid::Uuid::new_v4().simple()))
        .heartbeat_timeout(Duration::from_secs(1))
        .maintenance_interval(Duration::from_millis(200));
    let limit = options.max_message_size;
    let broker = RedisBroker::open(options.clone()).await.expect("TLS connect");
    let raw_broker = broker.clone();
    let raw: RawEnqueue = Arc::new(move |queue, bytes| {
        let b = raw_broker.clone();
        Box::pin(async move { b.enqueue_raw(&queue, bytes).await })
    });
    let results = RedisResults::open(options.clone()).await.expect("results").into_dyn();
    let state = RedisState::open(options).await.expect("state").into_dyn();
    TestBroker::new(Arc::new(broker), raw, Duration::from_millis(2500), limit)
        .with_results(results)
        .with_state(state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_test_ca_and_a_client_certificate_runs_messages_and_stores_results() {
    let pki = Pki::generate();
    let server = TlsServer::redis(&pki);
    let tb = test_broker(&url(&server, &pki.ca, Some((&pki.client_cert, &pki.client_key)))).await;
    troupe_test_suite::cases::worker_runs_actor_and_acks(&tb).await;
    troupe_test_suite::cases::results_are_stored(&tb).await;
}

#[tokio::test]
async fn a_wrong_certificate_or_a_missing_one_is_refused_in_one_clear_line() {
    let pki = Pki::generate();
    let server = TlsServer::redis(&pki);
    let client = Some((pki.client_cert.as_path(), pki.client_key.as_path()));

    // The server's certificate was not signed by the CA the client trusts.
    let err = RedisBroker::connect(&url(&server, &pki.other_ca, client))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("wrong CA: {err}");
    assert!(
        err.contains("not signed by a CA this client trusts; set `ssl_ca_certs`"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");

    // The server asks for a client certificate and gets none.
    let err = match RedisBroker::connect(&url(&server, &pki.ca, None)).await {
        Err(e) => e.to_string(),
        // TLS 1.3 lets the handshake finish before the server checks: the first command fails.
        Ok(broker) => {
            use troupe_core::Broker as _;
            broker.queue_names().await.unwrap_err().to_string()
        }
    };
    eprintln!("no client certificate: {err}");
    assert!(err.contains("set `ssl_certfile` and `ssl_keyfile`"), "{err}");
    assert!(!err.contains('\n'), "{err}");

    // The public roots do not know the test CA.
    let err = RedisBroker::connect(&format!("rediss://127.0.0.1:{}/0?connect_timeout=5s", server.port))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("no CA: {err}");
    assert!(err.contains("set `ssl_ca_certs`"), "{err}");

    // Settings that cannot work are refused before connecting.
    let err = RedisOptions::from_url("redis://127.0.0.1:6379/0?ssl_ca_certs=/tmp/ca.pem")
        .unwrap_err()
        .to_string();
    assert!(err.contains("use rediss://"), "{err}");
    let err = RedisOptions::from_url("rediss://127.0.0.1:6379/0?ssl_certfile=/tmp/c.pem")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`ssl_certfile` is set without `ssl_keyfile`"), "{err}");
    let err = RedisBroker::connect("rediss://:hunter2@127.0.0.1:6379/0?ssl_ca_certs=/nonexistent/ca.pem")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("`ssl_ca_certs` file /nonexistent/ca.pem"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
