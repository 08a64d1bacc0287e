//! The `aipod-operator` binary: `run` the controller, print the `crd`, or
//! `render` the objects an AIPod manifest becomes.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
};

use aipod_operator::{Error, Result, admin, controller, crd, leader, metrics::Metrics, render};
use clap::{Args, Parser, Subcommand};

/// Kubernetes operator for aipod.
#[derive(Debug, Parser)]
#[command(name = "aipod-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How the operator runs what it creates; `run` and `render` share them, so
/// `render` prints what the controller would apply.
#[derive(Debug, Args)]
struct Workloads {
    /// The runtime image of AIPods that set no spec.image.
    #[arg(long, env = "AIPOD_RUNTIME_IMAGE", default_value = aipod_operator::deployment::DEFAULT_IMAGE)]
    runtime_image: String,
    /// The nginx image of routers.
    #[arg(long, env = "AIPOD_ROUTER_IMAGE", default_value = aipod_operator::router::DEFAULT_IMAGE)]
    router_image: String,
    /// Routers' grpc_read_timeout/grpc_send_timeout.
    #[arg(long, env = "AIPOD_ROUTER_READ_TIMEOUT", default_value = "60s", value_parser = aipod::duration::parse)]
    router_read_timeout: std::time::Duration,
    /// Routers' client_body_buffer_size: how much of each upload nginx
    /// holds, and the HTTP/2 window it gives it (memory per call in flight).
    #[arg(long, env = "AIPOD_ROUTER_BODY_BUFFER", default_value = "1MiB", value_parser = aipod::size::parse)]
    router_body_buffer: u64,
    /// The image of routers' reloader container (`router-reloader`): this
    /// operator's image.
    #[arg(long, env = "AIPOD_ROUTER_RELOADER_IMAGE", default_value = aipod_operator::router::DEFAULT_RELOADER_IMAGE)]
    router_reloader_image: String,
}

impl Workloads {
    /// `base` with the router image and read timeout from the flags.
    fn router(&self, base: aipod_operator::router::RouterOptions) -> aipod_operator::router::RouterOptions {
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
enum Command {
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

#[tokio::main]
#[expect(clippy::print_stdout, clippy::print_stderr, reason = "a CLI prints its output and its errors")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => {
            print!("{}", crd::crd_yaml());
            Ok(())
        }
        Command::RouterReloader { config, pid_file, listen, quit_delay, log } => match init_logs(&log) {
            Ok(()) => {
                let options =
                    aipod_operator::reloader::Options { config, pid_file, listen, quit_delay, ..Default::default() };
                aipod_operator::reloader::run(options).await
            }
            Err(e) => Err(e),
        },
        Command::Render { workloads, files } => {
            let router = workloads.router(aipod_operator::router::RouterOptions::default());
            render::render_files(&files, &workloads.runtime_image, &router).map(|yaml| print!("{yaml}"))
        }
        Command::RouterConfig {
            router,
            backends,
            read_timeout,
            body_timeout,
            body_buffer,
            listen,
            health_listen,
            temp_dir,
            files,
        } => {
            let settings = aipod_operator::nginx::RouterSettings {
                listen,
                health_listen,
                read_timeout,
                body_timeout,
                body_buffer,
                temp_dir,
                ..Default::default()
            };
            render::router_config_files(&files, router.as_deref(), &backends, &settings).map(|conf| print!("{conf}"))
        }
        Command::Run {
            namespace,
            admin,
            log,
            workloads,
            router_replicas,
            router_service_type,
            router_service_annotations,
            leader_election,
            lease_name,
            lease_namespace,
        } => match serde_json::from_str(&router_service_annotations) {
            Ok(service_annotations) => {
                let router = workloads.router(aipod_operator::router::RouterOptions {
                    replicas: router_replicas,
                    service_type: router_service_type,
                    service_annotations,
                    ..Default::default()
                });
                let election = leader_election.then_some((lease_name, lease_namespace));
                run(namespace, admin, &log, workloads.runtime_image, router, election).await
            }
            Err(e) => Err(Error::Config(format!("--router-service-annotations must be a JSON object of strings: {e}"))),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aipod-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

/// JSON logs on stderr, filtered by `log`.
fn init_logs(log: &str) -> Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(log).map_err(|e| Error::Config(format!("--log: {e}")))?)
        .init();
    Ok(())
}

async fn run(
    namespace: Option<String>,
    admin_addr: SocketAddr,
    log: &str,
    runtime_image: String,
    router: aipod_operator::router::RouterOptions,
    election: Option<(String, Option<String>)>,
) -> Result<()> {
    init_logs(log)?;
    // Bound before anything else: a port in use stops the operator at once.
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|e| Error::Admin(format!("cannot listen on --admin {admin_addr}: {e}")))?;
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let admin = admin::serve_on(listener, Arc::clone(&metrics), Arc::clone(&ready));
    let Some((lease, lease_namespace)) = election else {
        return tokio::select! {
            // The admin server only ends by failing: the operator goes with
            // it, rather than running on without probes or metrics.
            failed = admin => failed,
            () = controller::run(client, namespace, runtime_image, router, Arc::clone(&metrics), ready) => Ok(()),
        };
    };
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()))
        .unwrap_or_else(|_| format!("aipod-operator-{}", std::process::id()));
    let lease_namespace = lease_namespace
        .or_else(|| std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE).ok().map(|n| n.trim().to_owned()))
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let election =
        leader::Election::new(client.clone(), &lease_namespace, &lease, &identity, leader::Timing::default());
    // Followers are healthy: ready while they wait.
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!(identity, lease, lease_namespace, "waiting to lead");
    let controller = controller::run(client, namespace, runtime_image, router, Arc::clone(&metrics), ready);
    let outcome = tokio::select! {
        failed = admin => failed,
        // Losing the Lease drops the controller: every write stops at once.
        led = election.lead(controller, || metrics.set_leader(true)) => led,
        // A follower stops at once; a leader's controller also stops on the
        // signal (whichever arm sees it first).
        () = terminated() => Ok(()),
    };
    metrics.set_leader(false);
    if outcome.is_ok() {
        // A graceful stop: a follower takes over now, not when the Lease expires.
        election.release().await;
    }
    outcome
}

/// SIGTERM or SIGINT.
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "no SIGTERM handler; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Where a pod finds its namespace.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
