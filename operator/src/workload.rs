//! Building blocks every workload the operator runs shares — the model
//! runtimes and the nginx routers alike: restricted security, rollouts that
//! never drop below the desired pods, the h2c gRPC Service port, and a stable
//! content hash.

use k8s_openapi::{
    api::{
        apps::v1::{DeploymentStrategy, RollingUpdateDeployment},
        core::v1::{Capabilities, PodSecurityContext, SeccompProfile, SecurityContext, ServicePort},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

/// A container that runs as non-root on a read-only root filesystem, with no
/// privilege escalation and every capability dropped.
pub fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), ..Default::default() }),
        ..Default::default()
    }
}

/// A pod that runs as `uid` (user and group) with the RuntimeDefault seccomp
/// profile.
pub fn restricted_pod(uid: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_owned(), ..Default::default() }),
        ..Default::default()
    }
}

/// A rolling update that starts a new pod before stopping an old one.
pub fn zero_downtime_rollout() -> DeploymentStrategy {
    DeploymentStrategy {
        type_: Some("RollingUpdate".to_owned()),
        rolling_update: Some(RollingUpdateDeployment {
            max_unavailable: Some(IntOrString::Int(0)),
            max_surge: Some(IntOrString::Int(1)),
        }),
    }
}

/// The Service port `grpc` on `port`, HTTP/2 cleartext, to the container port
/// named `grpc`.
pub fn grpc_service_port(port: i32) -> ServicePort {
    ServicePort {
        name: Some("grpc".to_owned()),
        port,
        target_port: Some(IntOrString::String("grpc".to_owned())),
        protocol: Some("TCP".to_owned()),
        app_protocol: Some("kubernetes.io/h2c".to_owned()),
        ..Default::default()
    }
}

/// FNV-1a of `s`: a stable content hash (config hashes, placeholder uids).
pub fn fnv64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}
