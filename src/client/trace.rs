//! A call's CLIENT span and the `traceparent` its attempts carry (with the
//! `otel` feature; without it, nothing).

use tonic::metadata::MetadataMap;

/// Where a call's span hangs: an OpenTelemetry context, or nothing.
#[cfg(feature = "otel")]
pub(crate) type Parent = opentelemetry::Context;
/// Where a call's span hangs: nothing without the `otel` feature.
#[cfg(not(feature = "otel"))]
pub(crate) type Parent = ();

/// The span of one call, across its attempts.
pub(crate) struct CallTrace {
    #[cfg(feature = "otel")]
    cx: opentelemetry::Context,
}

impl CallTrace {
    /// Starts the span of a call of `func` to `target`, under `parent` (by
    /// default the current span).
    #[cfg_attr(not(feature = "otel"), expect(unused_variables, reason = "no tracing without the otel feature"))]
    pub(crate) fn start(parent: Option<&Parent>, func: &str, target: &str) -> Self {
        #[cfg(feature = "otel")]
        {
            let parent = parent.cloned().unwrap_or_else(crate::telemetry::current);
            Self { cx: crate::telemetry::start_client_span(&parent, func, target) }
        }
        #[cfg(not(feature = "otel"))]
        Self {}
    }

    /// Adds the trace context to an attempt's metadata.
    #[cfg_attr(not(feature = "otel"), expect(unused_variables, reason = "no tracing without the otel feature"))]
    pub(crate) fn inject(&self, metadata: &mut MetadataMap) {
        #[cfg(feature = "otel")]
        crate::telemetry::inject(&self.cx, metadata);
    }

    /// Ends the span with the call's outcome: its gRPC status name
    /// (`"OK"` for a success) and the call id the server gave, if any.
    #[cfg_attr(not(feature = "otel"), expect(unused_variables, reason = "no tracing without the otel feature"))]
    pub(crate) fn end(self, status: &str, call_id: Option<&str>) {
        #[cfg(feature = "otel")]
        crate::telemetry::end_client_span(&self.cx, status, call_id);
    }
}
