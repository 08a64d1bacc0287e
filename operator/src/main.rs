//! The `aipod-operator` binary: `run` the controller, print the `crd` (or
//! its `api-reference`), or
//! `render` the objects an AIPod manifest becomes; its flags are in `args`.

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
};

mod args;

use aipod_operator::{Error, Result, admin, controller, crd, leader, metrics::Metrics, render};
use args::{Cli, Command};
use clap::Parser;

#[tokio::main]
#[expect(clippy::print_stdout, clippy::print_stderr, reason = "a CLI prints its output and its errors")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => {
            print!("{}", crd::crd_yaml());
            Ok(())
        }
        Command::ApiReference => {
            print!("{}", aipod_operator::reference::api_reference());
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
        Command::AutoscalePods { manifest } => match render::read_files(&[manifest]) {
            Ok(aipods) => match aipods.as_slice() {
                [aipod] => aipod_operator::autoscaler::over_stdio(aipod).await,
                _ => Err(Error::Manifest(format!("autoscale-pods takes one AIPod, the file has {}", aipods.len()))),
            },
            Err(e) => Err(e),
        },
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
