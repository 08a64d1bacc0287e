//! A call's life: payloads in and out, hashing, heartbeats, cancellation,
//! cleanup, describe.

use std::time::Duration;

use aipod::proto::{self, DescribeRequest, Encoding};
use serde_json::json;

use crate::support::{self, Mixed, TestServer, call, data, header, open, running_sleep, sha256_hex};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_returns_256_mib_of_mixed_data_byte_identical() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let size = 256 << 20;
    let out = call(&mut client, "echo", json!({"tag": "big"}), Mixed::new(size), Some(size)).await;
    assert_eq!(out.ok()["size"], size);
    assert_eq!(out.json["kwargs"]["tag"], "big");
    assert_eq!(out.result.as_ref().and_then(|r| r.payload_size), Some(size));
    assert_eq!(out.data_len, size);
    assert_eq!(out.data_sha256, Some(sha256_hex(Mixed::new(size))));
    assert!(out.call_id.is_some_and(|id| !id.is_empty()), "server names the call");
    assert!(server.spool_entries().is_empty(), "spool cleaned: {:?}", server.spool_entries());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha256_of_a_64_mib_zstd_stream_matches_a_local_hash() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let size = 64 << 20;
    // No declared size: the server must cope with an unknown length.
    let out = call(&mut client, "sha256", json!({}), Mixed::new(size), None).await;
    assert_eq!(out.ok()["sha256"], sha256_hex(Mixed::new(size)));
    assert_eq!(out.json["size"], size);
    assert!(out.result.as_ref().is_some_and(|r| r.payload_size.is_none()), "no result payload");
}

#[tokio::test]
async fn identity_encoding_and_empty_payloads_work() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let frames = vec![header("echo", json!({}), Some(5), Encoding::Identity), data(&b"he"[..]), data(&b"llo"[..])];
    let out = support::raw(&mut client, None, frames).await;
    assert_eq!(out.ok()["size"], 5);
    assert_eq!(
        out.result.as_ref().map(|r| r.encoding),
        Some(Encoding::Identity as i32),
        "answers in the client's encoding"
    );
    assert_eq!(
        out.data_sha256.as_deref(),
        Some(support::hex(&<sha2::Sha256 as sha2::Digest>::digest(b"hello")).as_str())
    );

    let out = support::raw(&mut client, Some("sha256"), vec![header("", json!({}), None, Encoding::Zstd)]).await;
    assert_eq!(out.ok()["sha256"], "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_eq!(out.json["size"], 0);
}

/// A client that named its call knows the id: only an id the server made
/// goes back as `x-aipod-call-id` (a literal both ends' HPACK would
/// otherwise spell out on every call).
#[tokio::test]
async fn only_a_call_id_the_server_made_is_sent_back() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let empty = || header("echo", json!({}), Some(0), Encoding::Identity);

    let made = support::raw(&mut client, None, vec![empty()]).await;
    assert_eq!(made.ok()["size"], 0);
    assert!(made.call_id.is_some_and(|id| !id.is_empty()), "the server names a call the client did not");

    let mut named = empty();
    if let Some(proto::frame::Kind::Header(h)) = &mut named.kind {
        h.call_id = "named-in-the-header".into();
    }
    let out = support::raw(&mut client, None, vec![named]).await;
    assert_eq!(out.ok()["size"], 0);
    assert_eq!(out.call_id, None, "an id from the header is not sent back");

    let mut request = tonic::Request::new(tokio_stream::iter(vec![empty()]));
    request.metadata_mut().insert(aipod::contract::CALL_ID_KEY, "named-in-metadata".parse().expect("ascii"));
    let out = support::collect(client.chaos(request).await).await;
    assert_eq!(out.ok()["size"], 0);
    assert_eq!(out.call_id, None, "an id from the metadata is not sent back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_sends_running_heartbeats_with_rising_progress() {
    let server = TestServer::start(&["--heartbeat", "200ms"]).await;
    let mut client = server.client().await;
    let out = call(&mut client, "sleep", json!({"seconds": 3}), std::io::empty(), Some(0)).await;
    assert_eq!(out.ok()["slept"], 3.0);
    let running: Vec<_> = out.beats.iter().filter(|b| b.phase == proto::Phase::Running as i32).collect();
    assert!(out.beats.len() >= 10, "{} heartbeats in 3 s at 200 ms", out.beats.len());
    assert!(running.len() >= 10, "{} RUNNING heartbeats", running.len());
    let progress: Vec<f32> = running.iter().filter_map(|b| b.progress).collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "progress never falls: {progress:?}");
    assert!(progress.first() < progress.last(), "progress rises: {progress:?}");
    // The first RUNNING beat can leave before the model sets its message.
    let told: Vec<_> = running.iter().skip_while(|b| b.message.is_empty()).collect();
    assert!(told.len() >= 9 && told.iter().all(|b| b.message == "sleeping 3s"), "the message set once");
    assert!(out.beats.windows(2).all(|w| w[0].elapsed_ms <= w[1].elapsed_ms));
}

#[tokio::test]
async fn first_heartbeat_comes_at_once_even_with_a_long_interval() {
    let server = TestServer::start(&["--heartbeat", "1h"]).await;
    let mut client = server.client().await;
    let out = call(&mut client, "sleep", json!({"seconds": 0.2}), std::io::empty(), Some(0)).await;
    out.ok();
    assert_eq!(out.beats.len(), 1, "one immediate heartbeat, then none for an hour");
}

#[tokio::test]
async fn heartbeat_zero_sends_none() {
    let server = TestServer::start(&["--heartbeat", "0"]).await;
    let mut client = server.client().await;
    let out = call(&mut client, "sleep", json!({"seconds": 0.3}), std::io::empty(), Some(0)).await;
    out.ok();
    assert!(out.beats.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_calls_report_their_position() {
    let server = TestServer::start(&["--heartbeat", "100ms", "--max-concurrent-calls", "1"]).await;
    let mut client = server.client().await;
    let first = running_sleep(&mut client, 1.0).await;
    let second = call(&mut client, "sleep", json!({"seconds": 0.1}), std::io::empty(), Some(0)).await;
    second.ok();
    let queued: Vec<_> = second.beats.iter().filter(|b| b.phase == proto::Phase::Queued as i32).collect();
    assert!(!queued.is_empty(), "the second call waited: {:?}", second.beats);
    assert!(queued.iter().all(|b| b.queue_position == 1));
    let rest = support::collect(Ok(tonic::Response::new(first))).await;
    assert_eq!(rest.ok()["slept"], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_upload_leaves_no_spool_files() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let (tx, response) =
        open(&mut client, Some("echo"), vec![header("", json!({}), Some(1 << 30), Encoding::Identity)]).await;
    let mut replies = response.expect("accepted").into_inner();
    let first = replies.message().await.expect("reply").expect("a heartbeat");
    assert!(matches!(first.kind, Some(proto::reply::Kind::Heartbeat(_))));
    tx.send(data(vec![7u8; 1 << 20])).await.expect("send");
    wait_until(Duration::from_secs(10), || server.spool_entries().len() == 1).await; // the input file
    drop(replies);
    drop(tx);
    drop(client);
    wait_until(Duration::from_secs(10), || server.spool_entries().is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_sleep_stops_early_and_frees_its_slot() {
    let server = TestServer::start(&["--heartbeat", "100ms", "--max-concurrent-calls", "1"]).await;
    let mut client = server.client().await;
    let replies = running_sleep(&mut client, 600.0).await;
    drop(replies); // the client leaves
    // With one slot, this call can only run once the 600 s sleep has stopped.
    let out =
        tokio::time::timeout(Duration::from_secs(10), call(&mut client, "echo", json!({}), std::io::empty(), Some(0)))
            .await
            .expect("the slot was freed well before 600 s");
    out.ok();
    wait_until(Duration::from_secs(10), || server.spool_entries().is_empty()).await;
}

#[tokio::test]
async fn describe_lists_versions_functions_and_limits() {
    let server = TestServer::start(&[
        "--model",
        "v1=builtin:demo",
        "--model",
        "v2=builtin:demo",
        "--default-version",
        "v2",
        "--heartbeat",
        "250ms",
        "--max-payload-bytes",
        "1GiB",
    ])
    .await;
    let d = server.client().await.describe(DescribeRequest {}).await.expect("describe").into_inner();
    let names: Vec<_> = d.versions.iter().map(|v| (v.version.as_str(), v.default, v.ready)).collect();
    assert_eq!(names, [("v1", false, true), ("v2", true, true)]);
    assert_eq!(d.versions[0].functions, ["chaos", "discard", "echo", "fail", "sha256", "sleep"]);
    assert_eq!(d.versions[0].spec, "builtin:demo", "the spec, without the version name");
    let limits = d.limits.expect("limits");
    assert_eq!(limits.max_payload_bytes, 1 << 30);
    assert_eq!(limits.max_kwargs_bytes, 1 << 20);
    assert_eq!(d.heartbeat_interval_ms, 250);
    assert!(!d.draining);
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn reflection_v1_lists_the_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::start(&[]).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let reply = replies.message().await.expect("reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else { panic!("{reply:?}") };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"ai.AI") && names.contains(&"grpc.health.v1.Health"), "{names:?}");
}

async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_bad_model_spec_stops_the_binary_before_it_listens_with_one_line() {
    for (spec, says) in [
        ("exec:no-such-model-program --weights w.json", "not found on PATH"),
        ("builtin:demo2", "unknown built-in model"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_aipod-runtime"))
            .args(["--listen", "127.0.0.1:0", "--model", spec])
            .output()
            .expect("run aipod-runtime");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{spec}: {stderr}");
        let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{spec}: one line: {stderr}");
        assert!(lines[0].contains(&format!("--model {spec}")) && lines[0].contains(says), "{spec}: {stderr}");
    }
}
