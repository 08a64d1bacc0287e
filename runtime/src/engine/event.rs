//! What a call sends back to its client, in order: heartbeats, one result,
//! then the result payload's pieces — and the channel they take to the
//! reply stream, which the service turns into replies.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, Waker},
};

use aipod::codec::Encoding;
use bytes::Bytes;
use tokio_stream::Stream;

use crate::{
    engine::status::{Beat, Phase},
    error::Error,
};

/// One thing a call sends back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// A heartbeat.
    Beat(Beat),
    /// The model's result.
    Result {
        /// The JSON result, serialized.
        json: Bytes,
        /// Size of the result payload that follows, if any.
        payload_size: Option<u64>,
        /// How the result payload is encoded: as the client encoded its own.
        encoding: Encoding,
    },
    /// The next encoded piece of the result payload.
    Data(Bytes),
}

/// How a call ended when it did not succeed: the error and the phase the
/// call was in, which the client is told.
#[derive(Debug)]
pub(crate) struct Failed {
    /// What went wrong.
    pub(crate) error: Error,
    /// Where the call was when it did.
    pub(crate) phase: Phase,
}

/// How many events may wait for the reply stream before their sender waits
/// (the client reads slowly: HTTP/2 flow control reaches the call).
pub(crate) const DEPTH: usize = 8;

/// What travels on the channel.
type Item = Result<Event, Failed>;

/// A call's events on their way to its reply stream: one sender (the call,
/// or a retained call's follower), one receiver (the stream), at most
/// [`DEPTH`] waiting. One allocation, where tokio's mpsc made two (3 KiB)
/// for the two or three events a small call sends.
pub(crate) fn channel() -> (Events, EventReceiver) {
    let shared = Arc::new(Shared(Mutex::new(State::default())));
    (Events { shared: Arc::clone(&shared) }, EventReceiver { shared })
}

/// Where a call's events go; a closed channel means the client left.
pub(crate) struct Events {
    shared: Arc<Shared>,
}

/// The reply stream's end of the channel: the events, then the end once
/// the sender is gone.
pub(crate) struct EventReceiver {
    shared: Arc<Shared>,
}

/// The receiver is gone: the client left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

struct Shared(Mutex<State>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct State {
    /// The waiting events, `len` of them from `head`, in a ring.
    ring: [Option<Item>; DEPTH],
    head: usize,
    len: usize,
    sender_gone: bool,
    receiver_gone: bool,
    /// The receiver, waiting for an event.
    receiver: Option<Waker>,
    /// The sender, waiting for room.
    room: Option<Waker>,
    /// The sender, waiting for the receiver to go.
    closing: Option<Waker>,
}

impl State {
    fn push(&mut self, item: Item) {
        self.ring[(self.head + self.len) % DEPTH] = Some(item);
        self.len += 1;
    }

    fn pop(&mut self) -> Option<Item> {
        if self.len == 0 {
            return None;
        }
        let item = self.ring[self.head].take();
        self.head = (self.head + 1) % DEPTH;
        self.len -= 1;
        item
    }
}

/// Keeps `cx`'s waker in `slot` (not cloned again when it is the same).
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

impl Events {
    /// Sends `item`, waiting for room; `Closed` when the receiver is gone.
    pub(crate) async fn send(&self, item: Item) -> Result<(), Closed> {
        let mut item = Some(item);
        std::future::poll_fn(|cx| {
            let mut s = self.shared.lock();
            if s.receiver_gone {
                return Poll::Ready(Err(Closed));
            }
            if s.len == DEPTH {
                register(&mut s.room, cx);
                return Poll::Pending;
            }
            if let Some(item) = item.take() {
                s.push(item);
            }
            let receiver = s.receiver.take();
            drop(s);
            wake(receiver);
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Sends `item` if there is room now (a heartbeat that can be skipped).
    pub(crate) fn try_send(&self, item: Item) -> Result<(), Closed> {
        let mut s = self.shared.lock();
        if s.receiver_gone || s.len == DEPTH {
            return Err(Closed);
        }
        s.push(item);
        let receiver = s.receiver.take();
        drop(s);
        wake(receiver);
        Ok(())
    }

    /// Resolves once the receiver is gone.
    pub(crate) async fn closed(&self) {
        std::future::poll_fn(|cx| {
            let mut s = self.shared.lock();
            if s.receiver_gone {
                return Poll::Ready(());
            }
            register(&mut s.closing, cx);
            Poll::Pending
        })
        .await;
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.sender_gone = true;
        let receiver = s.receiver.take();
        drop(s);
        wake(receiver);
    }
}

impl EventReceiver {
    /// The next event; `None` once the sender is gone and none waits.
    pub(crate) fn poll_recv(&mut self, cx: &Context<'_>) -> Poll<Option<Item>> {
        let mut s = self.shared.lock();
        if let Some(item) = s.pop() {
            let room = s.room.take();
            drop(s);
            wake(room);
            return Poll::Ready(Some(item));
        }
        if s.sender_gone {
            return Poll::Ready(None);
        }
        register(&mut s.receiver, cx);
        Poll::Pending
    }
}

impl Stream for EventReceiver {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.poll_recv(cx)
    }
}

impl Drop for EventReceiver {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.receiver_gone = true;
        let left = std::mem::take(&mut s.ring);
        s.len = 0;
        let (room, closing) = (s.room.take(), s.closing.take());
        drop(s);
        drop(left); // outside the lock
        wake(room);
        wake(closing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio_stream::StreamExt as _;

    fn data(n: u8) -> Item {
        Ok(Event::Data(Bytes::from(vec![n])))
    }

    fn byte(item: Item) -> u8 {
        match item {
            Ok(Event::Data(b)) => b[0],
            other => panic!("data, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn events_arrive_in_order_and_end_when_the_sender_goes() {
        let (tx, rx) = channel();
        let sender = tokio::spawn(async move {
            for n in 0..100 {
                tx.send(data(n)).await.expect("the receiver is there");
            }
        });
        let got: Vec<u8> = rx.map(byte).collect().await;
        sender.await.expect("sent");
        assert_eq!(got, (0..100).collect::<Vec<_>>(), "every event, in order, across the ring's wrap");
    }

    #[tokio::test]
    async fn the_sender_waits_for_room_beyond_the_depth() {
        let (tx, mut rx) = channel();
        for n in 0..DEPTH as u8 {
            tx.try_send(data(n)).expect("room");
        }
        assert_eq!(tx.try_send(data(99)), Err(Closed), "full: a heartbeat would be skipped");
        let blocked = tokio::time::timeout(Duration::from_millis(50), tx.send(data(8))).await;
        assert!(blocked.is_err(), "a full channel holds the sender");
        let first = std::future::poll_fn(|cx| rx.poll_recv(cx)).await.expect("an event");
        assert_eq!(byte(first), 0);
        tokio::time::timeout(Duration::from_secs(5), tx.send(data(8))).await.expect("room again").expect("sent");
        drop(tx);
        let rest: Vec<u8> = rx.map(byte).collect().await;
        assert_eq!(rest, (1..=8).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn the_sender_learns_the_receiver_left_even_while_it_waits() {
        let (tx, rx) = channel();
        for n in 0..DEPTH as u8 {
            tx.send(data(n)).await.expect("room");
        }
        let tx = Arc::new(tx);
        let waiting = tokio::spawn({
            let tx = Arc::clone(&tx);
            async move { tx.send(data(9)).await }
        });
        let closed = tokio::spawn({
            let tx = Arc::clone(&tx);
            async move { tx.closed().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(rx);
        assert_eq!(waiting.await.expect("ran"), Err(Closed), "a waiting send fails");
        tokio::time::timeout(Duration::from_secs(5), closed).await.expect("woken").expect("ran");
        assert_eq!(tx.send(data(1)).await, Err(Closed));
        assert_eq!(tx.try_send(data(1)), Err(Closed));
    }
}
