//! The runtime's flags; each is also an `AIPOD_*` environment variable.

use std::{path::PathBuf, str::FromStr, time::Duration};

use aipod::{contract, duration, size};
use clap::{Parser, ValueEnum};

use crate::{
    versions::exec,
    versions::{ModelSpec, valid_version_name},
};

/// `--max-connections`' default.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 2048;

/// An HTTP/2 window size: 65,535 bytes (the protocol's default) to 2 GiB − 1.
fn window_size(s: &str) -> Result<u32, String> {
    let bytes = size::parse(s).map_err(|e| e.to_string())?;
    u32::try_from(bytes)
        .ok()
        .filter(|b| (65_535..=0x7fff_ffff).contains(b))
        .ok_or_else(|| format!("{s}: an HTTP/2 window is 64KiB to just under 2GiB"))
}

/// Serve ML models over the streaming `ai.AI/chaos` gRPC method.
///
/// With no flags, serves the built-in demo model on 127.0.0.1:50051.
#[derive(Debug, Clone, Parser)]
#[command(name = "aipod-runtime", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on (use 0.0.0.0:50051 in a container).
    #[arg(long, env = "AIPOD_LISTEN", default_value = contract::DEFAULT_LISTEN)]
    pub(crate) listen: String,

    /// A model version to serve, `[VERSION=]SPEC`, repeatable. SPEC is
    /// `builtin:demo` or `exec:COMMAND ARGS…`. Unnamed versions are v1, v2…
    /// Default: builtin:demo, unless the program registers models of its own.
    #[arg(long = "model", env = "AIPOD_MODEL", value_name = "[VERSION=]SPEC")]
    pub(crate) models: Vec<ModelSpec>,

    /// The version used when a call names none (default: the first --model).
    #[arg(long, env = "AIPOD_DEFAULT_VERSION", value_name = "VERSION")]
    pub(crate) default_version: Option<String>,

    /// Worker processes per exec: version, `N` for all or `VERSION=N`, repeatable.
    #[arg(long = "workers", env = "AIPOD_WORKERS", value_name = "[VERSION=]N", default_value = "1")]
    pub(crate) workers: Vec<Workers>,

    /// How long an exec: worker may take to load and send `ready`; a worker
    /// that takes longer at start-up stops the runtime with an error.
    #[arg(long, env = "AIPOD_WORKER_START_TIMEOUT", default_value = "5m", value_parser = duration::parse)]
    pub(crate) worker_start_timeout: Duration,

    /// How long an exec: worker gets to answer a cancel or to exit after
    /// shutdown before it is killed.
    #[arg(long, env = "AIPOD_WORKER_GRACE", default_value = "5s", value_parser = duration::parse)]
    pub(crate) worker_grace: Duration,

    /// Heartbeat interval while a call is in progress; 0 turns heartbeats off
    /// (only to prove what they protect against: proxies will cut long calls).
    #[arg(long, env = "AIPOD_HEARTBEAT", default_value = "1s", value_parser = duration::parse)]
    pub(crate) heartbeat: Duration,

    /// Where payloads are spooled: each call's input file and output
    /// directory (default: <temp dir>/aipod-spool-<port>).
    #[arg(long, env = "AIPOD_SPOOL_DIR", value_name = "DIR")]
    pub(crate) spool_dir: Option<PathBuf>,

    /// Largest accepted (uncompressed) payload, e.g. 64GiB.
    #[arg(long, env = "AIPOD_MAX_PAYLOAD_BYTES", default_value = "64GiB", value_parser = size::parse)]
    pub(crate) max_payload_bytes: u64,

    /// Largest accepted kwargs JSON.
    #[arg(long, env = "AIPOD_MAX_KWARGS_BYTES", default_value = "1MiB", value_parser = size::parse)]
    pub(crate) max_kwargs_bytes: u64,

    /// Largest gRPC message a client may send: a call's header (its kwargs
    /// included) or one payload chunk. The aipod clients send 1 MiB chunks;
    /// a larger message is refused at its length prefix, before any of it
    /// is buffered. Replies (a result's JSON) may be up to 8 MiB.
    #[arg(long, env = "AIPOD_MAX_MESSAGE_BYTES", default_value = "2MiB", value_parser = size::parse)]
    pub(crate) max_message_bytes: u64,

    /// Calls a model version runs at once.
    #[arg(long, env = "AIPOD_MAX_CONCURRENT_CALLS", default_value_t = 16)]
    pub(crate) max_concurrent_calls: usize,

    /// Calls that may wait per version; beyond, calls get a retryable
    /// RESOURCE_EXHAUSTED (the aipod clients retry it). With the default
    /// 16 running, a version holds 128 calls: each may have a stream window
    /// of bytes in flight, so this is what bounds the server's memory
    /// (docs/security.md, "The worst case with defaults").
    #[arg(long, env = "AIPOD_MAX_QUEUED_CALLS", default_value_t = 112)]
    pub(crate) max_queued_calls: usize,

    /// The slowest an upload may be on average, in bytes (as sent) per
    /// second, once it has run a minute (or twice --receive-timeout, when
    /// shorter): a client that trickles a byte now and then to keep a call
    /// slot is ended with DEADLINE_EXCEEDED. `0` (the default): no minimum —
    /// a client that streams slowly produced data (the aipod clients send
    /// it in 1 MiB chunks, so nothing may arrive for minutes) is not cut.
    #[arg(long, env = "AIPOD_MIN_RECEIVE_RATE", default_value = "0", value_parser = size::parse)]
    pub(crate) min_receive_rate: u64,

    /// The longest pause between two frames of a payload; a call whose
    /// upload stalls longer ends with DEADLINE_EXCEEDED and frees its slot.
    #[arg(long, env = "AIPOD_RECEIVE_TIMEOUT", default_value = "5m", value_parser = duration::parse)]
    pub(crate) receive_timeout: Duration,

    /// The largest zstd window a payload may use (rounded up to a power of
    /// two): it is the decoder's memory per call. 8MiB covers every level up
    /// to 19 of the aipod clients, whose frames are at most 1 MiB.
    #[arg(long, env = "AIPOD_MAX_ZSTD_WINDOW", default_value = "8MiB", value_parser = size::parse)]
    pub(crate) max_zstd_window: u64,

    /// Decoder memory all zstd payloads being received share: each frame's
    /// window (at most `--max-zstd-window`) is taken from it before the
    /// decoder allocates it, and a payload that finds it full ends with a
    /// retryable RESOURCE_EXHAUSTED. 128MiB decodes about 500 uploads of
    /// the aipod clients at once (their frames are at most 256 KiB), 60
    /// that use 2 MiB windows (the zstd tool's default for large inputs),
    /// or 15 at the 8 MiB cap.
    #[arg(long, env = "AIPOD_ZSTD_MEMORY_BUDGET", default_value = "128MiB", value_parser = size::parse)]
    pub(crate) zstd_memory_budget: u64,

    /// Once no call has started or ended for this long, memory a burst of
    /// calls freed is given back to the system (glibc keeps it otherwise);
    /// `0`: never.
    #[arg(long, env = "AIPOD_MEMORY_RELEASE_DELAY", default_value = "1s", value_parser = duration::parse)]
    pub(crate) memory_release_delay: Duration,

    /// Payload bytes read from clients and not yet decoded, all calls
    /// together. When decoding falls behind the network, calls stop reading
    /// until it catches up (their bytes wait in HTTP/2 flow control, at most
    /// a stream window each) instead of queueing in memory.
    #[arg(long, env = "AIPOD_DECODE_BACKLOG_BUDGET", default_value = "64MiB", value_parser = size::parse)]
    pub(crate) decode_backlog_budget: u64,

    /// The longest a retained call (`Header.retain_seconds`) is kept
    /// without a client; longer asks are capped to it.
    #[arg(long, env = "AIPOD_MAX_RETAIN", default_value = "1h", value_parser = duration::parse)]
    pub(crate) max_retain: Duration,

    /// Spool bytes that finished retained results may hold; beyond it the
    /// oldest results no client is reading are evicted first.
    #[arg(long, env = "AIPOD_RETAIN_BYTES", default_value = "10GiB", value_parser = size::parse)]
    pub(crate) retain_bytes: u64,

    /// Small payloads (a declared size up to 256 KiB) are held in memory
    /// instead of the spool — no file-system call per call — while all of
    /// them together fit in this many bytes; beyond it, and for larger or
    /// retained calls, payloads are spooled. `0` spools every payload.
    #[arg(long, env = "AIPOD_MEMORY_PAYLOAD_BUDGET", default_value = "64MiB", value_parser = size::parse)]
    pub(crate) memory_payload_budget: u64,

    /// The longest a call may last, from its header to its last reply; a
    /// call that runs longer ends with DEADLINE_EXCEEDED naming this limit,
    /// so a drain of this length always lets every call finish. `0`: no
    /// limit (the bare binary's default; the operator sets one for every
    /// AIPod from `spec.runtime.maxCallDuration`).
    #[arg(long, env = "AIPOD_MAX_CALL_DURATION", default_value = "0", value_parser = duration::parse)]
    pub(crate) max_call_duration: Duration,

    /// On SIGTERM, how long in-flight calls may take to finish.
    #[arg(long, env = "AIPOD_DRAIN_TIMEOUT", default_value = "30s", value_parser = duration::parse)]
    pub(crate) drain_timeout: Duration,

    /// Require `authorization: Bearer <token>` on calls, describe and
    /// reflection (not health): the file lists the accepted tokens, one a
    /// line as `TOKEN [FUNC,FUNC…]` (the list limits what the token may
    /// call; `#` starts a comment). Re-read when it changes.
    #[arg(long, env = "AIPOD_AUTH_TOKEN_FILE", value_name = "PATH")]
    pub(crate) auth_token_file: Option<PathBuf>,

    /// Serve the gRPC port over TLS only, with this certificate chain (PEM;
    /// re-read when the file changes). Needs --tls-key.
    #[arg(long, env = "AIPOD_TLS_CERT", value_name = "PATH")]
    pub(crate) tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM; re-read when the file changes).
    #[arg(long, env = "AIPOD_TLS_KEY", value_name = "PATH")]
    pub(crate) tls_key: Option<PathBuf>,

    /// Mutual TLS: require client certificates issued by these CAs (PEM;
    /// re-read when the file changes). Needs --tls-cert.
    #[arg(long, env = "AIPOD_TLS_CLIENT_CA", value_name = "PATH")]
    pub(crate) tls_client_ca: Option<PathBuf>,

    /// Client connections open at once; while this many are open, new ones
    /// wait in the listen backlog until one closes. An idle connection
    /// costs ~17 KiB; nginx opens one per call it forwards, so keep this
    /// above the calls a server holds (running and queued).
    #[arg(long, env = "AIPOD_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub(crate) max_connections: usize,

    /// HTTP/2 receive window of each stream: the bytes one call may send
    /// ahead of the server reading them. It caps one upload's speed at
    /// window ÷ round trip (1MiB over a 1 ms in-cluster hop: ~1 GB/s);
    /// raise it for clients far away.
    #[arg(long, env = "AIPOD_HTTP2_STREAM_WINDOW", default_value = "1MiB", value_parser = window_size)]
    pub(crate) http2_stream_window: u32,

    /// HTTP/2 receive window of each connection, shared by its streams.
    #[arg(long, env = "AIPOD_HTTP2_CONNECTION_WINDOW", default_value = "2MiB", value_parser = window_size)]
    pub(crate) http2_connection_window: u32,

    /// Ask a client to reconnect (an HTTP/2 GOAWAY) once its connection is
    /// this old, give or take 10% (drawn when the server starts): the calls
    /// open on it go on, up to --max-call-duration; new calls go on a new
    /// connection, which a load balancer may give another pod — so pods an
    /// autoscaler adds get their share. `0` (the default): never.
    #[arg(long, env = "AIPOD_MAX_CONNECTION_AGE", default_value = "0", value_parser = duration::parse)]
    pub(crate) max_connection_age: Duration,

    /// Close a client connection after this long without an open call
    /// (HTTP/2 pings and heartbeats do not count as calls; `0`: never).
    #[arg(long, env = "AIPOD_IDLE_TIMEOUT", default_value = "5m", value_parser = duration::parse)]
    pub(crate) idle_timeout: Duration,

    /// Address of a plaintext gRPC listener serving only
    /// grpc.health.v1.Health, for kubelet probes when the main port is TLS,
    /// e.g. 0.0.0.0:8081; off when empty.
    #[arg(long, env = "AIPOD_HEALTH_LISTEN", default_value = "", value_name = "ADDR")]
    pub(crate) health_listen: String,

    /// Address of the plain-HTTP admin listener serving Prometheus metrics
    /// at /metrics (and /healthz), e.g. 0.0.0.0:9090; off when empty.
    #[arg(long, env = "AIPOD_METRICS_LISTEN", default_value = "", value_name = "ADDR")]
    pub(crate) metrics_listen: String,

    /// Log format.
    #[arg(long, env = "AIPOD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,

    /// Log filter, e.g. `info` or `aipod_runtime=debug` (RUST_LOG syntax).
    #[arg(long, env = "AIPOD_LOG", default_value = "info")]
    pub(crate) log: String,
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// A `--workers` value: a count for every version or for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Workers {
    /// The version it applies to; `None` for all.
    pub version: Option<String>,
    /// Worker processes.
    pub count: usize,
}

impl FromStr for Workers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (version, n) = match s.split_once('=') {
            Some((v, n)) if valid_version_name(v) => (Some(v.to_owned()), n),
            Some(_) => return Err(format!("{s:?}: expected N or VERSION=N")),
            None => (None, s),
        };
        match n.trim().parse::<usize>() {
            Ok(count) if count >= 1 => Ok(Self { version, count }),
            _ => Err(format!("{s:?}: the worker count must be a whole number of at least 1")),
        }
    }
}

impl Config {
    /// Workers for `version`: its own `VERSION=N`, else the last plain `N`.
    pub fn workers_for(&self, version: &str) -> usize {
        let own = self.workers.iter().rev().find(|w| w.version.as_deref() == Some(version));
        let all = self.workers.iter().rev().find(|w| w.version.is_none());
        own.or(all).map_or(1, |w| w.count)
    }

    /// How `version`'s exec: workers run.
    pub fn exec_settings(&self, version: &str) -> exec::Settings {
        exec::Settings {
            workers: self.workers_for(version),
            start_timeout: self.worker_start_timeout,
            grace: self.worker_grace,
        }
    }

    /// `--max-zstd-window` as the power of two zstd takes (10 to 31).
    pub(crate) fn max_zstd_window_log(&self) -> crate::error::Result<u32> {
        let log = self.max_zstd_window.max(1).next_power_of_two().trailing_zeros();
        if (10..=31).contains(&log) {
            Ok(log)
        } else {
            Err(crate::error::Error::Config(format!("--max-zstd-window {}: use 1KiB to 2GiB", self.max_zstd_window)))
        }
    }

    /// The spool directory for a server listening on `port`.
    pub fn spool_dir_for(&self, port: u16) -> PathBuf {
        self.spool_dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("aipod-spool-{port}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("aipod-runtime").chain(args.iter().copied()))
    }

    #[test]
    fn no_flags_serve_the_demo_on_loopback() {
        let c = parse(&[]).expect("defaults");
        assert_eq!(c.listen, "127.0.0.1:50051");
        assert!(c.models.is_empty(), "no --model: the engine serves the demo (or the program's own models)");
        assert_eq!(c.heartbeat, Duration::from_secs(1));
        assert_eq!(c.max_kwargs_bytes, 1 << 20);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.spool_dir_for(50051), std::env::temp_dir().join("aipod-spool-50051"));
    }

    #[test]
    fn flags_parse_units_and_repeat() {
        let c = parse(&[
            "--model",
            "v1=builtin:demo",
            "--model",
            "v2=builtin:demo",
            "--heartbeat",
            "200ms",
            "--max-payload-bytes",
            "2GiB",
            "--workers",
            "2",
            "--workers",
            "v2=4",
        ])
        .expect("flags");
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.heartbeat, Duration::from_millis(200));
        assert_eq!(c.max_payload_bytes, 2 << 30);
        assert_eq!((c.workers_for("v1"), c.workers_for("v2")), (2, 4));
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["--heartbeat", "soon"][..],
            &["--max-payload-bytes", "lots"],
            &["--model", "demo"],
            &["--workers", "0"],
            &["--log-format", "xml"],
        ] {
            assert!(parse(args).is_err(), "{args:?} should be rejected");
        }
    }
}
