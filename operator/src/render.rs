//! `aipod-operator render`: the objects AIPod manifests become, as YAML,
//! without a cluster. Also what the schema tests validate.

use std::path::Path;

use crate::{
    Error, Result, call_length,
    children::{self, doc},
    crd::AIPod,
};

/// Reads every AIPod document in `text`.
pub fn parse_aipods(text: &str) -> Result<Vec<AIPod>> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| Error::Manifest(format!("not valid YAML: {e}")))?;
    docs.into_iter()
        .filter(|d| !d.is_null())
        .filter(|d| d["kind"] == "AIPod")
        .map(|d| {
            let aipod =
                serde_json::from_value::<AIPod>(d).map_err(|e| Error::Manifest(format!("not a valid AIPod: {e}")))?;
            aipod.check_names().map_err(|e| Error::Manifest(format!("not a valid AIPod: {e}")))?;
            Ok(aipod)
        })
        .collect()
}

/// An AIPod as the API server would hand it over: namespace and uid filled.
pub fn as_stored(mut aipod: AIPod) -> AIPod {
    aipod.metadata.namespace.get_or_insert_with(|| "default".to_owned());
    let name = aipod.metadata.name.clone().unwrap_or_default();
    let low48 = crate::workload::fnv64(&name) & 0xffff_ffff_ffff;
    aipod.metadata.uid.get_or_insert_with(|| format!("00000000-0000-0000-0000-{low48:012x}"));
    aipod
}

/// The children of one AIPod as YAML documents; `runtime_image` when it
/// names no image.
pub fn render(aipod: &AIPod, runtime_image: &str) -> Result<String> {
    children::children(&as_stored(aipod.clone()), runtime_image)?.to_yaml()
}

/// Reads every AIPod in `files`; a file without one is an error.
pub fn read_files(files: &[impl AsRef<Path>]) -> Result<Vec<AIPod>> {
    let mut all = Vec::new();
    for file in files {
        let file = file.as_ref();
        let text = std::fs::read_to_string(file).map_err(|e| Error::Manifest(format!("{}: {e}", file.display())))?;
        let aipods = parse_aipods(&text).map_err(|e| Error::Manifest(format!("{}: {e}", file.display())))?;
        if aipods.is_empty() {
            return Err(Error::Manifest(format!("{}: no AIPod in this file", file.display())));
        }
        all.extend(aipods.into_iter().map(as_stored));
    }
    Ok(all)
}

/// Renders every AIPod in `files`, then the nginx routers they name (run
/// as `router` says), namespace by namespace, as the controller would with
/// the same options.
pub fn render_files(
    files: &[impl AsRef<Path>],
    runtime_image: &str,
    router: &crate::router::RouterOptions,
) -> Result<String> {
    let aipods = read_files(files)?;
    let mut out = String::new();
    for aipod in &aipods {
        out.push_str(&render(aipod, runtime_image)?);
    }
    let mut namespaces: Vec<&str> = aipods.iter().filter_map(|a| a.metadata.namespace.as_deref()).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    for ns in namespaces {
        let here: Vec<AIPod> = aipods.iter().filter(|a| a.metadata.namespace.as_deref() == Some(ns)).cloned().collect();
        for name in crate::router::routers(&here) {
            if let Some(objects) = crate::router::objects(&name, ns, &here, &std::collections::BTreeMap::new(), router)
            {
                out.push_str(&doc(&objects.config_map)?);
                out.push_str(&doc(&objects.deployment)?);
                out.push_str(&doc(&objects.service)?);
                if let Some(budget) = &objects.pod_disruption_budget {
                    out.push_str(&doc(budget)?);
                }
            }
        }
    }
    Ok(out)
}

/// `aipod-operator router-config`: the nginx config for the AIPods in
/// `files` that name `router` (all when `None`). `backends` are
/// `UPSTREAM=HOST:PORT[,HOST:PORT…]` overrides of in-cluster Service
/// addresses (several: one per pod, hashed by call id with `callAffinity`).
pub fn router_config_files(
    files: &[impl AsRef<Path>],
    router: Option<&str>,
    backends: &[String],
    settings: &crate::nginx::RouterSettings,
) -> Result<String> {
    settings.check().map_err(Error::Config)?;
    let aipods = read_files(files)?;
    let mut overrides = std::collections::BTreeMap::new();
    for pair in backends {
        let (upstream, address) = pair
            .split_once('=')
            .filter(|(u, a)| !u.is_empty() && a.split(',').all(crate::nginx::is_address))
            .ok_or_else(|| Error::Config(format!("--backend {pair:?}: expected UPSTREAM=HOST:PORT[,HOST:PORT…]")))?;
        if !aipods.iter().any(|a| a.upstream() == upstream) {
            return Err(Error::Manifest(format!(
                "--backend {pair:?}: no AIPod in the files has upstream {upstream:?}"
            )));
        }
        overrides.insert(upstream.to_owned(), address.split(',').map(str::to_owned).collect::<Vec<_>>());
    }
    let backends = crate::nginx::backends(&aipods, router, &overrides);
    // Old workers finish calls as long as the longest the AIPods allow.
    let settings = &crate::nginx::RouterSettings {
        shutdown_timeout: settings.shutdown_timeout.or_else(|| {
            let members = aipods
                .iter()
                .filter(|a| router.is_none_or(|r| a.spec.route.as_ref().and_then(|x| x.router.as_deref()) == Some(r)));
            Some(call_length::router_shutdown_bound(call_length::router_longest_call(members)))
        }),
        ..settings.clone()
    };
    if backends.is_empty() {
        let which = router.map_or_else(String::new, |r| format!(" with spec.route.router {r:?}"));
        return Err(Error::Manifest(format!("no AIPod{which} in the files: nothing to route")));
    }
    Ok(crate::nginx::nginx_conf(&backends, settings))
}
