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
//! What it does not do is hold a message back until a global budget has
//! room: every stream of a connection shares the connection's HTTP/2
//! window, so bytes left unread for a waiting stream stall the streams
//! that were let in — a deadlock (measured: 200 concurrent 1 MiB uploads
//! on one connection took 79 s instead of 1.4 s, 92 failed). What a call
//! buffers is one message at most; the bytes of messages in progress are
//! counted (`aipod_receive_buffer_bytes`).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body::Frame;
use tokio::time::Sleep;
use tonic::{Status, body::Body};

use crate::{error::Error, service::status};

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
const DEFAULT_MAX_MESSAGE: u64 = 2 << 20;

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
}

impl Inbound {
    /// Bounds of `message_max` per message and a call header of at most
    /// `kwargs_max` bytes of kwargs.
    pub(crate) fn new(message_max: u64, kwargs_max: u64) -> crate::error::Result<Arc<Self>> {
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
        }))
    }

    /// The bounds of the flags' defaults.
    pub(crate) fn default() -> Arc<Self> {
        Self::new(DEFAULT_MAX_MESSAGE, aipod::contract::DEFAULT_MAX_KWARGS_BYTES)
            .unwrap_or_else(|_| unreachable!("the defaults fit together"))
    }

    /// Announced bytes of the messages arriving now: at most what the
    /// decoders buffer.
    pub(crate) fn buffered(&self) -> u64 {
        self.in_progress.load(Ordering::Acquire)
    }

    /// Streams without their first message now, all connections.
    pub(crate) fn awaiting(&self) -> usize {
        self.awaiting.load(Ordering::Acquire)
    }

    /// Meters the body of a request to `path` on a connection whose
    /// first-message streams `per_connection` counts; refused when either
    /// count is full.
    pub(crate) fn meter(
        self: &Arc<Self>,
        path: &str,
        body: Body,
        per_connection: &Arc<AtomicUsize>,
    ) -> Result<Metered, Status> {
        let awaiting = Awaiting::enter(&self.awaiting, AWAITING_TOTAL, "on this server")
            .and_then(|total| {
                Ok((total, Awaiting::enter(per_connection, AWAITING_PER_CONNECTION, "on one connection")?))
            })
            .map_err(|why| status(Error::Busy(why)))?;
        let first_max = if path == aipod::contract::CHAOS_PATH { self.header_max } else { SMALL_REQUEST_MAX };
        Ok(Metered {
            inner: body,
            inbound: Arc::clone(self),
            first: Some(First {
                _awaiting: awaiting,
                deadline: Box::pin(tokio::time::sleep(HEADER_TIMEOUT)),
                max: first_max,
            }),
            prefix: [0; 5],
            have: 0,
            left: 0,
            counted: 0,
            header_counted: 0,
            message_deadline: None,
        })
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
    deadline: Pin<Box<Sleep>>,
    max: u64,
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
    message_deadline: Option<Pin<Box<Sleep>>>,
}

impl Metered {
    /// Reads the framing of `data`.
    fn walk(&mut self, data: &Bytes) -> Result<(), Status> {
        let mut pos = 0;
        while pos < data.len() {
            if self.left > 0 {
                let step = usize::try_from(self.left).unwrap_or(usize::MAX).min(data.len() - pos);
                pos += step;
                self.left -= step as u64;
                if self.left == 0 {
                    self.message_done();
                }
                continue;
            }
            let take = (5 - self.have).min(data.len() - pos);
            self.prefix[self.have..self.have + take].copy_from_slice(&data[pos..pos + take]);
            self.have += take;
            pos += take;
            if self.have < 5 {
                continue;
            }
            self.have = 0;
            let len = self.announced();
            self.check(len)?;
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
            self.message_deadline = Some(Box::pin(tokio::time::sleep(allowed)));
        }
        Ok(())
    }

    /// The length the current prefix announces.
    fn announced(&self) -> u64 {
        u64::from(u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]))
    }

    /// Whether a message of `len` bytes may be let in at all.
    fn check(&self, len: u64) -> Result<(), Status> {
        match &self.first {
            Some(first) if len > first.max => Err(status(Error::ResourceExhausted(format!(
                "the first message of this stream announces {len} bytes; a call's header is at most {} bytes \
                 (--max-kwargs-bytes plus {} KiB)",
                first.max,
                HEADER_OVERHEAD >> 10
            )))),
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
        self.first = None;
    }

    /// A deadline that passed, as the stream's error.
    fn late(&mut self, cx: &mut Context<'_>) -> Option<Status> {
        if let Some(first) = &mut self.first
            && first.deadline.as_mut().poll(cx).is_ready()
        {
            return Some(status(Error::TooSlow(format!(
                "no complete call header within {} s of the stream's start",
                HEADER_TIMEOUT.as_secs()
            ))));
        }
        if let Some(deadline) = &mut self.message_deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Some(status(Error::TooSlow(format!(
                "a gRPC message arrived slower than {} KiB/s (after {} s of grace): the stream was ended",
                MIN_RATE >> 10,
                MESSAGE_GRACE.as_secs()
            ))));
        }
        None
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(status) = this.late(cx) {
            return Poll::Ready(Some(Err(status)));
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = this.walk(data)
                {
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.inbound.in_progress.fetch_sub(self.counted, Ordering::AcqRel);
        self.inbound.large_headers.fetch_sub(self.header_counted, Ordering::AcqRel);
    }
}
