//! The `AIPod` custom resource (`aipod.io/v1alpha1`): the Rust types are the
//! only source of its schema; `aipod-operator crd` prints it.

// The KubeSchema derive re-declares the spec types in a private module.
#![allow(unreachable_pub)]

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Affinity, EnvFromSource, EnvVar, LocalObjectReference, ResourceRequirements, Toleration, Volume, VolumeMount,
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Condition},
};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A model served over `ai.AI/chaos`: the operator turns it into a
/// Deployment of the aipod runtime, a Service, and a route keyed by the
/// `x-upstream` metadata.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "aipod.io",
    version = "v1alpha1",
    kind = "AIPod",
    plural = "aipods",
    singular = "aipod",
    shortname = "aip",
    namespaced,
    status = "AIPodStatus",
    derive = "PartialEq",
    derive = "Default",
    cel,
    printcolumn = r#"{"name":"Upstream","type":"string","jsonPath":".status.upstream"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.readyReplicas","description":"ready replicas"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".spec.replicas","description":"desired replicas (the autoscaler's, with spec.autoscaling)"}"#,
    printcolumn = r#"{"name":"Calls","type":"integer","jsonPath":".status.autoscaling.callsInFlight","description":"calls the pods held when the autoscaler last read them","priority":1}"#,
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("!has(self.spec.models) || self.spec.models.filter(m, has(m.default) && m.default).size() <= 1").message("at most one model may be marked default"),
    validation = Rule::new("!has(self.spec.models) || self.spec.models.all(m, self.spec.models.exists_one(n, n.version == m.version))").message("model versions must be unique"),
    validation = Rule::new("!has(self.spec.upstream) || self.spec.upstream.size() > 0").message("upstream must not be empty; omit it to use the AIPod's name"),
)]
#[serde(rename_all = "camelCase")]
pub struct AIPodSpec {
    /// The runtime image: `aipod-runtime`, an image built `FROM aipod-python`
    /// with your Python model, or a runtime build with your Rust model.
    /// Default: the operator's `--runtime-image` (the aipod-runtime of the
    /// operator's own version, serving the built-in demo model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() > 0").message("image must not be empty; omit it for the operator's default runtime image"))]
    pub image: Option<String>,
    /// When to pull the image: Always, IfNotPresent or Never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Secrets for pulling the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Pods to run. With `autoscaling` the operator sets it (through the
    /// scale subresource, as `kubectl scale` and an HPA would), within
    /// `autoscaling.minReplicas`..`maxReplicas`.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Scale on calls: the operator reads each pod's calls in flight, sets
    /// `replicas` to hold `targetCallsPerPod` per pod, and removes only
    /// pods that hold no call (docs/autoscaling.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// The `x-upstream` value that routes to this model; default: the AIPod's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub upstream: Option<String>,
    /// Model versions to serve; empty serves the runtime's built-in demo.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelSpec>,
    /// Runtime settings.
    #[serde(default, skip_serializing_if = "RuntimeSpec::is_empty")]
    pub runtime: RuntimeSpec,
    /// CPU and memory for the runtime container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Extra environment from ConfigMaps and Secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    /// Extra pod volumes (model weights, caches).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Where extra volumes are mounted in the runtime container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Pod scheduling affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// The pods' service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Extra pod labels (the operator's own labels win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// The emptyDir the runtime spools payloads into.
    #[serde(default, skip_serializing_if = "SpoolSpec::is_empty")]
    pub spool: SpoolSpec,
    /// How clients reach the model; absent: only through the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteSpec>,
    /// How Prometheus finds the runtime's metrics (every pod serves them on
    /// its `metrics` port either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitoring: Option<MonitoringSpec>,
    /// TLS on the runtime's gRPC port (probes move to a plaintext health
    /// port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Bearer-token authentication of calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// Who may reach the pods; a NetworkPolicy unless turned off.
    #[serde(default, skip_serializing_if = "NetworkPolicySpec::is_default")]
    pub network_policy: NetworkPolicySpec,
    /// How many pods voluntary disruptions (node drains) may take at once:
    /// a PodDisruptionBudget. Default: `maxUnavailable: 1` with 2 or more
    /// replicas, none with 1 (a budget there would block node drains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption: Option<DisruptionSpec>,
}

/// The AIPod's PodDisruptionBudget.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.maxUnavailable) && has(self.minAvailable))").message("set maxUnavailable or minAvailable, not both"))]
pub struct DisruptionSpec {
    /// `false`: no PodDisruptionBudget at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Pods a disruption may take at once: a number or a percentage
    /// (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    /// Pods that must stay available: a number or a percentage (instead of
    /// `maxUnavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
}

/// `spec.autoscaling`: the operator's autoscaler, by calls.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas"))]
pub struct AutoscalingSpec {
    /// The fewest pods (default 1; scaling to zero is not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_replicas: Option<i32>,
    /// The most pods.
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// Calls one pod should hold, running and waiting (default: the
    /// runtime's `maxConcurrentCalls`, 16 unless set — so calls waiting in
    /// a queue mean "add a pod").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_calls_per_pod: Option<i32>,
    /// How long the load must stay above the target before pods are added,
    /// e.g. `30s` (default `0s`: at once). A load of twice what the pods
    /// can hold adds pods at once regardless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$|^[0-9]+(\.[0-9]+)?$"))]
    pub scale_up_delay: Option<String>,
    /// How long fewer pods must have been enough before pods are removed,
    /// e.g. `10m` (default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$|^[0-9]+(\.[0-9]+)?$"))]
    pub scale_down_delay: Option<String>,
    /// How often the pods are read, e.g. `5s` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$|^[0-9]+(\.[0-9]+)?$"))]
    pub interval: Option<String>,
}

fn default_replicas() -> i32 {
    1
}

impl Default for AIPodSpec {
    /// An empty spec with the same defaults as a manifest that omits every
    /// optional field (one replica).
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every other field has a serde default")
    }
}

/// Image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[allow(missing_docs)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// One model version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.command) != has(self.builtin)").message("give exactly one of command or builtin"))]
pub struct ModelSpec {
    /// The version name clients send in `Header.version`: letters, digits,
    /// `.`, `_`, `-`, starting with a letter or digit.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"))]
    pub version: String,
    /// A worker command, e.g. `["python3", "/app/model.py"]` (served with `exec:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub command: Option<Vec<String>>,
    /// A model built into the runtime, e.g. `demo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<String>,
    /// Worker processes for a command model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub workers: Option<i32>,
    /// Whether calls that name no version go here (default: the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<bool>,
}

/// Runtime settings, mapped to `aipod-runtime` flags.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSpec {
    /// Heartbeat interval, e.g. `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$|^[0-9]+(\.[0-9]+)?$"))]
    pub heartbeat: Option<String>,
    /// The longest a call may last, e.g. `1h` (the default): the runtime
    /// ends longer calls with DEADLINE_EXCEEDED. Every routine change is
    /// made safe for calls up to this length: the drain timeout, the pods'
    /// termination grace period and, for a router, its pods' grace and
    /// nginx's shutdown bound all derive from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$|^[0-9]+(\.[0-9]+)?$"))]
    pub max_call_duration: Option<String>,
    /// How long in-flight calls may take after SIGTERM, e.g. `30s`; default:
    /// `maxCallDuration`. The pod's termination grace period is derived
    /// from it. Shorter than `maxCallDuration` cuts the longest calls on
    /// every rollout (allowed, and reported in the status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$|^[0-9]+(\.[0-9]+)?$"))]
    pub drain_timeout: Option<String>,
    /// Largest payload, e.g. `64Gi` or `10GiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?\s*([KkMmGgTt]i?[Bb]?)?$"))]
    pub max_payload_bytes: Option<String>,
    /// Calls each version runs at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent_calls: Option<i32>,
    /// Calls that may wait per version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_queued_calls: Option<i32>,
    /// The gRPC port (default 50051).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// `text` or `json` (default `json` in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// How long a model may take to load before the pod is restarted, in
    /// seconds (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub startup_timeout_seconds: Option<i32>,
}

impl RuntimeSpec {
    fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Runtime log format.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum LogFormat {
    Text,
    Json,
}

/// The spool emptyDir.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpoolSpec {
    /// Its size limit, e.g. `20Gi`; size it for the largest payloads in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<Quantity>,
    /// `Memory` for tmpfs; empty for the node's disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medium: Option<SpoolMedium>,
}

impl SpoolSpec {
    fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Where the spool lives.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[allow(missing_docs)]
pub enum SpoolMedium {
    Memory,
}

/// TLS on the runtime's gRPC port, from Secrets in the AIPod's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`; `ca.crt`, as
    /// cert-manager writes it, lets the nginx router verify the runtime).
    /// Rotations are picked up without a restart.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"), length(max = 253))]
    pub secret_name: String,
    /// Mutual TLS: a Secret whose `ca.crt` client certificates must chain
    /// to. Such an AIPod cannot be routed by the nginx router (it has no
    /// client certificate).
    #[serde(default, rename = "clientCASecretName", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"), length(max = 253))]
    pub client_ca_secret_name: Option<String>,
    /// For Gateway routes: a ConfigMap whose `ca.crt` verifies the runtime
    /// (the reference every Gateway implementation supports); default: the
    /// TLS Secret's `ca.crt` (a Secret reference, which not all do).
    #[serde(default, rename = "caConfigMapName", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"), length(max = 253))]
    pub ca_config_map_name: Option<String>,
}

/// Bearer tokens, from a Secret in the AIPod's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// The Secret holding the token file (`TOKEN [FUNC,FUNC…]` per line);
    /// rotations are picked up without a restart.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"), length(max = 253))]
    pub token_secret_name: String,
    /// The Secret's key holding the file (default `tokens`): a Secret data
    /// key, not `.` or `..`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*|\.\.[-._a-zA-Z0-9]+)$"), length(max = 253))]
    pub key: Option<String>,
}

/// The AIPod's NetworkPolicy: its gRPC port admits only its router's pods
/// and the namespaces listed; the health and metrics ports admit the whole
/// cluster (probes, Prometheus).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Render the NetworkPolicy (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Namespaces whose pods may call the model directly (a web app's, a
    /// Gateway's); the AIPod's own namespace only when listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63)))]
    pub allow_from_namespaces: Vec<String>,
    /// Egress rules; absent: egress is not restricted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<k8s_openapi::api::networking::v1::NetworkPolicyEgressRule>>,
}

fn default_true() -> bool {
    true
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self { enabled: true, allow_from_namespaces: Vec::new(), egress: None }
    }
}

impl NetworkPolicySpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// How Prometheus finds the model's metrics.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Render a prometheus-operator PodMonitor (`monitoring.coreos.com/v1`)
    /// that scrapes the pods' `metrics` port; needs that CRD in the cluster
    /// (else the AIPod reports MonitoringReady=False).
    #[serde(default)]
    pub pod_monitor: bool,
    /// Scrape interval, in Prometheus duration syntax (default: Prometheus's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
    ))]
    pub interval: Option<String>,
}

impl AIPod {
    /// Whether the spec asks for a PodMonitor.
    pub fn wants_pod_monitor(&self) -> bool {
        self.spec.monitoring.as_ref().is_some_and(|m| m.pod_monitor)
    }
}

/// How clients reach the model.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// A Gateway API GRPCRoute matching `x-upstream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayRoute>,
    /// The name of an nginx router that routes `x-upstream` to this model
    /// (see `aipod-operator router-config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 50))]
    pub router: Option<String>,
    /// Route calls that carry `x-aipod-call-id` through the nginx router by
    /// consistent hashing over this AIPod's ready pods, so a retained call
    /// is reattached on the replica that holds it (calls without the
    /// header are spread as before). The router's config then follows the
    /// ready pods: its pods are replaced whenever that set changes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub call_affinity: bool,
}

/// The GRPCRoute's attachment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRoute {
    /// The Gateways (or listeners) the route attaches to.
    #[schemars(length(min = 1, max = 32))]
    pub parent_refs: Vec<ParentRef>,
    /// Hostnames the route matches; empty matches the listeners' hostnames.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
}

/// A Gateway to attach to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// The Gateway's name.
    pub name: String,
    /// Its namespace (default: the AIPod's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A listener name on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// A listener port on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// What the operator observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AIPodStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods of the Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Pods that pass readiness (every model loaded).
    #[serde(default)]
    pub ready_replicas: i32,
    /// The `x-upstream` value that routes here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// The Service's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The nginx router (`spec.route.router`) this AIPod was last entered
    /// in, so the one it leaves is updated too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<String>,
    /// The label selector of the AIPod's pods, for the scale subresource
    /// (an HPA or KEDA reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Ready, Progressing, Degraded, RouteReady and, with
    /// `spec.autoscaling`, Scaling.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// What the autoscaler last saw and did (with `spec.autoscaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// `status.autoscaling`: the autoscaler's last reading and decision.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// The replicas the load asks for now (before the delays).
    pub desired_replicas: i32,
    /// Calls the pods held (receiving, waiting, running, sending).
    pub calls_in_flight: i64,
    /// Of those, calls waiting for a model slot.
    pub calls_queued: i64,
    /// Pods read / pods that should have been.
    pub pods_read: i32,
    /// Why the autoscaler holds the replicas where they are, if it does:
    /// a pod that did not answer (it then never scales down), or an HPA
    /// that targets the AIPod too (it then does nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<AutoscalingHeld>,
    /// When `replicas` was last changed by the autoscaler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Why, e.g. `ScaledUp: 37 calls for 3 pods of 16`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
}

/// Why the autoscaler holds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingHeld {
    /// `MetricsUnavailable` or `HPAConflict`.
    pub reason: String,
    /// What was found, for a person.
    pub message: String,
}

/// The longest router name: `aipod-router-` + it is a 63-character label.
pub const MAX_ROUTER_NAME: usize = 63 - "aipod-router-".len();

/// The CRD as YAML, as `aipod-operator crd` prints it.
pub fn crd_yaml() -> String {
    let crd = AIPod::crd();
    let yaml = serde_saphyr::to_string(&crd).unwrap_or_else(|e| format!("# cannot render CRD: {e}\n"));
    format!("# Generated by `aipod-operator crd`; do not edit.\n{yaml}")
}

impl AIPod {
    /// The upstream key: `spec.upstream`, else the AIPod's name.
    pub fn upstream(&self) -> String {
        self.spec.upstream.clone().unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }

    /// Checks the names that end up in generated configs and DNS names —
    /// the AIPod's name and namespace, its upstream, its router — as the API
    /// server would (DNS labels), so manifests read from files (`render`,
    /// `router-config`) cannot inject anything either.
    pub fn check_names(&self) -> Result<(), String> {
        let label = |what: &str, v: &str| {
            let ok = !v.is_empty()
                && v.len() <= 63
                && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !v.starts_with('-')
                && !v.ends_with('-');
            if ok { Ok(()) } else { Err(format!("{what} {v:?} is not a DNS label (a-z, 0-9, '-', at most 63)")) }
        };
        label("metadata.name", self.metadata.name.as_deref().unwrap_or_default())?;
        if let Some(ns) = &self.metadata.namespace {
            label("metadata.namespace", ns)?;
        }
        label("the upstream", &self.upstream())?;
        for ns in &self.spec.network_policy.allow_from_namespaces {
            label("spec.networkPolicy.allowFromNamespaces[]", ns)?;
        }
        for model in &self.spec.models {
            let v = &model.version;
            let ok = v.len() <= 63
                && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(format!(
                    "spec.models[].version {v:?}: use letters, digits, '.', '_', '-', starting with a letter or \
                     digit, at most 63"
                ));
            }
        }
        if let Some(key) = self.spec.auth.as_ref().and_then(|a| a.key.as_deref()) {
            let ok = !key.is_empty()
                && key.len() <= 253
                && key != "."
                && key != ".."
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            if !ok {
                return Err(format!(
                    "spec.auth.key {key:?} is not a Secret data key (a-z, A-Z, 0-9, '-', '_', '.'; not . or ..)"
                ));
            }
        }
        if let Some(router) = self.spec.route.as_ref().and_then(|r| r.router.as_deref()) {
            label("spec.route.router", router)?;
            // Its objects are `aipod-router-NAME`: a DNS label too.
            if router.len() > MAX_ROUTER_NAME {
                return Err(format!(
                    "spec.route.router {router:?} is longer than {MAX_ROUTER_NAME} characters: its objects' name \
                     aipod-router-NAME must fit a DNS label (63)"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::render::parse_aipods;
    use serde_json::json;

    fn example(name: &str) -> AIPod {
        let path = format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("example");
        parse_aipods(&text).expect("parse").remove(0)
    }

    /// Fails unless the repository file `relative` holds exactly
    /// `generated`, which `aipod-operator SUBCOMMAND` prints.
    pub(crate) fn assert_not_drifted(relative: &str, generated: &str, subcommand: &str) {
        let path = format!("{}/../{relative}", env!("CARGO_MANIFEST_DIR"));
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{relative}: {e}"));
        assert!(
            on_disk == generated,
            "{relative} is stale: run `cargo run -p aipod-operator -- {subcommand} > {relative}`"
        );
    }

    #[test]
    fn generated_crd_file_has_not_drifted() {
        assert_not_drifted("crds/aipod.io_aipods.yaml", &crd_yaml(), "crd");
    }

    #[test]
    fn the_charts_crd_copy_has_not_drifted() {
        assert_not_drifted("charts/aipod/crds/aipod.io_aipods.yaml", &crd_yaml(), "crd");
    }

    #[test]
    fn crd_names_scope_and_columns() {
        let crd = AIPod::crd();
        assert_eq!(crd.spec.group, "aipod.io");
        assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["aip".to_owned()][..]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
        let scale = version.subresources.as_ref().and_then(|s| s.scale.as_ref()).expect("scale subresource");
        assert_eq!(
            (
                scale.spec_replicas_path.as_str(),
                scale.status_replicas_path.as_str(),
                scale.label_selector_path.as_deref()
            ),
            (".spec.replicas", ".status.replicas", Some(".status.selector"))
        );
        let columns: Vec<_> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(columns, ["Upstream", "Ready", "Replicas", "Desired", "Calls", "Age"]);
    }

    #[test]
    fn examples_parse_with_defaults_and_pass_cel_rules() {
        let minimal = example("aipod.yaml");
        assert_eq!(minimal.spec.replicas, 1, "replicas default to 1");
        assert!(minimal.spec.models.is_empty());
        assert_eq!(minimal.upstream(), "aipod-demo", "upstream defaults to the name");
        minimal.validate_cel().expect("minimal example passes CEL");
        let full = example("aipod-python-gateway.yaml");
        assert_eq!(full.spec.models.len(), 2);
        full.validate_cel().expect("full example passes CEL");
    }

    fn with_spec(patch: serde_json::Value) -> AIPod {
        crate::fixtures::aipod("m").spec(patch).build()
    }

    #[test]
    fn a_router_name_that_would_overflow_its_objects_names_is_refused() {
        let named = |router: &str| with_spec(json!({"route": {"router": router}}));
        assert_eq!(named(&"r".repeat(MAX_ROUTER_NAME)).check_names(), Ok(()));
        let e = named(&"r".repeat(MAX_ROUTER_NAME + 1)).check_names().expect_err("51 characters");
        assert!(e.contains("spec.route.router") && e.contains("50"), "{e}");
        let schema = serde_json::to_value(AIPod::crd()).expect("crd");
        let max = &schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["route"]
            ["properties"]["router"]["maxLength"];
        assert_eq!(max, &json!(MAX_ROUTER_NAME), "the CRD and render check the same rule");
    }

    #[test]
    fn names_kubernetes_or_the_runtime_would_refuse_are_refused_by_render_and_the_crd() {
        let schema = serde_json::to_value(AIPod::crd()).expect("crd");
        let spec = &schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let pattern = |v: &serde_json::Value| crd_pattern(v.as_str().expect("a pattern"));
        let version = pattern(&spec["models"]["items"]["properties"]["version"]["pattern"]);
        let key = pattern(&spec["auth"]["properties"]["key"]["pattern"]);
        let namespace = pattern(&spec["networkPolicy"]["properties"]["allowFromNamespaces"]["items"]["pattern"]);
        let cases = [
            (
                json!({"models": [{"version": "--auth-token-file", "builtin": "demo"}]}),
                "spec.models[].version",
                &version,
                "--auth-token-file",
            ),
            (json!({"auth": {"tokenSecretName": "t", "key": ".."}}), "spec.auth.key", &key, ".."),
            (json!({"auth": {"tokenSecretName": "t", "key": "."}}), "spec.auth.key", &key, "."),
            (json!({"networkPolicy": {"allowFromNamespaces": ["Web"]}}), "allowFromNamespaces", &namespace, "Web"),
        ];
        for (patch, what, pattern, value) in cases {
            let e = with_spec(patch).check_names().expect_err(value);
            assert!(e.contains(what), "{e}");
            assert!(!pattern(value), "the CRD refuses {value:?} too");
        }
        let fine = with_spec(json!({"models": [{"version": "v1.2_rc-1", "builtin": "demo"}],
                                   "auth": {"tokenSecretName": "t", "key": ".tokens"},
                                   "networkPolicy": {"allowFromNamespaces": ["web-1"]}}));
        assert_eq!(fine.check_names(), Ok(()));
        assert!(version("v1.2_rc-1") && key(".tokens") && key("tokens") && namespace("web-1"));
    }

    /// A matcher for a CRD pattern, as the API server applies it.
    fn crd_pattern(pattern: &str) -> impl Fn(&str) -> bool + use<> {
        let re = regex::Regex::new(pattern).expect("a valid pattern");
        move |value: &str| re.is_match(value)
    }

    #[test]
    fn cel_rules_reject_what_the_types_cannot() {
        let cases = [
            (json!({"image": ""}), "image must not be empty"),
            (json!({"upstream": ""}), "upstream must not be empty"),
            (
                json!({"models": [{"version": "a", "builtin": "demo", "default": true}, {"version": "b", "builtin": "demo", "default": true}]}),
                "at most one model may be marked default",
            ),
            (
                json!({"models": [{"version": "a", "builtin": "demo"}, {"version": "a", "builtin": "demo"}]}),
                "model versions must be unique",
            ),
            (
                json!({"models": [{"version": "a", "builtin": "demo", "command": ["x"]}]}),
                "exactly one of command or builtin",
            ),
            (json!({"models": [{"version": "a"}]}), "exactly one of command or builtin"),
            (json!({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}), "minReplicas must not exceed maxReplicas"),
        ];
        for (spec, message) in cases {
            let aipod = with_spec(spec.clone());
            let err = aipod.validate_cel().expect_err(&format!("{spec} must be rejected"));
            assert!(format!("{err:?}").contains(message), "{spec}: {err:?}");
        }
        with_spec(json!({"models": [{"version": "a", "builtin": "demo", "default": true}, {"version": "b", "command": ["python3", "m.py"]}]}))
            .validate_cel()
            .expect("valid models");
        with_spec(json!({"autoscaling": {"minReplicas": 2, "maxReplicas": 2}})).validate_cel().expect("min = max");
    }
}
