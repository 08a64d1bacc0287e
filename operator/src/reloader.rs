//! `aipod-operator router-reloader`: the small container beside nginx in
//! every router pod, so a config change never replaces a router pod (which
//! would cut the calls it carries).
//!
//! - **Reload in place.** It watches the router's ConfigMap as the kubelet
//!   mounts it (the kubelet swaps the files atomically, and the operator
//!   nudges the kubelet by annotating the pod) and sends nginx's master
//!   SIGHUP: new workers take new calls on the new config, old workers
//!   finish the calls they carry (bounded by nginx's
//!   `worker_shutdown_timeout`). Reloads are coalesced, at most one a
//!   second.
//! - **Never a broken config.** nginx keeps its old config when a new one
//!   fails to load; the reloader sees that (no new worker appears) and
//!   reports it — in its log, in `aipod_router_config_rejected`, and on
//!   `/status`, which the operator reads into the AIPods' `RouteReady`.
//! - **A graceful stop.** The nginx container's preStop hook asks `/quit`:
//!   after a pause for endpoints to forget the pod, nginx gets SIGQUIT (its
//!   graceful quit — Kubernetes' SIGTERM would be nginx's fast shutdown,
//!   which cuts calls) and the hook returns when nginx has exited.
//!
//! It shares the pod's process namespace and runs as nginx's user, so it
//! may signal the master; it needs no API access.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the reloader runs (the `router-reloader` subcommand's flags).
#[derive(Debug, Clone)]
pub struct Options {
    /// The nginx config as mounted from the ConfigMap.
    pub config: PathBuf,
    /// nginx's pid file (on a volume both containers mount).
    pub pid_file: PathBuf,
    /// Where `/status`, `/metrics`, `/healthz` and `/quit` are served.
    pub listen: SocketAddr,
    /// How often the config file is looked at.
    pub poll: Duration,
    /// The least time between two reloads.
    pub min_interval: Duration,
    /// How long a reload may take to start new workers before it counts as
    /// rejected.
    pub reload_check: Duration,
    /// `/quit`'s pause before nginx stops accepting: endpoints controllers
    /// and proxies stop sending new connections first.
    pub quit_delay: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            config: PathBuf::from("/etc/aipod-router/nginx.conf"),
            pid_file: PathBuf::from("/tmp/nginx.pid"),
            listen: SocketAddr::from(([0, 0, 0, 0], crate::router::RELOADER_PORT as u16)),
            poll: Duration::from_millis(250),
            min_interval: Duration::from_secs(1),
            reload_check: Duration::from_secs(5),
            quit_delay: Duration::from_secs(crate::call_length::ROUTER_PRE_STOP_SECONDS as u64),
        }
    }
}

/// What `/status` reports: the config nginx runs and the last one it
/// refused, by [`crate::router::config_hash`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The hash of the config nginx runs (`None` until the first load is
    /// confirmed).
    pub loaded: Option<String>,
    /// The hash of the config nginx refused, while it is still the
    /// mounted one.
    pub rejected: Option<String>,
    /// Why, in a line.
    pub error: Option<String>,
    /// Reloads that took.
    pub reloads: u64,
    /// Reloads nginx refused.
    pub failed_reloads: u64,
}

type Shared = Arc<Mutex<Status>>;

/// Runs the reloader until SIGTERM, then waits for nginx to exit.
pub async fn run(options: Options) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| Error::Admin(format!("cannot listen on {}: {e}", options.listen)))?;
    let status: Shared = Arc::default();
    tracing::info!(config = %options.config.display(), listen = %options.listen, "router reloader started");
    let (stop_serving, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, Arc::clone(&status), options.clone(), stopped));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Admin(format!("SIGTERM handler: {e}")))?;
    tokio::select! {
        () = watch(&options, &status) => {}
        _ = term.recv() => {}
    }
    // Kubernetes stops every container of the pod at once; nginx's own
    // preStop (`/quit`) is served from here, so stay until nginx is gone.
    tracing::info!("SIGTERM: no more reloads; waiting for nginx to exit");
    while master(&options.pid_file).is_some() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The preStop request that quit nginx gets its answer before we go.
    let _ = stop_serving.send(());
    if tokio::time::timeout(Duration::from_secs(5), server).await.is_err() {
        tracing::warn!("requests still open 5 s after nginx exited; stopping anyway");
    }
    tracing::info!("nginx exited; reloader stopping");
    Ok(())
}

/// Watches the mounted config and reloads nginx when it changes.
async fn watch(options: &Options, status: &Shared) {
    let mut seen: Option<String> = None;
    let mut last_reload: Option<Instant> = None;
    loop {
        tokio::time::sleep(options.poll).await;
        let Some(pid) = master(&options.pid_file) else { continue };
        let Ok(conf) = tokio::fs::read_to_string(&options.config).await else { continue };
        let hash = crate::router::config_hash(&conf);
        if seen.as_ref() == Some(&hash) {
            continue;
        }
        if let Some(at) = last_reload {
            let wait = options.min_interval.saturating_sub(at.elapsed());
            if !wait.is_zero() {
                // Coalesced: whatever the file holds after the pause wins.
                tokio::time::sleep(wait).await;
                continue;
            }
        }
        last_reload = Some(Instant::now());
        // The first look also reloads: the file may have changed between
        // nginx's start and ours.
        let outcome = reload(pid, options.reload_check).await;
        let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(()) => {
                tracing::info!(hash, "nginx reloaded");
                s.loaded = Some(hash.clone());
                s.rejected = None;
                s.error = None;
                s.reloads += 1;
            }
            Err(error) => {
                tracing::error!(hash, error, "nginx refused the new config and keeps the previous one");
                s.rejected = Some(hash.clone());
                s.error = Some(error);
                s.failed_reloads += 1;
            }
        }
        seen = Some(hash);
    }
}

/// Sends SIGHUP to nginx's master `pid` and waits until the new config
/// serves: nginx starts new workers only when the new config loaded, and
/// then tells the old ones to stop accepting — until they have, a new
/// connection may still meet the old config.
async fn reload(pid: Pid, check: Duration) -> std::result::Result<(), String> {
    let before = children(pid);
    rustix::process::kill_process(pid, Signal::HUP).map_err(|e| format!("cannot signal nginx: {e}"))?;
    let deadline = Instant::now() + check;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started_new = children(pid).iter().any(|c| !before.contains(c));
        if started_new && before.iter().all(|old| !accepting(*old)) {
            return Ok(());
        }
        if !alive(pid) {
            return Err("nginx's master exited during the reload".to_owned());
        }
    }
    Err(format!(
        "nginx started no new worker within {}s of SIGHUP: it rejected the config (its error log says why)",
        check.as_secs()
    ))
}

/// nginx's master, from its pid file, if it runs.
fn master(pid_file: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let pid = Pid::from_raw(text.trim().parse().ok()?)?;
    alive(pid).then_some(pid)
}

fn alive(pid: Pid) -> bool {
    // A zombie still has /proc entries; its state says it is gone.
    std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()))
        .is_ok_and(|stat| stat_field(&stat, 0).is_some_and(|state| state != "Z"))
}

/// Whether nginx worker `pid` still takes new connections: it runs and has
/// not yet renamed itself "… is shutting down".
fn accepting(pid: i32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let running = Pid::from_raw(pid).is_some_and(alive);
    running && !String::from_utf8_lossy(&cmdline).contains("shutting down")
}

/// The processes whose parent is `pid` (nginx's workers).
fn children(pid: Pid) -> BTreeSet<i32> {
    let parent = pid.as_raw_nonzero().get().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else { return BTreeSet::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .is_ok_and(|stat| stat_field(&stat, 1).as_deref() == Some(parent.as_str()))
        })
        .collect()
}

/// Field `n` after the command name in `/proc/PID/stat` (0: state, 1: ppid).
fn stat_field(stat: &str, n: usize) -> Option<String> {
    // The command is in parentheses and may itself contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n).map(str::to_owned)
}

async fn serve(
    listener: tokio::net::TcpListener,
    status: Shared,
    options: Options,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/status",
            get(|State((s, _)): State<(Shared, Options)>| async move {
                let status = s.lock().unwrap_or_else(|e| e.into_inner()).clone();
                ([("content-type", "application/json")], serde_json::to_string(&status).unwrap_or_default())
            }),
        )
        .route(
            "/metrics",
            get(|State((s, _)): State<(Shared, Options)>| async move {
                metrics(&s.lock().unwrap_or_else(|e| e.into_inner()))
            }),
        )
        .route("/quit", get(|State((_, o)): State<(Shared, Options)>| async move { quit(&o).await }))
        .with_state((status, options));
    let stopped = async {
        let _ = stop.await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
        tracing::error!(error = %e, "reloader HTTP server failed");
    }
}

/// The preStop hook of the nginx container: a pause, nginx's graceful
/// quit, and the answer once nginx has exited.
async fn quit(options: &Options) -> (StatusCode, String) {
    tracing::info!(delay_s = options.quit_delay.as_secs_f64(), "preStop: nginx quits gracefully after the pause");
    tokio::time::sleep(options.quit_delay).await;
    let Some(pid) = master(&options.pid_file) else {
        return (StatusCode::OK, "nginx is not running\n".to_owned());
    };
    if let Err(e) = rustix::process::kill_process(pid, Signal::QUIT) {
        tracing::error!(error = %e, "cannot send SIGQUIT to nginx");
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot signal nginx: {e}\n"));
    }
    let started = Instant::now();
    while alive(pid) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::info!(after_s = started.elapsed().as_secs(), "nginx finished its calls and exited");
    (StatusCode::OK, "nginx exited\n".to_owned())
}

/// Prometheus text for the reloader's few series.
fn metrics(s: &Status) -> String {
    let mut out = String::new();
    out.push_str("# HELP aipod_router_reloads_total nginx reloads after a config change, by result.\n");
    out.push_str("# TYPE aipod_router_reloads_total counter\n");
    out.push_str(&format!("aipod_router_reloads_total{{result=\"ok\"}} {}\n", s.reloads));
    out.push_str(&format!("aipod_router_reloads_total{{result=\"rejected\"}} {}\n", s.failed_reloads));
    out.push_str("# HELP aipod_router_config_rejected 1 while nginx refuses the mounted config.\n");
    out.push_str("# TYPE aipod_router_config_rejected gauge\n");
    out.push_str(&format!("aipod_router_config_rejected {}\n", u8::from(s.rejected.is_some())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_commands_with_spaces_and_parentheses() {
        let stat = "4242 (nginx: worker (x)) S 4200 4200 4200 0 -1 4194560";
        assert_eq!(stat_field(stat, 0).as_deref(), Some("S"));
        assert_eq!(stat_field(stat, 1).as_deref(), Some("4200"));
        assert_eq!(stat_field("garbage", 1), None);
    }

    #[test]
    fn metrics_say_whether_the_mounted_config_is_refused() {
        let ok = Status { loaded: Some("a".into()), reloads: 3, ..Status::default() };
        assert!(metrics(&ok).contains("aipod_router_config_rejected 0"));
        assert!(metrics(&ok).contains("aipod_router_reloads_total{result=\"ok\"} 3"));
        let bad = Status { rejected: Some("b".into()), failed_reloads: 1, ..ok };
        assert!(metrics(&bad).contains("aipod_router_config_rejected 1"));
        assert!(metrics(&bad).contains("aipod_router_reloads_total{result=\"rejected\"} 1"));
    }
}
