//! Graceful drain: on the first SIGTERM/SIGINT the server stops taking new
//! calls, lets in-flight ones finish, then stops; a second signal exits at once.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::Notify,
};

use crate::{
    engine::release::Activity,
    error::{Error, Result},
};

/// Whether the server drains, and how many calls are in flight.
#[derive(Debug)]
pub(crate) struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    /// Told when the last call in flight ends.
    emptied: Notify,
    /// Calls starting and ending, for the memory release.
    activity: Arc<Activity>,
    /// Cancelled when the drain timeout passes: calls still running end
    /// with UNAVAILABLE before the connections close.
    abandon: tokio_util::sync::CancellationToken,
    /// Cancelled when the drain starts: connections wake up to close once
    /// they carry no call.
    started: tokio_util::sync::CancellationToken,
}

/// Counts one call as in flight until dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    drain: Arc<Drain>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.drain.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drain.emptied.notify_waiters();
        }
        self.drain.activity.touch();
    }
}

impl Drain {
    /// A server that is not draining, with no calls.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            emptied: Notify::new(),
            activity: Arc::default(),
            abandon: tokio_util::sync::CancellationToken::new(),
            started: tokio_util::sync::CancellationToken::new(),
        })
    }

    /// Starts draining: from now on new calls are refused.
    pub(crate) fn start(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.started.cancel();
    }

    /// Completes when the drain starts.
    pub(crate) fn started(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.started.clone().cancelled_owned()
    }

    /// Whether the server is draining.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Calls in flight now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Calls starting and ending, as the memory release watches them.
    pub(crate) fn activity(&self) -> Arc<Activity> {
        Arc::clone(&self.activity)
    }

    /// Admits a call unless the server drains or already holds `max`
    /// calls (counted from their header on, receiving ones included).
    pub(crate) fn enter(self: &Arc<Self>, max: usize) -> Result<InFlight> {
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.activity.touch();
        let guard = InFlight { drain: Arc::clone(self) };
        if self.is_draining() {
            return Err(Error::Draining);
        }
        if now > max {
            return Err(Error::Busy(format!(
                "the server is busy: it holds {max} calls, as many as its versions can run and queue \
                 (--max-concurrent-calls, --max-queued-calls); retry later"
            )));
        }
        Ok(guard)
    }

    /// Ends every call still in flight (the drain timeout passed).
    pub(crate) fn abandon(&self) {
        self.abandon.cancel();
    }

    /// Resolves when calls in flight are to be abandoned.
    pub(crate) async fn abandoned(&self) {
        self.abandon.cancelled().await;
    }

    /// Resolves once no call is in flight.
    pub(crate) async fn idle(&self) {
        loop {
            // Listening before looking: an end between the two still wakes it.
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            emptied.await;
        }
    }
}

/// SIGTERM and SIGINT, as one stream of shutdown requests.
#[derive(Debug)]
pub(crate) struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers; from now on the signals no longer kill the process.
    pub(crate) fn install() -> io::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Waits for the next signal and returns its name.
    pub(crate) async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn refuses_new_calls_and_waits_for_old_ones() {
        let drain = Drain::new();
        let a = drain.enter(10).expect("admitted");
        drain.start();
        assert!(matches!(drain.enter(10), Err(Error::Draining)));
        assert_eq!(drain.in_flight(), 1, "the refused call is not counted");
        let idle = tokio::spawn({
            let drain = Arc::clone(&drain);
            async move { drain.idle().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!idle.is_finished(), "a call is still in flight");
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), idle).await.expect("idle").expect("join");
    }

    #[test]
    fn holds_at_most_max_calls_and_a_refusal_is_not_counted() {
        let drain = Drain::new();
        let held: Vec<_> = (0..2).map(|_| drain.enter(2).expect("room")).collect();
        let refused = drain.enter(2).expect_err("full");
        assert!(matches!(refused, Error::Busy(_)) && refused.retryable(), "{refused}");
        assert_eq!(drain.in_flight(), 2);
        drop(held);
        assert!(drain.enter(2).is_ok(), "room again");
    }
}
