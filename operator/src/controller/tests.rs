//! Reconcile against an in-memory API server (kube-fake-client behind a real
//! `kube::Client`): children, idempotence, updates, status, conflicts, and a
//! cluster without Gateway API.

use std::sync::Arc;

use gateway_api::apis::standard::grpcroutes::GrpcRoute;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

use super::*;
use crate::crd::AIPodStatus;

const NS: &str = "models";

async fn cluster(gateway_api: bool) -> Client {
    cluster_with(gateway_api, |b| b).await
}

/// [`cluster`], with more kinds served (`extra` registers them).
async fn cluster_with(
    gateway_api: bool,
    extra: impl FnOnce(kube_fake_client::ClientBuilder) -> kube_fake_client::ClientBuilder,
) -> Client {
    let mut builder = kube_fake_client::ClientBuilder::new()
        .with_resource::<AIPod>()
        .with_status_subresource::<AIPod>()
        .with_status_subresource::<Deployment>();
    if gateway_api {
        builder = builder.with_resource::<GrpcRoute>().with_status_subresource::<GrpcRoute>();
    }
    extra(builder).build().await.expect("fake API server")
}

/// The controller's AIPod cache, fed here the way its watch would be.
struct Cache(std::sync::Mutex<kube::runtime::reflector::store::Writer<AIPod>>);

impl Cache {
    /// Replaces the cache's content with what the API server holds (a
    /// relist), as the reflector would have it after the latest events.
    async fn sync(&self, client: &Client) {
        let all = Api::<AIPod>::all(client.clone()).list(&Default::default()).await.expect("list AIPods").items;
        let mut writer = self.0.lock().expect("cache");
        writer.apply_watcher_event(&watcher::Event::Init);
        for a in all {
            writer.apply_watcher_event(&watcher::Event::InitApply(a));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
    }
}

fn context(client: &Client, gateway_api: bool) -> (Arc<Context>, Cache) {
    context_with(client, gateway_api, |c| c)
}

/// [`context`], with the Context adjusted by `adjust` (CRDs detected).
fn context_with(client: &Client, gateway_api: bool, adjust: impl FnOnce(Context) -> Context) -> (Arc<Context>, Cache) {
    let (store, mut writer) = kube::runtime::reflector::store::<AIPod>();
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let ctx = Context::new(client.clone(), gateway_api, Arc::new(Metrics::default()), store);
    (Arc::new(adjust(ctx)), Cache(writer.into()))
}

fn manifest(name: &str, spec: serde_json::Value, created_s: i64) -> AIPod {
    crate::fixtures::aipod(name).namespace(NS).spec(spec).created(created_s).build()
}

async fn create(client: &Client, aipod: AIPod) -> AIPod {
    Api::<AIPod>::namespaced(client.clone(), NS).create(&PostParams::default(), &aipod).await.expect("create AIPod")
}

async fn fetch(client: &Client, name: &str) -> AIPod {
    Api::<AIPod>::namespaced(client.clone(), NS).get(name).await.expect("AIPod")
}

/// Reconciles the stored AIPod as the controller would: the latest version,
/// with the cache up to date.
async fn reconcile_now(client: &Client, ctx: &Arc<Context>, cache: &Cache, name: &str) -> Result<Action> {
    cache.sync(client).await;
    reconcile(Arc::new(fetch(client, name).await), Arc::clone(ctx)).await
}

fn condition<'a>(status: &'a AIPodStatus, t: &str) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status.conditions.iter().find(|c| c.type_ == t).unwrap_or_else(|| panic!("no {t}: {status:?}"))
}

fn gateway_spec() -> serde_json::Value {
    json!({"image": "img:1", "route": {"gateway": {"parentRefs": [{"name": "gw"}]}}})
}

#[tokio::test]
async fn first_reconcile_creates_owned_children_and_a_second_changes_nothing() {
    let client = cluster(true).await;
    let (ctx, cache) = context(&client, true);
    let aipod = create(&client, manifest("m", gateway_spec(), 1)).await;
    let uid = aipod.metadata.uid.clone().expect("uid");

    reconcile_now(&client, &ctx, &cache, "m").await.expect("first reconcile");
    let deployment = Api::<Deployment>::namespaced(client.clone(), NS).get("m").await.expect("Deployment created");
    let service = Api::<Service>::namespaced(client.clone(), NS).get("m").await.expect("Service created");
    let route = Api::<GrpcRoute>::namespaced(client.clone(), NS).get("m").await.expect("GRPCRoute created");
    for owners in
        [&deployment.metadata.owner_references, &service.metadata.owner_references, &route.metadata.owner_references]
    {
        let owner = &owners.as_ref().expect("owner references")[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("AIPod", uid.as_str(), Some(true)));
    }
    let stored = fetch(&client, "m").await;
    let status = stored.status.clone().expect("status written");
    assert_eq!(status.upstream.as_deref(), Some("m"));
    assert_eq!(condition(&status, "Ready").reason, "NoReadyReplicas");

    reconcile_now(&client, &ctx, &cache, "m").await.expect("second reconcile");
    let again = Api::<Deployment>::namespaced(client.clone(), NS).get("m").await.expect("Deployment");
    assert_eq!(again.spec, deployment.spec);
    assert_eq!(again.metadata.labels, deployment.metadata.labels);
    assert_eq!(Api::<Service>::namespaced(client.clone(), NS).get("m").await.expect("Service").spec, service.spec);
    assert_eq!(Api::<GrpcRoute>::namespaced(client.clone(), NS).get("m").await.expect("route").spec, route.spec);
    assert_eq!(
        fetch(&client, "m").await.metadata.resource_version,
        stored.metadata.resource_version,
        "an unchanged status is not written again"
    );
}

#[tokio::test]
async fn a_spec_change_updates_the_deployment_and_drift_is_corrected() {
    let client = cluster(true).await;
    let (ctx, cache) = context(&client, true);
    create(&client, manifest("m", json!({"image": "img:1"}), 1)).await;
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");

    let aipods = Api::<AIPod>::namespaced(client.clone(), NS);
    aipods
        .patch("m", &PatchParams::default(), &Patch::Merge(json!({"spec": {"image": "img:2", "replicas": 3}})))
        .await
        .expect("edit spec");
    // Someone edits a field the operator owns.
    let deployments = Api::<Deployment>::namespaced(client.clone(), NS);
    deployments
        .patch("m", &PatchParams::default(), &Patch::Merge(json!({"spec": {"revisionHistoryLimit": 99}})))
        .await
        .expect("drift");
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    let d = deployments.get("m").await.expect("Deployment");
    let spec = d.spec.expect("spec");
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.template.spec.expect("pod").containers[0].image.as_deref(), Some("img:2"));
    assert_eq!(spec.revision_history_limit, Some(5), "drift in owned fields is corrected");
}

#[tokio::test]
async fn status_follows_the_deployment_and_the_route() {
    let client = cluster(true).await;
    let (ctx, cache) = context(&client, true);
    create(&client, manifest("m", gateway_spec(), 1)).await;
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    let generation = Api::<Deployment>::namespaced(client.clone(), NS).get("m").await.expect("d").metadata.generation;

    Api::<Deployment>::namespaced(client.clone(), NS)
        .patch_status(
            "m",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": generation.map(|g| g + 1)}})),
        )
        .await
        .expect("deployment status");
    Api::<GrpcRoute>::namespaced(client.clone(), NS)
        .patch_status(
            "m",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"parents": [{
                "parentRef": {"name": "gw"}, "controllerName": "example.com/gw",
                "conditions": [
                    {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": "2026-11-26T00:00:00Z"},
                    {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs", "message": "", "lastTransitionTime": "2026-11-26T00:00:00Z"}
                ]}]}})),
        )
        .await
        .expect("route status");

    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    let status = fetch(&client, "m").await.status.expect("status");
    assert_eq!((status.replicas, status.ready_replicas), (1, 1));
    assert_eq!(condition(&status, "RouteReady").status, "True");
    assert_eq!(condition(&status, "Ready").status, "True", "{status:?}");
    assert_eq!(condition(&status, "Progressing").reason, "Complete");
}

#[tokio::test]
async fn the_newer_aipod_claiming_an_upstream_is_degraded_and_gets_no_route() {
    let client = cluster(true).await;
    let (ctx, cache) = context(&client, true);
    let shared = |image: &str| json!({"image": image, "upstream": "shared", "route": {"gateway": {"parentRefs": [{"name": "gw"}]}}});
    create(&client, manifest("old", shared("a"), 100)).await;
    create(&client, manifest("new", shared("b"), 200)).await;

    reconcile_now(&client, &ctx, &cache, "old").await.expect("old");
    let action = reconcile_now(&client, &ctx, &cache, "new").await.expect("new");
    assert_eq!(action, Action::requeue(CONFLICT_RECHECK), "the loser checks again soon");

    let routes = Api::<GrpcRoute>::namespaced(client.clone(), NS);
    assert!(routes.get_opt("old").await.expect("get").is_some(), "the older AIPod keeps its route");
    assert!(routes.get_opt("new").await.expect("get").is_none(), "the newer one gets none");
    let status = fetch(&client, "new").await.status.expect("status");
    assert_eq!(
        (condition(&status, "Degraded").status.as_str(), condition(&status, "Degraded").reason.as_str()),
        ("True", "UpstreamConflict")
    );
    assert!(condition(&status, "Degraded").message.contains("\"old\""));
    assert_eq!(condition(&fetch(&client, "old").await.status.expect("status"), "Degraded").status, "False");
    assert!(
        Api::<Deployment>::namespaced(client.clone(), NS).get_opt("new").await.expect("get").is_some(),
        "it still runs"
    );

    // Once the holder is gone, the newer AIPod takes the upstream over.
    Api::<AIPod>::namespaced(client.clone(), NS).delete("old", &Default::default()).await.expect("delete old");
    reconcile_now(&client, &ctx, &cache, "new").await.expect("new again");
    assert!(routes.get_opt("new").await.expect("get").is_some());
    assert_eq!(condition(&fetch(&client, "new").await.status.expect("status"), "Degraded").status, "False");
}

#[tokio::test]
async fn without_gateway_api_there_is_no_route_and_no_crash() {
    let client = cluster(false).await;
    let (ctx, cache) = context(&client, false);
    create(&client, manifest("m", gateway_spec(), 1)).await;
    let action = reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile succeeds without the CRD");
    assert_eq!(action, Action::requeue(RESYNC));
    assert!(Api::<Deployment>::namespaced(client.clone(), NS).get_opt("m").await.expect("get").is_some());
    let status = fetch(&client, "m").await.status.expect("status");
    let route = condition(&status, "RouteReady");
    assert_eq!((route.status.as_str(), route.reason.as_str()), ("False", "GatewayAPIMissing"));
}

#[tokio::test]
async fn dropping_the_route_from_the_spec_deletes_the_grpcroute() {
    let client = cluster(true).await;
    let (ctx, cache) = context(&client, true);
    create(&client, manifest("m", gateway_spec(), 1)).await;
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    let routes = Api::<GrpcRoute>::namespaced(client.clone(), NS);
    assert!(routes.get_opt("m").await.expect("get").is_some());
    Api::<AIPod>::namespaced(client.clone(), NS)
        .patch("m", &PatchParams::default(), &Patch::Merge(json!({"spec": {"route": null}})))
        .await
        .expect("edit");
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    assert!(routes.get_opt("m").await.expect("get").is_none());
    let status = fetch(&client, "m").await.status.expect("status");
    assert_eq!(condition(&status, "RouteReady").reason, "NoRouteRequested");
}

#[tokio::test]
async fn an_invalid_spec_fails_the_reconcile_and_backs_off_exponentially() {
    let client = cluster(true).await;
    let (ctx, cache) = context(&client, true);
    create(&client, manifest("m", json!({"image": "img", "runtime": {"drainTimeout": "soon"}}), 1)).await;
    let aipod = Arc::new(fetch(&client, "m").await);
    cache.sync(&client).await;
    let err = reconcile(Arc::clone(&aipod), Arc::clone(&ctx)).await.expect_err("invalid drain timeout");
    assert!(matches!(err, Error::InvalidSpec(_)));
    let delays: Vec<_> = (0..3).map(|_| error_policy(Arc::clone(&aipod), &err, Arc::clone(&ctx))).collect();
    assert_eq!(
        delays,
        [Action::requeue(BACKOFF_START), Action::requeue(BACKOFF_START * 2), Action::requeue(BACKOFF_START * 4)]
    );
    let metrics = ctx.metrics.render();
    assert!(metrics.contains("aipod_operator_reconcile_failures_total{reason=\"invalid_spec\"} 1"), "{metrics}");

    // Deleted: no reconcile comes for it again, yet its backoff is forgotten.
    assert_eq!(ctx.backoff_entries(), 1);
    Api::<AIPod>::namespaced(client.clone(), NS).delete("m", &Default::default()).await.expect("delete");
    create(&client, manifest("other", json!({"image": "img"}), 2)).await;
    reconcile_now(&client, &ctx, &cache, "other").await.expect("another AIPod");
    assert_eq!(ctx.backoff_entries(), 0, "a deleted AIPod's failures are forgotten");
}

#[tokio::test]
async fn aipods_naming_a_router_get_one_config_and_it_follows_them() {
    use k8s_openapi::api::{core::v1::ConfigMap, core::v1::Pod, policy::v1::PodDisruptionBudget};
    let client = cluster(false).await;
    // One running router pod, as its ReplicaSet made it.
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "aipod-router-edge-x1", "namespace": NS,
                     "labels": crate::labels::router_labels("edge")},
        "spec": {"containers": [{"name": "nginx", "image": "nginx"}]},
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod).await.expect("router pod");
    let (pod_store, mut pod_writer) = kube::runtime::reflector::store::<Pod>();
    let mut feed_pods = async || {
        let listed = pods.list(&Default::default()).await.expect("pods").items;
        pod_writer.apply_watcher_event(&watcher::Event::Init);
        for p in listed {
            pod_writer.apply_watcher_event(&watcher::Event::InitApply(p));
        }
        pod_writer.apply_watcher_event(&watcher::Event::InitDone);
    };
    feed_pods().await;
    let (ctx, cache) = context_with(&client, false, |c| c.with_router_pods(pod_store));
    let routed = |image: &str| json!({"image": image, "route": {"router": "edge"}});
    create(&client, manifest("a", routed("a"), 1)).await;
    create(&client, manifest("b", routed("b"), 2)).await;
    reconcile_now(&client, &ctx, &cache, "a").await.expect("reconcile a");
    reconcile_now(&client, &ctx, &cache, "b").await.expect("reconcile b");
    let b = fetch(&client, "b").await.status.expect("status");
    assert_eq!(b.router.as_deref(), Some("edge"), "status records it");
    assert_eq!(condition(&b, "RouteReady").reason, "RouterConfigured");

    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), NS);
    let conf = |cm: &ConfigMap| cm.data.as_ref().and_then(|d| d.get("nginx.conf")).cloned().expect("nginx.conf");
    let cm = config_maps.get("aipod-router-edge").await.expect("router config");
    assert!(conf(&cm).contains("\"a\" aipod_a;") && conf(&cm).contains("\"b\" aipod_b;"), "{}", conf(&cm));
    let owners: Vec<_> = cm.metadata.owner_references.iter().flatten().map(|o| o.name.as_str()).collect();
    assert_eq!(owners, ["a", "b"]);
    let deployments = Api::<Deployment>::namespaced(client.clone(), NS);
    let first = deployments.get("aipod-router-edge").await.expect("nginx");
    assert!(Api::<Service>::namespaced(client.clone(), NS).get_opt("aipod-router-edge").await.expect("get").is_some());
    let budgets = Api::<PodDisruptionBudget>::namespaced(client.clone(), NS);
    assert!(budgets.get_opt("aipod-router-edge").await.expect("get").is_some(), "2 router replicas: a budget");
    let hash_of_pod = async || {
        pods.get("aipod-router-edge-x1").await.expect("pod").annotations().get(crate::router::CONFIG_HASH).cloned()
    };
    assert_eq!(hash_of_pod().await, Some(crate::router::config_hash(&conf(&cm))), "the pod is told of the config");

    // b leaves the router: its entry goes, in place — the pods stay.
    Api::<AIPod>::namespaced(client.clone(), NS)
        .patch("b", &PatchParams::default(), &Patch::Merge(json!({"spec": {"route": null}})))
        .await
        .expect("edit b");
    feed_pods().await;
    reconcile_now(&client, &ctx, &cache, "b").await.expect("reconcile b");
    let cm = config_maps.get("aipod-router-edge").await.expect("router config");
    assert!(conf(&cm).contains("aipod_a;") && !conf(&cm).contains("aipod_b;"), "{}", conf(&cm));
    let again = deployments.get("aipod-router-edge").await.expect("nginx");
    assert_eq!(again.spec, first.spec, "a new config does not roll the router");
    assert_eq!(hash_of_pod().await, Some(crate::router::config_hash(&conf(&cm))), "…the running pod reloads it");

    // Nobody names it any more: the router goes away.
    Api::<AIPod>::namespaced(client.clone(), NS)
        .patch("a", &PatchParams::default(), &Patch::Merge(json!({"spec": {"route": null}})))
        .await
        .expect("edit a");
    reconcile_now(&client, &ctx, &cache, "a").await.expect("reconcile a");
    assert!(config_maps.get_opt("aipod-router-edge").await.expect("get").is_none());
    assert!(deployments.get_opt("aipod-router-edge").await.expect("get").is_none());
    assert!(Api::<Service>::namespaced(client.clone(), NS).get_opt("aipod-router-edge").await.expect("get").is_none());
    assert!(budgets.get_opt("aipod-router-edge").await.expect("get").is_none());
}

/// A fake API server that counts every request it answers.
async fn counting_cluster() -> (Client, Arc<std::sync::atomic::AtomicUsize>, Arc<std::sync::atomic::AtomicUsize>) {
    use kube_fake_client::interceptor::Funcs;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let n = Arc::new(AtomicUsize::new(0));
    let lists = Arc::new(AtomicUsize::new(0));
    // Each interceptor counts the request and lets the fake server answer.
    macro_rules! counted {
        ($($counter:expr),+) => {{
            let counters = [$(Arc::clone(&$counter)),+];
            move |_| {
                for c in &counters {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                Ok(None)
            }
        }};
    }
    let funcs = Funcs::new()
        .create(counted!(n))
        .get(counted!(n))
        .list(counted!(n, lists))
        .patch(counted!(n))
        .patch_status(counted!(n))
        .delete(counted!(n))
        .update(counted!(n));
    let client = kube_fake_client::ClientBuilder::new()
        .with_resource::<AIPod>()
        .with_status_subresource::<AIPod>()
        .with_status_subresource::<Deployment>()
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .expect("fake API server");
    (client, n, lists)
}

#[tokio::test]
async fn a_reconcile_costs_the_same_requests_with_200_aipods_as_with_2() {
    use std::sync::atomic::Ordering;
    let mut per_reconcile = Vec::new();
    for n in [2, 200] {
        let (client, requests, lists) = counting_cluster().await;
        let (ctx, cache) = context(&client, false);
        for i in 0..n {
            // Ten routers among them: a reconcile must touch only its own.
            let spec = json!({"image": "img", "route": {"router": format!("r{}", i % 10)}});
            create(&client, manifest(&format!("m{i}"), spec, i)).await;
        }
        cache.sync(&client).await;
        // A first pass (creates children and status), then the resync pass
        // that is measured: the steady state of a controller.
        for i in 0..n {
            reconcile(Arc::new(fetch(&client, &format!("m{i}")).await), Arc::clone(&ctx)).await.expect("first");
        }
        cache.sync(&client).await;
        let aipods: Vec<Arc<AIPod>> = ctx.aipods.state();
        let (before, lists_before) = (requests.load(Ordering::SeqCst), lists.load(Ordering::SeqCst));
        for aipod in aipods {
            reconcile(aipod, Arc::clone(&ctx)).await.expect("resync");
        }
        per_reconcile.push((requests.load(Ordering::SeqCst) - before) as f64 / n as f64);
        assert_eq!(lists.load(Ordering::SeqCst), lists_before, "no LIST per reconcile: AIPods come from the cache");
    }
    let (small, large) = (per_reconcile[0], per_reconcile[1]);
    assert!(large <= small + 0.01, "requests per reconcile grow with N: {small} with 2 AIPods, {large} with 200");
    assert!(large <= 8.0, "a resync reconcile makes {large} requests");
}

#[tokio::test]
async fn a_pod_monitor_follows_the_spec_and_its_absence_is_a_condition() {
    use crate::pod_monitor::PodMonitor;
    let wants = json!({"image": "img", "monitoring": {"podMonitor": true, "interval": "15s"}});

    // A cluster with prometheus-operator's CRD.
    let client = cluster_with(false, |b| b.with_resource::<PodMonitor>()).await;
    let (ctx, cache) = context_with(&client, false, |c| c.with_pod_monitors(true));
    create(&client, manifest("m", wants.clone(), 1)).await;
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    let monitors = Api::<PodMonitor>::namespaced(client.clone(), NS);
    let monitor = monitors.get("m").await.expect("PodMonitor created");
    assert_eq!(monitor.spec.pod_metrics_endpoints[0].port, "metrics");
    assert_eq!(monitor.spec.pod_metrics_endpoints[0].interval.as_deref(), Some("15s"));
    assert_eq!(monitor.metadata.owner_references.as_ref().map(|o| o[0].kind.as_str()), Some("AIPod"));
    let status = fetch(&client, "m").await.status.expect("status");
    assert_eq!(condition(&status, "MonitoringReady").reason, "PodMonitorApplied");

    Api::<AIPod>::namespaced(client.clone(), NS)
        .patch("m", &PatchParams::default(), &Patch::Merge(json!({"spec": {"monitoring": null}})))
        .await
        .expect("edit");
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    assert!(monitors.get_opt("m").await.expect("get").is_none(), "removed when no longer asked for");
    let status = fetch(&client, "m").await.status.expect("status");
    assert!(status.conditions.iter().all(|c| c.type_ != "MonitoringReady"));

    // A cluster without it: the model still serves; the AIPod says why
    // there is no PodMonitor.
    let client = cluster(false).await;
    let (ctx, cache) = context(&client, false);
    create(&client, manifest("m", wants, 1)).await;
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile without the CRD");
    assert!(Api::<Deployment>::namespaced(client.clone(), NS).get_opt("m").await.expect("get").is_some());
    let status = fetch(&client, "m").await.status.expect("status");
    let monitoring = condition(&status, "MonitoringReady");
    assert_eq!((monitoring.status.as_str(), monitoring.reason.as_str()), ("False", "PodMonitorCRDMissing"));
}

#[tokio::test]
async fn the_network_policy_is_on_by_default_and_removed_when_turned_off() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let client = cluster(false).await;
    let (ctx, cache) = context(&client, false);
    create(&client, manifest("m", json!({"image": "img", "networkPolicy": {"allowFromNamespaces": ["web"]}}), 1)).await;
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), NS);
    let policy = policies.get("m").await.expect("NetworkPolicy created");
    let from = serde_json::to_value(&policy.spec.expect("spec").ingress.expect("ingress")[0]).expect("json");
    assert_eq!(from["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "web");
    Api::<AIPod>::namespaced(client.clone(), NS)
        .patch("m", &PatchParams::default(), &Patch::Merge(json!({"spec": {"networkPolicy": {"enabled": false}}})))
        .await
        .expect("edit");
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    assert!(policies.get_opt("m").await.expect("get").is_none(), "removed when turned off");
}

#[tokio::test]
async fn the_network_policy_is_applied_before_the_pods_it_protects() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let client = cluster(false).await;
    let (ctx, cache) = context(&client, false);
    create(&client, manifest("m", json!({"image": "img"}), 1)).await;
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    let version = |rv: Option<String>| rv.expect("resourceVersion").parse::<u64>().expect("a number");
    let policy = Api::<NetworkPolicy>::namespaced(client.clone(), NS).get("m").await.expect("NetworkPolicy");
    let deployment = Api::<Deployment>::namespaced(client.clone(), NS).get("m").await.expect("Deployment");
    assert!(
        version(policy.metadata.resource_version) < version(deployment.metadata.resource_version),
        "no pod may start before the policy that protects it"
    );
}

#[tokio::test]
async fn a_tls_aipod_behind_a_gateway_gets_a_backend_tls_policy_or_says_why_not() {
    use gateway_api::apis::standard::backendtlspolicies::BackendTlsPolicy;
    let spec = json!({"image": "img", "tls": {"secretName": "m-tls"},
                      "route": {"gateway": {"parentRefs": [{"name": "gw"}]}}});
    let client = cluster_with(true, |b| b.with_resource::<BackendTlsPolicy>()).await;
    let (ctx, cache) = context_with(&client, true, |c| c.with_backend_tls(true));
    create(&client, manifest("m", spec.clone(), 1)).await;
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    let policies = Api::<BackendTlsPolicy>::namespaced(client.clone(), NS);
    let policy = policies.get("m").await.expect("BackendTLSPolicy created");
    assert_eq!(policy.spec.validation.hostname, format!("m.{NS}.svc"));
    Api::<AIPod>::namespaced(client.clone(), NS)
        .patch("m", &PatchParams::default(), &Patch::Merge(json!({"spec": {"tls": null}})))
        .await
        .expect("edit");
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    assert!(policies.get_opt("m").await.expect("get").is_none(), "removed with spec.tls");

    // Gateway API without the BackendTLSPolicy kind: the route is not ready, and says why.
    let client = cluster(true).await;
    let (ctx, cache) = context(&client, true);
    create(&client, manifest("m", spec, 1)).await;
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    let status = fetch(&client, "m").await.status.expect("status");
    assert_eq!(condition(&status, "RouteReady").reason, "BackendTLSPolicyMissing");
}

#[tokio::test]
async fn a_router_with_call_affinity_hashes_call_ids_over_the_ready_pods() {
    use k8s_openapi::api::{core::v1::ConfigMap, discovery::v1::EndpointSlice};
    let client = cluster(false).await;
    let (ctx, cache) = context(&client, false);
    create(&client, manifest("sticky", json!({"image": "img", "route": {"router": "edge", "callAffinity": true}}), 1))
        .await;
    let slice = |name: &str, service: &str, ip: &str| -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": NS, "labels": {crate::router::SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 50051}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        }))
        .expect("slice")
    };
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), NS);
    for (name, service, ip) in
        [("sticky-a", "sticky", "10.1.0.2"), ("sticky-b", "sticky", "10.1.0.1"), ("o", "other", "10.9.9.9")]
    {
        slices.create(&PostParams::default(), &slice(name, service, ip)).await.expect("create slice");
    }
    reconcile_now(&client, &ctx, &cache, "sticky").await.expect("reconcile");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS).get("aipod-router-edge").await.expect("router config");
    let conf = cm.data.as_ref().and_then(|d| d.get("nginx.conf")).cloned().expect("nginx.conf");
    assert!(
        conf.contains(
            "hash $http_x_aipod_call_id consistent;\n        server 10.1.0.1:50051;\n        server 10.1.0.2:50051;\n"
        ),
        "{conf}"
    );
    assert!(!conf.contains("10.9.9.9"), "another Service's pods are not routed");
}

#[tokio::test]
async fn a_config_a_router_pod_refuses_turns_route_ready_false_with_nginxs_reason() {
    use k8s_openapi::api::core::v1::{ConfigMap, Pod};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let client = cluster(false).await;
    // The reloader of a running, ready router pod: it says nginx refused
    // whatever config the operator wrote last.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), NS);
    let reloader = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let cm = config_maps.get("aipod-router-edge").await.expect("config");
            let conf = cm.data.and_then(|d| d.get("nginx.conf").cloned()).unwrap_or_default();
            let body = serde_json::json!({"loaded": "0", "rejected": crate::router::config_hash(&conf),
                "error": "nginx started no new worker", "reloads": 1, "failed_reloads": 1})
            .to_string();
            let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "aipod-router-edge-x1", "namespace": NS, "labels": crate::labels::router_labels("edge")},
        "spec": {"containers": [{"name": "reloader", "image": "op",
                                 "ports": [{"name": "reloader", "containerPort": port}]}]},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .expect("pod");
    let (pod_store, mut pod_writer) = kube::runtime::reflector::store::<Pod>();
    pod_writer.apply_watcher_event(&watcher::Event::Init);
    pod_writer.apply_watcher_event(&watcher::Event::InitApply(pod.clone()));
    pod_writer.apply_watcher_event(&watcher::Event::InitDone);
    Api::<Pod>::namespaced(client.clone(), NS).create(&PostParams::default(), &pod).await.expect("router pod");
    let (ctx, cache) = context_with(&client, false, |c| c.with_router_pods(pod_store));
    create(&client, manifest("a", json!({"image": "a", "route": {"router": "edge"}}), 1)).await;
    let action = reconcile_now(&client, &ctx, &cache, "a").await.expect("reconcile");
    let status = fetch(&client, "a").await.status.expect("status");
    let route = condition(&status, "RouteReady");
    assert_eq!((route.status.as_str(), route.reason.as_str()), ("False", "RouterConfigRejected"), "{route:?}");
    assert!(route.message.contains("aipod-router-edge-x1") && route.message.contains("no new worker"), "{route:?}");
    assert_eq!(condition(&status, "Ready").status, "False");
    assert_eq!(action, Action::requeue(ROUTER_RECHECK), "looked at again soon");
    reloader.abort();
}

#[tokio::test]
async fn autoscaling_the_operator_cannot_follow_changes_nothing_and_names_the_field() {
    let client = cluster(false).await;
    let (ctx, cache) = context(&client, false);
    create(&client, manifest("m", json!({"image": "img:1", "replicas": 2}), 1)).await;
    reconcile_now(&client, &ctx, &cache, "m").await.expect("first reconcile");
    let deployments = Api::<Deployment>::namespaced(client.clone(), NS);
    let before = deployments.get("m").await.expect("Deployment").spec;

    // minReplicas above maxReplicas (the API server's CEL rule would refuse
    // it; a CRD of an older operator, or a manifest from a file, would not).
    let mut bad = fetch(&client, "m").await;
    bad.spec.image = Some("img:2".into());
    bad.spec.autoscaling = serde_json::from_value(json!({"minReplicas": 4, "maxReplicas": 2})).expect("spec");
    Api::<AIPod>::namespaced(client.clone(), NS).replace("m", &PostParams::default(), &bad).await.expect("update");
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    assert_eq!(deployments.get("m").await.expect("Deployment").spec, before, "the Deployment is unchanged");
    let status = fetch(&client, "m").await.status.expect("status");
    let scaling = condition(&status, "Scaling");
    assert_eq!((scaling.status.as_str(), scaling.reason.as_str()), ("False", "InvalidAutoscaling"));
    assert!(scaling.message.contains("spec.autoscaling.minReplicas (4)"), "{}", scaling.message);

    // Fixed: the new image rolls out, and the condition says the autoscaler acts.
    let mut good = fetch(&client, "m").await;
    good.spec.autoscaling = serde_json::from_value(json!({"maxReplicas": 4})).expect("spec");
    Api::<AIPod>::namespaced(client.clone(), NS).replace("m", &PostParams::default(), &good).await.expect("update");
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    let after = deployments.get("m").await.expect("Deployment").spec.expect("spec");
    let args = after.template.spec.expect("pod").containers[0].args.clone().unwrap_or_default();
    assert!(args.windows(2).any(|w| w == ["--max-connection-age", "1m"]), "{args:?}");
    let scaling = condition(fetch(&client, "m").await.status.as_ref().expect("status"), "Scaling").clone();
    assert_eq!((scaling.status.as_str(), scaling.reason.as_str()), ("True", "Starting"));
}

#[tokio::test]
async fn kubectl_scale_through_the_scale_subresource_reaches_the_deployment() {
    let client = cluster(false).await;
    let (ctx, cache) = context(&client, false);
    create(&client, manifest("m", json!({"image": "img:1"}), 1)).await;
    reconcile_now(&client, &ctx, &cache, "m").await.expect("first reconcile");
    // What `kubectl scale aipod/m --replicas 3` sends.
    let resource = kube::api::ApiResource::erase::<AIPod>(&());
    Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), NS, &resource)
        .patch_subresource("scale", "m", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}})))
        .await
        .expect("scale");
    reconcile_now(&client, &ctx, &cache, "m").await.expect("reconcile");
    let deployment = Api::<Deployment>::namespaced(client.clone(), NS).get("m").await.expect("Deployment");
    assert_eq!(deployment.spec.and_then(|s| s.replicas), Some(3));
    let status = fetch(&client, "m").await.status.expect("status");
    assert_eq!(status.selector.as_deref(), Some("app.kubernetes.io/instance=m,app.kubernetes.io/name=aipod"));
}
