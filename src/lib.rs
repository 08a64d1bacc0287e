//! aipod puts ML models behind one streaming gRPC method.
//!
//! This crate is what clients and the runtime share:
//!
//! - [`proto`]: the generated wire types, tonic client and server for
//!   `proto/ai.proto`, and the descriptor set for reflection;
//! - [`contract`]: metadata keys, health service names, defaults and limits
//!   that both sides must agree on;
//! - [`codec`]: the streaming payload codec — zstd (or identity) encoding from
//!   any reader into chunks, and decoding of pushed chunks into any writer,
//!   never holding a whole payload in memory;
//! - [`cli`]: the `aipod` command-line tool (`call`, `attach`, `describe`, `health`);
//! - [`client`]: the client library — production connection defaults,
//!   streamed payloads, heartbeats, retries that never lose work;
//! - [`telemetry`]: OpenTelemetry trace context in call metadata and the
//!   OTLP exporter the runtime and CLI turn on from `OTEL_*` variables;
//! - [`duration`] and [`size`]: the human syntax for durations (`500ms`,
//!   `1h30m`) and byte sizes (`64MiB`) used by flags and environment variables.
//!
//! Cargo features pick the parts: `codec`, `proto` (implies `codec`),
//! `client` (implies `proto`), `otel` (implies `proto`) and `cli` (implies
//! `client` and `otel`, the default).
//! `contract`, `duration` and `size` are always there; with
//! `default-features = false` the crate builds without gRPC or zstd.

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "codec")]
pub mod codec;
pub mod contract;
pub mod duration;
#[cfg(feature = "proto")]
pub mod proto;
pub mod size;
#[cfg(feature = "otel")]
pub mod telemetry;

#[cfg(feature = "client")]
pub use client::{CallError, Client};
