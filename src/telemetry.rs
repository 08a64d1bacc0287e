//! OpenTelemetry for calls: W3C trace context (`traceparent`, `tracestate`)
//! in gRPC metadata, and an OTLP/gRPC span exporter configured by the
//! standard `OTEL_*` environment variables — off, and never connecting,
//! when no endpoint is set.
//!
//! Export is asynchronous and bounded: finished spans go into a buffer of
//! [`QUEUE_SPANS`] that one task drains in batches — once a second, or when
//! a batch is full — so a busy server wakes the exporter per batch, not per
//! span. A span that finds the buffer full, or whose batch the collector did
//! not take, is dropped, counted, and reported in the log at most once a
//! minute. A call never waits for the collector.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanContext, TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor},
};
use tokio::sync::{Notify, mpsc, oneshot};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

/// The W3C trace context metadata key.
pub const TRACEPARENT: &str = "traceparent";

/// The W3C `tracestate` key, vendor data that travels with `traceparent`.
pub const TRACESTATE: &str = "tracestate";

/// Finished spans waiting for export; beyond this they are dropped.
pub const QUEUE_SPANS: usize = 2048;

/// Spans sent to the collector in one export request, at most.
const BATCH_SPANS: usize = 512;

/// How long the first span of a batch waits for company before export.
const BATCH_DELAY: Duration = Duration::from_secs(1);

/// How often dropped spans are reported in the log, at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The environment variables that turn export on (any one of them).
const ENDPOINT_VARS: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"];

/// Writes `cx`'s span context into `metadata` as `traceparent` (and
/// `tracestate`); nothing when it has no valid span.
pub fn inject(cx: &Context, metadata: &mut MetadataMap) {
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
    }
}

/// The caller's trace context from `metadata`; an empty context when the
/// call carries none (or a malformed one).
pub fn extract(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// The context of a caller's W3C `traceparent` and `tracestate` values, as
/// a server read them from its request (an invalid or absent one: none).
pub fn extract_header(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let mut carrier = std::collections::HashMap::new();
    if let Some(tp) = traceparent {
        carrier.insert(TRACEPARENT.to_owned(), tp.to_owned());
    }
    if let Some(ts) = tracestate {
        carrier.insert(TRACESTATE.to_owned(), ts.to_owned());
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// `span`'s W3C `traceparent` value, for carriers that are not metadata
/// (an `exec:` worker's call message); `None` for an invalid span context.
pub fn traceparent(span: &SpanContext) -> Option<String> {
    span.is_valid().then(|| format!("00-{}-{}-{:02x}", span.trace_id(), span.span_id(), span.trace_flags().to_u8()))
}

/// The context a new client call is parented on: the current `tracing`
/// span's (when a `tracing-opentelemetry` layer is installed), else the
/// current OpenTelemetry context.
pub fn current() -> Context {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() { cx } else { Context::current() }
}

/// Starts the CLIENT span `ai.AI/chaos` of a call of `func` to `target`
/// under `parent`, with the global tracer provider — when none is
/// installed the span records nothing but still carries `parent`'s trace
/// context, so propagation works either way.
pub fn start_client_span(parent: &Context, func: &str, target: &str) -> Context {
    use opentelemetry::trace::{SpanKind, Tracer as _};
    let tracer = opentelemetry::global::tracer("aipod");
    let mut attributes = vec![
        opentelemetry::KeyValue::new("rpc.system.name", "grpc"),
        opentelemetry::KeyValue::new("rpc.method", "ai.AI/chaos"),
        opentelemetry::KeyValue::new("aipod.func", func.to_owned()),
    ];
    let uri = if target.contains("://") { target.to_owned() } else { format!("http://{target}") };
    if let Ok(uri) = uri.parse::<tonic::codegen::http::Uri>() {
        if let Some(host) = uri.host() {
            attributes.push(opentelemetry::KeyValue::new("server.address", host.to_owned()));
        }
        if let Some(port) = uri.port_u16() {
            attributes.push(opentelemetry::KeyValue::new("server.port", i64::from(port)));
        }
    }
    let span = tracer
        .span_builder("ai.AI/chaos")
        .with_kind(SpanKind::Client)
        .with_attributes(attributes)
        .start_with_context(&tracer, parent);
    parent.with_span(span)
}

/// Ends a span started by [`start_client_span`] with the call's status name
/// (`OK`, `UNAVAILABLE`, …) and call id.
pub fn end_client_span(cx: &Context, code: &str, call_id: Option<&str>) {
    use opentelemetry::{KeyValue, trace::Status};
    let span = cx.span();
    span.set_attribute(KeyValue::new("rpc.response.status_code", code.to_owned()));
    if let Some(id) = call_id {
        span.set_attribute(KeyValue::new("aipod.call_id", id.to_owned()));
    }
    if code != "OK" {
        span.set_attribute(KeyValue::new("error.type", code.to_owned()));
        span.set_status(Status::error(code.to_owned()));
    }
    span.end();
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Called with the number of spans dropped each time some are.
pub type OnDrop = Arc<dyn Fn(u64) + Send + Sync>;

/// Span export to an OTLP/gRPC collector; see the module docs.
#[derive(Debug, Clone)]
pub struct Exporting {
    provider: SdkTracerProvider,
    flush: mpsc::Sender<oneshot::Sender<()>>,
    endpoint: String,
}

impl Exporting {
    /// Export configured by the environment: `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (or `..._TRACES_ENDPOINT`) turns it on, `OTEL_SERVICE_NAME` names the
    /// service (else `service`), `OTEL_TRACES_SAMPLER`/`_ARG` pick the
    /// sampler, `OTEL_SDK_DISABLED=true` turns it off. `Ok(None)` when off:
    /// nothing is started and no connection is ever attempted. Must be called
    /// inside a tokio runtime (the export task runs on it).
    pub fn from_env(service: &str, on_drop: OnDrop) -> Result<Option<Self>, String> {
        let value = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let Some(endpoint) = ENDPOINT_VARS.iter().find_map(|v| value(v)) else { return Ok(None) };
        if value("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| format!("OpenTelemetry exporter (OTEL_EXPORTER_OTLP_ENDPOINT): {e}"))?;
        let mut resource = Resource::builder();
        if value("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service.to_owned());
        }
        let resource = resource.build();
        exporter.set_resource(&resource);
        let (flush, flushes) = mpsc::channel(4);
        let drops = Drops { on_drop, warned: Mutex::new(None), total: AtomicU64::new(0) };
        let buffer = Arc::new(Buffer { spans: Mutex::new(Vec::new()), batch_ready: Notify::new(), drops });
        tokio::spawn(export(exporter, Arc::clone(&buffer), flushes));
        let processor = Bounded(buffer);
        let provider = SdkTracerProvider::builder().with_resource(resource).with_span_processor(processor).build();
        Ok(Some(Self { provider, flush, endpoint }))
    }

    /// The collector spans go to, as the environment named it.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A tracer for spans of the instrumentation scope `name`.
    pub fn tracer(&self, name: &'static str) -> SdkTracer {
        self.provider.tracer(name)
    }

    /// The provider, e.g. to install as `opentelemetry::global`'s.
    pub fn provider(&self) -> &SdkTracerProvider {
        &self.provider
    }

    /// Exports every span finished so far, waiting at most `timeout`; for
    /// the end of the process.
    pub async fn flush(&self, timeout: Duration) {
        let (done, wait) = oneshot::channel();
        if self.flush.send(done).await.is_ok() {
            let _ = tokio::time::timeout(timeout, wait).await;
        }
    }
}

/// Finished spans waiting for the export task.
#[derive(Debug)]
struct Buffer {
    spans: Mutex<Vec<SpanData>>,
    /// Woken when the buffer holds a full batch.
    batch_ready: Notify,
    drops: Drops,
}

impl Buffer {
    fn take(&self) -> Vec<SpanData> {
        self.spans.lock().map(|mut spans| std::mem::take(&mut *spans)).unwrap_or_default()
    }
}

/// Counts and reports dropped spans.
struct Drops {
    on_drop: OnDrop,
    warned: Mutex<Option<Instant>>,
    total: AtomicU64,
}

impl std::fmt::Debug for Drops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drops").field("total", &self.total).finish_non_exhaustive()
    }
}

impl Drops {
    fn dropped(&self, spans: u64, why: &dyn std::fmt::Display) {
        (self.on_drop)(spans);
        let total = self.total.fetch_add(spans, Ordering::Relaxed) + spans;
        let Ok(mut warned) = self.warned.lock() else { return };
        if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(dropped_total = total, "trace spans dropped: {why} (reported at most once a minute)");
        }
    }
}

/// The span processor: buffers sampled spans for the export task, never
/// waits (the lock is held for a push).
#[derive(Debug)]
struct Bounded(Arc<Buffer>);

impl SpanProcessor for Bounded {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let held = match self.0.spans.lock() {
            Ok(mut spans) if spans.len() < QUEUE_SPANS => {
                spans.push(span);
                Some(spans.len())
            }
            _ => None,
        };
        match held {
            Some(BATCH_SPANS) => self.0.batch_ready.notify_one(),
            Some(_) => {}
            None => self.0.drops.dropped(1, &format_args!("the export buffer ({QUEUE_SPANS} spans) is full")),
        }
    }

    /// Flushing is [`Exporting::flush`], which can wait without blocking a
    /// runtime thread.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export task: sends what the buffer holds, in batches of up to
/// [`BATCH_SPANS`], every [`BATCH_DELAY`], when a batch is full, and when
/// asked to flush.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    buffer: Arc<Buffer>,
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
) {
    loop {
        let flushed = tokio::select! {
            () = tokio::time::sleep(BATCH_DELAY) => None,
            () = buffer.batch_ready.notified() => None,
            done = flushes.recv() => match done {
                Some(done) => Some(done),
                None => return,
            },
        };
        let mut spans = buffer.take();
        while !spans.is_empty() {
            let rest = spans.split_off(spans.len().min(BATCH_SPANS));
            let batch = std::mem::replace(&mut spans, rest);
            let n = batch.len() as u64;
            if let Err(e) = exporter.export(batch).await {
                buffer.drops.dropped(n, &format_args!("the collector did not take them: {e}"));
            }
        }
        if let Some(done) = flushed {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    #[test]
    fn trace_context_round_trips_through_metadata() {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
            SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).expect("state"),
        );
        let mut metadata = MetadataMap::new();
        inject(&Context::new().with_remote_span_context(span.clone()), &mut metadata);
        assert_eq!(
            metadata.get(TRACEPARENT).and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(metadata.get("tracestate").and_then(|v| v.to_str().ok()), Some("vendor=x"));
        let back = extract(&metadata);
        assert_eq!(back.span().span_context().trace_id(), span.trace_id());
        assert!(back.span().span_context().is_remote());
        assert_eq!(traceparent(&span).as_deref(), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        // The same from the two header values, as a server reads them.
        let header = extract_header(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), Some("vendor=x"));
        let context = header.span().span_context().clone();
        assert_eq!((context.trace_id(), context.span_id()), (span.trace_id(), span.span_id()));
        assert_eq!(context.trace_state().header(), "vendor=x");
        assert!(!extract_header(Some("00-zz-00f067aa0ba902b7-01"), None).span().span_context().is_valid());
        assert!(!extract_header(None, Some("vendor=x")).span().span_context().is_valid());
    }

    #[test]
    fn no_or_malformed_context_is_no_parent() {
        let mut metadata = MetadataMap::new();
        inject(&Context::new(), &mut metadata);
        assert!(metadata.is_empty(), "nothing injected without a span");
        metadata.insert(TRACEPARENT, MetadataValue::from_static("00-zz-00f067aa0ba902b7-01"));
        assert!(!extract(&metadata).span().span_context().is_valid());
        assert_eq!(traceparent(&SpanContext::empty_context()), None);
    }
}
