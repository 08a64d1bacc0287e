//! Names and labels the operator puts on everything it creates.

use std::collections::BTreeMap;

use crate::crd::AIPod;

/// The field manager of every server-side apply, and the managed-by label.
pub const MANAGER: &str = "aipod-operator";

/// Labels that select an AIPod's pods; never changed after creation.
pub fn selector(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "aipod".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name.to_owned()),
    ])
}

/// Labels on every child of `aipod`: the selector plus component, manager and
/// upstream.
pub fn labels(aipod: &AIPod, name: &str) -> BTreeMap<String, String> {
    let mut labels = selector(name);
    labels.insert("app.kubernetes.io/component".to_owned(), "model".to_owned());
    labels.insert("app.kubernetes.io/managed-by".to_owned(), MANAGER.to_owned());
    labels.insert("aipod.io/upstream".to_owned(), aipod.upstream());
    labels
}
