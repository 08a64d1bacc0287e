//! The objects one AIPod becomes, in the order they are applied: the one
//! list both `render` prints and the controller applies.

use gateway_api::apis::standard::{backendtlspolicies::BackendTlsPolicy, grpcroutes::GrpcRoute};
use k8s_openapi::api::{
    apps::v1::Deployment, core::v1::Service, networking::v1::NetworkPolicy, policy::v1::PodDisruptionBudget,
};
use serde::Serialize;

use crate::{
    Error, Result, backend_tls,
    crd::AIPod,
    deployment, disruption, grpc_route, network_policy,
    pod_monitor::{self, PodMonitor},
    service,
};

/// An AIPod's children, the optional ones `None` when its spec asks for
/// none. The order of the fields is the order of applying: the policy
/// first, so no pod starts unprotected.
#[derive(Debug, Clone)]
pub struct Children {
    /// Who may reach the pods (`spec.network`).
    pub network_policy: Option<NetworkPolicy>,
    /// The runtime pods.
    pub deployment: Deployment,
    /// Their Service.
    pub service: Service,
    /// How many may be down at once during node drains.
    pub disruption_budget: Option<PodDisruptionBudget>,
    /// Gateway API routing of its `x-upstream`.
    pub grpc_route: Option<GrpcRoute>,
    /// TLS from the gateway to the pods.
    pub backend_tls_policy: Option<BackendTlsPolicy>,
    /// Prometheus Operator scraping.
    pub pod_monitor: Option<PodMonitor>,
}

/// The children of `aipod` (namespace and uid filled, as stored), with
/// `runtime_image` when it names no image.
pub fn children(aipod: &AIPod, runtime_image: &str) -> Result<Children> {
    Ok(Children {
        network_policy: network_policy::network_policy(aipod)?,
        deployment: deployment::deployment(aipod, runtime_image)?,
        service: service::service(aipod)?,
        disruption_budget: disruption::pod_disruption_budget(aipod)?,
        grpc_route: grpc_route::grpc_route(aipod)?,
        backend_tls_policy: backend_tls::backend_tls_policy(aipod)?,
        pod_monitor: pod_monitor::pod_monitor(aipod)?,
    })
}

impl Children {
    /// Every child as a YAML document, in applying order.
    pub fn to_yaml(&self) -> Result<String> {
        let mut out = String::new();
        if let Some(policy) = &self.network_policy {
            out.push_str(&doc(policy)?);
        }
        out.push_str(&doc(&self.deployment)?);
        out.push_str(&doc(&self.service)?);
        if let Some(budget) = &self.disruption_budget {
            out.push_str(&doc(budget)?);
        }
        if let Some(route) = &self.grpc_route {
            out.push_str(&doc(route)?);
        }
        if let Some(policy) = &self.backend_tls_policy {
            out.push_str(&doc(policy)?);
        }
        if let Some(monitor) = &self.pod_monitor {
            out.push_str(&doc(monitor)?);
        }
        Ok(out)
    }
}

/// `object` as one YAML document.
pub(crate) fn doc<T: Serialize>(object: &T) -> Result<String> {
    let yaml = serde_saphyr::to_string(object).map_err(|e| Error::Manifest(e.to_string()))?;
    Ok(format!("---\n{yaml}"))
}
