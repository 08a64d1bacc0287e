//! The `aipod-operator` command line: its subcommands and flags (clap),
//! apart from what `main.rs` does with them.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

/// Kubernetes operator for aipod.
#[derive(Debug, Parser)]
#[command(name = "aipod-operator", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// How the operator runs what it creates; `run` and `render` share them, so
/// `render` prints what the controller would apply.
#[derive(Debug, Args)]
pub(crate) struct Workloads {
    /// The runtime image of AIPods that set no spec.image.
    #[arg(long, env = "AIPOD_RUNTIME_IMAGE", default_value = aipod_operator::deployment::DEFAULT_IMAGE)]
    pub(crate) runtime_image: String,
    /// The nginx image of routers.
    #[arg(long, env = "AIPOD_ROUTER_IMAGE", default_value = aipod_operator::router::DEFAULT_IMAGE)]
    pub(crate) router_image: String,
    /// Routers' grpc_read_timeout/grpc_send_timeout.
    #[arg(long, env = "AIPOD_ROUTER_READ_TIMEOUT", default_value = "60s", value_parser = aipod::duration::parse)]
    pub(crate) router_read_timeout: std::time::Duration,
    /// Routers' client_body_buffer_size: how much of each upload nginx
    /// holds, and the HTTP/2 window it gives it (memory per call in flight).
    #[arg(long, env = "AIPOD_ROUTER_BODY_BUFFER", default_value = "1MiB", value_parser = aipod::size::parse)]
    pub(crate) router_body_buffer: u64,
    /// The image of routers' reloader container (`router-reloader`): this
    /// operator's image.
    #[arg(long, env = "AIPOD_ROUTER_RELOADER_IMAGE", default_value = aipod_operator::router::DEFAULT_RELOADER_IMAGE)]
    pub(crate) router_reloader_image: String,
}

impl Workloads {
    /// `base` with the router image and read timeout from the flags.
    pub(crate) fn router(&self, base: aipod_operator::router::RouterOptions) -> aipod_operator::router::RouterOptions {
        aipod_operator::router::RouterOptions {
            image: self.router_image.clone(),
            read_timeout: self.router_read_timeout,
            body_buffer: self.router_body_buffer,
            reloader_image: self.router_reloader_image.clone(),
            ..base
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the controller.
    Run {
        /// Only watch this namespace (default: all).
        #[arg(long, env = "AIPOD_OPERATOR_NAMESPACE")]
        namespace: Option<String>,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, env = "AIPOD_OPERATOR_ADMIN", default_value = "0.0.0.0:8080")]
        admin: SocketAddr,
        /// Log filter (RUST_LOG syntax).
        #[arg(long, env = "AIPOD_OPERATOR_LOG", default_value = "info")]
        log: String,
        #[command(flatten)]
        workloads: Workloads,
        /// Pods per router.
        #[arg(long, env = "AIPOD_ROUTER_REPLICAS", default_value_t = 2)]
        router_replicas: i32,
        /// Router Service type: ClusterIP (expose with your Ingress) or LoadBalancer.
        #[arg(long, env = "AIPOD_ROUTER_SERVICE_TYPE", default_value = "ClusterIP", value_parser = ["ClusterIP", "LoadBalancer", "NodePort"])]
        router_service_type: String,
        /// Router Service annotations as a JSON object, e.g. for a cloud load balancer.
        #[arg(long, env = "AIPOD_ROUTER_SERVICE_ANNOTATIONS", default_value = "{}")]
        router_service_annotations: String,
        /// Elect a leader among the operator's replicas on a Lease; only
        /// the leader reconciles. `false` only for a single replica.
        #[arg(long, env = "AIPOD_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
        leader_election: bool,
        /// The Lease's name.
        #[arg(long, env = "AIPOD_LEADER_ELECTION_LEASE", default_value = "aipod-operator")]
        lease_name: String,
        /// The Lease's namespace (default: the pod's own, from its service
        /// account).
        #[arg(long, env = "AIPOD_LEADER_ELECTION_NAMESPACE")]
        lease_namespace: Option<String>,
    },
    /// Print the AIPod CRD as YAML.
    Crd,
    /// Print the AIPod API reference (docs/api.md) as Markdown, generated
    /// from the CRD's schema.
    ApiReference,
    /// Run beside nginx in a router pod: reload nginx gracefully when its
    /// mounted config changes, and quit it gracefully on the pod's preStop.
    RouterReloader {
        /// The nginx config, as the ConfigMap is mounted.
        #[arg(long, default_value = "/etc/aipod-router/nginx.conf")]
        config: PathBuf,
        /// nginx's pid file.
        #[arg(long, default_value = "/tmp/nginx.pid")]
        pid_file: PathBuf,
        /// Address of /status, /metrics, /healthz and /quit.
        #[arg(long, default_value = "0.0.0.0:8082")]
        listen: SocketAddr,
        /// /quit's pause before nginx stops accepting connections.
        #[arg(long, default_value = "5s", value_parser = aipod::duration::parse)]
        quit_delay: std::time::Duration,
        /// Log filter (RUST_LOG syntax).
        #[arg(long, env = "AIPOD_OPERATOR_LOG", default_value = "info")]
        log: String,
    },
    /// Print the objects AIPod manifests become: Deployment, Service,
    /// PodDisruptionBudget, GRPCRoute, BackendTLSPolicy, NetworkPolicy,
    /// PodMonitor, and the nginx routers they name.
    Render {
        #[command(flatten)]
        workloads: Workloads,
        /// AIPod manifests (YAML, several documents allowed).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The autoscaler's decisions for pods you run yourself, without an API
    /// server: a reading of the pods per line of stdin, the decision per
    /// line of stdout (docs/autoscaling.md; the test kubelet runs its pods
    /// with it).
    AutoscalePods {
        /// The AIPod manifest whose spec.autoscaling decides.
        manifest: PathBuf,
    },
    /// Print an nginx config that routes `x-upstream` to the AIPods in FILEs,
    /// for running nginx outside Kubernetes.
    RouterConfig {
        /// Only AIPods whose spec.route.router is NAME (default: all).
        #[arg(long, value_name = "NAME")]
        router: Option<String>,
        /// Send UPSTREAM to HOST:PORT instead of its in-cluster Service. Repeatable.
        #[arg(long = "backend", value_name = "UPSTREAM=HOST:PORT[,HOST:PORT]")]
        backends: Vec<String>,
        /// grpc_read_timeout/grpc_send_timeout: the longest silence between messages.
        #[arg(long, default_value = "60s", value_parser = aipod::duration::parse)]
        read_timeout: std::time::Duration,
        /// client_body_timeout: the longest pause while a client uploads.
        #[arg(long, default_value = "1h", value_parser = aipod::duration::parse)]
        body_timeout: std::time::Duration,
        /// client_body_buffer_size: the part of each upload nginx holds and
        /// the HTTP/2 window it gives it (nginx memory per call in flight).
        #[arg(long, default_value = "1MiB", value_parser = aipod::size::parse)]
        body_buffer: u64,
        /// The gRPC listen address.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: String,
        /// The /healthz listen address (plain HTTP).
        #[arg(long, default_value = "0.0.0.0:8081")]
        health_listen: String,
        /// A writable directory for nginx's pid and temporary files.
        #[arg(long, default_value = "/tmp")]
        temp_dir: String,
        /// AIPod manifests.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}
