//! Where each zstd frame of a stream starts and how much decoder memory it
//! asks for, read from the frame headers as the bytes pass (RFC 8878 §3.1),
//! so that a decoder can take that memory from a [`WindowBudget`] shared by
//! every decoder *before* zstd allocates it.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

/// zstd's largest block: its input buffer and the slack of its output one.
const BLOCK_MAX: u64 = 128 << 10;

const ZSTD_MAGIC: u32 = 0xFD2F_B528;

/// Skippable frames carry `0x184D2A5?` as their magic number.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;

/// A walker over a zstd stream's framing: magic numbers, frame headers,
/// block headers, and the bytes between them, which it steps over.
#[derive(Debug)]
pub struct Frames {
    state: State,
    /// The bytes of the current field, `have` of `need` so far.
    field: [u8; 14],
    have: usize,
    /// Bytes still to step over before the next field.
    skip: u64,
    /// The frame header descriptor of the current frame.
    descriptor: u8,
    /// The frame ends once `skip` is stepped over (its last block, no
    /// checksum).
    ending: bool,
}

/// A place in a zstd stream that [`Frames::step`] stops at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landmark {
    /// The end of a frame header, and what the frame needs.
    Header(FrameNeeds),
    /// The end of a frame (its last block, or its checksum).
    End,
    /// A magic number that starts no zstd frame (a skippable frame, or
    /// not zstd at all): the walker reads no landmarks in it.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Magic,
    Descriptor,
    Header,
    Block,
    /// After a frame's last block: its checksum, then the next frame.
    Checksum,
    SkippableSize,
    /// Not zstd framing: the decoder reports it; nothing more is read.
    Opaque,
}

impl Default for Frames {
    fn default() -> Self {
        Self::new()
    }
}

impl Frames {
    /// A walker at the start of a stream.
    pub fn new() -> Self {
        Self { state: State::Magic, field: [0; 14], have: 0, skip: 0, descriptor: 0, ending: false }
    }

    /// Steps over the start of `bytes`: returns how many bytes it took and,
    /// when those end exactly with a landmark, which ([`Landmark`]). Feed the
    /// decoder the bytes taken only after acting on that answer.
    pub fn step(&mut self, bytes: &[u8]) -> (usize, Option<Landmark>) {
        let mut pos = 0;
        while pos < bytes.len() {
            if self.state == State::Opaque {
                return (bytes.len(), None);
            }
            if self.skip > 0 {
                let n = usize::try_from(self.skip).unwrap_or(usize::MAX).min(bytes.len() - pos);
                pos += n;
                self.skip -= n as u64;
                if self.skip == 0 && std::mem::take(&mut self.ending) {
                    return (pos, Some(Landmark::End));
                }
                continue;
            }
            let need = self.need();
            let n = (need - self.have).min(bytes.len() - pos);
            self.field[self.have..self.have + n].copy_from_slice(&bytes[pos..pos + n]);
            self.have += n;
            pos += n;
            if self.have == need {
                self.have = 0;
                if let Some(landmark) = self.parse() {
                    return (pos, Some(landmark));
                }
            }
        }
        (pos, None)
    }

    /// Bytes of the field the walker is reading.
    fn need(&self) -> usize {
        match self.state {
            State::Magic | State::SkippableSize | State::Checksum => 4,
            State::Descriptor => 1,
            State::Header => header_len(self.descriptor),
            State::Block => 3,
            State::Opaque => 0,
        }
    }

    /// Acts on a complete field; the landmark it ends, if any.
    fn parse(&mut self) -> Option<Landmark> {
        let f = self.field;
        match self.state {
            State::Magic => {
                let magic = u32::from_le_bytes([f[0], f[1], f[2], f[3]]);
                if magic == ZSTD_MAGIC {
                    self.state = State::Descriptor;
                } else {
                    self.state =
                        if magic & 0xFFFF_FFF0 == SKIPPABLE_MAGIC { State::SkippableSize } else { State::Opaque };
                    return Some(Landmark::Other);
                }
            }
            State::SkippableSize => {
                self.skip = u64::from(u32::from_le_bytes([f[0], f[1], f[2], f[3]]));
                self.state = State::Magic;
            }
            State::Descriptor => {
                self.descriptor = f[0];
                self.state = State::Header;
            }
            State::Header => {
                self.state = State::Block;
                return Some(Landmark::Header(FrameNeeds::of(self.descriptor, &f[..header_len(self.descriptor)])));
            }
            State::Block => {
                let header = u32::from_le_bytes([f[0], f[1], f[2], 0]);
                let last = header & 1 == 1;
                let size = u64::from(header >> 3);
                self.skip = match (header >> 1) & 3 {
                    0 | 2 => size, // raw, compressed
                    1 => 1,        // RLE: one byte, repeated
                    _ => {
                        self.state = State::Opaque;
                        return None;
                    }
                };
                if last {
                    if self.descriptor & 0b100 != 0 {
                        self.state = State::Checksum;
                    } else {
                        self.state = State::Magic;
                        if self.skip == 0 {
                            return Some(Landmark::End);
                        }
                        self.ending = true;
                    }
                }
            }
            State::Checksum => {
                self.state = State::Magic;
                return Some(Landmark::End);
            }
            State::Opaque => {}
        }
        None
    }
}

/// Bytes of a frame header after its descriptor: window descriptor,
/// dictionary id and frame content size.
fn header_len(descriptor: u8) -> usize {
    let single = descriptor & 0x20 != 0;
    let dictionary = [0, 1, 2, 4][usize::from(descriptor & 3)];
    usize::from(!single) + dictionary + content_size_len(descriptor)
}

/// Bytes of the frame content size field.
fn content_size_len(descriptor: u8) -> usize {
    let single = descriptor & 0x20 != 0;
    [usize::from(single), 2, 4, 8][usize::from(descriptor >> 6)]
}

/// What one frame asks of its decoder, read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameNeeds {
    /// Its window: the history the decoder keeps.
    pub window: u64,
    /// Its decoded size, when the header says it.
    pub content: Option<u64>,
    /// The decoder memory it takes: its window (or its content size when
    /// smaller), room for a block beyond it, and a block of input — what
    /// zstd's streaming decoder allocates for it.
    pub memory: u64,
}

impl FrameNeeds {
    fn of(descriptor: u8, header: &[u8]) -> Self {
        let size_len = content_size_len(descriptor);
        let content = (size_len > 0).then(|| {
            let bytes = &header[header.len() - size_len..];
            let value = bytes.iter().rev().fold(0_u64, |v, b| v << 8 | u64::from(*b));
            if size_len == 2 { value + 256 } else { value }
        });
        let window = if descriptor & 0x20 != 0 {
            content.unwrap_or(0)
        } else {
            let exponent = u32::from(header[0] >> 3);
            let base = 1_u64 << (10 + exponent);
            base + base / 8 * u64::from(header[0] & 7)
        };
        let block = window.clamp(1, BLOCK_MAX);
        let output = (window + 2 * block).min(content.unwrap_or(u64::MAX));
        Self { window, content, memory: output + block }
    }
}

/// Decoder memory shared by the decoders that reserve from it.
#[derive(Debug)]
pub struct WindowBudget {
    max: u64,
    used: AtomicU64,
}

impl WindowBudget {
    /// A budget of `max` bytes.
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(Self { max, used: AtomicU64::new(0) })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The budget, in bytes.
    pub fn max(&self) -> u64 {
        self.max
    }
}

/// Bytes one decoder holds of a [`WindowBudget`], given back on drop.
#[derive(Debug)]
pub(crate) struct Reserved {
    budget: Arc<WindowBudget>,
    bytes: u64,
}

impl Reserved {
    pub(crate) fn new(budget: Arc<WindowBudget>) -> Self {
        Self { budget, bytes: 0 }
    }

    /// Holds at least `bytes`; `false` (holding what it held) when the
    /// budget cannot give the difference.
    pub(crate) fn grow_to(&mut self, bytes: u64) -> bool {
        if bytes <= self.bytes {
            return true;
        }
        let more = bytes - self.bytes;
        let max = self.budget.max;
        let taken = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(more).filter(|after| *after <= max)
            })
            .is_ok();
        if taken {
            self.bytes = bytes;
        }
        taken
    }

    pub(crate) fn budget(&self) -> &WindowBudget {
        &self.budget
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every frame header's memory, walking `stream` in pieces of `step`.
    fn walk(stream: &[u8], step: usize) -> Vec<u64> {
        landmarks(stream, step)
            .into_iter()
            .filter_map(|(_, l)| match l {
                Landmark::Header(needs) => Some(needs.memory),
                _ => None,
            })
            .collect()
    }

    /// Every landmark and the offset it ends at.
    fn landmarks(stream: &[u8], step: usize) -> Vec<(usize, Landmark)> {
        let mut frames = Frames::new();
        let mut found = vec![];
        let mut offset = 0;
        for piece in stream.chunks(step) {
            let mut rest = piece;
            while !rest.is_empty() {
                let (n, landmark) = frames.step(rest);
                offset += n;
                found.extend(landmark.map(|l| (offset, l)));
                rest = &rest[n..];
            }
        }
        found
    }

    #[test]
    fn finds_every_frame_and_its_window_at_any_split() {
        let text: Vec<u8> = (0..300_000_u32).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
        let mut stream = zstd::bulk::compress(&text[..100_000], 3).expect("as built");
        // A skippable frame between them, then a streamed frame of unknown
        // size with a checksum.
        stream.extend([0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 19).expect("as built");
        encoder.include_checksum(true).expect("as built");
        std::io::Write::write_all(&mut encoder, &text).expect("as built");
        stream.extend(encoder.finish().expect("as built"));
        stream.extend(zstd::bulk::compress(b"", 1).expect("as built"));
        for step in [1, 2, 7, 1000, stream.len()] {
            let found = walk(&stream, step);
            assert_eq!(found.len(), 3, "three frames at step {step}: {found:?}");
            // A single-segment frame of 100,000 bytes: its content size.
            assert_eq!(found[0], 2 * 100_000, "step {step}"); // output and input buffers of one 100,000-byte block
            // Level 19 without a known size: an 8 MiB window.
            assert!(found[1] > 8 << 20 && found[1] < 9 << 20, "{} at step {step}", found[1]);
        }
        assert_eq!(zstd::decode_all(&stream[..]).expect("as built").len(), 100_000 + text.len());
        // Where each frame ends, and the skippable frame's start.
        let first_len = zstd::bulk::compress(&text[..100_000], 3).expect("as built").len();
        let ends: Vec<usize> = landmarks(&stream, stream.len())
            .into_iter()
            .filter_map(|(at, l)| (l == Landmark::End).then_some(at))
            .collect();
        assert_eq!(ends.len(), 3, "{ends:?}");
        assert_eq!(ends[0], first_len);
        assert_eq!(ends[2], stream.len(), "the empty frame ends the stream");
        for step in [1, 3, 1000] {
            let all = landmarks(&stream, step);
            assert_eq!(all.iter().filter(|(_, l)| *l == Landmark::End).count(), 3, "step {step}");
            assert!(all.contains(&(first_len + 4, Landmark::Other)), "the skippable frame at step {step}");
            let content: Vec<Option<u64>> = all
                .iter()
                .filter_map(|(_, l)| match l {
                    Landmark::Header(needs) => Some(needs.content),
                    _ => None,
                })
                .collect();
            assert_eq!(content, [Some(100_000), None, Some(0)], "step {step}");
        }
    }

    #[test]
    fn what_is_not_zstd_is_left_to_the_decoder() {
        assert_eq!(walk(b"not zstd at all, just text", 3), Vec::<u64>::new());
    }

    #[test]
    fn a_budget_gives_what_it_has_and_takes_it_back() {
        let budget = WindowBudget::new(100);
        let mut a = Reserved::new(Arc::clone(&budget));
        let mut b = Reserved::new(Arc::clone(&budget));
        assert!(a.grow_to(60) && a.grow_to(40));
        assert!(!b.grow_to(41), "60 + 41 > 100");
        assert!(b.grow_to(40));
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
