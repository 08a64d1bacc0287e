//! What a call sends and where its result goes: the [`CallBuilder`].

use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use serde::Serialize;
use tokio::io::AsyncRead;

use super::{CallOutput, Output, Payload, Progress, call_label, new_call_id};
use super::{attempt::Spec, replies::part_path};
use crate::{
    client::{Client, error::CallError, retry::RetryPolicy},
    codec::Compression,
};

/// Builds and sends one call; see [`Client::call`].
#[must_use = "a call does nothing until sent"]
pub struct CallBuilder {
    pub(super) spec: Spec,
    pub(super) payload: Payload,
    pub(super) output: Output,
}

impl fmt::Debug for CallBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallBuilder")
            .field("func", &self.spec.func)
            .field("version", &self.spec.version)
            .finish_non_exhaustive()
    }
}

impl CallBuilder {
    pub(crate) fn new(client: Client, func: &str) -> Self {
        let retry = client.options.retry;
        let upstream = client.upstream.clone();
        let spec = Spec {
            client,
            func: func.to_owned(),
            version: String::new(),
            upstream,
            kwargs: serde_json::Map::new(),
            compression: Compression::Auto,
            call_id: None,
            timeout: None,
            idempotent: false,
            retry,
            progress: None,
            trace_parent: None,
            retain: None,
            attach_only: false,
        };
        Self { spec, payload: Payload::None, output: Output::Discard }
    }

    /// Picks up the retained call `call_id` (see [`crate::Client::attach`]).
    pub(crate) fn attach(client: Client, call_id: &str) -> Self {
        let mut builder = Self::new(client, "");
        builder.spec.attach_only = true;
        builder.spec.call_id = Some(call_id.to_owned());
        builder
    }

    /// The model version (default: the server's default version).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.spec.version = version.into();
        self
    }

    /// The `x-upstream` metadata routers use to pick the backend.
    pub fn upstream(mut self, upstream: impl Into<String>) -> Self {
        self.spec.upstream = Some(upstream.into());
        self
    }

    /// Keyword arguments from anything that serializes to a JSON object.
    pub fn kwargs<T: Serialize>(mut self, kwargs: &T) -> Result<Self, CallError> {
        match serde_json::to_value(kwargs) {
            Ok(serde_json::Value::Object(map)) => {
                self.spec.kwargs = map;
                Ok(self)
            }
            Ok(other) => Err(CallError::local(format!("kwargs must serialize to a JSON object, not {other}"))),
            Err(e) => Err(CallError::local(format!("kwargs cannot be serialized: {e}"))),
        }
    }

    /// One keyword argument.
    pub fn kwarg(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.spec.kwargs.insert(key.into(), value.into());
        self
    }

    /// Raw kwargs JSON text; must be an object.
    pub fn kwargs_json(self, json: &str) -> Result<Self, CallError> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| CallError::local(format!("kwargs are not valid JSON: {e}")))?;
        self.kwargs(&value)
    }

    /// The payload.
    pub fn payload(mut self, payload: Payload) -> Self {
        self.payload = payload;
        self
    }

    /// A file as the payload.
    pub fn file(self, path: impl Into<PathBuf>) -> Self {
        self.payload(Payload::File(path.into()))
    }

    /// Bytes as the payload.
    pub fn bytes(self, bytes: impl Into<Bytes>) -> Self {
        self.payload(Payload::Bytes(bytes.into()))
    }

    /// An async reader as the payload (never retried).
    pub fn reader(self, reader: impl AsyncRead + Send + Unpin + 'static) -> Self {
        self.payload(Payload::Reader(Box::new(reader)))
    }

    /// Where the result payload goes (default: discarded).
    pub fn output(mut self, output: Output) -> Self {
        self.output = output;
        self
    }

    /// The zstd level for the payload; `None` sends it uncompressed.
    pub fn zstd_level(mut self, level: Option<i32>) -> Self {
        self.spec.compression = level.map_or(Compression::Off, Compression::Level);
        self
    }

    /// How the payload is compressed (default [`Compression::Auto`]: the
    /// zstd level that moves the most payload per second on this link, from
    /// none to strong, chosen as it goes; small payloads uncompressed).
    pub fn compression(mut self, compression: Compression) -> Self {
        self.spec.compression = compression;
        self
    }

    /// A call id for correlating logs (default: the client makes one, new
    /// on every call; a retained call's is 128 random bits).
    pub fn call_id(mut self, id: impl Into<String>) -> Self {
        self.spec.call_id = Some(id.into());
        self
    }

    /// Retains the call for `retain` without a client (the protocol's
    /// `Header.retain_seconds`; the server caps it): if the connection
    /// breaks after the server accepted the call, the model keeps running
    /// and this client reattaches — or resumes the upload from the offset
    /// the server holds, for file and bytes payloads — by itself, with
    /// backoff, until the call's timeout or the retain time passes. A call
    /// id is made (128 random bits) unless one was given.
    pub fn retain(mut self, retain: Duration) -> Self {
        self.spec.retain = Some(retain).filter(|d| !d.is_zero());
        self
    }

    /// An overall deadline for each attempt (a retained call's whole life).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.spec.timeout = Some(timeout);
        self
    }

    /// Allows retrying even after the model may have started.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.spec.idempotent = idempotent;
        self
    }

    /// The retry policy for this call.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.spec.retry = policy;
        self
    }

    /// Called with every heartbeat and upload/download step.
    pub fn on_progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        self.spec.progress = Some(Arc::new(f));
        self
    }

    /// The trace context the call's CLIENT span is a child of (default: the
    /// current `tracing` span's, else the current OpenTelemetry context).
    #[cfg(feature = "otel")]
    pub fn trace_parent(mut self, parent: opentelemetry::Context) -> Self {
        self.spec.trace_parent = Some(parent);
        self
    }

    /// Sends the call, retrying refusals, and returns the result.
    pub async fn send(self) -> Result<CallOutput, CallError> {
        // The payload and output live apart from the borrowed spec: they
        // need not be Sync, and the future stays Send so calls can be spawned.
        let Self { mut spec, payload, output } = self;
        if spec.call_id.is_none() {
            // A retained call's id is its key: unguessable; any other's
            // only names it in logs.
            spec.call_id = Some(if spec.retain.is_some() { new_call_id() } else { call_label() });
        }
        if let Output::File(path) = &output {
            // A destination that cannot be written fails now, not after the
            // upload and the model run.
            check_writable(path).map_err(|mut e| {
                e.func.clone_from(&spec.func);
                e
            })?;
        }
        spec.send(payload, output).await
    }
}

/// Whether the result payload can be written at `path` (its `.part` file is
/// made and removed again).
pub(super) fn check_writable(path: &std::path::Path) -> Result<(), CallError> {
    let part = part_path(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&part)
        .map_err(|e| CallError::local(format!("cannot write the result payload to {}: {e}", path.display())))?;
    let _ = std::fs::remove_file(&part);
    Ok(())
}
