//! Small zstd frames decoded whole: a frame whose header declares a content
//! size of at most [`WHOLE_FRAME_MAX`] (every frame the aipod clients
//! send) is gathered compressed and decoded in one call with a zstd
//! context from a small shared pool, instead of through a streaming
//! decoder of its own. A streaming decoder keeps its context, an input
//! block and a window of output per upload (~500 KiB for a 128 KiB
//! frame); an upload decoded whole holds only the compressed bytes of the
//! frame in progress (none when a chunk holds the whole frame), and the
//! contexts are at most [`CONTEXTS`], however many uploads decode at once.

use std::{
    io,
    sync::{Condvar, Mutex, MutexGuard, PoisonError},
};

/// Frames declaring at most this many decoded bytes are decoded whole.
pub(crate) const WHOLE_FRAME_MAX: u64 = 256 << 10;

/// The most compressed bytes a frame decoded whole may gather; a frame
/// that is larger (blocks that cannot add up to its declared size) goes to
/// the streaming decoder, which reports what is wrong with it.
pub(crate) const GATHER_MAX: usize = 2 * WHOLE_FRAME_MAX as usize;

/// Contexts in all: decoding is work for a core, so more decodings at
/// once than this would only hold more memory; the rest wait their turn
/// (a decoding takes well under a millisecond).
const CONTEXTS: usize = 8;

/// A zstd context and an output buffer of [`WHOLE_FRAME_MAX`].
struct Context {
    dctx: zstd::bulk::Decompressor<'static>,
    out: Vec<u8>,
}

/// The contexts not in use, and how many exist.
struct Pool {
    idle: Vec<Context>,
    made: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { idle: Vec::new(), made: 0 });
static RETURNED: Condvar = Condvar::new();

fn lock() -> MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A context from the pool: an idle one, a new one while fewer than
/// [`CONTEXTS`] exist, else the next one given back.
fn take() -> io::Result<Context> {
    let mut pool = lock();
    loop {
        if let Some(context) = pool.idle.pop() {
            return Ok(context);
        }
        if pool.made < CONTEXTS {
            pool.made += 1;
            drop(pool);
            let made = zstd::bulk::Decompressor::new().map(|dctx| Context {
                dctx,
                out: Vec::with_capacity(usize::try_from(WHOLE_FRAME_MAX).unwrap_or(usize::MAX)),
            });
            if made.is_err() {
                lock().made -= 1;
            }
            return made;
        }
        pool = RETURNED.wait(pool).unwrap_or_else(PoisonError::into_inner);
    }
}

/// Frees the contexts not in use (a burst of uploads may have made
/// [`CONTEXTS`]); the next frame makes one again. Returns how many were freed.
pub(crate) fn release_idle() -> usize {
    let idle = {
        let mut pool = lock();
        pool.made -= pool.idle.len();
        std::mem::take(&mut pool.idle)
    };
    // Freed outside the lock.
    idle.len()
}

/// Decodes the whole frame `frame`, which declares `content` decoded bytes
/// (at most [`WHOLE_FRAME_MAX`]), and hands them to `emit`.
pub(crate) fn decode<T>(frame: &[u8], content: u64, emit: impl FnOnce(&[u8]) -> T) -> io::Result<T> {
    let mut context = take()?;
    context.out.clear();
    let decoded = context.dctx.decompress_to_buffer(frame, &mut context.out);
    let result = match decoded {
        Ok(n) if n as u64 == content => Ok(emit(&context.out[..n])),
        Ok(n) => Err(io::Error::other(format!("a frame declaring {content} bytes decoded to {n}"))),
        Err(e) => Err(e),
    };
    lock().idle.push(context);
    RETURNED.notify_one();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Contexts made, and idle.
    fn counts() -> (usize, usize) {
        let pool = lock();
        (pool.made, pool.idle.len())
    }

    #[test]
    fn idle_contexts_are_freed_and_made_again_for_the_next_frame() {
        let frame = zstd::bulk::compress(b"a frame decoded whole", 1).expect("compress");
        let decoded = decode(&frame, 21, <[u8]>::to_vec).expect("decode");
        assert_eq!(decoded, b"a frame decoded whole");
        assert_eq!(counts(), (1, 1));
        assert_eq!(release_idle(), 1);
        assert_eq!(counts(), (0, 0));
        assert_eq!(decode(&frame, 21, <[u8]>::to_vec).expect("decode again"), decoded);
        assert_eq!(counts(), (1, 1));
    }
}
