//! One call: a builder for what to send ([`CallBuilder`]), and the attempt
//! loop that streams the payload (read and compressed as it is sent),
//! follows heartbeats, writes the result payload as it arrives, and retries
//! refusals. The face holds the public types; the work is in
//! `builder` (what to send and where the result goes), `attempt` (the
//! retry loops and one attempt), `upload` (the payload source and its
//! frames) and `replies` (heartbeats, the result and the result payload's
//! sink).

use std::{io::Read, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    client::error::CallError,
    proto::{self},
};

mod attempt;
mod builder;
mod replies;
mod upload;

pub use builder::CallBuilder;

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

/// A call id no one can guess: 128 random bits from the operating system,
/// as 32 hex digits (what retained calls need).
pub fn new_call_id() -> String {
    let bits = random_bits();
    hex_id([(bits >> 64) as u64, bits as u64])
}

/// The id of a call that is not retained, made without a system call: the
/// process's 128 random bits (read once) and a count run through an odd
/// multiplier, as 32 hex digits — unique within the process, new on every
/// call, and what both sides' logs and traces name the call by. Not a key:
/// only a retained call can be attached to, and its id is a
/// [`new_call_id`].
pub(super) fn call_label() -> String {
    static KEY: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let key = *KEY.get_or_init(random_bits);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Odd, so n -> n * M is a bijection: no two counts give one id.
    hex_id([(key >> 64) as u64, n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ key as u64])
}

/// 128 bits from /dev/urandom, or without it SipHash of the time under the
/// process's random keys.
fn random_bits() -> u128 {
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_ok() {
        return u128::from_be_bytes(bytes);
    }
    use std::hash::{BuildHasher, RandomState};
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let a = RandomState::new().hash_one(nanos);
    let b = RandomState::new().hash_one((nanos, std::process::id()));
    u128::from(a) << 64 | u128::from(b)
}

/// `words` as 16 hex digits each.
fn hex_id(words: [u64; 2]) -> String {
    let mut id = String::with_capacity(32);
    for word in words {
        for shift in (0..16).rev() {
            id.push(char::from(b"0123456789abcdef"[(word >> (shift * 4)) as usize & 0xf]));
        }
    }
    id
}

/// Calls can be spawned: the future of `send` is `Send` even with a reader
/// payload and a writer output.
#[allow(dead_code, reason = "compile-time check")]
fn send_future_is_send(b: CallBuilder) -> impl std::future::Future<Output = Result<CallOutput, CallError>> + Send {
    b.send()
}
