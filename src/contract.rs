//! Names and defaults both ends of the wire must agree on.

use std::time::Duration;

/// Fully qualified name of the service; also the readiness health service.
pub const SERVICE_NAME: &str = "ai.AI";
/// The HTTP/2 path of the universal method, as existing proxy configs expect.
pub const CHAOS_PATH: &str = "/ai.AI/chaos";

/// The HTTP/2 path of the one-message `call` method.
pub const CALL_PATH: &str = "/ai.AI/call";

/// The `Description.features` name of the one-message `call` method.
pub const FEATURE_CALL: &str = "call";

/// The largest payload (as encoded) a one-message `call` carries; larger
/// payloads go by `chaos`, streamed.
pub const CALL_PAYLOAD_MAX: u64 = 256 << 10;

/// Metadata naming the function to run.
pub const FUNC_NAME_KEY: &str = "x-func-name";
/// Metadata naming the backend; read by routers, ignored by the runtime.
pub const UPSTREAM_KEY: &str = "x-upstream";
/// Metadata mirroring `Header.call_id`, sent by the client and echoed back.
pub const CALL_ID_KEY: &str = "x-aipod-call-id";
/// Status metadata set to `true` on refusals the client may retry (server
/// draining, queue full, spool disk full): no model work has started.
pub const RETRYABLE_KEY: &str = "x-aipod-retryable";
/// Trailer metadata of a failed call: the phase it was in when it failed
/// (`RECEIVING`, `QUEUED`, `RUNNING`, `SENDING`), so clients report where
/// it failed even when no heartbeat told them (a model that fails at once).
pub const PHASE_KEY: &str = "x-aipod-phase";
/// The function called when neither `x-func-name` nor `Header.func` names one.
pub const DEFAULT_FUNC: &str = "chaos";

/// Health service that reports liveness: SERVING while the process runs.
pub const LIVENESS_SERVICE: &str = "";
/// Health service that reports readiness: SERVING only when every model is
/// loaded and the server is not draining.
pub const READINESS_SERVICE: &str = SERVICE_NAME;

/// The port the runtime listens on by default.
pub const DEFAULT_PORT: u16 = 50051;
/// The runtime's default listen address: loopback, so a bare start is safe.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// The client's default target.
pub const DEFAULT_TARGET: &str = "http://127.0.0.1:50051";
/// How often heartbeats are sent by default.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// Largest accepted `Header.kwargs_json` by default.
pub const DEFAULT_MAX_KWARGS_BYTES: u64 = 1 << 20;
/// Largest gRPC message either side accepts by default: room for 4 MiB data
/// chunks plus framing, but not unlimited.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 8 << 20;
/// Payload chunk size both sides aim for: large enough to amortise per-message
/// costs, small enough to keep many calls in little memory.
pub const CHUNK_SIZE: usize = 1 << 20;

/// HTTP/2 keepalive ping interval, also while idle: proxies and NATs drop
/// silent connections.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a keepalive ping may go unanswered before the connection is
/// considered dead; generous, because a busy peer answers late.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// TCP keepalive, for the cases HTTP/2 pings cannot cover.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
