//! AIPod → BackendTLSPolicy (Gateway API v1): for a TLS AIPod behind a
//! GRPCRoute, tells the Gateway to speak TLS to the Service's `grpc` port
//! and to verify the runtime's certificate — against a ConfigMap's `ca.crt`
//! when the spec names one (Core support), else the TLS Secret's `ca.crt`
//! (implementation-specific support) — for the Service's cluster DNS name.

use gateway_api::apis::standard::backendtlspolicies::{
    BackendTlsPolicy, BackendTlsPolicySpec, BackendTlsPolicyTargetRefs, BackendTlsPolicyValidation,
    BackendTlsPolicyValidationCaCertificateRefs,
};

use crate::{Result, crd::AIPod, labels};

/// The BackendTLSPolicy `aipod` needs: `None` unless it has both TLS and a
/// Gateway route.
pub fn backend_tls_policy(aipod: &AIPod) -> Result<Option<BackendTlsPolicy>> {
    let Some(tls) = &aipod.spec.tls else { return Ok(None) };
    if aipod.spec.route.as_ref().and_then(|r| r.gateway.as_ref()).is_none() {
        return Ok(None);
    }
    let name = crate::name(aipod)?;
    let ns = aipod.metadata.namespace.as_deref().unwrap_or("default");
    let ca = match &tls.ca_config_map_name {
        Some(cm) => BackendTlsPolicyValidationCaCertificateRefs {
            group: String::new(),
            kind: "ConfigMap".to_owned(),
            name: cm.clone(),
        },
        None => BackendTlsPolicyValidationCaCertificateRefs {
            group: String::new(),
            kind: "Secret".to_owned(),
            name: tls.secret_name.clone(),
        },
    };
    let spec = BackendTlsPolicySpec {
        target_refs: vec![BackendTlsPolicyTargetRefs {
            group: String::new(),
            kind: "Service".to_owned(),
            name: name.to_owned(),
            section_name: Some("grpc".to_owned()),
        }],
        validation: BackendTlsPolicyValidation {
            ca_certificate_refs: Some(vec![ca]),
            hostname: format!("{name}.{ns}.svc"),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut policy = BackendTlsPolicy::new(name, spec);
    policy.metadata = crate::child_meta(aipod, name, labels::labels(aipod, name))?;
    Ok(Some(policy))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fixtures;

    fn gateway() -> serde_json::Value {
        json!({"gateway": {"parentRefs": [{"name": "gw"}]}})
    }

    #[test]
    fn only_tls_aipods_behind_a_gateway_get_one() {
        let plain = fixtures::aipod("m").spec(json!({"route": gateway()})).stored();
        assert!(backend_tls_policy(&plain).expect("render").is_none());
        let no_route = fixtures::aipod("m").spec(json!({"tls": {"secretName": "m-tls"}})).stored();
        assert!(backend_tls_policy(&no_route).expect("render").is_none());
        let aipod = fixtures::aipod("m").spec(json!({"tls": {"secretName": "m-tls"}, "route": gateway()})).stored();
        let v = serde_json::to_value(backend_tls_policy(&aipod).expect("render").expect("one")).expect("json");
        assert_eq!(v["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(v["kind"], "BackendTLSPolicy");
        assert_eq!(
            v["spec"]["targetRefs"],
            json!([{"group": "", "kind": "Service", "name": "m", "sectionName": "grpc"}])
        );
        assert_eq!(v["spec"]["validation"]["hostname"], "m.default.svc");
        assert_eq!(
            v["spec"]["validation"]["caCertificateRefs"],
            json!([{"group": "", "kind": "Secret", "name": "m-tls"}])
        );
        let with_cm = fixtures::aipod("m")
            .spec(json!({"tls": {"secretName": "m-tls", "caConfigMapName": "m-ca"}, "route": gateway()}))
            .stored();
        let v = serde_json::to_value(backend_tls_policy(&with_cm).expect("render").expect("one")).expect("json");
        assert_eq!(v["spec"]["validation"]["caCertificateRefs"][0]["kind"], "ConfigMap");
    }
}
