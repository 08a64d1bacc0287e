//! The autoscaler's decisions, as pure functions over samples and a clock:
//! from the calls each pod of an AIPod holds, read every interval, how many
//! pods it should run, and which pods may go. No I/O here — `autoscaler`
//! reads the pods and carries the decisions out.
//!
//! - The load is the calls the pods hold, running and waiting (the
//!   runtime's `aipod_calls_in_flight`, which counts a waiting call too);
//!   the pods wanted are `ceil(load / targetCallsPerPod)` within
//!   `minReplicas..=maxReplicas`.
//! - **Up**: once the load has asked for more pods for `scaleUpDelay` (at
//!   once by default), to what it asks now; a load of [`PANIC_FACTOR`] times
//!   what the pods hold adds pods at once whatever the delay, and starts a
//!   panic window in which nothing is removed.
//! - **Down**: only after fewer pods have been enough at every reading for
//!   `scaleDownDelay`, to the most any of those readings asked for — and
//!   only by removing pods that hold no call. With none idle, the decision
//!   is [`Decision::Deferred`]. A reading that misses a pod, a pod not
//!   ready, or pods that are not the replicas (a rollout) never scales
//!   down, and restarts the delay.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

use crate::crd::AIPod;

/// The default `scaleDownDelay`.
pub const DEFAULT_SCALE_DOWN_DELAY: Duration = Duration::from_secs(300);
/// The default `interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// The runtime's `--max-concurrent-calls` default: the default target.
pub const DEFAULT_TARGET: u32 = 16;
/// A load this many times what the pods hold scales up at once.
pub const PANIC_FACTOR: f64 = 2.0;
/// How long a panic lasts after the load was last that high: no pod is
/// removed meanwhile.
pub const PANIC_WINDOW: Duration = Duration::from_secs(60);
/// The `controller.kubernetes.io/pod-deletion-cost` of a pod chosen to go:
/// the ReplicaSet removes the pods of lowest cost first (among ready pods).
pub const CHOSEN_COST: i32 = -1000;

/// `spec.autoscaling`, checked and with its defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The fewest pods (≥ 1).
    pub min: u32,
    /// The most pods (≥ `min`).
    pub max: u32,
    /// Calls one pod should hold (≥ 1).
    pub target: u32,
    /// How long the load must ask for more pods before they are added.
    pub scale_up_delay: Duration,
    /// How long fewer pods must have been enough before pods go.
    pub scale_down_delay: Duration,
    /// How often the pods are read.
    pub interval: Duration,
}

impl Policy {
    /// The policy of `aipod`: `None` without `spec.autoscaling`; an error
    /// naming the field when a value cannot be used (the API server's
    /// schema refuses them too, but manifests read from files and older
    /// CRDs are checked here).
    pub fn of(aipod: &AIPod) -> Result<Option<Self>, String> {
        let Some(spec) = &aipod.spec.autoscaling else { return Ok(None) };
        let count = |field: &str, v: i32| {
            u32::try_from(v)
                .ok()
                .filter(|v| *v >= 1)
                .ok_or_else(|| format!("spec.autoscaling.{field} is {v}: it must be at least 1"))
        };
        let min = count("minReplicas", spec.min_replicas.unwrap_or(1))?;
        let max = count("maxReplicas", spec.max_replicas)?;
        if min > max {
            return Err(format!(
                "spec.autoscaling.minReplicas ({min}) is greater than spec.autoscaling.maxReplicas ({max})"
            ));
        }
        let target = match spec.target_calls_per_pod {
            Some(v) => count("targetCallsPerPod", v)?,
            None => match aipod.spec.runtime.max_concurrent_calls {
                Some(v) => count("targetCallsPerPod (from spec.runtime.maxConcurrentCalls)", v)?,
                None => DEFAULT_TARGET,
            },
        };
        let duration = |field: &str, v: &Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(text) => aipod::duration::parse(text).map_err(|e| format!("spec.autoscaling.{field}: {e}")),
        };
        let interval = duration("interval", &spec.interval, DEFAULT_INTERVAL)?;
        if interval < Duration::from_secs(1) {
            return Err(format!("spec.autoscaling.interval is {interval:?}: it must be at least 1s"));
        }
        Ok(Some(Self {
            min,
            max,
            target,
            scale_up_delay: duration("scaleUpDelay", &spec.scale_up_delay, Duration::ZERO)?,
            scale_down_delay: duration("scaleDownDelay", &spec.scale_down_delay, DEFAULT_SCALE_DOWN_DELAY)?,
            interval,
        }))
    }

    /// The pods `load` calls ask for, within `min..=max`.
    pub fn wanted(&self, load: u64) -> u32 {
        let pods = load.div_ceil(u64::from(self.target));
        u32::try_from(pods).unwrap_or(u32::MAX).clamp(self.min, self.max)
    }
}

/// What one pod said when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLoad {
    /// The pod's name.
    pub name: String,
    /// Calls it holds: receiving, waiting, running, sending.
    pub in_flight: u64,
    /// Of those, calls waiting for a model slot.
    pub queued: u64,
}

/// One interval's reading of an AIPod's pods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sample {
    /// The ready pods that answered.
    pub pods: Vec<PodLoad>,
    /// Ready pods that did not answer (their load is unknown).
    pub unread: u32,
    /// Pods that exist but are not ready (starting, or failing).
    pub not_ready: u32,
}

impl Sample {
    /// Calls held by the pods that answered.
    pub fn in_flight(&self) -> u64 {
        self.pods.iter().map(|p| p.in_flight).sum()
    }

    /// Calls waiting, on the pods that answered.
    pub fn queued(&self) -> u64 {
        self.pods.iter().map(|p| p.queued).sum()
    }

    /// Every pod answered and is ready.
    fn complete(&self) -> bool {
        self.unread == 0 && self.not_ready == 0
    }
}

/// Why replicas stay as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The replicas are what the load asks for.
    Steady,
    /// More pods are asked for, not yet for `scaleUpDelay`.
    WaitingToScaleUp,
    /// Fewer pods are enough, not yet for `scaleDownDelay`.
    WaitingToScaleDown,
    /// A panic (a load twice what the pods hold) was recent.
    Panic,
    /// A pod did not answer, is not ready, or pods are not the replicas:
    /// nothing is removed on what cannot be seen.
    Unsettled,
}

/// What the autoscaler does this interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep the replicas.
    Hold(Hold),
    /// Scale up to `to` pods.
    Up {
        /// The new replicas.
        to: u32,
        /// Whether the load was [`PANIC_FACTOR`] times what the pods hold.
        panic: bool,
    },
    /// Remove `remove` (pods that hold no call), to `to` pods.
    Down {
        /// The new replicas.
        to: u32,
        /// The pods chosen to go, by name.
        remove: Vec<String>,
    },
    /// Fewer pods (`wanted`) would do, but every pod holds a call.
    Deferred {
        /// The replicas the load asks for.
        wanted: u32,
    },
}

impl Decision {
    /// A short label (events, metrics).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Hold(_) => "Hold",
            Self::Up { panic: true, .. } => "ScaledUpPanic",
            Self::Up { .. } => "ScaledUp",
            Self::Down { .. } => "ScaledDown",
            Self::Deferred { .. } => "ScaleDownDeferred",
        }
    }
}

/// An AIPod's autoscaler memory between readings.
#[derive(Debug, Clone, Default)]
pub struct Autoscale {
    /// The pods each complete reading asked for, oldest first, within
    /// `scaleDownDelay`.
    asked: VecDeque<(Instant, u32)>,
    /// Since when every reading was complete (the scale-down delay counts
    /// from here, not from the oldest reading kept: readings are not exactly
    /// an interval apart).
    seen_since: Option<Instant>,
    /// Since when every reading asked for more pods than there are.
    above_since: Option<Instant>,
    /// Until when no pod is removed (a panic).
    panic_until: Option<Instant>,
}

impl Autoscale {
    /// Decides for an AIPod running `replicas` (`spec.replicas`), read as
    /// `sample` at `now`.
    pub fn decide(&mut self, policy: &Policy, replicas: u32, sample: &Sample, now: Instant) -> Decision {
        let load = sample.in_flight();
        let wanted = policy.wanted(load);
        while self.asked.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) > policy.scale_down_delay) {
            self.asked.pop_front();
        }
        let settled = sample.complete() && sample.pods.len() == replicas as usize;
        if settled {
            self.asked.push_back((now, wanted));
            self.seen_since.get_or_insert(now);
        } else {
            // What was not seen may hold calls: the scale-down delay restarts.
            self.asked.clear();
            self.seen_since = None;
        }

        // Up: below the floor, a panic, or after the delay.
        if replicas < policy.min {
            // (`wanted` is never below `minReplicas`.)
            return Decision::Up { to: wanted, panic: false };
        }
        let capacity = f64::from(replicas.max(1)) * f64::from(policy.target);
        let panic = load as f64 >= PANIC_FACTOR * capacity;
        if panic {
            self.panic_until = Some(now + PANIC_WINDOW);
        }
        if wanted > replicas {
            let since = *self.above_since.get_or_insert(now);
            if panic || now.saturating_duration_since(since) >= policy.scale_up_delay {
                self.above_since = None;
                return Decision::Up { to: wanted, panic };
            }
            return Decision::Hold(Hold::WaitingToScaleUp);
        }
        self.above_since = None;

        // Down: never on what cannot be seen; above `max` at once, else
        // once every reading for `scaleDownDelay` asked for fewer pods and
        // no panic is recent — and only by pods that hold no call.
        if wanted == replicas && replicas <= policy.max {
            return Decision::Hold(Hold::Steady);
        }
        if !settled {
            return Decision::Hold(Hold::Unsettled);
        }
        let to = if replicas > policy.max {
            policy.max
        } else {
            if self.panic_until.is_some_and(|until| now < until) {
                return Decision::Hold(Hold::Panic);
            }
            let watched = self.seen_since.map(|since| now.saturating_duration_since(since)).unwrap_or_default();
            let most = self.asked.iter().map(|(_, n)| *n).max().unwrap_or(replicas);
            if watched < policy.scale_down_delay || most >= replicas {
                return Decision::Hold(Hold::WaitingToScaleDown);
            }
            most
        };
        let mut idle: Vec<&PodLoad> = sample.pods.iter().filter(|p| p.in_flight == 0).collect();
        idle.sort_by(|a, b| a.name.cmp(&b.name));
        let remove: Vec<String> = idle.iter().take((replicas - to) as usize).map(|p| p.name.clone()).collect();
        if remove.is_empty() {
            return Decision::Deferred { wanted: to };
        }
        let gone = u32::try_from(remove.len()).unwrap_or(u32::MAX);
        Decision::Down { to: replicas.saturating_sub(gone), remove }
    }
}

/// The pod-deletion cost each pod should carry before the replicas drop
/// for `decision`: [`CHOSEN_COST`] for the pods chosen to go, the calls a
/// busy pod holds, and 0 for the other idle pods — so the ReplicaSet, which
/// removes ready pods of lowest cost first, removes exactly the chosen.
pub fn deletion_costs(sample: &Sample, remove: &[String]) -> Vec<(String, i32)> {
    sample
        .pods
        .iter()
        .map(|p| {
            let cost =
                if remove.contains(&p.name) { CHOSEN_COST } else { i32::try_from(p.in_flight).unwrap_or(i32::MAX) };
            (p.name.clone(), cost)
        })
        .collect()
}

/// The calls in Prometheus text from a runtime's `/metrics`: the sums of
/// `aipod_calls_in_flight` and `aipod_calls_queued` over their versions.
pub fn read_metrics(text: &str) -> Result<(u64, u64), String> {
    let (mut in_flight, mut queued) = (None::<u64>, None::<u64>);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let name = series.split('{').next().unwrap_or_default();
        let slot = match name {
            "aipod_calls_in_flight" => &mut in_flight,
            "aipod_calls_queued" => &mut queued,
            _ => continue,
        };
        let v: f64 = value.trim().parse().map_err(|_| format!("{name}: {value:?} is not a number"))?;
        if !v.is_finite() || v < 0.0 {
            return Err(format!("{name}: {v} is not a count"));
        }
        *slot = Some(slot.unwrap_or(0) + v as u64);
    }
    // A runtime with versions has both families; an empty one has neither.
    Ok((in_flight.unwrap_or(0), queued.unwrap_or(0)))
}

#[cfg(test)]
mod tests;

/// The simulated cluster the decision tests run against.
#[cfg(test)]
mod simulation;
