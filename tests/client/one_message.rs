//! The client's one-message `call`: small payloads in memory go in one
//! request when the server lists it (counted by the real runtime), the
//! rest by chaos, and a server that lists it without serving it still gets
//! every call, by chaos.

use std::{
    io::{Read, Write},
    sync::atomic::Ordering,
};

use aipod::Client;
use aipod_testkit::RuntimeProcess;
use serde_json::{Value, json};

use crate::retry::{Script, serve_counting};

/// The value of the counter `name` on the runtime's metrics endpoint.
fn counter(metrics: &str, name: &str) -> Option<u64> {
    let mut conn = std::net::TcpStream::connect(metrics).expect("metrics endpoint");
    write!(conn, "GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n").expect("request");
    let mut text = String::new();
    conn.read_to_string(&mut text).expect("metrics");
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_calls_go_in_one_message_when_the_server_lists_it() {
    let metrics = free_addr();
    let rt = RuntimeProcess::start(&["--metrics-listen", &metrics]);
    let client = Client::connect(&rt.target()).await.expect("client");
    let one_message = || counter(&metrics, "aipod_calls_one_message_total").unwrap_or(0);

    // Small payloads in memory, and none: one message each, answered as
    // chaos answers them.
    for i in 0..5 {
        let payload = vec![i as u8; 1024 * (i + 1)];
        let out = client.call("echo").kwarg("i", i).bytes(payload.clone()).send().await.expect("echo");
        assert_eq!(out.json::<Value>().expect("json")["kwargs"], json!({"i": i}));
        assert_eq!(out.payload_size, Some(payload.len() as u64));
    }
    let text = "a line of a log file\n".repeat(5_000);
    let out = client.call("sha256").bytes(text.clone()).send().await.expect("sha256");
    assert_eq!(out.json::<Value>().expect("json")["size"], text.len());
    client.call("echo").send().await.expect("no payload");
    assert_eq!(one_message(), 7, "every small call went by ai.AI/call");

    // A file, and bytes over the one-message bound: chaos.
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("small.bin");
    std::fs::write(&file, b"a small file").expect("write");
    let out = client.call("echo").file(&file).send().await.expect("file");
    assert_eq!(out.payload_size, Some(12));
    let big = client.call("echo").bytes(vec![3u8; 300 << 10]).send().await.expect("300 KiB");
    assert_eq!(big.payload_size, Some(300 << 10));
    assert_eq!(one_message(), 7, "files and payloads over 256 KiB go by chaos");
}

#[tokio::test]
async fn a_server_listing_the_one_message_call_without_it_gets_chaos() {
    let (addr, chaos_calls, describes) = serve_counting(Script::ListsCallWithoutIt).await;
    let client = Client::connect(&addr).await.expect("client");
    for n in 1..=3 {
        let out = client.call("echo").bytes(vec![1u8; 1000]).send().await.expect("answered by chaos");
        assert_eq!(out.json::<Value>().expect("json")["size"], 1000);
        assert_eq!(out.attempts, 1, "the fallback is part of the same attempt");
        assert_eq!(chaos_calls.load(Ordering::SeqCst), n);
    }
    assert_eq!(describes.load(Ordering::SeqCst), 1, "describe asked once per client and upstream");
    // Another upstream is asked on its own.
    let routed = client.clone().with_upstream("other");
    routed.call("echo").send().await.expect("answered by chaos");
    assert_eq!(describes.load(Ordering::SeqCst), 2);
}
