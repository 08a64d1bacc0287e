//! The floor of the side-by-side benchmark (`bench/run`, system `floor`):
//! the smallest tonic server of `proto/ai.proto` that answers `chaos`, and
//! the one-message `call` its `describe` lists, the way the bench client
//! expects — `echo` sends the kwargs and the payload back, any other
//! function reads the payload and discards it, answering
//! `{"size": <declared>}`. No spool, no queue, no heartbeats, no decoding:
//! what tonic and h2 cost a call on this machine, with the runtime's
//! HTTP/2 settings, which aipod's own figures are compared with.
//!
//! ```text
//! bench-floor --listen 127.0.0.1:PORT
//! ```

#![allow(missing_docs, reason = "a benchmark binary")]

use std::pin::Pin;

use aipod::proto::{
    self, Frame, Reply,
    ai_server::{Ai, AiServer},
    frame, reply,
};
use bytes::{Bytes, BytesMut};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

type Replies = Pin<Box<dyn Stream<Item = Result<Reply, Status>> + Send>>;

struct Floor;

#[tonic::async_trait]
impl Ai for Floor {
    async fn chaos(&self, request: Request<Streaming<Frame>>) -> Result<Response<Replies>, Status> {
        let mut frames = request.into_inner();
        let header = match frames.message().await? {
            Some(Frame { kind: Some(frame::Kind::Header(header)) }) => header,
            _ => return Err(Status::invalid_argument("a call starts with its header")),
        };
        let echo = header.func == "echo";
        let mut payload = BytesMut::new();
        // The payload ends when the client half-closes its side.
        while let Some(frame) = frames.message().await? {
            if let Some(frame::Kind::Data(data)) = frame.kind
                && echo
            {
                payload.extend_from_slice(&data);
            }
        }
        Ok(answer(&header, payload.freeze()))
    }

    async fn call(&self, request: Request<proto::Call>) -> Result<Response<Replies>, Status> {
        let call = request.into_inner();
        let header = call.header.ok_or_else(|| Status::invalid_argument("a call starts with its header"))?;
        Ok(answer(&header, call.payload))
    }

    async fn describe(&self, _: Request<proto::DescribeRequest>) -> Result<Response<proto::Description>, Status> {
        // Only what the bench client asks: whether `call` is served.
        Ok(Response::new(proto::Description {
            features: vec![aipod::contract::FEATURE_CALL.to_owned()],
            ..Default::default()
        }))
    }

    async fn attach(&self, _: Request<proto::AttachRequest>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented("the floor serves chaos only"))
    }
}

/// The replies to a call of `header` whose whole payload is `payload`:
/// the result, then for `echo` the payload back.
fn answer(header: &proto::Header, payload: Bytes) -> Response<Replies> {
    let size = header.payload_size.unwrap_or(0);
    let echo = header.func == "echo";
    let (json, payload) = if echo {
        let kwargs: serde_json::Value = serde_json::from_slice(&header.kwargs_json).unwrap_or_default();
        (serde_json::json!({ "kwargs": kwargs, "size": size }), Some(payload))
    } else {
        (serde_json::json!({ "size": size }), None)
    };
    let result = proto::Result {
        json: json.to_string().into_bytes().into(),
        payload_size: payload.as_ref().map(|p| p.len() as u64),
        encoding: header.encoding,
    };
    let mut replies = vec![Ok(Reply { kind: Some(reply::Kind::Result(result)) })];
    if let Some(bytes) = payload.filter(|p| !p.is_empty()) {
        replies.push(Ok(Reply { kind: Some(reply::Kind::Data(bytes)) }));
    }
    Response::new(Box::pin(tokio_stream::iter(replies)))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = match (args.next().as_deref(), args.next()) {
        (Some("--listen"), Some(addr)) => addr,
        _ => return Err("usage: bench-floor --listen HOST:PORT".into()),
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("ai.AI", tonic_health::ServingStatus::Serving).await;
    // The runtime's defaults: 1 MiB stream and 2 MiB connection windows,
    // 2 MiB messages, the same keepalive.
    tonic::transport::Server::builder()
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(2 << 20)
        .http2_keepalive_interval(Some(aipod::contract::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(aipod::contract::KEEPALIVE_TIMEOUT))
        .add_service(health)
        .add_service(AiServer::new(Floor).max_decoding_message_size(2 << 20))
        .serve(listen.parse()?)
        .await?;
    Ok(())
}
