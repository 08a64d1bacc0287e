//! The nginx router: an `nginx.conf`, computed by a pure function from the
//! AIPods that name the router, that routes `/ai.AI/` by the `x-upstream`
//! metadata through an allow-list. A value that names no AIPod gets a gRPC
//! NOT_FOUND from nginx itself; it can never make nginx connect anywhere
//! else (unlike the original `grpc_pass grpc://$http_x_upstream;`).
//! Backends with TLS are reached over `grpcs://`, verified against their
//! Secret's CA: each gets an internal location the request is rewritten
//! into, since nginx's TLS settings are per location, not per upstream.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use crate::{crd::AIPod, service};

/// How the router listens and how patient it is.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSettings {
    /// The gRPC (HTTP/2 cleartext) listen address.
    pub listen: String,
    /// The plain HTTP listen address of `/healthz`, for the router's probes.
    pub health_listen: String,
    /// `grpc_read_timeout` and `grpc_send_timeout`: the longest silence
    /// between two messages. Heartbeats (every second) keep long calls
    /// inside it.
    pub read_timeout: Duration,
    /// `client_body_timeout`: the longest pause while a client uploads.
    pub body_timeout: Duration,
    /// Where nginx writes its pid and temporary files (writable).
    pub temp_dir: String,
    /// Where the CA of each TLS backend is mounted, as `<dir>/<upstream>/ca.crt`.
    pub backend_ca_dir: String,
    /// `client_body_buffer_size`: nginx holds this much of each call's
    /// upload, and opens the client's HTTP/2 stream window as far; uploads
    /// through the router run at the pace this window allows.
    pub body_buffer: u64,
    /// `worker_shutdown_timeout`: how long old workers (after a reload or a
    /// graceful quit) may go on finishing their calls; `None`: nginx's
    /// default, no bound.
    pub shutdown_timeout: Option<Duration>,
}

/// The router's default `client_body_buffer_size`: 1 MiB measured 93–96%
/// of a direct 1 GiB upload on the benchmark machine (nginx's 16 KiB
/// default: 76–80%; 256 KiB: ~83%), at 1 MiB of nginx memory per call in
/// flight through the router.
pub const DEFAULT_BODY_BUFFER: u64 = 1 << 20;

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            health_listen: "0.0.0.0:8081".into(),
            read_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(3600),
            temp_dir: "/tmp".into(),
            backend_ca_dir: BACKEND_CA_DIR.into(),
            body_buffer: DEFAULT_BODY_BUFFER,
            shutdown_timeout: None,
        }
    }
}

/// Where the router pods mount the CAs of TLS backends.
pub const BACKEND_CA_DIR: &str = "/etc/aipod/backends";

/// nginx's `keepalive_time` for upstream connections (its default is 1h).
pub const UPSTREAM_KEEPALIVE_TIME: &str = "1m";

/// One routed model: its `x-upstream` value and where its Service listens.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    /// The `x-upstream` value.
    pub upstream: String,
    /// `host:port` of the runtime Service.
    pub address: String,
    /// With TLS: the Secret holding the CA (`ca.crt`) that verifies it.
    pub tls_secret: Option<String>,
    /// `host:port` of each ready pod, when calls go to pods directly
    /// (instead of `address`).
    pub endpoints: Vec<String>,
    /// Calls carrying `x-aipod-call-id` are hashed over `endpoints`, so a
    /// call id always reaches the same pod.
    pub call_affinity: bool,
}

impl Backend {
    /// A plaintext backend.
    pub fn plain(upstream: &str, address: &str) -> Self {
        Self {
            upstream: upstream.to_owned(),
            address: address.to_owned(),
            tls_secret: None,
            endpoints: Vec::new(),
            call_affinity: false,
        }
    }

    /// The name its certificate must carry: the address's host.
    fn server_name(&self) -> &str {
        self.address.rsplit_once(':').map_or(self.address.as_str(), |(host, _)| host)
    }
}

/// The backends of router `router` among `aipods` (all of them when `None`),
/// at their in-cluster Service addresses; `addresses` replaces them with the
/// `host:port` of each pod (or test server) of an upstream — hashed by call
/// id when the AIPod asks for `callAffinity`. When several AIPods claim one
/// upstream, the first in the slice wins (callers pass them oldest first).
pub fn backends(aipods: &[AIPod], router: Option<&str>, addresses: &BTreeMap<String, Vec<String>>) -> Vec<Backend> {
    let mut chosen: BTreeMap<String, Backend> = BTreeMap::new();
    for aipod in aipods {
        let named = aipod.spec.route.as_ref().and_then(|r| r.router.as_deref());
        if router.is_some_and(|r| named != Some(r)) {
            continue;
        }
        // What the API server admits always passes; anything else (a
        // manifest from a file) never reaches the config.
        if let Err(e) = aipod.check_names() {
            tracing::warn!(error = %e, "an AIPod with an invalid name is not routed");
            continue;
        }
        let upstream = aipod.upstream();
        let name = aipod.metadata.name.as_deref().unwrap_or_default();
        let ns = aipod.metadata.namespace.as_deref().unwrap_or("default");
        let address = format!("{name}.{ns}.svc.cluster.local:{}", service::port(aipod));
        let endpoints: Vec<String> =
            addresses.get(&upstream).map(|a| a.iter().filter(|e| is_address(e)).cloned().collect()).unwrap_or_default();
        let tls_secret = aipod.spec.tls.as_ref().map(|t| t.secret_name.clone());
        let call_affinity = aipod.spec.route.as_ref().is_some_and(|r| r.call_affinity);
        chosen.entry(upstream.clone()).or_insert(Backend { upstream, address, tls_secret, endpoints, call_affinity });
    }
    chosen.into_values().collect()
}

/// The nginx configuration for `backends`.
pub fn nginx_conf(backends: &[Backend], settings: &RouterSettings) -> String {
    let secs = |d: Duration| format!("{}s", d.as_secs().max(1));
    let tmp = settings.temp_dir.trim_end_matches('/');
    let mut c = String::new();
    let _ = writeln!(c, "# Generated by aipod-operator; do not edit. Routes /ai.AI/ by the x-upstream metadata.");
    let _ = writeln!(c, "worker_processes auto;\npid {tmp}/nginx.pid;\nerror_log stderr warn;");
    if let Some(bound) = settings.shutdown_timeout {
        // Old workers finish the calls they carry, for at most this long.
        let _ = writeln!(c, "worker_shutdown_timeout {};", secs(bound));
    }
    let _ = writeln!(c);
    let _ = writeln!(c, "events {{\n    worker_connections 4096;\n}}\n");
    let _ = writeln!(c, "http {{");
    let _ = writeln!(c, "    access_log off;");
    for (what, dir) in [
        ("client_body", "client_body"),
        ("proxy", "proxy"),
        ("fastcgi", "fastcgi"),
        ("uwsgi", "uwsgi"),
        ("scgi", "scgi"),
    ] {
        let _ = writeln!(c, "    {what}_temp_path {tmp}/nginx-{dir};");
    }
    // nginx's map hash must hold the longest key in one bucket (a 63-byte
    // upstream overflows the default 64-byte bucket and nginx refuses the
    // whole config), and every key within its size.
    let longest = backends.iter().map(|b| b.upstream.len().max(tls_location(b).len())).max().unwrap_or(0);
    let _ = writeln!(c, "    map_hash_bucket_size {};", (longest + 32).next_power_of_two().max(64));
    let _ = writeln!(c, "    map_hash_max_size {};", (backends.len() * 4).next_power_of_two().max(2048));
    let _ = writeln!(c, "\n    # The allow-list: only these x-upstream values reach a backend.");
    let _ = writeln!(c, "    map $http_x_upstream $aipod_backend {{\n        default \"\";");
    for b in backends {
        let _ = writeln!(c, "        \"{}\" {};", b.upstream, upstream_name(&b.upstream));
    }
    let _ = writeln!(c, "    }}\n");
    let tls: Vec<&Backend> = backends.iter().filter(|b| b.tls_secret.is_some()).collect();
    if !tls.is_empty() {
        let _ = writeln!(c, "    # TLS backends: rewritten into their own location (TLS settings are per location).");
        let _ = writeln!(c, "    map $http_x_upstream $aipod_tls_location {{\n        default \"\";");
        for b in &tls {
            let _ = writeln!(c, "        \"{}\" {};", b.upstream, tls_location(b));
        }
        let _ = writeln!(c, "    }}\n");
    }
    for b in backends {
        let _ = writeln!(c, "    upstream {} {{", upstream_name(&b.upstream));
        if b.endpoints.is_empty() {
            let _ = writeln!(c, "        server {};", b.address);
        } else {
            if b.call_affinity {
                // A call id always reaches the same pod (a retained call
                // lives in one); calls without one are spread round robin.
                let _ = writeln!(c, "        hash $http_x_aipod_call_id consistent;");
            }
            for e in &b.endpoints {
                let _ = writeln!(c, "        server {e};");
            }
        }
        // A pooled connection carries calls for at most a minute (the call
        // on it finishes first): new connections reach pods that a rollout
        // or a scale-up added, through the Service's balancing.
        let _ = writeln!(c, "        keepalive 32;\n        keepalive_time {UPSTREAM_KEEPALIVE_TIME};\n    }}\n");
    }
    let _ = writeln!(c, "    server {{");
    let _ = writeln!(c, "        listen {} http2;", settings.listen);
    let _ = writeln!(c, "        client_max_body_size 0;");
    // The HTTP/2 stream window nginx gives an upload: the router's pace.
    let _ = writeln!(c, "        client_body_buffer_size {}k;", settings.body_buffer.div_ceil(1024).max(1));
    let _ = writeln!(c, "        client_body_timeout {};", secs(settings.body_timeout));
    let _ = writeln!(c, "        grpc_read_timeout {};", secs(settings.read_timeout));
    let _ = writeln!(c, "        grpc_send_timeout {};", secs(settings.read_timeout));
    let _ = writeln!(c, "        grpc_socket_keepalive on;");
    let _ = writeln!(c, "        location /ai.AI/ {{");
    let _ = writeln!(c, "            error_page 418 = @unknown_upstream;");
    let _ = writeln!(c, "            error_page 502 503 504 = @backend_unavailable;");
    let _ = writeln!(c, "            if ($aipod_backend = \"\") {{\n                return 418;\n            }}");
    if !tls.is_empty() {
        let _ = writeln!(
            c,
            "            if ($aipod_tls_location != \"\") {{\n                rewrite ^ $aipod_tls_location$uri last;\n            }}"
        );
    }
    let _ = writeln!(c, "            grpc_pass grpc://$aipod_backend;");
    let _ = writeln!(c, "        }}\n");
    let ca_dir = settings.backend_ca_dir.trim_end_matches('/');
    for b in &tls {
        let location = tls_location(b);
        let _ = writeln!(c, "        location {location}/ {{");
        let _ = writeln!(c, "            internal;");
        let _ = writeln!(c, "            error_page 502 503 504 = @backend_unavailable;");
        let _ = writeln!(c, "            rewrite ^{location}(/.*)$ $1 break;");
        let _ = writeln!(c, "            grpc_pass grpcs://{};", upstream_name(&b.upstream));
        let _ = writeln!(c, "            grpc_ssl_verify on;");
        let _ = writeln!(c, "            grpc_ssl_trusted_certificate {ca_dir}/{}/ca.crt;", b.upstream);
        let _ = writeln!(c, "            grpc_ssl_name {};", b.server_name());
        let _ = writeln!(c, "            grpc_ssl_server_name on;");
        let _ = writeln!(c, "            grpc_ssl_session_reuse on;");
        let _ = writeln!(c, "        }}\n");
    }
    let _ = writeln!(c, "        location @unknown_upstream {{");
    let _ = writeln!(c, "            default_type application/grpc;");
    let _ = writeln!(c, "            add_header grpc-status 5 always;");
    let _ = writeln!(c, "            add_header grpc-message \"no model is routed for this x-upstream value\" always;");
    let _ = writeln!(c, "            return 200 \"\";");
    let _ = writeln!(c, "        }}\n");
    // nginx's own 502/504 page is HTML, which gRPC clients report as a
    // protocol error; a backend with no ready pod (a restart, a rollout) is
    // UNAVAILABLE, which clients retry.
    let _ = writeln!(c, "        location @backend_unavailable {{");
    let _ = writeln!(c, "            default_type application/grpc;");
    let _ = writeln!(c, "            add_header grpc-status 14 always;");
    let _ = writeln!(
        c,
        "            add_header grpc-message \"the router could not reach a ready backend for this x-upstream; retry later\" always;"
    );
    let _ = writeln!(c, "            return 200 \"\";");
    let _ = writeln!(c, "        }}\n");
    let _ = writeln!(c, "        location / {{");
    let _ = writeln!(c, "            default_type application/grpc;");
    let _ = writeln!(c, "            add_header grpc-status 12 always;");
    let _ = writeln!(c, "            add_header grpc-message \"this router serves only ai.AI\" always;");
    let _ = writeln!(c, "            return 200 \"\";");
    let _ = writeln!(c, "        }}");
    let _ = writeln!(c, "    }}\n");
    let _ = writeln!(c, "    server {{");
    let _ = writeln!(c, "        listen {};", settings.health_listen);
    let _ = writeln!(c, "        location = /healthz {{\n            return 200 \"ok\\n\";\n        }}");
    let _ = writeln!(c, "    }}");
    let _ = writeln!(c, "}}");
    c
}

impl RouterSettings {
    /// Checks every value that is written into `nginx.conf` verbatim, as
    /// manifest values are: addresses are `host:port`, the temp dir an
    /// absolute path of plain characters — nothing can end a directive or
    /// open a block.
    pub fn check(&self) -> Result<(), String> {
        for (flag, value) in [("--listen", &self.listen), ("--health-listen", &self.health_listen)] {
            if !is_address(value) {
                return Err(format!("{flag} {value:?}: expected HOST:PORT (or [IPv6]:PORT)"));
            }
        }
        for (flag, dir) in [("--temp-dir", &self.temp_dir), ("the backend CA directory", &self.backend_ca_dir)] {
            let plain = dir.starts_with('/')
                && dir.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '-' | '_'));
            if !plain {
                return Err(format!("{flag} {dir:?}: expected an absolute path of letters, digits and / . - _"));
            }
        }
        Ok(())
    }
}

/// Whether `address` is a `host:port` (or `[v6]:port`) safe to write into
/// the config: nothing but the characters addresses use.
pub fn is_address(address: &str) -> bool {
    let Some((host, port)) = address.rsplit_once(':') else { return false };
    !host.is_empty()
        && port.parse::<u16>().is_ok()
        && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

/// The internal location a TLS backend's calls are rewritten into.
fn tls_location(b: &Backend) -> String {
    format!("/_aipod_tls/{}", upstream_name(&b.upstream))
}

/// The nginx upstream block name of an `x-upstream` value (a DNS label, so
/// `-` → `_` cannot collide).
fn upstream_name(upstream: &str) -> String {
    format!("aipod_{}", upstream.replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aipod(name: &str, ns: &str, upstream: Option<&str>, router: Option<&str>) -> AIPod {
        let mut a = crate::fixtures::aipod(name).namespace(ns);
        if let Some(u) = upstream {
            a = a.upstream(u);
        }
        if let Some(r) = router {
            a = a.router(r);
        }
        a.build()
    }

    #[test]
    fn settings_that_would_inject_into_the_config_are_refused() {
        assert_eq!(RouterSettings::default().check(), Ok(()));
        let bad = [
            RouterSettings { listen: "0.0.0.0:8080; include /etc/passwd".into(), ..RouterSettings::default() },
            RouterSettings { listen: "8080".into(), ..RouterSettings::default() },
            RouterSettings { health_listen: "[::]:80 }".into(), ..RouterSettings::default() },
            RouterSettings { temp_dir: "/tmp;\n}".into(), ..RouterSettings::default() },
            RouterSettings { temp_dir: "relative".into(), ..RouterSettings::default() },
            RouterSettings { temp_dir: "/tmp/a b".into(), ..RouterSettings::default() },
        ];
        for settings in bad {
            let e = settings.check().expect_err("refused");
            assert!(e.starts_with("--"), "names the flag: {e}");
        }
        assert!(is_address("[fd00::1]:50051") && is_address("m.ml.svc:50051"));
        assert!(!is_address("m:50051;") && !is_address("m:99999") && !is_address(":1"));
    }

    #[test]
    fn backends_are_the_aipods_naming_the_router_first_claim_wins() {
        let pods = [
            aipod("a", "ml", None, Some("edge")),
            aipod("b", "ml", Some("bee"), Some("edge")),
            aipod("c", "other", None, Some("internal")),
            aipod("dup", "ml", Some("bee"), Some("edge")),
        ];
        let b = backends(&pods, Some("edge"), &BTreeMap::new());
        assert_eq!(
            b,
            [
                Backend::plain("a", "a.ml.svc.cluster.local:50051"),
                Backend::plain("bee", "b.ml.svc.cluster.local:50051"),
            ]
        );
        let overrides = BTreeMap::from([("a".to_owned(), vec!["127.0.0.1:9000".to_owned()])]);
        assert_eq!(backends(&pods, None, &overrides)[0].endpoints, ["127.0.0.1:9000"]);
        assert_eq!(backends(&pods, None, &overrides).len(), 3, "no router filter: every upstream");
    }

    #[test]
    fn config_routes_only_allow_listed_upstreams() {
        let conf = nginx_conf(
            &[Backend::plain("my-model", "10.0.0.1:50051")],
            &RouterSettings { read_timeout: Duration::from_secs(2), ..Default::default() },
        );
        assert!(conf.contains("map $http_x_upstream $aipod_backend {"));
        assert!(conf.contains("\"my-model\" aipod_my_model;"));
        assert!(conf.contains("upstream aipod_my_model {\n        server 10.0.0.1:50051;\n        keepalive 32;"));
        assert!(conf.contains("grpc_pass grpc://$aipod_backend;"));
        assert!(conf.contains("client_body_buffer_size 1024k;"), "uploads at the pace a 1 MiB window allows");
        assert!(!conf.contains("grpc://$http_x_upstream"), "never proxy to a client-chosen address");
        assert!(conf.contains("add_header grpc-status 5 always;"), "unknown upstreams get NOT_FOUND");
        assert!(conf.contains("error_page 502 503 504 = @backend_unavailable;"));
        assert!(conf.contains("add_header grpc-status 14 always;"), "an unreachable backend is UNAVAILABLE");
        assert!(conf.contains("grpc_read_timeout 2s;") && conf.contains("grpc_send_timeout 2s;"));
        assert!(conf.contains("client_max_body_size 0;"));
        assert!(conf.contains("client_body_timeout 3600s;"));
        assert!(conf.contains("grpc_socket_keepalive on;"));
        assert!(conf.contains("location = /healthz"));
        assert!(conf.contains("listen 0.0.0.0:8080 http2;"));
        assert!(!conf.contains("grpcs://") && !conf.contains("$aipod_tls_location"), "no TLS backend, no TLS config");
    }

    #[test]
    fn tls_backends_get_a_verifying_location_of_their_own() {
        let secure =
            Backend { tls_secret: Some("m-tls".into()), ..Backend::plain("secure", "m.ml.svc.cluster.local:50051") };
        let conf = nginx_conf(&[Backend::plain("plain", "p.ml.svc:50051"), secure], &RouterSettings::default());
        assert!(conf.contains("\"secure\" /_aipod_tls/aipod_secure;"));
        assert!(!conf.contains("\"plain\" /_aipod_tls"), "plaintext backends stay on grpc://");
        assert!(conf.contains("rewrite ^ $aipod_tls_location$uri last;"));
        assert!(conf.contains("location /_aipod_tls/aipod_secure/ {\n            internal;"));
        assert!(conf.contains("rewrite ^/_aipod_tls/aipod_secure(/.*)$ $1 break;"));
        assert!(conf.contains("grpc_pass grpcs://aipod_secure;"));
        assert!(conf.contains("grpc_ssl_verify on;"));
        assert!(conf.contains("grpc_ssl_trusted_certificate /etc/aipod/backends/secure/ca.crt;"));
        assert!(conf.contains("grpc_ssl_name m.ml.svc.cluster.local;"));
    }

    /// Found by fuzzing (`bench/fuzz`, target `router_config`): a namespace
    /// (or name, or upstream) outside the DNS alphabet went into the config.
    #[test]
    fn names_outside_the_dns_alphabet_are_never_routed() {
        for (name, ns, upstream) in [("a", "n/", "up"), ("a", "ns", "x;\n}"), ("a\"b", "ns", "up"), ("A", "ns", "up")] {
            let pods = [crate::fixtures::aipod(name).namespace(ns).upstream(upstream).router("r").build()];
            assert!(backends(&pods, Some("r"), &BTreeMap::new()).is_empty(), "{name:?} {ns:?} {upstream:?}");
        }
        let pods = [crate::fixtures::aipod("a").namespace("ns").upstream("up").router("r").build()];
        assert_eq!(backends(&pods, Some("r"), &BTreeMap::new()).len(), 1);
    }

    #[test]
    fn call_affinity_hashes_call_ids_over_the_ready_pods() {
        let pods = [
            crate::fixtures::aipod("sticky").namespace("ns").upstream("sticky").router("r").call_affinity().build(),
            crate::fixtures::aipod("spread").namespace("ns").upstream("spread").router("r").build(),
        ];
        let endpoints = BTreeMap::from([
            ("sticky".to_owned(), vec!["10.0.0.7:50051".to_owned(), "[fd00::8]:50051".to_owned(), "x;y:1".to_owned()]),
            ("spread".to_owned(), vec![]),
        ]);
        let found = backends(&pods, Some("r"), &endpoints);
        let sticky = found.iter().find(|b| b.upstream == "sticky").expect("sticky");
        assert_eq!(sticky.endpoints, ["10.0.0.7:50051", "[fd00::8]:50051"], "nothing but addresses reach the config");
        let conf = nginx_conf(&found, &RouterSettings::default());
        assert!(conf.contains(
            "upstream aipod_sticky {\n        hash $http_x_aipod_call_id consistent;\n        server 10.0.0.7:50051;\n        server [fd00::8]:50051;\n        keepalive 32;"
        ), "{conf}");
        assert!(conf.contains(
            "upstream aipod_spread {\n        server spread.ns.svc.cluster.local:50051;\n        keepalive 32;"
        ));
        assert_eq!(conf.matches("hash $http_x_aipod_call_id").count(), 1, "only the AIPod that asked");
    }

    #[test]
    fn an_empty_router_still_answers() {
        let conf = nginx_conf(&[], &RouterSettings::default());
        assert!(conf.contains("default \"\";"));
        assert!(!conf.contains("upstream aipod_"));
    }
}
