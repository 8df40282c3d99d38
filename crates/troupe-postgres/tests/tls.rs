//! PostgreSQL with `sslmode=verify-full` and a real handshake: an instance of this test's own
//! (`initdb` in a temporary directory) that accepts only TLS connections presenting a client
//! certificate its CA signed. The CA and the client certificate are given in the URL as libpq
//! names them (`sslrootcert`, `sslcert`, `sslkey`). Messages run and results are stored over
//! it; a wrong CA and a missing client certificate are refused in one clear line.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use troupe_postgres::{PostgresBroker, PostgresOptions, PostgresResults, PostgresState};
use troupe_test_suite::tls::{Pki, TlsServer};
use troupe_test_suite::{RawEnqueue, TestBroker};

fn url(server: &TlsServer, ca: &std::path::Path, client: Option<(&std::path::Path, &std::path::Path)>) -> String {
    let mut url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}&connect_timeout=5s",
        server.port,
        ca.display()
    );
    if let Some((cert, key)) = client {
        url.push_str(&format!("&sslcert={}&sslkey={}", cert.display(), key.display()));
    }
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_a_test_ca_and_a_client_certificate_runs_messages_and_stores_results() {
    let pki = Pki::generate();
    let server = TlsServer::postgres(&pki);
    let options = PostgresOptions::from_url(&url(&server, &pki.ca, Some((&pki.client_cert, &pki.client_key))))
        .unwrap()
        .lease(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(50))
        .max_connections(4);
    let limit = options.max_message_size;
    let broker = PostgresBroker::open(options).await.expect("TLS connect");
    let raw_broker = broker.clone();
    let raw: RawEnqueue = Arc::new(move |queue, bytes| {
        let b = raw_broker.clone();
        Box::pin(async move { b.enqueue_raw(&queue, bytes).await })
    });
    let results = PostgresResults::from_pool(broker.pool().clone()).into_dyn();
    let state = PostgresState::from_pool(broker.pool().clone()).into_dyn();
    let tb = TestBroker::new(Arc::new(broker.clone()), raw, Duration::from_millis(2500), limit)
        .with_results(results)
        .with_state(state);
    troupe_test_suite::cases::worker_runs_actor_and_acks(&tb).await;
    troupe_test_suite::cases::results_are_stored(&tb).await;
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(broker.pool())
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");
}

#[tokio::test]
async fn a_wrong_certificate_or_a_missing_one_is_refused_in_one_clear_line() {
    let pki = Pki::generate();
    let server = TlsServer::postgres(&pki);
    let client = Some((pki.client_cert.as_path(), pki.client_key.as_path()));

    let err = PostgresBroker::connect(&url(&server, &pki.other_ca, client))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("wrong CA: {err}");
    assert!(
        err.contains("not signed by a CA this client trusts; set `sslrootcert`"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");

    let err = PostgresBroker::connect(&url(&server, &pki.ca, None))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("no client certificate: {err}");
    assert!(err.contains("cannot use PostgreSQL at"), "{err}");
    assert!(err.contains("`sslcert`"), "{err}");
    assert!(!err.contains('\n'), "{err}");

    // Without TLS the server refuses (pg_hba.conf: hostssl only).
    let err = PostgresBroker::connect(&format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/postgres?sslmode=disable",
        server.port
    ))
    .await
    .unwrap_err()
    .to_string();
    eprintln!("plain: {err}");
    assert!(err.contains("accepts only TLS connections"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    let err = PostgresBroker::connect(&format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        server.port
    ))
    .await
    .unwrap_err()
    .to_string();
    eprintln!("missing CA file: {err}");
    assert!(
        err.contains("cannot read the PostgreSQL URL's `sslrootcert` file /nonexistent/ca.pem"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}
