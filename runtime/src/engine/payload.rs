//! Receiving a call's payload: decoded as it arrives into memory (small
//! payloads, within the memory budget) or the call's input file (and the
//! model's tap, if any), through the codec's async bridge — in line when
//! small, else on a blocking thread behind a bounded channel, so a slow disk
//! slows the client through HTTP/2 flow control instead of filling memory.

use std::{
    fs::File,
    io::{self, Write},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
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
    engine::backlog::Credit,
    engine::status::CallStatus,
    error::{Error, Result},
    model::Tap,
    model::spool::Entries,
};

/// Decoded pieces (up to 256 KiB each) in flight to a tap thread.
const TAP_DEPTH: usize = 4;

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
    /// The payload when it was kept in memory (empty when the tap needed no
    /// copy); `None` when it is in the input file.
    pub(crate) memory: Option<Bytes>,
}

/// Where an upload's decoded bytes are kept.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Keep<'a> {
    /// In memory: a small payload of a declared size, with room reserved in
    /// the memory budget.
    Memory,
    /// In the call's input file.
    File(&'a Entries),
}

/// How patient and how generous receiving is (`--receive-timeout`,
/// `--min-receive-rate`, `--max-zstd-window`, `--zstd-memory-budget`).
#[derive(Debug, Clone)]
pub(crate) struct ReceiveLimits {
    /// The longest pause between two frames.
    pub(crate) timeout: Duration,
    /// The slowest average rate, bytes as sent per second, after
    /// [`RATE_GRACE`]; 0: none.
    pub(crate) min_rate: u64,
    /// The largest zstd window, as a power of two.
    pub(crate) window_log: u32,
    /// The decoder memory every zstd payload shares.
    pub(crate) zstd: Arc<aipod::codec::WindowBudget>,
}

/// A payload's chunks as they arrive, and the share of the decode backlog
/// their stream took for them, which decoding gives back.
pub(crate) struct Incoming<S> {
    /// The chunks.
    pub(crate) chunks: S,
    /// The stream's credit (none for streams the gate did not meter).
    pub(crate) credit: Option<Arc<Credit>>,
}

impl<S> Incoming<S> {
    /// The same chunks behind `f`.
    pub(crate) fn map<T>(self, f: impl FnOnce(S) -> T) -> Incoming<T> {
        Incoming { chunks: f(self.chunks), credit: self.credit }
    }
}

/// Receives the payload `chunks` into memory or the input file, decoding as
/// it goes.
///
/// A payload that is all here already — one uncompressed chunk of the
/// declared size, and the stream's end (a one-message call's, or a small
/// `chaos` call whose frames came together) — kept in memory and tapped by
/// nothing is the model's input as it arrived: no store, no decoder, no copy.
pub(crate) async fn receive<S>(
    incoming: Incoming<S>,
    keep: Keep<'_>,
    spec: PayloadSpec,
    limits: ReceiveLimits,
    tap: Option<Box<dyn Tap>>,
    status: &Arc<CallStatus>,
) -> Result<Received>
where
    S: Stream<Item = Result<Bytes>> + Unpin,
{
    let Incoming { chunks, credit } = incoming;
    let mut chunks = chunks.fuse();
    let mut taken = Vec::new();
    if tap.is_none()
        && matches!(keep, Keep::Memory)
        && spec.encoding == Encoding::Identity
        && let Some(whole) = whole_now(&mut chunks, spec, &mut taken)
    {
        let size = whole.len() as u64;
        if let Some(credit) = &credit {
            credit.give_back(size); // consumed: it is the input now
        }
        status.set_received(size);
        return Ok(Received { size, tapped: None, memory: Some(whole) });
    }
    // What the look took goes first. Boxed: a call's future holds only
    // what its payload needs (several KiB of decoding state, for payloads
    // that are not all here at once).
    let chunks = Incoming { chunks: tokio_stream::iter(taken).chain(chunks), credit };
    let upload = Upload::start(keep, spec, limits, tap)?;
    match Box::pin(upload.piece(chunks, 0, None, status, None)).await? {
        Step::Done(received) => Ok(received),
        Step::Interrupted(_, why) => Err(why),
    }
}

/// The payload when it is all here now: the stream's one chunk, of the
/// declared size, and its end, both ready without waiting. Otherwise
/// `None`, with whatever the look took from `chunks` in `taken`, in order.
fn whole_now<S>(chunks: &mut S, spec: PayloadSpec, taken: &mut Vec<Result<Bytes>>) -> Option<Bytes>
where
    S: Stream<Item = Result<Bytes>> + Unpin,
{
    let declared = spec.declared.filter(|&n| n > 0 && n <= spec.max)?;
    // Nothing to wake: a stream that is not ready is read the usual way
    // next, which registers its own waker.
    let mut cx = Context::from_waker(Waker::noop());
    let Poll::Ready(Some(first)) = Pin::new(&mut *chunks).poll_next(&mut cx) else { return None };
    let chunk = match first {
        Ok(chunk) if chunk.len() as u64 == declared => chunk,
        other => {
            taken.push(other);
            return None;
        }
    };
    match Pin::new(&mut *chunks).poll_next(&mut cx) {
        Poll::Ready(None) => Some(chunk),
        Poll::Ready(Some(next)) => {
            taken.extend([Ok(chunk), next]);
            None
        }
        Poll::Pending => {
            taken.push(Ok(chunk));
            None
        }
    }
}

/// A payload being received, in one piece or — for a retained call whose
/// upload broke off — in several: the input file and the model's tap stay
/// open between pieces, and `held` counts the decoded bytes kept.
pub(crate) struct Upload {
    tee: Tee,
    held: u64,
    spec: PayloadSpec,
    limits: ReceiveLimits,
    inline: bool,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload").field("held", &self.held).finish_non_exhaustive()
    }
}

/// How one piece of an upload ended.
#[derive(Debug)]
pub(crate) enum Step {
    /// The payload is complete and checked.
    Done(Received),
    /// The sender went away or stalled (the error says which), or the piece
    /// was stopped: what arrived is kept and the upload can go on.
    Interrupted(Upload, Error),
}

impl Upload {
    /// Readies the store (creating the input file when the payload goes to
    /// disk) and the tap; nothing is read yet.
    pub(crate) fn start(
        keep: Keep<'_>,
        spec: PayloadSpec,
        limits: ReceiveLimits,
        tap: Option<Box<dyn Tap>>,
    ) -> Result<Self> {
        let store = match keep {
            // The tap consumes everything: nothing to keep.
            _ if tap.as_ref().is_some_and(|t| !t.needs_file()) => Store::Nothing,
            Keep::Memory => Store::Memory(Vec::with_capacity(
                usize::try_from(spec.declared.unwrap_or(0).min(crate::engine::memory::MEMORY_PAYLOAD_MAX)).unwrap_or(0),
            )),
            Keep::File(entries) => {
                Store::File(entries.create_input().map_err(|e| Error::spool_io("creating the input file", e))?)
            }
        };
        let inline = bridge::inline(spec.declared);
        let tap = tap.map(|t| if inline { TapFeed::Inline(t) } else { TapFeed::thread(t) });
        Ok(Self { tee: Tee { store, tap, skip: 0 }, held: 0, spec, limits, inline })
    }

    /// Decoded bytes written so far: the offset an upload resumes from.
    pub(crate) fn held(&self) -> u64 {
        self.held
    }

    /// Receives the payload from uncompressed offset `from` (at most
    /// [`Upload::held`]; bytes before `held` are decoded and skipped) to
    /// its end, encoded as `encoding` (default: as the header said). With `stop` (a retained call), a client that goes away or
    /// stalls — or `stop` firing — interrupts the piece instead of failing
    /// the upload; decoding errors and size mismatches always fail it.
    pub(crate) async fn piece<S>(
        mut self,
        incoming: Incoming<S>,
        from: u64,
        encoding: Option<Encoding>,
        status: &Arc<CallStatus>,
        stop: Option<&tokio_util::sync::CancellationToken>,
    ) -> Result<Step>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        let from = from.min(self.held);
        self.tee.skip = self.held - from;
        let encoding = encoding.unwrap_or(self.spec.encoding);
        let decoder = StreamDecoder::new(self.tee, encoding, self.spec.limit().saturating_sub(from))
            .and_then(|d| d.with_window_log_max(self.limits.window_log))
            .map_err(|e| Error::Internal(format!("zstd decoder: {e}")))?
            .with_window_budget(Arc::clone(&self.limits.zstd));
        let (spec, limits, inline, held) = (self.spec, self.limits, self.inline, self.held);
        let Incoming { mut chunks, credit } = incoming;
        let mut sink = DecodeSink::new(decoder, inline);
        if let Some(credit) = credit {
            sink = sink.on_consumed(Arc::new(move |n| credit.give_back(n as u64)));
        }
        let resumable = stop.is_some();
        // No token made for a call that cannot be stopped (most calls).
        let stopped = async {
            match stop {
                Some(stop) => stop.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stopped);
        let started = tokio::time::Instant::now();
        let mut wire: u64 = 0;
        let interruption = loop {
            // A client that stops sending frees its slot and spool after the
            // receive timeout instead of holding them forever; one that
            // trickles, once its average falls below the minimum rate.
            let paused = tokio::time::Instant::now() + limits.timeout;
            let (wait_until, too_slow) = match rate_deadline(started, wire, limits.min_rate, limits.timeout) {
                Some(at) if at < paused => (at, true),
                _ => (paused, false),
            };
            let behind = sink.behind();
            let next = tokio::select! {
                () = &mut stopped => break Some(Error::Cancelled),
                // Chunks read but waiting on a batch hold decode backlog the
                // sender may need before it sends the next: decode them now.
                () = sink.catch_up(), if behind => continue,
                next = tokio::time::timeout_at(wait_until, chunks.next()) => next,
            };
            let Ok(next) = next else {
                break Some(if too_slow {
                    too_slow_error(limits.min_rate, wire)
                } else {
                    Error::ReceiveTimeout(limits.timeout)
                });
            };
            let chunk = match next {
                None => break None,
                Some(Ok(chunk)) => chunk,
                Some(Err(e @ Error::Cancelled)) => break Some(e),
                Some(Err(e)) => return Err(e),
            };
            if chunk.is_empty() {
                continue;
            }
            wire += chunk.len() as u64;
            if !sink.push(chunk).await {
                break None; // the decoder failed; finish() reports why
            }
            status.set_received(from + sink.decoded());
        };
        if let Some(why) = interruption {
            if !resumable {
                return Err(why);
            }
            let (tee, decoded) = sink.interrupt(|tee, n| (tee, n)).await.map_err(|e| decode_error(e, &spec))?;
            let held = held.max(from + decoded);
            status.set_received(held);
            return Ok(Step::Interrupted(Self { tee, held, spec, limits, inline }, why));
        }
        // A resumable upload that ends short of its declared size was cut
        // (a cancelling client resets the stream, which can read as its
        // end): what arrived is kept for a resume.
        let short = move |decoded: u64| resumable && spec.declared.is_some_and(|total| from + decoded < total);
        let close = move |d: StreamDecoder<Tee>| if short(d.decoded()) { d.interrupt() } else { d.finish() };
        // The tap thread is joined where decoding ran, off the async runtime.
        let ended = sink
            .end_with(close, move |tee, size| {
                if short(size) {
                    (Err(tee), size)
                } else {
                    let memory = match tee.store {
                        Store::Memory(bytes) => Some(Bytes::from(bytes)),
                        Store::Nothing => Some(Bytes::new()),
                        Store::File(_) => None,
                    };
                    (Ok((tee.tap.map(TapFeed::finish), memory)), size)
                }
            })
            .await
            .map_err(|e| decode_error(e, &spec))?;
        let ((tapped, memory), decoded) = match ended {
            (Ok(kept), decoded) => (kept, decoded),
            (Err(tee), decoded) => {
                let held = held.max(from + decoded);
                status.set_received(held);
                return Ok(Step::Interrupted(Self { tee, held, spec, limits, inline }, Error::Cancelled));
            }
        };
        let size = from + decoded;
        status.set_received(size);
        if size < held {
            return Err(Error::DataLoss(format!(
                "the resumed payload ended at byte {size}, before the {held} bytes the server already held"
            )));
        }
        if let Some(declared) = spec.declared.filter(|d| *d != size) {
            return Err(Error::DataLoss(format!(
                "payload_size says {declared} bytes but the payload decoded to {size} bytes"
            )));
        }
        Ok(Step::Done(Received { size, tapped, memory }))
    }
}

/// Where decoded bytes go: the store, and the tap if there is one — after
/// `skip` bytes a resumed upload sends again, which both already have.
struct Tee {
    store: Store,
    tap: Option<TapFeed>,
    skip: u64,
}

/// Where decoded bytes are kept for the model's input.
enum Store {
    /// The call's input file.
    File(File),
    /// Memory, up to the declared size (the decoder's limit).
    Memory(Vec<u8>),
    /// Nowhere: the tap consumes everything.
    Nothing,
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
    fn write(&mut self, whole: &[u8]) -> io::Result<usize> {
        let skipped = usize::try_from(self.skip).unwrap_or(usize::MAX).min(whole.len());
        self.skip -= skipped as u64;
        let buf = &whole[skipped..];
        if buf.is_empty() {
            return Ok(whole.len());
        }
        match &mut self.store {
            Store::File(file) => file.write_all(buf)?,
            Store::Memory(bytes) => bytes.extend_from_slice(buf),
            Store::Nothing => {}
        }
        if let Some(tap) = &mut self.tap {
            tap.write(buf);
        }
        Ok(whole.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.store {
            Store::File(file) => file.flush(),
            Store::Memory(_) | Store::Nothing => Ok(()),
        }
    }
}

/// How long an upload may run before `--min-receive-rate` applies (or
/// twice `--receive-timeout`, when shorter).
const RATE_GRACE: Duration = Duration::from_secs(60);

/// When an upload that started at `started` and has sent `wire` bytes
/// falls below `rate` bytes per second on average, after its grace (the
/// shorter of [`RATE_GRACE`] and twice `pause`, the receive timeout, so a
/// stall is reported as one); `None` without a minimum.
fn rate_deadline(started: tokio::time::Instant, wire: u64, rate: u64, pause: Duration) -> Option<tokio::time::Instant> {
    (rate > 0).then(|| started + RATE_GRACE.min(pause * 2) + Duration::from_secs_f64(wire as f64 / rate as f64))
}

fn too_slow_error(rate: u64, wire: u64) -> Error {
    Error::TooSlow(format!(
        "the upload averaged less than --min-receive-rate ({rate} bytes/s, after a grace of a minute or twice \
         --receive-timeout; {wire} bytes arrived): the call was ended and its upload discarded"
    ))
}

fn decode_error(e: DecodeError, spec: &PayloadSpec) -> Error {
    match e {
        DecodeError::Corrupt(_) | DecodeError::Truncated { .. } => Error::DataLoss(e.to_string()),
        DecodeError::WindowTooLarge { .. } => Error::ResourceExhausted(format!("{e} (--max-zstd-window)")),
        DecodeError::BudgetFull { .. } => Error::Busy(format!("{e} (--zstd-memory-budget)")),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ReceiveLimits {
        ReceiveLimits {
            timeout: Duration::from_secs(5),
            min_rate: 0,
            window_log: 27,
            zstd: aipod::codec::WindowBudget::new(64 << 20),
        }
    }

    fn spec(declared: u64) -> PayloadSpec {
        PayloadSpec { encoding: Encoding::Identity, declared: Some(declared), max: 1 << 20 }
    }

    async fn received<S>(chunks: S, spec: PayloadSpec) -> Result<Received>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        let status = CallStatus::new();
        let got = receive(Incoming { chunks, credit: None }, Keep::Memory, spec, limits(), None, &status).await;
        if let Ok(r) = &got {
            assert_eq!(status.received(), r.size, "the status counts what arrived");
        }
        got
    }

    #[tokio::test]
    async fn a_payload_all_here_is_the_input_as_it_arrived() {
        let bytes = Bytes::from(vec![5u8; 1024]);
        let got = received(tokio_stream::iter([Ok(bytes.clone())]), spec(1024)).await.expect("received");
        let memory = got.memory.expect("in memory");
        assert_eq!((got.size, memory.len()), (1024, 1024));
        assert_eq!(memory.as_ptr(), bytes.as_ptr(), "the chunk itself: no store, no decoder, no copy");
    }

    #[tokio::test]
    async fn anything_else_goes_through_the_decoder_with_what_the_look_took() {
        let bytes = Bytes::from(vec![5u8; 1024]);
        // Two chunks making the declared size: decoded into a store of its own.
        let halves = [Ok(bytes.slice(..512)), Ok(bytes.slice(512..))];
        let got = received(tokio_stream::iter(halves), spec(1024)).await.expect("received");
        let memory = got.memory.expect("in memory");
        assert_eq!(memory, bytes);
        assert_ne!(memory.as_ptr(), bytes.as_ptr(), "decoded into a store");
        // More than declared: the chunk the look took, then the next, refused.
        let more = [Ok(bytes.clone()), Ok(Bytes::from_static(b"x"))];
        assert!(matches!(received(tokio_stream::iter(more), spec(1024)).await, Err(Error::DataLoss(_))));
        // Less than declared, and an error from the stream, as before.
        let short = [Ok(bytes.slice(..100))];
        assert!(matches!(received(tokio_stream::iter(short), spec(1024)).await, Err(Error::DataLoss(_))));
        let broken = [Err(Error::Cancelled)];
        assert!(matches!(received(tokio_stream::iter(broken), spec(1024)).await, Err(Error::Cancelled)));
        // A chunk that arrives later (the stream not ready at the look).
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(Ok(Bytes::from(vec![5u8; 1024]))).await.expect("sent");
        });
        let got = received(tokio_stream::wrappers::ReceiverStream::new(rx), spec(1024)).await.expect("received");
        later.await.expect("sender");
        assert_eq!(got.memory.expect("in memory"), bytes);
    }
}
