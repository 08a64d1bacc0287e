//! Receiving a call's payload: decoded as it arrives into the call's input
//! file (and the model's tap, if any), through the codec's async bridge — in
//! line when small, else on a blocking thread behind a bounded channel, so a
//! slow disk slows the client through HTTP/2 flow control instead of filling
//! memory.

use std::{
    fs::File,
    io::{self, Write},
    path::Path,
    sync::Arc,
    time::Duration,
};

use aipod::codec::{
    DecodeError, Encoding, StreamDecoder,
    bridge::{self, DecodeSink},
};
use bytes::Bytes;
use serde_json::Value;
use tokio_stream::{Stream, StreamExt};

use crate::{
    error::{Error, Result},
    heartbeat::CallStatus,
    model::Tap,
};

/// Decoded pieces (up to 256 KiB each) in flight to a tap thread.
const TAP_DEPTH: usize = 8;

/// What the header says about the payload, and the server's limit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PayloadSpec {
    /// How the data frames are encoded.
    pub(crate) encoding: Encoding,
    /// `Header.payload_size`, when the client sent it.
    pub(crate) declared: Option<u64>,
    /// `--max-payload-bytes`.
    pub(crate) max: u64,
}

impl PayloadSpec {
    /// Refuses a declared size over the limit before any byte is read.
    pub(crate) fn check_declared(&self) -> Result<()> {
        match self.declared {
            Some(n) if n > self.max => Err(too_large(self.max, Some(n))),
            _ => Ok(()),
        }
    }

    fn limit(&self) -> u64 {
        self.declared.map_or(self.max, |n| n.min(self.max))
    }
}

/// A payload that arrived whole.
#[derive(Debug)]
pub(crate) struct Received {
    /// Decoded size in bytes.
    pub(crate) size: u64,
    /// What the model's tap made of it.
    pub(crate) tapped: Option<Value>,
}

/// How patient and how generous receiving is (`--receive-timeout`,
/// `--max-zstd-window`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReceiveLimits {
    /// The longest pause between two frames.
    pub(crate) timeout: Duration,
    /// The largest zstd window, as a power of two.
    pub(crate) window_log: u32,
}

/// Receives the payload `chunks` into `input`, decoding as it goes.
pub(crate) async fn receive<S>(
    mut chunks: S,
    input: &Path,
    spec: PayloadSpec,
    limits: ReceiveLimits,
    tap: Option<Box<dyn Tap>>,
    status: &Arc<CallStatus>,
) -> Result<Received>
where
    S: Stream<Item = Result<Bytes>> + Unpin,
{
    let file = File::create(input).map_err(|e| Error::spool_io("creating the input file", e))?;
    let file = tap.as_ref().is_none_or(|t| t.needs_file()).then_some(file);
    let inline = bridge::inline(spec.declared);
    let tap = tap.map(|t| if inline { TapFeed::Inline(t) } else { TapFeed::thread(t) });
    let decoder = StreamDecoder::new(Tee { file, tap }, spec.encoding, spec.limit())
        .and_then(|d| d.with_window_log_max(limits.window_log))
        .map_err(|e| Error::Internal(format!("zstd decoder: {e}")))?;
    let mut sink = DecodeSink::new(decoder, inline);
    loop {
        // A client that stops sending frees its slot and spool after the
        // receive timeout instead of holding them forever.
        let Ok(next) = tokio::time::timeout(limits.timeout, chunks.next()).await else {
            return Err(Error::ReceiveTimeout(limits.timeout));
        };
        let Some(chunk) = next else { break };
        let chunk = chunk?;
        if chunk.is_empty() {
            continue;
        }
        if !sink.push(chunk).await {
            break; // the decoder failed; finish() reports why
        }
        status.set_received(sink.decoded());
    }
    // The tap thread is joined where decoding ran, off the async runtime.
    let (tapped, size) =
        sink.finish(|tee, size| (tee.tap.map(TapFeed::finish), size)).await.map_err(|e| decode_error(e, &spec))?;
    status.set_received(size);
    if let Some(declared) = spec.declared.filter(|d| *d != size) {
        return Err(Error::DataLoss(format!(
            "payload_size says {declared} bytes but the payload decoded to {size} bytes"
        )));
    }
    Ok(Received { size, tapped })
}

/// Where decoded bytes go: the input file (unless the tap needs none), and
/// the tap if there is one.
struct Tee {
    file: Option<File>,
    tap: Option<TapFeed>,
}

/// Where the tap runs: in line with decoding (small payloads), or on a
/// thread of its own fed by a bounded channel, so that hashing a large
/// payload overlaps its decompression instead of following it.
enum TapFeed {
    Inline(Box<dyn Tap>),
    Thread { tx: std::sync::mpsc::SyncSender<Bytes>, join: std::thread::JoinHandle<Value> },
    Done(Value),
}

impl TapFeed {
    fn thread(tap: Box<dyn Tap>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(TAP_DEPTH);
        // The tap goes to the thread once it exists, so a failed spawn
        // leaves it here.
        let (give, take) = std::sync::mpsc::sync_channel::<Box<dyn Tap>>(1);
        let spawned = std::thread::Builder::new().name("aipod-tap".into()).spawn(move || {
            let Ok(mut tap) = take.recv() else { return Value::Null };
            for bytes in rx {
                tap.write(&bytes);
            }
            tap.finish()
        });
        match spawned {
            Ok(join) => {
                let _ = give.send(tap);
                Self::Thread { tx, join }
            }
            // No thread to be had: tap in line, slower but the same result.
            Err(_) => Self::Inline(tap),
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        match self {
            Self::Inline(tap) => tap.write(bytes),
            // A send fails only if the tap thread panicked; finish says so.
            Self::Thread { tx, .. } => {
                let _ = tx.send(Bytes::copy_from_slice(bytes));
            }
            Self::Done(_) => {}
        }
    }

    /// Waits for a tap thread to end (call it off the async runtime).
    fn settle(self) -> Self {
        match self {
            Self::Thread { tx, join } => {
                drop(tx);
                Self::Done(join.join().unwrap_or_else(|_| Value::String("the model's tap panicked".into())))
            }
            other => other,
        }
    }

    fn finish(self) -> Value {
        match self.settle() {
            Self::Inline(tap) => tap.finish(),
            Self::Done(value) => value,
            Self::Thread { .. } => Value::Null,
        }
    }
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(file) = &mut self.file {
            file.write_all(buf)?;
        }
        if let Some(tap) = &mut self.tap {
            tap.write(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), Write::flush)
    }
}

fn decode_error(e: DecodeError, spec: &PayloadSpec) -> Error {
    match e {
        DecodeError::Corrupt(_) | DecodeError::Truncated { .. } => Error::DataLoss(e.to_string()),
        DecodeError::WindowTooLarge { .. } => Error::ResourceExhausted(format!("{e} (--max-zstd-window)")),
        DecodeError::LimitExceeded { .. } => match spec.declared {
            Some(n) if n <= spec.max => {
                Error::DataLoss(format!("payload decoded to more than the {n} bytes payload_size says"))
            }
            declared => too_large(spec.max, declared),
        },
        DecodeError::Write(e) => Error::spool_io("writing the payload", e),
    }
}

fn too_large(max: u64, declared: Option<u64>) -> Error {
    let what = declared.map_or_else(|| "payload".to_owned(), |n| format!("payload of {n} bytes"));
    Error::ResourceExhausted(format!("{what} exceeds this server's limit of {max} bytes (--max-payload-bytes)"))
}
