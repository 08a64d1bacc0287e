//! Status from observations: every condition and its reasons.

use gateway_api::apis::standard::grpcroutes::{
    GrpcRouteStatus, GrpcRouteStatusParents, GrpcRouteStatusParentsParentRef,
};
use k8s_openapi::{
    api::apps::v1::{DeploymentCondition, DeploymentStatus},
    jiff::Timestamp,
};

use super::*;

fn aipod(replicas: i32) -> AIPod {
    crate::fixtures::aipod("m").spec(serde_json::json!({"replicas": replicas})).generation(3).build()
}

fn deployment(replicas: i32, ready: i32, updated: i32, observed: i64) -> Deployment {
    let mut d = Deployment::default();
    d.metadata.generation = Some(2);
    d.status = Some(DeploymentStatus {
        replicas: Some(replicas),
        ready_replicas: Some(ready),
        updated_replicas: Some(updated),
        observed_generation: Some(observed),
        ..Default::default()
    });
    d
}

fn at(s: i64) -> Time {
    Time(Timestamp::from_second(s).expect("time"))
}

fn get<'a>(s: &'a AIPodStatus, t: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == t).unwrap_or_else(|| panic!("no {t} condition"))
}

fn summary(s: &AIPodStatus) -> Vec<(String, String, String)> {
    s.conditions.iter().map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone())).collect()
}

fn cond_of(t: &str, status: &str, reason: &str) -> (String, String, String) {
    (t.to_owned(), status.to_owned(), reason.to_owned())
}

#[test]
fn a_fully_rolled_out_aipod_without_route_is_ready() {
    let s = compute(
        &aipod(2),
        &deployment(2, 2, 2, 2),
        &RouteState::NotRequested,
        &MonitoringState::NotRequested,
        &at(100),
    );
    assert_eq!(
        summary(&s),
        [
            cond_of("Ready", "True", "Serving"),
            cond_of("Progressing", "False", "Complete"),
            cond_of("Degraded", "False", "AsExpected"),
            cond_of("RouteReady", "True", "NoRouteRequested"),
        ]
    );
    assert_eq!((s.replicas, s.ready_replicas, s.observed_generation), (2, 2, Some(3)));
    assert_eq!(s.upstream.as_deref(), Some("m"));
    assert_eq!(s.service.as_deref(), Some("m"));
    assert!(s.conditions.iter().all(|c| c.observed_generation == Some(3)));
}

#[test]
fn a_rollout_in_progress_is_progressing_and_not_ready_without_ready_pods() {
    let s = compute(
        &aipod(2),
        &deployment(1, 0, 1, 2),
        &RouteState::NotRequested,
        &MonitoringState::NotRequested,
        &at(100),
    );
    assert_eq!(get(&s, "Ready").reason, "NoReadyReplicas");
    assert_eq!(
        (get(&s, "Progressing").status.as_str(), get(&s, "Progressing").reason.as_str()),
        ("True", "RollingOut")
    );
    let s = compute(
        &aipod(2),
        &deployment(2, 2, 2, 1),
        &RouteState::NotRequested,
        &MonitoringState::NotRequested,
        &at(100),
    );
    assert_eq!(get(&s, "Progressing").status, "True", "the Deployment has not seen its latest generation");
    let s = compute(
        &aipod(0),
        &deployment(0, 0, 0, 2),
        &RouteState::NotRequested,
        &MonitoringState::NotRequested,
        &at(100),
    );
    assert_eq!(get(&s, "Ready").reason, "ScaledToZero");
}

#[test]
fn a_stuck_rollout_and_replica_failures_are_degraded() {
    let mut d = deployment(2, 1, 1, 2);
    d.status.as_mut().expect("status").conditions = Some(vec![DeploymentCondition {
        type_: "Progressing".into(),
        status: "False".into(),
        reason: Some("ProgressDeadlineExceeded".into()),
        message: Some("ReplicaSet m-1 has timed out progressing.".into()),
        ..Default::default()
    }]);
    let s = compute(&aipod(2), &d, &RouteState::NotRequested, &MonitoringState::NotRequested, &at(1));
    assert_eq!(get(&s, "Degraded").reason, "RolloutStuck");
    assert!(get(&s, "Degraded").message.contains("timed out"));
    assert_eq!(get(&s, "Progressing").reason, "RolloutStuck");

    d.status.as_mut().expect("status").conditions = Some(vec![DeploymentCondition {
        type_: "ReplicaFailure".into(),
        status: "True".into(),
        message: Some("exceeded quota".into()),
        ..Default::default()
    }]);
    let s = compute(&aipod(2), &d, &RouteState::NotRequested, &MonitoringState::NotRequested, &at(1));
    assert_eq!(
        (get(&s, "Degraded").reason.as_str(), get(&s, "Degraded").message.as_str()),
        ("ReplicaFailure", "exceeded quota")
    );
}

#[test]
fn route_states_become_route_ready_and_ready() {
    let d = deployment(1, 1, 1, 2);
    let s = compute(&aipod(1), &d, &RouteState::GatewayApiMissing, &MonitoringState::NotRequested, &at(1));
    assert_eq!(get(&s, "RouteReady").reason, "GatewayAPIMissing");
    assert_eq!((get(&s, "Ready").status.as_str(), get(&s, "Ready").reason.as_str()), ("False", "RouteNotReady"));

    let s = compute(
        &aipod(1),
        &d,
        &RouteState::Conflict { holder: "older".into() },
        &MonitoringState::NotRequested,
        &at(1),
    );
    assert_eq!(get(&s, "Degraded").reason, "UpstreamConflict");
    assert!(get(&s, "Degraded").message.contains("\"older\""));
    assert_eq!(get(&s, "RouteReady").reason, "UpstreamConflict");

    let s = compute(&aipod(1), &d, &RouteState::Applied(None), &MonitoringState::NotRequested, &at(1));
    assert_eq!((get(&s, "RouteReady").status.as_str(), get(&s, "RouteReady").reason.as_str()), ("False", "Pending"));

    let parent = |accepted: &str, resolved: &str| GrpcRouteStatusParents {
        conditions: vec![
            Condition {
                type_: "Accepted".into(),
                status: accepted.into(),
                reason: "NotAllowedByListeners".into(),
                message: "no listener allows GRPCRoute".into(),
                last_transition_time: at(0),
                observed_generation: None,
            },
            Condition {
                type_: "ResolvedRefs".into(),
                status: resolved.into(),
                reason: "BackendNotFound".into(),
                message: "service missing".into(),
                last_transition_time: at(0),
                observed_generation: None,
            },
        ],
        controller_name: "example.com/gateway".into(),
        parent_ref: GrpcRouteStatusParentsParentRef { name: "gw".into(), ..Default::default() },
    };
    let applied = |p| RouteState::Applied(Some(GrpcRouteStatus { parents: vec![p] }));
    let s = compute(&aipod(1), &d, &applied(parent("False", "True")), &MonitoringState::NotRequested, &at(1));
    assert_eq!(get(&s, "RouteReady").reason, "NotAllowedByListeners");
    assert!(get(&s, "RouteReady").message.contains("\"gw\""));
    let s = compute(&aipod(1), &d, &applied(parent("True", "False")), &MonitoringState::NotRequested, &at(1));
    assert_eq!(get(&s, "RouteReady").reason, "BackendNotFound");
    let s = compute(&aipod(1), &d, &applied(parent("True", "True")), &MonitoringState::NotRequested, &at(1));
    assert_eq!((get(&s, "RouteReady").status.as_str(), get(&s, "Ready").status.as_str()), ("True", "True"));
}

#[test]
fn transition_times_change_only_with_the_status() {
    let mut a = aipod(1);
    let first =
        compute(&a, &deployment(1, 0, 1, 2), &RouteState::NotRequested, &MonitoringState::NotRequested, &at(100));
    a.status = Some(first.clone());
    let same =
        compute(&a, &deployment(1, 0, 1, 2), &RouteState::NotRequested, &MonitoringState::NotRequested, &at(200));
    assert_eq!(same, first, "nothing changed, nothing moves");
    a.status = Some(same);
    let ready =
        compute(&a, &deployment(1, 1, 1, 2), &RouteState::NotRequested, &MonitoringState::NotRequested, &at(300));
    assert_eq!(get(&ready, "Ready").last_transition_time, at(300));
    assert_eq!(get(&ready, "Degraded").last_transition_time, at(100));
}

#[test]
fn monitoring_ready_only_when_a_pod_monitor_is_asked_for() {
    let d = deployment(1, 1, 1, 1);
    let types = |m| compute(&aipod(1), &d, &RouteState::NotRequested, &m, &at(1)).conditions;
    assert!(types(MonitoringState::NotRequested).iter().all(|c| c.type_ != "MonitoringReady"));
    let missing = types(MonitoringState::PodMonitorCrdMissing);
    let c = missing.iter().find(|c| c.type_ == "MonitoringReady").expect("reported");
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "PodMonitorCRDMissing"));
    assert!(c.message.contains("monitoring.coreos.com/v1"), "{}", c.message);
    let applied = types(MonitoringState::Applied);
    let c = applied.iter().find(|c| c.type_ == "MonitoringReady").expect("reported");
    assert_eq!(c.status, "True");
    let ready = missing.iter().find(|c| c.type_ == "Ready").expect("ready");
    assert_eq!(ready.status, "True", "a missing PodMonitor never makes the model unready");
}

#[test]
fn a_drain_shorter_than_the_longest_call_is_degraded_with_the_reason() {
    let mut a = aipod(2);
    a.spec.runtime.max_call_duration = Some("10m".into());
    a.spec.runtime.drain_timeout = Some("30s".into());
    let s = compute(&a, &deployment(2, 2, 2, 2), &RouteState::NotRequested, &MonitoringState::NotRequested, &at(1));
    let degraded = get(&s, "Degraded");
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "DrainShorterThanCalls"));
    assert!(degraded.message.contains("drainTimeout 30s"), "{}", degraded.message);
    assert_eq!(get(&s, "Ready").status, "True", "it serves; the warning is about the next rollout");
    a.spec.runtime.drain_timeout = Some("10m".into());
    let s = compute(&a, &deployment(2, 2, 2, 2), &RouteState::NotRequested, &MonitoringState::NotRequested, &at(1));
    assert_eq!(get(&s, "Degraded").reason, "AsExpected");
}

#[test]
fn a_config_the_router_refuses_makes_the_route_not_ready() {
    let routed = RouteState::Router { router: "edge".into(), rejected: None };
    let s = compute(&aipod(1), &deployment(1, 1, 1, 2), &routed, &MonitoringState::NotRequested, &at(1));
    assert_eq!(
        (get(&s, "RouteReady").status.as_str(), get(&s, "RouteReady").reason.as_str()),
        ("True", "RouterConfigured")
    );
    let refused = RouteState::Router { router: "edge".into(), rejected: Some("pod x: nginx refused it".into()) };
    let s = compute(&aipod(1), &deployment(1, 1, 1, 2), &refused, &MonitoringState::NotRequested, &at(1));
    let route = get(&s, "RouteReady");
    assert_eq!((route.status.as_str(), route.reason.as_str()), ("False", "RouterConfigRejected"));
    assert!(route.message.contains("nginx refused it"));
    assert_eq!(get(&s, "Ready").reason, "RouteNotReady");
}
