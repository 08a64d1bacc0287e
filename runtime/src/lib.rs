//! The aipod serving runtime: serves model versions over the streaming
//! `ai.AI/chaos` gRPC method.
//!
//! A call's life, each step in its own module:
//! [`header`] (checked before any payload byte is read) →
//! [`engine`] (admission: drain, version, function, queue room, disk) →
//! [`payload`] (decoded as it arrives into the [`spool`]) →
//! [`queue`] (a run slot per version) → [`model`] (the function runs) →
//! [`result`] (JSON, then the result payload from disk); [`call`] drives it
//! with [`heartbeat`]s throughout.
//!
//! Around it: [`service`] is the gRPC edge, [`server`] assembles the server
//! with [`health`] and reflection, [`drain`] stops it gracefully, [`config`]
//! holds the flags, [`versions`] the served models, [`demo`] the built-in
//! demo model, [`exec`] models run by worker processes, [`code`] the status vocabulary and [`error`] the error type.

pub mod call;
pub mod code;
pub mod config;
pub mod demo;
pub mod drain;
pub mod engine;
pub mod error;
pub mod exec;
pub mod header;
pub mod health;
pub mod heartbeat;
pub mod logging;
pub mod model;
pub mod payload;
pub mod queue;
pub mod result;
pub mod server;
pub mod service;
pub mod spool;
pub mod versions;

pub use config::Config;
pub use error::{Error, Result};
