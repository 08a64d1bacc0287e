//! The Secrets an AIPod's runtime reads — its TLS certificate, the client
//! CA of mutual TLS, the token file — as read-only volumes, their mounts,
//! and the environment that points the runtime at them. Kubernetes updates
//! mounted Secrets in place; the runtime re-reads them, so a rotation needs
//! no restart.

use k8s_openapi::api::core::v1::{EnvVar, KeyToPath, SecretVolumeSource, Volume, VolumeMount};

use crate::crd::AIPod;

/// Where the TLS Secret is mounted.
pub const TLS_DIR: &str = "/etc/aipod/tls";
/// Where the client CA Secret is mounted.
pub const CLIENT_CA_DIR: &str = "/etc/aipod/client-ca";
/// Where the token Secret is mounted.
pub const AUTH_DIR: &str = "/etc/aipod/auth";
/// The token Secret's default key.
pub const DEFAULT_TOKEN_KEY: &str = "tokens";

/// One Secret the runtime reads.
struct Mounted {
    volume: &'static str,
    secret: String,
    dir: &'static str,
    /// The keys mounted (others in the Secret stay out of the pod).
    keys: Vec<String>,
    /// `AIPOD_*` variable → file name in `dir`.
    env: Vec<(&'static str, String)>,
}

fn mounted(aipod: &AIPod) -> Vec<Mounted> {
    let spec = &aipod.spec;
    let mut all = Vec::new();
    if let Some(tls) = &spec.tls {
        all.push(Mounted {
            volume: "tls",
            secret: tls.secret_name.clone(),
            dir: TLS_DIR,
            keys: vec!["tls.crt".into(), "tls.key".into()],
            env: vec![("AIPOD_TLS_CERT", "tls.crt".into()), ("AIPOD_TLS_KEY", "tls.key".into())],
        });
        if let Some(ca) = &tls.client_ca_secret_name {
            all.push(Mounted {
                volume: "client-ca",
                secret: ca.clone(),
                dir: CLIENT_CA_DIR,
                keys: vec!["ca.crt".into()],
                env: vec![("AIPOD_TLS_CLIENT_CA", "ca.crt".into())],
            });
        }
    }
    if let Some(auth) = &spec.auth {
        let key = auth.key.clone().unwrap_or_else(|| DEFAULT_TOKEN_KEY.to_owned());
        all.push(Mounted {
            volume: "auth",
            secret: auth.token_secret_name.clone(),
            dir: AUTH_DIR,
            keys: vec![key.clone()],
            env: vec![("AIPOD_AUTH_TOKEN_FILE", key)],
        });
    }
    all
}

/// The Secret volumes of `aipod`'s pods.
pub fn volumes(aipod: &AIPod) -> Vec<Volume> {
    mounted(aipod)
        .into_iter()
        .map(|m| Volume {
            name: m.volume.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(m.secret),
                items: Some(m.keys.iter().map(|k| KeyToPath { key: k.clone(), path: k.clone(), mode: None }).collect()),
                // Readable by the runtime's user only (fsGroup owns them).
                default_mode: Some(0o440),
                optional: Some(false),
            }),
            ..Default::default()
        })
        .collect()
}

/// Their read-only mounts in the runtime container.
pub fn volume_mounts(aipod: &AIPod) -> Vec<VolumeMount> {
    mounted(aipod)
        .into_iter()
        .map(|m| VolumeMount {
            name: m.volume.to_owned(),
            mount_path: m.dir.to_owned(),
            read_only: Some(true),
            ..Default::default()
        })
        .collect()
}

/// The variables that name the mounted files to the runtime.
pub fn env(aipod: &AIPod) -> Vec<EnvVar> {
    mounted(aipod)
        .into_iter()
        .flat_map(|m| {
            m.env.into_iter().map(move |(name, file)| EnvVar {
                name: name.to_owned(),
                value: Some(format!("{}/{file}", m.dir)),
                ..Default::default()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fixtures;

    #[test]
    fn each_secret_is_a_read_only_volume_named_to_the_runtime() {
        let aipod = fixtures::aipod("m")
            .spec(json!({
                "tls": {"secretName": "m-tls", "clientCASecretName": "clients"},
                "auth": {"tokenSecretName": "m-tokens", "key": "list"},
            }))
            .stored();
        let names: Vec<_> = volumes(&aipod).iter().map(|v| v.name.clone()).collect();
        assert_eq!(names, ["tls", "client-ca", "auth"]);
        let tls = &volumes(&aipod)[0];
        let secret = tls.secret.as_ref().expect("secret");
        assert_eq!(secret.secret_name.as_deref(), Some("m-tls"));
        assert_eq!(secret.items.as_ref().map(Vec::len), Some(2), "only the files the runtime needs");
        assert!(volume_mounts(&aipod).iter().all(|m| m.read_only == Some(true)));
        let env: Vec<_> = env(&aipod).into_iter().map(|e| (e.name, e.value.unwrap_or_default())).collect();
        assert_eq!(
            env,
            [
                ("AIPOD_TLS_CERT".to_owned(), "/etc/aipod/tls/tls.crt".to_owned()),
                ("AIPOD_TLS_KEY".to_owned(), "/etc/aipod/tls/tls.key".to_owned()),
                ("AIPOD_TLS_CLIENT_CA".to_owned(), "/etc/aipod/client-ca/ca.crt".to_owned()),
                ("AIPOD_AUTH_TOKEN_FILE".to_owned(), "/etc/aipod/auth/list".to_owned()),
            ]
        );
        assert!(volumes(&fixtures::aipod("m").stored()).is_empty(), "none without tls or auth");
    }
}
