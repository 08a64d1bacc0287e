//! What a model says of its progress: the [`Progress`] handle a model gets
//! with each call, and the cell it writes, which the call's status reads
//! when a heartbeat goes out. Lock-free for everyone but the model.

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// The model's handle for reporting progress into heartbeats.
#[derive(Clone)]
pub struct Progress {
    holder: Arc<dyn HoldsProgress>,
}

/// What holds a call's [`ProgressCell`]: the call's status, so that the
/// status and the cell are one allocation (or the cell itself).
pub(crate) trait HoldsProgress: Send + Sync {
    fn progress_cell(&self) -> &ProgressCell;
}

impl HoldsProgress for ProgressCell {
    fn progress_cell(&self) -> &ProgressCell {
        self
    }
}

impl Progress {
    pub(crate) fn new(holder: Arc<dyn HoldsProgress>) -> Self {
        Self { holder }
    }

    /// Reports a fraction done (clamped to 0..1) and a short message.
    pub fn report(&self, fraction: Option<f32>, message: impl Into<String>) {
        self.holder.progress_cell().set(fraction, message.into());
    }

    /// Progress that rises linearly from 0 now to 1 after `total`, computed
    /// as each heartbeat goes out — for work of a known duration, without
    /// waking the model to report it (until [`Progress::report`] gives a
    /// fraction again).
    pub fn linear(&self, total: Duration, message: impl Into<String>) {
        self.holder.progress_cell().set_linear(total, message.into());
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress").finish_non_exhaustive()
    }
}

/// What the model last said of its progress.
#[derive(Debug, Default)]
pub(crate) struct ProgressCell(Mutex<Reported>);

#[derive(Debug, Default)]
struct Reported {
    fraction: Option<f32>,
    message: String,
    /// A fraction rising on its own from an instant over a duration,
    /// computed when it is read (no wake-up of the model).
    linear: Option<(Instant, Duration)>,
}

impl ProgressCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, Reported> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a fraction (clamped to 0..1; a fraction replaces one rising
    /// on its own) and a message (an empty one keeps the last).
    pub(crate) fn set(&self, fraction: Option<f32>, message: String) {
        let fraction = fraction.filter(|f| f.is_finite()).map(|f| f.clamp(0.0, 1.0));
        let mut p = self.lock();
        if fraction.is_some() {
            p.fraction = fraction;
            p.linear = None;
        }
        if !message.is_empty() {
            p.message = message;
        }
    }

    /// Makes the fraction rise linearly from now to 1 over `total` (until a
    /// fraction is reported again), with `message`.
    pub(crate) fn set_linear(&self, total: Duration, message: String) {
        let mut p = self.lock();
        p.fraction = Some(0.0);
        p.message = message;
        p.linear = Some((Instant::now(), total));
    }

    /// The fraction and message now.
    pub(crate) fn read(&self) -> (Option<f32>, String) {
        let p = self.lock();
        let fraction = match p.linear {
            Some((from, total)) => {
                let done = from.elapsed().as_secs_f64() / total.as_secs_f64().max(f64::EPSILON);
                Some(done.clamp(0.0, 1.0) as f32)
            }
            None => p.fraction,
        };
        (fraction, p.message.clone())
    }
}
