//! Prometheus metrics: reconciles, failures by reason, duration, whether
//! this instance leads, and the autoscaler's readings and decisions.

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::Error;

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<FailureLabels, Counter>,
    duration: Histogram,
    leader: Gauge,
    desired: Family<AIPodLabels, Gauge>,
    unread: Family<AIPodLabels, Counter>,
    failed: Family<AIPodLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AIPodLabels {
    namespace: String,
    aipod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("aipod_operator");
        let reconciles = Counter::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_failures", "Reconciles that failed, by reason", failures.clone());
        registry.register("reconcile_duration_seconds", "Time a reconcile took", duration.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this instance holds the leader Lease and reconciles", leader.clone());
        let desired = Family::<AIPodLabels, Gauge>::default();
        registry.register(
            "autoscaler_desired_replicas",
            "Replicas the calls in flight ask for, per autoscaled AIPod",
            desired.clone(),
        );
        let unread = Family::<AIPodLabels, Counter>::default();
        registry.register(
            "autoscaler_scrape_errors",
            "Ready pods whose metrics the autoscaler could not read",
            unread.clone(),
        );
        let failed = Family::<AIPodLabels, Counter>::default();
        registry.register("autoscaler_failures", "Autoscaler passes the API server failed", failed.clone());
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register("autoscaler_decisions", "Autoscaler decisions, by kind", decisions.clone());
        Self { registry, reconciles, failures, duration, leader, desired, unread, failed, decisions }
    }
}

impl Metrics {
    /// Records one reconcile.
    pub fn observe(&self, took: Duration, error: Option<&Error>) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(e) = error {
            self.failures.get_or_create(&FailureLabels { reason: e.reason().to_owned() }).inc();
        }
    }

    /// Whether this instance leads (`aipod_operator_leader`).
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// One autoscaler reading of AIPod `ns/name`: the replicas its calls ask
    /// for, pods not read, and the decision.
    pub fn autoscaler_read(&self, ns: &str, name: &str, wanted: u32, unread: u32, decision: &str) {
        let labels = AIPodLabels { namespace: ns.to_owned(), aipod: name.to_owned() };
        self.desired.get_or_create(&labels).set(i64::from(wanted));
        self.unread.get_or_create(&labels).inc_by(u64::from(unread));
        self.decisions.get_or_create(&DecisionLabels { decision: decision.to_owned() }).inc();
    }

    /// An autoscaler pass for `ns/name` that the API server failed.
    pub fn autoscaler_failed(&self, ns: &str, name: &str) {
        self.failed.get_or_create(&AIPodLabels { namespace: ns.to_owned(), aipod: name.to_owned() }).inc();
    }

    /// Forgets `ns/name`'s series: it is gone or no longer autoscaled.
    pub fn autoscaler_forget(&self, ns: &str, name: &str) {
        let labels = AIPodLabels { namespace: ns.to_owned(), aipod: name.to_owned() };
        self.desired.remove(&labels);
        self.unread.remove(&labels);
        self.failed.remove(&labels);
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
