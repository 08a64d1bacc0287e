//! The reconciler: applies an AIPod's children server-side with one field
//! manager, removes a route it no longer wants, and writes the status. The
//! objects themselves come from the pure builders.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use gateway_api::apis::standard::{backendtlspolicies::BackendTlsPolicy, grpcroutes::GrpcRoute};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::Instrument;

use crate::{
    Error, Result, autoscale, children, conflict,
    crd::{AIPod, AIPodStatus},
    deployment, labels,
    metrics::Metrics,
    pod_http,
    pod_monitor::PodMonitor,
    reloader,
    router::{self, RouterOptions},
    status::{self, MonitoringState, RouteState},
};

/// How often a healthy AIPod is looked at again without any change.
const RESYNC: Duration = Duration::from_secs(300);
/// How soon an AIPod that lost an upstream conflict checks again.
const CONFLICT_RECHECK: Duration = Duration::from_secs(30);
/// How soon an AIPod whose router has not confirmed its config looks again.
const ROUTER_RECHECK: Duration = Duration::from_secs(10);
/// How long a router reloader gets to answer `/status`.
const ROUTER_STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Error backoff: first delay and ceiling.
const BACKOFF_START: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Whether the GRPCRoute CRD is installed.
    pub gateway_api: bool,
    /// Whether the PodMonitor CRD (prometheus-operator) is installed.
    pub pod_monitors: bool,
    /// Whether the BackendTLSPolicy CRD (Gateway API v1) is installed.
    pub backend_tls: bool,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Every AIPod the controller watches, from its reflector: reconciles
    /// read their neighbours here, not from the API server.
    pub aipods: Store<AIPod>,
    /// How nginx routers are run.
    pub router: RouterOptions,
    /// The runtime image of AIPods that name none.
    pub runtime_image: String,
    /// Every router pod, from a reflector: a reconcile tells them of a new
    /// config without a LIST.
    pub router_pods: Store<Pod>,
    failures: Mutex<HashMap<ObjectRef<AIPod>, u32>>,
}

impl Context {
    /// A context for `client`, reading AIPods from `aipods`.
    pub fn new(client: Client, gateway_api: bool, metrics: Arc<Metrics>, aipods: Store<AIPod>) -> Self {
        let reporter = Reporter { controller: labels::MANAGER.to_owned(), instance: std::env::var("POD_NAME").ok() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            gateway_api,
            pod_monitors: false,
            backend_tls: false,
            metrics,
            aipods,
            router: RouterOptions::default(),
            runtime_image: deployment::DEFAULT_IMAGE.to_owned(),
            router_pods: kube::runtime::reflector::store().0,
            failures: Mutex::default(),
        }
    }

    /// Reads router pods from `pods`.
    pub fn with_router_pods(mut self, pods: Store<Pod>) -> Self {
        self.router_pods = pods;
        self
    }

    /// Runs routers with `options`.
    pub fn with_router(mut self, options: RouterOptions) -> Self {
        self.router = options;
        self
    }

    /// Applies PodMonitors (the cluster serves the CRD).
    pub fn with_pod_monitors(mut self, installed: bool) -> Self {
        self.pod_monitors = installed;
        self
    }

    /// Applies BackendTLSPolicies (the cluster serves the CRD).
    pub fn with_backend_tls(mut self, installed: bool) -> Self {
        self.backend_tls = installed;
        self
    }

    /// Runs AIPods that name no image with `image`.
    pub fn with_runtime_image(mut self, image: String) -> Self {
        self.runtime_image = image;
        self
    }

    fn backoff(&self, key: &ObjectRef<AIPod>) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        BACKOFF_START.saturating_mul(1 << (*n - 1).min(16)).min(BACKOFF_MAX)
    }

    /// Forgets `key`'s failures: it reconciled, or it is gone.
    fn forget(&self, key: &ObjectRef<AIPod>) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }

    /// Forgets the failures of AIPods that no longer exist (deleted AIPods
    /// are not reconciled again, so nothing else would).
    fn forget_deleted(&self) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).retain(|key, _| self.aipods.get(key).is_some());
    }

    /// AIPods remembered for backoff (for tests: it must not grow forever).
    pub fn backoff_entries(&self) -> usize {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Brings the cluster in line with one AIPod.
pub async fn reconcile(aipod: Arc<AIPod>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let span =
        tracing::info_span!("reconcile", namespace = aipod.namespace().unwrap_or_default(), aipod = aipod.name_any());
    let result = reconcile_inner(&aipod, &ctx).instrument(span).await;
    ctx.metrics.observe(started.elapsed(), result.as_ref().err());
    if result.is_ok() {
        ctx.forget(&ObjectRef::from_obj(aipod.as_ref()));
    }
    ctx.forget_deleted();
    result
}

async fn reconcile_inner(aipod: &AIPod, ctx: &Context) -> Result<Action> {
    let ns = aipod.namespace().ok_or_else(|| Error::InvalidSpec("AIPod has no namespace".into()))?;
    let name = crate::name(aipod)?.to_owned();
    let client = &ctx.client;

    // The namespace's AIPods from the reflector (complete once its first
    // list is in), never a LIST per reconcile.
    ctx.aipods.wait_until_ready().await.map_err(|e| Error::Cache(e.to_string()))?;
    // Oldest claim first: the order conflicts and router configs go by.
    let mut all: Vec<AIPod> = ctx
        .aipods
        .state()
        .iter()
        .filter(|a| a.namespace().as_deref() == Some(ns.as_str()))
        .map(|a| (**a).clone())
        .collect();
    all.sort_by(conflict::claim_order);
    let upstream = aipod.upstream();
    let holder = conflict::holder(&all, &upstream).and_then(|h| h.metadata.name.clone());
    let conflict_with = holder.filter(|h| *h != name);

    // Autoscaling the operator cannot follow leaves every object as it
    // is: the status says which field, and why.
    if autoscale::Policy::of(aipod).is_err() {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        write_status(ctx, aipod, &ns, &name, status::with_scaling(aipod, &now)).await?;
        return Ok(Action::requeue(RESYNC));
    }

    // What the AIPod becomes, applied in order: the policy first, so no
    // pod starts unprotected.
    let desired = children::children(aipod, &ctx.runtime_image)?;
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), &ns);
    sync_owned(Some(&policies), aipod, &name, desired.network_policy).await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let applied = apply(&deployments, &name, &desired.deployment).await?;
    let observed = aipod.status.as_ref().and_then(|s| s.observed_generation);
    if observed != aipod.metadata.generation {
        // The spec changed since the last reconcile (or this is the first).
        let (reason, verb) = if observed.is_none() { ("Created", "applied") } else { ("Updated", "updated") };
        publish(ctx, aipod, EventType::Normal, reason, &format!("{verb} Deployment {name}")).await;
    }
    apply(&Api::<Service>::namespaced(client.clone(), &ns), &name, &desired.service).await?;
    let budgets = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns);
    sync_owned(Some(&budgets), aipod, &name, desired.disruption_budget).await?;

    // The route, unless another AIPod holds the upstream.
    let routes = ctx.gateway_api.then(|| Api::<GrpcRoute>::namespaced(client.clone(), &ns));
    let requested = desired.grpc_route.is_some();
    let wanted = desired.grpc_route.filter(|_| conflict_with.is_none());
    let route_state = match (requested, &conflict_with, sync_owned(routes.as_ref(), aipod, &name, wanted).await?) {
        (false, _, _) => RouteState::NotRequested,
        (true, Some(holder), _) => RouteState::Conflict { holder: holder.clone() },
        (true, None, Some(route)) => RouteState::Applied(route.status),
        (true, None, None) => RouteState::GatewayApiMissing,
    };
    // Its BackendTLSPolicy, once the route is applied.
    let policies = ctx.backend_tls.then(|| Api::<BackendTlsPolicy>::namespaced(client.clone(), &ns));
    let tls_wanted = desired.backend_tls_policy.filter(|_| matches!(route_state, RouteState::Applied(_)));
    let tls_requested = tls_wanted.is_some();
    let tls_applied = sync_owned(policies.as_ref(), aipod, &name, tls_wanted).await?.is_some();
    let route_state = if tls_requested && !tls_applied { RouteState::BackendTlsPolicyMissing } else { route_state };

    let monitors = ctx.pod_monitors.then(|| Api::<PodMonitor>::namespaced(client.clone(), &ns));
    let monitor_requested = desired.pod_monitor.is_some();
    let monitoring = match (monitor_requested, sync_owned(monitors.as_ref(), aipod, &name, desired.pod_monitor).await?)
    {
        (false, _) => MonitoringState::NotRequested,
        (true, Some(_)) => MonitoringState::Applied,
        (true, None) => MonitoringState::PodMonitorCrdMissing,
    };

    let left = aipod.status.as_ref().and_then(|s| s.router.clone());
    let named = aipod.spec.route.as_ref().and_then(|r| r.router.clone());
    let mut routers: Vec<String> = named.clone().into_iter().chain(left).collect();
    routers.dedup();
    let reports = sync_routers(ctx, &ns, &all, &routers).await?;
    let router_pending = reports.values().any(|r| r.pending);
    let route_state = match (route_state, named) {
        (RouteState::NotRequested, Some(router)) => {
            let rejected = reports.get(&router).and_then(|r| r.rejected.clone());
            RouteState::Router { router, rejected }
        }
        (state, _) => state,
    };

    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = status::compute(aipod, &applied, &route_state, &monitoring, &now);
    write_status(ctx, aipod, &ns, &name, status).await?;
    Ok(match route_state {
        RouteState::Conflict { .. } => Action::requeue(CONFLICT_RECHECK),
        // Until every router pod confirms the config, look again soon: a
        // config nginx refuses shows in RouteReady.
        _ if router_pending => Action::requeue(ROUTER_RECHECK),
        _ => Action::requeue(RESYNC),
    })
}

/// Writes `status` (all but `status.autoscaling`, which the autoscaler
/// owns) if it differs from the AIPod's, with an event per condition that
/// changed.
async fn write_status(ctx: &Context, aipod: &AIPod, ns: &str, name: &str, status: AIPodStatus) -> Result<()> {
    let mut current = aipod.status.clone();
    if let Some(current) = &mut current {
        current.autoscaling = None;
    }
    if current.as_ref() == Some(&status) {
        return Ok(());
    }
    let changed_conditions = changed(aipod, &status);
    let patch = serde_json::json!({ "apiVersion": "aipod.io/v1alpha1", "kind": "AIPod", "status": status });
    Api::<AIPod>::namespaced(ctx.client.clone(), ns)
        .patch_status(name, &PatchParams::apply(labels::MANAGER).force(), &Patch::Apply(&patch))
        .await?;
    for c in changed_conditions {
        let warning = (c.type_ == "Degraded" && c.status == "True") || (c.type_ == "Scaling" && c.status == "False");
        let kind = if warning { EventType::Warning } else { EventType::Normal };
        publish(ctx, aipod, kind, &c.reason, &format!("{} is {}: {}", c.type_, c.status, c.message)).await;
    }
    Ok(())
}

/// What a router's pods say of the config the operator last wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterReport {
    /// Why a router pod's nginx refused the config (it keeps the previous).
    pub rejected: Option<String>,
    /// Some ready pod has not confirmed the config yet (or refused it).
    pub pending: bool,
}

/// Brings the nginx `routers` of namespace `ns` in line with the AIPods
/// there (`oldest_first`): applies the objects of routers that AIPods name, deletes
/// those no AIPod names any more. Routers are recomputed only for the AIPod
/// that names or left them, so a resync of N AIPods costs O(N) writes.
/// Returns what each applied router's pods report of the new config.
async fn sync_routers(
    ctx: &Context,
    ns: &str,
    oldest_first: &[AIPod],
    routers: &[String],
) -> Result<BTreeMap<String, RouterReport>> {
    let mut reports = BTreeMap::new();
    if routers.is_empty() {
        return Ok(reports);
    }
    let client = &ctx.client;
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let services = Api::<Service>::namespaced(client.clone(), ns);
    let budgets = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns);
    // The ready pods of AIPods with call affinity, which their router hashes
    // call ids over: one LIST, only when some AIPod asks.
    let affine = oldest_first.iter().any(|a| a.spec.route.as_ref().is_some_and(|r| r.call_affinity));
    let slices = if !affine {
        Vec::new()
    } else {
        // Every Service's slices in the namespace (ready_endpoints picks):
        // one selector that does not grow with the AIPods.
        let lp = kube::api::ListParams::default().labels(router::SERVICE_NAME_LABEL);
        Api::<EndpointSlice>::namespaced(client.clone(), ns).list(&lp).await?.items
    };
    let endpoints = router::ready_endpoints(oldest_first, &slices);
    for router in routers {
        let name = router::object_name(router);
        match router::objects(router, ns, oldest_first, &endpoints, &ctx.router) {
            Some(objects) => {
                apply(&config_maps, &name, &objects.config_map).await?;
                apply(&services, &name, &objects.service).await?;
                apply(&deployments, &name, &objects.deployment).await?;
                match &objects.pod_disruption_budget {
                    Some(budget) => drop(apply(&budgets, &name, budget).await?),
                    None => delete_if_present(&budgets, &name).await?,
                }
                reports.insert(router.clone(), router_pods(ctx, ns, router, &objects.config_hash).await?);
            }
            None => {
                for result in [
                    config_maps.delete(&name, &DeleteParams::default()).await.map(drop),
                    services.delete(&name, &DeleteParams::default()).await.map(drop),
                    deployments.delete(&name, &DeleteParams::default()).await.map(drop),
                    budgets.delete(&name, &DeleteParams::default()).await.map(drop),
                ] {
                    match result {
                        Ok(()) => {}
                        Err(kube::Error::Api(status)) if status.is_not_found() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                tracing::info!(router, "removed a router no AIPod names any more");
            }
        }
    }
    Ok(reports)
}

/// Tells `router`'s running pods of the config with `hash` and asks what
/// they loaded: each pod is annotated with the hash (the kubelet then
/// refreshes its ConfigMap volume at once, and the reloader in the pod
/// reloads nginx), and each ready pod's reloader says whether its nginx
/// runs or refused that config.
async fn router_pods(ctx: &Context, ns: &str, router: &str, hash: &str) -> Result<RouterReport> {
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns);
    let selector = labels::router_selector(router);
    let mut report = RouterReport::default();
    let listed = ctx.router_pods.state();
    let ours = listed.iter().filter(|p| {
        p.namespace().as_deref() == Some(ns)
            && p.metadata.deletion_timestamp.is_none()
            && selector.iter().all(|(k, v)| p.labels().get(k) == Some(v))
    });
    for pod in ours {
        let pod_name = pod.name_any();
        if pod.annotations().get(router::CONFIG_HASH).map(String::as_str) != Some(hash) {
            let patch = serde_json::json!({"metadata": {"annotations": {router::CONFIG_HASH: hash}}});
            match pods.patch(&pod_name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {}
                // Gone meanwhile: its replacement mounts the new config.
                Err(kube::Error::Api(status)) if status.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let Some(addr) = router::reloader_address(pod) else { continue };
        match pod_http::get(addr, "/status", ROUTER_STATUS_TIMEOUT).await {
            Ok(body) => match serde_json::from_str::<reloader::Status>(&body) {
                Ok(status) if status.rejected.as_deref() == Some(hash) => {
                    report.pending = true;
                    let why = status.error.unwrap_or_default();
                    report.rejected = Some(format!(
                        "router {router:?} pod {pod_name}: nginx refused the new config and keeps serving the \
                         previous one: {why}"
                    ));
                }
                Ok(status) => report.pending |= status.loaded.as_deref() != Some(hash),
                Err(e) => {
                    tracing::warn!(pod = pod_name, error = %e, "a router reloader's /status is not what it should be");
                    report.pending = true;
                }
            },
            Err(e) => {
                tracing::debug!(pod = pod_name, error = %e, "router reloader status unavailable");
                report.pending = true;
            }
        }
    }
    Ok(report)
}

/// Deletes `name` if it exists.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Conditions whose status changed since the last status.
fn changed(
    aipod: &AIPod,
    new: &crate::crd::AIPodStatus,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let old = aipod.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    new.conditions
        .iter()
        .filter(|c| {
            old.iter().find(|o| o.type_ == c.type_).is_none_or(|o| o.status != c.status || o.reason != c.reason)
        })
        .cloned()
        .collect()
}

/// Server-side apply with the operator's field manager, taking ownership of
/// the fields it sets (drift in them is corrected).
async fn apply<K>(api: &Api<K>, name: &str, object: &K) -> Result<K>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    Ok(api.patch(name, &PatchParams::apply(labels::MANAGER).force(), &Patch::Apply(object)).await?)
}

/// Brings the AIPod's optional child `name` in line with `desired`: applied
/// when there is one (the applied object back), else removed if the AIPod
/// owns it; `api` is `None` when the cluster does not serve the kind (then
/// nothing is applied, and `None` comes back for a desired object too).
async fn sync_owned<K>(api: Option<&Api<K>>, aipod: &AIPod, name: &str, desired: Option<K>) -> Result<Option<K>>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    match (desired, api) {
        (Some(object), Some(api)) => Ok(Some(apply(api, name, &object).await?)),
        (Some(_), None) => Ok(None),
        (None, api) => remove_owned(api, aipod, name).await.map(|()| None),
    }
}

/// Deletes the AIPod's optional child `name` (a GRPCRoute, a PodMonitor) if
/// there is one and the AIPod owns it; `api` is `None` when the cluster does
/// not serve the kind.
async fn remove_owned<K>(api: Option<&Api<K>>, aipod: &AIPod, name: &str) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let Some(api) = api else { return Ok(()) };
    let Some(existing) = api.get_opt(name).await? else { return Ok(()) };
    let ours = existing.owner_references().iter().any(|o| Some(&o.uid) == aipod.metadata.uid.as_ref());
    if ours {
        api.delete(name, &DeleteParams::default()).await?;
    }
    Ok(())
}

async fn publish(ctx: &Context, aipod: &AIPod, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.to_owned()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &aipod.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "could not publish event");
    }
}

/// Retries a failed reconcile with exponential backoff per AIPod.
pub fn error_policy(aipod: Arc<AIPod>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff(&ObjectRef::from_obj(aipod.as_ref()));
    tracing::warn!(aipod = %aipod.name_any(), error = %error, retry_in_s = delay.as_secs(), "reconcile failed");
    let note = error.to_string();
    tokio::spawn(async move {
        publish(&ctx, &aipod, EventType::Warning, "ReconcileFailed", &note).await;
    });
    Action::requeue(delay)
}

/// Whether the cluster serves BackendTLSPolicies (`gateway.networking.k8s.io/v1`).
pub async fn backend_tls_installed(client: &Client) -> bool {
    let gvk = kube::api::GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "BackendTLSPolicy");
    kube::discovery::pinned_kind(client, &gvk).await.is_ok()
}

/// Whether the cluster serves PodMonitors (`monitoring.coreos.com/v1`).
pub async fn pod_monitors_installed(client: &Client) -> bool {
    let gvk = kube::api::GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PodMonitor");
    kube::discovery::pinned_kind(client, &gvk).await.is_ok()
}

/// Whether the cluster serves GRPCRoutes (`gateway.networking.k8s.io/v1`).
pub async fn gateway_api_installed(client: &Client) -> bool {
    let gvk = kube::api::GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "GRPCRoute");
    kube::discovery::pinned_kind(client, &gvk).await.is_ok()
}

/// Runs the controller until a shutdown signal.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    runtime_image: String,
    router: RouterOptions,
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    let gateway_api = gateway_api_installed(&client).await;
    if !gateway_api {
        tracing::warn!(
            "Gateway API GRPCRoute CRD not found: AIPods asking for a gateway route get RouteReady=False (GatewayAPIMissing)"
        );
    }
    let pod_monitors = pod_monitors_installed(&client).await;
    let backend_tls = backend_tls_installed(&client).await;
    if !pod_monitors {
        tracing::info!(
            "PodMonitor CRD not found: AIPods asking for spec.monitoring.podMonitor get MonitoringReady=False (PodMonitorCRDMissing)"
        );
    }
    fn api<
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    >(
        client: &Client,
        ns: &Option<String>,
    ) -> Api<K> {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let owned = watcher::Config::default().labels(&labels::managed_selector());
    // A router's ConfigMap is owned by every AIPod naming it; when one of
    // them goes, garbage collection edits the owner list, and the others are
    // reconciled so the router forgets the departed upstream.
    let router_owners = |cm: ConfigMap| {
        let ns = cm.namespace().unwrap_or_default();
        cm.owner_references()
            .iter()
            .filter(|o| o.kind == "AIPod")
            .map(|o| ObjectRef::<AIPod>::new(&o.name).within(&ns))
            .collect::<Vec<_>>()
    };
    let mut controller = Controller::new(api::<AIPod>(&client, &namespace), watcher::Config::default())
        .owns(api::<Deployment>(&client, &namespace), owned.clone())
        .owns(api::<Service>(&client, &namespace), owned.clone())
        .owns(api::<NetworkPolicy>(&client, &namespace), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, &namespace), owned.clone())
        .watches(
            api::<ConfigMap>(&client, &namespace),
            watcher::Config::default().labels(&labels::routers_selector()),
            router_owners,
        )
        // The ready pods behind an AIPod changed: a router hashing call ids
        // over them (callAffinity) follows. Slices carry their Service's
        // labels, so only the operator's own are watched.
        .watches(api::<EndpointSlice>(&client, &namespace), owned.clone(), |slice: EndpointSlice| {
            let ns = slice.namespace().unwrap_or_default();
            slice.labels().get(router::SERVICE_NAME_LABEL).map(|name| ObjectRef::<AIPod>::new(name).within(&ns))
        });
    if gateway_api {
        controller = controller.owns(api::<GrpcRoute>(&client, &namespace), owned.clone());
    }
    if pod_monitors {
        controller = controller.owns(api::<PodMonitor>(&client, &namespace), owned.clone());
    }
    if backend_tls {
        controller = controller.owns(api::<BackendTlsPolicy>(&client, &namespace), owned);
    }
    // Router pods, cached: told of new configs without a LIST per reconcile.
    let (router_pods, writer) = kube::runtime::reflector::store::<Pod>();
    let pods =
        watcher(api::<Pod>(&client, &namespace), watcher::Config::default().labels(&labels::router_pods_selector()));
    tokio::spawn({
        use kube::runtime::WatchStreamExt;
        pods.default_backoff().reflect(writer).for_each(|event| async move {
            if let Err(e) = event {
                tracing::warn!(error = %e, "router pod watch");
            }
        })
    });
    let ctx = Arc::new(
        Context::new(client.clone(), gateway_api, metrics, controller.store())
            .with_router_pods(router_pods)
            .with_router(router)
            .with_runtime_image(runtime_image)
            .with_pod_monitors(pod_monitors)
            .with_backend_tls(backend_tls),
    );
    // The autoscaler reads the same AIPod cache; it stops with the
    // controller (when the signal comes, or the lease is lost).
    let autoscaler = crate::autoscaler::Autoscaler::new(
        client.clone(),
        ctx.aipods.clone(),
        ctx.recorder.clone(),
        Arc::clone(&ctx.metrics),
    );
    let autoscaler = tokio::spawn(autoscaler.run());
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("<all>"),
        gateway_api,
        pod_monitors,
        backend_tls,
        "aipod-operator started"
    );
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(aipod = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
    autoscaler.abort();
    tracing::info!("aipod-operator stopped");
}

#[cfg(test)]
mod tests;
