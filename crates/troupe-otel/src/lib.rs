//! OpenTelemetry tracing for [Troupe](https://docs.rs/troupe): one trace from the producer,
//! through every retry, to the actor.
//!
//! The [`OpenTelemetry`] middleware
//!
//! - on enqueue, starts a `send {queue}` span (kind `Producer`) under the current OpenTelemetry
//!   context ([`Context::current`]) and writes that span's W3C trace context into the message's
//!   options, under the keys [`TRACEPARENT`] and [`TRACESTATE`] (the latter only when the trace
//!   state is not empty);
//! - on processing, reads them back and runs the rest of the chain and the actor inside a
//!   `process {queue}` span (kind `Consumer`) whose parent is the `send` span. The actor runs
//!   with that span as its current context, so the messages it sends, and the spans it starts,
//!   are in the same trace. A failed attempt's span has status `Error` with the error's message.
//!
//! A message that already carries a trace context when it is enqueued again (a retry, a delayed
//! message becoming due) stays in its trace. A message without one (sent by Python Dramatiq, or
//! by a producer without this middleware) is processed in a new trace; Dramatiq workers ignore
//! the two options, so messages stay wire-compatible both ways.
//!
//! Spans follow OpenTelemetry's [messaging conventions]: `messaging.system` (`"troupe"`),
//! `messaging.destination.name` (the queue), `messaging.message.id`, `messaging.operation.type`
//! and `messaging.operation.name` (`"send"` or `"process"`), `error.type` on failures, plus
//! `troupe.actor`, `troupe.retries` and `troupe.outcome`.
//!
//! # Placement
//!
//! Put it first (outermost), before [`AgeLimit`](troupe_core::middleware::AgeLimit): the
//! process span then also covers what the default middleware send after the actor returned
//! (retries, pipeline stages, callbacks), which land under it. Appended with
//! `.middleware(...)` it runs inside `Retries`: each attempt still gets its span in the
//! producer's trace, but pipeline stages and callbacks start new traces.
//!
//! ```
//! use opentelemetry::trace::{FutureExt, TraceContextExt, Tracer, TracerProvider};
//! use opentelemetry_sdk::trace::SdkTracerProvider;
//! use troupe_core::middleware::AgeLimit;
//! use troupe_core::{App, MemoryBroker, Message};
//! use troupe_otel::OpenTelemetry;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> troupe_core::Result<()> {
//! // In an application: an exporter (`otlp_tracer_provider` with the `otlp` feature), and
//! // usually `opentelemetry::global::set_tracer_provider` with `OpenTelemetry::global()`.
//! let provider = SdkTracerProvider::builder().build();
//! let app = App::builder(MemoryBroker::new().into_dyn())
//!     .middleware_before::<AgeLimit>(OpenTelemetry::new(&provider))
//!     .build()?;
//!
//! // Sent inside a span: the message joins its trace.
//! let tracer = provider.tracer("shop");
//! let cx = opentelemetry::Context::current_with_span(tracer.start("checkout"));
//! let message = Message::new("default", "charge", vec![], Default::default());
//! let sent = app.enqueue(message, None).with_context(cx.clone()).await?;
//! let traceparent = sent.options[troupe_otel::TRACEPARENT].as_str().unwrap_or_default();
//! assert!(traceparent.contains(&cx.span().span_context().trace_id().to_string()));
//! # Ok(()) }
//! ```
//!
//! Code instrumented with `tracing` and `tracing-opentelemetry` does not set OpenTelemetry's
//! current context; wrap the send in `.with_context(tracing::Span::current().context())` for
//! the message to join the `tracing` span's trace.
//!
//! Blocking (`fn`) actors run on Tokio's blocking pool, where the OpenTelemetry context does
//! not follow: messages they send start from the context current on that thread.
//!
//! [messaging conventions]: https://opentelemetry.io/docs/specs/semconv/messaging/messaging-spans/

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{FutureExt, Span, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde_json::Value;
use troupe_core::middleware::{Middleware, Next, Outcome, ProcessContext};
use troupe_core::{App, Message, Options};

#[cfg(feature = "otlp")]
mod otlp;
#[cfg(feature = "otlp")]
pub use otlp::otlp_tracer_provider;

pub use opentelemetry;
pub use opentelemetry_sdk;

/// The message option carrying the W3C `traceparent` (`00-{trace id}-{span id}-{flags}`) of
/// the span that enqueued the message.
pub const TRACEPARENT: &str = "traceparent";

/// The message option carrying the W3C `tracestate`, when the trace has one.
pub const TRACESTATE: &str = "tracestate";

/// The `messaging.system` of Troupe's spans.
pub const MESSAGING_SYSTEM: &str = "troupe";

/// The instrumentation scope's name.
const SCOPE_NAME: &str = "troupe-otel";

/// Traces enqueueing and processing, carrying the W3C trace context in the message's options
/// (see the [crate documentation](crate)).
#[derive(Clone)]
#[non_exhaustive]
pub struct OpenTelemetry {
    tracer: Source,
}

/// Where the spans come from.
#[derive(Clone)]
enum Source {
    /// The global provider, looked up for each span (so it may be set after the app is built).
    Global,
    /// One tracer.
    Tracer(Arc<BoxedTracer>),
}

impl fmt::Debug for OpenTelemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tracer = match self.tracer {
            Source::Global => "global",
            Source::Tracer(_) => "tracer",
        };
        f.debug_struct("OpenTelemetry").field("tracer", &tracer).finish()
    }
}

impl Default for OpenTelemetry {
    /// [`OpenTelemetry::global`].
    fn default() -> Self {
        Self::global()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder(SCOPE_NAME)
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

impl OpenTelemetry {
    /// Spans from the global tracer provider ([`opentelemetry::global::set_tracer_provider`]),
    /// looked up for each span, so the provider may be set after the app is built. With none
    /// set, no span is recorded, but a trace context a message carries is still passed on to
    /// the messages its actor sends.
    #[must_use]
    pub fn global() -> Self {
        Self { tracer: Source::Global }
    }

    /// Spans from a tracer of `provider` (an
    /// [`SdkTracerProvider`](opentelemetry_sdk::trace::SdkTracerProvider), say), with the
    /// instrumentation scope `troupe-otel`.
    #[must_use]
    pub fn new<P, T, S>(provider: &P) -> Self
    where
        P: opentelemetry::trace::TracerProvider<Tracer = T>,
        T: Tracer<Span = S> + Send + Sync + 'static,
        S: Span + Send + Sync + 'static,
    {
        Self::with_tracer(provider.tracer_with_scope(scope()))
    }

    /// Spans from `tracer`.
    #[must_use]
    pub fn with_tracer<T, S>(tracer: T) -> Self
    where
        T: Tracer<Span = S> + Send + Sync + 'static,
        S: Span + Send + Sync + 'static,
    {
        Self {
            tracer: Source::Tracer(Arc::new(BoxedTracer::new(Box::new(tracer)))),
        }
    }

    fn start(&self, builder: opentelemetry::trace::SpanBuilder, parent: &Context) -> Context {
        let span = match &self.tracer {
            Source::Global => global::tracer_with_scope(scope()).build_with_context(builder, parent),
            Source::Tracer(tracer) => tracer.build_with_context(builder, parent),
        };
        parent.with_span(span)
    }
}

/// The attributes every span of `message` has.
fn common_attributes(message: &Message, operation: &'static str) -> Vec<KeyValue> {
    vec![
        KeyValue::new("messaging.system", MESSAGING_SYSTEM),
        KeyValue::new("messaging.destination.name", message.canonical_queue().to_owned()),
        KeyValue::new("messaging.message.id", message.message_id.clone()),
        KeyValue::new("messaging.operation.type", operation),
        KeyValue::new("messaging.operation.name", operation),
        KeyValue::new("troupe.actor", message.actor_name.clone()),
    ]
}

fn retries_attribute(message: &Message) -> KeyValue {
    KeyValue::new("troupe.retries", i64::try_from(message.retries()).unwrap_or(i64::MAX))
}

#[async_trait]
impl Middleware for OpenTelemetry {
    fn after_hooks(&self) -> bool {
        false
    }

    async fn before_enqueue(
        &self,
        _app: &App,
        message: &mut Message,
        delay: Option<Duration>,
    ) -> troupe_core::Result<()> {
        // A message that carries a trace (a retry, a delayed message becoming due) stays in it;
        // under the current span when that is in the same trace (a retry enqueued inside the
        // failed attempt's span), else under the span that enqueued it before.
        let carried = extract_context(message);
        let current = Context::current();
        let carried_trace = carried.span().span_context().clone();
        let parent = if carried_trace.is_valid() && current.span().span_context().trace_id() != carried_trace.trace_id()
        {
            carried
        } else {
            current
        };
        let mut attributes = common_attributes(message, "send");
        if message.retries() > 0 {
            attributes.push(retries_attribute(message));
        }
        if let Some(delay) = delay {
            attributes.push(KeyValue::new(
                "troupe.delay_ms",
                i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
            ));
        }
        let builder = opentelemetry::trace::SpanBuilder::from_name(format!("send {}", message.canonical_queue()))
            .with_kind(SpanKind::Producer)
            .with_attributes(attributes);
        let cx = self.start(builder, &parent);
        inject_context(&cx, message);
        cx.span().end();
        Ok(())
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let message = cx.message();
        let parent = extract_context(message);
        let mut attributes = common_attributes(message, "process");
        attributes.push(retries_attribute(message));
        let builder = opentelemetry::trace::SpanBuilder::from_name(format!("process {}", message.canonical_queue()))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes);
        let span_cx = self.start(builder, &parent);
        let outcome = next.run(cx).with_context(span_cx.clone()).await;
        let span = span_cx.span();
        match &outcome {
            Outcome::Success(_) => span.set_attribute(KeyValue::new("troupe.outcome", "success")),
            Outcome::Failure(error) => {
                span.set_attributes([
                    KeyValue::new("troupe.outcome", "failure"),
                    KeyValue::new("error.type", error.type_name().to_owned()),
                ]);
                span.set_status(Status::error(error.message().to_owned()));
            }
            _ => span.set_attribute(KeyValue::new("troupe.outcome", "skipped")),
        }
        span.end();
        outcome
    }
}

/// The trace context `message` carries (its [`TRACEPARENT`] and [`TRACESTATE`] options), as
/// the remote parent of an otherwise empty context; an empty context when it carries none or
/// an invalid one (a message from Python Dramatiq, say).
#[must_use]
pub fn extract_context(message: &Message) -> Context {
    TraceContextPropagator::new().extract_with_context(&Context::new(), &OptionsCarrier(&message.options))
}

/// Writes the trace context of `cx`'s span into `message`'s [`TRACEPARENT`] and
/// [`TRACESTATE`] options (removing a `tracestate` it no longer has). Leaves the message
/// unchanged when `cx` has no valid span context.
pub fn inject_context(cx: &Context, message: &mut Message) {
    let mut fields = Fields::default();
    TraceContextPropagator::new().inject_context(cx, &mut fields);
    let Some(traceparent) = fields.traceparent else {
        return;
    };
    message
        .options
        .insert(TRACEPARENT.to_owned(), Value::String(traceparent));
    match fields.tracestate.filter(|state| !state.is_empty()) {
        Some(state) => {
            message.options.insert(TRACESTATE.to_owned(), Value::String(state));
        }
        None => {
            message.options.remove(TRACESTATE);
        }
    }
}

/// Reads the trace context from a message's options.
struct OptionsCarrier<'a>(&'a Options);

impl Extractor for OptionsCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The fields the trace-context propagator writes.
#[derive(Default)]
struct Fields {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Fields {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE => self.tracestate = Some(value),
            _ => {}
        }
    }
}
