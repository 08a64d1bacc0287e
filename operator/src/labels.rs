//! Names and labels the operator puts on everything it creates, spelled
//! here and nowhere else.

use std::collections::BTreeMap;

use crate::crd::AIPod;

/// The field manager of every server-side apply, and the managed-by label.
pub const MANAGER: &str = "aipod-operator";

/// `app.kubernetes.io/name`.
pub const NAME: &str = "app.kubernetes.io/name";
/// `app.kubernetes.io/instance`.
pub const INSTANCE: &str = "app.kubernetes.io/instance";
/// `app.kubernetes.io/component`.
pub const COMPONENT: &str = "app.kubernetes.io/component";
/// `app.kubernetes.io/managed-by`.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The `x-upstream` value an AIPod's children serve.
pub const UPSTREAM: &str = "aipod.io/upstream";

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Labels that select an AIPod's pods; never changed after creation.
pub fn selector(name: &str) -> BTreeMap<String, String> {
    map(&[(NAME, "aipod"), (INSTANCE, name)])
}

/// [`selector`] in the API's label-selector syntax (`k=v,k=v`): what a
/// LIST of the pods and the scale subresource's `status.selector` say.
pub fn selector_query(name: &str) -> String {
    selector(name).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Labels on every child of `aipod`: the selector plus component, manager and
/// upstream.
pub fn labels(aipod: &AIPod, name: &str) -> BTreeMap<String, String> {
    let mut labels = selector(name);
    labels.extend(map(&[(COMPONENT, "model"), (MANAGED_BY, MANAGER), (UPSTREAM, &aipod.upstream())]));
    labels
}

/// Labels that select a router's nginx pods.
pub fn router_selector(router: &str) -> BTreeMap<String, String> {
    map(&[(NAME, "aipod-router"), (INSTANCE, router)])
}

/// Labels on a router's objects.
pub fn router_labels(router: &str) -> BTreeMap<String, String> {
    let mut labels = router_selector(router);
    labels.extend(map(&[(COMPONENT, "router"), (MANAGED_BY, MANAGER)]));
    labels
}

/// The label selector (API syntax) of everything the operator manages.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY}={MANAGER}")
}

/// The label selector (API syntax) of every router's objects.
pub fn routers_selector() -> String {
    format!("{COMPONENT}=router,{MANAGED_BY}={MANAGER}")
}

/// The label selector (API syntax) of every router's pods.
pub fn router_pods_selector() -> String {
    format!("{NAME}=aipod-router")
}
