//! The OTLP helper builds (without a collector: the channel connects lazily).
#![cfg(feature = "otlp")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use opentelemetry::trace::{Tracer, TracerProvider};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_providers_build_for_plain_and_tls_endpoints() {
    for endpoint in ["http://localhost:4317", "https://collector.invalid:4317", ""] {
        let provider = troupe_otel::otlp_tracer_provider(endpoint, "troupe-otel-test").unwrap();
        drop(provider.tracer("test").start("unsent"));
        // Nothing listens: the export may fail, but shutting down returns.
        let _ = provider.shutdown();
    }
}
