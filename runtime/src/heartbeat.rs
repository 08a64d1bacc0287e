//! A call's live status and the heartbeats that report it: sent at once when
//! the header is accepted, then every interval until the result, so no proxy
//! ever sees an idle stream.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
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
    event::{Event, Failed},
    metrics::Metrics,
};

/// Where a call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Receiving the payload.
    Receiving,
    /// Waiting for a free model slot.
    Queued,
    /// The model is working.
    Running,
    /// Sending the result payload.
    Sending,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Receiving,
            1 => Self::Queued,
            2 => Self::Running,
            _ => Self::Sending,
        }
    }
}

/// One heartbeat's content: a snapshot of a call's status.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Beat {
    /// The call's phase.
    pub phase: Phase,
    /// Time since the header was accepted.
    pub elapsed: Duration,
    /// Decoded payload bytes received so far.
    pub received_bytes: u64,
    /// 1-based queue position while queued, else 0.
    pub queue_position: u32,
    /// The model's latest progress fraction.
    pub progress: Option<f32>,
    /// The model's latest message.
    pub message: String,
    /// A retained call's retain time; zero for other calls.
    pub retain: Duration,
}

/// A call's status, shared by the parts that change it (receiver, queue,
/// model) and the heartbeat that reads it. Lock-free except for the model's
/// progress message.
#[derive(Debug)]
pub(crate) struct CallStatus {
    started: Instant,
    phase: AtomicU8,
    received_bytes: AtomicU64,
    queue_position: Arc<AtomicU32>,
    progress: Mutex<Reported>,
    retain_s: AtomicU64,
}

/// What the model last said of its progress.
#[derive(Debug, Default)]
struct Reported {
    fraction: Option<f32>,
    message: String,
    /// A fraction rising on its own from an instant over a duration,
    /// computed when a heartbeat goes out (no wake-up of the model).
    linear: Option<(Instant, Duration)>,
}

impl CallStatus {
    /// A call that starts now, receiving.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            phase: AtomicU8::new(Phase::Receiving as u8),
            received_bytes: AtomicU64::new(0),
            queue_position: Arc::new(AtomicU32::new(0)),
            progress: Mutex::default(),
            retain_s: AtomicU64::new(0),
        })
    }

    /// Marks the call retained for `retain` (whole seconds are reported).
    pub(crate) fn set_retain(&self, retain: Duration) {
        self.retain_s.store(retain.as_secs(), Ordering::Relaxed);
    }

    /// Moves the call to `phase`.
    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Records how many payload bytes have been decoded.
    pub(crate) fn set_received(&self, bytes: u64) {
        self.received_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The cell the queue updates with this call's position.
    pub(crate) fn queue_position_cell(&self) -> Arc<AtomicU32> {
        Arc::clone(&self.queue_position)
    }

    /// Makes the fraction rise linearly from now to 1 over `total` (until a
    /// fraction is reported again), with `message`.
    pub(crate) fn set_linear_progress(&self, total: Duration, message: String) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.fraction = Some(0.0);
        p.message = message;
        p.linear = Some((Instant::now(), total));
    }

    /// Records the model's progress; the fraction is clamped to 0..1.
    pub(crate) fn set_progress(&self, fraction: Option<f32>, message: String) {
        let fraction = fraction.filter(|f| f.is_finite()).map(|f| f.clamp(0.0, 1.0));
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if fraction.is_some() {
            // A fraction reported replaces one rising on its own.
            p.fraction = fraction;
            p.linear = None;
        }
        if !message.is_empty() {
            p.message = message;
        }
    }

    /// The call's phase now.
    pub(crate) fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// Time since the call started.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Decoded payload bytes received so far.
    pub(crate) fn received(&self) -> u64 {
        self.received_bytes.load(Ordering::Relaxed)
    }

    /// The heartbeat to send now.
    pub(crate) fn snapshot(&self) -> Beat {
        let phase = self.phase();
        let (progress, message) = {
            let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            let progress = match p.linear {
                Some((from, total)) => {
                    let done = from.elapsed().as_secs_f64() / total.as_secs_f64().max(f64::EPSILON);
                    Some(done.clamp(0.0, 1.0) as f32)
                }
                None => p.fraction,
            };
            (progress, p.message.clone())
        };
        Beat {
            phase,
            elapsed: self.elapsed(),
            received_bytes: self.received(),
            queue_position: if phase == Phase::Queued { self.queue_position.load(Ordering::Relaxed) } else { 0 },
            progress,
            message,
            retain: Duration::from_secs(self.retain_s.load(Ordering::Relaxed)),
        }
    }
}

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
    events: tokio::sync::mpsc::Receiver<Result<Event, Failed>>,
    status: Arc<CallStatus>,
    metrics: Arc<Metrics>,
    /// The next tick, while heartbeats go out.
    tick: Option<ReusableBoxFuture<'static, Ticker>>,
    first: bool,
}

impl Beating {
    /// The events from `events`, with `status` reported every `every`
    /// (`None`: no heartbeats).
    pub(crate) fn new(
        events: tokio::sync::mpsc::Receiver<Result<Event, Failed>>,
        status: Arc<CallStatus>,
        every: Option<Duration>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let ticker = Ticker::new(every);
        let first = ticker.is_on();
        let tick = first.then(|| ReusableBoxFuture::new(next_tick(ticker)));
        Self { events, status, metrics, tick, first }
    }

    fn beat(&self) -> Option<Result<Event, Failed>> {
        self.metrics.heartbeat_sent();
        Some(Ok(Event::Beat(self.status.snapshot())))
    }
}

async fn next_tick(mut ticker: Ticker) -> Ticker {
    ticker.tick().await;
    ticker
}

impl Stream for Beating {
    type Item = Result<Event, Failed>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if std::mem::take(&mut self.first) {
            return Poll::Ready(self.beat());
        }
        if let Poll::Ready(event) = self.events.poll_recv(cx) {
            if matches!(event, None | Some(Ok(Event::Result { .. }) | Err(_))) {
                self.tick = None; // the answer is on its way: no more heartbeats
            }
            return Poll::Ready(event);
        }
        if let Some(tick) = &mut self.tick
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

    #[test]
    fn snapshot_reports_queue_position_only_while_queued() {
        let s = CallStatus::new();
        s.queue_position_cell().store(3, Ordering::Relaxed);
        assert_eq!(s.snapshot().queue_position, 0);
        s.set_phase(Phase::Queued);
        assert_eq!(s.snapshot().queue_position, 3);
        s.set_phase(Phase::Running);
        assert_eq!(s.snapshot().phase, Phase::Running);
        assert_eq!(s.snapshot().queue_position, 0);
    }

    #[test]
    fn linear_progress_rises_by_itself_until_a_fraction_is_reported() {
        let s = CallStatus::new();
        s.set_linear_progress(Duration::from_millis(200), "sleeping".into());
        let first = s.snapshot().progress.expect("a fraction");
        std::thread::sleep(Duration::from_millis(100));
        let later = s.snapshot().progress.expect("a fraction");
        assert!(later > first && later < 1.0, "{first} then {later}");
        assert_eq!(s.snapshot().message, "sleeping");
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(s.snapshot().progress, Some(1.0), "capped at 1");
        s.set_progress(Some(0.25), String::new());
        assert_eq!(s.snapshot().progress, Some(0.25), "a reported fraction wins");
    }

    #[test]
    fn progress_is_clamped_and_sticky() {
        let s = CallStatus::new();
        s.set_progress(Some(1.7), "epoch 1".into());
        s.set_progress(None, String::new());
        let b = s.snapshot();
        assert_eq!(b.progress, Some(1.0));
        assert_eq!(b.message, "epoch 1");
        s.set_progress(Some(f32::NAN), "epoch 2".into());
        assert_eq!(s.snapshot().progress, Some(1.0));
        assert_eq!(s.snapshot().message, "epoch 2");
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

    #[tokio::test]
    async fn ticker_off_never_ticks() {
        let mut t = Ticker::new(Some(Duration::ZERO));
        assert!(!t.is_on());
        let r = tokio::time::timeout(Duration::from_millis(300), t.tick()).await;
        assert!(r.is_err());
    }
}
