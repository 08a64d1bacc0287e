//! Client library and CLI tests over real sockets: retries against a
//! scripted server, the one-message call against the real runtime and a
//! server without it, and the `aipod` CLI against the real runtime binary.

#![allow(unreachable_pub, reason = "test helpers are shared between test modules only")]

mod cli;
mod one_message;
mod retry;
