//! Traces of calls: one SERVER span `ai.AI/chaos` per call (OpenTelemetry
//! RPC conventions plus `aipod.*` attributes) with a child span per phase —
//! `aipod.receive`, `aipod.queue`, `aipod.run`, `aipod.send` — continuing the
//! caller's W3C `traceparent`. With tracing off every method returns at once
//! and no span exists.

use std::{net::SocketAddr, sync::Mutex};

use aipod::telemetry;
use opentelemetry::{
    Context, KeyValue,
    trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _},
};
use opentelemetry_sdk::trace::{SdkTracer, Span};

use crate::code::{ErrorCode, Phase};

/// The span name of a call, as the conventions want: the full method.
const METHOD: &str = "ai.AI/chaos";

/// Starts call traces; `None` inside when tracing is off.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tracing {
    tracer: Option<SdkTracer>,
}

impl Tracing {
    /// Traces exported through `tracer`.
    pub(crate) fn on(tracer: SdkTracer) -> Self {
        Self { tracer: Some(tracer) }
    }

    /// The trace of a call that arrived on `local` with the caller's W3C
    /// `traceparent` and `tracestate`, if any.
    pub(crate) fn start(
        &self,
        traceparent: Option<&str>,
        tracestate: Option<&str>,
        local: Option<SocketAddr>,
    ) -> CallTrace {
        let Some(tracer) = &self.tracer else {
            // Off: the caller's context still reaches an exec worker as is.
            return CallTrace { incoming: traceparent.map(str::to_owned), spans: None };
        };
        let parent = telemetry::extract_header(traceparent, tracestate);
        let mut attributes = vec![KeyValue::new("rpc.system.name", "grpc"), KeyValue::new("rpc.method", METHOD)];
        if let Some(local) = local {
            attributes.push(KeyValue::new("server.address", local.ip().to_string()));
            attributes.push(KeyValue::new("server.port", i64::from(local.port())));
        }
        let call = tracer
            .span_builder(METHOD)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        if !call.is_recording() {
            // Sampled out: no phase spans; the model still gets the context
            // (flagged unsampled) to pass on.
            return CallTrace { incoming: telemetry::traceparent(call.span_context()), spans: None };
        }
        let call = Context::new().with_span(call);
        CallTrace { incoming: None, spans: Some(Spans { tracer: tracer.clone(), call, phase: Mutex::new(None) }) }
    }
}

/// The spans of one call.
#[derive(Debug)]
pub(crate) struct CallTrace {
    /// Without spans: the `traceparent` to pass on — the caller's when
    /// tracing is off, the unsampled call's when sampled out.
    incoming: Option<String>,
    spans: Option<Spans>,
}

#[derive(Debug)]
struct Spans {
    tracer: SdkTracer,
    /// The call's span, as the parent context of the phases.
    call: Context,
    /// The open phase span.
    phase: Mutex<Option<Span>>,
}

impl CallTrace {
    /// Names what the call is, once its header is read.
    pub(crate) fn identify(&self, func: &str, version: &str, call_id: &str) {
        if let Some(spans) = &self.spans {
            let span = spans.call.span();
            span.set_attribute(KeyValue::new("aipod.func", func.to_owned()));
            span.set_attribute(KeyValue::new("aipod.version", version.to_owned()));
            span.set_attribute(KeyValue::new("aipod.call_id", call_id.to_owned()));
        }
    }

    /// Ends the open phase span and starts the one for `phase`.
    pub(crate) fn enter(&self, phase: Phase) {
        let Some(spans) = &self.spans else { return };
        let name = phase.span_name();
        let Ok(mut open) = spans.phase.lock() else { return };
        if let Some(mut previous) = open.take() {
            previous.end();
        }
        let next = spans
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .start_with_context(&spans.tracer, &spans.call);
        *open = Some(next);
    }

    /// The W3C `traceparent` to hand a model: the open phase's span (the
    /// run), or with tracing off the caller's own.
    pub(crate) fn traceparent(&self) -> Option<String> {
        match &self.spans {
            None => self.incoming.clone(),
            Some(spans) => {
                let open = spans.phase.lock().ok()?;
                let context = match open.as_ref() {
                    Some(span) => span.span_context().clone(),
                    None => spans.call.span().span_context().clone(),
                };
                telemetry::traceparent(&context)
            }
        }
    }

    /// The call's trace id, for its log line; `None` when tracing is off.
    pub(crate) fn trace_id(&self) -> Option<String> {
        let spans = self.spans.as_ref()?;
        let context = spans.call.span().span_context().clone();
        context.is_valid().then(|| context.trace_id().to_string())
    }

    /// Ends the call: `error` is its failure (`None` for OK).
    pub(crate) fn end(&self, error: Option<ErrorCode>, bytes_in: u64, bytes_out: u64) {
        let Some(spans) = &self.spans else { return };
        if let Ok(mut open) = spans.phase.lock()
            && let Some(mut phase) = open.take()
        {
            if let Some(code) = error {
                phase.set_status(Status::error(code.name()));
            }
            phase.end();
        }
        let span = spans.call.span();
        let code = error.map_or("OK", ErrorCode::name);
        span.set_attribute(KeyValue::new("rpc.response.status_code", code));
        span.set_attribute(KeyValue::new("aipod.bytes_in", bytes_in as i64));
        span.set_attribute(KeyValue::new("aipod.bytes_out", bytes_out as i64));
        if let Some(code) = error.filter(|c| server_fault(*c)) {
            span.set_attribute(KeyValue::new("error.type", code.name()));
            span.set_status(Status::error(code.name()));
        }
        span.end();
    }
}

/// Whether a status is an error of the server's span: the gRPC conventions
/// count only these; the others are the client's doing.
fn server_fault(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Unknown
            | ErrorCode::DeadlineExceeded
            | ErrorCode::Unimplemented
            | ErrorCode::Internal
            | ErrorCode::Unavailable
            | ErrorCode::DataLoss
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_passes_the_callers_traceparent_through() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = Tracing::default().start(Some(tp), None, None);
        trace.enter(Phase::Running);
        assert_eq!(trace.traceparent().as_deref(), Some(tp));
        assert_eq!(trace.trace_id(), None);
        assert_eq!(Tracing::default().start(None, None, None).traceparent(), None);
    }

    #[test]
    fn only_server_faults_mark_the_server_span_failed() {
        assert!(server_fault(ErrorCode::Internal));
        assert!(!server_fault(ErrorCode::InvalidArgument));
        assert!(!server_fault(ErrorCode::Cancelled));
    }
}
