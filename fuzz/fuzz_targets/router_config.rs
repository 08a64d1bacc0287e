//! Fuzz target: the nginx router config from AIPod manifests a hostile
//! user controls (names, namespaces, upstreams, router names). Whatever the
//! operator accepts must not change the config's structure: every value
//! stays a quoted map key or a DNS name, braces balance, and no value
//! starts a directive.
#![no_main]

use std::collections::BTreeMap;

use aipod_operator::{crd::AIPod, nginx};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let fields: Vec<&str> = text.splitn(4, '\u{0}').collect();
    let [name, namespace, upstream, router] = fields[..] else { return };
    let manifest = serde_json::json!({
        "apiVersion": "aipod.io/v1alpha1", "kind": "AIPod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"upstream": upstream, "route": {"router": router}},
    });
    let Ok(aipod) = serde_json::from_value::<AIPod>(manifest) else { return };
    let backends = nginx::backends(&[aipod], Some(router), &BTreeMap::new());
    let conf = nginx::nginx_conf(&backends, &nginx::RouterSettings::default());
    assert_eq!(conf.matches('{').count(), conf.matches('}').count(), "unbalanced braces");
    for b in &backends {
        for value in [&b.upstream, &b.address] {
            assert!(
                value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':')),
                "a routed value outside the DNS alphabet reached the config: {value:?}"
            );
        }
    }
});
