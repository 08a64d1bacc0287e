//! What the runtime tells its operators: `metrics` (Prometheus, on the
//! admin listener), `trace` (OpenTelemetry spans of each call and its
//! phases) and `logging` (text or JSON lines). Instruments read the shared
//! vocabulary and the model API's counts, never the engine.

pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod trace;
