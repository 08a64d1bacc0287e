//! What `kubectl get aip` shows: the status computed from what the operator
//! observed, as a pure function. Conditions keep their transition time while
//! their status stays the same.

use gateway_api::apis::standard::grpcroutes::GrpcRouteStatus;
use k8s_openapi::{
    api::apps::v1::Deployment,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use crate::crd::{AIPod, AIPodStatus};

/// What happened to the AIPod's route.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteState {
    /// The spec asks for no route.
    NotRequested,
    /// The spec asks for a GRPCRoute but the cluster has no Gateway API.
    GatewayApiMissing,
    /// The route was applied, but the AIPod serves TLS and the cluster has
    /// no BackendTLSPolicy kind to tell the Gateway so.
    BackendTlsPolicyMissing,
    /// Another AIPod holds the upstream.
    Conflict {
        /// The holder's name.
        holder: String,
    },
    /// The GRPCRoute was applied; its status as the Gateway reported it.
    Applied(Option<GrpcRouteStatus>),
    /// The AIPod is routed by an nginx router of the operator's.
    Router {
        /// The router's name.
        router: String,
        /// Why a router pod's nginx refused the current config.
        rejected: Option<String>,
    },
}

/// What happened to the AIPod's PodMonitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitoringState {
    /// The spec asks for none.
    NotRequested,
    /// The spec asks for one but the cluster has no PodMonitor CRD.
    PodMonitorCrdMissing,
    /// The PodMonitor was applied.
    Applied,
}

/// The status of `aipod` given its applied Deployment, route and PodMonitor.
pub fn compute(
    aipod: &AIPod,
    deployment: &Deployment,
    route: &RouteState,
    monitoring: &MonitoringState,
    now: &Time,
) -> AIPodStatus {
    let generation = aipod.metadata.generation;
    let old = aipod.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let desired = aipod.spec.replicas;
    let ds = deployment.status.clone().unwrap_or_default();
    let ready_replicas = ds.ready_replicas.unwrap_or(0);
    let updated = ds.updated_replicas.unwrap_or(0);
    let total = ds.replicas.unwrap_or(0);
    let observed_current = ds.observed_generation.is_some() && ds.observed_generation >= deployment.metadata.generation;
    let dep_condition = |t: &str| ds.conditions.iter().flatten().find(|c| c.type_ == t);

    let route_ready = route_condition(route);
    let stuck =
        dep_condition("Progressing").filter(|c| c.status == "False").map(|c| c.message.clone().unwrap_or_default());
    let replica_failure =
        dep_condition("ReplicaFailure").filter(|c| c.status == "True").map(|c| c.message.clone().unwrap_or_default());

    let rolling = !observed_current || updated < desired || total > updated || ready_replicas < desired;
    let progressing = if stuck.is_some() {
        cond("Progressing", false, "RolloutStuck", "the rollout exceeded its progress deadline")
    } else if rolling {
        cond("Progressing", true, "RollingOut", &format!("{updated} of {desired} pods updated, {ready_replicas} ready"))
    } else {
        cond("Progressing", false, "Complete", "every pod runs the current spec")
    };

    let degraded = if let RouteState::Conflict { holder } = route {
        cond(
            "Degraded",
            true,
            "UpstreamConflict",
            &format!(
                "upstream {:?} is held by AIPod {holder:?}, which claimed it first; this AIPod gets no route",
                aipod.upstream()
            ),
        )
    } else if let Some(msg) = stuck {
        cond("Degraded", true, "RolloutStuck", &msg)
    } else if let Some(msg) = replica_failure {
        cond("Degraded", true, "ReplicaFailure", &msg)
    } else if let Some(msg) = crate::call_length::short_drain(aipod).ok().flatten() {
        cond("Degraded", true, "DrainShorterThanCalls", &msg)
    } else {
        cond("Degraded", false, "AsExpected", "no problem found")
    };

    let ready = if desired == 0 {
        cond("Ready", false, "ScaledToZero", "spec.replicas is 0")
    } else if ready_replicas == 0 {
        cond(
            "Ready",
            false,
            "NoReadyReplicas",
            &format!("0 of {desired} pods ready; readiness waits for every model to load"),
        )
    } else if route_ready.status != "True" {
        cond("Ready", false, "RouteNotReady", &route_ready.message)
    } else {
        cond("Ready", true, "Serving", &format!("{ready_replicas} of {desired} pods ready"))
    };

    let conditions = [ready, progressing, degraded, route_ready]
        .into_iter()
        .chain(monitoring_condition(*monitoring))
        .chain(scaling_condition(aipod))
        .map(|mut c| {
            c.observed_generation = generation;
            keep_transition_time(c, old, now)
        })
        .collect();
    AIPodStatus {
        observed_generation: generation,
        replicas: total,
        ready_replicas,
        upstream: Some(aipod.upstream()),
        service: aipod.metadata.name.clone(),
        router: aipod.spec.route.as_ref().and_then(|r| r.router.clone()),
        selector: aipod.metadata.name.as_deref().map(crate::labels::selector_query),
        conditions,
        autoscaling: None,
    }
}

/// The AIPod's status as it was, with only `Scaling` computed again: for an
/// AIPod whose autoscaling the operator cannot follow, where nothing else
/// was applied or looked at (its other conditions stay true as they were).
pub fn with_scaling(aipod: &AIPod, now: &Time) -> AIPodStatus {
    let mut status = aipod.status.clone().unwrap_or_default();
    status.autoscaling = None;
    let old = std::mem::take(&mut status.conditions);
    status.conditions = old.iter().filter(|c| c.type_ != "Scaling").cloned().collect();
    if let Some(mut c) = scaling_condition(aipod) {
        c.observed_generation = aipod.metadata.generation;
        status.conditions.push(keep_transition_time(c, &old, now));
    }
    status
}

/// `Scaling`, only for AIPods with `spec.autoscaling`: whether the
/// autoscaler acts, from the spec and what it last reported.
fn scaling_condition(aipod: &AIPod) -> Option<Condition> {
    aipod.spec.autoscaling.as_ref()?;
    if let Err(why) = crate::autoscale::Policy::of(aipod) {
        return Some(cond("Scaling", false, "InvalidAutoscaling", &why));
    }
    let seen = aipod.status.as_ref().and_then(|s| s.autoscaling.as_ref());
    Some(match seen {
        None => cond("Scaling", true, "Starting", "the autoscaler has not read the pods yet"),
        Some(a) => match &a.held {
            Some(held) => cond("Scaling", false, &held.reason, &held.message),
            // A message that does not move with every reading: the
            // readings themselves are in status.autoscaling.
            None => cond("Scaling", true, "Active", "the autoscaler reads every pod's calls and sets spec.replicas"),
        },
    })
}

fn route_condition(route: &RouteState) -> Condition {
    match route {
        RouteState::NotRequested => {
            cond("RouteReady", true, "NoRouteRequested", "spec.route is empty: clients reach the Service directly")
        }
        RouteState::GatewayApiMissing => cond(
            "RouteReady",
            false,
            "GatewayAPIMissing",
            "the GRPCRoute CRD (gateway.networking.k8s.io/v1) is not installed; install Gateway API or remove spec.route.gateway",
        ),
        RouteState::Conflict { holder } => {
            cond("RouteReady", false, "UpstreamConflict", &format!("the upstream is held by AIPod {holder:?}"))
        }
        RouteState::BackendTlsPolicyMissing => cond(
            "RouteReady",
            false,
            "BackendTLSPolicyMissing",
            "spec.tls is set but the cluster does not serve BackendTLSPolicy (gateway.networking.k8s.io/v1), so the \
             Gateway would speak plaintext to a TLS port; install Gateway API v1.4 or later (standard channel)",
        ),
        RouteState::Router { router, rejected: None } => cond(
            "RouteReady",
            true,
            "RouterConfigured",
            &format!("routed by the nginx router {router:?} (aipod-router-{router})"),
        ),
        RouteState::Router { rejected: Some(why), .. } => cond("RouteReady", false, "RouterConfigRejected", why),
        RouteState::Applied(status) => {
            let parents = status.as_ref().map(|s| s.parents.as_slice()).unwrap_or_default();
            if parents.is_empty() {
                return cond("RouteReady", false, "Pending", "no Gateway has reported on the GRPCRoute yet");
            }
            for parent in parents {
                for wanted in ["Accepted", "ResolvedRefs"] {
                    let found = parent.conditions.iter().find(|c| c.type_ == wanted);
                    if found.is_none_or(|c| c.status != "True") {
                        let gateway = &parent.parent_ref.name;
                        let (reason, message) = found.map_or(
                            ("Pending".to_owned(), format!("Gateway {gateway:?} has not reported {wanted}")),
                            |c| {
                                (
                                    c.reason.clone(),
                                    format!("Gateway {gateway:?}: {wanted} is {}: {}", c.status, c.message),
                                )
                            },
                        );
                        return cond("RouteReady", false, &reason, &message);
                    }
                }
            }
            cond("RouteReady", true, "Accepted", "every Gateway accepted the GRPCRoute and resolved its backend")
        }
    }
}

/// `MonitoringReady`, only for AIPods that ask for a PodMonitor.
fn monitoring_condition(monitoring: MonitoringState) -> Option<Condition> {
    match monitoring {
        MonitoringState::NotRequested => None,
        MonitoringState::PodMonitorCrdMissing => Some(cond(
            "MonitoringReady",
            false,
            "PodMonitorCRDMissing",
            "the PodMonitor CRD (monitoring.coreos.com/v1, from prometheus-operator) is not installed; install it or \
             set spec.monitoring.podMonitor to false and scrape the pods' metrics port another way",
        )),
        MonitoringState::Applied => {
            Some(cond("MonitoringReady", true, "PodMonitorApplied", "a PodMonitor selects the pods' metrics port"))
        }
    }
}

fn cond(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: if reason.is_empty() { "Unknown".to_owned() } else { reason.to_owned() },
        message: message.to_owned(),
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

fn keep_transition_time(mut c: Condition, old: &[Condition], now: &Time) -> Condition {
    c.last_transition_time = match old.iter().find(|o| o.type_ == c.type_) {
        Some(o) if o.status == c.status => o.last_transition_time.clone(),
        _ => now.clone(),
    };
    c
}

#[cfg(test)]
mod tests;
