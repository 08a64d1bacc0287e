//! Small calls without files: payloads up to 256 KiB held in memory within
//! `--memory-payload-budget`, the input's path made only when a model asks,
//! result bytes sent from memory — and the spool directory untouched
//! (its modification time is the witness: creating or removing any entry
//! in it changes it).

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use aipod::proto::{Encoding, ai_client::AiClient};
use aipod_runtime::{BoxFuture, Model, ModelCall, ModelError, ModelOutput, Runtime};
use serde_json::json;
use tokio::sync::Barrier;
use tonic::transport::Channel;

use crate::support::{self, Mixed, TestServer, data, header, sha256_hex};

/// Reports how the runtime handed it the input, and answers per function:
/// `where` — echoes from memory or file; `path` — asks for a path and
/// hashes the file there; `bytes` — returns `n` bytes it makes itself;
/// `meet` — also waits at a barrier, so calls are concurrent.
struct Probe {
    meet: Arc<Barrier>,
}

impl Model for Probe {
    fn functions(&self) -> Vec<String> {
        ["bytes", "meet", "path", "where"].map(String::from).to_vec()
    }

    fn call(&self, call: ModelCall) -> BoxFuture<Result<ModelOutput, ModelError>> {
        let meet = Arc::clone(&self.meet);
        Box::pin(async move {
            let in_memory = call.input.in_memory().is_some();
            match call.func.as_str() {
                "path" => {
                    let path = call.input.path().map_err(|e| ModelError::internal(e.to_string()))?.to_owned();
                    let again = call.input.path().map_err(|e| ModelError::internal(e.to_string()))?.to_owned();
                    let file = std::fs::File::open(&path).map_err(|e| ModelError::internal(e.to_string()))?;
                    let json = json!({"in_memory": in_memory, "path": path, "same": path == again,
                        "sha256": sha256_hex(file)});
                    Ok(ModelOutput::json(json))
                }
                "bytes" => {
                    let n = call.kwargs["n"].as_u64().unwrap_or(0) as usize;
                    let bytes: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
                    Ok(ModelOutput::with_payload(json!({"in_memory": in_memory}), bytes))
                }
                "meet" => {
                    meet.wait().await;
                    Ok(ModelOutput::json(json!({"in_memory": in_memory})))
                }
                _ => {
                    let json = json!({"in_memory": in_memory, "size": call.input_size});
                    Ok(ModelOutput::with_payload(json, call.input.into_result()))
                }
            }
        })
    }
}

fn probe(calls: usize) -> Runtime {
    Runtime::builder().model("probe", Probe { meet: Arc::new(Barrier::new(calls)) })
}

fn modified(dir: &Path) -> SystemTime {
    std::fs::metadata(dir).and_then(|m| m.modified()).expect("spool mtime")
}

async fn echo(client: &mut AiClient<Channel>, func: &str, len: u64) -> support::Outcome {
    support::call(client, func, json!({}), Mixed::new(len), Some(len)).await
}

#[tokio::test]
async fn small_calls_touch_no_file_and_large_ones_still_spool() {
    let server = TestServer::start_with(&[], probe(1)).await;
    let mut client = server.client().await;
    let before = modified(server.spool.path());
    // A file system's timestamp ticks coarsely: give a change room to show.
    tokio::time::sleep(Duration::from_millis(20)).await;
    for len in [0, 1, 1024, 256 << 10] {
        let out = echo(&mut client, "where", len).await;
        assert_eq!(out.ok()["in_memory"], true, "{len} bytes stay in memory");
        assert_eq!(out.data_len, len);
        assert_eq!(out.data_sha256.as_deref(), Some(sha256_hex(Mixed::new(len)).as_str()), "{len} bytes back");
    }
    assert_eq!(modified(server.spool.path()), before, "no spool entry was created or removed");

    let len = (256 << 10) + 1;
    let out = echo(&mut client, "where", len).await;
    assert_eq!(out.ok()["in_memory"], false, "one byte over: spooled");
    assert_eq!(out.data_sha256.as_deref(), Some(sha256_hex(Mixed::new(len)).as_str()));
    assert_ne!(modified(server.spool.path()), before, "the witness sees a spooled call");
    assert!(server.spool_entries().is_empty(), "{:?}", server.spool_entries());

    // No declared size: spooled, since it could be any size.
    let mut frames = vec![header("where", json!({}), None, Encoding::Identity)];
    frames.push(data(&b"undeclared"[..]));
    let out = support::raw(&mut client, None, frames).await;
    assert_eq!(out.ok()["in_memory"], false);
    assert_eq!(out.data_len, 10);
}

#[tokio::test]
async fn the_demo_echoes_and_hashes_without_the_spool() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let before = modified(server.spool.path());
    tokio::time::sleep(Duration::from_millis(20)).await;
    for _ in 0..20 {
        let out = echo(&mut client, "echo", 1024).await;
        assert_eq!(out.data_sha256.as_deref(), Some(sha256_hex(Mixed::new(1024)).as_str()));
    }
    // sha256 consumes its payload in its tap: any size, no file at all.
    let out = echo(&mut client, "sha256", 3 << 20).await;
    assert_eq!(out.ok()["sha256"], sha256_hex(Mixed::new(3 << 20)));
    assert_eq!(modified(server.spool.path()), before, "no spool entry was created or removed");
}

#[tokio::test]
async fn a_path_is_made_only_when_asked_and_removed_after() {
    let server = TestServer::start_with(&[], probe(1)).await;
    let mut client = server.client().await;
    let out = echo(&mut client, "path", 5000).await;
    let json = out.ok();
    assert_eq!((json["in_memory"].clone(), json["same"].clone()), (json!(true), json!(true)), "{json}");
    assert_eq!(json["sha256"], sha256_hex(Mixed::new(5000)), "the file holds the payload");
    let path = json["path"].as_str().expect("path");
    assert!(path.starts_with(server.spool.path().to_str().expect("utf-8")), "{path} in the spool");
    assert!(!Path::new(path).exists(), "removed with the call");
    assert!(server.spool_entries().is_empty(), "{:?}", server.spool_entries());
}

#[tokio::test]
async fn result_bytes_go_from_memory_in_chunks() {
    let server = TestServer::start_with(&[], probe(1)).await;
    let mut client = server.client().await;
    for n in [0_u64, 10, 3 << 20] {
        let out = support::call(&mut client, "bytes", json!({"n": n}), std::io::empty(), Some(0)).await;
        out.ok();
        let expected: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        assert_eq!(out.data_len, n);
        assert_eq!(out.data_sha256.as_deref(), Some(sha256_hex(&expected[..]).as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_spools_what_does_not_fit() {
    // Room for one 200 KiB payload, not two: the second call is spooled.
    let server = TestServer::start_with(&["--memory-payload-budget", "300KiB"], probe(2)).await;
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let addr = server.addr.clone();
            tokio::spawn(async move {
                let mut client = support::client(&addr).await;
                echo(&mut client, "meet", 200 << 10).await
            })
        })
        .collect();
    let mut in_memory = Vec::new();
    for call in calls {
        let out = call.await.expect("call");
        in_memory.push(out.ok()["in_memory"].as_bool().expect("bool"));
    }
    in_memory.sort_unstable();
    assert_eq!(in_memory, [false, true], "one held in memory, the other spooled");

    let server = TestServer::start_with(&["--memory-payload-budget", "0"], probe(1)).await;
    let mut client = server.client().await;
    assert_eq!(echo(&mut client, "where", 10).await.ok()["in_memory"], false, "a budget of 0 spools everything");
}

#[tokio::test]
async fn a_small_payload_that_lies_about_its_size_is_refused() {
    let server = TestServer::start_with(&[], probe(1)).await;
    let mut client = server.client().await;
    // Declares 1 KiB, sends 4 MiB: memory never holds more than declared.
    let out = support::call(&mut client, "where", json!({}), Mixed::new(4 << 20), Some(1024)).await;
    assert_eq!(out.code(), tonic::Code::DataLoss, "{:?}", out.error);
    assert!(out.error.expect("error").message().contains("1024 bytes"), "names the declared size");
    // Declares 1 KiB, sends 10 bytes.
    let frames = vec![header("where", json!({}), Some(1024), Encoding::Identity), data(&b"0123456789"[..])];
    let out = support::raw(&mut client, None, frames).await;
    assert_eq!(out.code(), tonic::Code::DataLoss, "{:?}", out.error);
    assert_eq!(echo(&mut client, "where", 1024).await.ok()["in_memory"], true, "the next call is served");
}
