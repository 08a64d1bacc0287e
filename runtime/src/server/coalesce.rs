//! One write for a response's frames. h2 sends a DATA frame of 256 bytes
//! or more by reference beside its write buffer, and writes it out before it
//! buffers another frame: a small call's response (headers, its DATA, then
//! the trailers that end it) left in two writes, two syscalls and two TCP
//! segments, the client woken twice. A connection's transport here holds a
//! small write that ends inside a response — its last frame such a DATA
//! frame, without END_STREAM — for the rest of h2's turn, and sends it with
//! the next write, the trailers: one write a call. Should the turn end
//! without more (a result streamed while its model works), the held bytes
//! go at the connection's next turn, which a timer `HOLD_FOR` away asks
//! for; so no byte waits longer than that. Small DATA frames (heartbeats)
//! are copied by h2 and flushed at the end of its turn: a write ending in
//! one goes at once. Writes that do not fit beside what is held
//! (`HOLD_MAX`) go as they come, after it: bulk data is never copied.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// The most bytes held: a small call's whole response fits, bulk does not.
const HOLD_MAX: usize = 8 << 10;
/// The longest held bytes wait for the rest of their turn.
const HOLD_FOR: Duration = Duration::from_millis(1);
/// Where the release timer rests while nothing is held (it is moved, not
/// cancelled: moving a timer later costs the timer wheel nothing).
const AT_REST: Duration = Duration::from_secs(86_400);

/// `io` with writes gathered as the module says.
#[derive(Debug)]
pub(crate) struct Coalesce<T> {
    io: T,
    held: Vec<u8>,
    /// Wakes the connection should its turn end with bytes held; made on
    /// the first hold.
    release: Option<Pin<Box<Sleep>>>,
    /// Whether `release` is set for the bytes held now.
    armed: bool,
}

impl<T> Coalesce<T> {
    pub(crate) fn new(io: T) -> Self {
        Self { io, held: Vec::new(), release: None, armed: false }
    }

    /// Whether bytes are held for the rest of this turn: held, and their
    /// release not yet due.
    fn holding(&self) -> bool {
        self.armed && !self.held.is_empty() && self.release.as_ref().is_some_and(|r| !r.is_elapsed())
    }

    /// Sets the release of what is held now, waking this task (`cx`) at it.
    fn arm(&mut self, cx: &mut Context<'_>) {
        if self.armed {
            return;
        }
        let due = Instant::now() + HOLD_FOR;
        let release = self.release.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        release.as_mut().reset(due);
        // Registers the task's waker; the deadline is ahead, so not ready.
        let _ = release.as_mut().poll(cx);
        self.armed = true;
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes out what is held.
    fn send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        if std::mem::take(&mut self.armed)
            && let Some(release) = &mut self.release
        {
            release.as_mut().reset(Instant::now() + AT_REST);
        }
        Poll::Ready(Ok(()))
    }
}

/// Whether `frames` is whole HTTP/2 frames ending in a DATA frame without
/// END_STREAM that h2 sent by reference (`CHAINED` bytes or more): h2
/// flushed to write it and is about to write the rest of its turn. Anything
/// else — a response's end, a small DATA frame (a heartbeat: h2 copies
/// those and flushes only at the end of its turn), control frames, a write
/// that does not start on a frame (after a short write) — is sent at once.
fn ends_inside_a_response(mut frames: &[u8]) -> bool {
    const HEAD: usize = 9;
    const DATA: u8 = 0x0;
    const END_STREAM: u8 = 0x1;
    // h2's `CHAIN_THRESHOLD` with vectored writes (`is_write_vectored`).
    const CHAINED: usize = 256;
    loop {
        let Some(head) = frames.get(..HEAD) else { return false };
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        match frames.len().checked_sub(HEAD + len) {
            Some(0) => return head[3] == DATA && head[4] & END_STREAM == 0 && len >= CHAINED,
            Some(_) => frames = &frames[HEAD + len..],
            None => return false,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // A new turn: what the last one held goes first. A full socket
        // keeps it for later (its waker is set) and reading goes on.
        if let Poll::Ready(Err(e)) = self.send_held(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if this.held.len() + len > HOLD_MAX {
            ready!(this.send_held(cx))?;
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        let start = this.held.len();
        if this.held.capacity() == 0 {
            this.held.reserve_exact(HOLD_MAX);
        }
        for b in bufs {
            this.held.extend_from_slice(b);
        }
        if ends_inside_a_response(&this.held[start..]) {
            this.arm(cx);
        } else if let Poll::Ready(Err(e)) = this.send_held(cx) {
            // Pending: the socket is full; the bytes are taken, and the
            // next flush waits for them.
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.holding() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.send_held(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.send_held(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A frame: `len` payload bytes of `kind` with `flags`, on stream 1.
    fn frame(kind: u8, flags: u8, len: usize) -> Vec<u8> {
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags, 0, 0, 0, 1];
        f.resize(9 + len, 7);
        f
    }

    const HEADERS: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;

    #[test]
    fn a_write_ending_in_data_without_end_stream_is_inside_a_response() {
        let headers = frame(HEADERS, END_HEADERS, 12);
        let data = frame(0, 0, 1074);
        assert!(ends_inside_a_response(&[headers.clone(), data.clone()].concat()));
        assert!(ends_inside_a_response(&data));
        assert!(!ends_inside_a_response(&frame(0, 1, 1074)), "DATA with END_STREAM ends it");
        assert!(!ends_inside_a_response(&frame(HEADERS, END_HEADERS | 1, 1)), "trailers end it");
        assert!(!ends_inside_a_response(&[data.clone(), frame(HEADERS, END_HEADERS | 1, 1)].concat()));
        assert!(!ends_inside_a_response(&frame(0x6, 0, 8)), "a PING goes at once");
        assert!(!ends_inside_a_response(&frame(0, 0, 40)), "a heartbeat: h2 copied it, its turn is over");
        assert!(!ends_inside_a_response(&data[..100]), "a frame cut short");
        assert!(!ends_inside_a_response(&data[3..]), "not on a frame boundary");
        assert!(!ends_inside_a_response(&[]));
    }

    /// An IO that records each write it is given and reads nothing yet.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Recorder {
        fn writes(&self) -> Vec<Vec<u8>> {
            self.0.lock().expect("writes").clone()
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            self.0.lock().expect("writes").push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_response_and_its_trailers_go_in_one_write() {
        let io = Recorder::default();
        let mut conn = Coalesce::new(io.clone());
        let response = [frame(HEADERS, END_HEADERS, 12), frame(0, 0, 1074)].concat();
        let trailers = frame(HEADERS, END_HEADERS | 1, 1);
        // As h2 writes a small call's response: headers and the chained
        // DATA, a flush, the trailers, a flush.
        conn.write_all(&response).await.expect("write");
        conn.flush().await.expect("flush");
        assert!(io.writes().is_empty(), "held until the trailers");
        conn.write_all(&trailers).await.expect("write");
        conn.flush().await.expect("flush");
        assert_eq!(io.writes(), vec![[response, trailers].concat()], "one write");
    }

    #[tokio::test]
    async fn held_bytes_go_at_the_next_turn_and_bulk_goes_as_it_comes() {
        let io = Recorder::default();
        let mut conn = Coalesce::new(io.clone());
        let chunk = frame(0, 0, 300);
        conn.write_all(&chunk).await.expect("write");
        conn.flush().await.expect("flush");
        assert!(io.writes().is_empty());
        // The turn ends without more: the connection's next turn (a read)
        // sends what was held.
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await;
        assert!(read.is_err(), "the recorder never has anything to read");
        assert_eq!(io.writes(), vec![chunk.clone()], "sent at the next turn");

        // A write too large to hold goes after what is held, as it came.
        conn.write_all(&chunk).await.expect("write");
        let bulk = frame(0, 0, HOLD_MAX);
        conn.write_all(&bulk).await.expect("write");
        assert_eq!(io.writes(), vec![chunk.clone(), chunk.clone(), bulk], "in order, the bulk not copied");
        // A control frame goes at once.
        let ping = frame(0x6, 0, 8);
        conn.write_all(&ping).await.expect("write");
        assert_eq!(io.writes().last(), Some(&ping));
        conn.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn the_release_timer_wakes_the_task_that_held() {
        let io = Recorder::default();
        let mut conn = Coalesce::new(io.clone());
        let chunk = frame(0, 0, 300);
        let mut held = false;
        let started = std::time::Instant::now();
        let turns = std::future::poll_fn(|cx| {
            if !held {
                // A turn that holds and ends: only the release timer can
                // wake this task again.
                held = true;
                assert!(Pin::new(&mut conn).poll_write(cx, &chunk).is_ready());
                assert!(io.writes().is_empty(), "held");
                return Poll::Pending;
            }
            let mut buf = [0u8; 1];
            let _ = Pin::new(&mut conn).poll_read(cx, &mut ReadBuf::new(&mut buf));
            Poll::Ready(())
        });
        tokio::time::timeout(Duration::from_secs(5), turns).await.expect("the release timer woke the task");
        assert_eq!(io.writes(), vec![chunk]);
        assert!(started.elapsed() < Duration::from_millis(500), "within a few ms: {:?}", started.elapsed());
    }
}
