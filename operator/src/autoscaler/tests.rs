//! The autoscaler against an in-memory API server (kube-fake-client behind
//! a real `kube::Client`) and pods whose metrics ports are real listeners:
//! the deletion costs are written before the replicas drop (the order of
//! requests, from the fake client's interceptor), scale-ups, status and
//! events, an HPA on the same AIPod, pods that cannot be read.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use k8s_openapi::api::{autoscaling::v2::HorizontalPodAutoscaler, core::v1::Pod, events::v1::Event as K8sEvent};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::{
        events::{Recorder, Reporter},
        reflector::{self, store::Writer},
        watcher,
    },
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const NS: &str = "models";

/// Every patch the API server answered: `(object name, patch body)`.
type Patches = Arc<Mutex<Vec<(String, Value)>>>;

async fn cluster() -> (Client, Patches) {
    use kube_fake_client::interceptor::Funcs;
    let patches: Patches = Arc::default();
    let seen = Arc::clone(&patches);
    let funcs = Funcs::new().patch(move |ctx| {
        seen.lock().expect("patches").push((ctx.name.to_owned(), ctx.patch.clone()));
        Ok(None)
    });
    let client = kube_fake_client::ClientBuilder::new()
        .with_resource::<AIPod>()
        .with_status_subresource::<AIPod>()
        .with_resource::<HorizontalPodAutoscaler>()
        .with_resource::<K8sEvent>()
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .expect("fake API server");
    (client, patches)
}

/// A pod's metrics port: answers `/metrics` with the calls in `load`.
async fn metrics_port(load: Arc<AtomicU64>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let n = load.load(Ordering::SeqCst);
            let body = format!(
                "# TYPE aipod_calls_in_flight gauge\naipod_calls_in_flight{{version=\"v1\"}} {n}\n\
                 aipod_calls_queued{{version=\"v1\"}} {}\n",
                n / 2
            );
            let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    port
}

/// A ready pod of AIPod `aipod` whose metrics port is `port` on loopback.
async fn pod(client: &Client, aipod: &str, name: &str, port: u16) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NS, "labels": crate::labels::selector(aipod)},
        "spec": {"containers": [{"name": "runtime", "image": "img",
                                 "ports": [{"name": "metrics", "containerPort": port}]}]},
        "status": {"podIP": "127.0.0.1", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .expect("pod");
    Api::<Pod>::namespaced(client.clone(), NS).create(&PostParams::default(), &pod).await.expect("create pod");
}

/// The autoscaler, and the writer of its AIPod cache.
fn autoscaler(client: &Client) -> (Autoscaler, Writer<AIPod>) {
    let (store, writer) = reflector::store::<AIPod>();
    let recorder = Recorder::new(client.clone(), Reporter { controller: "test".into(), instance: None });
    (Autoscaler::new(client.clone(), store, recorder, Arc::new(Metrics::default())), writer)
}

/// Fills the cache from the API server, as the watch would.
async fn sync(client: &Client, writer: &mut Writer<AIPod>) {
    let all = Api::<AIPod>::namespaced(client.clone(), NS).list(&Default::default()).await.expect("list").items;
    writer.apply_watcher_event(&watcher::Event::Init);
    for a in all {
        writer.apply_watcher_event(&watcher::Event::InitApply(a));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
}

async fn aipod(client: &Client, name: &str, replicas: i32, autoscaling: Value) -> AIPod {
    let mut a =
        crate::fixtures::aipod(name).namespace(NS).spec(json!({"image": "img", "autoscaling": autoscaling})).build();
    a.spec.replicas = replicas;
    a.metadata.uid = None;
    a.metadata.resource_version = None;
    Api::<AIPod>::namespaced(client.clone(), NS).create(&PostParams::default(), &a).await.expect("create AIPod")
}

async fn fetch(client: &Client, name: &str) -> AIPod {
    Api::<AIPod>::namespaced(client.clone(), NS).get(name).await.expect("AIPod")
}

async fn event_reasons(client: &Client) -> Vec<String> {
    let events = Api::<K8sEvent>::namespaced(client.clone(), NS).list(&Default::default()).await.expect("events");
    events.items.into_iter().filter_map(|e| e.reason).collect()
}

#[tokio::test]
async fn idle_pods_are_marked_before_replicas_drop_and_a_surge_scales_up_at_once() {
    let (client, patches) = cluster().await;
    let loads: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
    loads[0].store(1, Ordering::SeqCst);
    for (i, load) in loads.iter().enumerate() {
        pod(&client, "m", &format!("m-{i}"), metrics_port(Arc::clone(load)).await).await;
    }
    let spec = json!({"maxReplicas": 5, "targetCallsPerPod": 2, "scaleDownDelay": "0s", "interval": "1s"});
    aipod(&client, "m", 3, spec).await;
    let (mut scaler, mut writer) = autoscaler(&client);
    sync(&client, &mut writer).await;

    // 1 call on 3 pods of 2: one pod is enough, and two are idle.
    let t0 = Instant::now();
    assert_eq!(scaler.tick(t0).await, Vec::<String>::new());
    let stored = fetch(&client, "m").await;
    assert_eq!(stored.spec.replicas, 1);
    let log = patches.lock().expect("patches").clone();
    let scale_at = log.iter().position(|(name, p)| name == "m" && p.pointer("/spec/replicas").is_some());
    let scale_at = scale_at.unwrap_or_else(|| panic!("no scale patch: {log:?}"));
    let cost = |pod: &str| {
        log.iter().position(|(name, p)| name == pod && p.pointer("/metadata/annotations").is_some()).map(|i| {
            let value = &log[i].1["metadata"]["annotations"][DELETION_COST];
            (i, value.as_str().unwrap_or_default().to_owned())
        })
    };
    for (pod, want) in [("m-0", "1"), ("m-1", "-1000"), ("m-2", "-1000")] {
        let (at, value) = cost(pod).unwrap_or_else(|| panic!("{pod} not marked: {log:?}"));
        assert_eq!(value, want, "{pod}'s deletion cost");
        assert!(at < scale_at, "{pod} was marked after the replicas dropped: {log:?}");
    }
    let status = stored.status.and_then(|s| s.autoscaling).expect("status.autoscaling");
    assert_eq!((status.calls_in_flight, status.calls_queued, status.pods_read, status.desired_replicas), (1, 0, 3, 1));
    assert!(status.last_scale_reason.as_deref().is_some_and(|r| r.starts_with("ScaledDown: 3 → 1")), "{status:?}");

    // A surge: 7 calls on the one pod the AIPod now asks for (the fake has
    // no ReplicaSet, so the pods stay): twice its 2 — up at once, to 4.
    loads[0].store(7, Ordering::SeqCst);
    sync(&client, &mut writer).await;
    assert_eq!(scaler.tick(t0 + Duration::from_secs(1)).await, Vec::<String>::new());
    assert_eq!(fetch(&client, "m").await.spec.replicas, 4);
    let reasons = event_reasons(&client).await;
    assert!(reasons.iter().any(|r| r == "ScaledDown") && reasons.iter().any(|r| r == "ScaledUpPanic"), "{reasons:?}");

    // Not before its interval: a tick half a second on reads nothing.
    let before = patches.lock().expect("patches").len();
    loads[0].store(0, Ordering::SeqCst);
    sync(&client, &mut writer).await;
    scaler.tick(t0 + Duration::from_millis(1500)).await;
    assert_eq!(patches.lock().expect("patches").len(), before);
}

#[tokio::test]
async fn every_pod_busy_defers_the_scale_down_and_says_so_once() {
    let (client, patches) = cluster().await;
    for i in 0..2 {
        pod(&client, "b", &format!("b-{i}"), metrics_port(Arc::new(AtomicU64::new(1))).await).await;
    }
    aipod(&client, "b", 2, json!({"maxReplicas": 4, "targetCallsPerPod": 8, "scaleDownDelay": "0s", "interval": "1s"}))
        .await;
    let (mut scaler, mut writer) = autoscaler(&client);
    sync(&client, &mut writer).await;
    let t0 = Instant::now();
    for s in 0..3 {
        assert_eq!(scaler.tick(t0 + Duration::from_secs(s)).await, Vec::<String>::new());
    }
    assert_eq!(fetch(&client, "b").await.spec.replicas, 2, "no pod is idle: none goes");
    let scale_patches = patches.lock().expect("patches").iter().filter(|(n, _)| n == "b").count();
    assert_eq!(scale_patches, 0, "neither marked nor scaled");
    let deferred = event_reasons(&client).await.into_iter().filter(|r| r == "ScaleDownDeferred").count();
    assert_eq!(deferred, 1, "told once, not every interval");
}

#[tokio::test]
async fn an_hpa_on_the_same_aipod_holds_the_autoscaler_and_the_status_says_so() {
    let (client, patches) = cluster().await;
    pod(&client, "h", "h-0", metrics_port(Arc::new(AtomicU64::new(50))).await).await;
    aipod(&client, "h", 1, json!({"maxReplicas": 5, "interval": "1s"})).await;
    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "keda-hpa-h", "namespace": NS},
        "spec": {"scaleTargetRef": {"apiVersion": "aipod.io/v1alpha1", "kind": "AIPod", "name": "h"}, "maxReplicas": 9},
    }))
    .expect("hpa");
    Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &hpa)
        .await
        .expect("create hpa");
    let (mut scaler, mut writer) = autoscaler(&client);
    sync(&client, &mut writer).await;
    assert_eq!(scaler.tick(Instant::now()).await, Vec::<String>::new());
    let stored = fetch(&client, "h").await;
    assert_eq!(stored.spec.replicas, 1, "50 calls, but the HPA owns the replicas");
    assert!(!patches.lock().expect("patches").iter().any(|(n, p)| n == "h" && p.pointer("/spec").is_some()));
    let held = stored.status.as_ref().and_then(|s| s.autoscaling.as_ref()).and_then(|a| a.held.clone()).expect("held");
    assert_eq!(held.reason, "HPAConflict");
    assert!(held.message.contains("keda-hpa-h"), "{}", held.message);
    let condition = crate::status::compute(
        &stored,
        &Default::default(),
        &crate::status::RouteState::NotRequested,
        &crate::status::MonitoringState::NotRequested,
        &Time(k8s_openapi::jiff::Timestamp::now()),
    )
    .conditions
    .into_iter()
    .find(|c| c.type_ == "Scaling")
    .expect("Scaling");
    assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("False", "HPAConflict"));
    assert!(event_reasons(&client).await.contains(&"HPAConflict".to_owned()));
}

#[tokio::test]
async fn a_pod_that_cannot_be_read_never_lets_the_pods_shrink() {
    let (client, _) = cluster().await;
    pod(&client, "u", "u-0", metrics_port(Arc::new(AtomicU64::new(0))).await).await;
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    pod(&client, "u", "u-1", closed).await;
    aipod(&client, "u", 2, json!({"maxReplicas": 4, "scaleDownDelay": "0s", "interval": "1s"})).await;
    let (mut scaler, mut writer) = autoscaler(&client);
    sync(&client, &mut writer).await;
    let t0 = Instant::now();
    for s in 0..5 {
        assert_eq!(scaler.tick(t0 + Duration::from_secs(s)).await, Vec::<String>::new());
        sync(&client, &mut writer).await;
    }
    let stored = fetch(&client, "u").await;
    assert_eq!(stored.spec.replicas, 2, "no load seen on one pod, nothing known of the other: both stay");
    let a = stored.status.and_then(|s| s.autoscaling).expect("status.autoscaling");
    let held = a.held.expect("held");
    assert_eq!(held.reason, "MetricsUnavailable");
    assert!(held.message.contains("u-1") && held.message.contains("1 of 2 ready pods"), "{}", held.message);
    assert_eq!(a.pods_read, 1);
    let metrics = scaler.metrics.render();
    assert!(
        metrics.contains("aipod_operator_autoscaler_scrape_errors_total{namespace=\"models\",aipod=\"u\"} 5"),
        "{metrics}"
    );
}
