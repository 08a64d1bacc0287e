//! A simulated AIPod for the decision tests: pods holding calls, a router
//! that gives each call to the least busy ready pod, new pods that become
//! ready after a start-up time, and the ReplicaSet's order of deletion on
//! scale-down (pods not ready first, then the lowest
//! `pod-deletion-cost`, then the newest) — so a trace shows whether a
//! scale-down would have cut a call. Time advances in steps of a second.

use std::time::Duration;

use tokio::time::Instant;

use super::{Autoscale, Decision, PodLoad, Policy, Sample, deletion_costs};

/// A pod of the simulation.
#[derive(Debug, Clone)]
pub(super) struct Pod {
    name: String,
    born: Instant,
    ready_at: Instant,
    /// When each of its calls ends.
    calls: Vec<Instant>,
    cost: i32,
}

/// What a run saw.
#[derive(Debug, Default, Clone)]
pub(super) struct Report {
    /// `(seconds from the start, replicas)` at every change.
    pub changes: Vec<(u64, u32)>,
    /// Pods the ReplicaSet deleted.
    pub removed: u32,
    /// Calls held by pods when they were deleted (each would be cut or
    /// drained).
    pub cut: u64,
    /// Calls that found no ready pod.
    pub unserved: u64,
    /// Every decision's reason, in order.
    pub decisions: Vec<&'static str>,
    /// The most pods at once.
    pub peak: u32,
}

/// The simulated AIPod.
pub(super) struct Cluster {
    pods: Vec<Pod>,
    replicas: u32,
    made: u32,
    startup: Duration,
    start: Instant,
    /// Pods that miss the next readings (an unreachable metrics port).
    pub unreadable: u32,
    pub report: Report,
}

impl Cluster {
    /// `replicas` ready pods at `start`; new pods take `startup` to be ready.
    pub(super) fn new(replicas: u32, start: Instant, startup: Duration) -> Self {
        let mut cluster = Self {
            pods: Vec::new(),
            replicas,
            made: 0,
            startup,
            start,
            unreadable: 0,
            report: Report { peak: replicas, ..Report::default() },
        };
        for _ in 0..replicas {
            cluster.add_pod(start, Duration::ZERO);
        }
        cluster
    }

    fn add_pod(&mut self, now: Instant, startup: Duration) {
        self.made += 1;
        self.pods.push(Pod {
            name: format!("pod-{:03}", self.made),
            born: now,
            ready_at: now + startup,
            calls: Vec::new(),
            cost: 0,
        });
    }

    /// The replicas now.
    pub(super) fn replicas(&self) -> u32 {
        self.replicas
    }

    /// A call of `length` arriving at `now`: to the ready pod holding the
    /// fewest calls.
    pub(super) fn arrive(&mut self, now: Instant, length: Duration) {
        let pod = self.pods.iter_mut().filter(|p| p.ready_at <= now).min_by_key(|p| p.calls.len());
        match pod {
            Some(pod) => pod.calls.push(now + length),
            None => self.report.unserved += 1,
        }
    }

    /// The calls held now, all pods.
    pub(super) fn calls(&self) -> usize {
        self.pods.iter().map(|p| p.calls.len()).sum()
    }

    /// What the autoscaler reads at `now`.
    pub(super) fn sample(&self, now: Instant) -> Sample {
        let mut sample = Sample::default();
        let mut unreadable = self.unreadable;
        for pod in &self.pods {
            if pod.ready_at > now {
                sample.not_ready += 1;
            } else if unreadable > 0 {
                unreadable -= 1;
                sample.unread += 1;
            } else {
                let n = pod.calls.len() as u64;
                sample.pods.push(PodLoad { name: pod.name.clone(), in_flight: n, queued: 0 });
            }
        }
        sample
    }

    /// Calls end; the ReplicaSet brings the pods to the replicas.
    pub(super) fn step(&mut self, now: Instant) {
        for pod in &mut self.pods {
            pod.calls.retain(|end| *end > now);
        }
        while (self.pods.len() as u32) < self.replicas {
            self.add_pod(now, self.startup);
        }
        while self.pods.len() as u32 > self.replicas {
            // The ReplicaSet's order: not ready, lowest cost, newest.
            let victim = (0..self.pods.len())
                .min_by_key(|i| {
                    let p = &self.pods[*i];
                    (p.ready_at <= now, p.cost, std::cmp::Reverse(p.born))
                })
                .unwrap_or_default();
            let pod = self.pods.remove(victim);
            self.report.removed += 1;
            self.report.cut += pod.calls.len() as u64;
        }
        self.report.peak = self.report.peak.max(self.pods.len() as u32);
    }

    /// Carries `decision` out as the autoscaler does: costs first, then the
    /// replicas.
    pub(super) fn apply(&mut self, now: Instant, decision: &Decision, sample: &Sample) {
        self.report.decisions.push(decision.reason());
        let to = match decision {
            Decision::Up { to, .. } => *to,
            Decision::Down { to, remove } => {
                for (name, cost) in deletion_costs(sample, remove) {
                    if let Some(pod) = self.pods.iter_mut().find(|p| p.name == name) {
                        pod.cost = cost;
                    }
                }
                *to
            }
            Decision::Hold(_) | Decision::Deferred { .. } => return,
        };
        if to != self.replicas {
            self.replicas = to;
            self.report.changes.push((now.duration_since(self.start).as_secs(), to));
        }
    }
}

/// Runs `policy` over `seconds` of a trace: `arrivals(second)` gives the
/// lengths of the calls arriving in that second. The autoscaler reads the
/// pods every interval, as the operator does.
pub(super) fn run(
    policy: &Policy,
    replicas: u32,
    startup: Duration,
    seconds: u64,
    mut arrivals: impl FnMut(u64, &Cluster) -> Vec<Duration>,
) -> (Cluster, Autoscale) {
    let start = Instant::now();
    let mut cluster = Cluster::new(replicas, start, startup);
    let mut autoscale = Autoscale::default();
    let every = policy.interval.as_secs().max(1);
    for second in 0..seconds {
        // Readings are never exactly an interval apart: a few ms either way.
        let now = start + Duration::from_secs(second) + Duration::from_millis((second * 37) % 23);
        for length in arrivals(second, &cluster) {
            cluster.arrive(now, length);
        }
        if second % every == 0 {
            let sample = cluster.sample(now);
            let decision = autoscale.decide(policy, cluster.replicas(), &sample, now);
            cluster.apply(now, &decision, &sample);
        }
        cluster.step(now);
    }
    (cluster, autoscale)
}

/// A small deterministic generator (xorshift), so traces are the same on
/// every run.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// A number in `0..n`.
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}
