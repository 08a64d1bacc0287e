//! A call's live status: its phase, bytes received, queue position and the
//! model's progress, shared by the parts that change it (receiver, queue,
//! model) and whatever reports it (heartbeats, retained calls). A leaf: it
//! knows nothing of how it is reported.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

pub(crate) use crate::code::Phase;
use crate::model::progress::{HoldsProgress, ProgressCell};
use crate::versions::queue::Place;

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
    queue_position: AtomicU32,
    progress: ProgressCell,
    retain_s: AtomicU64,
}

impl CallStatus {
    /// A call that starts now, receiving.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            phase: AtomicU8::new(Phase::Receiving as u8),
            received_bytes: AtomicU64::new(0),
            queue_position: AtomicU32::new(0),
            progress: ProgressCell::default(),
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
        let (progress, message) = self.progress.read();
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

/// The queue writes a waiting call's place in line here.
impl Place for CallStatus {
    fn set_place(&self, place: u32) {
        self.queue_position.store(place, Ordering::Relaxed);
    }
}

/// The model's [`crate::model::progress::Progress`] writes here.
impl HoldsProgress for CallStatus {
    fn progress_cell(&self) -> &ProgressCell {
        &self.progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reports_queue_position_only_while_queued() {
        let s = CallStatus::new();
        s.set_place(3);
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
        s.progress_cell().set_linear(Duration::from_millis(200), "sleeping".into());
        let first = s.snapshot().progress.expect("a fraction");
        std::thread::sleep(Duration::from_millis(100));
        let later = s.snapshot().progress.expect("a fraction");
        assert!(later > first && later < 1.0, "{first} then {later}");
        assert_eq!(s.snapshot().message, "sleeping");
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(s.snapshot().progress, Some(1.0), "capped at 1");
        s.progress_cell().set(Some(0.25), String::new());
        assert_eq!(s.snapshot().progress, Some(0.25), "a reported fraction wins");
    }

    #[test]
    fn progress_is_clamped_and_sticky() {
        let s = CallStatus::new();
        s.progress_cell().set(Some(1.7), "epoch 1".into());
        s.progress_cell().set(None, String::new());
        let b = s.snapshot();
        assert_eq!(b.progress, Some(1.0));
        assert_eq!(b.message, "epoch 1");
        s.progress_cell().set(Some(f32::NAN), "epoch 2".into());
        assert_eq!(s.snapshot().progress, Some(1.0));
        assert_eq!(s.snapshot().message, "epoch 2");
    }
}
