//! The OTLP exporter (feature `otlp`).

use opentelemetry_otlp::tonic_types::transport::ClientTlsConfig;
use opentelemetry_otlp::{ExporterBuildError, SpanExporter, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// A tracer provider exporting spans in batches over OTLP/gRPC to `endpoint`
/// (`http://localhost:4317` for a local collector; an `https://` endpoint is reached over
/// rustls, trusting the webpki roots), naming the service `service_name`. An empty `endpoint`
/// takes `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`, else the default.
///
/// Call it inside a Tokio runtime; pass the provider to
/// [`OpenTelemetry::new`](crate::OpenTelemetry::new) or set it globally, and call
/// [`shutdown`](SdkTracerProvider::shutdown) before exiting to flush the last spans. Shutting
/// down blocks the calling thread until the last batch is sent: on a current-thread runtime,
/// call it from `spawn_blocking` (or after the runtime ends), or the gRPC channel cannot make
/// progress and the export waits for its timeout.
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let provider = troupe_otel::otlp_tracer_provider("http://localhost:4317", "billing-worker")?;
/// opentelemetry::global::set_tracer_provider(provider.clone());
/// // App::builder(broker).middleware_before::<AgeLimit>(OpenTelemetry::global()) ...
/// provider.shutdown()?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// When the exporter cannot be built (an invalid endpoint, say).
pub fn otlp_tracer_provider(endpoint: &str, service_name: &str) -> Result<SdkTracerProvider, ExporterBuildError> {
    let mut exporter = SpanExporter::builder().with_tonic();
    if !endpoint.is_empty() {
        exporter = exporter.with_endpoint(endpoint);
    }
    if endpoint.starts_with("https://") {
        exporter = exporter.with_tls_config(ClientTlsConfig::new().with_enabled_roots());
    }
    let exporter = exporter.build()?;
    Ok(SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service_name.to_owned()).build())
        .with_batch_exporter(exporter)
        .build())
}
