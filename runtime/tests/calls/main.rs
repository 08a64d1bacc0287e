//! Integration tests of `aipod-runtime` over real loopback sockets: payloads
//! through the real codec, every error path with its status code,
//! heartbeats, cancellation and cleanup, describe, and drain of the real
//! binary under SIGTERM.

#![allow(unreachable_pub, reason = "test support is shared between test modules only")]

mod drain;
mod errors;
mod exec;
mod hostile;
mod inbound;
mod life;
mod memory;
mod support;
