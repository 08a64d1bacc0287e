//! PodDisruptionBudgets: how many of a workload's pods a voluntary
//! disruption (a node drain, a cluster upgrade) may take at once. Pure
//! builders for an AIPod's pods and a router's.
//!
//! The default is `maxUnavailable: 1` with 2 or more replicas and no budget
//! at all with 1 — there a budget either blocks node drains forever
//! (`minAvailable: 1`) or protects nothing (`maxUnavailable: 1`). `unhealthyPodEvictionPolicy: AlwaysAllow` lets a drain evict a
//! pod that is not ready anyway (a crash-looping model must not hold a node).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::api::ObjectMeta;

use crate::{Result, crd::AIPod, labels};

/// Evict pods that are not ready even when the budget is spent.
pub const UNHEALTHY_POD_EVICTION_POLICY: &str = "AlwaysAllow";

/// What a budget allows, once the spec and the replica count are weighed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Budget {
    /// No budget.
    None,
    /// At most this many (or this percentage of) pods down at once.
    MaxUnavailable(IntOrString),
    /// At least this many (or this percentage of) pods up.
    MinAvailable(IntOrString),
}

/// The budget for `replicas` pods under `spec` (an AIPod's
/// `spec.disruption`; `None` for the default).
pub fn budget(replicas: i32, spec: Option<&crate::crd::DisruptionSpec>) -> Budget {
    let spec = spec.cloned().unwrap_or_default();
    if spec.enabled == Some(false) {
        return Budget::None;
    }
    match (spec.max_unavailable, spec.min_available) {
        // An explicit budget is the user's call, whatever the replicas.
        (Some(max), _) => Budget::MaxUnavailable(max),
        (None, Some(min)) => Budget::MinAvailable(min),
        (None, None) if replicas >= 2 => Budget::MaxUnavailable(IntOrString::Int(1)),
        (None, None) => Budget::None,
    }
}

/// The AIPod's PodDisruptionBudget, selecting the Deployment's pods;
/// `None` when no budget applies (and one that exists is removed).
pub fn pod_disruption_budget(aipod: &AIPod) -> Result<Option<PodDisruptionBudget>> {
    let name = crate::name(aipod)?;
    let budget = budget(aipod.spec.replicas, aipod.spec.disruption.as_ref());
    let meta = crate::child_meta(aipod, name, labels::labels(aipod, name))?;
    Ok(build(meta, labels::selector(name), budget))
}

/// A router's PodDisruptionBudget for `replicas` pods, with `meta`.
pub fn router_pod_disruption_budget(router: &str, meta: ObjectMeta, replicas: i32) -> Option<PodDisruptionBudget> {
    build(meta, labels::router_selector(router), budget(replicas, None))
}

fn build(metadata: ObjectMeta, selector: BTreeMap<String, String>, budget: Budget) -> Option<PodDisruptionBudget> {
    let (max_unavailable, min_available) = match budget {
        Budget::None => return None,
        Budget::MaxUnavailable(n) => (Some(n), None),
        Budget::MinAvailable(n) => (None, Some(n)),
    };
    Some(PodDisruptionBudget {
        metadata,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable,
            min_available,
            selector: Some(LabelSelector { match_labels: Some(selector), ..Default::default() }),
            unhealthy_pod_eviction_policy: Some(UNHEALTHY_POD_EVICTION_POLICY.to_owned()),
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{crd::DisruptionSpec, fixtures};
    use serde_json::json;

    #[test]
    fn the_budget_over_replicas_and_overrides() {
        let one = IntOrString::Int(1);
        let spec = |v: serde_json::Value| serde_json::from_value::<DisruptionSpec>(v).expect("spec");
        let table: [(i32, Option<DisruptionSpec>, Budget); 10] = [
            (0, None, Budget::None),
            (1, None, Budget::None),
            (2, None, Budget::MaxUnavailable(one.clone())),
            (7, None, Budget::MaxUnavailable(one.clone())),
            (7, Some(spec(json!({"enabled": false}))), Budget::None),
            (7, Some(spec(json!({"enabled": true}))), Budget::MaxUnavailable(one.clone())),
            (
                7,
                Some(spec(json!({"maxUnavailable": "25%"}))),
                Budget::MaxUnavailable(IntOrString::String("25%".into())),
            ),
            (7, Some(spec(json!({"minAvailable": 5}))), Budget::MinAvailable(IntOrString::Int(5))),
            (1, Some(spec(json!({"maxUnavailable": 1}))), Budget::MaxUnavailable(one.clone())),
            (1, Some(spec(json!({"enabled": true}))), Budget::None),
        ];
        for (replicas, spec, want) in table {
            assert_eq!(budget(replicas, spec.as_ref()), want, "{replicas} replicas, {spec:?}");
        }
    }

    #[test]
    fn an_aipods_budget_selects_exactly_its_deployments_pods() {
        let a = fixtures::aipod("m").spec(json!({"replicas": 3})).stored();
        let pdb = pod_disruption_budget(&a).expect("built").expect("3 replicas have one");
        let spec = pdb.spec.expect("spec");
        let deployment = crate::deployment::deployment(&a, "img").expect("deployment");
        assert_eq!(spec.selector.expect("selector").match_labels, deployment.spec.expect("spec").selector.match_labels);
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.unhealthy_pod_eviction_policy.as_deref(), Some("AlwaysAllow"));
        assert_eq!(pdb.metadata.owner_references.map(|o| o.len()), Some(1), "owned: removed with the AIPod");
        assert!(pod_disruption_budget(&fixtures::aipod("m").stored()).expect("built").is_none(), "1 replica: none");
    }
}
