//! AIPod → PodMonitor: prometheus-operator's `monitoring.coreos.com/v1`
//! object that has Prometheus scrape every pod of the AIPod on its `metrics`
//! port. Typed here with the few fields the operator sets (the way kopium
//! would generate them); the schema tests check what it emits against
//! prometheus-operator's own schema.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Result, crd::AIPod, labels};

/// The part of prometheus-operator's PodMonitor spec the operator sets.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(group = "monitoring.coreos.com", version = "v1", kind = "PodMonitor", namespaced)]
#[serde(rename_all = "camelCase")]
pub struct PodMonitorSpec {
    /// The pods to scrape.
    pub selector: LabelSelector,
    /// Where on those pods.
    pub pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

/// One scrape endpoint of the selected pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodMetricsEndpoint {
    /// The container port's name.
    pub port: String,
    /// The HTTP path.
    pub path: String,
    /// `http` or `https`.
    pub scheme: String,
    /// Scrape interval (Prometheus duration); default: Prometheus's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

/// The PodMonitor `aipod` asks for, `None` when it asks for none.
pub fn pod_monitor(aipod: &AIPod) -> Result<Option<PodMonitor>> {
    if !aipod.wants_pod_monitor() {
        return Ok(None);
    }
    let name = crate::name(aipod)?;
    let endpoint = PodMetricsEndpoint {
        port: "metrics".to_owned(),
        path: "/metrics".to_owned(),
        scheme: "http".to_owned(),
        interval: aipod.spec.monitoring.as_ref().and_then(|m| m.interval.clone()),
    };
    let selector: BTreeMap<String, String> = labels::selector(name);
    let spec = PodMonitorSpec {
        selector: LabelSelector { match_labels: Some(selector), match_expressions: None },
        pod_metrics_endpoints: vec![endpoint],
    };
    let mut monitor = PodMonitor::new(name, spec);
    monitor.metadata = crate::child_meta(aipod, name, labels::labels(aipod, name))?;
    Ok(Some(monitor))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fixtures;

    #[test]
    fn only_when_asked_and_shaped_for_prometheus_operator() {
        assert!(pod_monitor(&fixtures::aipod("m").stored()).expect("render").is_none());
        let off = fixtures::aipod("m").spec(json!({"monitoring": {"podMonitor": false}})).stored();
        assert!(pod_monitor(&off).expect("render").is_none());
        let aipod = fixtures::aipod("m").spec(json!({"monitoring": {"podMonitor": true, "interval": "15s"}})).stored();
        let object = pod_monitor(&aipod).expect("render").expect("asked for");
        let v = serde_json::to_value(&object).expect("json");
        assert_eq!(v["apiVersion"], "monitoring.coreos.com/v1");
        assert_eq!(v["kind"], "PodMonitor");
        assert_eq!(v["metadata"]["name"], "m");
        assert_eq!(v["metadata"]["ownerReferences"][0]["kind"], "AIPod");
        assert_eq!(v["spec"]["selector"], json!({"matchLabels": labels::selector("m")}));
        assert_eq!(
            v["spec"]["podMetricsEndpoints"],
            json!([{"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "15s"}])
        );
    }
}
