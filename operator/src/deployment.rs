//! AIPod → Deployment: the runtime container with flags from the spec,
//! native gRPC probes, a preStop pause, a grace period derived from the
//! drain timeout, restricted security, and the spool emptyDir.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Container, ContainerPort, EmptyDirVolumeSource, EnvVar, GRPCAction, Lifecycle, LifecycleHandler,
            PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SleepAction, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::api::ObjectMeta;

use crate::{
    Error, Result, call_length,
    crd::{AIPod, LogFormat, ModelSpec},
    labels, secrets, workload,
};

/// The runtime image of AIPods that name none: the aipod-runtime of this
/// operator's version (operator flag `--runtime-image` overrides it).
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/aipod/aipod-runtime:", env!("CARGO_PKG_VERSION"));
/// Where the runtime spools payloads inside the pod.
pub const SPOOL_PATH: &str = "/var/spool/aipod";
/// The runtime's default port.
pub const DEFAULT_PORT: i32 = aipod::contract::DEFAULT_PORT as i32;
/// The port of the runtime's plain-HTTP metrics listener (`/metrics`), named
/// `metrics` on the pod and the Service.
pub const METRICS_PORT: i32 = 9090;
/// The metrics port when the gRPC port is [`METRICS_PORT`] itself.
const METRICS_PORT_ALT: i32 = 9091;
/// The plaintext health port of TLS AIPods (kubelet's gRPC probes cannot
/// speak TLS).
pub const HEALTH_PORT: i32 = 8081;
/// The health port when the gRPC port is [`HEALTH_PORT`] itself.
const HEALTH_PORT_ALT: i32 = 8082;
pub use crate::call_length::PRE_STOP_SECONDS;
/// Default model load allowance for the startup probe.
const DEFAULT_STARTUP_SECONDS: i32 = 600;
/// The non-root user distroless images use.
const NONROOT: i64 = 65532;

/// The Deployment that runs `aipod`'s runtime; `default_image` when the spec
/// names no image.
pub fn deployment(aipod: &AIPod, default_image: &str) -> Result<Deployment> {
    let name = crate::name(aipod)?;
    let spec = &aipod.spec;
    let port = spec.runtime.port.unwrap_or(DEFAULT_PORT);
    let grace = call_length::runtime_grace_seconds(aipod)?;
    if spec.tls.as_ref().is_some_and(|t| t.client_ca_secret_name.is_some())
        && spec.route.as_ref().is_some_and(|r| r.router.is_some())
    {
        return Err(Error::InvalidSpec(
            "spec.tls.clientCASecretName with spec.route.router: the nginx router has no client certificate to \
             present; reach a mutual-TLS model directly or through a Gateway"
                .into(),
        ));
    }
    let labels = labels::labels(aipod, name);
    let mut pod_labels = spec.pod_labels.clone();
    pod_labels.extend(labels.clone());

    // Probes go to the gRPC port, or with TLS to the plaintext health port.
    let probe_port = health_port(aipod).unwrap_or(port);
    let grpc = |service: &str| GRPCAction { port: probe_port, service: Some(service.to_owned()) };
    let mut ports = vec![
        ContainerPort {
            name: Some("grpc".to_owned()),
            container_port: port,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        },
        ContainerPort {
            name: Some("metrics".to_owned()),
            container_port: metrics_port(aipod),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        },
    ];
    if let Some(health) = health_port(aipod) {
        ports.push(ContainerPort {
            name: Some("health".to_owned()),
            container_port: health,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        });
    }
    let container = Container {
        name: "runtime".to_owned(),
        image: Some(spec.image.clone().unwrap_or_else(|| default_image.to_owned())),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        args: Some(runtime_args(aipod)),
        env: Some(env(aipod, port)),
        env_from: none_if_empty(spec.env_from.clone()),
        ports: Some(ports),
        readiness_probe: Some(Probe {
            grpc: Some(grpc(aipod::contract::READINESS_SERVICE)),
            period_seconds: Some(5),
            failure_threshold: Some(2),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            grpc: Some(grpc(aipod::contract::LIVENESS_SERVICE)),
            period_seconds: Some(10),
            timeout_seconds: Some(5),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        // Liveness only starts once the models have loaded: slow loads are
        // not mistaken for a hung process.
        startup_probe: Some(Probe {
            grpc: Some(grpc(aipod::contract::READINESS_SERVICE)),
            period_seconds: Some(5),
            failure_threshold: Some((spec.runtime.startup_timeout_seconds.unwrap_or(DEFAULT_STARTUP_SECONDS) + 4) / 5),
            ..Default::default()
        }),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: PRE_STOP_SECONDS }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: spec.resources.clone(),
        security_context: Some(workload::restricted_container()),
        volume_mounts: Some(volume_mounts(aipod)),
        ..Default::default()
    };

    Ok(Deployment {
        metadata: crate::child_meta(aipod, name, labels.clone())?,
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            revision_history_limit: Some(5),
            selector: LabelSelector { match_labels: Some(labels::selector(name)), ..Default::default() },
            strategy: Some(workload::zero_downtime_rollout()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: none_if_empty_map(spec.pod_annotations.clone()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    termination_grace_period_seconds: Some(grace),
                    service_account_name: spec.service_account_name.clone(),
                    automount_service_account_token: Some(false),
                    image_pull_secrets: none_if_empty(spec.image_pull_secrets.clone()),
                    node_selector: none_if_empty_map(spec.node_selector.clone()),
                    tolerations: none_if_empty(spec.tolerations.clone()),
                    affinity: spec.affinity.clone(),
                    security_context: Some(PodSecurityContext {
                        fs_group: Some(NONROOT),
                        ..workload::restricted_pod(NONROOT)
                    }),
                    volumes: Some(volumes(aipod)),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// The runtime's metrics port in `aipod`'s pods: [`METRICS_PORT`], unless
/// the gRPC port took it.
pub fn metrics_port(aipod: &AIPod) -> i32 {
    if aipod.spec.runtime.port == Some(METRICS_PORT) { METRICS_PORT_ALT } else { METRICS_PORT }
}

/// The plaintext health port of a TLS AIPod's pods; `None` without TLS
/// (the probes use the gRPC port).
pub fn health_port(aipod: &AIPod) -> Option<i32> {
    aipod.spec.tls.as_ref()?;
    Some(if aipod.spec.runtime.port == Some(HEALTH_PORT) { HEALTH_PORT_ALT } else { HEALTH_PORT })
}

/// The runtime's flags for `aipod`'s spec.
pub fn runtime_args(aipod: &AIPod) -> Vec<String> {
    let spec = &aipod.spec;
    let mut args = Vec::new();
    for model in &spec.models {
        args.push("--model".to_owned());
        args.push(model_arg(model));
        if let (Some(workers), Some(_)) = (model.workers, &model.command) {
            args.push("--workers".to_owned());
            args.push(format!("{}={workers}", model.version));
        }
    }
    if let Some(default) = spec.models.iter().find(|m| m.default == Some(true)) {
        args.push("--default-version".to_owned());
        args.push(default.version.clone());
    }
    let rt = &spec.runtime;
    let mut flag = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            args.push(format!("--{name}"));
            args.push(v);
        }
    };
    flag("heartbeat", rt.heartbeat.clone());
    // Always explicit: the bare runtime's defaults (no call limit, a 30 s
    // drain) are not the cluster's (`call_length`). The spec's own
    // spelling when it has one.
    let max_call =
        rt.max_call_duration.clone().unwrap_or_else(|| call_length::DEFAULT_MAX_CALL_DURATION_FLAG.to_owned());
    flag("max-call-duration", Some(max_call.clone()));
    flag("drain-timeout", Some(rt.drain_timeout.clone().unwrap_or(max_call)));
    flag("max-payload-bytes", rt.max_payload_bytes.clone());
    flag("max-concurrent-calls", rt.max_concurrent_calls.map(|n| n.to_string()));
    flag("max-queued-calls", rt.max_queued_calls.map(|n| n.to_string()));
    // Autoscaled: clients' connections are recycled, so pods added later
    // get calls (a connection's calls go on; new ones reconnect).
    flag("max-connection-age", spec.autoscaling.as_ref().map(|_| AUTOSCALED_CONNECTION_AGE.to_owned()));
    args
}

/// `--max-connection-age` of autoscaled AIPods' pods: how soon a pod added
/// by a scale-up gets its share of callers that keep their connections.
pub const AUTOSCALED_CONNECTION_AGE: &str = "1m";

/// `VERSION=builtin:NAME` or `VERSION=exec:COMMAND…` (shell-quoted).
fn model_arg(model: &ModelSpec) -> String {
    match (&model.command, &model.builtin) {
        (Some(command), _) => {
            let words: Vec<String> = command.iter().map(|w| shell_quote(w)).collect();
            format!("{}=exec:{}", model.version, words.join(" "))
        }
        (None, Some(builtin)) => format!("{}=builtin:{builtin}", model.version),
        (None, None) => format!("{}=builtin:demo", model.version),
    }
}

/// Quotes a word for a POSIX shell when it needs it.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':' | '=' | ',' | '+' | '@'));
    if plain { word.to_owned() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

fn env(aipod: &AIPod, port: i32) -> Vec<EnvVar> {
    let var = |name: &str, value: String| EnvVar { name: name.to_owned(), value: Some(value), ..Default::default() };
    let format = match aipod.spec.runtime.log_format.unwrap_or(LogFormat::Json) {
        LogFormat::Json => "json",
        LogFormat::Text => "text",
    };
    let mut env = vec![
        var("AIPOD_LISTEN", format!("0.0.0.0:{port}")),
        var("AIPOD_METRICS_LISTEN", format!("0.0.0.0:{}", metrics_port(aipod))),
        var("AIPOD_SPOOL_DIR", SPOOL_PATH.to_owned()),
        var("AIPOD_LOG_FORMAT", format.to_owned()),
    ];
    if let Some(health) = health_port(aipod) {
        env.push(var("AIPOD_HEALTH_LISTEN", format!("0.0.0.0:{health}")));
    }
    env.extend(secrets::env(aipod));
    // User variables come last so they can override ours deliberately.
    env.extend(aipod.spec.env.iter().cloned());
    env
}

fn volumes(aipod: &AIPod) -> Vec<Volume> {
    let spool = &aipod.spec.spool;
    let mut volumes = vec![
        Volume {
            name: "spool".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: spool.size_limit.clone(),
                medium: spool.medium.map(|_| "Memory".to_owned()),
            }),
            ..Default::default()
        },
        // The root filesystem is read-only; models often need a scratch /tmp.
        Volume { name: "tmp".to_owned(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
    ];
    volumes.extend(secrets::volumes(aipod));
    volumes.extend(aipod.spec.volumes.iter().cloned());
    volumes
}

fn volume_mounts(aipod: &AIPod) -> Vec<VolumeMount> {
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        ..Default::default()
    };
    let mut mounts = vec![mount("spool", SPOOL_PATH), mount("tmp", "/tmp")];
    mounts.extend(secrets::volume_mounts(aipod));
    mounts.extend(aipod.spec.volume_mounts.iter().cloned());
    mounts
}

fn none_if_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

fn none_if_empty_map(m: BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!m.is_empty()).then_some(m)
}

#[cfg(test)]
mod tests;
