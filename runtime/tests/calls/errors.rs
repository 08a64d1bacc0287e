//! Every error path of ARCHITECTURE.md, each with its exact status code.

use aipod::proto::{self, Encoding, frame::Kind};
use bytes::Bytes;
use serde_json::json;
use tonic::Code;

use crate::support::{Mixed, TestServer, call, data, header, open, raw, running_sleep};

fn zstd(bytes: &[u8]) -> Bytes {
    zstd_level(bytes, 1)
}

fn zstd_level(bytes: &[u8], level: i32) -> Bytes {
    let mut out = Vec::new();
    for c in aipod::codec::ChunkEncoder::new(bytes, aipod::codec::Encoding::Zstd, level, 1 << 20).expect("encoder") {
        out.extend_from_slice(&c.expect("chunk"));
    }
    out.into()
}

#[tokio::test]
async fn malformed_calls_are_invalid_argument() {
    let server = TestServer::start(&["--max-kwargs-bytes", "100"]).await;
    let mut c = server.client().await;
    let cases: Vec<(&str, Vec<proto::Frame>)> = vec![
        ("data before header", vec![data(zstd(b"x")), header("echo", json!({}), None, Encoding::Zstd)]),
        ("no frames at all", vec![]),
        (
            "second header",
            vec![header("echo", json!({}), None, Encoding::Zstd), header("echo", json!({}), None, Encoding::Zstd)],
        ),
        ("kwargs not an object", vec![header("echo", json!([1, 2]), None, Encoding::Zstd)]),
        ("kwargs too large", vec![header("echo", json!({"pad": "x".repeat(200)}), None, Encoding::Zstd)]),
        ("empty frame", vec![header("echo", json!({}), None, Encoding::Zstd), proto::Frame { kind: None }]),
    ];
    for (what, frames) in cases {
        let out = raw(&mut c, None, frames).await;
        assert_eq!(out.code(), Code::InvalidArgument, "{what}: {:?}", out.error);
    }
    let mut bad_json = header("echo", json!({}), None, Encoding::Zstd);
    if let Some(Kind::Header(h)) = &mut bad_json.kind {
        h.kwargs_json = Bytes::from_static(b"{\"a\": ");
    }
    let out = raw(&mut c, None, vec![bad_json]).await;
    assert_eq!(out.code(), Code::InvalidArgument);
    assert!(out.error.expect("status").message().contains("not valid JSON"));
    let out = raw(&mut c, Some("echo"), vec![header("sleep", json!({}), None, Encoding::Zstd)]).await;
    assert_eq!(out.code(), Code::InvalidArgument, "metadata and header disagree");
}

#[tokio::test]
async fn unknown_function_is_unimplemented_before_any_payload_is_sent() {
    let server = TestServer::start(&[]).await;
    let mut c = server.client().await;
    // Header only, stream left open: the answer must come without a payload.
    let (tx, response) =
        open(&mut c, Some("predict"), vec![header("", json!({}), Some(1 << 30), Encoding::Zstd)]).await;
    let status = response.expect_err("refused at the header");
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("\"predict\"") && status.message().contains("sha256"), "{}", status.message());
    // The refusal arrived while the request stream was still open and empty.
    drop(tx);
    assert!(server.spool_entries().is_empty(), "nothing spooled for a refused call");
}

#[tokio::test]
async fn unknown_version_is_not_found() {
    let server = TestServer::start(&[]).await;
    let mut c = server.client().await;
    let mut h = header("echo", json!({}), None, Encoding::Zstd);
    if let Some(Kind::Header(hd)) = &mut h.kind {
        hd.version = "v9".into();
    }
    let out = raw(&mut c, None, vec![h]).await;
    assert_eq!(out.code(), Code::NotFound);
    assert!(out.error.expect("status").message().contains("v1"), "names the versions that exist");
}

#[tokio::test]
async fn wrong_sizes_and_broken_zstd_are_data_loss() {
    let server = TestServer::start(&[]).await;
    let mut c = server.client().await;
    let payload = zstd(b"hello world");
    let cases: Vec<(&str, Vec<proto::Frame>)> = vec![
        (
            "fewer bytes than declared",
            vec![header("sha256", json!({}), Some(12), Encoding::Zstd), data(payload.clone())],
        ),
        ("more bytes than declared", vec![header("sha256", json!({}), Some(5), Encoding::Zstd), data(payload.clone())]),
        (
            "truncated zstd",
            vec![header("sha256", json!({}), None, Encoding::Zstd), data(payload.slice(..payload.len() - 3))],
        ),
        (
            "corrupt zstd",
            vec![header("sha256", json!({}), None, Encoding::Zstd), data(Bytes::from_static(b"definitely not zstd"))],
        ),
        (
            "identity size mismatch",
            vec![header("echo", json!({}), Some(3), Encoding::Identity), data(Bytes::from_static(b"ab"))],
        ),
    ];
    for (what, frames) in cases {
        let out = raw(&mut c, None, frames).await;
        assert_eq!(out.code(), Code::DataLoss, "{what}: {:?}", out.error);
    }
    // A large mismatch goes through the threaded decoder too.
    let out = call(&mut c, "sha256", json!({}), Mixed::new(3 << 20), Some(4 << 20)).await;
    assert_eq!(out.code(), Code::DataLoss, "{:?}", out.error);
    assert!(server.spool_entries().is_empty());
}

#[tokio::test]
async fn limits_are_resource_exhausted() {
    let server = TestServer::start(&["--max-payload-bytes", "1MiB"]).await;
    let mut c = server.client().await;
    let out = raw(&mut c, None, vec![header("echo", json!({}), Some(2 << 20), Encoding::Zstd)]).await;
    assert_eq!(out.code(), Code::ResourceExhausted, "declared over the limit: {:?}", out.error);
    assert!(out.error.as_ref().expect("status").metadata().get("x-aipod-retryable").is_none(), "too large is final");
    // Undeclared: a zstd bomb is stopped as it decodes.
    let bomb = zstd_level(&vec![0u8; 8 << 20], 19);
    assert!(bomb.len() < 64 << 10);
    let out = raw(&mut c, None, vec![header("sha256", json!({}), None, Encoding::Zstd), data(bomb)]).await;
    assert_eq!(out.code(), Code::ResourceExhausted, "{:?}", out.error);
    assert!(out.error.expect("status").message().contains("--max-payload-bytes"));

    let server = TestServer::start(&["--max-payload-bytes", "18446744073709551615"]).await;
    let mut c = server.client().await;
    let out = raw(&mut c, None, vec![header("echo", json!({}), Some(1 << 60), Encoding::Zstd)]).await;
    assert_eq!(out.code(), Code::ResourceExhausted, "more than the spool disk holds");
    assert!(out.error.expect("status").message().contains("spool disk"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_resource_exhausted() {
    let server = TestServer::start(&["--max-concurrent-calls", "1", "--max-queued-calls", "0"]).await;
    let mut c = server.client().await;
    let _running = running_sleep(&mut c, 30.0).await;
    let out = raw(&mut c, None, vec![header("echo", json!({}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.code(), Code::ResourceExhausted, "{:?}", out.error);
    let status = out.error.expect("status");
    assert!(status.message().contains("busy"));
    assert_eq!(
        status.metadata().get("x-aipod-retryable").and_then(|v| v.to_str().ok()),
        Some("true"),
        "a full queue may be retried"
    );
}

#[tokio::test]
async fn a_model_error_keeps_its_code_and_message() {
    let server = TestServer::start(&[]).await;
    let mut c = server.client().await;
    for code in ["FAILED_PRECONDITION", "CANCELLED", "PERMISSION_DENIED", "INTERNAL"] {
        let out = raw(
            &mut c,
            Some("fail"),
            vec![header("", json!({"code": code, "message": "model says no"}), None, Encoding::Zstd)],
        )
        .await;
        assert_eq!(format!("{:?}", out.code()).to_ascii_uppercase(), code.replace('_', ""), "{code}");
        assert_eq!(out.error.expect("status").message(), "model says no");
        assert!(!out.beats.is_empty(), "heartbeats came before the failure");
    }
    let out = raw(&mut c, Some("sleep"), vec![header("", json!({"seconds": "soon"}), None, Encoding::Zstd)]).await;
    assert_eq!(out.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_client_deadline_ends_a_long_call() {
    let server = TestServer::start(&[]).await;
    let mut c = server.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(header("sleep", json!({"seconds": 60}), Some(0), Encoding::Zstd)).await.expect("header");
    drop(tx);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.set_timeout(std::time::Duration::from_millis(300));
    let out = crate::support::collect(c.chaos(request).await).await;
    assert_eq!(out.code(), Code::DeadlineExceeded, "{:?}", out.error);
}

/// A small tmpfs, unmounted when dropped. Needs root: tests using it are
/// named `needs_root_…` and run only in nextest's `ci` profile.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (the default nextest profile skips it)"
        );
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_root_a_full_spool_disk_is_resource_exhausted_and_cleaned_up() {
    let disk = Tmpfs::mount("4m");
    let spool = disk.0.path().join("spool");
    let server = TestServer::start(&["--spool-dir", spool.to_str().expect("utf-8")]).await;
    let mut c = server.client().await;
    // Declared: refused up front.
    let out = raw(&mut c, None, vec![header("sha256", json!({}), Some(16 << 20), Encoding::Zstd)]).await;
    assert_eq!(out.code(), Code::ResourceExhausted, "{:?}", out.error);
    assert!(out.error.expect("status").message().contains("does not fit on the spool disk"));
    // Undeclared: the disk fills while spooling (ENOSPC). `echo` needs its
    // payload on disk (`sha256` hashes it as it arrives and spools nothing).
    let out = call(&mut c, "echo", json!({}), Mixed::new(16 << 20), None).await;
    assert_eq!(out.code(), Code::ResourceExhausted, "{:?}", out.error);
    assert!(out.error.expect("status").message().contains("spool disk is full"));
    assert!(crate::support::spool_entries(&spool).is_empty(), "the partial payload was removed");
    // The space is free again.
    let out = call(&mut c, "sha256", json!({}), Mixed::new(1 << 20), Some(1 << 20)).await;
    out.ok();
}
