//! Admission to a model version: at most `max_running` calls run at once, at
//! most `max_waiting` wait in FIFO order, each waiter knowing its position.
//! A slot freed by a finished call passes straight to the first waiter.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
};

use tokio::sync::oneshot;

/// Where a waiting call's 1-based place in line is written: a call's status
/// (an `AtomicU32` in tests).
pub(crate) trait Place: Send + Sync + std::fmt::Debug {
    /// The call is now `place`-th in line.
    fn set_place(&self, place: u32);
}

impl Place for AtomicU32 {
    fn set_place(&self, place: u32) {
        self.store(place, Ordering::Relaxed);
    }
}

/// The queue is full: the caller should refuse the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{waiting} calls already wait for this model version (limit {limit})")]
pub(crate) struct QueueFull {
    /// Calls waiting when this one was refused.
    pub waiting: usize,
    /// The configured limit.
    pub limit: usize,
}

/// One model version's run slots and waiting line.
#[derive(Debug)]
pub(crate) struct Queue {
    max_running: usize,
    max_waiting: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    running: usize,
    next_id: u64,
    waiting: VecDeque<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    position: Arc<dyn Place>,
    slot: oneshot::Sender<Permit>,
}

/// A run slot; dropping it frees the slot for the next waiter.
#[derive(Debug)]
pub(crate) struct Permit {
    queue: Option<Arc<Queue>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            queue.release();
        }
    }
}

impl Queue {
    /// A queue with the given limits (`max_running` is at least 1).
    pub(crate) fn new(max_running: usize, max_waiting: usize) -> Arc<Self> {
        Arc::new(Self { max_running: max_running.max(1), max_waiting, state: Mutex::default() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many calls may run at once.
    pub(crate) fn running_limit(&self) -> usize {
        self.max_running
    }

    /// Calls running and waiting now.
    pub(crate) fn load(&self) -> (usize, usize) {
        let s = self.lock();
        (s.running, s.waiting.len())
    }

    /// Fails fast when a call arriving now could not even wait.
    pub(crate) fn check_room(&self) -> Result<(), QueueFull> {
        let s = self.lock();
        if s.running >= self.max_running && s.waiting.len() >= self.max_waiting {
            return Err(QueueFull { waiting: s.waiting.len(), limit: self.max_waiting });
        }
        Ok(())
    }

    /// Waits for a run slot. `position` is kept up to date with the call's
    /// 1-based place in line while it waits (and held only then). Dropping
    /// the future leaves the line cleanly.
    pub(crate) async fn acquire<P: Place + 'static>(self: &Arc<Self>, position: &Arc<P>) -> Result<Permit, QueueFull> {
        let (id, rx) = {
            let mut s = self.lock();
            if s.running < self.max_running && s.waiting.is_empty() {
                s.running += 1;
                return Ok(Permit { queue: Some(Arc::clone(self)) });
            }
            if s.waiting.len() >= self.max_waiting {
                return Err(QueueFull { waiting: s.waiting.len(), limit: self.max_waiting });
            }
            let id = s.next_id;
            s.next_id += 1;
            let (tx, rx) = oneshot::channel();
            position.set_place(s.waiting.len() as u32 + 1);
            s.waiting.push_back(Waiter { id, position: Arc::clone(position) as Arc<dyn Place>, slot: tx });
            (id, rx)
        };
        let mut guard = LeaveOnDrop { queue: self, id, rx: Some(rx) };
        let rx = guard.rx.as_mut().expect("receiver present until completion");
        // The sender is only dropped after a send, so this cannot fail while
        // the waiter is in line; treat a failure as "try again never".
        let permit = rx.await.map_err(|_| QueueFull { waiting: 0, limit: self.max_waiting })?;
        guard.rx = None;
        Ok(permit)
    }

    fn release(self: &Arc<Self>) {
        let mut s = self.lock();
        while let Some(waiter) = s.waiting.pop_front() {
            renumber(&s.waiting);
            match waiter.slot.send(Permit { queue: Some(Arc::clone(self)) }) {
                Ok(()) => return,
                // The waiter left between our pop and send: defuse the permit
                // (the slot is still ours to give) and try the next one.
                Err(mut permit) => permit.queue = None,
            }
        }
        s.running -= 1;
    }
}

fn renumber(waiting: &VecDeque<Waiter>) {
    for (i, w) in waiting.iter().enumerate() {
        w.position.set_place(i as u32 + 1);
    }
}

/// Removes a waiter from the line when its future is dropped before it got a
/// slot; a slot that was sent but not received is released by the permit's
/// own drop, after the lock is released.
struct LeaveOnDrop<'a> {
    queue: &'a Arc<Queue>,
    id: u64,
    rx: Option<oneshot::Receiver<Permit>>,
}

impl Drop for LeaveOnDrop<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        {
            let mut s = self.queue.lock();
            if let Some(i) = s.waiting.iter().position(|w| w.id == self.id) {
                s.waiting.remove(i);
                renumber(&s.waiting);
                return;
            }
        }
        // Already handed a slot: take it so it is released properly.
        drop(rx.try_recv());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cell() -> Arc<AtomicU32> {
        Arc::new(AtomicU32::new(0))
    }

    #[tokio::test]
    async fn runs_up_to_the_limit_then_queues_in_order_with_positions() {
        let q = Queue::new(2, 2);
        let a = q.acquire(&cell()).await.expect("a");
        let _b = q.acquire(&cell()).await.expect("b");
        let (pc, pd) = (cell(), cell());
        let qc = Arc::clone(&q);
        let c = tokio::spawn({
            let pc = Arc::clone(&pc);
            async move { qc.acquire(&pc).await }
        });
        tokio::task::yield_now().await;
        while q.load().1 < 1 {
            tokio::task::yield_now().await;
        }
        let qd = Arc::clone(&q);
        let d = tokio::spawn({
            let pd = Arc::clone(&pd);
            async move { qd.acquire(&pd).await }
        });
        while q.load().1 < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!((pc.load(Ordering::Relaxed), pd.load(Ordering::Relaxed)), (1, 2));
        assert_eq!(q.acquire(&cell()).await.expect_err("full"), QueueFull { waiting: 2, limit: 2 });
        assert!(q.check_room().is_err());

        drop(a);
        let c = c.await.expect("join").expect("c admitted");
        assert_eq!(pd.load(Ordering::Relaxed), 1, "d moved up");
        assert_eq!(q.load(), (2, 1));
        drop(c);
        let _d = d.await.expect("join").expect("d admitted");
        assert_eq!(q.load(), (2, 0));
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_frees_its_place_and_loses_no_slot() {
        let q = Queue::new(1, 4);
        let a = q.acquire(&cell()).await.expect("a");
        let (pb, pc) = (cell(), cell());
        let b = tokio::spawn({
            let q = Arc::clone(&q);
            let pb = Arc::clone(&pb);
            async move { q.acquire(&pb).await }
        });
        while q.load().1 < 1 {
            tokio::task::yield_now().await;
        }
        let c = tokio::spawn({
            let q = Arc::clone(&q);
            let pc = Arc::clone(&pc);
            async move { q.acquire(&pc).await }
        });
        while q.load().1 < 2 {
            tokio::task::yield_now().await;
        }
        b.abort();
        let _ = b.await;
        assert_eq!(q.load(), (1, 1));
        assert_eq!(pc.load(Ordering::Relaxed), 1);
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(5), c).await.expect("c not stuck").expect("join");
        drop(c.expect("c admitted"));
        assert_eq!(q.load(), (0, 0), "every slot returned");
    }
}
