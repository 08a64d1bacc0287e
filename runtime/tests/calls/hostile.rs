//! Hostile and careless clients: nothing they do holds the server's
//! resources forever or starves other callers.

use std::time::{Duration, Instant};

use aipod::proto::Encoding;
use bytes::Bytes;
use serde_json::json;
use tonic::Code;

use crate::support::{self, Mixed, TestServer, call, collect, data, header, open};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stalls_ends_at_the_receive_timeout_and_leaves_nothing() {
    let server = TestServer::start(&["--receive-timeout", "300ms"]).await;
    let mut c = server.client().await;
    // The header, one piece of the payload, then silence with the stream open.
    let piece = zstd::bulk::compress(&[7u8; 1000], 1).expect("zstd");
    let (_tx, response) =
        open(&mut c, Some("echo"), vec![header("", json!({}), None, Encoding::Zstd), data(Bytes::from(piece))]).await;
    let started = Instant::now();
    let out = collect(response).await;
    assert_eq!(out.code(), Code::DeadlineExceeded, "{:?}", out.error);
    assert!(out.error.expect("status").message().contains("--receive-timeout"));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(server.spool_entries().is_empty(), "the partial upload is gone: {:?}", server.spool_entries());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_still_receiving_count_against_the_bound_and_the_next_is_refused_at_once() {
    let server = TestServer::start(&["--max-concurrent-calls", "1", "--max-queued-calls", "1"]).await;
    let mut c = server.client().await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (tx, response) = open(&mut c, Some("echo"), vec![header("", json!({}), None, Encoding::Zstd)]).await;
        response.expect("admitted while there is room");
        held.push(tx);
    }
    let started = Instant::now();
    let out =
        support::raw(&mut c, Some("sleep"), vec![header("", json!({"seconds": 0}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.code(), Code::ResourceExhausted, "{:?}", out.error);
    let status = out.error.expect("status");
    assert!(status.message().contains("--max-queued-calls"), "{}", status.message());
    assert_eq!(status.metadata().get(aipod::contract::RETRYABLE_KEY).and_then(|v| v.to_str().ok()), Some("true"));
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not left hanging");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_stalled_uploads_do_not_starve_other_calls() {
    // A queue room for them all (the default holds 128 calls).
    let server = TestServer::start(&["--max-queued-calls", "1024"]).await;
    // 600 uploads with no declared size (decoded off the async runtime),
    // each sent its header and nothing more, on one connection.
    let mut hostile = server.client().await;
    let mut held = Vec::new();
    for _ in 0..600 {
        let (tx, response) = open(&mut hostile, Some("echo"), vec![header("", json!({}), None, Encoding::Zstd)]).await;
        response.expect("admitted");
        held.push(tx);
    }
    // Another client, on its own connection: undeclared sizes too.
    let mut other = server.client().await;
    let started = Instant::now();
    let out = call(&mut other, "sleep", json!({"seconds": 0}), std::io::empty(), None).await;
    out.ok();
    let out = call(&mut other, "sha256", json!({}), Mixed::new(1 << 20), None).await;
    assert_eq!(out.ok()["size"], 1 << 20);
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?} beside 600 stalled uploads", started.elapsed());
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zstd_window_beyond_the_cap_is_refused_not_allocated() {
    let server = TestServer::start(&["--max-zstd-window", "8MiB"]).await;
    let mut c = server.client().await;
    // A 128 MiB window (window_log 27) with no content size in the frame:
    // the decoder would have to reserve the whole window.
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).expect("encoder");
    encoder.set_parameter(zstd::zstd_safe::CParameter::WindowLog(27)).expect("window log");
    encoder.include_contentsize(false).expect("no content size");
    std::io::copy(&mut Mixed::new(1 << 20), &mut encoder).expect("compress");
    let big_window = encoder.finish().expect("finish");
    let out = support::raw(
        &mut c,
        Some("sha256"),
        vec![header("", json!({}), None, Encoding::Zstd), data(Bytes::from(big_window))],
    )
    .await;
    assert_eq!(out.code(), Code::ResourceExhausted, "{:?}", out.error);
    assert!(out.error.expect("status").message().contains("--max-zstd-window"));
    // Our own client's frames fit the default cap.
    let out = call(&mut c, "sha256", json!({}), Mixed::new(3 << 20), None).await;
    assert_eq!(out.ok()["size"], 3 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_function_name_is_unimplemented_and_not_echoed_whole() {
    let server = TestServer::start(&[]).await;
    let mut c = server.client().await;
    let name = "f".repeat(100_000);
    let out = support::raw(&mut c, None, vec![header(&name, json!({}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.code(), Code::Unimplemented, "{:?}", out.error.as_ref().map(|s| s.message().len()));
    let message = out.error.expect("status").message().to_owned();
    assert!(message.len() < 1024 && message.contains("(100000 bytes)"), "{} bytes: {}", message.len(), &message[..200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_input_and_model_messages_reach_the_log_cut() {
    let process = support::Process::start(&[]);
    let mut c = support::client(&process.addr).await;
    let log_bytes = || process.log.lock().expect("log").iter().map(|l| l.len() + 1).sum::<usize>();
    // An unknown 1 MiB function name (as large as a header may be), with a
    // forged log line in it.
    let huge = format!("x\nINFO forged line{}", "f".repeat(1 << 20));
    let before = log_bytes();
    let out = support::raw(&mut c, None, vec![header(&huge, json!({}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.code(), Code::Unimplemented, "{:?}", out.error);
    // A model's own 512 KiB error message (kwargs stay within 1 MiB).
    let message = "m".repeat(512 << 10);
    let failed = support::raw(
        &mut c,
        Some("fail"),
        vec![header("fail", json!({"code": "FAILED_PRECONDITION", "message": message}), Some(0), Encoding::Zstd)],
    )
    .await;
    assert_eq!(failed.code(), Code::FailedPrecondition);
    assert!(failed.error.expect("status").message().len() < 2048, "the status is cut");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let grew = log_bytes() - before;
    assert!(grew < 8 << 10, "the log grew {grew} bytes for a 1 MiB name and a 512 KiB message");
    let log = process.log.lock().expect("log").join("\n");
    let refused = log.lines().find(|l| l.contains("call refused")).expect("the refusal is logged");
    assert!(refused.len() < 2048 && refused.contains("x\\\\nINFO forged"), "cut, the newline escaped: {refused}");
}

/// A retained call's header: `id`, kept an hour, `size` bytes declared,
/// resumed from `resume_from` when given.
fn retained_header(id: &str, size: u64, resume_from: Option<u64>) -> aipod::proto::Frame {
    let mut frame = header("echo", json!({}), Some(size), Encoding::Identity);
    if let Some(aipod::proto::frame::Kind::Header(h)) = &mut frame.kind {
        h.call_id = id.to_owned();
        h.retain_seconds = Some(3600);
        h.resume_from = resume_from;
    }
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_retained_uploads_hold_no_call_slot_and_can_still_resume() {
    // Room for 3 calls; 6 retained uploads are started and abandoned.
    let server = TestServer::start(&["--max-concurrent-calls", "1", "--max-queued-calls", "2"]).await;
    let mut c = server.client().await;
    let size = 1u64 << 20;
    for i in 0..6 {
        let first = vec![retained_header(&format!("abandoned-upload-{i:04}"), size, None), data(vec![0u8; 1024])];
        let (tx, response) = open(&mut c, Some("echo"), first).await;
        let mut replies = response.expect("admitted: abandoned uploads hold no slot").into_inner();
        // The first reply: the call is retained and receiving.
        let first = tokio::time::timeout(Duration::from_secs(10), replies.message()).await;
        assert!(matches!(first, Ok(Ok(Some(_)))), "{first:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop((tx, replies));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_call = call(&mut c, "echo", json!({}), &b"a new call"[..], None);
    let out = tokio::time::timeout(Duration::from_secs(10), new_call).await.expect("a new call ends");
    assert_eq!(out.code(), Code::Ok, "{:?}", out.error);
    // An abandoned upload resumes from what the server holds.
    let rest = data(vec![0u8; (size - 1024) as usize]);
    let resumed =
        support::raw(&mut c, Some("echo"), vec![retained_header("abandoned-upload-0003", size, Some(1024)), rest]);
    let out = tokio::time::timeout(Duration::from_secs(10), resumed).await.expect("the resume ends");
    assert_eq!(out.code(), Code::Ok, "{:?}", out.error);
    assert_eq!(out.ok()["size"], size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_trickled_below_the_minimum_rate_ends_though_it_never_pauses() {
    // The probe's attack: a 1-byte data message every 100 ms never pauses
    // for --receive-timeout (here 1 s; the rate's grace is twice that), but
    // averages 10 bytes/s, under a 1 KiB/s minimum.
    let server = TestServer::start(&["--receive-timeout", "1s", "--min-receive-rate", "1KiB"]).await;
    let mut c = server.client().await;
    let (tx, response) =
        open(&mut c, Some("echo"), vec![header("", json!({}), Some(1 << 20), Encoding::Identity)]).await;
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        while tx.send(data(vec![0u8])).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let out = tokio::time::timeout(Duration::from_secs(10), collect(response)).await.expect("the call ended");
    trickle.abort();
    assert_eq!(out.code(), Code::DeadlineExceeded, "{:?}", out.error);
    assert!(out.error.expect("status").message().contains("--min-receive-rate"));
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(4), "ended after {took:?}");
    assert!(server.spool_entries().is_empty(), "the partial upload is gone");
}
