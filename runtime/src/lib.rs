//! The aipod serving runtime: serves model versions over the streaming
//! `ai.AI/chaos` gRPC method — as the `aipod-runtime` binary, or as a
//! library that serves your own Rust models ([`Runtime`]; implement
//! [`Model`]).
//!
//! The public API is what an embedding program needs: [`Runtime`] (register
//! models, serve), [`Config`] (the flags), the [`Model`] trait and what it
//! gets and returns ([`ModelCall`] with its [`Input`] and [`OutputDir`],
//! [`ModelOutput`] with its [`ResultPayload`]), [`ErrorCode`] and [`Error`]. Everything else is
//! internal. The crate is five folders, each with a face module that maps
//! its files, and imports run one way — from the edge down to the model
//! API; no module reaches itself through them
//! (`tests/repo/test_runtime_imports.py`):
//!
//! - `server` — the network edge, the only place tonic lives: the gRPC
//!   server, connections, TLS, tokens, request metering, the service and
//!   the protocol's types;
//! - `engine` — a call's life: admission, payload, queue, run, result,
//!   heartbeats, retained calls, drain;
//! - `observe` — metrics, traces and logs;
//! - `versions` — the served model versions and what serves them: the
//!   built-in demo, `exec:` worker processes, a run queue per version;
//! - `model` — the model API: the trait, a call's input and output
//!   directory, progress, and the spool they live in.
//!
//! Beside them: `builder` (the library's entry), `config` (the flags),
//! `code` (the vocabulary every layer shares: status codes, a model's
//! error, a call's phases) and `error` (the error type).

mod builder;
mod code;
mod config;
mod engine;
mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod model;
mod observe;
mod server;
mod versions;

pub use builder::{Runtime, bind, tune_allocator};
pub use code::{ErrorCode, ModelError};
pub use config::Config;
pub use error::{Error, Result};
pub use model::input::Input;
pub use model::output::{OutputDir, ResultPayload};
pub use model::progress::Progress;
pub use model::{BoxFuture, Kwargs, Model, ModelCall, ModelOutput, Tap, WorkerCounts};
