//! One call: a builder for what to send, and the attempt loop that streams
//! the payload (read and compressed as it is sent), follows heartbeats,
//! writes the result payload as it arrives, and retries refusals.

use std::{
    fmt,
    io::{self, Read, Write},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::SyncIoBridge;

use crate::{
    client::{
        Client,
        error::{CallError, ErrorKind},
        retry::{RetryPolicy, should_rejoin, should_retry},
        trace::{CallTrace, Parent},
    },
    codec::{
        AUTO_SMALL_MAX, Compression, DEFAULT_ZSTD_LEVEL, Encoding, StreamDecoder,
        bridge::{self, DecodeSink, EncodedStream, INLINE_MAX},
    },
    contract,
    proto::{self, Frame, Phase, frame, reply},
};

/// Frames in flight between the payload reader and the network.
const FRAME_DEPTH: usize = 4;
// A payload sent in line queues its one chunk beside the header.
const _: () = assert!(FRAME_DEPTH >= 2);

/// What the client sends as the payload.
pub enum Payload {
    /// No payload.
    None,
    /// A file, read as it is sent; re-readable, so the call can be retried.
    File(PathBuf),
    /// Bytes in memory; re-readable.
    Bytes(Bytes),
    /// Any async reader, read once: a call with it is never retried.
    Reader(Box<dyn AsyncRead + Send + Unpin>),
}

/// Where the result payload goes.
pub enum Output {
    /// Read and dropped.
    Discard,
    /// Written to `PATH.part` as it arrives, renamed to `PATH` when complete.
    File(PathBuf),
    /// Any async writer.
    Writer(Box<dyn AsyncWrite + Send + Unpin>),
}

/// What the progress callback sees.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Uncompressed payload bytes read and handed to the network so far.
    Sent {
        /// Bytes sent.
        bytes: u64,
        /// The payload's size, when known.
        total: Option<u64>,
    },
    /// A heartbeat from the server.
    Heartbeat(proto::Heartbeat),
    /// The result arrived; `payload` bytes follow (if any).
    Result {
        /// Size of the result payload, if there is one.
        payload: Option<u64>,
    },
    /// Result payload bytes written so far.
    Received {
        /// Bytes received (uncompressed).
        bytes: u64,
        /// The result payload's size.
        total: Option<u64>,
    },
    /// The call is about to be sent again after `wait`.
    Retrying {
        /// The attempt that comes next (2 = first retry).
        attempt: u32,
        /// The wait before it.
        wait: Duration,
        /// Why the last one failed.
        error: String,
    },
}

type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A finished call.
#[derive(Debug, Clone)]
pub struct CallOutput {
    /// The model's JSON result, as sent.
    pub json: Bytes,
    /// The call id the server used.
    pub call_id: Option<String>,
    /// Size of the result payload written to the output, if there was one.
    pub payload_size: Option<u64>,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Attempts made.
    pub attempts: u32,
}

impl CallOutput {
    /// The result deserialized into the caller's type.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, CallError> {
        serde_json::from_slice(&self.json)
            .map_err(|e| CallError::local(format!("the result is not the expected JSON: {e}")))
    }
}

/// Builds and sends one call; see [`Client::call`].
#[must_use = "a call does nothing until sent"]
pub struct CallBuilder {
    spec: Spec,
    payload: Payload,
    output: Output,
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

    /// A call id for correlating logs (default: the server makes one).
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
        if spec.retain.is_some() && spec.call_id.is_none() {
            spec.call_id = Some(new_call_id());
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
fn check_writable(path: &std::path::Path) -> Result<(), CallError> {
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

/// Everything about a call but its payload and output.
struct Spec {
    client: Client,
    func: String,
    version: String,
    upstream: Option<String>,
    kwargs: serde_json::Map<String, serde_json::Value>,
    compression: Compression,
    call_id: Option<String>,
    timeout: Option<Duration>,
    idempotent: bool,
    retry: RetryPolicy,
    progress: Option<ProgressFn>,
    trace_parent: Option<Parent>,
    /// Retain the call this long without a client.
    retain: Option<Duration>,
    /// Only pick up the retained call `call_id` (`Client::attach`).
    attach_only: bool,
}

/// How an attempt opens its call.
enum Opening {
    /// A new call, sending the payload.
    Call(Source),
    /// Resumes a retained call's upload from the offset the server holds.
    Resume(Source),
    /// Attaches to a retained call.
    Attach,
}

/// What one attempt came to.
struct Attempt {
    result: Result<CallOutput, CallError>,
    /// The output, handed back for the next attempt.
    output: Output,
    /// The server accepted the call's header (at least one reply came).
    accepted: bool,
}

/// A call id no one can guess: 128 random bits from the operating system,
/// as 32 hex digits (what retained calls need).
pub fn new_call_id() -> String {
    let mut bytes = [0u8; 16];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_ok();
    if !filled {
        // No /dev/urandom: SipHash under the process's random keys.
        use std::hash::{BuildHasher, RandomState};
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let a = RandomState::new().hash_one(nanos).to_le_bytes();
        let b = RandomState::new().hash_one((nanos, std::process::id())).to_le_bytes();
        bytes[..8].copy_from_slice(&a);
        bytes[8..].copy_from_slice(&b);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Spec {
    async fn send(&self, payload: Payload, output: Output) -> Result<CallOutput, CallError> {
        let trace = CallTrace::start(self.trace_parent.as_ref(), &self.func, &self.client.target);
        let result = self.send_traced(payload, output, &trace).await;
        trace.end(&result);
        result
    }

    async fn send_traced(
        &self,
        mut payload: Payload,
        output: Output,
        trace: &CallTrace,
    ) -> Result<CallOutput, CallError> {
        if self.retain.is_some() || self.attach_only {
            return self.send_retained(payload, output, trace).await;
        }
        let mut output = Some(output);
        let replayable = !matches!(payload, Payload::Reader(_));
        let mut attempt = 1;
        // What the server itself last said: a server that refused (draining)
        // and then went away is reported by its reason, not as unreachable.
        let mut said: Option<CallError> = None;
        loop {
            let source = Source::of(&mut payload);
            let tried = self.attempt(Opening::Call(source), output.take().unwrap_or(Output::Discard), trace).await;
            output = Some(tried.output);
            match tried.result {
                Ok(mut out) => {
                    out.attempts = attempt;
                    return Ok(out);
                }
                Err(mut e) => {
                    e.func = self.func.clone();
                    e.attempts = attempt;
                    e.target = Some(self.client.target.clone());
                    if attempt >= self.retry.max_attempts || !should_retry(&e, replayable, self.idempotent) {
                        return Err(match (e.kind, said) {
                            (ErrorKind::Connect, Some(mut earlier)) => {
                                earlier.attempts = attempt;
                                earlier
                            }
                            _ => e,
                        });
                    }
                    if e.kind == ErrorKind::Status {
                        said = Some(e.clone());
                    }
                    let wait = self.retry.backoff(attempt);
                    attempt += 1;
                    self.pause(attempt, wait, &e).await;
                }
            }
        }
    }

    /// A retained call (or an attach): after the server accepted it, a
    /// broken stream is followed by a reattach — or a resume of the upload
    /// when the server says it is incomplete — with backoff, until the
    /// call's deadline or its retain time since the last contact passes.
    async fn send_retained(
        &self,
        mut payload: Payload,
        output: Output,
        trace: &CallTrace,
    ) -> Result<CallOutput, CallError> {
        let call_id = self.call_id.clone().unwrap_or_default();
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        let retain = self.retain.unwrap_or(Duration::ZERO);
        let replayable = !matches!(payload, Payload::Reader(_));
        let mut output = Some(output);
        // Whether the server accepted the call: from then on it is rejoined,
        // never started again.
        let mut accepted = self.attach_only;
        let (mut attempt, mut rejoins) = (1, 0);
        let mut last_contact = tokio::time::Instant::now();
        loop {
            let was_writer = matches!(output, Some(Output::Writer(_)));
            let out = output.take().unwrap_or(Output::Discard);
            let mut tried = if accepted {
                let attached = self.attempt(Opening::Attach, out, trace).await;
                match attached.result {
                    Err(e) if e.code == tonic::Code::FailedPrecondition && e.kind == ErrorKind::Status => {
                        if !replayable {
                            let mut e = e;
                            e.message = format!(
                                "{}; the payload came from a stream that cannot be read again, so the upload \
                                 cannot be resumed",
                                e.message
                            );
                            return Err(self.finish_error(e, attempt));
                        }
                        self.attempt(Opening::Resume(Source::of(&mut payload)), attached.output, trace).await
                    }
                    _ => attached,
                }
            } else {
                self.attempt(Opening::Call(Source::of(&mut payload)), out, trace).await
            };
            if tried.accepted {
                last_contact = tokio::time::Instant::now();
            }
            let consumed_writer = was_writer && !matches!(tried.output, Output::Writer(_));
            output = Some(std::mem::replace(&mut tried.output, Output::Discard));
            let e = match tried.result {
                Ok(mut out) => {
                    out.attempts = attempt;
                    out.call_id = out.call_id.or_else(|| Some(call_id.clone()));
                    return Ok(out);
                }
                Err(e) => e,
            };
            accepted |= tried.accepted;
            let now = tokio::time::Instant::now();
            // The server keeps an unattended call its retain time; a call
            // with a deadline is worth rejoining until then.
            let limit = deadline.unwrap_or(last_contact + retain);
            if accepted && should_rejoin(&e) && now < limit && !consumed_writer {
                rejoins += 1;
                attempt += 1;
                self.pause(attempt, self.retry.backoff(rejoins).min(limit - now), &e).await;
                continue;
            }
            if !accepted && attempt < self.retry.max_attempts && should_retry(&e, replayable, self.idempotent) {
                let wait = self.retry.backoff(attempt);
                attempt += 1;
                self.pause(attempt, wait, &e).await;
                continue;
            }
            return Err(self.finish_error(e, attempt));
        }
    }

    /// Logs and reports that attempt number `attempt` follows `wait` after
    /// `error`, then waits.
    async fn pause(&self, attempt: u32, wait: Duration, error: &CallError) {
        let call_id = self.call_id.as_deref().unwrap_or_default();
        tracing::warn!(func = %self.func, call_id, attempt, wait_ms = wait.as_millis() as u64, error = %error, "retrying call");
        self.report(&Progress::Retrying { attempt, wait, error: error.to_string() });
        tokio::time::sleep(wait).await;
    }

    /// Fills in what a failed call's error reports about the call.
    fn finish_error(&self, mut e: CallError, attempts: u32) -> CallError {
        e.func.clone_from(&self.func);
        e.attempts = attempts;
        e.target = Some(self.client.target.clone());
        if e.call_id.is_none() {
            e.call_id.clone_from(&self.call_id);
        }
        e
    }

    fn report(&self, p: &Progress) {
        if let Some(f) = &self.progress {
            f(p);
        }
    }

    /// One attempt; hands the output back so a retry can reuse it.
    async fn attempt(&self, opening: Opening, output: Output, trace: &CallTrace) -> Attempt {
        let failed = |e: CallError, output: Output| Attempt { result: Err(e), output, accepted: false };
        let call_id = self.call_id.clone().unwrap_or_default();
        let mut grpc = self.client.grpc.clone();
        let (response, upload, deferred) = match opening {
            Opening::Attach => {
                let mut request = tonic::Request::new(proto::AttachRequest { call_id: call_id.clone() });
                self.decorate(&mut request, trace);
                match grpc.attach(request).await {
                    Ok(r) => (r, None, None),
                    Err(status) => return failed(CallError::from_status(&status), output),
                }
            }
            opening => {
                let (source, resume) = match opening {
                    Opening::Call(source) => (source, false),
                    Opening::Resume(source) => (source, true),
                    Opening::Attach => unreachable!("handled above"),
                };
                let total = match source.size() {
                    Ok(total) => total,
                    Err(e) => return failed(e, output),
                };
                let encoding = self.compression.encoding(total);
                let header = proto::Header {
                    func: self.func.clone(),
                    version: self.version.clone(),
                    kwargs_json: serde_json::to_vec(&self.kwargs).unwrap_or_else(|_| b"{}".to_vec()).into(),
                    payload_size: total,
                    encoding: proto::Encoding::from(encoding) as i32,
                    call_id: call_id.clone(),
                    retain_seconds: self.retain.map(|d| d.as_secs().max(1)),
                    // Ask for everything: the server answers with what it holds.
                    resume_from: resume.then(|| total.unwrap_or(u64::MAX)),
                };
                let (tx, rx) = mpsc::channel::<Frame>(FRAME_DEPTH);
                if tx.send(Frame { kind: Some(frame::Kind::Header(header)) }).await.is_err() {
                    return failed(CallError::local("the request stream closed before the header"), output);
                }
                let upload = Upload { source, tx, encoding, compression: self.compression, total };
                let (upload, deferred) = if resume {
                    // Sent from the offset the server's first heartbeat names.
                    (None, Some(upload))
                } else if upload.fits_in_line() {
                    if let Err(e) = upload.send_in_line(self.progress.clone()).await {
                        return failed(e, output);
                    }
                    (None, None)
                } else {
                    (Some(upload.spawn(0, self.progress.clone())), None)
                };
                let mut request = tonic::Request::new(ReceiverStream::new(rx));
                self.decorate(&mut request, trace);
                if let Ok(v) = self.func.parse() {
                    request.metadata_mut().insert(contract::FUNC_NAME_KEY, v);
                }
                if let Some(t) = self.timeout {
                    request.set_timeout(t);
                }
                match grpc.chaos(request).await {
                    Ok(r) => (r, upload, deferred),
                    Err(status) => {
                        if let Some(u) = upload {
                            u.abort();
                        }
                        return failed(CallError::from_status(&status), output);
                    }
                }
            }
        };
        let call_id = response.metadata().get(contract::CALL_ID_KEY).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut replies = response.into_inner();
        let mut state = Replies { progress: self.progress.clone(), ..Replies::default() };
        let mut upload = upload;
        let mut deferred = deferred;
        let mut output = Some(output);
        let result = loop {
            let next = tokio::select! {
                biased;
                done = async { upload.as_mut().expect("present while polled").await }, if upload.is_some() => {
                    upload = None;
                    match done {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => break Err(e),
                        Err(e) => break Err(CallError::local(format!("payload reader failed: {e}"))),
                    }
                }
                next = replies.message() => next,
            };
            match next {
                Ok(Some(proto::Reply { kind: Some(kind) })) => {
                    if let (Some(pending), reply::Kind::Heartbeat(h)) = (deferred.take(), &kind) {
                        // A resume: the server holds the payload up to here.
                        if h.phase == Phase::Receiving as i32 {
                            match pending.resume_at(h.received_bytes) {
                                Ok(pending) => upload = Some(pending.spawn(h.received_bytes, self.progress.clone())),
                                Err(e) => break Err(e),
                            }
                        }
                    }
                    if let Err(e) = state.on_reply(kind, &mut output).await {
                        break Err(e);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break state.finish().await,
                Err(status) => break Err(CallError::from_status(&status)),
            }
        };
        if let Some(u) = upload {
            u.abort();
        }
        let handed_back = state.sink.take().map(Sink::into_output).or(output).unwrap_or(Output::Discard);
        let accepted = state.heartbeats > 0 || state.result.is_some();
        let result = result
            .map(|(json, payload_size)| CallOutput {
                json,
                call_id: call_id.clone(),
                payload_size,
                heartbeats: state.heartbeats,
                attempts: 1,
            })
            .map_err(|mut e| {
                e.call_id = e.call_id.or(call_id);
                e.phase = e.phase.or(state.phase);
                e
            });
        Attempt { result, output: handed_back, accepted }
    }

    /// Adds the call's metadata to `request`: the client's own, the trace
    /// context, upstream and call id.
    fn decorate<T>(&self, request: &mut tonic::Request<T>, trace: &CallTrace) {
        self.client.decorate(request);
        let metadata = request.metadata_mut();
        trace.inject(metadata);
        if let Some(v) = self.upstream.as_deref().and_then(|u| u.parse().ok()) {
            metadata.insert(contract::UPSTREAM_KEY, v);
        }
        if let Some(v) = self.call_id.as_deref().and_then(|c| c.parse().ok()) {
            metadata.insert(contract::CALL_ID_KEY, v);
        }
    }
}

/// An upload not started yet: what to send, where, and how.
struct Upload {
    source: Source,
    tx: mpsc::Sender<Frame>,
    encoding: Encoding,
    compression: Compression,
    total: Option<u64>,
}

impl Upload {
    /// Checks the offset a resuming server holds against the payload.
    fn resume_at(self, offset: u64) -> Result<Self, CallError> {
        match self.total {
            Some(total) if offset > total => Err(CallError::new(
                ErrorKind::Protocol,
                tonic::Code::Internal,
                format!("the server holds {offset} bytes of a {total}-byte payload"),
            )),
            _ => Ok(self),
        }
    }

    /// Whether the whole payload fits the request channel beside the
    /// header — none, or bytes in memory that encode to one chunk: then it
    /// is queued before the call starts, with no task of its own (a small
    /// call's cost is mostly such hand-offs).
    fn fits_in_line(&self) -> bool {
        match &self.source {
            Source::None => true,
            Source::Bytes(b) => b.len() as u64 <= INLINE_MAX,
            Source::File(_) | Source::Reader(_) => false,
        }
    }

    /// Encodes and queues a payload that [`Upload::fits_in_line`], then
    /// half-closes.
    async fn send_in_line(self, progress: Option<ProgressFn>) -> Result<(), CallError> {
        let compression = self.compression_from(0);
        self.source.upload(self.tx, compression, self.total, 0, progress)?.await
    }

    /// Reads, encodes and sends the payload from uncompressed byte
    /// `offset`, then half-closes.
    fn spawn(self, offset: u64, progress: Option<ProgressFn>) -> JoinHandle<Result<(), CallError>> {
        let compression = self.compression_from(offset);
        match self.source.upload(self.tx, compression, self.total, offset, progress) {
            Ok(sending) => tokio::spawn(sending),
            Err(e) => tokio::spawn(async move { Err(e) }),
        }
    }

    /// The compression of the payload from `offset` on.
    fn compression_from(&self, offset: u64) -> Compression {
        // The header named the encoding: every piece keeps to it.
        match (self.encoding, self.compression) {
            (Encoding::Identity, _) => Compression::Off,
            (Encoding::Zstd, Compression::Auto) if self.total.is_some_and(|t| t - offset.min(t) <= AUTO_SMALL_MAX) => {
                Compression::Level(DEFAULT_ZSTD_LEVEL)
            }
            (Encoding::Zstd, c) => c,
        }
    }
}

/// The payload of one attempt.
enum Source {
    None,
    File(PathBuf),
    Bytes(Bytes),
    Reader(Box<dyn AsyncRead + Send + Unpin>),
}

impl Source {
    /// This attempt's payload: files and bytes again, a reader once.
    fn of(payload: &mut Payload) -> Self {
        match payload {
            Payload::None => Self::None,
            Payload::File(p) => Self::File(p.clone()),
            Payload::Bytes(b) => Self::Bytes(b.clone()),
            Payload::Reader(r) => Self::Reader(std::mem::replace(r, Box::new(tokio::io::empty()))),
        }
    }

    fn size(&self) -> Result<Option<u64>, CallError> {
        Ok(match self {
            Self::None => Some(0),
            Self::Bytes(b) => Some(b.len() as u64),
            Self::File(p) => Some(
                std::fs::metadata(p).map_err(|e| CallError::local(format!("cannot read {}: {e}", p.display())))?.len(),
            ),
            Self::Reader(_) => None,
        })
    }

    /// What reads, encodes and sends the payload from uncompressed byte
    /// `offset` (through the codec's bridge: in line when small, else on a
    /// blocking thread), then half-closes by dropping `tx`.
    fn upload(
        self,
        tx: mpsc::Sender<Frame>,
        compression: Compression,
        total: Option<u64>,
        offset: u64,
        progress: Option<ProgressFn>,
    ) -> Result<impl Future<Output = Result<(), CallError>> + Send + 'static, CallError> {
        let fail = |message: String| Err(CallError::local(message));
        let reader: Box<dyn Read + Send> = match self {
            Self::None => Box::new(io::empty()),
            Self::Bytes(b) => {
                let from = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
                Box::new(io::Cursor::new(b.slice(from..)))
            }
            Self::File(p) => {
                let opened = std::fs::File::open(&p).and_then(|mut f| {
                    io::Seek::seek(&mut f, io::SeekFrom::Start(offset))?;
                    Ok(f)
                });
                match opened {
                    Ok(f) => Box::new(f),
                    Err(e) => return fail(format!("cannot open {}: {e}", p.display())),
                }
            }
            Self::Reader(_) if offset > 0 => return fail("a stream payload cannot be resumed".to_owned()),
            // Never in line: its size is unknown, so the bridge runs it on a
            // blocking thread, where SyncIoBridge may block.
            Self::Reader(r) => Box::new(SyncIoBridge::new(r)),
        };
        let rest = total.map(|t| t.saturating_sub(offset));
        Ok(async move {
            let mut chunks = EncodedStream::compressed(reader, compression, contract::CHUNK_SIZE, rest);
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|e| CallError::local(format!("reading the payload failed: {e}")))?;
                if tx.send(Frame { kind: Some(frame::Kind::Data(chunk)) }).await.is_err() {
                    return Ok(()); // the server answered before the end: its answer says why
                }
                if let Some(f) = &progress {
                    f(&Progress::Sent { bytes: offset + chunks.bytes_read(), total });
                }
            }
            Ok(())
        })
    }
}

/// Follows the replies of one attempt.
#[derive(Default)]
struct Replies {
    progress: Option<ProgressFn>,
    phase: Option<Phase>,
    heartbeats: u64,
    result: Option<(Bytes, Option<u64>)>,
    sink: Option<Sink>,
}

impl Replies {
    async fn on_reply(&mut self, kind: reply::Kind, output: &mut Option<Output>) -> Result<(), CallError> {
        match kind {
            reply::Kind::Heartbeat(h) => {
                self.heartbeats += 1;
                self.phase = Some(Phase::try_from(h.phase).unwrap_or(Phase::Unspecified));
                self.report(&Progress::Heartbeat(h));
            }
            reply::Kind::Result(r) => {
                if self.result.is_some() {
                    return Err(CallError::new(ErrorKind::Protocol, tonic::Code::Internal, "a second result"));
                }
                self.phase = Some(Phase::Sending);
                self.report(&Progress::Result { payload: r.payload_size });
                if let Some(size) = r.payload_size {
                    let encoding = proto::Encoding::codec(r.encoding).ok_or_else(|| {
                        CallError::new(
                            ErrorKind::Protocol,
                            tonic::Code::Internal,
                            format!("unknown result encoding {}", r.encoding),
                        )
                    })?;
                    let out = output.take().unwrap_or(Output::Discard);
                    self.sink = Some(Sink::start(out, encoding, size, self.progress.clone())?);
                }
                self.result = Some((r.json, r.payload_size));
            }
            reply::Kind::Data(bytes) => match &mut self.sink {
                Some(sink) => sink.push(bytes).await?,
                None => {
                    return Err(CallError::new(
                        ErrorKind::Protocol,
                        tonic::Code::Internal,
                        "result data without a result",
                    ));
                }
            },
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(Bytes, Option<u64>), CallError> {
        let Some(result) = self.result.clone() else {
            return Err(CallError::new(
                ErrorKind::Protocol,
                tonic::Code::Internal,
                "the server ended the call without a result",
            ));
        };
        if let Some(sink) = &mut self.sink {
            sink.finish().await?;
        }
        Ok(result)
    }

    fn report(&self, p: &Progress) {
        if let Some(f) = &self.progress {
            f(p);
        }
    }
}

/// A result payload must have the size its result announced.
fn check_result_size(decoded: u64, size: u64) -> Result<(), CallError> {
    if decoded == size {
        return Ok(());
    }
    Err(CallError::new(
        ErrorKind::Status,
        tonic::Code::DataLoss,
        format!("the result payload has {decoded} bytes, not the {size} announced"),
    ))
}

/// Decodes the result payload into the output as it arrives, through the
/// codec's bridge.
struct Sink {
    decode: Option<DecodeSink<Box<dyn Write + Send>>>,
    /// What completes the output once the payload is whole.
    finish: Option<Finish>,
    size: u64,
    progress: Option<ProgressFn>,
    /// The output file, so a failed attempt can remove its `.part` file and
    /// a retry can write the same path again.
    path: Option<PathBuf>,
    done: Option<Output>,
}

impl Sink {
    fn start(output: Output, encoding: Encoding, size: u64, progress: Option<ProgressFn>) -> Result<Self, CallError> {
        let path = match &output {
            Output::File(p) => Some(p.clone()),
            _ => None,
        };
        // A writer is bridged with SyncIoBridge, which must not run on the
        // async task: never in line.
        let inline = bridge::inline(Some(size)) && !matches!(output, Output::Writer(_));
        let (writer, finish): (Box<dyn Write + Send>, Finish) = match output {
            Output::Discard => (Box::new(io::sink()), Finish::Discard),
            Output::File(path) => {
                let part = part_path(&path);
                let file = std::fs::File::create(&part)
                    .map_err(|e| CallError::local(format!("cannot create {}: {e}", part.display())))?;
                (Box::new(file), Finish::Rename { part, path })
            }
            Output::Writer(w) => (Box::new(SyncIoBridge::new(w)), Finish::Writer),
        };
        let decoder =
            StreamDecoder::new(writer, encoding, size).map_err(|e| CallError::local(format!("zstd decoder: {e}")))?;
        Ok(Self {
            decode: Some(DecodeSink::new(decoder, inline)),
            finish: Some(finish),
            size,
            progress,
            path,
            done: None,
        })
    }

    async fn push(&mut self, chunk: Bytes) -> Result<(), CallError> {
        let Some(decode) = &mut self.decode else { return Ok(()) };
        if !decode.push(chunk).await {
            // The decoder stopped: finishing says why.
            return self.finish().await;
        }
        if let Some(f) = &self.progress {
            f(&Progress::Received { bytes: decode.decoded(), total: Some(self.size) });
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), CallError> {
        let (Some(decode), Some(finish)) = (self.decode.take(), self.finish.take()) else { return Ok(()) };
        let size = self.size;
        let completed = decode
            .finish(move |mut writer, decoded| {
                check_result_size(decoded, size)?;
                writer.flush().map_err(|e| CallError::local(format!("writing the result payload: {e}")))?;
                drop(writer);
                finish.complete()
            })
            .await
            .map_err(|e| CallError::local(format!("result payload: {e}")))
            .and_then(|r| r);
        match completed {
            Ok(output) => {
                self.done = Some(output);
                if let Some(f) = &self.progress {
                    f(&Progress::Received { bytes: size, total: Some(size) });
                }
                Ok(())
            }
            Err(e) => {
                self.remove_part();
                Err(e)
            }
        }
    }

    fn remove_part(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(part_path(path));
        }
    }

    /// What a later attempt writes to.
    fn into_output(mut self) -> Output {
        if self.done.is_none() {
            // Unfinished: stop decoding and leave no partial file.
            self.decode = None;
            self.remove_part();
        }
        self.done.take().or_else(|| self.path.take().map(Output::File)).unwrap_or(Output::Discard)
    }
}

enum Finish {
    Discard,
    Rename { part: PathBuf, path: PathBuf },
    Writer,
}

impl Finish {
    /// Completes the output and hands back what a retry would reuse.
    fn complete(self) -> Result<Output, CallError> {
        match self {
            Self::Discard | Self::Writer => Ok(Output::Discard),
            Self::Rename { part, path } => {
                std::fs::rename(&part, &path).map_err(|e| {
                    CallError::local(format!("cannot move {} to {}: {e}", part.display(), path.display()))
                })?;
                Ok(Output::File(path))
            }
        }
    }
}

fn part_path(path: &std::path::Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".part");
    path.with_file_name(name)
}

/// Calls can be spawned: the future of `send` is `Send` even with a reader
/// payload and a writer output.
#[allow(dead_code, reason = "compile-time check")]
fn send_future_is_send(b: CallBuilder) -> impl std::future::Future<Output = Result<CallOutput, CallError>> + Send {
    b.send()
}
