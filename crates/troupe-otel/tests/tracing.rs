//! The middleware against an in-memory exporter, with the memory broker and a real worker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::trace::{
    FutureExt, SpanId, SpanKind, Status, TraceContextExt, TraceId, TraceState, Tracer, TracerProvider,
};
use opentelemetry::{Context, Value as OtelValue};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::{Map, json};
use troupe_core::middleware::{AgeLimit, Retries};
use troupe_core::{Actor, ActorError, ActorOptions, App, AppBuilder, Broker, MemoryBroker, Message, current_app};
use troupe_otel::{OpenTelemetry, TRACEPARENT, TRACESTATE, extract_context, inject_context};
use troupe_worker::Worker;

const QUEUE: &str = "otel";
const WAIT: Duration = Duration::from_secs(10);

/// Where the middleware goes in the list.
#[derive(Clone, Copy, Debug)]
enum Placement {
    /// Appended: inside `Retries`.
    Inner,
    /// First, before `AgeLimit`.
    Outer,
}

const PLACEMENTS: [Placement; 2] = [Placement::Inner, Placement::Outer];

struct Setup {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    broker: MemoryBroker,
}

impl Setup {
    fn new() -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        Self {
            exporter,
            provider,
            broker: MemoryBroker::new(),
        }
    }

    /// An app on the memory broker with the middleware placed as told, quick retries and the
    /// actors `add` gives it.
    fn app(&self, placement: Placement, add: impl FnOnce(AppBuilder) -> AppBuilder) -> App {
        let otel = OpenTelemetry::new(&self.provider);
        let builder = App::builder(self.broker.clone().into_dyn()).retries(
            Retries::default()
                .min_backoff(Duration::from_millis(10))
                .max_backoff(Duration::from_millis(50)),
        );
        let builder = match placement {
            Placement::Inner => builder.middleware(otel),
            Placement::Outer => builder.middleware_before::<AgeLimit>(otel),
        };
        add(builder).build().unwrap()
    }

    /// Runs a worker until the queue is drained.
    async fn drain(&self, app: &App) {
        let worker = Worker::builder(app.clone())
            .concurrency(2)
            .fetch_timeout(Duration::from_millis(100))
            .start()
            .await
            .unwrap();
        app.join(QUEUE, WAIT).await.unwrap();
        worker.stop().await;
    }

    fn spans(&self) -> Vec<SpanData> {
        self.exporter.get_finished_spans().unwrap()
    }

    /// A context with a started test span: the producer's.
    fn producer(&self) -> Context {
        let tracer = self.provider.tracer("test");
        Context::current_with_span(tracer.start("producer"))
    }
}

fn options() -> ActorOptions {
    ActorOptions::new().queue_name(QUEUE)
}

/// Counts its calls.
struct Echo(Arc<AtomicUsize>);

impl Actor for Echo {
    type Args = (i64,);
    type Output = i64;
    fn name(&self) -> &str {
        "echo"
    }
    fn options(&self) -> ActorOptions {
        options()
    }
    async fn call(&self, (x,): (i64,)) -> Result<i64, ActorError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(x)
    }
}

/// Fails its first two calls.
struct Flaky(Arc<AtomicUsize>);

impl Actor for Flaky {
    type Args = ();
    type Output = ();
    fn name(&self) -> &str {
        "flaky"
    }
    fn options(&self) -> ActorOptions {
        options()
    }
    async fn call(&self, (): ()) -> Result<(), ActorError> {
        if self.0.fetch_add(1, Ordering::SeqCst) < 2 {
            return Err(ActorError::new("Flaked", "not yet"));
        }
        Ok(())
    }
}

/// Sends `Echo` from inside itself.
struct Fan;

impl Actor for Fan {
    type Args = ();
    type Output = ();
    fn name(&self) -> &str {
        "fan"
    }
    fn options(&self) -> ActorOptions {
        options()
    }
    async fn call(&self, (): ()) -> Result<(), ActorError> {
        let app = current_app().map_err(ActorError::msg)?;
        let echo = Echo(Arc::new(AtomicUsize::new(0)));
        app.send(&echo, (7,)).await.map_err(ActorError::msg)?;
        Ok(())
    }
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn one<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let found = named(spans, name);
    assert_eq!(found.len(), 1, "one {name:?} span expected in {:#?}", names(spans));
    found[0]
}

fn names(spans: &[SpanData]) -> Vec<String> {
    spans.iter().map(|s| s.name.to_string()).collect()
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a OtelValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn trace_id(span: &SpanData) -> TraceId {
    span.span_context.trace_id()
}

fn span_id(span: &SpanData) -> SpanId {
    span.span_context.span_id()
}

/// One trace from the producer's span, through the publish span, to the process span; the
/// message carries the publish span's `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_runs_from_the_producer_to_the_actor() {
    for placement in PLACEMENTS {
        let setup = Setup::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let app = setup.app(placement, |b| b.actor(Echo(Arc::clone(&calls))));
        let cx = setup.producer();
        let sent = app
            .send(&Echo(Arc::clone(&calls)), (1,))
            .with_context(cx.clone())
            .await
            .unwrap();
        cx.span().end();
        setup.drain(&app).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let spans = setup.spans();
        let producer = one(&spans, "producer");
        let publish = one(&spans, "send otel");
        let process = one(&spans, "process otel");
        assert_eq!(publish.span_kind, SpanKind::Producer);
        assert_eq!(process.span_kind, SpanKind::Consumer);
        assert_eq!(trace_id(publish), trace_id(producer), "{placement:?}");
        assert_eq!(trace_id(process), trace_id(producer), "{placement:?}");
        assert_eq!(publish.parent_span_id, span_id(producer), "{placement:?}");
        assert_eq!(process.parent_span_id, span_id(publish), "{placement:?}");
        assert!(process.parent_span_is_remote, "the parent came through the message");
        assert_eq!(process.status, Status::Unset);

        let traceparent = sent.message().options[TRACEPARENT].as_str().unwrap();
        assert_eq!(
            traceparent,
            format!("00-{}-{}-01", trace_id(producer), span_id(publish))
        );
        assert!(
            !sent.message().options.contains_key(TRACESTATE),
            "no tracestate when it is empty"
        );
    }
}

/// A message that fails twice, then succeeds: three process spans, all in the producer's
/// trace, each under a publish span; the failed ones have an error status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_retry_stays_in_the_producers_trace() {
    for placement in PLACEMENTS {
        let setup = Setup::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let app = setup.app(placement, |b| b.actor(Flaky(Arc::clone(&calls))));
        let cx = setup.producer();
        app.send(&Flaky(Arc::clone(&calls)), ())
            .with_context(cx.clone())
            .await
            .unwrap();
        cx.span().end();
        setup.drain(&app).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let spans = setup.spans();
        let producer = one(&spans, "producer");
        let trace = trace_id(producer);
        assert!(
            spans.iter().all(|s| trace_id(s) == trace),
            "{placement:?}: one trace: {spans:#?}"
        );
        let publishes: Vec<SpanId> = named(&spans, "send otel").into_iter().map(span_id).collect();
        assert!(publishes.len() >= 3, "{placement:?}: the send and two retries");
        let mut processes = named(&spans, "process otel");
        assert_eq!(processes.len(), 3, "{placement:?}");
        processes.sort_by_key(|s| s.start_time);
        for (attempt, process) in processes.iter().enumerate() {
            assert!(
                publishes.contains(&process.parent_span_id),
                "{placement:?}: attempt {attempt} runs under a publish span"
            );
            assert_eq!(
                attribute(process, "troupe.retries"),
                Some(&OtelValue::I64(i64::try_from(attempt).unwrap()))
            );
        }
        for failed in &processes[..2] {
            assert_eq!(failed.status, Status::error("not yet"), "{placement:?}");
            assert_eq!(attribute(failed, "error.type"), Some(&OtelValue::from("Flaked")));
            assert_eq!(attribute(failed, "troupe.outcome"), Some(&OtelValue::from("failure")));
        }
        assert_eq!(processes[2].status, Status::Unset);
        assert_eq!(
            attribute(processes[2], "troupe.outcome"),
            Some(&OtelValue::from("success"))
        );
        if let Placement::Outer = placement {
            // Retries enqueues inside the failed attempt's span.
            for failed in &processes[..2] {
                assert!(
                    spans
                        .iter()
                        .any(|s| s.name == "send otel" && s.parent_span_id == span_id(failed)),
                    "a retry's send under the failed attempt"
                );
            }
        }
    }
}

/// A message with no trace context (as Python Dramatiq sends it) is processed in a new trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_context_starts_a_new_trace() {
    for placement in PLACEMENTS {
        let setup = Setup::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let app = setup.app(placement, |b| b.actor(Echo(Arc::clone(&calls))));
        app.declare_queue(QUEUE).await.unwrap();
        let python = Message::new(QUEUE, "echo", vec![json!(5)], Map::new());
        setup.broker.enqueue(python, None).await.unwrap();
        setup.drain(&app).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let spans = setup.spans();
        assert_eq!(names(&spans), ["process otel"], "{placement:?}");
        let process = &spans[0];
        assert_eq!(process.parent_span_id, SpanId::INVALID, "{placement:?}: a root");
        assert!(!process.parent_span_is_remote);
        assert_eq!(process.status, Status::Unset);
    }
}

/// A message sent by an actor is in the trace of the message that actor processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_by_an_actor_is_in_its_trace() {
    for placement in PLACEMENTS {
        let setup = Setup::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let app = setup.app(placement, |b| b.actor(Fan).actor(Echo(Arc::clone(&calls))));
        let cx = setup.producer();
        app.send(&Fan, ()).with_context(cx.clone()).await.unwrap();
        cx.span().end();
        setup.drain(&app).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the child ran");

        let spans = setup.spans();
        let trace = trace_id(one(&spans, "producer"));
        assert!(spans.iter().all(|s| trace_id(s) == trace), "{placement:?}: one trace");
        let by_actor = |name: &str, kind: SpanKind| {
            let found: Vec<&SpanData> = spans
                .iter()
                .filter(|s| {
                    s.span_kind == kind && attribute(s, "troupe.actor") == Some(&OtelValue::from(name.to_owned()))
                })
                .collect();
            assert_eq!(found.len(), 1, "{placement:?}: {name} {kind:?}");
            found[0]
        };
        let fan_process = by_actor("fan", SpanKind::Consumer);
        let echo_publish = by_actor("echo", SpanKind::Producer);
        let echo_process = by_actor("echo", SpanKind::Consumer);
        assert_eq!(echo_publish.parent_span_id, span_id(fan_process), "{placement:?}");
        assert_eq!(echo_process.parent_span_id, span_id(echo_publish), "{placement:?}");
    }
}

/// The messaging attributes of both spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_carry_the_messaging_attributes() {
    let setup = Setup::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let app = setup.app(Placement::Inner, |b| b.actor(Echo(Arc::clone(&calls))));
    let sent = app.send(&Echo(Arc::clone(&calls)), (3,)).await.unwrap();
    setup.drain(&app).await;
    let id = sent.message_id().to_owned();

    let spans = setup.spans();
    for (name, operation) in [("send otel", "send"), ("process otel", "process")] {
        let span = one(&spans, name);
        let expected = [
            ("messaging.system", "troupe"),
            ("messaging.destination.name", QUEUE),
            ("messaging.message.id", id.as_str()),
            ("messaging.operation.type", operation),
            ("messaging.operation.name", operation),
            ("troupe.actor", "echo"),
        ];
        for (key, value) in expected {
            assert_eq!(
                attribute(span, key),
                Some(&OtelValue::from(value.to_owned())),
                "{name}: {key}"
            );
        }
    }
    let publish = one(&spans, "send otel");
    assert_eq!(
        publish.parent_span_id,
        SpanId::INVALID,
        "sent outside any span: a new trace"
    );
    assert_eq!(
        attribute(one(&spans, "process otel"), "troupe.retries"),
        Some(&OtelValue::I64(0))
    );
}

/// `tracestate` goes along when the trace has one, and round-trips.
#[test]
fn the_trace_state_round_trips() {
    let state = TraceState::from_key_value([("vendor", "abc")]).unwrap();
    let remote = opentelemetry::trace::SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        opentelemetry::trace::TraceFlags::SAMPLED,
        true,
        state,
    );
    let cx = Context::new().with_remote_span_context(remote.clone());
    let mut message = Message::new(QUEUE, "echo", vec![], Map::new()).with_option(TRACESTATE, "stale=1");
    inject_context(&cx, &mut message);
    assert_eq!(
        message.options[TRACEPARENT],
        json!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(message.options[TRACESTATE], json!("vendor=abc"));
    let back = extract_context(&message);
    assert_eq!(back.span().span_context(), &remote);

    // A context without a span changes nothing; one without state drops the stale state.
    inject_context(&Context::new(), &mut message);
    assert_eq!(message.options[TRACESTATE], json!("vendor=abc"));
    let plain = opentelemetry::trace::SpanContext::new(
        remote.trace_id(),
        remote.span_id(),
        remote.trace_flags(),
        true,
        TraceState::default(),
    );
    inject_context(&Context::new().with_remote_span_context(plain), &mut message);
    assert!(!message.options.contains_key(TRACESTATE));

    // Garbage is no context.
    let garbage = Message::new(QUEUE, "echo", vec![], Map::new()).with_option(TRACEPARENT, "nope");
    assert!(!extract_context(&garbage).span().span_context().is_valid());
}

/// With no global provider set, `OpenTelemetry::global()` records nothing and adds nothing to
/// a message sent outside any trace.
#[tokio::test]
async fn the_global_noop_provider_leaves_messages_alone() {
    let app = App::builder(MemoryBroker::new().into_dyn())
        .middleware(OpenTelemetry::global())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let sent = app.send(&Echo(calls), (1,)).await.unwrap();
    assert!(!sent.message().options.contains_key(TRACEPARENT));
    assert_eq!(
        format!("{:?}", OpenTelemetry::global()),
        "OpenTelemetry { tracer: \"global\" }"
    );
}
