//! Streaming payload codec shared by clients and the runtime.
//!
//! [`ChunkEncoder`] pulls from any [`Read`] and yields encoded chunks of about
//! a fixed size; [`StreamDecoder`] takes pushed chunks and writes the decoded
//! bytes to any [`Write`]. Both hold one chunk at a time, never the payload.
//! Both are synchronous; [`bridge`] is the one place that connects them to
//! async code (in line for small payloads, else on a blocking thread behind a
//! bounded channel).

use std::{
    io::{self, Read, Write},
    sync::Arc,
};

use bytes::Bytes;
use zstd::stream::raw::{Decoder as RawDecoder, InBuffer, Operation, OutBuffer};

pub mod adapt;
pub mod bridge;
pub mod frames;
mod whole;

use frames::Landmark;
pub use frames::WindowBudget;

/// Frees the memory the codec keeps between payloads for the next one (the
/// shared zstd contexts of frames decoded whole); returns how many contexts
/// were freed. A server calls it when a burst of uploads is over.
pub fn release_idle() -> usize {
    whole::release_idle()
}

/// How payload bytes travel: the codec's own view of `proto::Encoding`
/// (converted at the gRPC edges), so code below them names no generated type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// As they are.
    #[default]
    Identity,
    /// A zstd stream (one or more frames).
    Zstd,
}

/// The zstd level used when a caller does not choose one: level 1 compresses
/// mixed data at well over 1 GB/s per core, so it rarely limits a transfer.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Payloads of a known size up to this go uncompressed with
/// [`Compression::Auto`]: compressing a few KiB saves less than setting up
/// the zstd contexts costs both sides.
pub const AUTO_SMALL_MAX: u64 = 64 << 10;

/// How a client compresses what it uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Chosen as it goes ([`adapt`]): the level that moves the most payload
    /// per second on this link and CPU, from stored blocks to strong zstd;
    /// small payloads go uncompressed.
    #[default]
    Auto,
    /// zstd at this level throughout.
    Level(i32),
    /// Uncompressed.
    Off,
}

impl Compression {
    /// How a payload of `size` bytes (when known) goes on the wire.
    pub fn encoding(self, size: Option<u64>) -> Encoding {
        match self {
            Self::Off => Encoding::Identity,
            Self::Auto if size.is_some_and(|s| s <= AUTO_SMALL_MAX) => Encoding::Identity,
            Self::Auto | Self::Level(_) => Encoding::Zstd,
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    /// `auto`, `none` (or `off`), or a zstd level from -7 to 22.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "none" | "off" => Ok(Self::Off),
            n => match n.parse::<i32>() {
                Ok(level) if (-7..=22).contains(&level) => Ok(Self::Level(level)),
                _ => Err(format!("{s:?} is not a compression: auto, none, or a zstd level from -7 to 22")),
            },
        }
    }
}

/// Size of the decoder's output buffer: the largest piece handed to the
/// writer. zstd keeps the decoded window itself; this is only where it
/// copies to, so it stays small.
const DECODE_BUF: usize = 64 << 10;

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a valid zstd stream.
    #[error("payload is not a valid zstd stream: {0}")]
    Corrupt(io::Error),
    /// The zstd stream stopped in the middle of a frame.
    #[error("payload zstd stream ended in the middle of a frame ({decoded} bytes decoded)")]
    Truncated {
        /// Bytes decoded before the stream ended.
        decoded: u64,
    },
    /// The zstd stream asks for a larger window (decoder memory) than the
    /// caller allows.
    #[error(
        "the zstd stream needs a window larger than the {max} bytes allowed (compress with a smaller window or level)"
    )]
    WindowTooLarge {
        /// The largest window allowed, in bytes.
        max: u64,
    },
    /// The decoders that share a [`WindowBudget`] hold all of it: the
    /// stream may decode once others are done.
    #[error(
        "the zstd stream needs {need} bytes of decoder memory and {used} of the {max} shared by all decoders \
         are in use; retry shortly"
    )]
    BudgetFull {
        /// What this stream's frame needs.
        need: u64,
        /// What the budget's decoders hold.
        used: u64,
        /// The budget.
        max: u64,
    },
    /// More bytes decoded than the caller allowed.
    #[error("payload exceeds the limit of {limit} bytes")]
    LimitExceeded {
        /// The limit that was passed.
        limit: u64,
    },
    /// The writer failed.
    #[error("writing the decoded payload failed: {0}")]
    Write(io::Error),
}

/// Reads a payload and yields it encoded, one chunk at a time.
///
/// With zstd, each chunk holds complete zstd frames made from up to
/// `chunk_size` input bytes, one per 128 KiB segment (so a frame's window,
/// the decoder's memory, is at most 128 KiB): compressible segments are
/// compressed straight from the input buffer (no window copy), segments
/// that look incompressible go in stored blocks. The chunks concatenated are
/// a valid zstd stream that any zstd decoder reads.
pub struct ChunkEncoder<R: Read> {
    reader: Counting<R>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Input read for the next chunk (zstd only).
    input: Vec<u8>,
    /// One compressed frame, before it joins the chunk (zstd only).
    frame: Vec<u8>,
    /// Where each chunk is assembled; allocated once, sized to the payload
    /// when its size is known.
    scratch: Vec<u8>,
    done: bool,
    /// With adaptive compression: the level chooser, the level the
    /// compressor is set to, and the payload bytes read when the last chunk
    /// was handed on.
    adapt: Option<(adapt::Adapt, i32, u64)>,
}

impl<R: Read> ChunkEncoder<R> {
    /// Encodes `reader` with `encoding` (zstd at `level`) into chunks of at
    /// most `chunk_size` bytes.
    pub fn new(reader: R, encoding: Encoding, level: i32, chunk_size: usize) -> io::Result<Self> {
        Self::with_size(reader, encoding, level, chunk_size, None)
    }

    /// Like [`ChunkEncoder::new`] for a payload of known `size`: buffers are
    /// no bigger than the payload, so small payloads cost little.
    pub fn with_size(
        reader: R,
        encoding: Encoding,
        level: i32,
        chunk_size: usize,
        size: Option<u64>,
    ) -> io::Result<Self> {
        let fits = |n: usize| size.map_or(n, |s| n.min(usize::try_from(s).unwrap_or(usize::MAX).max(1)));
        let block = fits(chunk_size.max(1));
        let reader = Counting { inner: reader, count: 0 };
        Ok(match encoding {
            Encoding::Identity => Self {
                reader,
                zstd: None,
                input: Vec::new(),
                frame: Vec::new(),
                scratch: vec![0; block],
                done: false,
                adapt: None,
            },
            Encoding::Zstd => {
                // Input per frame such that even incompressible input fits
                // in `chunk_size` once framed.
                let chunk = chunk_size.max(1);
                let overhead = zstd::zstd_safe::compress_bound(chunk) - chunk;
                let input = fits(chunk.saturating_sub(overhead).max(1));
                Self {
                    reader,
                    zstd: Some(zstd::bulk::Compressor::new(level)?),
                    input: vec![0; input],
                    frame: Vec::with_capacity(zstd::zstd_safe::compress_bound(input)),
                    scratch: Vec::with_capacity(zstd::zstd_safe::compress_bound(input)),
                    done: false,
                    adapt: None,
                }
            }
        })
    }

    /// Like [`ChunkEncoder::with_size`] with zstd at a level chosen chunk by
    /// chunk ([`adapt`]): call [`ChunkEncoder::handed_on`] each time a chunk
    /// has been handed to the network.
    pub fn adaptive(reader: R, chunk_size: usize, size: Option<u64>) -> io::Result<Self> {
        let mut encoder = Self::with_size(reader, Encoding::Zstd, DEFAULT_ZSTD_LEVEL, chunk_size, size)?;
        let chooser = adapt::Adapt::new();
        let level = chooser.level().unwrap_or(DEFAULT_ZSTD_LEVEL);
        encoder.adapt = Some((chooser, level, 0));
        Ok(encoder)
    }

    /// Tells an adaptive encoder the last chunk left for the network now
    /// (after any wait for room): what the next chunk's level is chosen by.
    pub fn handed_on(&mut self, now: std::time::Instant) {
        let read = self.reader.count;
        if let Some((chooser, _, last)) = &mut self.adapt {
            chooser.handed_on(read - *last, now);
            *last = read;
        }
    }

    /// The zstd level of an adaptive encoder's next chunk (`None`: stored
    /// blocks); `None` also for a fixed encoder.
    pub fn adaptive_level(&self) -> Option<i32> {
        self.adapt.as_ref().and_then(|(chooser, _, _)| chooser.level())
    }

    /// The next encoded chunk, or `None` once the payload is complete.
    pub fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        let Some(cctx) = &mut self.zstd else {
            let filled = fill(&mut self.reader, &mut self.scratch)?;
            self.done = filled < self.scratch.len();
            return Ok((filled > 0).then(|| Bytes::copy_from_slice(&self.scratch[..filled])));
        };
        let filled = fill(&mut self.reader, &mut self.input)?;
        self.done = filled < self.input.len();
        if filled == 0 {
            return Ok(None);
        }
        let input = &self.input[..filled];
        self.scratch.clear();
        let mut store_all = false;
        if let Some((chooser, set, _)) = &mut self.adapt {
            match chooser.level() {
                None => store_all = true,
                Some(level) if level != *set => {
                    cctx.set_compression_level(level)?;
                    *set = level;
                }
                Some(_) => {}
            }
        }
        // A frame per segment, so that a frame's window — the decoder's
        // memory for the upload — is at most a segment: random (or already
        // compressed) segments go in stored blocks, the rest compressed.
        for segment in input.chunks(SEGMENT) {
            if store_all || looks_incompressible(segment) {
                stored_frame(segment, &mut self.scratch);
            } else {
                self.frame.clear();
                cctx.compress_to_buffer(segment, &mut self.frame)?;
                self.scratch.extend_from_slice(&self.frame);
            }
        }
        Ok(Some(Bytes::copy_from_slice(&self.scratch)))
    }

    /// Uncompressed bytes read from the source so far.
    pub fn bytes_read(&self) -> u64 {
        self.reader.count
    }
}

/// Input is judged compressible or not in segments of this size.
const SEGMENT: usize = 128 << 10;

/// Whether a segment looks like random or already-compressed bytes, judged
/// by the byte entropy of two samples: compressing such data costs a core
/// and saves nothing, so it is sent in stored zstd blocks instead.
fn looks_incompressible(segment: &[u8]) -> bool {
    const SAMPLE: usize = 4 << 10;
    const SAMPLES: usize = 2;
    if segment.len() < SEGMENT / 2 {
        return false; // small: just compress it
    }
    let mut counts = [0u32; 256];
    let step = segment.len() / SAMPLES;
    for s in 0..SAMPLES {
        for &b in &segment[s * step..s * step + SAMPLE] {
            counts[usize::from(b)] += 1;
        }
    }
    let total = (SAMPLE * SAMPLES) as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / total;
            -p * p.log2()
        })
        .sum();
    // Uniform bytes over 8 KiB of samples measure about 7.98 bits; text
    // and most binary formats are far below.
    entropy > 7.9
}

/// Appends `input` as one zstd frame of stored (uncompressed) blocks: magic,
/// a single-segment header with the 4-byte content size, then blocks of at
/// most 128 KiB, each with its 3-byte header (RFC 8878, 3.1.1).
fn stored_frame(input: &[u8], out: &mut Vec<u8>) {
    const MAX_BLOCK: usize = 128 << 10;
    let size = u32::try_from(input.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&0xFD2F_B528_u32.to_le_bytes());
    out.push(0b1010_0000); // content size in 4 bytes, single segment
    out.extend_from_slice(&size.to_le_bytes());
    let mut blocks = input.chunks(MAX_BLOCK).peekable();
    while let Some(block) = blocks.next() {
        let last = u32::from(blocks.peek().is_none());
        // bit 0: last block; bits 1-2: type 0 (raw); bits 3-23: size.
        let header = last | ((block.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(block);
    }
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

impl<R: Read> Iterator for ChunkEncoder<R> {
    type Item = io::Result<Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk().transpose()
    }
}

struct Counting<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Decodes pushed chunks of a payload into a writer.
pub struct StreamDecoder<W: Write> {
    writer: W,
    zstd: Option<ZstdState>,
    decoded: u64,
    limit: u64,
    /// The window cap, when one was set.
    window_max: Option<u64>,
}

struct ZstdState {
    /// zstd's streaming decoder, made when a frame first needs it.
    dctx: Option<RawDecoder<'static>>,
    /// The window cap to give it, as a power of two.
    window_log: Option<u32>,
    /// Its output buffer, allocated with it.
    buf: Box<[u8]>,
    /// Whether the input so far ends exactly at a frame boundary.
    at_frame_end: bool,
    /// With a [`WindowBudget`]: the stream's framing and what it holds.
    budget: Option<Gate>,
}

/// A budgeted stream's framing, the memory it holds, and where the bytes
/// of the current frame go.
struct Gate {
    frames: frames::Frames,
    reserved: frames::Reserved,
    route: Route,
    /// Bytes of the current frame held back: its header until the header
    /// says how it decodes, or all of a frame decoded whole.
    pending: Vec<u8>,
}

impl Gate {
    /// Holds `bytes` of the current frame, growing `pending` to exactly
    /// what it holds (not to twice: hundreds of uploads each hold a frame's
    /// part at once).
    fn hold(&mut self, bytes: &[u8]) {
        self.pending.reserve_exact(bytes.len());
        self.pending.extend_from_slice(bytes);
    }
}

/// Where the bytes of the current frame go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Not known yet: the frame header is held until it ends.
    Holding,
    /// Gathered and decoded whole at the frame's end ([`whole`]); its
    /// declared decoded size.
    Whole(u64),
    /// To the streaming decoder, until the frame ends.
    Streaming,
}

impl<W: Write> StreamDecoder<W> {
    /// A decoder for `encoding` writing into `writer`, failing with
    /// [`DecodeError::LimitExceeded`] once more than `limit` bytes decode.
    pub fn new(writer: W, encoding: Encoding, limit: u64) -> io::Result<Self> {
        let zstd = match encoding {
            Encoding::Identity => None,
            Encoding::Zstd => {
                Some(ZstdState { dctx: None, window_log: None, buf: Box::default(), at_frame_end: true, budget: None })
            }
        };
        Ok(Self { writer, zstd, decoded: 0, limit, window_max: None })
    }

    /// Refuses zstd frames whose window exceeds `2^log` bytes, bounding the
    /// decoder's memory (zstd's own default allows 128 MiB).
    pub fn with_window_log_max(mut self, log: u32) -> io::Result<Self> {
        if let Some(z) = &mut self.zstd {
            if let Some(dctx) = &mut z.dctx {
                dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(log))?;
            }
            z.window_log = Some(log);
            self.window_max = Some(1u64 << log);
        }
        Ok(self)
    }

    /// Takes each frame's decoder memory from `budget` before zstd
    /// allocates it, failing with [`DecodeError::BudgetFull`] when the
    /// budget has no room; given back when the decoder is dropped. Small
    /// frames are then decoded whole (see `codec/whole.rs`), holding no streaming
    /// decoder.
    pub fn with_window_budget(mut self, budget: Arc<WindowBudget>) -> Self {
        if let Some(z) = &mut self.zstd {
            z.budget = Some(Gate {
                frames: frames::Frames::new(),
                reserved: frames::Reserved::new(budget),
                route: Route::Holding,
                pending: Vec::new(),
            });
        }
        self
    }

    /// Decodes one chunk and writes what it yields.
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), DecodeError> {
        let Some(z) = &mut self.zstd else {
            return emit(&mut self.writer, &mut self.decoded, self.limit, chunk);
        };
        let Some(mut gate) = z.budget.take() else {
            return self.decode(chunk);
        };
        let result = self.decode_gated(&mut gate, chunk);
        if let Some(z) = &mut self.zstd {
            z.budget = Some(gate);
        }
        result
    }

    /// Walks `chunk`'s framing: takes each frame's memory from the budget
    /// before zstd reads its header and allocates it, and decodes small
    /// frames whole — in place when the chunk holds all of one, else
    /// gathered — the rest streaming.
    fn decode_gated(&mut self, gate: &mut Gate, chunk: &[u8]) -> Result<(), DecodeError> {
        let mut pos = 0;
        // Where this chunk's bytes of the frame being held start.
        let mut held_from = 0;
        while pos < chunk.len() {
            let (n, landmark) = gate.frames.step(&chunk[pos..]);
            if gate.route == Route::Streaming {
                self.decode(&chunk[pos..pos + n])?;
                held_from = pos + n;
            }
            pos += n;
            match landmark {
                None => {}
                Some(Landmark::Header(needs)) => {
                    if let Some(max) = self.window_max.filter(|max| needs.window > *max) {
                        return Err(DecodeError::WindowTooLarge { max });
                    }
                    if !gate.reserved.grow_to(needs.memory) {
                        let budget = gate.reserved.budget();
                        return Err(DecodeError::BudgetFull {
                            need: needs.memory,
                            used: budget.used(),
                            max: budget.max(),
                        });
                    }
                    if gate.route == Route::Holding {
                        match needs.content.filter(|c| *c <= whole::WHOLE_FRAME_MAX) {
                            Some(content) => gate.route = Route::Whole(content),
                            None => self.stream_held(gate, &chunk[held_from..pos])?,
                        }
                    }
                }
                Some(Landmark::End) => {
                    if let Route::Whole(content) = gate.route {
                        let here = &chunk[held_from..pos];
                        let frame = if gate.pending.is_empty() {
                            here
                        } else {
                            gate.hold(here);
                            &gate.pending[..]
                        };
                        let (writer, decoded, limit) = (&mut self.writer, &mut self.decoded, self.limit);
                        whole::decode(frame, content, |bytes| emit(writer, decoded, limit, bytes))
                            .map_err(DecodeError::Corrupt)??;
                        gate.pending.clear();
                    }
                    gate.route = Route::Holding;
                }
                Some(Landmark::Other) if gate.route == Route::Holding => {
                    self.stream_held(gate, &chunk[held_from..pos])?;
                }
                Some(Landmark::Other) => {}
            }
            if gate.route == Route::Streaming || landmark == Some(Landmark::End) {
                held_from = pos;
            } else if gate.pending.len() + (pos - held_from) > whole::GATHER_MAX {
                // More than its declared size can take: zstd says why.
                self.stream_held(gate, &chunk[held_from..pos])?;
                held_from = pos;
            }
        }
        if gate.route != Route::Streaming {
            gate.hold(&chunk[held_from..]);
        }
        Ok(())
    }

    /// The current frame goes to the streaming decoder from here: what was
    /// held of it (`pending`, then `here`) first.
    fn stream_held(&mut self, gate: &mut Gate, here: &[u8]) -> Result<(), DecodeError> {
        gate.route = Route::Streaming;
        let held = std::mem::take(&mut gate.pending);
        self.decode(&held)?;
        self.decode(here)
    }

    /// Feeds `chunk` to zstd and writes what it yields.
    fn decode(&mut self, chunk: &[u8]) -> Result<(), DecodeError> {
        let Some(z) = &mut self.zstd else {
            return emit(&mut self.writer, &mut self.decoded, self.limit, chunk);
        };
        if chunk.is_empty() {
            return Ok(());
        }
        let dctx = match &mut z.dctx {
            Some(dctx) => dctx,
            slot @ None => {
                let mut dctx = RawDecoder::new().map_err(DecodeError::Corrupt)?;
                if let Some(log) = z.window_log {
                    dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(log)).map_err(DecodeError::Corrupt)?;
                }
                z.buf = vec![0; DECODE_BUF.min(usize::try_from(self.limit).unwrap_or(usize::MAX).saturating_add(1))]
                    .into_boxed_slice();
                slot.insert(dctx)
            }
        };
        let mut input = InBuffer::around(chunk);
        loop {
            let mut output = OutBuffer::around(&mut z.buf[..]);
            let hint = dctx.run(&mut input, &mut output).map_err(|e| match self.window_max {
                // zstd's "Frame requires too much memory for decoding".
                Some(max) if e.to_string().contains("too much memory") => DecodeError::WindowTooLarge { max },
                _ => DecodeError::Corrupt(e),
            })?;
            let produced = output.pos();
            z.at_frame_end = hint == 0;
            emit(&mut self.writer, &mut self.decoded, self.limit, &z.buf[..produced])?;
            // zstd may hold decoded blocks back even when the output buffer
            // had room, so keep calling until the input is consumed and the
            // frame is finished or no more output comes.
            if input.pos() == chunk.len() && (hint == 0 || produced == 0) {
                return Ok(());
            }
        }
    }

    /// Bytes decoded so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    /// Checks that the stream ended cleanly, flushes, and returns the writer
    /// and the decoded size.
    pub fn finish(mut self) -> Result<(W, u64), DecodeError> {
        let mid_frame =
            |z: &ZstdState| !z.at_frame_end || z.budget.as_ref().is_some_and(|gate| !gate.pending.is_empty());
        if self.zstd.as_ref().is_some_and(mid_frame) {
            return Err(DecodeError::Truncated { decoded: self.decoded });
        }
        self.writer.flush().map_err(DecodeError::Write)?;
        Ok((self.writer, self.decoded))
    }

    /// Stops mid-stream (the sender went away): flushes and returns the
    /// writer and what decoded so far, without the end-of-stream check.
    pub fn interrupt(mut self) -> Result<(W, u64), DecodeError> {
        self.writer.flush().map_err(DecodeError::Write)?;
        Ok((self.writer, self.decoded))
    }
}

fn emit<W: Write>(writer: &mut W, decoded: &mut u64, limit: u64, bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.is_empty() {
        return Ok(());
    }
    *decoded += bytes.len() as u64;
    if *decoded > limit {
        return Err(DecodeError::LimitExceeded { limit });
    }
    writer.write_all(bytes).map_err(DecodeError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        // Half compressible text, half pseudo-random bytes.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..len)
            .map(|i| {
                if (i / 4096) % 2 == 0 {
                    b"2026-11-26 INFO request served\n"[i % 31]
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    fn encode_all(data: &[u8], encoding: Encoding, chunk: usize) -> Vec<Bytes> {
        ChunkEncoder::new(data, encoding, DEFAULT_ZSTD_LEVEL, chunk)
            .expect("encoder")
            .collect::<io::Result<Vec<_>>>()
            .expect("encode")
    }

    fn decode_all(chunks: &[Bytes], encoding: Encoding, limit: u64) -> Result<Vec<u8>, DecodeError> {
        let mut dec = StreamDecoder::new(Vec::new(), encoding, limit).expect("decoder");
        for c in chunks {
            dec.write_chunk(c)?;
        }
        dec.finish().map(|(out, n)| {
            assert_eq!(n as usize, out.len());
            out
        })
    }

    #[test]
    fn small_frames_decode_whole_without_a_streaming_decoder_and_others_stream() {
        let data = sample(1 << 20);
        let chunks = encode_all(&data, Encoding::Zstd, 256 << 10);
        let budgeted = || {
            StreamDecoder::new(Vec::new(), Encoding::Zstd, u64::MAX)
                .expect("decoder")
                .with_window_budget(WindowBudget::new(64 << 20))
        };
        for piece in [1, 7, 1000, 64 << 10, 1 << 20] {
            let mut dec = budgeted();
            for c in &chunks {
                for p in c.chunks(piece) {
                    dec.write_chunk(p).expect("decode");
                }
            }
            assert!(dec.zstd.as_ref().is_some_and(|z| z.dctx.is_none()), "no streaming decoder at piece {piece}");
            assert_eq!(dec.finish().expect("finish").0, data, "piece {piece}");
        }
        // A frame of unknown size (a streaming encoder's), a skippable frame
        // and then small frames again: each decodes, in order.
        let mut stream = Vec::new();
        let mut encoder = zstd::stream::Encoder::new(&mut stream, 3).expect("as built");
        std::io::Write::write_all(&mut encoder, &data[..300_000]).expect("as built");
        encoder.finish().expect("as built");
        stream.extend([0x50, 0x2a, 0x4d, 0x18, 2, 0, 0, 0, 9, 9]);
        stream.extend(chunks.concat());
        for piece in [1, 999, stream.len()] {
            let mut dec = budgeted();
            for p in stream.chunks(piece) {
                dec.write_chunk(p).expect("decode");
            }
            let (out, n) = dec.finish().expect("finish");
            assert_eq!(
                (n, &out[..300_000], &out[300_000..]),
                (300_000 + data.len() as u64, &data[..300_000], &data[..])
            );
        }
        // Cut inside a frame decoded whole: truncated, and nothing of it came out.
        let mut dec = budgeted();
        dec.write_chunk(&chunks[0][..chunks[0].len() - 3]).expect("held");
        let decoded = dec.decoded();
        assert!(matches!(dec.finish(), Err(DecodeError::Truncated { .. })), "after {decoded} bytes");
        // A frame declaring 10 bytes followed by endless RLE blocks is not
        // gathered without end: past the gathering bound zstd refuses it.
        let mut liar = vec![0x28, 0xb5, 0x2f, 0xfd, 0x20, 10];
        let rle = 2_u32 | (5 << 3); // an RLE block of 5 bytes, not the last
        for _ in 0..(whole::GATHER_MAX / 4 + 10) {
            liar.extend(&rle.to_le_bytes()[..3]);
            liar.push(b'x');
        }
        let mut dec = budgeted();
        let err = dec.write_chunk(&liar).expect_err("more than its declared size");
        assert!(matches!(err, DecodeError::Corrupt(_)), "{err}");
        assert!(
            dec.zstd.as_ref().and_then(|z| z.budget.as_ref()).is_some_and(|g| g.pending.len() <= whole::GATHER_MAX)
        );
    }

    #[test]
    fn a_window_budget_is_taken_at_each_frame_header_and_given_back() {
        let data = sample(3 << 20);
        let chunks = encode_all(&data, Encoding::Zstd, 1 << 20);
        let budget = WindowBudget::new(4 << 20);
        for piece in [1000, 64 << 10, 1 << 20] {
            let mut dec = StreamDecoder::new(Vec::new(), Encoding::Zstd, u64::MAX)
                .expect("decoder")
                .with_window_budget(Arc::clone(&budget));
            for c in &chunks {
                for p in c.chunks(piece) {
                    dec.write_chunk(p).expect("decode within the budget");
                }
            }
            // A frame per 128 KiB segment: its output and input buffers.
            assert!(budget.used() > 0 && budget.used() <= 256 << 10, "a frame's memory: {}", budget.used());
            assert_eq!(dec.finish().expect("finish").0, data);
            assert_eq!(budget.used(), 0, "given back when the decoder is done");
        }
        // Two decoders do not fit in a budget of one frame's memory.
        let mut first = StreamDecoder::new(Vec::new(), Encoding::Zstd, u64::MAX).expect("decoder");
        first = first.with_window_budget(WindowBudget::new(0));
        let err = first.write_chunk(&chunks[0]).expect_err("no room at all");
        assert!(matches!(err, DecodeError::BudgetFull { used: 0, max: 0, .. }), "{err}");
        let tight = WindowBudget::new(300 << 10);
        let mut a =
            StreamDecoder::new(Vec::new(), Encoding::Zstd, u64::MAX).expect("a").with_window_budget(Arc::clone(&tight));
        let mut b =
            StreamDecoder::new(Vec::new(), Encoding::Zstd, u64::MAX).expect("b").with_window_budget(Arc::clone(&tight));
        a.write_chunk(&chunks[0]).expect("the first fits");
        assert!(matches!(b.write_chunk(&chunks[0]), Err(DecodeError::BudgetFull { .. })), "the second waits its turn");
        drop(a);
        let mut b = StreamDecoder::new(Vec::new(), Encoding::Zstd, u64::MAX).expect("b").with_window_budget(tight);
        b.write_chunk(&chunks[0]).expect("fits once the first is done");
    }

    #[test]
    fn round_trips_both_encodings_at_odd_chunk_sizes() {
        let data = sample(3 << 20);
        for encoding in [Encoding::Identity, Encoding::Zstd] {
            for chunk in [1000, 64 << 10, 1 << 20] {
                let chunks = encode_all(&data, encoding, chunk);
                assert!(chunks.iter().all(|c| c.len() <= chunk));
                assert_eq!(decode_all(&chunks, encoding, u64::MAX).expect("decode"), data);
            }
        }
    }

    #[test]
    fn random_chunks_go_in_stored_blocks_and_decode_anywhere() {
        let mut rng: u64 = 0x2545_F491_4F6C_DD1D;
        let random: Vec<u8> = (0..(1 << 20) + 12345)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        assert!(looks_incompressible(&random[..SEGMENT]));
        assert!(!looks_incompressible(&sample(SEGMENT)), "mixed text is compressed");
        // Alternating random and text segments: both kinds in one chunk.
        let text = sample(1 << 20);
        let mixed: Vec<u8> =
            random.chunks(SEGMENT).zip(text.chunks(SEGMENT)).flat_map(|(r, t)| [r, t].concat()).collect();
        let chunks = encode_all(&mixed, Encoding::Zstd, 1 << 20);
        assert!(chunks.iter().all(|c| c.len() <= 1 << 20));
        assert!(chunks.iter().map(Bytes::len).sum::<usize>() < mixed.len() * 9 / 10, "the text parts compress");
        assert_eq!(decode_all(&chunks, Encoding::Zstd, u64::MAX).expect("decode"), mixed);
        let chunks = encode_all(&random, Encoding::Zstd, 1 << 20);
        assert!(chunks.iter().all(|c| c.len() <= 1 << 20));
        assert_eq!(decode_all(&chunks, Encoding::Zstd, u64::MAX).expect("our decoder"), random);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(zstd::decode_all(&joined[..]).expect("libzstd reads the stored frames"), random);
        let mut one = Vec::new();
        stored_frame(&random[..100], &mut one);
        assert_eq!(zstd::decode_all(&one[..]).expect("a one-block frame"), &random[..100]);
    }

    #[test]
    fn zstd_actually_compresses_and_counts_input() {
        let data = sample(1 << 20);
        let mut enc = ChunkEncoder::new(&data[..], Encoding::Zstd, 3, 1 << 20).expect("encoder");
        let mut total = 0;
        while let Some(c) = enc.next_chunk().expect("chunk") {
            total += c.len();
        }
        assert!(total < data.len() * 3 / 4, "compressed {total} of {}", data.len());
        assert_eq!(enc.bytes_read(), data.len() as u64);
    }

    #[test]
    fn empty_payload_is_no_chunks_and_decodes_empty() {
        assert!(encode_all(&[], Encoding::Identity, 1024).is_empty());
        assert_eq!(decode_all(&[], Encoding::Zstd, 0).expect("empty"), Vec::<u8>::new());
    }

    #[test]
    fn truncated_stream_is_detected() {
        let data = sample(200_000);
        let mut whole = Vec::new();
        for c in encode_all(&data, Encoding::Zstd, 1 << 20) {
            whole.extend_from_slice(&c);
        }
        let cut = Bytes::copy_from_slice(&whole[..whole.len() - 10]);
        assert!(matches!(decode_all(&[cut], Encoding::Zstd, u64::MAX), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn garbage_is_corrupt() {
        let junk = Bytes::from_static(b"this is not zstd at all, not even close");
        assert!(matches!(decode_all(&[junk], Encoding::Zstd, u64::MAX), Err(DecodeError::Corrupt(_))));
    }

    #[test]
    fn limit_stops_decoding_early() {
        let data = vec![0u8; 10 << 20];
        let chunks = encode_all(&data, Encoding::Zstd, 1 << 20);
        let err = decode_all(&chunks, Encoding::Zstd, 1 << 20).expect_err("over limit");
        assert!(matches!(err, DecodeError::LimitExceeded { limit } if limit == 1 << 20));
        let err = decode_all(&[Bytes::from(vec![1u8; 11])], Encoding::Identity, 10).expect_err("over");
        assert!(matches!(err, DecodeError::LimitExceeded { .. }));
    }

    #[test]
    fn concatenated_frames_decode() {
        let a = encode_all(b"hello ", Encoding::Zstd, 1024);
        let b = encode_all(b"world", Encoding::Zstd, 1024);
        let all: Vec<Bytes> = a.into_iter().chain(b).collect();
        assert_eq!(decode_all(&all, Encoding::Zstd, u64::MAX).expect("decode"), b"hello world");
    }
}

#[cfg(test)]
mod compressible {
    use super::*;

    /// A regression test: megabytes of one byte value compress to a few
    /// hundred bytes, which zstd decodes across several calls.
    #[test]
    fn highly_compressible_payloads_round_trip() {
        for len in [300_000usize, 3 << 20, 9 << 20] {
            let data = vec![7u8; len];
            let chunks: Vec<Bytes> = ChunkEncoder::new(&data[..], Encoding::Zstd, 1, 1 << 20)
                .expect("encoder")
                .collect::<io::Result<_>>()
                .expect("encode");
            let mut dec = StreamDecoder::new(Vec::new(), Encoding::Zstd, u64::MAX).expect("decoder");
            for c in &chunks {
                dec.write_chunk(c).expect("decode");
            }
            let (out, n) = dec.finish().unwrap_or_else(|e| panic!("{len}: {e} ({} chunks)", chunks.len()));
            assert_eq!((n as usize, out == data), (len, true));
        }
    }
}
