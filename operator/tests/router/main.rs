//! The nginx router end to end: real nginx running the config
//! `router-config` renders, real `aipod-runtime` processes behind it, and the
//! real aipod client in front.

#![allow(unreachable_pub, reason = "test helpers")]
#![expect(clippy::print_stderr, reason = "tests print their timings")]

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aipod::Client;
use aipod_operator::{nginx::RouterSettings, render};
use aipod_testkit::{Mixed, RuntimeProcess};
use serde_json::Value;
use sha2::{Digest, Sha256};

struct Proc {
    child: Child,
    addr: String,
}

impl Drop for Proc {
    /// SIGTERM first: nginx's master then stops its workers, and the runtime
    /// drains; SIGKILL only if that takes too long.
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-s", "TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime(args: &[&str]) -> RuntimeProcess {
    RuntimeProcess::start(args)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nginx is not installed: `apt-get install nginx-light` (.ci/test does)")
}

/// Writes AIPod manifests for `upstreams`, renders the router config with
/// each pointed at its runtime, and starts nginx on it.
fn nginx(dir: &Path, backends: &[(&str, &RuntimeProcess)], read_timeout: Duration) -> Proc {
    let backends: Vec<Routed<'_>> =
        backends.iter().map(|(upstream, p)| Routed { upstream, address: p.addr.clone(), spec: "" }).collect();
    nginx_for(dir, &backends, read_timeout, None)
}

/// A backend as the router sees it: the AIPod's upstream, where its
/// runtime listens, and extra spec lines (YAML under `spec:`).
struct Routed<'a> {
    upstream: &'a str,
    address: String,
    spec: &'a str,
}

/// Like [`nginx`], with manifests carrying `spec` lines and the TLS
/// backends' CAs under `ca_dir` (`<upstream>/ca.crt`).
fn nginx_for(dir: &Path, backends: &[Routed<'_>], read_timeout: Duration, ca_dir: Option<&Path>) -> Proc {
    let temp = dir.join("nginx");
    std::fs::create_dir_all(&temp).expect("nginx dir");
    let settings = RouterSettings {
        listen: format!("127.0.0.1:{}", free_port()),
        health_listen: format!("127.0.0.1:{}", free_port()),
        read_timeout,
        temp_dir: temp.to_str().expect("utf-8").to_owned(),
        backend_ca_dir: ca_dir
            .map_or_else(|| RouterSettings::default().backend_ca_dir, |d| d.to_str().expect("utf-8").to_owned()),
        ..RouterSettings::default()
    };
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, router_conf(dir, backends, &settings)).expect("write conf");
    start_nginx(&conf_path, &temp, &settings.listen)
}

/// The config `router-config` renders for `backends` (manifests written
/// to `dir`).
fn router_conf(dir: &Path, backends: &[Routed<'_>], settings: &RouterSettings) -> String {
    let mut files = Vec::new();
    let mut overrides = Vec::new();
    for b in backends {
        let upstream = b.upstream;
        let file = dir.join(format!("{upstream}.yaml"));
        let manifest = format!(
            "apiVersion: aipod.io/v1alpha1\nkind: AIPod\nmetadata:\n  name: {upstream}\nspec:\n  image: img\n  route:\n    router: edge\n{}",
            b.spec
        );
        std::fs::write(&file, manifest).expect("manifest");
        files.push(file);
        overrides.push(format!("{upstream}={}", b.address));
    }
    render::router_config_files(&files, Some("edge"), &overrides, settings).expect("router config")
}

/// nginx on `conf_path`, once it listens on `listen`.
fn start_nginx(conf_path: &Path, temp: &Path, listen: &str) -> Proc {
    let child = Command::new(nginx_binary())
        .arg("-c")
        .arg(conf_path)
        .arg("-p")
        .arg(temp)
        .args(["-g", "daemon off; user root;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let addr = listen.to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    Proc { child, addr }
}

async fn client(router: &Proc, upstream: &str) -> Client {
    Client::connect(&router.addr).await.expect("client").with_upstream(upstream)
}

fn no_retry() -> aipod::client::RetryPolicy {
    aipod::client::RetryPolicy::none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_upstream_picks_the_backend_and_nothing_else_gets_through() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = runtime(&["--model", "served-by-a=builtin:demo"]);
    let b = runtime(&["--model", "served-by-b=builtin:demo"]);
    let router = nginx(dir.path(), &[("a", &a), ("b", &b)], Duration::from_secs(60));

    for (upstream, version) in [("a", "served-by-a"), ("b", "served-by-b")] {
        let d = client(&router, upstream).await.describe().await.expect("describe through nginx");
        assert_eq!(d.versions[0].version, version, "x-upstream {upstream} reached the wrong runtime");
        let out = client(&router, upstream)
            .await
            .call("echo")
            .kwarg("via", upstream)
            .retry(no_retry())
            .send()
            .await
            .expect("call");
        assert_eq!(out.json::<Value>().expect("json")["kwargs"]["via"], upstream);
    }
    for hostile in ["nope", b.addr.as_str(), "b.default.svc.cluster.local:50051"] {
        let err =
            client(&router, hostile).await.call("echo").retry(no_retry()).send().await.expect_err("must not route");
        assert_eq!(err.code, tonic::Code::NotFound, "{hostile}: {err}");
        assert!(err.message.contains("x-upstream"), "the message names the header: {}", err.message);
    }
    let err = Client::connect(&router.addr)
        .await
        .expect("client")
        .call("echo")
        .retry(no_retry())
        .send()
        .await
        .expect_err("no header");
    assert_eq!(err.code, tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_is_down_is_unavailable_not_a_protocol_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let backend = runtime(&[]);
    let router = nginx(dir.path(), &[("gone", &backend)], Duration::from_secs(60));
    drop(backend);
    let err = client(&router, "gone").await.call("echo").retry(no_retry()).send().await.expect_err("backend is down");
    assert_eq!(err.code, tonic::Code::Unavailable, "{err}");
    assert!(err.message.contains("ready backend"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_carry_a_20_second_call_through_a_2_second_proxy_timeout() {
    let dir = tempfile::tempdir().expect("tmp");
    let beating = runtime(&["--heartbeat", "1s"]);
    let silent = runtime(&["--heartbeat", "0"]);
    let router = nginx(dir.path(), &[("beating", &beating), ("silent", &silent)], Duration::from_secs(2));

    let call = |upstream: &'static str| {
        let router_addr = router.addr.clone();
        async move {
            let c = Client::connect(&router_addr).await.expect("client").with_upstream(upstream);
            c.call("sleep").kwarg("seconds", 20).retry(no_retry()).send().await
        }
    };
    let started = Instant::now();
    let (with, without) = tokio::join!(call("beating"), call("silent"));
    let with = with.expect("heartbeats keep the call alive through nginx");
    assert_eq!(with.json::<Value>().expect("json")["slept"], 20.0);
    assert!(with.heartbeats >= 19, "{} heartbeats", with.heartbeats);
    assert!(started.elapsed() >= Duration::from_secs(20));
    let without = without.expect_err("without heartbeats nginx cuts the call");
    assert!(
        matches!(without.code, tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::Unknown),
        "proxy timeout surfaces as a transport failure: {without}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_upload_through_nginx_hashes_right() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = runtime(&[]);
    let router = nginx(dir.path(), &[("a", &a)], Duration::from_secs(60));
    let size = 256u64 << 20;
    let path = dir.path().join("payload.bin");
    std::io::copy(&mut Mixed::new(size), &mut std::fs::File::create(&path).expect("create")).expect("write payload");
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(&path).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let expected: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let out = client(&router, "a").await.call("sha256").file(&path).retry(no_retry()).send().await.expect("upload");
    assert_eq!(out.json::<Value>().expect("json"), serde_json::json!({"sha256": expected, "size": size}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_backend_lets_a_running_call_finish_through_nginx() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = runtime(&["--heartbeat", "200ms"]);
    let router = nginx(dir.path(), &[("a", &a)], Duration::from_secs(60));
    let (running_tx, running_rx) = tokio::sync::oneshot::channel::<()>();
    let running_tx = std::sync::Mutex::new(Some(running_tx));
    let c = client(&router, "a").await;
    let call = tokio::spawn(async move {
        c.call("sleep")
            .kwarg("seconds", 3)
            .retry(no_retry())
            .on_progress(move |p| {
                if let aipod::client::Progress::Heartbeat(h) = p
                    && h.phase == aipod::proto::Phase::Running as i32
                    && let Some(tx) = running_tx.lock().expect("lock").take()
                {
                    let _ = tx.send(());
                }
            })
            .send()
            .await
    });
    running_rx.await.expect("the call runs");
    a.signal("TERM");
    let out = call.await.expect("join").expect("the running call completes despite SIGTERM");
    assert_eq!(out.json::<Value>().expect("json")["slept"], 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_passes_through_nginx_to_the_model() {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
    let dir = tempfile::tempdir().expect("tmp");
    let worker = concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime/tests/workers/model.py");
    let backend = runtime(&["--model", &format!("exec:python3 {worker}")]);
    let router = nginx(dir.path(), &[("traced", &backend)], Duration::from_secs(60));
    let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id");
    let span = SpanId::from_hex("00f067aa0ba902b7").expect("span id");
    let parent = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        trace,
        span,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
    let out = client(&router, "traced")
        .await
        .call("traced")
        .trace_parent(parent)
        .send() // retried while the Python worker starts
        .await
        .expect("call through nginx");
    // No tracer provider in this process: the client's span is the parent's
    // context, and the runtime (not tracing) hands the caller's to the model.
    assert_eq!(
        out.json::<Value>().expect("json")["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "nginx must pass traceparent through"
    );
}

/// A CA and a server certificate it signed for `localhost` and the
/// `secure` AIPod's Service name (the name the router verifies, whichever
/// pod address it connects to), made with openssl.
fn pki(dir: &Path) {
    let run = |args: &[&str]| {
        let done = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
        assert!(done.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&done.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    run(&[&["req", "-x509"][..], &ec, &["-days", "2", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test CA"]]
        .concat());
    run(&[&["req"][..], &ec, &["-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=localhost"]].concat());
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=DNS:localhost,DNS:secure.default.svc.cluster.local\nbasicConstraints=CA:FALSE\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "tls.crt",
        "-extfile",
        "ext",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_backend_is_verified_and_the_token_passes_through() {
    let dir = tempfile::tempdir().expect("tmp");
    pki(dir.path());
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "router-test-token-0123456789\n").expect("tokens");
    let path = |f: &str| dir.path().join(f).to_str().expect("utf-8").to_owned();
    let secure =
        runtime(&["--tls-cert", &path("tls.crt"), "--tls-key", &path("tls.key"), "--auth-token-file", &path("tokens")]);
    let plain = runtime(&[]);
    // Where the router pod would mount the Secret's ca.crt.
    let cas = dir.path().join("cas");
    std::fs::create_dir_all(cas.join("secure")).expect("ca dir");
    std::fs::copy(dir.path().join("ca.crt"), cas.join("secure/ca.crt")).expect("ca");
    let port = secure.addr.rsplit_once(':').expect("port").1.to_owned();
    let backends = [
        Routed {
            upstream: "secure",
            address: format!("localhost:{port}"),
            spec: "  tls:\n    secretName: secure-tls\n  auth:\n    tokenSecretName: secure-tokens\n",
        },
        Routed { upstream: "plain", address: plain.addr.clone(), spec: "" },
    ];
    let router = nginx_for(dir.path(), &backends, Duration::from_secs(60), Some(&cas));

    let with_token = client(&router, "secure").await.with_token("router-test-token-0123456789").expect("token");
    let out = with_token
        .call("sha256")
        .payload(aipod::client::Payload::Bytes(b"abc".to_vec().into()))
        .send()
        .await
        .expect("call over TLS through nginx");
    assert_eq!(out.json::<Value>().expect("json")["size"], 3);
    let err = client(&router, "secure").await.call("echo").retry(no_retry()).send().await.expect_err("no token");
    assert_eq!(err.code, tonic::Code::Unauthenticated, "the backend, over TLS, answered: {err}");
    // Plaintext backends beside it are unchanged.
    client(&router, "plain").await.call("echo").retry(no_retry()).send().await.expect("plain backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_backend_with_a_certificate_from_another_ca_is_not_reached() {
    let dir = tempfile::tempdir().expect("tmp");
    pki(dir.path());
    let path = |f: &str| dir.path().join(f).to_str().expect("utf-8").to_owned();
    let secure = runtime(&["--tls-cert", &path("tls.crt"), "--tls-key", &path("tls.key")]);
    // The router trusts a different CA than the one that signed the backend.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).expect("dir");
    pki(&other);
    let cas = dir.path().join("cas");
    std::fs::create_dir_all(cas.join("secure")).expect("ca dir");
    std::fs::copy(other.join("ca.crt"), cas.join("secure/ca.crt")).expect("ca");
    let port = secure.addr.rsplit_once(':').expect("port").1.to_owned();
    let backends = [Routed {
        upstream: "secure",
        address: format!("localhost:{port}"),
        spec: "  tls:\n    secretName: secure-tls\n",
    }];
    let router = nginx_for(dir.path(), &backends, Duration::from_secs(60), Some(&cas));
    let err = client(&router, "secure").await.call("echo").retry(no_retry()).send().await.expect_err("unverified");
    assert_eq!(err.code, tonic::Code::Unavailable, "{err}");
}

/// A loopback TCP relay in front of `target` that can cut every connection
/// at once, as a restarting proxy or a dropped network would.
struct Relay {
    addr: String,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("addr").to_string();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = std::sync::Arc::clone(&conns);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock().expect("relay").push(conn);
            }
        });
        Self { addr, conns, accept }
    }

    /// Drops every connection (both sides see it close).
    fn cut(&self) {
        for conn in self.conns.lock().expect("relay").drain(..) {
            conn.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Without `callAffinity` a reattach lands on either replica (the call
/// fails about half the time with NOT_FOUND); six calls all succeeding by
/// chance is a 1-in-64 event. nginx's consistent hash places ids by the
/// replicas' addresses, which are fresh ports each run: six ids all on one
/// replica happen 1 run in 32, so calls go on (up to twelve) until both
/// replicas have held one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_call_reattaches_through_the_router_to_the_replica_that_holds_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let replicas = [runtime(&["--model", "replica-a=builtin:demo"]), runtime(&["--model", "replica-b=builtin:demo"])];
    let both = format!("{},{}", replicas[0].addr, replicas[1].addr);
    let backends = [Routed { upstream: "m", address: both, spec: "    callAffinity: true\n" }];
    let router = nginx_for(dir.path(), &backends, Duration::from_secs(60), None);

    // Calls without a call id are spread over both replicas, as before.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let d = client(&router, "m").await.describe().await.expect("describe through nginx");
        seen.insert(d.versions[0].version.clone());
    }
    assert_eq!(seen.len(), 2, "round robin without x-aipod-call-id: {seen:?}");

    let relay = Relay::start(router.addr.clone()).await;
    let through = Client::connect(&relay.addr).await.expect("client").with_upstream("m");
    let mut holders = std::collections::BTreeSet::new();
    for i in 0..12 {
        if i >= 6 && holders.len() == 2 {
            break;
        }
        let call_id = format!("router-affinity-call-{i:02}-0123456789");
        let call = through
            .call("sleep")
            .kwarg("seconds", 1.5)
            .call_id(call_id.clone())
            .retain(Duration::from_secs(60))
            .timeout(Duration::from_secs(60))
            .send();
        let cut = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            relay.cut();
        };
        let (out, ()) = tokio::join!(call, cut);
        let out = out.unwrap_or_else(|e| panic!("call {call_id} after the cut: {e}"));
        assert!(out.attempts >= 2, "the stream was cut and reattached: {} attempts", out.attempts);
        // Exactly one replica holds the call: the one the reattach reached.
        let mut holding = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            let direct = Client::connect(&r.addr).await.expect("direct");
            if direct.attach(&call_id).retain(Duration::from_millis(1)).send().await.is_ok() {
                holding.push(i);
            }
        }
        assert_eq!(holding.len(), 1, "{call_id} is held by exactly one replica: {holding:?}");
        holders.insert(holding[0]);
    }
    assert_eq!(holders.len(), 2, "call ids are hashed over both replicas");
}

// ---------------------------------------------------------------------------
// The router's reloader (`aipod-operator router-reloader`) beside real nginx.

/// `aipod-operator router-reloader` for the nginx of `dir` (its config and
/// pid file), serving on a free port; its address.
fn reloader(dir: &Path, quit_delay: &str) -> (Proc, std::net::SocketAddr) {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let child = Command::new(env!("CARGO_BIN_EXE_aipod-operator"))
        .arg("router-reloader")
        .arg("--config")
        .arg(dir.join("nginx.conf"))
        .arg("--pid-file")
        .arg(dir.join("nginx").join("nginx.pid"))
        .args(["--listen", &addr.to_string(), "--quit-delay", quit_delay])
        .stdin(Stdio::null())
        .spawn()
        .expect("start the reloader");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the reloader did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc { child, addr: addr.to_string() }, addr)
}

async fn reloader_status(addr: std::net::SocketAddr) -> aipod_operator::reloader::Status {
    let body = aipod_operator::pod_http::get(addr, "/status", Duration::from_secs(2)).await.expect("/status");
    serde_json::from_str(&body).expect("status JSON")
}

/// Replaces the config the way the kubelet swaps a ConfigMap volume: the
/// new file appears whole (a rename), never half-written.
fn swap_config(dir: &Path, conf: &str) {
    let next = dir.join("nginx.conf.next");
    std::fs::write(&next, conf).expect("write");
    std::fs::rename(&next, dir.join("nginx.conf")).expect("swap");
}

/// Waits up to `within` for the reloader to report `want` of the config
/// with `hash`.
async fn wait_status(
    addr: std::net::SocketAddr,
    within: Duration,
    want: impl Fn(&aipod_operator::reloader::Status) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let status = reloader_status(addr).await;
        if want(&status) {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "not within {within:?}: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_reloads_nginx_in_place_and_a_running_call_is_not_cut() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = runtime(&["--model", "served-by-a=builtin:demo", "--heartbeat", "200ms"]);
    let b = runtime(&["--model", "served-by-b=builtin:demo"]);
    let routed = |upstream, p: &RuntimeProcess| Routed { upstream, address: p.addr.clone(), spec: "" };
    let router = nginx_for(dir.path(), &[routed("a", &a)], Duration::from_secs(60), None);
    let (_reloader, status_addr) = reloader(dir.path(), "200ms");
    let conf = std::fs::read_to_string(dir.path().join("nginx.conf")).expect("conf");
    let first = aipod_operator::router::config_hash(&conf);
    wait_status(status_addr, Duration::from_secs(10), |s| s.loaded.as_deref() == Some(first.as_str())).await;

    // A call that outlives both reloads below.
    let c = client(&router, "a").await;
    let long = tokio::spawn(async move { c.call("sleep").kwarg("seconds", 6).retry(no_retry()).send().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gone = client(&router, "b").await.describe().await;
    assert!(gone.is_err(), "b is not routed yet");

    // A second AIPod on the router: the new config is loaded in place.
    let settings_text = conf.clone();
    let listen = router.addr.clone();
    let health = settings_text
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("listen "))
        .map(|l| l.trim_end_matches(';').to_owned())
        .find(|l| !l.contains("http2"))
        .expect("health listen");
    let settings = RouterSettings {
        listen,
        health_listen: health,
        temp_dir: dir.path().join("nginx").to_str().expect("utf-8").to_owned(),
        ..RouterSettings::default()
    };
    let both = router_conf(dir.path(), &[routed("a", &a), routed("b", &b)], &settings);
    let second = aipod_operator::router::config_hash(&both);
    swap_config(dir.path(), &both);
    let took = wait_status(status_addr, Duration::from_secs(5), |s| s.loaded.as_deref() == Some(second.as_str())).await;
    eprintln!("config change loaded by nginx {took:?} after the swap");
    let described = client(&router, "b").await.describe().await.expect("b is routed after the reload");
    assert_eq!(described.versions[0].version, "served-by-b");

    // A config nginx cannot load: refused, reported, and the old one serves.
    let broken = format!("{both}\nthis is not nginx;\n");
    let bad = aipod_operator::router::config_hash(&broken);
    swap_config(dir.path(), &broken);
    wait_status(status_addr, Duration::from_secs(10), |s| s.rejected.as_deref() == Some(bad.as_str())).await;
    let status = reloader_status(status_addr).await;
    assert_eq!(status.loaded.as_deref(), Some(second.as_str()), "still the last good config: {status:?}");
    assert!(status.error.as_deref().is_some_and(|e| e.contains("rejected")), "{status:?}");
    let metrics =
        aipod_operator::pod_http::get(status_addr, "/metrics", Duration::from_secs(2)).await.expect("/metrics");
    assert!(metrics.contains("aipod_router_config_rejected 1"), "{metrics}");
    client(&router, "b").await.call("echo").retry(no_retry()).send().await.expect("the old config still routes b");

    let out = long.await.expect("join").expect("the long call survived two reloads");
    assert_eq!(out.json::<Value>().expect("json")["slept"], 6.0);
    // nginx first: the reloader stays until nginx is gone, as in a pod.
    drop(router);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_lets_nginx_finish_its_calls_and_answers_when_nginx_has_exited() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = runtime(&["--heartbeat", "200ms"]);
    let mut router = nginx(dir.path(), &[("a", &a)], Duration::from_secs(60));
    let (_reloader, status_addr) = reloader(dir.path(), "300ms");
    let c = client(&router, "a").await;
    let long = tokio::spawn(async move { c.call("sleep").kwarg("seconds", 4).retry(no_retry()).send().await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The preStop hook of the nginx container.
    let started = Instant::now();
    let quit = aipod_operator::pod_http::get(status_addr, "/quit", Duration::from_secs(30)).await.expect("/quit");
    let took = started.elapsed();
    eprintln!("/quit answered after {took:?}");
    assert!(quit.contains("nginx exited"), "{quit}");
    assert!(took >= Duration::from_secs(2), "answered only once nginx had finished the call: {took:?}");
    let out = long.await.expect("join").expect("the call in flight finished: a graceful quit, not a fast shutdown");
    assert_eq!(out.json::<Value>().expect("json")["slept"], 4.0);
    let exit = router.child.try_wait().expect("wait").expect("nginx exited");
    assert!(exit.success(), "{exit:?}");
    assert!(std::net::TcpStream::connect(&router.addr).is_err(), "no new connections after the quit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_63_character_upstream_loads_and_routes_beside_a_short_one() {
    // A valid DNS label the CRD admits (an AIPod name of that length is its
    // default upstream): nginx's default map bucket would refuse the whole
    // config, and with it every model on the router.
    let long = "m".repeat(55) + "-model-x";
    assert_eq!(long.len(), 63);
    let dir = tempfile::tempdir().expect("tmp");
    let a = runtime(&["--model", "served-by-long=builtin:demo"]);
    let b = runtime(&["--model", "served-by-b=builtin:demo"]);
    let router = nginx(dir.path(), &[(long.as_str(), &a), ("b", &b)], Duration::from_secs(60));
    for (upstream, version) in [(long.as_str(), "served-by-long"), ("b", "served-by-b")] {
        let d = client(&router, upstream).await.describe().await.expect("routed");
        assert_eq!(d.versions[0].version, version);
    }
}
