//! The aipod serving runtime: serves model versions over the streaming
//! `ai.AI/chaos` gRPC method — as the `aipod-runtime` binary, or as a
//! library that serves your own Rust models ([`Runtime`]; implement
//! [`Model`]).
//!
//! The public API is what an embedding program needs: [`Runtime`] (register
//! models, serve), [`Config`] (the flags), the [`Model`] trait and what it
//! gets and returns ([`ModelCall`] with its [`Input`] and [`OutputDir`],
//! [`ModelOutput`] with its [`ResultPayload`]), [`ErrorCode`] and [`Error`]. Everything else is
//! internal. Every module, in the order a call meets them:
//!
//! - the edge: `server` assembles the gRPC server (with `health` and
//!   reflection) and the admin listener; `connection` accepts plaintext or
//!   `tls` connections and closes idle ones; `inbound` meters every request
//!   body (header deadline and size, streams without a header, data
//!   messages cut as they arrive, read on while the decode `backlog` has
//!   room); `auth` checks bearer tokens, which
//!   `reload` rebuilds when their files change; `service` turns frames into
//!   a `request::CallRequest` (`service::header` checks the header before
//!   any payload byte is read) and `event::Event`s into replies, with
//!   `wire` converting between the protocol's types and the runtime's;
//! - the engine: `engine` admits a call (drain, version, function, queue
//!   room, disk, room in `memory` for a small payload); `call` drives it:
//!   `payload` (decoded as it arrives into memory or the `spool`), `queue`
//!   (a run slot per version), the model (an `input`, an `output`
//!   directory), and `result` (the result payload from memory or disk);
//!   `status` holds the call's live status, which `heartbeat`s report
//!   every interval on the reply stream; `retain` keeps calls that outlive
//!   their connection; `drain` stops the server gracefully;
//! - the models: `model` (the trait), `progress` (what a model reports of
//!   its progress), `versions` (the served versions),
//!   `demo` (the built-in model), `exec` (models run by worker processes);
//! - around them: `builder` (the library's entry), `config` (the flags),
//!   `metrics`, `trace` (OpenTelemetry spans), `logging`, `code` (the
//!   status vocabulary) and `error` (the error type).
//!
//! Below the service nothing names tonic or generated types, and imports
//! run one way: no module reaches itself through them
//! (`tests/repo/test_runtime_imports.py`).

mod auth;
mod backlog;
mod builder;
mod call;
mod code;
mod config;
mod connection;
mod demo;
mod drain;
mod engine;
mod error;
mod event;
mod exec;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod heartbeat;
mod inbound;
mod input;
mod logging;
mod memory;
mod metrics;
mod model;
mod output;
mod payload;
mod progress;
mod queue;
mod reload;
mod request;
mod result;
mod retain;
mod server;
mod service;
mod spool;
mod status;
mod tls;
mod trace;
mod versions;
mod wire;

pub use builder::{Runtime, bind};
pub use code::{ErrorCode, ModelError};
pub use config::Config;
pub use error::{Error, Result};
pub use input::Input;
pub use model::{BoxFuture, Kwargs, Model, ModelCall, ModelOutput, Tap, WorkerCounts};
pub use output::{OutputDir, ResultPayload};
pub use progress::Progress;
