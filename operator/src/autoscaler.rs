//! The autoscaler's loop, the I/O around [`crate::autoscale`]: every
//! interval, for each AIPod with `spec.autoscaling`, it reads the calls
//! each of its pods holds from the pod's own metrics port (no Prometheus or
//! metrics adapter in between, the way Knative's autoscaler reads its queue
//! proxies), decides, and carries the decision out — pod-deletion costs on
//! the pods first, then `replicas` through the scale subresource — and
//! reports in `status.autoscaling`, events and metrics. It runs beside the
//! reconciler, only while this instance leads.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{autoscaling::v2::HorizontalPodAutoscaler, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Recorder},
        reflector::Store,
    },
};
use serde_json::json;
use tokio::time::Instant;

use crate::{
    Result,
    autoscale::{self, Autoscale, Decision, PodLoad, Policy, Sample},
    crd::{AIPod, AutoscalingHeld, AutoscalingStatus},
    labels,
    metrics::Metrics,
    pod_http,
};

/// The field manager of the autoscaler's writes (replicas, its status).
pub const FIELD_MANAGER: &str = "aipod-autoscaler";
/// The annotation the ReplicaSet orders its deletions by.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// How long a pod gets to answer `/metrics`.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the loop looks for AIPods whose interval has come.
const TICK: Duration = Duration::from_secs(1);
/// The longest `status.autoscaling` goes unwritten while only the call
/// counts move (a change of decision, pods or error is written at once).
const STATUS_REFRESH: Duration = Duration::from_secs(30);

/// One AIPod's autoscaler memory.
#[derive(Debug)]
struct Entry {
    uid: String,
    autoscale: Autoscale,
    next: Instant,
    /// The last event's reason, so a decision that repeats is told once.
    told: Option<&'static str>,
    written: Option<(Instant, AutoscalingStatus)>,
}

impl Entry {
    fn new(uid: String, now: Instant) -> Self {
        Self { uid, autoscale: Autoscale::default(), next: now, told: None, written: None }
    }
}

/// The autoscaler's writes: its own field manager.
fn params() -> PatchParams {
    PatchParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PatchParams::default() }
}

/// The autoscaler of every AIPod with `spec.autoscaling`.
pub struct Autoscaler {
    client: Client,
    aipods: Store<AIPod>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    entries: HashMap<(String, String), Entry>,
}

impl Autoscaler {
    /// An autoscaler reading AIPods from `aipods`.
    pub fn new(client: Client, aipods: Store<AIPod>, recorder: Recorder, metrics: Arc<Metrics>) -> Self {
        Self { client, aipods, recorder, metrics, entries: HashMap::new() }
    }

    /// Runs until the task is dropped.
    pub async fn run(mut self) {
        loop {
            let _ = self.tick(Instant::now()).await;
            tokio::time::sleep(TICK).await;
        }
    }

    /// One pass at `now`: every autoscaled AIPod whose interval has come is
    /// read, decided for and scaled; AIPods gone or no longer autoscaled
    /// are forgotten. Returns what failed (`namespace/name: error`; each
    /// is logged and tried again at the next interval).
    pub async fn tick(&mut self, now: Instant) -> Vec<String> {
        let mut failed = Vec::new();
        let aipods: Vec<Arc<AIPod>> = self.aipods.state();
        let mut live = Vec::new();
        for aipod in aipods {
            let (Some(ns), Some(uid)) = (aipod.namespace(), aipod.metadata.uid.clone()) else { continue };
            if aipod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            // Not autoscaled, or a spec the reconciler reports as invalid.
            let Ok(Some(policy)) = Policy::of(&aipod) else { continue };
            let key = (ns, aipod.name_any());
            live.push(key.clone());
            // The same name with another uid is a new AIPod: start over.
            let mut entry = self.entries.remove(&key).filter(|e| e.uid == uid).unwrap_or_else(|| Entry::new(uid, now));
            if entry.next <= now {
                entry.next = now + policy.interval;
                if let Err(e) = self.scale(&aipod, &policy, &mut entry, now).await {
                    tracing::warn!(namespace = key.0, aipod = key.1, error = %e, "autoscaling failed; trying again next interval");
                    self.metrics.autoscaler_failed(&key.0, &key.1);
                    failed.push(format!("{}/{}: {e}", key.0, key.1));
                }
            }
            self.entries.insert(key, entry);
        }
        let gone: Vec<(String, String)> = self.entries.keys().filter(|k| !live.contains(k)).cloned().collect();
        for key in gone {
            self.entries.remove(&key);
            self.metrics.autoscaler_forget(&key.0, &key.1);
        }
        failed
    }

    /// Reads `aipod`'s pods, decides, and acts.
    async fn scale(&self, aipod: &AIPod, policy: &Policy, entry: &mut Entry, now: Instant) -> Result<()> {
        let ns = aipod.namespace().unwrap_or_default();
        let name = aipod.name_any();
        let replicas = u32::try_from(aipod.spec.replicas).unwrap_or(0);

        // Another autoscaler on the same AIPod: do nothing, and say so.
        if let Some(hpa) = self.competing_hpa(&ns, &name).await? {
            let held = AutoscalingHeld {
                reason: "HPAConflict".to_owned(),
                message: format!(
                    "HorizontalPodAutoscaler {hpa:?} also targets this AIPod while spec.autoscaling is set: the \
                     operator leaves spec.replicas alone; remove the HPA (or its KEDA ScaledObject) or \
                     spec.autoscaling"
                ),
            };
            self.tell(aipod, entry, "HPAConflict", EventType::Warning, &held.message).await;
            let status = AutoscalingStatus { held: Some(held), ..Self::carried(aipod) };
            return self.write_status(aipod, entry, status, now, true).await;
        }

        let (sample, unread_why, costs) = self.read(&ns, &name).await?;
        let decision = entry.autoscale.decide(policy, replicas, &sample, now);
        let (in_flight, queued) = (sample.in_flight(), sample.queued());
        let wanted = policy.wanted(in_flight);
        self.metrics.autoscaler_read(&ns, &name, wanted, sample.unread, decision.reason());

        let mut status = Self::carried(aipod);
        status.desired_replicas = i32::try_from(wanted).unwrap_or(i32::MAX);
        status.calls_in_flight = i64::try_from(in_flight).unwrap_or(i64::MAX);
        status.calls_queued = i64::try_from(queued).unwrap_or(i64::MAX);
        status.pods_read = i32::try_from(sample.pods.len()).unwrap_or(i32::MAX);
        status.held = unread_why.map(|why| AutoscalingHeld {
            reason: "MetricsUnavailable".to_owned(),
            message: format!(
                "{} of {} ready pods could not be read ({why}): holding {replicas} replicas, never scaling down on \
                 missing data",
                sample.unread,
                sample.unread as usize + sample.pods.len()
            ),
        });
        let calls = format!("{in_flight} calls in flight ({queued} waiting), {} per pod wanted", policy.target);
        let scaled = match &decision {
            Decision::Up { to, panic } => {
                self.set_replicas(&ns, &name, *to).await?;
                let how = if *panic { " at once (the load is twice what the pods hold)" } else { "" };
                let note = format!("{replicas} → {to} pods{how}: {calls}");
                self.tell(aipod, entry, decision.reason(), EventType::Normal, &note).await;
                Some(format!("ScaledUp: {note}"))
            }
            Decision::Down { to, remove } => {
                // Costs first: when the replicas drop, the ReplicaSet
                // removes the lowest-cost ready pods — the idle ones chosen.
                self.mark(&ns, &sample, remove, &costs).await?;
                self.set_replicas(&ns, &name, *to).await?;
                let note = format!("{replicas} → {to} pods, removing idle {}: {calls}", remove.join(", "));
                self.tell(aipod, entry, decision.reason(), EventType::Normal, &note).await;
                Some(format!("ScaledDown: {note}"))
            }
            Decision::Deferred { wanted } => {
                let note = format!(
                    "{wanted} of {replicas} pods would do ({calls}), but every pod holds a call: waiting for one to \
                     be idle"
                );
                self.tell(aipod, entry, decision.reason(), EventType::Normal, &note).await;
                None
            }
            Decision::Hold(_) => {
                if let Some(held) = &status.held {
                    self.tell(aipod, entry, "MetricsUnavailable", EventType::Warning, &held.message).await;
                } else if entry.told == Some("MetricsUnavailable") || entry.told == Some("HPAConflict") {
                    entry.told = None;
                }
                None
            }
        };
        let changed = scaled.is_some();
        if let Some(reason) = scaled {
            status.last_scale_time = Some(Time(k8s_openapi::jiff::Timestamp::now()));
            status.last_scale_reason = Some(reason);
        }
        self.write_status(aipod, entry, status, now, changed).await
    }

    /// What `status.autoscaling` keeps from before (the last scale).
    fn carried(aipod: &AIPod) -> AutoscalingStatus {
        let last = aipod.status.as_ref().and_then(|s| s.autoscaling.clone()).unwrap_or_default();
        AutoscalingStatus {
            last_scale_time: last.last_scale_time,
            last_scale_reason: last.last_scale_reason,
            ..AutoscalingStatus::default()
        }
    }

    /// The first HPA in `ns` that targets AIPod `name`.
    async fn competing_hpa(&self, ns: &str, name: &str) -> Result<Option<String>> {
        let hpas = Api::<HorizontalPodAutoscaler>::namespaced(self.client.clone(), ns);
        let list = match hpas.list(&ListParams::default()).await {
            Ok(list) => list,
            // A cluster (or a test API server) without the kind has none.
            Err(kube::Error::Api(status)) if status.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(list.items.into_iter().find_map(|hpa| {
            let target = &hpa.spec.scale_target_ref;
            let ours = target.kind == "AIPod"
                && target.name == name
                && target.api_version.as_deref().is_none_or(|v| v.starts_with("aipod.io/"));
            ours.then(|| hpa.name_any())
        }))
    }

    /// Reads every pod of AIPod `name`: ready pods at their metrics port;
    /// with why the first unread one could not be read, and the deletion
    /// cost each pod carries now.
    async fn read(&self, ns: &str, name: &str) -> Result<(Sample, Option<String>, HashMap<String, String>)> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns);
        let listed = pods.list(&ListParams::default().labels(&labels::selector_query(name))).await?.items;
        let live: Vec<&Pod> =
            listed.iter().filter(|p| p.metadata.deletion_timestamp.is_none() && !finished(p)).collect();
        let costs =
            live.iter().filter_map(|p| Some((p.name_any(), p.annotations().get(DELETION_COST)?.clone()))).collect();
        let seen = live
            .iter()
            .map(|p| Seen {
                name: p.name_any(),
                ready: pod_http::is_ready(p),
                metrics: pod_http::address(p, "metrics"),
            })
            .collect();
        let (sample, why) = sample(seen).await;
        Ok((sample, why, costs))
    }

    /// Gives each pod of `sample` its deletion cost for removing `remove`
    /// (only pods whose annotation, as listed in `current`, differs are
    /// written).
    async fn mark(
        &self,
        ns: &str,
        sample: &Sample,
        remove: &[String],
        current: &HashMap<String, String>,
    ) -> Result<()> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns);
        for (pod, cost) in autoscale::deletion_costs(sample, remove) {
            let cost = cost.to_string();
            if current.get(&pod) == Some(&cost) {
                continue;
            }
            let patch = json!({"metadata": {"annotations": {DELETION_COST: cost}}});
            match pods.patch(&pod, &params(), &Patch::Merge(&patch)).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Sets AIPod `name`'s replicas through its scale subresource (as
    /// `kubectl scale` does; the answer, a Scale, is not needed).
    async fn set_replicas(&self, ns: &str, name: &str, to: u32) -> Result<()> {
        let resource = kube::api::ApiResource::erase::<AIPod>(&());
        let aipods = Api::<kube::api::DynamicObject>::namespaced_with(self.client.clone(), ns, &resource);
        let patch = json!({"spec": {"replicas": to}});
        aipods.patch_subresource("scale", name, &params(), &Patch::Merge(&patch)).await?;
        Ok(())
    }

    /// Writes `status.autoscaling` when it says something new: at once for
    /// a new decision, error or pod count; for moved call counts at most
    /// every [`STATUS_REFRESH`].
    async fn write_status(
        &self,
        aipod: &AIPod,
        entry: &mut Entry,
        status: AutoscalingStatus,
        now: Instant,
        scaled: bool,
    ) -> Result<()> {
        let current = aipod.status.as_ref().and_then(|s| s.autoscaling.as_ref());
        if current == Some(&status) {
            return Ok(());
        }
        let settled = |s: &AutoscalingStatus| (s.desired_replicas, s.pods_read, s.held.clone());
        let recent = entry.written.as_ref().is_some_and(|(at, last)| {
            now.saturating_duration_since(*at) < STATUS_REFRESH && settled(last) == settled(&status)
        });
        if recent && !scaled && current.is_some() {
            return Ok(());
        }
        let patch = json!({
            "apiVersion": "aipod.io/v1alpha1",
            "kind": "AIPod",
            "status": {"autoscaling": status},
        });
        Api::<AIPod>::namespaced(self.client.clone(), &aipod.namespace().unwrap_or_default())
            .patch_status(&aipod.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await?;
        entry.written = Some((now, status));
        Ok(())
    }

    /// Publishes an event, unless the last one said the same (`reason`).
    async fn tell(&self, aipod: &AIPod, entry: &mut Entry, reason: &'static str, kind: EventType, note: &str) {
        let repeats = entry.told == Some(reason) && !matches!(reason, "ScaledUp" | "ScaledUpPanic" | "ScaledDown");
        if repeats {
            return;
        }
        entry.told = Some(reason);
        let event = Event {
            type_: kind,
            reason: reason.to_owned(),
            note: Some(note.to_owned()),
            action: "Autoscale".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &aipod.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
        tracing::info!(
            namespace = aipod.namespace().unwrap_or_default(),
            aipod = aipod.name_any(),
            reason,
            note,
            "autoscaler"
        );
    }
}

/// A pod as the autoscaler finds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Seen {
    /// Its name.
    pub name: String,
    /// Whether it passed its readiness probe.
    pub ready: bool,
    /// Where its runtime serves `/metrics`, if it can be told.
    pub metrics: Option<SocketAddr>,
}

/// Reads the ready ones of `pods` at once (each within [`READ_TIMEOUT`]):
/// the sample, and why the first pod that could not be read was not.
pub async fn sample(pods: Vec<Seen>) -> (Sample, Option<String>) {
    let mut sample = Sample::default();
    let mut why = None;
    let mut reads = Vec::new();
    for pod in pods {
        match (pod.ready, pod.metrics) {
            (false, _) => sample.not_ready += 1,
            (true, Some(addr)) => reads.push(async move {
                let read =
                    pod_http::get(addr, "/metrics", READ_TIMEOUT).await.and_then(|t| autoscale::read_metrics(&t));
                (pod.name, read)
            }),
            (true, None) => {
                sample.unread += 1;
                why.get_or_insert_with(|| format!("pod {} has no IP or metrics port", pod.name));
            }
        }
    }
    for (name, read) in futures::future::join_all(reads).await {
        match read {
            Ok((in_flight, queued)) => sample.pods.push(PodLoad { name, in_flight, queued }),
            Err(e) => {
                sample.unread += 1;
                why.get_or_insert_with(|| format!("pod {name}: {e}"));
            }
        }
    }
    (sample, why)
}

/// One reading of pods the caller runs (`autoscale-pods`, a line of stdin).
#[derive(Debug, serde::Deserialize)]
struct Reading {
    replicas: u32,
    pods: Vec<Seen>,
}

/// `aipod-operator autoscale-pods`: the autoscaler's decisions for
/// `aipod`'s pods as the caller runs them, without an API server — a
/// reading per line of stdin (`{"replicas": N, "pods": [{"name", "ready",
/// "metrics": "IP:PORT"}]}`), the decision per line of stdout (`decision`,
/// `replicas`, `costs` to set before the replicas drop, the calls of each
/// pod read (`pods`), `inFlight`, `queued`, `wanted`, `unread`, `why`). The pods are read and decided for by the
/// same code as in the cluster; the test kubelet runs its pods with it.
pub async fn over_stdio(aipod: &AIPod) -> Result<()> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let policy = Policy::of(aipod)
        .map_err(crate::Error::InvalidSpec)?
        .ok_or_else(|| crate::Error::InvalidSpec("the AIPod has no spec.autoscaling".into()))?;
    let mut autoscale = Autoscale::default();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let fail = |e: std::io::Error| crate::Error::Manifest(format!("autoscale-pods: {e}"));
    while let Some(line) = lines.next_line().await.map_err(fail)? {
        let reading: Reading = serde_json::from_str(&line)
            .map_err(|e| crate::Error::Manifest(format!("autoscale-pods: a reading: {e}: {line}")))?;
        let (sample, why) = sample(reading.pods).await;
        let decision = autoscale.decide(&policy, reading.replicas, &sample, Instant::now());
        let (replicas, costs) = match &decision {
            Decision::Up { to, .. } => (*to, Vec::new()),
            Decision::Down { to, remove } => (*to, autoscale::deletion_costs(&sample, remove)),
            Decision::Hold(_) | Decision::Deferred { .. } => (reading.replicas, Vec::new()),
        };
        let answer = json!({
            "decision": decision.reason(),
            "replicas": replicas,
            "costs": costs.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            "pods": sample.pods.iter().map(|p| (p.name.clone(), p.in_flight)).collect::<std::collections::BTreeMap<_, _>>(),
            "inFlight": sample.in_flight(),
            "queued": sample.queued(),
            "wanted": policy.wanted(sample.in_flight()),
            "unread": sample.unread,
            "why": why,
        });
        out.write_all(format!("{answer}\n").as_bytes()).await.map_err(fail)?;
        out.flush().await.map_err(fail)?;
    }
    Ok(())
}

/// Whether `pod` has ended (it counts toward no replica).
fn finished(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

#[cfg(test)]
mod tests;
