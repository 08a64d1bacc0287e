//! What a client can make the server buffer before its bytes reach a call:
//! every gRPC request body passes through [`Metered`], which reads the
//! gRPC message prefixes as they arrive. A message larger than
//! `--max-message-bytes` is refused at its prefix, before a byte of it is
//! buffered; a stream's first message (a call's header) must be
//! header-sized and complete within [`HEADER_TIMEOUT`], and large headers
//! arriving at once share [`LARGE_HEADERS_BUDGET`]; every message must
//! arrive at a minimum rate once it has started; and streams still without
//! their first message are counted, per connection and in total, and
//! refused beyond [`AWAITING_PER_CONNECTION`] and [`AWAITING_TOTAL`].
//!
//! A one-message `call` is its first message: the header plus at most
//! `CALL_PAYLOAD_MAX` (256 KiB) of payload, so it is buffered whole, bounded
//! like a large header (by [`LARGE_HEADERS_BUDGET`]).
//!
//! A streamed payload is never buffered a message at a time: after its
//! header, every `data` message of a `chaos` stream is cut, as its bytes
//! arrive, into messages of the bytes at hand (chunk boundaries carry no
//! meaning), so the decoder downstream holds one HTTP/2 frame's worth per
//! call, not a 2 MiB message — 200 calls sending 1 MiB messages at once
//! no longer hold 200 MiB. Only other messages (headers, the few-byte
//! requests of other methods, a message that is not a lone `data` field)
//! are buffered whole, and their bytes in progress are counted
//! (`aipod_receive_buffer_bytes`).
//!
//! What it does not do is hold a message back until a global budget has
//! room: every stream of a connection shares the connection's HTTP/2
//! window, so bytes left unread for a waiting stream stall the streams
//! that were let in — a deadlock (measured: 200 concurrent 1 MiB uploads
//! on one connection took 79 s instead of 1.4 s, 92 failed). Cut payload
//! bytes instead take [`Credit`] in the decode [`Backlog`] as they are
//! read, and a call's stream reads on only while the backlog has room:
//! that credit comes back as decoders consume bytes already read, so it
//! cannot wait on a stream that waits for it.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use tokio::time::{Instant, Sleep};
use tonic::{Status, body::Body};

use crate::{
    engine::backlog::{Backlog, Credit},
    error::Error,
    server::wire::status,
};

/// How long a stream gets from its request headers to the end of its first
/// gRPC message (a call's header).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams one connection may hold without their first message: room for
/// a client that opens hundreds of calls at once on one connection.
const AWAITING_PER_CONNECTION: usize = 256;

/// Streams the server holds without their first message, all connections.
const AWAITING_TOTAL: usize = 1024;

/// What a header needs beyond its kwargs (function, version and call id
/// are each far smaller).
const HEADER_OVERHEAD: u64 = 64 << 10;

/// The largest first message of any other method (describe, attach,
/// health, reflection requests are a few bytes).
const SMALL_REQUEST_MAX: u64 = 64 << 10;

/// First messages up to this size are bounded by the count of streams
/// awaiting theirs ([`AWAITING_TOTAL`] × 16 KiB = 16 MiB); larger ones (a
/// header with big kwargs) also by [`LARGE_HEADERS_BUDGET`].
const SMALL_FIRST_MESSAGE: u64 = 16 << 10;

/// Bytes that first messages larger than [`SMALL_FIRST_MESSAGE`] may have
/// arriving at once, all streams. Beyond it such a header is refused at its
/// prefix with a retryable RESOURCE_EXHAUSTED — refused, not held back:
/// holding a stream's bytes unread would stall its connection's others.
const LARGE_HEADERS_BUDGET: u64 = 32 << 20;

/// A message must arrive within this, plus its size at [`MIN_RATE`],
/// from its prefix on: a slow link, or many calls sharing one, is fine; a
/// client that trickles bytes to keep a message's buffer is not.
const MESSAGE_GRACE: Duration = Duration::from_secs(10);

/// The slowest rate a message may arrive at, in bytes per second.
const MIN_RATE: u64 = 16 << 10;

/// `--max-message-bytes`' default.
#[cfg(test)]
const DEFAULT_MAX_MESSAGE: u64 = 2 << 20;

/// The protobuf key of `Frame.data` (field 2, length-delimited).
const DATA_KEY: u8 = 2 << 3 | 2;

/// A cut `data` message gathers the bytes at hand up to this before it
/// passes on: big enough that decoding works in batches, small enough
/// that a call holds little.
const CUT_MAX: usize = 256 << 10;

/// The most bytes a message's lead can need: the key and a length varint
/// of a message under 4 GiB.
const LEAD_MAX: usize = 6;

/// The bounds, shared by every connection.
#[derive(Debug)]
pub(crate) struct Inbound {
    /// The largest message (`--max-message-bytes`).
    message_max: u64,
    /// The largest first message of a call (a header with its kwargs).
    header_max: u64,
    /// Announced bytes of the messages in progress.
    in_progress: AtomicU64,
    /// Announced bytes of large first messages in progress.
    large_headers: AtomicU64,
    awaiting: Arc<AtomicUsize>,
    /// Payload bytes read and not yet decoded.
    backlog: Arc<Backlog>,
}

impl Inbound {
    /// Bounds of `message_max` per message, a call header of at most
    /// `kwargs_max` bytes of kwargs and `backlog` bytes read and not yet
    /// decoded.
    pub(crate) fn new(message_max: u64, kwargs_max: u64, backlog: u64) -> crate::error::Result<Arc<Self>> {
        let header_max = kwargs_max.saturating_add(HEADER_OVERHEAD);
        if message_max < header_max {
            return Err(Error::Config(format!(
                "--max-message-bytes {message_max} cannot carry a header with --max-kwargs-bytes {kwargs_max}: \
                 raise it to at least {header_max}"
            )));
        }
        Ok(Arc::new(Self {
            message_max,
            header_max,
            in_progress: AtomicU64::new(0),
            large_headers: AtomicU64::new(0),
            awaiting: Arc::default(),
            backlog: Backlog::new(backlog),
        }))
    }

    /// The bounds of the flags' defaults.
    #[cfg(test)]
    pub(crate) fn default() -> Arc<Self> {
        Self::new(
            DEFAULT_MAX_MESSAGE,
            aipod::contract::DEFAULT_MAX_KWARGS_BYTES,
            crate::engine::backlog::DEFAULT_DECODE_BACKLOG,
        )
        .unwrap_or_else(|_| unreachable!("the defaults fit together"))
    }

    /// Announced bytes of the messages arriving now: at most what the
    /// decoders buffer.
    pub(crate) fn buffered(&self) -> u64 {
        self.in_progress.load(Ordering::Acquire)
    }

    /// Payload bytes read and not yet decoded now, all calls.
    pub(crate) fn backlog(&self) -> u64 {
        self.backlog.held()
    }

    /// Streams without their first message now, all connections.
    pub(crate) fn awaiting(&self) -> usize {
        self.awaiting.load(Ordering::Acquire)
    }

    /// Meters the body of a request to `path` on a connection whose
    /// first-message streams `per_connection` counts; refused when either
    /// count is full. A `chaos` stream's body comes with its [`Credit`],
    /// which its call's decoder gives back.
    pub(crate) fn meter(
        self: &Arc<Self>,
        path: &str,
        body: Body,
        per_connection: &Arc<AtomicUsize>,
    ) -> Result<(Metered, Option<Arc<Credit>>), Status> {
        let awaiting = Awaiting::enter(&self.awaiting, AWAITING_TOTAL, "on this server")
            .and_then(|total| {
                Ok((total, Awaiting::enter(per_connection, AWAITING_PER_CONNECTION, "on one connection")?))
            })
            .map_err(|why| status(Error::Busy(why)))?;
        let what = FirstKind::of(path);
        let first_max = match what {
            FirstKind::Header => self.header_max,
            // Header and payload in one message.
            FirstKind::Call => self.header_max.saturating_add(aipod::contract::CALL_PAYLOAD_MAX).min(self.message_max),
            FirstKind::Request => SMALL_REQUEST_MAX,
        };
        let chaos = matches!(what, FirstKind::Header);
        let credit = chaos.then(|| Credit::new(&self.backlog));
        let metered = Metered {
            inner: body,
            inbound: Arc::clone(self),
            first: Some(First { _awaiting: awaiting, deadline: Instant::now() + HEADER_TIMEOUT, max: first_max, what }),
            prefix: [0; 5],
            have: 0,
            left: 0,
            counted: 0,
            header_counted: 0,
            message_deadline: None,
            timer: None,
            reframe: chaos,
            message: Message::Whole,
            out: VecDeque::new(),
            gathered: Vec::new(),
            gathered_len: 0,
            trailers: None,
            ended: false,
            credit: credit.clone(),
            waited_since: None,
        };
        Ok((metered, credit))
    }
}

/// One stream counted as waiting for its first message until dropped.
#[derive(Debug)]
struct Awaiting(Arc<AtomicUsize>);

impl Awaiting {
    fn enter(count: &Arc<AtomicUsize>, max: usize, scope: &str) -> Result<Self, String> {
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).map_err(|_| {
            format!(
                "{max} streams {scope} have not sent their first message yet; retry once they have \
                     (each gets {} s)",
                HEADER_TIMEOUT.as_secs()
            )
        })?;
        Ok(Self(Arc::clone(count)))
    }
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream that has not finished its first message.
struct First {
    _awaiting: (Awaiting, Awaiting),
    deadline: Instant,
    max: u64,
    what: FirstKind,
}

/// What a stream's first message is, for the refusal that names its bound.
#[derive(Debug, Clone, Copy)]
enum FirstKind {
    /// A `chaos` call's header.
    Header,
    /// A one-message `call`: header and payload.
    Call,
    /// The request of any other method.
    Request,
}

impl FirstKind {
    fn of(path: &str) -> Self {
        match path {
            aipod::contract::CHAOS_PATH => Self::Header,
            aipod::contract::CALL_PATH => Self::Call,
            _ => Self::Request,
        }
    }
}

/// A request body whose messages are checked against the [`Inbound`]
/// bounds as they pass.
pub(crate) struct Metered {
    inner: Body,
    inbound: Arc<Inbound>,
    first: Option<First>,
    /// The prefix of the next message, `have` bytes of it so far.
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come.
    left: u64,
    /// The current message's bytes counted in progress.
    counted: u64,
    /// The first message's bytes counted in the large-headers budget.
    header_counted: u64,
    /// When the current message must have arrived.
    message_deadline: Option<Instant>,
    /// Armed at the nearest deadline only when the stream waits for bytes:
    /// a message that arrives whole registers no timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether messages after the first are cut as they arrive (`chaos`).
    reframe: bool,
    /// How the current message passes on.
    message: Message,
    /// What passes on next, in order.
    out: VecDeque<Bytes>,
    /// Bytes of cut `data` messages gathered to pass on as one message.
    gathered: Vec<Bytes>,
    gathered_len: usize,
    /// Request trailers, passed on after the bytes before them.
    trailers: Option<Frame<Bytes>>,
    /// The inner body has ended.
    ended: bool,
    /// A `chaos` stream's share of the decode backlog.
    credit: Option<Arc<Credit>>,
    /// Since when the stream has waited for room in the backlog.
    waited_since: Option<Instant>,
}

/// How the bytes of the current message pass on.
#[derive(Debug, Clone, Copy)]
enum Message {
    /// As they came: the message is buffered whole downstream.
    Whole,
    /// Not yet known: its prefix and the first `have` bytes of its lead
    /// are held until the lead says whether it is a lone `data` field.
    Deciding { lead: [u8; LEAD_MAX], have: usize },
    /// A lone `data` field: its bytes pass on as messages of their own.
    Cut,
}

/// Whether a message of `len` bytes whose lead is `lead` is one `data`
/// field and nothing else: `Some(true)` if so, `Some(false)` if not,
/// `None` while more of the lead is needed.
fn lone_data(lead: &[u8], len: u64) -> Option<bool> {
    let (&key, varint) = lead.split_first()?;
    if key != DATA_KEY {
        return Some(false);
    }
    let mut value = 0_u64;
    for (i, byte) in varint.iter().enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(1 + (i as u64 + 1) + value == len);
        }
    }
    if lead.len() == LEAD_MAX || lead.len() as u64 == len { Some(false) } else { None }
}

/// A gRPC message holding `Frame.data` of the `n` bytes of `pieces`: its
/// framing, then the bytes themselves.
fn data_message(n: usize, pieces: impl IntoIterator<Item = Bytes>, out: &mut VecDeque<Bytes>) {
    let n = n as u64;
    let varint = prost::encoding::encoded_len_varint(n);
    let mut head = BytesMut::with_capacity(6 + varint);
    head.put_u8(0);
    head.put_u32(u32::try_from(1 + varint as u64 + n).unwrap_or(u32::MAX));
    head.put_u8(DATA_KEY);
    prost::encoding::encode_varint(n, &mut head);
    out.push_back(head.freeze());
    out.extend(pieces);
}

impl Metered {
    /// Reads the framing of `data` and queues what passes on: bytes of
    /// messages passed whole as they came, cut `data` messages as new
    /// messages.
    fn walk(&mut self, data: &Bytes) -> Result<(), Status> {
        let mut pos = 0;
        // Where the bytes passing on as they came start, not yet queued.
        let mut run = 0;
        while pos < data.len() {
            if self.left > 0 {
                let step = usize::try_from(self.left).unwrap_or(usize::MAX).min(data.len() - pos);
                match self.message {
                    Message::Whole => pos += step,
                    Message::Cut => {
                        self.queue(data, run, pos);
                        if let Some(credit) = &self.credit {
                            credit.take(step as u64);
                        }
                        self.gather(data.slice(pos..pos + step));
                        pos += step;
                        run = pos;
                    }
                    Message::Deciding { mut lead, mut have } => {
                        self.queue(data, run, pos);
                        lead[have] = data[pos];
                        have += 1;
                        pos += 1;
                        run = pos;
                        self.message = Message::Deciding { lead, have };
                        self.left -= 1;
                        self.decide()?;
                        if self.left == 0 {
                            self.message_done();
                        }
                        continue;
                    }
                }
                self.left -= step as u64;
                if self.left == 0 {
                    self.message_done();
                }
                continue;
            }
            let take = (5 - self.have).min(data.len() - pos);
            let held = self.cutting();
            if held {
                self.queue(data, run, pos);
            }
            self.prefix[self.have..self.have + take].copy_from_slice(&data[pos..pos + take]);
            self.have += take;
            pos += take;
            if held {
                run = pos;
            }
            if self.have < 5 {
                continue;
            }
            self.have = 0;
            let len = self.announced();
            self.check(len)?;
            if held {
                if len == 0 || self.prefix[0] != 0 {
                    // Empty, or compressed: passes whole, prefix and all.
                    self.pass(Bytes::copy_from_slice(&self.prefix));
                } else {
                    self.message = Message::Deciding { lead: [0; LEAD_MAX], have: 0 };
                }
            }
            if len == 0 {
                self.message_done();
                continue;
            }
            if self.first.is_some() && len > SMALL_FIRST_MESSAGE {
                self.inbound
                    .large_headers
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        n.checked_add(len).filter(|after| *after <= LARGE_HEADERS_BUDGET)
                    })
                    .map_err(|_| {
                        status(Error::Busy(format!(
                            "too many large call headers ({len} bytes here) are arriving at once: at most {} MiB \
                             of them; retry shortly",
                            LARGE_HEADERS_BUDGET >> 20
                        )))
                    })?;
                self.header_counted = len;
            }
            self.left = len;
            self.counted = len;
            self.inbound.in_progress.fetch_add(len, Ordering::AcqRel);
            let allowed = MESSAGE_GRACE + Duration::from_secs(len / MIN_RATE);
            self.message_deadline = Some(Instant::now() + allowed);
        }
        self.queue(data, run, pos);
        Ok(())
    }

    /// Queues `data[from..to]`, bytes passing on as they came, if any.
    fn queue(&mut self, data: &Bytes, from: usize, to: usize) {
        if from < to {
            self.pass(if from == 0 && to == data.len() { data.clone() } else { data.slice(from..to) });
        }
    }

    /// Queues `bytes` to pass on, after the cut bytes gathered before them.
    fn pass(&mut self, bytes: Bytes) {
        self.flush();
        self.out.push_back(bytes);
    }

    /// Gathers bytes of a cut `data` message, passing them on as one
    /// message once [`CUT_MAX`] are at hand.
    fn gather(&mut self, mut bytes: Bytes) {
        while !bytes.is_empty() {
            let take = bytes.split_to((CUT_MAX - self.gathered_len).min(bytes.len()));
            self.gathered_len += take.len();
            self.gathered.push(take);
            if self.gathered_len == CUT_MAX {
                self.flush();
            }
        }
    }

    /// Passes on the cut bytes gathered, as one `data` message.
    fn flush(&mut self) {
        if self.gathered_len > 0 {
            data_message(std::mem::take(&mut self.gathered_len), self.gathered.drain(..), &mut self.out);
        }
    }

    /// Whether the message starting now is a candidate for cutting: a
    /// `chaos` message after the header. Its prefix is held, not passed.
    fn cutting(&self) -> bool {
        self.reframe && self.first.is_none()
    }

    /// Settles a [`Message::Deciding`] once its lead says enough (or the
    /// message ended): cut it, or pass it whole with the held bytes first —
    /// only if it is small: after its header a call sends data messages,
    /// and anything else (a second header, a field from a newer client) is
    /// at most [`SMALL_REQUEST_MAX`], so it cannot make the decoder buffer
    /// `--max-message-bytes` per call.
    fn decide(&mut self) -> Result<(), Status> {
        let Message::Deciding { lead, have } = self.message else {
            return Ok(());
        };
        let whole_len = self.announced();
        match lone_data(&lead[..have], whole_len) {
            None if self.left > 0 => {}
            Some(true) => {
                self.message = Message::Cut;
                // Nothing of it is buffered downstream beyond the bytes at hand.
                self.inbound.in_progress.fetch_sub(std::mem::take(&mut self.counted), Ordering::AcqRel);
            }
            Some(false) if whole_len > SMALL_REQUEST_MAX => {
                return Err(status(Error::InvalidArgument(format!(
                    "after its header a call sends data frames; a message of {whole_len} bytes that is not one is \
                     over the {} KiB allowed for anything else",
                    SMALL_REQUEST_MAX >> 10
                ))));
            }
            _ => {
                let held = self.held().unwrap_or_default();
                self.pass(held);
                self.message = Message::Whole;
            }
        }
        Ok(())
    }

    /// The bytes held back (a prefix, and the lead of a message being
    /// decided), as they came.
    fn held(&self) -> Option<Bytes> {
        let lead: &[u8] = match &self.message {
            Message::Deciding { lead, have } => &lead[..*have],
            _ if self.cutting() && self.have > 0 => &[],
            _ => return None,
        };
        let prefix =
            if matches!(self.message, Message::Deciding { .. }) { &self.prefix[..] } else { &self.prefix[..self.have] };
        let mut held = BytesMut::with_capacity(prefix.len() + lead.len());
        held.put_slice(prefix);
        held.put_slice(lead);
        Some(held.freeze())
    }

    /// The length the current prefix announces.
    fn announced(&self) -> u64 {
        u64::from(u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]))
    }

    /// Whether a message of `len` bytes may be let in at all.
    fn check(&self, len: u64) -> Result<(), Status> {
        match &self.first {
            Some(first) if len > first.max => {
                let max = first.max;
                let bound = match first.what {
                    FirstKind::Header => {
                        format!(
                            "a call's header is at most {max} bytes (--max-kwargs-bytes plus {} KiB)",
                            HEADER_OVERHEAD >> 10
                        )
                    }
                    FirstKind::Call => format!(
                        "a one-message call is at most {max} bytes (its header and {} KiB of payload); stream a \
                         larger payload with chaos",
                        aipod::contract::CALL_PAYLOAD_MAX >> 10
                    ),
                    FirstKind::Request => format!("a request of this method is at most {max} bytes"),
                };
                Err(status(Error::ResourceExhausted(format!(
                    "the first message of this stream announces {len} bytes; {bound}"
                ))))
            }
            _ if len > self.inbound.message_max => Err(status(Error::ResourceExhausted(format!(
                "a gRPC message of {len} bytes is over this server's --max-message-bytes of {}; send the payload \
                 in smaller data frames (see describe's max_message_bytes)",
                self.inbound.message_max
            )))),
            _ => Ok(()),
        }
    }

    /// The current message has arrived: it no longer counts, and a first
    /// message ends the stream's wait for its header.
    fn message_done(&mut self) {
        self.inbound.in_progress.fetch_sub(std::mem::take(&mut self.counted), Ordering::AcqRel);
        self.inbound.large_headers.fetch_sub(std::mem::take(&mut self.header_counted), Ordering::AcqRel);
        self.message_deadline = None;
        self.message = Message::Whole;
        self.first = None;
    }

    /// Whether this stream, past its header, must wait for room in the
    /// decode backlog before it reads on (the waker is then registered).
    /// The wait does not count against the message's deadline.
    fn backlog_full(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(credit) = self.credit.as_ref().filter(|_| self.first.is_none()) else {
            return false;
        };
        if credit.poll_room(cx).is_pending() {
            self.waited_since.get_or_insert_with(Instant::now);
            return true;
        }
        if let (Some(since), Some(deadline)) = (self.waited_since.take(), &mut self.message_deadline) {
            *deadline += since.elapsed();
        }
        false
    }

    /// A deadline that passed, as the stream's error; otherwise, with a
    /// deadline ahead, the timer armed at the nearest one, so the stream
    /// is woken by it while it waits for bytes.
    fn late(&mut self, cx: &mut Context<'_>) -> Option<Status> {
        let header = self.first.as_ref().map(|f| f.deadline);
        let Some(at) = header.into_iter().chain(self.message_deadline).min() else {
            self.timer = None;
            return None;
        };
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        if timer.as_mut().poll(cx).is_pending() {
            return None;
        }
        Some(if header == Some(at) {
            status(Error::TooSlow(format!(
                "no complete call header within {} s of the stream's start",
                HEADER_TIMEOUT.as_secs()
            )))
        } else {
            status(Error::TooSlow(format!(
                "a gRPC message arrived slower than {} KiB/s (after {} s of grace): the stream was ended",
                MIN_RATE >> 10,
                MESSAGE_GRACE.as_secs()
            )))
        })
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(bytes) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if let Some(trailers) = this.trailers.take() {
                return Poll::Ready(Some(Ok(trailers)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            if this.backlog_full(cx) {
                if this.gathered_len > 0 {
                    this.flush();
                    continue;
                }
                return Poll::Pending;
            }
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            if polled.is_pending() {
                if this.gathered_len > 0 {
                    // Nothing more at hand: what was gathered goes now.
                    this.flush();
                    continue;
                }
                // Deadlines count only while the stream waits for bytes
                // (a client whose bytes are always at hand is not slow).
                if let Some(status) = this.late(cx) {
                    return Poll::Ready(Some(Err(status)));
                }
            }
            match ready!(polled) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if let Err(status) = this.walk(&data) {
                            return Poll::Ready(Some(Err(status)));
                        }
                    }
                    Err(trailers) => {
                        // After the bytes gathered before them.
                        this.flush();
                        this.trailers = Some(trailers);
                    }
                },
                Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                None => {
                    this.ended = true;
                    if matches!(this.message, Message::Cut) && this.left > 0 {
                        return Poll::Ready(Some(Err(status(Error::DataLoss(format!(
                            "the stream ended {} bytes before the end of its last data message",
                            this.left
                        ))))));
                    }
                    // A message cut short: what was held passes on, so the
                    // decoder sees the truncation.
                    this.flush();
                    this.out.extend(this.held());
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.out.is_empty()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.inbound.in_progress.fetch_sub(self.counted, Ordering::AcqRel);
        self.inbound.large_headers.fetch_sub(self.header_counted, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    /// A gRPC message of `body`.
    fn message(body: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend(u32::try_from(body.len()).expect("as built").to_be_bytes());
        m.extend(body);
        m
    }

    /// `Frame` with `data` of `bytes`, as protobuf.
    fn data_field(bytes: &[u8]) -> Vec<u8> {
        use prost::Message as _;
        aipod::proto::Frame { kind: Some(aipod::proto::frame::Kind::Data(Bytes::copy_from_slice(bytes))) }
            .encode_to_vec()
    }

    /// The bytes of `m` if it is a lone `data` field.
    fn lone(m: &[u8]) -> Option<&[u8]> {
        let (&key, mut rest) = m.split_first()?;
        let len = prost::encoding::decode_varint(&mut rest).ok()?;
        (key == DATA_KEY && rest.len() as u64 == len).then_some(rest)
    }

    /// The messages in gRPC framing `wire`.
    fn messages(wire: &[u8]) -> Vec<Vec<u8>> {
        let mut out = vec![];
        let mut rest = wire;
        while !rest.is_empty() {
            assert!(rest.len() >= 5, "a cut prefix: {rest:?}");
            let len = u32::from_be_bytes(rest[1..5].try_into().expect("as built")) as usize;
            out.push(rest[5..5 + len].to_vec());
            rest = &rest[5 + len..];
        }
        out
    }

    /// What `Metered` passes on for `wire` arriving in pieces of `step`.
    async fn through(path: &str, wire: &[u8], step: usize) -> Result<Vec<u8>, Status> {
        let pieces: Vec<Result<Frame<Bytes>, Status>> =
            wire.chunks(step).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
        let body = Body::new(StreamBody::new(tokio_stream::iter(pieces)));
        let (metered, _credit) = Inbound::default().meter(path, body, &Arc::default())?;
        Ok(metered.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn a_message_at_hand_arms_no_timer_and_a_stream_waiting_for_bytes_does() {
        // A small call's whole first message comes at once: no timer is
        // registered for it (a lock on tokio's timer wheel to arm it and
        // one to drop it, per call).
        let call = message(&[0x0a, 3, 0x0a, 1, b'f']);
        let at_hand = Body::new(StreamBody::new(tokio_stream::iter([Ok::<_, Status>(Frame::data(Bytes::from(call)))])));
        let (mut metered, _) =
            Inbound::default().meter(aipod::contract::CALL_PATH, at_hand, &Arc::default()).expect("room");
        while let Some(frame) = metered.frame().await {
            frame.expect("passes");
        }
        assert!(metered.timer.is_none(), "a timer was armed for a message that came whole");
        // A stream whose header has not come waits with its deadline armed.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(1);
        let waiting = Body::new(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let (mut metered, _) =
            Inbound::default().meter(aipod::contract::CHAOS_PATH, waiting, &Arc::default()).expect("room");
        let pending = tokio::time::timeout(Duration::from_millis(50), metered.frame()).await;
        assert!(pending.is_err(), "nothing to pass on yet");
        let armed = metered.timer.as_ref().map(|t| t.deadline());
        assert_eq!(armed, metered.first.as_ref().map(|f| f.deadline), "the header deadline is armed");
        drop(tx);
    }

    #[tokio::test]
    async fn data_messages_are_cut_as_they_arrive_and_others_pass_whole() {
        let header = [0x0a, 3, 0x0a, 1, b'f'];
        let payload: Vec<u8> = (0..300_u32).map(|i| (i * 7) as u8).collect();
        let odd = [0x12, 2, b'x', b'y', 0x18, 1]; // data and a field more: not a lone data field
        let mut wire = message(&header);
        wire.extend(message(&data_field(&payload)));
        wire.extend(message(&[]));
        wire.extend(message(&odd));
        wire.extend(message(&data_field(&payload[..200])));
        for step in [1, 2, 3, 5, 7, 64, 299, 4096] {
            let out = through(aipod::contract::CHAOS_PATH, &wire, step).await.expect("as built");
            let out = messages(&out);
            assert_eq!(out[0], header, "the header passes whole (step {step})");
            let mut data: Vec<u8> = vec![];
            let mut whole: Vec<Vec<u8>> = vec![];
            for m in &out[1..] {
                match lone(m) {
                    Some(bytes) => {
                        assert!(bytes.len() <= CUT_MAX, "a cut of {} bytes", bytes.len());
                        data.extend(bytes);
                    }
                    None => whole.push(m.clone()),
                }
            }
            assert_eq!(whole, [vec![], odd.to_vec()], "the empty and the odd message pass whole (step {step})");
            assert_eq!(data.len(), payload.len() + 200, "step {step}");
            assert_eq!(data[..300], payload[..], "step {step}");
            assert_eq!(data[300..], payload[..200], "step {step}");
        }
    }

    #[tokio::test]
    async fn a_call_reads_on_only_while_the_decode_backlog_has_room() {
        let payload: Vec<u8> = (0..600_000_u32).map(|i| (i % 253) as u8).collect();
        let mut wire = message(&[0x0a, 0]);
        wire.extend(message(&data_field(&payload)));
        let inbound = Inbound::new(DEFAULT_MAX_MESSAGE, 1 << 10, 100_000).expect("as built");
        let pieces: Vec<Result<Frame<Bytes>, Status>> =
            wire.chunks(16 << 10).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
        let body = Body::new(StreamBody::new(tokio_stream::iter(pieces)));
        let (mut metered, credit) =
            inbound.meter(aipod::contract::CHAOS_PATH, body, &Arc::default()).expect("as built");
        let credit = credit.expect("a chaos stream has credit");
        let mut got = 0;
        // Without a decoder giving credit back, the stream stops just past the budget.
        loop {
            let next = tokio::time::timeout(Duration::from_millis(200), metered.frame()).await;
            let Ok(Some(frame)) = next else { break };
            got += frame.expect("as sent").into_data().map_or(0, |d| d.len());
        }
        let held = inbound.backlog();
        assert!((100_000..100_000 + (16 << 10)).contains(&held), "{held} bytes held of a 100,000 budget");
        assert!(got < 200_000, "{got} bytes passed on");
        // Decoding gives credit back as it consumes: the stream reads to its end.
        let reading = tokio::spawn(async move {
            let mut rest = 0;
            while let Some(frame) = metered.frame().await {
                rest += frame.expect("as sent").into_data().map_or(0, |d| d.len());
            }
            rest
        });
        while !reading.is_finished() {
            credit.give_back(16 << 10);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let rest = reading.await.expect("joined");
        assert!(got + rest > payload.len(), "{} bytes passed on in all", got + rest);
        drop(credit);
        assert_eq!(inbound.backlog(), 0, "the stream's credit went back with it");
    }

    #[tokio::test]
    async fn a_big_data_message_passes_in_cuts_and_what_is_at_hand_passes_at_once() {
        let payload: Vec<u8> = (0..1_000_000_u32).map(|i| (i % 251) as u8).collect();
        let mut wire = message(&[0x0a, 0]);
        wire.extend(message(&data_field(&payload)));
        let out = messages(&through(aipod::contract::CHAOS_PATH, &wire, 16 << 10).await.expect("as built"));
        let cuts: Vec<&[u8]> = out[1..].iter().map(|m| lone(m).expect("a data field")).collect();
        assert!(cuts.len() >= 4 && cuts.iter().all(|c| c.len() <= CUT_MAX), "{} cuts", cuts.len());
        assert_eq!(cuts.concat(), payload);

        // The sender pauses in the middle of a message: what came passes on.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(4);
        let body = Body::new(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let (mut metered, _credit) =
            Inbound::default().meter(aipod::contract::CHAOS_PATH, body, &Arc::default()).expect("as built");
        let half = 7 + 5 + 1 + 3 + 500_000; // the header, the prefix, key and length, half the data
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(&wire[..half])))).await.expect("as built");
        let mut passed = vec![];
        let data_passed = |wire: &[u8]| {
            let mut rest = wire;
            let mut n = 0;
            while rest.len() >= 5 {
                let len = u32::from_be_bytes(rest[1..5].try_into().expect("as built")) as usize;
                let Some(m) = rest.get(5..5 + len) else { break };
                n += lone(m).map_or(0, <[u8]>::len);
                rest = &rest[5 + len..];
            }
            n
        };
        while data_passed(&passed) < 500_000 {
            let frame = tokio::time::timeout(Duration::from_secs(5), metered.frame())
                .await
                .expect("what arrived passes on without the rest")
                .expect("as built")
                .expect("as built");
            passed.extend(frame.into_data().expect("as built"));
        }
        assert_eq!(data_passed(&passed), 500_000);
        drop(tx);
    }

    #[tokio::test]
    async fn after_the_header_only_data_messages_may_be_large() {
        let mut other = vec![0x1a, 0x80, 0x80, 0x04]; // field 3, 64 KiB
        other.extend(vec![7; 64 << 10]);
        let mut wire = message(&[0x0a, 0]);
        wire.extend(message(&other));
        let err = through(aipod::contract::CHAOS_PATH, &wire, 1000).await.expect_err("an error");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("data frames"), "{}", err.message());
        other.truncate(60 << 10);
        other[1..4].copy_from_slice(&[0xfc, 0xdf, 0x03]); // 60 KiB − 4
        let mut wire = message(&[0x0a, 0]);
        wire.extend(message(&other));
        assert_eq!(
            through(aipod::contract::CHAOS_PATH, &wire, 1000).await.expect("as built"),
            wire,
            "small: passes whole"
        );
    }

    #[tokio::test]
    async fn other_methods_pass_as_they_came() {
        let mut wire = message(&data_field(b"abc"));
        wire.extend(message(&data_field(b"defgh")));
        for step in [1, 4, 100] {
            assert_eq!(through("/ai.AI/describe", &wire, step).await.expect("as built"), wire);
        }
    }

    #[tokio::test]
    async fn a_stream_ending_inside_a_cut_message_is_data_loss_and_a_cut_prefix_passes_on() {
        let mut wire = message(&[0x0a, 0]);
        wire.extend(message(&data_field(&[1; 100])));
        let short = &wire[..wire.len() - 10];
        let err = through(aipod::contract::CHAOS_PATH, short, 16).await.expect_err("an error");
        assert_eq!(err.code(), tonic::Code::DataLoss, "{err:?}");
        let mut partial = message(&[0x0a, 0]);
        partial.extend([0, 0, 0]);
        let out = through(aipod::contract::CHAOS_PATH, &partial, 1).await.expect("as built");
        assert_eq!(out, partial, "a prefix cut short reaches the decoder, which reports it");
    }
}
