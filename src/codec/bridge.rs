//! The one bridge between the synchronous codec and async code, used by the
//! client (upload, result payload) and the runtime (payload, result payload).
//!
//! Small payloads (a known size up to [`INLINE_MAX`]) are coded in line on
//! the async task: a thread hand-off would cost more than the work. Anything
//! else is coded one chunk at a time on tokio's blocking pool, with one chunk
//! of work in flight while the async side waits on the network: coding
//! overlaps transfer, memory stays at a chunk or two, and no thread is held
//! while a slow (or hostile) peer sends or reads nothing, so idle uploads
//! cannot use up the blocking pool.

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::{ChunkEncoder, DecodeError, Encoding, StreamDecoder};

/// Payloads of a known size up to this are coded on the async task.
pub const INLINE_MAX: u64 = 256 << 10;

/// Whether a payload of `size` bytes (when known) is coded in line.
pub fn inline(size: Option<u64>) -> bool {
    size.is_some_and(|n| n <= INLINE_MAX)
}

type Encoder = ChunkEncoder<Box<dyn Read + Send>>;
type NextChunk = JoinHandle<(Encoder, io::Result<Option<Bytes>>)>;

/// Encoded chunks of a payload, produced as they are asked for.
pub struct EncodedStream {
    kind: EncodeKind,
    read: Arc<AtomicU64>,
}

enum EncodeKind {
    /// A small payload, encoded whole when the stream was made.
    Ready(VecDeque<Bytes>, Option<io::Error>),
    /// The next chunk being read and encoded on the blocking pool (one
    /// ahead of the consumer); `None` once the payload is complete.
    Pooled(Option<NextChunk>),
}

impl EncodedStream {
    /// Encodes `source` (of `size` bytes, when known) with `encoding` at
    /// zstd `level` into chunks of at most `chunk_size` bytes: in line for
    /// small payloads, else a chunk at a time on the blocking pool, one
    /// chunk ahead of the consumer (work that stops when it is dropped).
    pub fn new<R: Read + Send + 'static>(
        source: R,
        encoding: Encoding,
        level: i32,
        chunk_size: usize,
        size: Option<u64>,
    ) -> Self {
        let read = Arc::new(AtomicU64::new(0));
        let source: Box<dyn Read + Send> = Box::new(source);
        let mut encoder = match ChunkEncoder::with_size(source, encoding, level, chunk_size, size) {
            Ok(e) => e,
            Err(e) => return Self { kind: EncodeKind::Ready(VecDeque::new(), Some(e)), read },
        };
        if inline(size) {
            let mut chunks = VecDeque::new();
            let error = loop {
                match encoder.next_chunk() {
                    Ok(Some(chunk)) => chunks.push_back(chunk),
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            read.store(encoder.bytes_read(), Ordering::Relaxed);
            return Self { kind: EncodeKind::Ready(chunks, error), read };
        }
        let first = Self::encode_next(encoder, Arc::clone(&read));
        Self { kind: EncodeKind::Pooled(Some(first)), read }
    }

    fn encode_next(mut encoder: Encoder, read: Arc<AtomicU64>) -> NextChunk {
        tokio::task::spawn_blocking(move || {
            let next = encoder.next_chunk();
            read.store(encoder.bytes_read(), Ordering::Relaxed);
            (encoder, next)
        })
    }

    /// The next encoded chunk; `None` at the end of the payload.
    pub async fn next(&mut self) -> Option<io::Result<Bytes>> {
        match &mut self.kind {
            EncodeKind::Ready(chunks, error) => chunks.pop_front().map(Ok).or_else(|| error.take().map(Err)),
            EncodeKind::Pooled(pending) => {
                let (encoder, next) = match pending.take()?.await {
                    Ok(done) => done,
                    Err(e) => return Some(Err(io::Error::other(format!("payload encoder: {e}")))),
                };
                match next {
                    Ok(Some(chunk)) => {
                        // Read ahead while the caller sends this one.
                        *pending = Some(Self::encode_next(encoder, Arc::clone(&self.read)));
                        Some(Ok(chunk))
                    }
                    Ok(None) => None,
                    Err(e) => Some(Err(e)),
                }
            }
        }
    }

    /// Payload bytes read from the source so far (at most a chunk ahead of
    /// what was taken from this stream).
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

/// Decodes pushed chunks into a writer, in line or on the blocking pool.
pub struct DecodeSink<W: Write + Send + 'static> {
    kind: DecodeKind<W>,
    decoded: Arc<AtomicU64>,
}

type Decoding<W> = JoinHandle<(StreamDecoder<W>, Result<(), DecodeError>)>;

enum DecodeKind<W: Write + Send + 'static> {
    Inline {
        decoder: StreamDecoder<W>,
        failed: Option<DecodeError>,
    },
    /// The decoder, idle or busy with the last chunk pushed.
    Pooled {
        idle: Option<StreamDecoder<W>>,
        busy: Option<Decoding<W>>,
        failed: Option<DecodeError>,
    },
}

impl<W: Write + Send + 'static> DecodeSink<W> {
    /// Decodes into `decoder`'s writer; in line when `inline` (see
    /// [`inline`]), else a chunk at a time on the blocking pool.
    pub fn new(decoder: StreamDecoder<W>, inline: bool) -> Self {
        let decoded = Arc::new(AtomicU64::new(0));
        let kind = if inline {
            DecodeKind::Inline { decoder, failed: None }
        } else {
            DecodeKind::Pooled { idle: Some(decoder), busy: None, failed: None }
        };
        Self { kind, decoded }
    }

    /// Feeds the next chunk: decoding it starts at once, after the previous
    /// chunk's is done; `false` once decoding has failed (then
    /// [`DecodeSink::finish`] says why).
    pub async fn push(&mut self, chunk: Bytes) -> bool {
        match &mut self.kind {
            DecodeKind::Inline { failed: Some(_), .. } | DecodeKind::Pooled { failed: Some(_), .. } => false,
            DecodeKind::Inline { decoder, failed } => match decoder.write_chunk(&chunk) {
                Ok(()) => {
                    self.decoded.store(decoder.decoded(), Ordering::Relaxed);
                    true
                }
                Err(e) => {
                    *failed = Some(e);
                    false
                }
            },
            DecodeKind::Pooled { idle, busy, failed } => {
                if let Some(job) = busy.take() {
                    match settle(job).await {
                        (Some(decoder), Ok(())) => *idle = Some(decoder),
                        (decoder, Err(e)) => {
                            *idle = decoder;
                            *failed = Some(e);
                            return false;
                        }
                        (None, Ok(())) => return false,
                    }
                }
                let Some(mut decoder) = idle.take() else { return false };
                let counter = Arc::clone(&self.decoded);
                *busy = Some(tokio::task::spawn_blocking(move || {
                    let result = decoder.write_chunk(&chunk);
                    counter.store(decoder.decoded(), Ordering::Relaxed);
                    (decoder, result)
                }));
                true
            }
        }
    }

    /// Decoded bytes so far.
    pub fn decoded(&self) -> u64 {
        self.decoded.load(Ordering::Relaxed)
    }

    /// Ends the stream (checking it is complete), then runs `then` on the
    /// writer and the decoded size where the decoding ran — on the blocking
    /// pool for large payloads, so closing files or joining helper threads
    /// never blocks the async runtime.
    pub async fn finish<T, F>(self, then: F) -> Result<T, DecodeError>
    where
        T: Send + 'static,
        F: FnOnce(W, u64) -> T + Send + 'static,
    {
        match self.kind {
            DecodeKind::Inline { failed: Some(e), .. } | DecodeKind::Pooled { failed: Some(e), .. } => Err(e),
            DecodeKind::Inline { decoder, .. } => decoder.finish().map(|(w, n)| then(w, n)),
            DecodeKind::Pooled { idle, busy, .. } => {
                let decoder = match busy {
                    Some(job) => match settle(job).await {
                        (Some(decoder), Ok(())) => decoder,
                        (_, Err(e)) => return Err(e),
                        (None, Ok(())) => return Err(DecodeError::Write(io::Error::other("decoder lost"))),
                    },
                    None => idle.ok_or_else(|| DecodeError::Write(io::Error::other("decoder lost")))?,
                };
                tokio::task::spawn_blocking(move || decoder.finish().map(|(w, n)| then(w, n)))
                    .await
                    .map_err(|e| DecodeError::Write(io::Error::other(e)))?
            }
        }
    }
}

/// Waits for a chunk's decoding; a panicked job loses its decoder.
async fn settle<W: Write + Send + 'static>(job: Decoding<W>) -> (Option<StreamDecoder<W>>, Result<(), DecodeError>) {
    match job.await {
        Ok((decoder, result)) => (Some(decoder), result),
        Err(e) => (None, Err(DecodeError::Write(io::Error::other(e)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ (i / 4096) as u8).collect()
    }

    async fn round_trip(len: usize, encoding: Encoding) -> (Vec<u8>, u64) {
        let data = sample(len);
        let mut stream = EncodedStream::new(io::Cursor::new(data.clone()), encoding, 1, 64 << 10, Some(len as u64));
        let decoder = StreamDecoder::new(Vec::new(), encoding, len as u64).expect("decoder");
        let mut sink = DecodeSink::new(decoder, inline(Some(len as u64)));
        while let Some(chunk) = stream.next().await {
            assert!(sink.push(chunk.expect("chunk")).await);
        }
        assert_eq!(stream.bytes_read(), len as u64);
        let (out, n) = sink.finish(|w, n| (w, n)).await.expect("finish");
        assert_eq!(out, data);
        (out, n)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_and_large_payloads_round_trip_in_line_and_threaded() {
        for len in [0, 1, 200_000, INLINE_MAX as usize, INLINE_MAX as usize + 1, 3 << 20] {
            for encoding in [Encoding::Identity, Encoding::Zstd] {
                let (_, n) = round_trip(len, encoding).await;
                assert_eq!(n, len as u64, "{len} bytes, {encoding:?}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_decode_stops_pushes_and_finish_says_why() {
        for inline in [true, false] {
            let decoder = StreamDecoder::new(Vec::new(), Encoding::Zstd, 1 << 20).expect("decoder");
            let mut sink = DecodeSink::new(decoder, inline);
            let mut accepted = 0;
            for _ in 0..8 {
                if !sink.push(Bytes::from_static(b"definitely not zstd")).await {
                    break;
                }
                accepted += 1;
            }
            assert!(accepted <= 1, "a sink stops taking chunks once its decoder failed: {accepted} taken");
            let err = sink.finish(|_, n| n).await.expect_err("garbage");
            assert!(matches!(err, DecodeError::Corrupt(_)), "{err}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_error_reaches_the_consumer_and_a_dropped_stream_stops_the_thread() {
        struct Failing(u64);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk on fire"));
                }
                let n = buf.len().min(self.0 as usize);
                self.0 -= n as u64;
                buf[..n].fill(7);
                Ok(n)
            }
        }
        let mut stream = EncodedStream::new(Failing(1 << 20), Encoding::Zstd, 1, 64 << 10, None);
        let mut last = None;
        while let Some(next) = stream.next().await {
            last = Some(next);
        }
        assert_eq!(last.expect("something").expect_err("the error").to_string(), "disk on fire");
        // Infinite source, consumer leaves: the thread must notice and end.
        let stream = EncodedStream::new(io::repeat(1), Encoding::Identity, 1, 64 << 10, None);
        drop(stream);
    }
}
