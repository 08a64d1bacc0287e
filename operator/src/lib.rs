//! The aipod operator: turns `AIPod` resources into a Deployment of the
//! aipod runtime, a Service and a Gateway API GRPCRoute keyed by
//! `x-upstream`, and reports honest status.
//!
//! - [`crd`]: the `AIPod` types, the only source of the CRD schema, and
//!   [`reference`]: the API reference page generated from it;
//! - pure builders: [`deployment`], [`service`], [`grpc_route`], and [`status`]
//!   (with [`conflict`] deciding who holds a shared upstream);
//! - [`nginx`]: the nginx configuration that routes `x-upstream` without
//!   Gateway API, and [`router`]: the Kubernetes objects (ConfigMap, nginx
//!   Deployment, Service) of an operator-managed router;
//! - [`children`]: the one list of the objects an AIPod becomes, which
//!   [`render`] prints and [`controller`] applies;
//! - [`render`]: what `aipod-operator render` and `router-config` print;
//! - [`controller`]: the reconciler that applies them;
//! - [`autoscale`]: the autoscaler's decisions, pure (samples and a clock
//!   in, replicas and the pods that may go out), and [`autoscaler`]: its
//!   loop, which reads the pods' calls and scales;
//! - [`workload`]: security, rollout and port pieces the builders share;
//! - [`admin`] and [`metrics`]: health endpoints and Prometheus metrics.

use std::collections::BTreeMap;

use kube::{Resource, api::ObjectMeta};

pub mod admin;
pub mod autoscale;
pub mod autoscaler;
pub mod backend_tls;
pub mod call_length;
pub mod children;
pub mod conflict;
pub mod controller;
pub mod crd;
pub mod deployment;
pub mod disruption;
pub mod grpc_route;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod network_policy;
pub mod nginx;
pub mod pod_http;
pub mod pod_monitor;
pub mod reference;
pub mod reloader;
pub mod render;
pub mod router;
pub mod secrets;
pub mod service;
pub mod status;
pub mod workload;

#[cfg(test)]
pub(crate) mod fixtures;

use crd::AIPod;

/// Everything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The AIPod's spec cannot be turned into objects.
    #[error("invalid AIPod spec: {0}")]
    InvalidSpec(String),
    /// The Kubernetes API refused or failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A manifest could not be read or written.
    #[error("{0}")]
    Manifest(String),
    /// A flag or environment variable has a value the operator cannot use.
    #[error("{0}")]
    Config(String),
    /// The admin server failed.
    #[error("admin server: {0}")]
    Admin(String),
    /// The controller's cache of AIPods is not available.
    #[error("AIPod cache: {0}")]
    Cache(String),
    /// This instance led and lost its Lease: it must stop writing.
    #[error("lost the leader election: {0}")]
    LeaseLost(String),
}

impl Error {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidSpec(_) => "invalid_spec",
            Self::Kube(kube::Error::Api(_)) => "api_error",
            Self::Kube(_) => "client_error",
            Self::Manifest(_) => "manifest",
            Self::Config(_) => "config",
            Self::Admin(_) => "admin",
            Self::Cache(_) => "cache",
            Self::LeaseLost(_) => "lease_lost",
        }
    }
}

/// Convenience alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The AIPod's name, which its children share.
pub fn name(aipod: &AIPod) -> Result<&str> {
    aipod.metadata.name.as_deref().ok_or_else(|| Error::InvalidSpec("AIPod has no name".into()))
}

/// Metadata of a child of `aipod`: same name and namespace, the given
/// labels, and a controller owner reference so deletion cascades.
pub fn child_meta(aipod: &AIPod, name: &str, labels: BTreeMap<String, String>) -> Result<ObjectMeta> {
    let owner = aipod
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidSpec("AIPod has no uid yet; it must come from the API server".into()))?;
    Ok(ObjectMeta {
        name: Some(name.to_owned()),
        namespace: aipod.metadata.namespace.clone(),
        labels: Some(labels),
        owner_references: Some(vec![owner]),
        ..Default::default()
    })
}
