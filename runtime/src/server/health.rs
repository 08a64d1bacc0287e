//! gRPC health: liveness (service `""`) is SERVING while the process runs,
//! draining included; readiness (service `ai.AI`) is SERVING only while every
//! model is ready and the server is not draining.

use std::{sync::Arc, time::Duration};

use aipod::contract::{LIVENESS_SERVICE, READINESS_SERVICE};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::engine::Engine;

/// How often readiness is re-evaluated (models can load or lose workers).
const POLL: Duration = Duration::from_millis(250);

/// Publishes the server's health.
#[derive(Clone)]
pub(crate) struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// Wraps a reporter and marks the process alive.
    pub(crate) async fn new(reporter: HealthReporter) -> Self {
        reporter.set_service_status(LIVENESS_SERVICE, ServingStatus::Serving).await;
        reporter.set_service_status(READINESS_SERVICE, ServingStatus::NotServing).await;
        Self { reporter }
    }

    /// Sets readiness.
    pub(crate) async fn set_ready(&self, ready: bool) {
        let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.reporter.set_service_status(READINESS_SERVICE, status).await;
    }

    /// Keeps readiness in step with the engine until the server stops.
    pub(crate) async fn follow(self, engine: Arc<Engine>) {
        let mut last = None;
        loop {
            let ready = engine.is_ready();
            if last != Some(ready) {
                self.set_ready(ready).await;
                tracing::info!(ready, "readiness changed");
                last = Some(ready);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
