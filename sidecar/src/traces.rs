//! Traces over OTLP/HTTP (README, Observability): off unless an endpoint is configured
//! (`--otlp-endpoint`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); when off, no span beyond the batch's one (which the
//! logs already carried) is made and no command's metadata is read.
//!
//! A command carries its application's W3C trace context in its metadata (`traceparent`,
//! checked by `cqrs.append`). For each such command a batch holds, the sidecar records a
//! [`PROJECT_COMMAND`] span in the command's own trace (a child of the application's span that
//! appended it), linked to the batch's [`BATCH`] span; the batch span links back to every command
//! trace it carries (up to the SDK's link limit, `OTEL_SPAN_LINK_COUNT_LIMIT`, 128 by default)
//! and has the `project_batch` call, the cache write and the outbox hand-off as children. A read
//! API request continues the caller's `traceparent` header in a [`READ`] span.
//!
//! The spans go through `tracing` (so that every log line inside a batch carries the batch's
//! trace id) and `tracing-opentelemetry` to the SDK; the SDK's tokio batch processor exports them
//! with hyper, which the HTTP server already brings.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use cqrs_projection::trace_context::{check_tracestate, parse_traceparent};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider, ShouldSample,
};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Span names (the `tracing` span names, which become the OTLP span names).
pub const BATCH: &str = "cqrs.batch";
pub const DECODE: &str = "cqrs.decode";
pub const PROJECT_BATCH: &str = "cqrs.project_batch";
pub const CACHE_WRITE: &str = "cqrs.cache_write";
pub const OUTBOX_DISPATCH: &str = "cqrs.outbox_dispatch";
pub const SINK_PUBLISH: &str = "cqrs.sink_publish";
pub const CATCH_UP: &str = "cqrs.catch_up_from_log";
pub const PROJECT_COMMAND: &str = "cqrs.project_command";
pub const READ: &str = "cqrs.read";
pub const READ_WAIT: &str = "cqrs.read_wait";
pub const READ_BACKEND: &str = "cqrs.read_backend";

/// Attribute keys.
pub mod attribute {
    pub const COMMAND_ID: &str = "cqrs.command_id";
    pub const STREAM: &str = "cqrs.stream";
    pub const SEQ: &str = "cqrs.seq";
    pub const COMMAND_TYPE: &str = "cqrs.command_type";
    pub const BATCH_NUMBER: &str = "cqrs.batch.number";
    pub const PROJECTION_GROUP: &str = "cqrs.projection_group";
    pub const SINK: &str = "cqrs.sink";
    pub const MESSAGING_SYSTEM: &str = "messaging.system";
    pub const MESSAGE_COUNT: &str = "messaging.batch.message_count";
}

/// The service name spans are exported under, unless `OTEL_SERVICE_NAME` says otherwise.
const SERVICE_NAME: &str = "cqrs-sidecar";
/// How long one export may take before the SDK gives up on it (the spans are dropped, never
/// the sidecar's work held up).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The OTLP/HTTP path of traces under a collector's base URL.
const TRACES_PATH: &str = "/v1/traces";

static ON: AtomicBool = AtomicBool::new(false);

/// The tracer, for the one span made with OpenTelemetry's own API rather than `tracing`: a
/// batch's decode, whose times are known only once the batch is sealed.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Whether traces are exported (set once at start).
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// What the operator asked for.
#[derive(Debug, Clone, Default)]
pub struct TraceSettings {
    /// A collector's OTLP/HTTP base URL (`http://collector:4318`) or its traces URL.
    pub endpoint: Option<String>,
    /// Share of the sidecar's own traces sampled; `None` leaves it to `OTEL_TRACES_SAMPLER`.
    pub sample_ratio: Option<f64>,
}

impl TraceSettings {
    /// Traces are on when an endpoint is given here or in the standard variables.
    fn wanted(&self) -> bool {
        self.endpoint.is_some()
            || [
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            ]
            .iter()
            .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
    }

    fn traces_url(&self) -> Option<String> {
        self.endpoint.as_ref().map(|base| {
            let base = base.trim_end_matches('/');
            if base.ends_with(TRACES_PATH) {
                base.to_owned()
            } else {
                format!("{base}{TRACES_PATH}")
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceSetupError {
    #[error("the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The running exporter; [`Exporting::shutdown`] flushes what is buffered.
pub struct Exporting {
    provider: SdkTracerProvider,
}

impl Exporting {
    /// Flushes and stops the exporter (call it outside the async runtime's workers).
    pub fn shutdown(self) {
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(error = %err, "flushing the last spans to the OTLP endpoint failed");
        }
    }
}

/// Starts the exporter when traces are asked for, returning the tracer for the subscriber's
/// layer. Must run inside the tokio runtime (the batch processor is a task on it).
pub fn start(settings: &TraceSettings) -> Result<Option<(Exporting, SdkTracer)>, TraceSetupError> {
    if !settings.wanted() {
        return Ok(None);
    }
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(opentelemetry_http::hyper::HyperClient::with_default_connector(
            EXPORT_TIMEOUT,
            None,
        ));
    if let Some(url) = settings.traces_url() {
        exporter = exporter.with_endpoint(url);
    }
    let exporter = exporter.build()?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let inner: Box<dyn ShouldSample> = match settings.sample_ratio {
        Some(ratio) => Box::new(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))),
        // OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, as the SDK reads them
        None => opentelemetry_sdk::trace::Config::default().sampler,
    };
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(Resource::builder().with_service_name(service_name()).build())
        .with_sampler(FollowLinks { inner })
        .build();
    let tracer = provider.tracer(SERVICE_NAME);
    let _ = TRACER.set(tracer.clone());
    ON.store(true, Ordering::Relaxed);
    Ok(Some((Exporting { provider }, tracer)))
}

/// The configured sampler, except that a root span linked to a sampled span is sampled: a
/// batch that carries a command its application sampled is kept, so that the command's span
/// never links to a batch nobody can see.
#[derive(Debug, Clone)]
struct FollowLinks {
    inner: Box<dyn ShouldSample>,
}

impl ShouldSample for FollowLinks {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let has_parent = parent_context.is_some_and(|cx| cx.span().span_context().is_valid());
        if !has_parent && links.iter().any(|link| link.span_context.is_sampled()) {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.inner
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

fn service_name() -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| SERVICE_NAME.to_owned())
}

/// A W3C `traceparent` (and `tracestate`) as the remote span context it names; `None` when it
/// is malformed (a read request's header is the caller's to get right; the log's were checked).
pub fn remote_context(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let parent = parse_traceparent(traceparent).ok()?;
    let state = tracestate
        .filter(|state| check_tracestate(state).is_ok())
        .and_then(|state| state.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.parent_id),
        TraceFlags::new(parent.flags),
        true,
        state,
    ))
}

/// A command of a batch that carries its application's trace.
#[derive(Debug, Clone)]
pub struct CommandTrace {
    pub context: SpanContext,
    pub command_id: String,
    pub stream: String,
    pub seq: i64,
    pub command_type: String,
}

impl CommandTrace {
    fn attributes(&self, batch: u64) -> Vec<KeyValue> {
        vec![
            KeyValue::new(attribute::COMMAND_ID, self.command_id.clone()),
            KeyValue::new(attribute::STREAM, self.stream.clone()),
            KeyValue::new(attribute::SEQ, self.seq),
            KeyValue::new(attribute::COMMAND_TYPE, self.command_type.clone()),
            KeyValue::new(attribute::BATCH_NUMBER, batch as i64),
        ]
    }
}

/// The spans of one batch: the batch's own and one in each command's trace.
pub struct BatchSpans {
    pub batch: tracing::Span,
    /// the batch span's context, when it is exported (the sinks' publishes link to it)
    pub context: Option<SpanContext>,
    commands: Vec<tracing::Span>,
}

impl BatchSpans {
    /// Opens the batch's spans; `traced` are the batch's commands that carry a trace, `decoded`
    /// when the batch's first event was read from the slot and when the batch was sealed.
    pub fn open(
        number: u64,
        events: usize,
        group: &str,
        traced: &[CommandTrace],
        decoded: Option<(SystemTime, SystemTime)>,
    ) -> Self {
        let batch = tracing::info_span!(
            BATCH,
            otel.kind = "consumer",
            batch = number,
            events,
            trace_id = tracing::field::Empty,
        );
        if !enabled() {
            return Self {
                batch,
                context: None,
                commands: Vec::new(),
            };
        }
        batch.set_attribute(attribute::BATCH_NUMBER, number as i64);
        batch.set_attribute(attribute::PROJECTION_GROUP, group.to_owned());
        // the links go in before the span starts (context() starts it): the sampler sees them.
        // The SDK keeps the first `link_limit()`: the sampled commands' go first, and no more
        // are built than it keeps (a catch-up batch carries thousands).
        let sampled = traced.iter().filter(|c| c.context.is_sampled());
        let unsampled = traced.iter().filter(|c| !c.context.is_sampled());
        for command in sampled.chain(unsampled).take(link_limit()) {
            batch.add_link_with_attributes(command.context.clone(), command.attributes(number));
        }
        let batch_context = batch.context().span().span_context().clone();
        if batch_context.is_valid() {
            batch.record("trace_id", tracing::field::display(batch_context.trace_id()));
        }
        if let (Some((first_event, sealed)), true) = (decoded, batch_context.is_sampled()) {
            decode_span(&batch, first_event, sealed, events);
        }
        // a command its application did not sample gets no span (the parent-based sampler
        // would drop it): not made at all, since most commands of a 1 % trace are such
        let commands = traced
            .iter()
            .filter(|command| command.context.is_sampled())
            .map(|command| {
                // a root of its own (not inside the batch span): its parent is the application's
                let span = tracing::info_span!(parent: None, PROJECT_COMMAND, otel.kind = "consumer");
                let _ = span.set_parent(Context::new().with_remote_span_context(command.context.clone()));
                for attribute in command.attributes(number) {
                    span.set_attribute(attribute.key, attribute.value);
                }
                span.set_attribute(attribute::PROJECTION_GROUP, group.to_owned());
                if batch_context.is_valid() {
                    span.add_link(batch_context.clone());
                }
                span
            })
            .collect();
        Self {
            batch,
            context: batch_context.is_valid().then_some(batch_context),
            commands,
        }
    }

    /// Marks every span failed when the batch did not commit (the error is named, never a
    /// command's values).
    pub fn failed(&self, why: &str) {
        if !enabled() {
            return;
        }
        let status = opentelemetry::trace::Status::error(why.to_owned());
        self.batch.set_status(status.clone());
        for span in &self.commands {
            span.set_status(status.clone());
        }
    }
}

/// Links a span keeps: `OTEL_SPAN_LINK_COUNT_LIMIT` as the SDK reads it, 128 by default.
fn link_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("OTEL_SPAN_LINK_COUNT_LIMIT")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_LINK_LIMIT)
    })
}

const DEFAULT_LINK_LIMIT: usize = 128;

/// The batch's decode, a child of its span: from its first command read from the slot to the
/// batch sealed (its size or time reached) — the slot's messages received and decoded into
/// the batch. It began before the batch span (which opens when the flusher takes the batch),
/// so it is made with OpenTelemetry's API, which takes a start and an end time.
fn decode_span(batch: &tracing::Span, first_event: SystemTime, sealed: SystemTime, events: usize) {
    use opentelemetry::trace::{Span as _, Tracer as _};
    let Some(tracer) = TRACER.get() else {
        return;
    };
    let mut span = tracer
        .span_builder(DECODE)
        .with_start_time(first_event)
        .with_attributes([KeyValue::new("events", events as i64)])
        .start_with_context(tracer, &batch.context());
    span.end_with_timestamp(sealed.max(first_event));
}

/// The span of the projections' catch-up from the log when the slot is (re)created (none while
/// traces are off): a root of its own; `cqrs.catch_up` reads commands inside the database, so
/// it cannot link their traces.
pub fn catch_up_span(group: &str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(parent: None, CATCH_UP, changed_rows = tracing::field::Empty);
    span.set_attribute(attribute::PROJECTION_GROUP, group.to_owned());
    span
}

/// The span of one sink's publish of a delivery (none while traces are off): a root of its
/// own, since the sink publishes after the batch's span ended, linked to the batch it delivers.
pub fn sink_publish_span(
    sink: &str,
    system: &'static str,
    events: usize,
    batch: Option<&SpanContext>,
) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(parent: None, SINK_PUBLISH, otel.kind = "producer", events);
    span.set_attribute(attribute::SINK, sink.to_owned());
    span.set_attribute(attribute::MESSAGING_SYSTEM, system);
    span.set_attribute(attribute::MESSAGE_COUNT, events as i64);
    if let Some(batch) = batch {
        span.add_link(batch.clone());
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_a_base_url_or_the_traces_url() {
        let settings = |endpoint: &str| TraceSettings {
            endpoint: Some(endpoint.to_owned()),
            sample_ratio: None,
        };
        assert_eq!(
            settings("http://collector:4318").traces_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            settings("http://collector:4318/").traces_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            settings("http://collector:4318/v1/traces")
                .traces_url()
                .as_deref(),
            Some("http://collector:4318/v1/traces")
        );
    }

    #[test]
    fn a_traceparent_names_a_remote_span_context() {
        let context = remote_context(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("rojo=00f067aa0ba902b7"),
        )
        .unwrap();
        assert_eq!(context.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled() && context.is_remote());
        assert_eq!(context.trace_state().get("rojo"), Some("00f067aa0ba902b7"));
        assert!(remote_context("00-zz", None).is_none());
    }
}
