//! The heartbeats that report a call's live status (`status`): sent at
//! once when the header is accepted, then every interval until the result,
//! so no proxy ever sees an idle stream.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use std::{
    collections::HashMap,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    sync::watch,
    time::{Interval, MissedTickBehavior},
};
use tokio_stream::Stream;
use tokio_util::sync::ReusableBoxFuture;

use crate::{
    engine::event::{Event, EventReceiver, Failed},
    engine::status::CallStatus,
    observe::metrics::Metrics,
};

/// The heartbeat clock of one call: ticks at the instants of the
/// process-wide grid of its interval (the first at most one interval from
/// now; the first heartbeat is sent by the caller at once); never ticks when
/// heartbeats are off. Calls do not each hold a timer: one thread per
/// interval ticks the grid and wakes every call waiting on it, so ten
/// thousand waiting calls cost one timer, not ten thousand.
pub(crate) struct Ticker {
    clock: Clock,
}

enum Clock {
    Off,
    Grid(watch::Receiver<u64>),
    /// No grid thread could be started: a timer of the call's own.
    Own(Interval),
}

/// The first instant of the grid of `every` after `now`: all calls beat at
/// the same instants, so one wake-up serves them together and HTTP/2 writes
/// their heartbeats in a few syscalls instead of one wake-up and one write
/// per call spread over the second. No gap exceeds `every`.
fn next_boundary(now: Instant, every: Duration) -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let since = now.saturating_duration_since(epoch).as_nanos();
    let step = every.as_nanos().max(1);
    let ticks = u32::try_from(since / step + 1).unwrap_or(u32::MAX);
    let at = epoch + every.saturating_mul(ticks);
    // Only before the grid exists (the very first call) is `at` off.
    if at > now && at - now <= every { at } else { now + every }
}

/// The next instant of the process-wide heartbeat grid of `every` (at most
/// `every` from now).
pub(crate) fn next_grid_instant(every: Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(next_boundary(Instant::now(), every))
}

/// A receiver of the grid of `every`, its thread started on first use;
/// `None` if no thread could be started.
fn grid(every: Duration) -> Option<watch::Receiver<u64>> {
    static GRIDS: std::sync::OnceLock<Mutex<HashMap<Duration, watch::Sender<u64>>>> = std::sync::OnceLock::new();
    let mut grids = GRIDS.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(tx) = grids.get(&every) {
        return Some(tx.subscribe());
    }
    let (tx, rx) = watch::channel(0u64);
    let ticks = tx.clone();
    std::thread::Builder::new()
        .name("aipod-heartbeat".into())
        .spawn(move || {
            let mut n = 0u64;
            loop {
                let now = Instant::now();
                std::thread::sleep(next_boundary(now, every).saturating_duration_since(now));
                n += 1;
                ticks.send_replace(n);
            }
        })
        .ok()?;
    grids.insert(every, tx);
    Some(rx)
}

impl Ticker {
    /// A ticker for `every`; `None` or zero turns heartbeats off.
    pub(crate) fn new(every: Option<Duration>) -> Self {
        let clock = match every.filter(|d| !d.is_zero()) {
            None => Clock::Off,
            Some(d) => match grid(d) {
                Some(mut rx) => {
                    rx.mark_unchanged();
                    Clock::Grid(rx)
                }
                None => {
                    let mut i = tokio::time::interval_at(next_grid_instant(d), d);
                    // A stalled call should not burst heartbeats to catch up.
                    i.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    Clock::Own(i)
                }
            },
        };
        Self { clock }
    }

    /// Whether heartbeats are on.
    pub(crate) fn is_on(&self) -> bool {
        !matches!(self.clock, Clock::Off)
    }

    /// Resolves at the next heartbeat; never, when heartbeats are off.
    pub(crate) async fn tick(&mut self) {
        match &mut self.clock {
            Clock::Grid(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            Clock::Own(i) => {
                i.tick().await;
            }
            Clock::Off => std::future::pending().await,
        }
    }
}

/// A direct call's events with its heartbeats put in between — by the
/// stream the client reads, not by the call's task: a heartbeat wakes only
/// the task that writes it (ten thousand waiting calls wake ten thousand
/// tasks a second, not twice that). The first goes out at once, so the
/// client knows its header was accepted; they stop with the result or the
/// error. A client that has not read the last heartbeat gets no new one
/// (the stream is only polled when HTTP/2 can take more).
pub(crate) struct Beating {
    events: EventReceiver,
    status: Arc<CallStatus>,
    metrics: Arc<Metrics>,
    /// The heartbeats after the first.
    ticks: Ticks,
    first: bool,
    /// Leave the first heartbeat out when the answer is ready before it.
    quiet_start: bool,
    /// An event read before the first heartbeat, sent right after it.
    held: Option<Option<Result<Event, Failed>>>,
}

/// The heartbeats after the first.
enum Ticks {
    /// None: heartbeats are off, or the answer is on its way.
    Over,
    /// Every this long, from the first time the stream waits for an event:
    /// a call answered at once never joins the heartbeat grid.
    Unarmed(Duration),
    /// The next tick.
    Armed(ReusableBoxFuture<'static, Ticker>),
}

impl Beating {
    /// The events from `events`, with `status` reported every `every`
    /// (`None`: no heartbeats).
    pub(crate) fn new(
        events: EventReceiver,
        status: Arc<CallStatus>,
        every: Option<Duration>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let ticks = every.filter(|d| !d.is_zero()).map_or(Ticks::Over, Ticks::Unarmed);
        let first = !matches!(ticks, Ticks::Over);
        Self { events, status, metrics, ticks, first, quiet_start: false, held: None }
    }

    /// No first heartbeat when the call's answer (its result, or its error)
    /// is ready by the time the first would go: it says more than "accepted",
    /// and a small call then costs the client one message fewer (the
    /// one-message `call` method's replies).
    pub(crate) fn quiet_start(mut self) -> Self {
        self.quiet_start = true;
        self
    }

    fn beat(&self) -> Option<Result<Event, Failed>> {
        self.metrics.heartbeat_sent();
        Some(Ok(Event::Beat(self.status.snapshot())))
    }
}

/// Whether `event` answers the call (its result, its error, or the end):
/// no heartbeat follows it.
fn answers(event: &Option<Result<Event, Failed>>) -> bool {
    matches!(event, None | Some(Ok(Event::Result { .. }) | Err(_)))
}

async fn next_tick(mut ticker: Ticker) -> Ticker {
    ticker.tick().await;
    ticker
}

impl Stream for Beating {
    type Item = Result<Event, Failed>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if std::mem::take(&mut self.first) {
            if std::mem::take(&mut self.quiet_start)
                && let Poll::Ready(event) = self.events.poll_recv(cx)
            {
                if answers(&event) {
                    self.ticks = Ticks::Over;
                    return Poll::Ready(event);
                }
                self.held = Some(event);
            }
            return Poll::Ready(self.beat());
        }
        let next = match self.held.take() {
            Some(event) => Poll::Ready(event),
            None => self.events.poll_recv(cx),
        };
        if let Poll::Ready(event) = next {
            if answers(&event) {
                self.ticks = Ticks::Over; // the answer is on its way: no more heartbeats
            }
            return Poll::Ready(event);
        }
        if let Ticks::Unarmed(every) = self.ticks {
            self.ticks = Ticks::Armed(ReusableBoxFuture::new(next_tick(Ticker::new(Some(every)))));
        }
        if let Ticks::Armed(tick) = &mut self.ticks
            && let Poll::Ready(ticker) = tick.poll(cx)
        {
            tick.set(next_tick(ticker));
            return Poll::Ready(self.beat());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_share_one_grid_and_never_wait_longer_than_the_interval() {
        let every = Duration::from_millis(1000);
        let _ = next_boundary(Instant::now(), every); // the grid exists
        let base = Instant::now();
        let a = next_boundary(base, every);
        let b = next_boundary(base + Duration::from_millis(300), every);
        assert!(a > base && a - base <= every);
        assert!(b - (base + Duration::from_millis(300)) <= every);
        // Two calls started 300 ms apart beat at the same instants.
        let grid = |t: Instant| t.duration_since(a).as_nanos() % every.as_nanos();
        assert_eq!(grid(b), 0);
    }

    // Real time, not tokio's paused clock: `test-util` would change tokio's
    // features for test builds only and recompile everything built on it.
    #[tokio::test]
    async fn ticker_ticks_every_interval_from_now() {
        let every = Duration::from_millis(40);
        let mut t = Ticker::new(Some(every));
        let start = tokio::time::Instant::now();
        t.tick().await;
        let first = start.elapsed();
        assert!(first >= every, "first tick after {first:?}, before the interval");
        t.tick().await;
        t.tick().await;
        let third = start.elapsed();
        assert!(third >= 3 * every, "three ticks in {third:?}");
        // The ticks keep their grid: no drift by a whole interval per tick.
        assert!(third < 3 * every + Duration::from_millis(500), "three ticks took {third:?}");
    }

    /// The first items of a call's reply stream whose channel holds `queued`.
    async fn first_items(queued: Vec<Event>, quiet_start: bool) -> Vec<&'static str> {
        use tokio_stream::StreamExt as _;
        let (tx, rx) = crate::engine::event::channel();
        for e in queued {
            tx.send(Ok(e)).await.expect("queued");
        }
        drop(tx);
        let beating = Beating::new(rx, CallStatus::new(), Some(Duration::from_secs(60)), Arc::default());
        let beating = if quiet_start { beating.quiet_start() } else { beating };
        beating
            .map(|e| match e {
                Ok(Event::Beat(_)) => "beat",
                Ok(Event::Result { .. }) => "result",
                Ok(Event::Data(_)) => "data",
                Err(_) => "error",
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_quiet_start_leaves_the_first_heartbeat_out_only_when_the_answer_is_ready() {
        let result =
            || Event::Result { json: "{}".into(), payload_size: Some(1), encoding: aipod::codec::Encoding::Identity };
        let answered = || vec![result(), Event::Data("x".into())];
        assert_eq!(first_items(answered(), false).await, ["beat", "result", "data"], "chaos: always a first beat");
        assert_eq!(first_items(answered(), true).await, ["result", "data"], "ready at once: no beat");
        // Anything before the answer keeps its first heartbeat, and its order.
        let progress = Event::Beat(CallStatus::new().snapshot());
        assert_eq!(first_items(vec![progress, result()], true).await, ["beat", "beat", "result"]);
    }

    #[tokio::test]
    async fn only_a_call_that_waits_joins_the_heartbeat_grid() {
        use tokio_stream::StreamExt as _;
        let every = Some(Duration::from_millis(40));
        let result =
            || Event::Result { json: "{}".into(), payload_size: None, encoding: aipod::codec::Encoding::Identity };
        // Answered at once: no ticker is made (a lock on the grids and a
        // subscription, per small call).
        let (tx, rx) = crate::engine::event::channel();
        tx.send(Ok(result())).await.expect("queued");
        drop(tx);
        let mut answered = Beating::new(rx, CallStatus::new(), every, Arc::default()).quiet_start();
        while answered.next().await.is_some() {
            assert!(!matches!(answered.ticks, Ticks::Armed(_)), "a ticker for a call answered at once");
        }
        // Waiting: the first heartbeat at once, then one a tick.
        let (tx, rx) = crate::engine::event::channel();
        let mut waiting = Beating::new(rx, CallStatus::new(), every, Arc::default());
        for n in 0..3 {
            let beat = tokio::time::timeout(Duration::from_secs(5), waiting.next()).await.expect("a heartbeat");
            assert!(matches!(beat, Some(Ok(Event::Beat(_)))), "heartbeat {n}");
        }
        assert!(matches!(waiting.ticks, Ticks::Armed(_)));
        drop(tx);
    }

    #[tokio::test]
    async fn ticker_off_never_ticks() {
        let mut t = Ticker::new(Some(Duration::ZERO));
        assert!(!t.is_on());
        let r = tokio::time::timeout(Duration::from_millis(300), t.tick()).await;
        assert!(r.is_err());
    }
}
