//! What a model is to the engine: a set of functions that take a call (kwargs,
//! the input, an output directory, progress and cancellation) and return a
//! JSON result and maybe a result payload. No gRPC types appear here.
//!
//! The folder is the model API: `input` (a call's payload, in memory or
//! in the spool), `output` (the output directory and the result payload),
//! `progress` (what a model reports into heartbeats) and `spool` (the
//! directories calls live in). It imports nothing above it.

pub(crate) mod input;
pub(crate) mod output;
pub(crate) mod progress;
pub(crate) mod spool;

use std::{future::Future, pin::Pin};

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::{
    code::ModelError,
    model::input::Input,
    model::output::{OutputDir, ResultPayload},
    model::progress::Progress,
};

/// A boxed, sendable future, as models return them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The largest result JSON: what fits in one reply message (8 MiB, what
/// the aipod clients accept) with room for its framing.
pub(crate) const MAX_RESULT_JSON: usize = aipod::contract::DEFAULT_MAX_MESSAGE_BYTES - (64 << 10);

/// A function's keyword arguments: always a JSON object.
pub type Kwargs = Map<String, Value>;

/// A served model version's implementation.
pub trait Model: Send + Sync + 'static {
    /// The functions this model serves, sorted.
    fn functions(&self) -> Vec<String>;

    /// Whether the model serves `func`; checked for every call at admission.
    fn serves(&self, func: &str) -> bool {
        self.functions().iter().any(|f| f == func)
    }

    /// Starts what the model needs (worker processes, weights) and resolves
    /// once it is ready, or with why it cannot be. The server listens (and
    /// reports NOT_SERVING) meanwhile; a failure stops the runtime.
    fn start(&self) -> BoxFuture<Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether the model is loaded and can take calls. Readiness reports
    /// NOT_SERVING until every version says yes.
    fn is_ready(&self) -> bool {
        true
    }

    /// An optional consumer of the payload *while it streams in*, for
    /// functions that can start before the upload ends (hashing, parsing).
    /// Whatever it returns reaches [`ModelCall::tapped`]. The payload also
    /// reaches [`ModelCall::input`] either way, unless the tap says it
    /// needs no copy ([`Tap::needs_file`]).
    fn tap(&self, _func: &str, _kwargs: &Kwargs) -> Option<Box<dyn Tap>> {
        None
    }

    /// Runs one call. Long work must watch `call.cancel` and report progress.
    fn call(&self, call: ModelCall) -> BoxFuture<Result<ModelOutput, ModelError>>;

    /// Releases the model's resources when the server stops (after drain).
    fn shutdown(&self) -> BoxFuture<()> {
        Box::pin(async {})
    }

    /// For models served by worker processes: how many are in each state,
    /// for the `aipod_workers` metrics. `None` (the default) for in-process
    /// models.
    fn workers(&self) -> Option<WorkerCounts> {
        None
    }
}

/// A snapshot of a model's worker processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounts {
    /// Started and idle, ready for a call.
    pub ready: usize,
    /// Starting or restarting: not ready yet.
    pub starting: usize,
    /// Running a call.
    pub busy: usize,
    /// Restarts after a worker died, since the server started.
    pub restarts: u64,
}

/// Sees every decoded payload byte, in order, as the payload arrives.
pub trait Tap: Send {
    /// The next decoded bytes.
    fn write(&mut self, bytes: &[u8]);
    /// The payload is complete; returns what the model wants to know of it.
    fn finish(self: Box<Self>) -> Value;

    /// Whether the function also needs the payload in [`ModelCall::input`]
    /// (in memory or as a file). A tap that consumes everything itself says
    /// no: the payload is then neither kept nor spooled, and the input is
    /// empty.
    fn needs_file(&self) -> bool {
        true
    }
}

/// Everything a model gets for one call.
#[derive(Debug)]
pub struct ModelCall {
    /// The call id, for the model's logs.
    pub call_id: String,
    /// The function to run.
    pub func: String,
    /// Its keyword arguments.
    pub kwargs: Kwargs,
    /// The decoded payload: in memory when small, else on disk, with a path
    /// on demand (empty when there was none, or when the function's [`Tap`]
    /// said it needs no copy).
    pub input: Input,
    /// The payload's size in bytes.
    pub input_size: u64,
    /// What the function's [`Tap`] returned, when it had one.
    pub tapped: Option<Value>,
    /// Where the model may write a result payload file. It does not exist
    /// until the model creates it ([`OutputDir::create`]): most calls write
    /// none. Removed after the call.
    pub output_dir: OutputDir,
    /// Reports progress to the client's heartbeats.
    pub progress: Progress,
    /// Cancelled when the client goes away or the call is abandoned.
    pub cancel: CancellationToken,
    /// The W3C `traceparent` of the call's `aipod.run` span (or, with the
    /// runtime's tracing off, the caller's own), for a model that continues
    /// the trace; `None` when the call is not traced.
    pub traceparent: Option<String>,
}

/// A model's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOutput {
    /// The JSON result.
    pub json: Value,
    /// A result payload: bytes in memory, or a file which must lie inside
    /// the call's output directory or be the call's input file itself.
    pub payload: Option<ResultPayload>,
}

impl ModelOutput {
    /// A JSON result without a result payload.
    pub fn json(json: Value) -> Self {
        Self { json, payload: None }
    }

    /// A JSON result with a result payload (a `PathBuf`, `Bytes` or
    /// `Vec<u8>`).
    pub fn with_payload(json: Value, payload: impl Into<ResultPayload>) -> Self {
        Self { json, payload: Some(payload.into()) }
    }
}
