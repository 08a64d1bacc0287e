//! Retries against a scripted `ai.AI` server: refusals are retried with the
//! payload re-sent; started calls and one-shot payloads are not.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use aipod::{
    Client,
    client::{RetryPolicy, call::Payload},
    codec::StreamDecoder,
    contract,
    proto::{self, Encoding, Phase, ai_server::Ai, frame, reply},
};
use tokio_stream::{Stream, wrappers::TcpListenerStream};
use tonic::{Request, Response, Status, Streaming, metadata::MetadataValue};

/// What the scripted server does with attempt number N (1-based).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Script {
    /// Refuse the first `n` attempts as a draining server would, then answer.
    RefuseThenAccept(u32),
    /// Accept, report RUNNING, then fail as if the node died.
    FailWhileRunning,
    /// Refuse as a draining server, then finish draining and go away.
    RefuseThenVanish,
    /// Answer every call, and list the one-message `call` in `describe`
    /// without serving it (UNIMPLEMENTED, as a server older than it behind
    /// a router that lists it).
    ListsCallWithoutIt,
}

struct Scripted {
    script: Script,
    attempts: Arc<AtomicU32>,
    describes: Arc<AtomicU32>,
    /// Stops the server (for `RefuseThenVanish`).
    stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

type Replies = Pin<Box<dyn Stream<Item = Result<proto::Reply, Status>> + Send>>;

fn beat(phase: Phase) -> Result<proto::Reply, Status> {
    Ok(proto::Reply {
        kind: Some(reply::Kind::Heartbeat(proto::Heartbeat { phase: phase as i32, ..Default::default() })),
    })
}

fn unavailable() -> Status {
    let mut s = Status::unavailable("server is shutting down");
    s.metadata_mut().insert(contract::RETRYABLE_KEY, MetadataValue::from_static("true"));
    s
}

#[tonic::async_trait]
impl Ai for Scripted {
    async fn chaos(&self, request: Request<Streaming<proto::Frame>>) -> Result<Response<Replies>, Status> {
        let n = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
        let id_in_metadata = request.metadata().contains_key(contract::CALL_ID_KEY);
        let mut frames = request.into_inner();
        let header = match frames.message().await?.and_then(|f| f.kind) {
            Some(frame::Kind::Header(h)) => h,
            _ => return Err(Status::invalid_argument("no header")),
        };
        match self.script {
            Script::RefuseThenAccept(refusals) if n <= refusals => Err(unavailable()),
            Script::RefuseThenAccept(_) | Script::ListsCallWithoutIt => {
                // Read the whole payload and report its size: proves it was re-sent.
                let encoding = Encoding::codec(header.encoding).ok_or_else(|| Status::invalid_argument("encoding"))?;
                let mut decoder = StreamDecoder::new(std::io::sink(), encoding, u64::MAX)
                    .map_err(|e| Status::internal(e.to_string()))?;
                while let Some(f) = frames.message().await? {
                    if let Some(frame::Kind::Data(d)) = f.kind {
                        decoder.write_chunk(&d).map_err(|e| Status::data_loss(e.to_string()))?;
                    }
                }
                let (_, size) = decoder.finish().map_err(|e| Status::data_loss(e.to_string()))?;
                let result = proto::Reply {
                    kind: Some(reply::Kind::Result(proto::Result {
                        json: serde_json::json!({
                            "attempt": n, "size": size, "call_id": header.call_id, "id_in_metadata": id_in_metadata,
                        })
                        .to_string()
                        .into(),
                        ..Default::default()
                    })),
                };
                Ok(Response::new(Box::pin(tokio_stream::iter([beat(Phase::Running), Ok(result)]))))
            }
            Script::RefuseThenVanish => {
                if let Some(stop) = self.stop.lock().expect("stop").take() {
                    let _ = stop.send(());
                }
                Err(unavailable())
            }
            Script::FailWhileRunning => Ok(Response::new(Box::pin(tokio_stream::iter([
                beat(Phase::Receiving),
                beat(Phase::Running),
                Err(unavailable()),
            ])))),
        }
    }

    async fn describe(&self, _: Request<proto::DescribeRequest>) -> Result<Response<proto::Description>, Status> {
        self.describes.fetch_add(1, Ordering::SeqCst);
        if self.script != Script::ListsCallWithoutIt {
            return Err(Status::unimplemented("scripted"));
        }
        Ok(Response::new(proto::Description { features: vec![contract::FEATURE_CALL.into()], ..Default::default() }))
    }

    async fn attach(&self, _: Request<proto::AttachRequest>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented("scripted"))
    }
}

async fn serve(script: Script) -> (String, Arc<AtomicU32>) {
    let (addr, attempts, _) = serve_counting(script).await;
    (addr, attempts)
}

/// A scripted server: its address, and the chaos calls and describes it
/// was asked.
pub(crate) async fn serve_counting(script: Script) -> (String, Arc<AtomicU32>, Arc<AtomicU32>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (attempts, describes) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = proto::ai_server::AiServer::new(Scripted {
        script,
        attempts: Arc::clone(&attempts),
        describes: Arc::clone(&describes),
        stop: std::sync::Mutex::new(Some(stop)),
    });
    // The server runs on a runtime of its own: a vanishing server drops it,
    // and with it every connection, shortly after its refusal has gone out,
    // as a pod that finished draining does.
    let listener = listener.into_std().expect("std listener");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("server runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let server = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener));
            tokio::select! {
                _ = server => {}
                Ok(()) = stopped => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        });
        rt.shutdown_background();
    });
    (addr, attempts, describes)
}

fn fast() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..RetryPolicy::default()
    }
}

#[tokio::test]
async fn refused_twice_then_accepted_takes_exactly_three_attempts() {
    let (addr, attempts) = serve(Script::RefuseThenAccept(2)).await;
    let client = Client::connect(&addr).await.expect("client");
    let retries = Arc::new(AtomicU32::new(0));
    let out = client
        .call("echo")
        .bytes(vec![7u8; 3 << 20])
        .retry(fast())
        .on_progress({
            let retries = Arc::clone(&retries);
            move |p| {
                if matches!(p, aipod::client::Progress::Retrying { .. }) {
                    retries.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .send()
        .await
        .expect("the third attempt succeeds");
    assert_eq!(out.attempts, 3);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(retries.load(Ordering::SeqCst), 2, "each retry is reported");
    let json: serde_json::Value = out.json().expect("json");
    assert_eq!((&json["attempt"], &json["size"]), (&3.into(), &(3 << 20).into()), "the whole payload was sent again");
}

/// The client names every call, in its header only: the server never has
/// to send an id back, no HPACK literal goes either way, and the id (the
/// same on every attempt) is known before any answer.
#[tokio::test]
async fn every_call_is_named_by_the_client_in_its_header() {
    let (addr, _) = serve(Script::RefuseThenAccept(1)).await;
    let client = Client::connect(&addr).await.expect("client");
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let out = client.call("echo").bytes(vec![1u8; 10]).retry(fast()).send().await.expect("answered");
        let json: serde_json::Value = out.json().expect("json");
        let id = out.call_id.expect("the call is named");
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "32 hex digits: {id}");
        assert_eq!(json["call_id"], id.as_str(), "the header carries it, on the retry too");
        assert_eq!(json["id_in_metadata"], false, "metadata only for a retained call");
        ids.insert(id);
    }
    assert_eq!(ids.len(), 2, "a new id for each call");
    let given = client.call("echo").call_id("mine-0001").retry(fast()).send().await.expect("answered");
    assert_eq!(given.call_id.as_deref(), Some("mine-0001"));
    assert_eq!(given.json::<serde_json::Value>().expect("json")["call_id"], "mine-0001");
}

#[tokio::test]
async fn a_file_payload_is_re_read_on_retry() {
    let (addr, attempts) = serve(Script::RefuseThenAccept(1)).await;
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("payload.bin");
    std::fs::write(&path, vec![1u8; 100_000]).expect("write");
    let client = Client::connect(&addr).await.expect("client");
    let out = client.call("echo").file(&path).retry(fast()).send().await.expect("retried");
    assert_eq!((out.attempts, attempts.load(Ordering::SeqCst)), (2, 2));
    assert_eq!(out.json::<serde_json::Value>().expect("json")["size"], 100_000);
}

#[tokio::test]
async fn gives_up_after_max_attempts() {
    let (addr, attempts) = serve(Script::RefuseThenAccept(100)).await;
    let client = Client::connect(&addr).await.expect("client");
    let err = client.call("echo").retry(fast()).send().await.expect_err("always refused");
    assert_eq!((err.code, err.attempts), (tonic::Code::Unavailable, 5));
    assert_eq!(attempts.load(Ordering::SeqCst), 5);
    assert!(err.to_string().contains("after 5 attempts"), "{err}");
}

#[tokio::test]
async fn a_call_that_failed_while_running_is_not_retried_unless_idempotent() {
    let (addr, attempts) = serve(Script::FailWhileRunning).await;
    let client = Client::connect(&addr).await.expect("client");
    let err = client.call("train").retry(fast()).send().await.expect_err("fails");
    assert_eq!(err.attempts, 1);
    assert_eq!(err.phase, Some(Phase::Running));
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "the model may have run: no second attempt");
    assert!(err.to_string().contains("while the model ran"), "{err}");

    let err = client.call("train").retry(fast()).idempotent(true).send().await.expect_err("fails every time");
    assert_eq!(err.attempts, 5, "an idempotent call may be retried");
}

#[tokio::test]
async fn a_one_shot_reader_is_not_retried() {
    let (addr, attempts) = serve(Script::RefuseThenAccept(1)).await;
    let client = Client::connect(&addr).await.expect("client");
    let err = client
        .call("echo")
        .payload(Payload::Reader(Box::new(std::io::Cursor::new(vec![1u8; 10]))))
        .retry(fast())
        .send()
        .await
        .expect_err("stdin-like payloads cannot be sent twice");
    assert_eq!((err.attempts, attempts.load(Ordering::SeqCst)), (1, 1));
}

#[tokio::test]
async fn connection_refused_is_a_connect_error_and_is_retried() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    drop(listener); // nothing listens here now
    let client = Client::connect(&addr).await.expect("lazy client");
    let err = client.call("echo").retry(RetryPolicy { max_attempts: 2, ..fast() }).send().await.expect_err("refused");
    assert_eq!(err.kind, aipod::client::ErrorKind::Connect, "{err:?}");
    assert_eq!(err.attempts, 2);
}

#[tokio::test]
async fn a_server_that_drains_away_during_retries_reports_why_it_refused() {
    let (addr, attempts) = serve(Script::RefuseThenVanish).await;
    let client = Client::connect(&addr).await.expect("client");
    // Retries 200 ms apart and more: the first reaches the server before it
    // vanishes (300 ms after its refusal), the later ones find it gone.
    let slower = RetryPolicy {
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_millis(400),
        ..RetryPolicy::default()
    };
    let err = client.call("echo").retry(slower).send().await.expect_err("refused, then gone");
    let answered = attempts.load(Ordering::SeqCst);
    assert!((1..5).contains(&answered), "the server answered {answered} of 5 attempts, then went away");
    assert_eq!((err.code, err.kind), (tonic::Code::Unavailable, aipod::client::ErrorKind::Status), "{err}");
    assert!(err.message.contains("shutting down"), "the server's reason, not a connection error: {err}");
    assert_eq!(err.attempts, 5);
}
