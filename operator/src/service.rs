//! AIPod → Service: ClusterIP, the port `grpc` (HTTP/2 cleartext) and the
//! runtime's Prometheus port `metrics`.

use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{
    Result,
    crd::AIPod,
    deployment::{DEFAULT_PORT, metrics_port},
    labels, workload,
};

/// The Service in front of `aipod`'s pods.
pub fn service(aipod: &AIPod) -> Result<Service> {
    let name = crate::name(aipod)?;
    Ok(Service {
        metadata: crate::child_meta(aipod, name, labels::labels(aipod, name))?,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(labels::selector(name)),
            ports: Some(vec![
                grpc_port(aipod),
                ServicePort {
                    name: Some("metrics".to_owned()),
                    port: metrics_port(aipod),
                    target_port: Some(IntOrString::String("metrics".to_owned())),
                    protocol: Some("TCP".to_owned()),
                    app_protocol: Some("http".to_owned()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    })
}

/// The `grpc` port: HTTP/2 cleartext (`kubernetes.io/h2c`), or with TLS no
/// app protocol (TLS to the backend is configured by a BackendTLSPolicy).
fn grpc_port(aipod: &AIPod) -> ServicePort {
    let mut p = workload::grpc_service_port(port(aipod));
    if aipod.spec.tls.is_some() {
        p.app_protocol = None;
    }
    p
}

/// The Service port, the runtime's port.
pub fn port(aipod: &AIPod) -> i32 {
    aipod.spec.runtime.port.unwrap_or(DEFAULT_PORT)
}
