//! `amqps://` with a real handshake: a RabbitMQ node of this test's own with only a TLS
//! listener, asking for a client certificate its CA signed. The CA and the client certificate
//! are given in the URL under RabbitMQ's URI parameter names (`cacertfile`, `certfile`,
//! `keyfile`). Messages run over it; a wrong CA, a missing client certificate and settings that
//! cannot work are refused in one clear line. One test: the node takes seconds to start.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use troupe_rabbitmq::{RabbitmqBroker, RabbitmqOptions};
use troupe_test_suite::tls::{Pki, TlsServer};
use troupe_test_suite::{RawEnqueue, TestBroker};

fn url(server: &TlsServer, ca: &std::path::Path, client: Option<(&std::path::Path, &std::path::Path)>) -> String {
    let mut url = format!(
        "amqps://guest:guest@127.0.0.1:{}/%2f?cacertfile={}&connect_timeout=10s",
        server.port,
        ca.display()
    );
    if let Some((cert, key)) = client {
        url.push_str(&format!("&certfile={}&keyfile={}", cert.display(), key.display()));
    }
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_test_ca_and_a_client_certificate_and_the_wrong_ones() {
    let pki = Pki::generate();
    let server = TlsServer::rabbitmq(&pki);
    let client = Some((pki.client_cert.as_path(), pki.client_key.as_path()));

    let options = RabbitmqOptions::from_url(&url(&server, &pki.ca, client))
        .unwrap()
        .max_message_size(64 * 1024);
    let limit = options.max_message_size;
    let broker = RabbitmqBroker::open(options).await.expect("TLS connect");
    let raw_broker = broker.clone();
    let raw: RawEnqueue = Arc::new(move |queue, bytes| {
        let b = raw_broker.clone();
        Box::pin(async move { b.enqueue_raw(&queue, bytes).await })
    });
    let tb = TestBroker::new(Arc::new(broker), raw, Duration::from_secs(3), limit);
    troupe_test_suite::cases::worker_runs_actor_and_acks(&tb).await;
    troupe_test_suite::cases::results_are_stored(&tb).await;

    // The server's certificate was not signed by the CA the client trusts.
    let err = RabbitmqBroker::connect(&url(&server, &pki.other_ca, client))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("wrong CA: {err}");
    assert!(
        err.contains("not signed by a CA this client trusts; set `cacertfile`"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");

    // The server asks for a client certificate and gets none.
    let err = RabbitmqBroker::connect(&url(&server, &pki.ca, None))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("no client certificate: {err}");
    assert!(
        err.contains("cannot connect to RabbitMQ at amqps://guest:***@127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("set `certfile` and `keyfile`"), "{err}");
    assert!(!err.contains('\n'), "{err}");

    // Settings that cannot work are refused before connecting, passwords redacted.
    let err = RabbitmqOptions::from_url("amqp://guest:hunter2@127.0.0.1:5672/%2f?cacertfile=/tmp/ca.pem")
        .unwrap_err()
        .to_string();
    assert!(err.contains("use amqps://"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let err = RabbitmqOptions::from_url("amqps://guest:hunter2@127.0.0.1:5671/%2f?keyfile=/tmp/k.pem")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`keyfile` is set without `certfile`"), "{err}");
    let err = RabbitmqBroker::connect(&format!(
        "amqps://guest:hunter2@127.0.0.1:{}/%2f?cacertfile=/nonexistent/ca.pem",
        server.port
    ))
    .await
    .unwrap_err()
    .to_string();
    eprintln!("missing CA file: {err}");
    assert!(err.contains("`cacertfile` file /nonexistent/ca.pem"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
