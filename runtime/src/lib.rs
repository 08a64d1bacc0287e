//! The aipod serving runtime: serves model versions over the streaming
//! `ai.AI/chaos` gRPC method — as the `aipod-runtime` binary, or as a
//! library that serves your own Rust models ([`Runtime`]; implement
//! [`Model`]).
//!
//! The public API is what an embedding program needs: [`Runtime`] (register
//! models, serve), [`Config`] (the flags), the [`Model`] trait and what it
//! gets and returns ([`ModelCall`] with its [`Input`] and [`OutputDir`],
//! [`ModelOutput`] with its [`ResultPayload`]), [`ErrorCode`] and [`Error`]. Everything else is
//! internal. A call flows in one direction: `service` (the gRPC edge: frames
//! and the header in, replies out; `service::header` checks the header
//! before any payload byte is read) → `engine` (admission: drain, version,
//! function, queue room, disk, room in `memory` for a small payload) →
//! `call`, which drives `payload` (decoded as it arrives into memory or the
//! `spool`), `queue` (a run slot per version), the model (which sees an
//! `input` and an `output` directory), and `result` (the result payload from
//! memory or disk), with `heartbeat`s throughout. Below the service nothing names tonic or generated types:
//! the engine speaks `request::CallRequest` in and `event::Event` out.
//!
//! Around it: `server` assembles the gRPC server with `health` and
//! reflection and the admin listener with `metrics`, `drain` stops it
//! gracefully, `config` holds the flags,
//! `versions` the served models, `demo` the built-in demo model, `exec`
//! models run by worker processes, `code` the status vocabulary and `error`
//! the error type.

mod auth;
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
mod queue;
mod reload;
mod request;
mod result;
mod retain;
mod server;
mod service;
mod spool;
mod tls;
mod trace;
mod versions;

pub use builder::{Runtime, bind};
pub use code::ErrorCode;
pub use config::Config;
pub use error::{Error, Result};
pub use input::Input;
pub use model::{BoxFuture, Kwargs, Model, ModelCall, ModelError, ModelOutput, Progress, Tap, WorkerCounts};
pub use output::{OutputDir, ResultPayload};
