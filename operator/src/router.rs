//! A router's Kubernetes objects, as a pure function of the AIPods that name
//! it: a ConfigMap holding the generated `nginx.conf`, a Deployment of nginx
//! beside the reloader ([`crate::reloader`]), a Service, and a
//! PodDisruptionBudget. Every AIPod naming the router owns them
//! (non-controller owner references), so they disappear with the last of
//! them; no finalizer is needed.
//!
//! A config change — AIPods added, removed or changed, ready endpoints with
//! `callAffinity` — changes only the ConfigMap: the running pods reload it in
//! place and no call is cut. The pod template changes only with the router's
//! image, its replicas' settings, the CAs of TLS backends (volumes cannot be
//! added to a running pod) or the longest `maxCallDuration` it carries (its
//! grace period); then the pods roll, and each old pod lets nginx finish its
//! calls before it exits.

use std::collections::BTreeMap;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction, KeyToPath,
            Lifecycle, LifecycleHandler, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, ResourceRequirements,
            SecretProjection, Service, ServiceSpec, Volume, VolumeMount, VolumeProjection,
        },
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{Resource, api::ObjectMeta};

use crate::{
    call_length,
    crd::AIPod,
    disruption, labels,
    nginx::{self, RouterSettings},
    workload,
};

/// The official NGINX image that runs as a non-root user.
pub const DEFAULT_IMAGE: &str = "nginxinc/nginx-unprivileged:1.27-alpine";
/// The router's gRPC port.
pub const GRPC_PORT: i32 = 8080;
/// The router's health port (plain HTTP `/healthz`).
pub const HEALTH_PORT: i32 = 8081;
/// The reloader's port: `/status`, `/metrics`, and `/quit` (nginx's preStop).
pub const RELOADER_PORT: i32 = 8082;
/// The annotation the operator sets on running router pods to the hash of
/// the config it wrote: the kubelet then refreshes the pods' ConfigMap
/// volume at once instead of at its next periodic sync. Never on the pod
/// template: a config change must not roll the router.
pub const CONFIG_HASH: &str = "aipod.io/config-hash";
const CONFIG_DIR: &str = "/etc/aipod-router";
/// The user the unprivileged nginx image runs as.
const NGINX_UID: i64 = 101;

/// How routers are run (operator flags / chart values).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterOptions {
    /// The nginx image.
    pub image: String,
    /// `grpc_read_timeout`/`grpc_send_timeout`.
    pub read_timeout: std::time::Duration,
    /// Router pods.
    pub replicas: i32,
    /// The router Service's type: `ClusterIP` (expose it with an Ingress) or
    /// `LoadBalancer`.
    pub service_type: String,
    /// Annotations on the router Service (e.g. a cloud load balancer's).
    pub service_annotations: BTreeMap<String, String>,
    /// nginx's `client_body_buffer_size` (see [`nginx::RouterSettings`]).
    pub body_buffer: u64,
    /// The image of the reloader container: the operator's own.
    pub reloader_image: String,
}

/// The operator image of this version: the router's reloader by default.
pub const DEFAULT_RELOADER_IMAGE: &str = concat!("ghcr.io/aipod/aipod-operator:", env!("CARGO_PKG_VERSION"));

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            read_timeout: std::time::Duration::from_secs(60),
            replicas: 2,
            service_type: "ClusterIP".to_owned(),
            service_annotations: BTreeMap::new(),
            body_buffer: nginx::DEFAULT_BODY_BUFFER,
            reloader_image: DEFAULT_RELOADER_IMAGE.to_owned(),
        }
    }
}

/// The objects of one router.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterObjects {
    /// Holds `nginx.conf`.
    pub config_map: ConfigMap,
    /// Runs nginx.
    pub deployment: Deployment,
    /// Exposes it on port 8080 (`grpc`).
    pub service: Service,
    /// Keeps node drains from taking every router pod at once (2+ replicas).
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
    /// [`config_hash`] of the config: what the reloaders report once loaded.
    pub config_hash: String,
}

/// The hash by which the operator and the reloaders name a config.
pub fn config_hash(conf: &str) -> String {
    format!("{:016x}", workload::fnv64(conf))
}

/// The name shared by a router's objects.
pub fn object_name(router: &str) -> String {
    format!("aipod-router-{router}")
}

/// The router names among `aipods`, sorted.
pub fn routers(aipods: &[AIPod]) -> Vec<String> {
    let mut names: Vec<String> =
        aipods.iter().filter_map(|a| a.spec.route.as_ref().and_then(|r| r.router.clone())).collect();
    names.sort();
    names.dedup();
    names
}

/// One volume with the `ca.crt` of every TLS backend's Secret, at
/// `<upstream>/ca.crt`; `None` when no backend uses TLS.
fn backend_cas(backends: &[nginx::Backend]) -> Option<Volume> {
    let sources: Vec<VolumeProjection> = backends
        .iter()
        .filter_map(|b| {
            let secret = b.tls_secret.clone()?;
            Some(VolumeProjection {
                secret: Some(SecretProjection {
                    name: secret,
                    items: Some(vec![KeyToPath {
                        key: "ca.crt".to_owned(),
                        path: format!("{}/ca.crt", b.upstream),
                        mode: None,
                    }]),
                    optional: Some(false),
                }),
                ..Default::default()
            })
        })
        .collect();
    (!sources.is_empty()).then(|| Volume {
        name: "backend-cas".to_owned(),
        projected: Some(ProjectedVolumeSource { sources: Some(sources), default_mode: None }),
        ..Default::default()
    })
}

/// Where a running, ready router pod's reloader answers: its pod IP and
/// the `reloader` container port; `None` for pods not (yet) serving.
pub fn reloader_address(pod: &k8s_openapi::api::core::v1::Pod) -> Option<std::net::SocketAddr> {
    crate::pod_http::address(pod, "reloader").filter(|_| crate::pod_http::is_ready(pod))
}

/// The label Kubernetes puts on a Service's EndpointSlices.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The ready pods of each AIPod in `aipods` that asks for `callAffinity`, by
/// upstream, as `host:port` of their `grpc` port (IPv6 in brackets), sorted:
/// read from the EndpointSlices of the AIPods' Services. An endpoint whose
/// readiness is unknown counts as ready, as the API defines; terminating
/// ones do not.
pub fn ready_endpoints(aipods: &[AIPod], slices: &[EndpointSlice]) -> BTreeMap<String, Vec<String>> {
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for aipod in aipods.iter().filter(|a| a.spec.route.as_ref().is_some_and(|r| r.call_affinity)) {
        let name = aipod.metadata.name.as_deref().unwrap_or_default();
        let mut addresses = Vec::new();
        for slice in slices
            .iter()
            .filter(|s| kube::ResourceExt::labels(*s).get(SERVICE_NAME_LABEL).map(String::as_str) == Some(name))
        {
            let Some(port) =
                slice.ports.iter().flatten().find(|p| p.name.as_deref() == Some("grpc")).and_then(|p| p.port)
            else {
                continue;
            };
            let v6 = slice.address_type == "IPv6";
            for endpoint in slice.endpoints.iter().flatten() {
                let conditions = endpoint.conditions.as_ref();
                if conditions.and_then(|c| c.ready) == Some(false)
                    || conditions.and_then(|c| c.terminating) == Some(true)
                {
                    continue;
                }
                if let Some(ip) = endpoint.addresses.first() {
                    addresses.push(if v6 { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") });
                }
            }
        }
        addresses.sort();
        addresses.dedup();
        found.insert(aipod.upstream(), addresses);
    }
    found
}

/// The objects of `router` in `namespace` for the AIPods there (oldest
/// first; those not naming the router are ignored), or `None` when no AIPod
/// names it any more. `endpoints` are the ready pods (`host:port`) of the
/// AIPods with `callAffinity`, by upstream.
pub fn objects(
    router: &str,
    namespace: &str,
    aipods: &[AIPod],
    endpoints: &BTreeMap<String, Vec<String>>,
    options: &RouterOptions,
) -> Option<RouterObjects> {
    let members: Vec<AIPod> = aipods
        .iter()
        .filter(|a| a.metadata.deletion_timestamp.is_none())
        .filter(|a| a.spec.route.as_ref().and_then(|r| r.router.as_deref()) == Some(router))
        .cloned()
        .collect();
    if members.is_empty() {
        return None;
    }
    let longest = call_length::router_longest_call(&members);
    let settings = RouterSettings {
        listen: format!("0.0.0.0:{GRPC_PORT}"),
        health_listen: format!("0.0.0.0:{HEALTH_PORT}"),
        read_timeout: options.read_timeout,
        body_buffer: options.body_buffer,
        temp_dir: "/tmp".to_owned(),
        shutdown_timeout: Some(call_length::router_shutdown_bound(longest)),
        ..RouterSettings::default()
    };
    let backends = nginx::backends(&members, Some(router), endpoints);
    let conf = nginx::nginx_conf(&backends, &settings);
    let config_hash = config_hash(&conf);
    let name = object_name(router);
    let owners: Vec<OwnerReference> = members
        .iter()
        .filter_map(|a| a.owner_ref(&()))
        .map(|mut o| {
            o.controller = Some(false);
            o.block_owner_deletion = Some(false);
            o
        })
        .collect();
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels::router_labels(router)),
        owner_references: Some(owners),
        ..Default::default()
    };
    let config_map = ConfigMap {
        metadata: meta.clone(),
        data: Some(BTreeMap::from([("nginx.conf".to_owned(), conf)])),
        ..Default::default()
    };
    let probe = |period| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".to_owned()),
            port: IntOrString::Int(HEALTH_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    };
    let port = |name: &str, number| ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    };
    let container = Container {
        name: "nginx".to_owned(),
        image: Some(options.image.clone()),
        command: Some(vec!["nginx".to_owned()]),
        args: Some(vec![
            "-c".to_owned(),
            format!("{CONFIG_DIR}/nginx.conf"),
            "-g".to_owned(),
            "daemon off;".to_owned(),
        ]),
        ports: Some(vec![port("grpc", GRPC_PORT), port("health", HEALTH_PORT)]),
        readiness_probe: Some(probe(5)),
        liveness_probe: Some(probe(10)),
        // SIGTERM is nginx's fast shutdown, which cuts calls: the hook has
        // the reloader quit nginx gracefully and returns once it exited.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                http_get: Some(HTTPGetAction {
                    path: Some("/quit".to_owned()),
                    port: IntOrString::Int(RELOADER_PORT),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        security_context: Some(workload::restricted_container()),
        volume_mounts: Some(
            vec![
                VolumeMount {
                    name: "config".to_owned(),
                    mount_path: CONFIG_DIR.to_owned(),
                    read_only: Some(true),
                    ..Default::default()
                },
                VolumeMount { name: "tmp".to_owned(), mount_path: "/tmp".to_owned(), ..Default::default() },
            ]
            .into_iter()
            .chain(backend_cas(&backends).map(|_| VolumeMount {
                name: "backend-cas".to_owned(),
                mount_path: nginx::BACKEND_CA_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            }))
            .collect(),
        ),
        ..Default::default()
    };
    let reloader = Container {
        name: "reloader".to_owned(),
        image: Some(options.reloader_image.clone()),
        args: Some(vec![
            "router-reloader".to_owned(),
            "--config".to_owned(),
            format!("{CONFIG_DIR}/nginx.conf"),
            "--pid-file".to_owned(),
            "/tmp/nginx.pid".to_owned(),
            "--listen".to_owned(),
            format!("0.0.0.0:{RELOADER_PORT}"),
        ]),
        ports: Some(vec![port("reloader", RELOADER_PORT)]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".to_owned()),
                port: IntOrString::Int(RELOADER_PORT),
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("10m".to_owned())),
                ("memory".to_owned(), Quantity("16Mi".to_owned())),
            ])),
            limits: Some(BTreeMap::from([("memory".to_owned(), Quantity("64Mi".to_owned()))])),
            ..Default::default()
        }),
        security_context: Some(workload::restricted_container()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".to_owned(),
                mount_path: CONFIG_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
            // nginx's pid file.
            VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let deployment = Deployment {
        metadata: meta.clone(),
        spec: Some(DeploymentSpec {
            replicas: Some(options.replicas),
            selector: LabelSelector { match_labels: Some(labels::router_selector(router)), ..Default::default() },
            strategy: Some(workload::zero_downtime_rollout()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels::router_labels(router)), ..Default::default() }),
                spec: Some(PodSpec {
                    containers: vec![container, reloader],
                    // The reloader signals nginx's master (same user).
                    share_process_namespace: Some(true),
                    termination_grace_period_seconds: Some(call_length::router_grace_seconds(longest)),
                    automount_service_account_token: Some(false),
                    security_context: Some(workload::restricted_pod(NGINX_UID)),
                    volumes: Some(
                        vec![
                            Volume {
                                name: "config".to_owned(),
                                config_map: Some(ConfigMapVolumeSource { name: name.clone(), ..Default::default() }),
                                ..Default::default()
                            },
                            Volume {
                                name: "tmp".to_owned(),
                                empty_dir: Some(EmptyDirVolumeSource::default()),
                                ..Default::default()
                            },
                        ]
                        .into_iter()
                        .chain(backend_cas(&backends))
                        .collect(),
                    ),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    };
    let pod_disruption_budget = disruption::router_pod_disruption_budget(router, meta.clone(), options.replicas);
    let service = Service {
        metadata: ObjectMeta {
            annotations: (!options.service_annotations.is_empty()).then(|| options.service_annotations.clone()),
            ..meta
        },
        spec: Some(ServiceSpec {
            type_: Some(options.service_type.clone()),
            selector: Some(labels::router_selector(router)),
            ports: Some(vec![workload::grpc_service_port(GRPC_PORT)]),
            ..Default::default()
        }),
        status: None,
    };
    Some(RouterObjects { config_map, deployment, service, pod_disruption_budget, config_hash })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_endpoints_are_the_grpc_ports_of_ready_pods_of_affine_aipods() {
        let pods = [
            crate::fixtures::aipod("sticky").namespace("ml").router("edge").call_affinity().build(),
            crate::fixtures::aipod("plain").namespace("ml").router("edge").build(),
        ];
        let slice = |service: &str, v6: bool, endpoints: serde_json::Value| -> EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("{service}-x"), "labels": {SERVICE_NAME_LABEL: service}},
                "addressType": if v6 { "IPv6" } else { "IPv4" },
                "ports": [{"name": "metrics", "port": 9090}, {"name": "grpc", "port": 50051}],
                "endpoints": endpoints,
            }))
            .expect("slice")
        };
        let slices = [
            slice(
                "sticky",
                false,
                serde_json::json!([
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                    {"addresses": ["10.0.0.1"]},
                    {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                    {"addresses": ["10.0.0.4"], "conditions": {"ready": true, "terminating": true}},
                ]),
            ),
            slice("sticky", true, serde_json::json!([{"addresses": ["fd00::5"], "conditions": {"ready": true}}])),
            slice("plain", false, serde_json::json!([{"addresses": ["10.0.1.1"]}])),
        ];
        let found = ready_endpoints(&pods, &slices);
        assert_eq!(found.len(), 1, "only AIPods with callAffinity: {found:?}");
        assert_eq!(found["sticky"], ["10.0.0.1:50051", "10.0.0.2:50051", "[fd00::5]:50051"]);
        let o = objects("edge", "ml", &pods, &found, &RouterOptions::default()).expect("objects");
        let conf = conf(&o);
        assert!(conf.contains("hash $http_x_aipod_call_id consistent;\n        server 10.0.0.1:50051;"), "{conf}");
        let fewer = BTreeMap::from([("sticky".to_owned(), vec!["10.0.0.1:50051".to_owned()])]);
        let reloaded = objects("edge", "ml", &pods, &fewer, &RouterOptions::default()).expect("objects");
        assert_ne!(o.config_hash, reloaded.config_hash, "a changed set of ready pods is a new config");
        assert!(o.deployment == reloaded.deployment, "…loaded in place: the router pods are not replaced");
    }

    fn aipod(name: &str, router: Option<&str>) -> AIPod {
        let a = crate::fixtures::aipod(name).namespace("ml");
        let mut a = match router {
            Some(r) => a.router(r).build(),
            None => a.build(),
        };
        a.metadata.uid = Some(format!("uid-{name}"));
        a
    }

    fn conf(o: &RouterObjects) -> &str {
        o.config_map.data.as_ref().and_then(|d| d.get("nginx.conf")).expect("nginx.conf")
    }

    #[test]
    fn the_config_lists_exactly_the_aipods_naming_the_router() {
        let pods = [aipod("a", Some("edge")), aipod("b", Some("edge")), aipod("c", Some("other")), aipod("d", None)];
        assert_eq!(routers(&pods), ["edge", "other"]);
        let o = objects("edge", "ml", &pods, &BTreeMap::new(), &RouterOptions::default()).expect("objects");
        assert!(conf(&o).contains("\"a\" aipod_a;") && conf(&o).contains("\"b\" aipod_b;"));
        assert!(!conf(&o).contains("aipod_c") && !conf(&o).contains("aipod_d"));
        assert!(conf(&o).contains("server a.ml.svc.cluster.local:50051;"));
        assert_eq!(o.config_map.metadata.name.as_deref(), Some("aipod-router-edge"));
        let owners: Vec<_> =
            o.service.metadata.owner_references.iter().flatten().map(|r| (r.name.as_str(), r.controller)).collect();
        assert_eq!(owners, [("a", Some(false)), ("b", Some(false))], "every member owns the router, none controls it");
        assert!(objects("gone", "ml", &pods, &BTreeMap::new(), &RouterOptions::default()).is_none());
    }

    #[test]
    fn a_config_change_leaves_the_pod_template_alone_so_nothing_rolls() {
        let opts = RouterOptions::default();
        let one = objects("edge", "ml", &[aipod("a", Some("edge"))], &BTreeMap::new(), &opts).expect("one");
        let two = objects("edge", "ml", &[aipod("a", Some("edge")), aipod("b", Some("edge"))], &BTreeMap::new(), &opts)
            .expect("two");
        let same = objects("edge", "ml", &[aipod("a", Some("edge"))], &BTreeMap::new(), &opts).expect("same");
        assert_ne!(one.config_hash, two.config_hash);
        assert_eq!(one.config_hash, same.config_hash);
        assert_eq!(one.config_hash, config_hash(conf(&one)), "the hash the reloaders report");
        assert!(one.deployment.spec == two.deployment.spec, "an AIPod added: the same pods reload");
        let mut upstream = aipod("a", Some("edge"));
        upstream.spec.upstream = Some("renamed".into());
        let changed = objects("edge", "ml", &[upstream], &BTreeMap::new(), &opts).expect("changed");
        assert!(one.deployment.spec == changed.deployment.spec, "an AIPod changed: the same pods reload");
        // What does roll: the image (and the grace period, when the longest
        // call a router carries changes).
        let image = RouterOptions { image: "nginx:next".into(), ..opts.clone() };
        let rolled = objects("edge", "ml", &[aipod("a", Some("edge"))], &BTreeMap::new(), &image).expect("image");
        assert!(one.deployment.spec != rolled.deployment.spec);
    }

    #[test]
    fn router_pods_outlive_their_longest_call_and_quit_gracefully() {
        let mut short = aipod("a", Some("edge"));
        short.spec.runtime.max_call_duration = Some("90s".into());
        let o = objects("edge", "ml", &[short.clone()], &BTreeMap::new(), &RouterOptions::default()).expect("objects");
        let pod = o.deployment.spec.as_ref().and_then(|s| s.template.spec.clone()).expect("pod");
        assert_eq!(pod.termination_grace_period_seconds, Some(5 + 95 + 5), "preStop + nginx's bound + margin");
        assert!(conf(&o).contains("worker_shutdown_timeout 95s;"), "{}", conf(&o));
        assert_eq!(pod.share_process_namespace, Some(true));
        let nginx = &pod.containers[0];
        let quit = nginx.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()).and_then(|h| h.http_get.as_ref());
        assert_eq!(quit.map(|g| (g.path.as_deref(), g.port.clone())), Some((Some("/quit"), IntOrString::Int(8082))));
        let reloader = &pod.containers[1];
        assert_eq!(reloader.image.as_deref(), Some(DEFAULT_RELOADER_IMAGE));
        assert_eq!(reloader.args.as_ref().map(|a| a[0].as_str()), Some("router-reloader"));
        // With an AIPod of the default hour beside it, the hour wins.
        let both = [short, aipod("b", Some("edge"))];
        let o = objects("edge", "ml", &both, &BTreeMap::new(), &RouterOptions::default()).expect("objects");
        assert!(conf(&o).contains("worker_shutdown_timeout 3605s;"));
        let pdb = o.pod_disruption_budget.expect("2 replicas: a budget");
        assert_eq!(
            pdb.spec.and_then(|s| s.selector).and_then(|s| s.match_labels),
            Some(labels::router_selector("edge"))
        );
        let one = RouterOptions { replicas: 1, ..RouterOptions::default() };
        assert!(objects("edge", "ml", &both, &BTreeMap::new(), &one).expect("o").pod_disruption_budget.is_none());
    }

    #[test]
    fn nginx_runs_unprivileged_with_health_probes() {
        let o = objects("edge", "ml", &[aipod("a", Some("edge"))], &BTreeMap::new(), &RouterOptions::default())
            .expect("objects");
        let pod = o.deployment.spec.as_ref().and_then(|s| s.template.spec.clone()).expect("pod");
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some(DEFAULT_IMAGE));
        let sc = c.security_context.clone().expect("security");
        assert_eq!(
            (sc.read_only_root_filesystem, sc.run_as_non_root, sc.allow_privilege_escalation),
            (Some(true), Some(true), Some(false))
        );
        let probe = c.readiness_probe.as_ref().and_then(|p| p.http_get.clone()).expect("http probe");
        assert_eq!((probe.path.as_deref(), probe.port.clone()), (Some("/healthz"), IntOrString::Int(HEALTH_PORT)));
        let port = &o.service.spec.as_ref().and_then(|s| s.ports.clone()).expect("ports")[0];
        assert_eq!((port.port, port.app_protocol.as_deref()), (GRPC_PORT, Some("kubernetes.io/h2c")));
        assert_eq!(o.service.spec.as_ref().and_then(|s| s.type_.as_deref()), Some("ClusterIP"));
    }

    #[test]
    fn the_router_service_can_be_a_load_balancer() {
        let opts = RouterOptions {
            service_type: "LoadBalancer".into(),
            service_annotations: BTreeMap::from([("lb.example.com/internal".to_owned(), "true".to_owned())]),
            ..RouterOptions::default()
        };
        let o = objects("edge", "ml", &[aipod("a", Some("edge"))], &BTreeMap::new(), &opts).expect("objects");
        assert_eq!(o.service.spec.as_ref().and_then(|s| s.type_.as_deref()), Some("LoadBalancer"));
        assert_eq!(
            o.service.metadata.annotations.as_ref().and_then(|a| a.get("lb.example.com/internal")).map(String::as_str),
            Some("true")
        );
        assert!(o.config_map.metadata.annotations.is_none(), "only the Service gets them");
    }
}
