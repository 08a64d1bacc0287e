//! The `aipod` CLI end to end against the real `aipod-runtime` binary.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use aipod_testkit::RuntimeProcess;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A loopback address nothing listens on (connections are refused).
fn refused_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://{}", listener.local_addr().expect("addr"))
}

/// The real runtime, with frequent heartbeats.
fn start_runtime() -> RuntimeProcess {
    RuntimeProcess::start(&["--heartbeat", "100ms"])
}

fn aipod(args: &[&str]) -> Output {
    aipod_with_stdin(args, None)
}

fn aipod_with_stdin(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_aipod"))
        .args(args)
        .env_remove("AIPOD_TARGET")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run aipod");
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(data).expect("write stdin");
    }
    child.wait_with_output().expect("aipod output")
}

fn json_out(out: &Output) -> Value {
    assert!(out.status.success(), "aipod failed ({:?}): {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

fn data(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| if (i / 4096) % 2 == 0 { b"log line\n"[i % 9] } else { (i.wrapping_mul(2_654_435_761) >> 13) as u8 })
        .collect()
}

#[test]
fn echo_saves_a_result_payload_identical_to_the_file() {
    let rt = start_runtime();
    let dir = tempfile::tempdir().expect("tmp");
    let input = dir.path().join("in.bin");
    let output = dir.path().join("out.bin");
    std::fs::write(&input, data(9 << 20)).expect("write input");
    let out = aipod(&[
        "call",
        &rt.target(),
        "--func",
        "echo",
        "--file",
        input.to_str().expect("utf8"),
        "--out",
        output.to_str().expect("utf8"),
        "--kw",
        "tag=x",
    ]);
    let result = json_out(&out);
    assert_eq!(result["size"], 9 << 20);
    assert_eq!(result["kwargs"], json!({"tag": "x"}));
    assert_eq!(std::fs::read(&output).expect("--out written"), std::fs::read(&input).expect("input"));
    assert!(!dir.path().join("out.bin.part").exists(), "no partial file left");
    assert!(
        out.stderr.is_empty(),
        "no progress when stderr is not a terminal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn stdin_payload_is_hashed() {
    let rt = start_runtime();
    let payload = data(3 << 20);
    let out = aipod_with_stdin(&["call", &rt.target(), "--func", "sha256", "--file", "-"], Some(&payload));
    let expected: String = Sha256::digest(&payload).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(json_out(&out), json!({"sha256": expected, "size": 3 << 20}));
}

#[test]
fn kwargs_parse_as_json_or_strings_and_bad_json_is_a_usage_error() {
    let rt = start_runtime();
    let out = aipod(&[
        "call",
        &rt.target(),
        "-f",
        "echo",
        "--no-compress",
        "--kwargs-json",
        r#"{"a": 1, "n": 0}"#,
        "--kw",
        "n=2.5",
        "--kw",
        "s=hello world",
        "--kw",
        "list=[1,2]",
        "--kw",
        "flag=false",
    ]);
    assert_eq!(json_out(&out)["kwargs"], json!({"a": 1, "n": 2.5, "s": "hello world", "list": [1, 2], "flag": false}));

    let bad = aipod(&["call", &rt.target(), "-f", "echo", "--kwargs-json", "{oops"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not valid JSON"));
    let bad_flag = aipod(&["call", &rt.target(), "-f", "echo", "--zstd-level", "99"]);
    assert_eq!(bad_flag.status.code(), Some(2));
}

#[test]
fn describe_and_health_print_json() {
    let rt = start_runtime();
    let d = json_out(&aipod(&["describe", &rt.target()]));
    assert_eq!(d["versions"][0]["version"], "v1");
    assert_eq!(d["heartbeat_interval_ms"], 100);
    assert!(d["versions"][0]["functions"].as_array().expect("functions").contains(&json!("sleep")));
    let h = json_out(&aipod(&["health", &rt.target()]));
    assert_eq!(h, json!({"service": "ai.AI", "status": "SERVING"}));
    let live = json_out(&aipod(&["health", &rt.target(), "--service", ""]));
    assert_eq!(live["status"], "SERVING");
}

#[test]
fn failures_exit_with_their_class_and_one_clear_line() {
    let rt = start_runtime();
    let cases: [(&[&str], i32, &str); 4] = [
        (&["-f", "predict"], 5, "UNIMPLEMENTED"),
        (&["-f", "echo", "--version", "v9"], 5, "NOT_FOUND"),
        (&["-f", "fail", "--kw", "code=FAILED_PRECONDITION", "--kw", "message=not trained yet"], 10, "not trained yet"),
        (&["-f", "sleep", "--kw", "seconds=30", "--timeout", "300ms"], 9, "DEADLINE_EXCEEDED"),
    ];
    for (args, code, text) in cases {
        let target = rt.target();
        let mut full = vec!["call", target.as_str()];
        full.extend_from_slice(args);
        let out = aipod(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(text), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(out.stdout.is_empty());
    }
    let missing = aipod(&["call", &rt.target(), "-f", "echo", "--file", "/no/such/file"]);
    assert_eq!(missing.status.code(), Some(12));
}

#[test]
fn a_failure_names_the_phase_the_call_was_really_in() {
    let rt = start_runtime();
    let target = rt.target();
    // `fail` fails at once: the only heartbeat the client saw said RECEIVING,
    // but the model ran; the server's word wins.
    let failed = aipod(&["call", &target, "-f", "fail", "--kw", "code=FAILED_PRECONDITION"]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("while the model ran"), "{stderr}");
    let refused = aipod(&["call", &target, "-f", "predict"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("before the server accepted it"));
    // The detail of -v is for people: names, not Rust debug text.
    let verbose = aipod(&["call", &target, "-v", "-f", "fail", "--kw", "code=FAILED_PRECONDITION"]);
    let detail = String::from_utf8_lossy(&verbose.stderr);
    assert!(detail.contains("phase RUNNING") && detail.contains("failure: the server's answer"), "{detail}");
    assert!(!detail.contains("Some(") && !detail.contains("None"), "{detail}");
}

#[test]
fn an_unwritable_out_fails_before_anything_is_sent() {
    let rt = start_runtime();
    let dir = tempfile::tempdir().expect("tmp");
    let payload = dir.path().join("in.bin");
    std::fs::write(&payload, vec![7u8; 1 << 20]).expect("payload");
    let out = dir.path().join("no-such-dir").join("out.bin");
    let failed = aipod(&[
        "call",
        &rt.target(),
        "-f",
        "echo",
        "--file",
        payload.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(12), "{stderr}");
    assert!(stderr.contains("cannot write the result payload") && stderr.contains("no-such-dir"), "{stderr}");
    let calls = rt.log_lines().iter().filter(|l| l.contains("\"call finished\"") || l.contains("call refused")).count();
    assert_eq!(calls, 0, "nothing reached the server: {:?}", rt.log_lines());
}

#[test]
fn retry_warnings_carry_no_colour_codes_off_a_terminal() {
    let addr = refused_address();
    let out = aipod(&["call", &addr, "-f", "echo", "--attempts", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("retrying"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "no ANSI escapes when stderr is a pipe: {stderr:?}");
}

#[test]
fn an_unreachable_server_exits_3() {
    let addr = refused_address();
    let out = aipod(&["call", &addr, "-f", "echo", "--attempts", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains(&format!("could not reach {addr}")), "names the address: {stderr}");
    assert!(stderr.to_ascii_lowercase().contains("connection refused"), "names the OS error: {stderr}");
    let verbose = aipod(&["call", &addr, "-f", "echo", "--attempts", "1", "-v"]);
    assert!(String::from_utf8_lossy(&verbose.stderr).contains("attempts 1"), "-v adds detail");
}

#[test]
fn a_host_name_that_does_not_resolve_fails_at_once() {
    let started = std::time::Instant::now();
    let out = aipod(&["call", "http://no-such-host.invalid:50051", "-f", "echo"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no-such-host.invalid") && !stderr.contains("retrying"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "no retries with backoff: {stderr}");
}

#[test]
fn a_server_killed_mid_call_is_a_lost_connection_not_a_model_failure() {
    let rt = start_runtime();
    let cli = Command::new(env!("CARGO_BIN_EXE_aipod"))
        .args(["call", &rt.target(), "-f", "sleep", "--kw", "seconds=30", "-q"])
        .env_remove("AIPOD_TARGET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run aipod");
    // Give the 30 s call time to be accepted and start running (the runtime
    // reports nothing per call before it ends).
    std::thread::sleep(std::time::Duration::from_secs(2));
    rt.signal("KILL");
    let out = cli.wait_with_output().expect("aipod");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "UNAVAILABLE: {stderr}");
    assert!(stderr.contains("connection to the server was lost") && stderr.contains("while the model ran"), "{stderr}");
}

#[test]
fn health_gives_up_on_a_peer_that_never_answers() {
    // Accepts TCP connections and says nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = format!("http://{}", listener.local_addr().expect("addr"));
    let _keep = std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(4).collect();
        std::thread::sleep(std::time::Duration::from_secs(30));
        drop(held);
    });
    let started = std::time::Instant::now();
    let out = aipod(&["health", &addr, "--timeout", "1s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no answer within 1s"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "gave up in time");
}

#[test]
fn oversized_metadata_is_a_clear_protocol_error_not_unknown() {
    let rt = start_runtime();
    let target = format!("http://{}", rt.addr);
    // Over the server's header list limit (16 KiB), under the client's own.
    let upstream = "u".repeat(20_000);
    let out = aipod(&["call", &target, "-f", "echo", "--upstream", &upstream, "--attempts", "1"]);
    assert_eq!(out.status.code(), Some(13), "exit 13 (protocol), not 11 (UNKNOWN)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HTTP 431") && stderr.contains("shorten"), "{stderr}");
}

/// An HTTP/1.1 server answering each GET with the next status of `codes`
/// (the last one repeated); returns its address and how many it answered.
fn http_statuses(codes: &'static [u16]) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = format!("http://{}", listener.local_addr().expect("addr"));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&answered);
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            let mut request = [0u8; 1024];
            let n = conn.read(&mut request).unwrap_or(0);
            assert!(
                request[..n].starts_with(b"GET /readyz HTTP/1.1\r\n"),
                "{:?}",
                String::from_utf8_lossy(&request[..n])
            );
            let i = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let code = codes[i.min(codes.len() - 1)];
            let _ = write!(conn, "HTTP/1.1 {code} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    (addr, answered)
}

#[test]
fn health_http_checks_a_readyz_endpoint_and_wait_asks_until_it_is_ready() {
    // Not ready: NOT_SERVING, exit 8, one request.
    let (addr, answered) = http_statuses(&[503]);
    let out = aipod(&["health", &addr, "--http", "/readyz"]);
    assert_eq!(out.status.code(), Some(8), "{}", String::from_utf8_lossy(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(status, json!({"service": "/readyz", "status": "NOT_SERVING"}));
    assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Ready on the third request: --wait asks until then.
    let (addr, answered) = http_statuses(&[503, 503, 200]);
    let h = json_out(&aipod(&["health", &addr, "--http", "/readyz", "--wait", "30s"]));
    assert_eq!(h, json!({"service": "/readyz", "status": "SERVING"}));
    assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 3);

    // Nothing listening: --wait keeps trying for its time, then exit 3.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let started = std::time::Instant::now();
    let out = aipod(&["health", &closed, "--wait", "3s"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() >= std::time::Duration::from_secs(2), "kept checking: {:?}", started.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("could not reach {closed}")), "names the target: {stderr}");
    let bad = aipod(&["health", &closed, "--http", "readyz"]);
    assert_eq!(bad.status.code(), Some(12), "a path that is not one");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected a path"));
}
