//! Test support: an in-process runtime on a real loopback socket, a raw
//! tonic client, and a streaming payload generator.

use std::{
    io::{self, Read, Write},
    path::PathBuf,
    time::Duration,
};

use aipod::{
    codec::{ChunkEncoder, StreamDecoder},
    contract,
    proto::{self, Frame, Header, ai_client::AiClient, frame::Kind},
};
use aipod_runtime::{Config, Runtime};
use bytes::Bytes;
use clap::Parser;
use sha2::{Digest, Sha256};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// A runtime served in this process until dropped.
pub struct TestServer {
    pub addr: String,
    pub spool: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<JoinHandle<aipod_runtime::Result<()>>>,
}

impl TestServer {
    /// Starts a runtime with these extra flags on 127.0.0.1:0.
    pub async fn start(args: &[&str]) -> Self {
        Self::start_with(args, Runtime::builder()).await
    }

    /// Starts `runtime` (with the models it registers) and these flags.
    pub async fn start_with(args: &[&str], runtime: Runtime) -> Self {
        let spool = tempfile::tempdir().expect("spool dir");
        let spool_arg = spool.path().to_str().expect("utf-8 path").to_owned();
        let own_spool = args.contains(&"--spool-dir");
        let argv = ["aipod-runtime"]
            .into_iter()
            .chain(if own_spool { None } else { Some(["--spool-dir", spool_arg.as_str()]) }.into_iter().flatten())
            .chain(args.iter().copied());
        let config = Config::try_parse_from(argv).expect("config");
        let listener = aipod_runtime::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(async move {
            runtime
                .serve(&config, listener, async {
                    let _ = stopped.await;
                })
                .await
        });
        Self { addr, spool, stop: Some(stop), join: Some(join) }
    }

    pub async fn client(&self) -> AiClient<Channel> {
        client(&self.addr).await
    }

    /// Files and directories left in the spool (besides the lock file).
    pub fn spool_entries(&self) -> Vec<String> {
        spool_entries(&self.spool.path().to_owned())
    }

    /// Waits for the server to end by itself (a model that cannot start).
    pub async fn join(mut self) -> aipod_runtime::Result<()> {
        self.join.take().expect("running").await.expect("server task")
    }

    /// Drains and stops the server, returning its result.
    pub async fn stop(mut self) -> aipod_runtime::Result<()> {
        let _ = self.stop.take().expect("running").send(());
        self.join.take().expect("running").await.expect("server task")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(join) = self.join.take() {
            join.abort();
        }
    }
}

pub fn spool_entries(dir: &PathBuf) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("spool")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

pub async fn client(addr: &str) -> AiClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect");
    AiClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

/// Deterministic mixed payload (the workspace's one generator).
pub use aipod_testkit::Mixed;

pub fn sha256_hex(mut r: impl Read) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = r.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sha256 writer, to check result payloads without keeping them.
#[derive(Default)]
pub struct HashWriter {
    pub hasher: Sha256,
    pub len: u64,
}

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What came back from a call.
#[derive(Debug, Default)]
pub struct Outcome {
    pub beats: Vec<proto::Heartbeat>,
    pub result: Option<proto::Result>,
    pub json: serde_json::Value,
    /// sha256 and length of the decoded result payload.
    pub data_sha256: Option<String>,
    pub data_len: u64,
    pub error: Option<Status>,
    pub call_id: Option<String>,
}

impl Outcome {
    pub fn code(&self) -> tonic::Code {
        self.error.as_ref().map_or(tonic::Code::Ok, Status::code)
    }

    #[track_caller]
    pub fn ok(&self) -> &serde_json::Value {
        assert!(self.error.is_none(), "call failed: {:?}", self.error);
        &self.json
    }
}

pub fn header(func: &str, kwargs: serde_json::Value, size: Option<u64>, encoding: proto::Encoding) -> Frame {
    Frame {
        kind: Some(Kind::Header(Header {
            func: func.into(),
            kwargs_json: serde_json::to_vec(&kwargs).expect("json").into(),
            payload_size: size,
            encoding: encoding as i32,
            ..Default::default()
        })),
    }
}

pub fn data(bytes: impl Into<Bytes>) -> Frame {
    Frame { kind: Some(Kind::Data(bytes.into())) }
}

/// Opens a call, sends `first` and keeps the stream open; returns the frame
/// sender (drop it to half-close) and the server's response.
pub async fn open(
    client: &mut AiClient<Channel>,
    func_meta: Option<&str>,
    first: Vec<Frame>,
) -> (mpsc::Sender<Frame>, Result<tonic::Response<tonic::Streaming<proto::Reply>>, Status>) {
    let (tx, rx) = mpsc::channel::<Frame>(first.len().max(4));
    for f in first {
        tx.send(f).await.expect("queue frame");
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(f) = func_meta {
        request.metadata_mut().insert(contract::FUNC_NAME_KEY, f.parse().expect("metadata"));
    }
    let response = client.chaos(request).await;
    (tx, response)
}

/// Sends `frames` (then half-closes) and collects the replies.
pub async fn raw(client: &mut AiClient<Channel>, func_meta: Option<&str>, frames: Vec<Frame>) -> Outcome {
    let (tx, rx) = mpsc::channel::<Frame>(frames.len().max(1));
    for f in frames {
        tx.send(f).await.expect("queue frame");
    }
    drop(tx);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(f) = func_meta {
        request.metadata_mut().insert(contract::FUNC_NAME_KEY, f.parse().expect("metadata"));
    }
    collect(client.chaos(request).await).await
}

/// Streams `payload` (zstd, level 1, 1 MiB chunks) to `func` and collects.
pub async fn call(
    client: &mut AiClient<Channel>,
    func: &str,
    kwargs: serde_json::Value,
    payload: impl Read + Send + 'static,
    size: Option<u64>,
) -> Outcome {
    let (tx, rx) = mpsc::channel::<Frame>(4);
    tx.send(header(func, kwargs, size, proto::Encoding::Zstd)).await.expect("header");
    let sender = std::thread::spawn(move || {
        let encoder =
            ChunkEncoder::new(payload, aipod::codec::Encoding::Zstd, 1, contract::CHUNK_SIZE).expect("encoder");
        for chunk in encoder {
            if tx.blocking_send(data(chunk.expect("encode"))).is_err() {
                return; // the server answered early
            }
        }
    });
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(contract::FUNC_NAME_KEY, func.parse().expect("metadata"));
    let outcome = collect(client.chaos(request).await).await;
    sender.join().expect("sender thread");
    outcome
}

/// Reads every reply of a call.
pub async fn collect(response: Result<tonic::Response<tonic::Streaming<proto::Reply>>, Status>) -> Outcome {
    let mut out = Outcome::default();
    let mut stream = match response {
        Ok(r) => {
            out.call_id = r.metadata().get(contract::CALL_ID_KEY).and_then(|v| v.to_str().ok()).map(str::to_owned);
            r.into_inner()
        }
        Err(status) => {
            out.error = Some(status);
            return out;
        }
    };
    let mut decoder: Option<StreamDecoder<HashWriter>> = None;
    loop {
        match stream.message().await {
            Ok(Some(proto::Reply { kind: Some(k) })) => match k {
                proto::reply::Kind::Heartbeat(h) => out.beats.push(h),
                proto::reply::Kind::Result(r) => {
                    out.json = serde_json::from_slice(&r.json).expect("result json");
                    let enc = proto::Encoding::codec(r.encoding).expect("encoding");
                    decoder = Some(StreamDecoder::new(HashWriter::default(), enc, u64::MAX).expect("decoder"));
                    out.result = Some(r);
                }
                proto::reply::Kind::Data(bytes) => {
                    decoder.as_mut().expect("data after result").write_chunk(&bytes).expect("decode result");
                }
            },
            Ok(Some(_)) => panic!("empty reply"),
            Ok(None) => break,
            Err(status) => {
                out.error = Some(status);
                break;
            }
        }
    }
    if let Some(d) = decoder {
        let (w, n) = d.finish().expect("result payload complete");
        if out.result.as_ref().is_some_and(|r| r.payload_size.is_some()) {
            out.data_sha256 = Some(hex(&w.hasher.finalize()));
            out.data_len = n;
        }
    }
    out
}

/// The real `aipod-runtime` binary, started with `args`.
pub use aipod_testkit::RuntimeProcess as Process;

/// Asks the runtime at `addr` for the health of `service`.
pub async fn health(addr: &str, service: &str) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest { service: service.into() })
        .await
        .expect("health check")
        .into_inner();
    ServingStatus::try_from(reply.status).expect("status")
}

/// Waits until readiness (`ai.AI`) is `want`.
pub async fn wait_for_readiness(addr: &str, want: ServingStatus, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while health(addr, "ai.AI").await != want {
        assert!(tokio::time::Instant::now() < deadline, "readiness did not become {want:?} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads heartbeats until one reports `phase`.
pub async fn wait_for_phase(replies: &mut tonic::Streaming<proto::Reply>, phase: proto::Phase) {
    loop {
        let reply = replies.message().await.expect("reply").expect("a heartbeat before the result");
        match reply.kind {
            Some(proto::reply::Kind::Heartbeat(h)) if h.phase == phase as i32 => return,
            Some(proto::reply::Kind::Heartbeat(_)) => {}
            other => panic!("expected heartbeats, got {other:?}"),
        }
    }
}

/// Starts `sleep` for `seconds` and returns its replies once it runs.
pub async fn running_sleep(client: &mut AiClient<Channel>, seconds: f64) -> tonic::Streaming<proto::Reply> {
    let (tx, response) = open(
        client,
        Some("sleep"),
        vec![header("", serde_json::json!({"seconds": seconds}), Some(0), proto::Encoding::Zstd)],
    )
    .await;
    drop(tx); // payload complete: the sleep starts
    let mut replies = response.expect("accepted").into_inner();
    wait_for_phase(&mut replies, proto::Phase::Running).await;
    replies
}
