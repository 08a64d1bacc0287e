//! The decode backlog: payload bytes the server has read from clients and
//! not yet decoded, all calls together, within `--decode-backlog-budget`.
//!
//! A call's stream takes [`Credit`] for each payload byte it reads off the
//! network, and the call's decoder gives it back as it consumes the bytes.
//! When the backlog is full, streams past their header stop reading until
//! decoders catch up: their bytes wait in HTTP/2's receive windows (at
//! most a stream window each), not in memory the server allocated.
//!
//! This cannot deadlock the way holding back whole messages did: credit is
//! only taken for bytes already read, and they decode without needing any
//! other stream's bytes, so every byte of credit comes back.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
};

/// `--decode-backlog-budget`'s default: a few hundred uploads' pipelines
/// at full depth; beyond it they take turns.
#[cfg(test)]
pub(crate) const DEFAULT_DECODE_BACKLOG: u64 = 64 << 20;

/// The bytes read and not yet decoded, all calls, and the streams waiting
/// for room.
#[derive(Debug)]
pub(crate) struct Backlog {
    held: AtomicU64,
    limit: u64,
    waiting: Mutex<Vec<Waker>>,
}

impl Backlog {
    /// A backlog of at most `limit` bytes (at least one byte: a stream
    /// always gets to read).
    pub(crate) fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self { held: AtomicU64::new(0), limit: limit.max(1), waiting: Mutex::default() })
    }

    /// Bytes read and not yet decoded now.
    pub(crate) fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    /// Ready when the backlog has room; else the waker is woken when it has.
    pub(crate) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.held() < self.limit {
            return Poll::Ready(());
        }
        self.waiters().push(cx.waker().clone());
        // Room may have come between the check and the push.
        if self.held() < self.limit { Poll::Ready(()) } else { Poll::Pending }
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, Vec<Waker>> {
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn release(&self, n: u64) {
        let before = self.held.fetch_sub(n, Ordering::AcqRel);
        if before >= self.limit && before - n < self.limit {
            for waker in std::mem::take(&mut *self.waiters()) {
                waker.wake();
            }
        }
    }
}

/// One stream's share of the [`Backlog`]: what it read and its decoder has
/// not consumed yet. Whatever is still held when the last handle goes (a
/// call that ended mid-upload) goes back.
#[derive(Debug)]
pub(crate) struct Credit {
    held: AtomicU64,
    backlog: Arc<Backlog>,
}

impl Credit {
    /// A stream's credit in `backlog`, holding nothing yet.
    pub(crate) fn new(backlog: &Arc<Backlog>) -> Arc<Self> {
        Arc::new(Self { held: AtomicU64::new(0), backlog: Arc::clone(backlog) })
    }

    /// `n` payload bytes were read.
    pub(crate) fn take(&self, n: u64) {
        self.held.fetch_add(n, Ordering::AcqRel);
        self.backlog.held.fetch_add(n, Ordering::AcqRel);
    }

    /// `n` payload bytes were decoded (at most what is held goes back).
    pub(crate) fn give_back(&self, n: u64) {
        let Ok(before) = self.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| Some(h.saturating_sub(n)))
        else {
            return;
        };
        let n = n.min(before);
        if n > 0 {
            self.backlog.release(n);
        }
    }

    /// Whether the backlog has room for this stream to read; see
    /// [`Backlog::poll_room`].
    pub(crate) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.backlog.poll_room(cx)
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        let held = *self.held.get_mut();
        if held > 0 {
            self.backlog.release(held);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::AtomicUsize, task::Wake};

    use super::*;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }

    #[test]
    fn a_full_backlog_wakes_its_waiters_once_decoding_makes_room() {
        let backlog = Backlog::new(100);
        let (a, b) = (Credit::new(&backlog), Credit::new(&backlog));
        let woken = Arc::new(Count::default());
        let waker = Waker::from(Arc::clone(&woken));
        let mut cx = Context::from_waker(&waker);
        a.take(60);
        assert!(b.poll_room(&mut cx).is_ready(), "60 of 100 held: room");
        b.take(50);
        assert_eq!(backlog.held(), 110, "a read may overshoot by what it read");
        assert!(b.poll_room(&mut cx).is_pending());
        a.give_back(5);
        assert_eq!(woken.0.load(Ordering::Acquire), 0, "still full at 105");
        a.give_back(10);
        assert_eq!(woken.0.load(Ordering::Acquire), 1, "room at 95: the waiter is woken");
        assert!(b.poll_room(&mut cx).is_ready());
    }

    #[test]
    fn credit_gives_back_no_more_than_it_holds_and_the_rest_when_dropped() {
        let backlog = Backlog::new(1 << 20);
        let a = Credit::new(&backlog);
        a.take(10);
        a.give_back(25);
        assert_eq!(backlog.held(), 0, "only the 10 held went back");
        a.take(40);
        let b = Credit::new(&backlog);
        b.take(7);
        drop(a);
        assert_eq!(backlog.held(), 7, "a call ended with 40 bytes undecoded: they go back");
        drop(b);
        assert_eq!(backlog.held(), 0);
    }
}
