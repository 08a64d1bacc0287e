//! AIPod → Service: ClusterIP, one port named `grpc`, HTTP/2 cleartext.

use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use crate::{Result, crd::AIPod, deployment::DEFAULT_PORT, labels, workload};

/// The Service in front of `aipod`'s pods.
pub fn service(aipod: &AIPod) -> Result<Service> {
    let name = crate::name(aipod)?;
    Ok(Service {
        metadata: crate::child_meta(aipod, name, labels::labels(aipod, name))?,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(labels::selector(name)),
            ports: Some(vec![workload::grpc_service_port(port(aipod))]),
            ..Default::default()
        }),
        status: None,
    })
}

/// The Service port, the runtime's port.
pub fn port(aipod: &AIPod) -> i32 {
    aipod.spec.runtime.port.unwrap_or(DEFAULT_PORT)
}
