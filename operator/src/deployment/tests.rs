//! Every field mapping, default and derived value of the Deployment builder.

use k8s_openapi::{api::apps::v1::Deployment, apimachinery::pkg::util::intstr::IntOrString};
use serde_json::json;

use super::*;

fn aipod(spec: serde_json::Value) -> AIPod {
    crate::fixtures::aipod("m").namespace("ns").spec(json!({"image": "img:1"})).spec(spec).stored()
}

fn build(spec: serde_json::Value) -> Deployment {
    deployment(&aipod(spec), DEFAULT_IMAGE).expect("deployment")
}

fn container(d: &Deployment) -> &Container {
    &d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec").containers[0]
}

fn pod(d: &Deployment) -> &PodSpec {
    d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod spec")
}

fn env(d: &Deployment, name: &str) -> Option<String> {
    container(d).env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.clone())
}

#[test]
fn defaults_serve_the_demo_on_50051_with_one_replica() {
    let d = build(json!({}));
    let c = container(&d);
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(1));
    assert_eq!(c.image.as_deref(), Some("img:1"));
    let mut no_image = aipod(json!({}));
    no_image.spec.image = None;
    let d = deployment(&no_image, "registry.example/aipod-runtime:9").expect("deployment");
    assert_eq!(container(&d).image.as_deref(), Some("registry.example/aipod-runtime:9"), "the operator's default");
    assert_eq!(
        c.args.as_deref(),
        Some(&["--max-call-duration", "1h", "--drain-timeout", "1h"].map(String::from)[..]),
        "the runtime's demo default, with the cluster's call length and a drain that lets every call finish"
    );
    assert_eq!(env(&d, "AIPOD_LISTEN").as_deref(), Some("0.0.0.0:50051"));
    assert_eq!(env(&d, "AIPOD_SPOOL_DIR").as_deref(), Some(SPOOL_PATH));
    assert_eq!(env(&d, "AIPOD_LOG_FORMAT").as_deref(), Some("json"));
    assert_eq!(c.ports.as_ref().map(|p| (p[0].name.as_deref(), p[0].container_port)), Some((Some("grpc"), 50051)));
    assert_eq!(pod(&d).termination_grace_period_seconds, Some(3600 + PRE_STOP_SECONDS + 5));
}

#[test]
fn pods_and_the_service_expose_the_runtime_metrics_port() {
    let d = build(json!({}));
    let ports = container(&d).ports.clone().expect("ports");
    assert_eq!((ports[1].name.as_deref(), ports[1].container_port), (Some("metrics"), METRICS_PORT));
    assert_eq!(env(&d, "AIPOD_METRICS_LISTEN").as_deref(), Some("0.0.0.0:9090"));
    let s = crate::service::service(&aipod(json!({}))).expect("service").spec.expect("spec");
    let metrics = &s.ports.expect("ports")[1];
    assert_eq!((metrics.name.as_deref(), metrics.port), (Some("metrics"), 9090));
    assert_eq!(metrics.target_port, Some(IntOrString::String("metrics".into())));
    // A gRPC port of 9090 moves the metrics out of its way.
    let d = build(json!({"runtime": {"port": 9090}}));
    assert_eq!(env(&d, "AIPOD_METRICS_LISTEN").as_deref(), Some("0.0.0.0:9091"));
    assert_eq!(env(&d, "AIPOD_LISTEN").as_deref(), Some("0.0.0.0:9090"));
}

#[test]
fn models_and_runtime_settings_become_flags() {
    let d = build(json!({
        "models": [
            {"version": "v1", "builtin": "demo"},
            {"version": "v2", "command": ["python3", "/app/m.py", "--name", "it's"], "workers": 3, "default": true},
        ],
        "runtime": {"heartbeat": "500ms", "drainTimeout": "2m", "maxPayloadBytes": "10Gi",
                    "maxConcurrentCalls": 4, "maxQueuedCalls": 0, "port": 6000, "logFormat": "text"},
    }));
    let args = container(&d).args.clone().expect("args");
    assert_eq!(
        args,
        [
            "--model",
            "v1=builtin:demo",
            "--model",
            r"v2=exec:python3 /app/m.py --name 'it'\''s'",
            "--workers",
            "v2=3",
            "--default-version",
            "v2",
            "--heartbeat",
            "500ms",
            "--max-call-duration",
            "1h",
            "--drain-timeout",
            "2m",
            "--max-payload-bytes",
            "10Gi",
            "--max-concurrent-calls",
            "4",
            "--max-queued-calls",
            "0",
        ]
    );
    assert_eq!(env(&d, "AIPOD_LISTEN").as_deref(), Some("0.0.0.0:6000"));
    assert_eq!(env(&d, "AIPOD_LOG_FORMAT").as_deref(), Some("text"));
    assert_eq!(
        pod(&d).termination_grace_period_seconds,
        Some(120 + PRE_STOP_SECONDS + 5),
        "grace = drain + preStop + margin"
    );
}

#[test]
fn probes_are_native_grpc_against_the_health_services() {
    let d = build(json!({"runtime": {"port": 7000, "startupTimeoutSeconds": 1200}}));
    let c = container(&d);
    let grpc = |p: &Option<Probe>| p.as_ref().and_then(|p| p.grpc.clone()).map(|g| (g.port, g.service));
    assert_eq!(grpc(&c.readiness_probe), Some((7000, Some("ai.AI".to_owned()))));
    assert_eq!(grpc(&c.liveness_probe), Some((7000, Some(String::new()))));
    assert_eq!(grpc(&c.startup_probe), Some((7000, Some("ai.AI".to_owned()))));
    let startup = c.startup_probe.as_ref().expect("startup");
    assert_eq!(startup.period_seconds.unwrap_or(0) * startup.failure_threshold.unwrap_or(0), 1200, "startup allowance");
    let pre_stop = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()).and_then(|h| h.sleep.as_ref());
    assert_eq!(pre_stop.map(|s| s.seconds), Some(PRE_STOP_SECONDS));
}

#[test]
fn pods_run_restricted_and_roll_without_unavailability() {
    let d = build(json!({}));
    let sc = container(&d).security_context.clone().expect("container security");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_owned()]));
    let psc = pod(&d).security_context.clone().expect("pod security");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.seccomp_profile.map(|s| s.type_).as_deref(), Some("RuntimeDefault"));
    let strategy =
        d.spec.as_ref().and_then(|s| s.strategy.clone()).and_then(|s| s.rolling_update).expect("rolling update");
    assert_eq!(strategy.max_unavailable, Some(IntOrString::Int(0)));
}

#[test]
fn spool_and_user_volumes_and_pod_shaping_are_kept() {
    let d = build(json!({
        "spool": {"sizeLimit": "20Gi", "medium": "Memory"},
        "volumes": [{"name": "w", "configMap": {"name": "weights"}}],
        "volumeMounts": [{"name": "w", "mountPath": "/w"}],
        "env": [{"name": "AIPOD_LOG_FORMAT", "value": "text"}, {"name": "X", "value": "1"}],
        "envFrom": [{"secretRef": {"name": "s"}}],
        "nodeSelector": {"gpu": "no"},
        "tolerations": [{"key": "k", "operator": "Exists"}],
        "serviceAccountName": "sa",
        "imagePullPolicy": "Always",
        "imagePullSecrets": [{"name": "pull"}],
        "podLabels": {"team": "ml", "app.kubernetes.io/name": "hijack"},
        "podAnnotations": {"a": "b"},
        "resources": {"limits": {"memory": "1Gi"}},
    }));
    let p = pod(&d);
    let spool =
        p.volumes.iter().flatten().find(|v| v.name == "spool").and_then(|v| v.empty_dir.clone()).expect("spool");
    assert_eq!(spool.size_limit.map(|q| q.0).as_deref(), Some("20Gi"));
    assert_eq!(spool.medium.as_deref(), Some("Memory"));
    assert!(p.volumes.iter().flatten().any(|v| v.name == "w"));
    let mounts: Vec<_> = container(&d).volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert_eq!(mounts, [SPOOL_PATH, "/tmp", "/w"]);
    let names: Vec<_> = container(&d).env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["AIPOD_LISTEN", "AIPOD_METRICS_LISTEN", "AIPOD_SPOOL_DIR", "AIPOD_LOG_FORMAT", "AIPOD_LOG_FORMAT", "X"],
        "user env last, so it wins"
    );
    assert_eq!(container(&d).env_from.as_ref().map(Vec::len), Some(1));
    assert_eq!(p.node_selector.as_ref().and_then(|n| n.get("gpu")).map(String::as_str), Some("no"));
    assert_eq!(p.tolerations.as_ref().map(Vec::len), Some(1));
    assert_eq!(p.service_account_name.as_deref(), Some("sa"));
    assert_eq!(container(&d).image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(p.image_pull_secrets.as_ref().map(|s| s[0].name.as_str()), Some("pull"));
    let template = d.spec.as_ref().and_then(|s| s.template.metadata.clone()).expect("template meta");
    let labels = template.labels.expect("labels");
    assert_eq!(labels.get("team").map(String::as_str), Some("ml"));
    assert_eq!(labels.get("app.kubernetes.io/name").map(String::as_str), Some("aipod"), "selector labels win");
    assert_eq!(template.annotations.and_then(|a| a.get("a").cloned()).as_deref(), Some("b"));
    assert!(container(&d).resources.is_some());
}

#[test]
fn children_are_owned_and_labelled() {
    let a = aipod(json!({"upstream": "shared"}));
    let d = deployment(&a, DEFAULT_IMAGE).expect("deployment");
    let owner = &d.metadata.owner_references.as_ref().expect("owners")[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("AIPod", "m", Some(true)));
    assert_eq!(owner.uid, a.metadata.uid.clone().expect("uid"));
    let labels = d.metadata.labels.expect("labels");
    assert_eq!(labels.get("aipod.io/upstream").map(String::as_str), Some("shared"));
    assert_eq!(labels.get("app.kubernetes.io/managed-by").map(String::as_str), Some("aipod-operator"));
    let selector = d.spec.expect("spec").selector.match_labels.expect("selector");
    assert_eq!(selector.len(), 2, "selector stays minimal and stable: {selector:?}");
}

#[test]
fn a_bad_drain_timeout_is_an_invalid_spec() {
    let err = deployment(&aipod(json!({"runtime": {"drainTimeout": "soon"}})), DEFAULT_IMAGE).expect_err("invalid");
    assert!(matches!(err, Error::InvalidSpec(m) if m.contains("drainTimeout")));
}

#[test]
fn service_and_route_follow_the_spec() {
    let a = aipod(json!({"upstream": "u1", "runtime": {"port": 6000},
        "route": {"gateway": {"parentRefs": [{"name": "gw", "namespace": "infra", "sectionName": "grpc"}], "hostnames": ["m.example.com"]}}}));
    let s = crate::service::service(&a).expect("service");
    let spec = s.spec.expect("spec");
    let port = &spec.ports.expect("ports")[0];
    assert_eq!(
        (port.name.as_deref(), port.port, port.app_protocol.as_deref()),
        (Some("grpc"), 6000, Some("kubernetes.io/h2c"))
    );
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.selector, Some(crate::labels::selector("m")));

    let r = crate::grpc_route::grpc_route(&a).expect("route").expect("a route is asked for");
    let v = serde_json::to_value(&r).expect("json");
    assert_eq!(v["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(v["kind"], "GRPCRoute");
    assert_eq!(v["spec"]["parentRefs"][0], json!({"name": "gw", "namespace": "infra", "sectionName": "grpc"}));
    assert_eq!(v["spec"]["hostnames"], json!(["m.example.com"]));
    let rule = &v["spec"]["rules"][0];
    assert_eq!(rule["matches"][0]["method"], json!({"type": "Exact", "service": "ai.AI"}));
    assert_eq!(rule["matches"][0]["headers"][0], json!({"type": "Exact", "name": "x-upstream", "value": "u1"}));
    assert_eq!(rule["backendRefs"][0], json!({"name": "m", "port": 6000}));

    assert!(crate::grpc_route::grpc_route(&aipod(json!({}))).expect("none").is_none(), "no route asked, none built");
}

#[test]
fn tls_moves_the_probes_to_a_plaintext_health_port_and_mounts_the_secrets() {
    let d = build(json!({"tls": {"secretName": "m-tls"}, "auth": {"tokenSecretName": "m-tokens"}}));
    let c = container(&d);
    assert_eq!(env(&d, "AIPOD_HEALTH_LISTEN").as_deref(), Some("0.0.0.0:8081"));
    assert_eq!(env(&d, "AIPOD_TLS_CERT").as_deref(), Some("/etc/aipod/tls/tls.crt"));
    assert_eq!(env(&d, "AIPOD_AUTH_TOKEN_FILE").as_deref(), Some("/etc/aipod/auth/tokens"));
    let health = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some("health")).expect("health port");
    assert_eq!(health.container_port, 8081);
    for probe in [&c.readiness_probe, &c.liveness_probe, &c.startup_probe] {
        let grpc = probe.as_ref().and_then(|p| p.grpc.as_ref()).expect("grpc probe");
        assert_eq!(grpc.port, 8081, "kubelet probes speak plaintext only");
    }
    let volumes: Vec<_> = pod(&d).volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert!(volumes.contains(&"tls") && volumes.contains(&"auth"), "{volumes:?}");
    // Without TLS the probes stay on the gRPC port, and there is no health port.
    let plain = build(json!({}));
    assert_eq!(container(&plain).readiness_probe.as_ref().and_then(|p| p.grpc.as_ref()).map(|g| g.port), Some(50051));
    assert!(env(&plain, "AIPOD_HEALTH_LISTEN").is_none());
    // The health port moves off a gRPC port that took it.
    let moved = build(json!({"tls": {"secretName": "m-tls"}, "runtime": {"port": 8081}}));
    assert_eq!(env(&moved, "AIPOD_HEALTH_LISTEN").as_deref(), Some("0.0.0.0:8082"));
}

#[test]
fn mutual_tls_behind_the_nginx_router_is_refused_saying_why() {
    let aipod = aipod(json!({"tls": {"secretName": "m-tls", "clientCASecretName": "ca"}, "route": {"router": "edge"}}));
    let err = deployment(&aipod, DEFAULT_IMAGE).expect_err("refused").to_string();
    assert!(err.contains("clientCASecretName") && err.contains("router"), "{err}");
}
