//! AIPod → NetworkPolicy: the gRPC port admits only the AIPod's nginx
//! router's pods and the namespaces the spec lists; the metrics port (and
//! the plaintext health port of TLS AIPods) admits the whole cluster, for
//! Prometheus and probes. Egress is left open unless the spec gives rules.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::networking::v1::{
        NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use crate::{Result, crd::AIPod, deployment, labels};

/// The label every namespace carries with its name (Kubernetes ≥ 1.22).
const NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";

/// The NetworkPolicy of `aipod`, `None` when the spec turns it off.
pub fn network_policy(aipod: &AIPod) -> Result<Option<NetworkPolicy>> {
    let spec = &aipod.spec.network_policy;
    if !spec.enabled {
        return Ok(None);
    }
    let name = crate::name(aipod)?;
    let port = |name: &str| NetworkPolicyPort {
        port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        end_port: None,
    };
    let mut callers = Vec::new();
    if let Some(router) = aipod.spec.route.as_ref().and_then(|r| r.router.as_deref()) {
        callers.push(NetworkPolicyPeer {
            pod_selector: Some(LabelSelector {
                match_labels: Some(labels::router_selector(router)),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    for ns in &spec.allow_from_namespaces {
        callers.push(NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(NAMESPACE_NAME.to_owned(), ns.clone())])),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let mut ingress = Vec::new();
    // No caller listed: the gRPC port admits no one (but probes, which
    // come from the node).
    if !callers.is_empty() {
        ingress.push(NetworkPolicyIngressRule { from: Some(callers), ports: Some(vec![port("grpc")]) });
    }
    let mut open = vec![port("metrics")];
    if deployment::health_port(aipod).is_some() {
        open.push(port("health"));
    }
    let anywhere_in_cluster =
        NetworkPolicyPeer { namespace_selector: Some(LabelSelector::default()), ..Default::default() };
    ingress.push(NetworkPolicyIngressRule { from: Some(vec![anywhere_in_cluster]), ports: Some(open) });
    let mut policy_types = vec!["Ingress".to_owned()];
    if spec.egress.is_some() {
        policy_types.push("Egress".to_owned());
    }
    Ok(Some(NetworkPolicy {
        metadata: crate::child_meta(aipod, name, labels::labels(aipod, name))?,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector { match_labels: Some(labels::selector(name)), ..Default::default() }),
            ingress: Some(ingress),
            egress: spec.egress.clone(),
            policy_types: Some(policy_types),
        }),
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::fixtures;

    fn rendered(spec: Value) -> Option<Value> {
        let aipod = fixtures::aipod("m").spec(spec).stored();
        network_policy(&aipod).expect("render").map(|np| serde_json::to_value(np).expect("json"))
    }

    #[test]
    fn the_grpc_port_admits_the_router_and_listed_namespaces_only() {
        let np = rendered(json!({
            "route": {"router": "edge"},
            "networkPolicy": {"allowFromNamespaces": ["web"]},
            "tls": {"secretName": "m-tls"},
        }))
        .expect("on by default");
        let spec = &np["spec"];
        assert_eq!(spec["podSelector"]["matchLabels"], json!(labels::selector("m")));
        assert_eq!(spec["policyTypes"], json!(["Ingress"]), "egress open unless rules are given");
        let grpc = &spec["ingress"][0];
        assert_eq!(grpc["ports"], json!([{"port": "grpc", "protocol": "TCP"}]));
        assert_eq!(grpc["from"][0]["podSelector"]["matchLabels"], json!(labels::router_selector("edge")));
        assert_eq!(grpc["from"][1]["namespaceSelector"]["matchLabels"], json!({NAMESPACE_NAME: "web"}));
        let open = &spec["ingress"][1];
        assert_eq!(open["from"], json!([{"namespaceSelector": {}}]));
        assert_eq!(
            open["ports"],
            json!([{"port": "metrics", "protocol": "TCP"}, {"port": "health", "protocol": "TCP"}])
        );
    }

    #[test]
    fn no_caller_means_no_grpc_rule_and_egress_rules_restrict_egress() {
        let np =
            rendered(json!({"networkPolicy": {"egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}})).expect("on");
        assert_eq!(np["spec"]["ingress"].as_array().map(Vec::len), Some(1), "only the metrics rule");
        assert_eq!(np["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(np["spec"]["egress"][0]["ports"][0]["port"], 53);
        assert!(rendered(json!({"networkPolicy": {"enabled": false}})).is_none());
    }
}
