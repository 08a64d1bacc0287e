//! The admin HTTP server: `/healthz`, `/readyz` and Prometheus `/metrics`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, routing::get};

use crate::{Error, Result, metrics::Metrics};

#[derive(Clone)]
struct Admin {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

/// Serves the admin endpoints on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<Admin>| async move {
                if s.ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .route("/metrics", get(|State(s): State<Admin>| async move { s.metrics.render() }))
        .with_state(Admin { metrics, ready });
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::Admin(format!("bind {addr}: {e}")))?;
    tracing::info!(%addr, "admin server listening");
    axum::serve(listener, app).await.map_err(|e| Error::Admin(e.to_string()))
}
