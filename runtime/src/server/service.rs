//! The gRPC edge: the `ai.AI` service. Turns frames into engine requests and
//! engine events into replies, and is the one place where runtime errors
//! become `tonic::Status`.

use std::{pin::Pin, sync::Arc, time::Instant};

use aipod::{contract, proto};
use bytes::Bytes;
use tokio_stream::{Stream, StreamExt};
use tonic::{
    Request, Response, Status, Streaming,
    codegen::http::{self, HeaderName},
    metadata::{MetadataMap, MetadataValue},
};

use crate::{
    engine::Engine,
    engine::backlog::Credit,
    engine::call,
    engine::event::{self, Event, EventReceiver, Failed},
    engine::heartbeat::Beating,
    engine::payload::Incoming,
    engine::request::CallRequest,
    engine::retain::{self, Owner, Retained, Stage},
    engine::status::CallStatus,
    error::Error,
    observe::metrics::{self, Direction},
    observe::trace::CallTrace,
    server::auth::{Auth, Identity},
    server::connection::ConnInfo,
    server::wire::{chunk, failed, inbound_error, reply, status},
};

pub(crate) mod header;
pub(crate) mod in_place;

/// The `ai.AI` service over an [`Engine`].
#[derive(Debug, Clone)]
pub(crate) struct AiService {
    engine: Arc<Engine>,
    auth: Option<Arc<Auth>>,
}

impl AiService {
    /// A service for `engine`; with `auth`, every call and describe must
    /// carry an accepted bearer token.
    pub(crate) fn new(engine: Arc<Engine>, auth: Option<Arc<Auth>>) -> Self {
        Self { engine, auth }
    }

    /// The caller's identity, or UNAUTHENTICATED; `None` when auth is off.
    fn authenticate(&self, metadata: &MetadataMap) -> crate::error::Result<Option<Identity>> {
        match &self.auth {
            None => Ok(None),
            Some(auth) => {
                auth.check(metadata.as_ref().get(http::header::AUTHORIZATION).map(|v| v.as_bytes())).map(Some)
            }
        }
    }
}

/// The reply stream of one `chaos` call.
pub(crate) type ReplyStream = Pin<Box<dyn Stream<Item = Result<proto::Reply, Status>> + Send>>;

/// What a call's frames come from: a `chaos` stream, or the frames of a
/// one-message `call`.
pub(crate) trait Frames: Stream<Item = Result<proto::Frame, Status>> + Unpin + Send + 'static {}

impl<S: Stream<Item = Result<proto::Frame, Status>> + Unpin + Send + 'static> Frames for S {}

#[tonic::async_trait]
impl proto::ai_server::Ai for AiService {
    async fn chaos(&self, request: Request<Streaming<proto::Frame>>) -> Result<Response<ReplyStream>, Status> {
        self.serve(request, false).await
    }

    async fn call(&self, request: Request<proto::Call>) -> Result<Response<ReplyStream>, Status> {
        self.engine.metrics.call_one_message();
        let size = request.get_ref().payload.len() as u64;
        if size > contract::CALL_PAYLOAD_MAX {
            return Err(status(Error::ResourceExhausted(format!(
                "a one-message call carries at most {} KiB of payload, this one {size} bytes; stream a larger \
                 payload with chaos",
                contract::CALL_PAYLOAD_MAX >> 10
            ))));
        }
        // The frames a `chaos` stream of this call would have carried.
        let frames = request.map(|call| {
            let header = proto::Frame { kind: call.header.map(proto::frame::Kind::Header) };
            let data =
                (!call.payload.is_empty()).then(|| proto::Frame { kind: Some(proto::frame::Kind::Data(call.payload)) });
            tokio_stream::iter(std::iter::once(header).chain(data).map(Ok))
        });
        self.serve(frames, true).await
    }

    async fn describe(&self, request: Request<proto::DescribeRequest>) -> Result<Response<proto::Description>, Status> {
        let identity = self.authenticate(request.metadata()).map_err(status)?;
        let mut description = describe(&self.engine);
        if let Some(id) = identity {
            // A token limited to some functions sees only those: what it
            // may not call stays as unknown to it as to PERMISSION_DENIED.
            for version in &mut description.versions {
                version.functions.retain(|f| id.may_call(f));
            }
        }
        Ok(Response::new(description))
    }

    async fn attach(&self, request: Request<proto::AttachRequest>) -> Result<Response<ReplyStream>, Status> {
        let identity = self.authenticate(request.metadata()).map_err(status)?;
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let owner = owner(identity.as_ref(), conn.as_ref());
        let call_id = request.into_inner().call_id;
        let not_found = || status(Error::NoRetainedCall(call_id.clone()));
        let record = self.engine.retention.find(&owner, &call_id).ok_or_else(not_found)?;
        if identity.as_ref().is_some_and(|id| !id.may_call(&record.func)) {
            return Err(not_found()); // no oracle
        }
        if let Stage::Receiving { .. } | Stage::Interrupted { .. } = record.stage() {
            return Err(status(Error::UploadIncomplete { call_id, held: record.status.received() }));
        }
        tracing::info!(%call_id, "a client attached to a retained call");
        Ok(self.follow(record, retain::Follower { piece: None, offset: None }))
    }
}

impl AiService {
    /// One call, from its frames (a `chaos` stream's, or a one-message
    /// `call`'s) to its reply stream.
    /// `quiet_start`: no first heartbeat when the answer is ready before it
    /// (the one-message call's replies).
    async fn serve<S: Frames>(&self, request: Request<S>, quiet_start: bool) -> Result<Response<ReplyStream>, Status> {
        let started = Instant::now();
        // Read in place: the metadata lives as long as the call's set-up.
        let (metadata, extensions, mut frames) = request.into_parts();
        let conn = extensions.get::<ConnInfo>().cloned();
        let local = conn.as_ref().and_then(|c| c.local);
        let caller = |key| metadata.as_ref().get(key).and_then(|v| v.to_str().ok());
        let trace = self.engine.tracing.start(caller(&TRACEPARENT), caller(&TRACESTATE), local);
        // Refused before the header names a version and function: counted
        // with both unknown.
        let unknown = |e: Error| self.refused(metrics::UNKNOWN, metrics::UNKNOWN, started, &trace, e);
        // Before anything else is read: no payload, no function-name oracle.
        let identity = self.authenticate(&metadata).map_err(unknown)?;
        let meta_func = metadata_str(&metadata, &FUNC_NAME).map_err(unknown)?;
        let meta_call_id = metadata_str(&metadata, &CALL_ID).map_err(unknown)?;
        let timeout = metadata_str(&metadata, &GRPC_TIMEOUT).map_err(unknown)?.and_then(header::grpc_timeout);
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        // The stream's share of the decode backlog, which its decoder gives back.
        let credit = extensions.get::<Arc<Credit>>().cloned();
        let mut header = match frames.next().await.transpose().map_err(|s| unknown(inbound_error(s)))? {
            Some(proto::Frame { kind: Some(proto::frame::Kind::Header(h)) }) => h,
            Some(_) => return Err(unknown(invalid("the first frame of a call must be its header"))),
            None => return Err(unknown(invalid("the call ended before its header"))),
        };
        let mut request =
            header::request(meta_func, meta_call_id, &mut header, header_limits(&self.engine)).map_err(|e| {
                // A refused header keeps its own strings.
                let (version, func) = self.engine.metric_labels(&header.version, meta_func.unwrap_or(&header.func));
                self.refused(&version, &func, started, &trace, e)
            })?;
        drop(header);
        request.deadline = deadline;
        let (func, version) = (request.func.clone(), request.version.clone());
        if identity.as_ref().is_some_and(|id| !id.may_call(&func)) {
            // Whether the function exists is not revealed to this token.
            return Err(self.refused(
                metrics::UNKNOWN,
                metrics::UNKNOWN,
                started,
                &trace,
                Error::PermissionDenied(func),
            ));
        }
        let owner = owner(identity.as_ref(), conn.as_ref());
        // A call id the server retains is resumed or attached to: a retried
        // retained call never runs twice.
        if let Some(record) = self.engine.retention.find(&owner, &request.call_id) {
            trace.identify(&func, &version, &request.call_id);
            trace.end(None, 0, 0);
            // Boxed: a resume's receiving state would otherwise be carried
            // by every call's future.
            return Box::pin(self.rejoin(record, &request, frames, credit)).await.map_err(status);
        }
        if request.resume_from.is_some() {
            let e = if self.engine.drain.is_draining() {
                Error::Draining
            } else {
                Error::InvalidArgument(format!(
                    "{}; send the whole payload again without resume_from",
                    Error::NoRetainedCall(request.call_id.clone())
                ))
            };
            let (version, func) = self.engine.metric_labels(&version, &func);
            return Err(self.refused(&version, &func, started, &trace, e));
        }
        let retain = request.retain;
        if retain.is_some() && identity.is_none() && conn.as_ref().is_some_and(|c| c.nameless_certificate) {
            let e = Error::FailedPrecondition(
                "this client certificate names no one (an empty subject and no URI name): it cannot retain calls, \
                 which are kept per identity; call without retain_seconds or use a certificate that names its holder"
                    .into(),
            );
            let (version, func) = self.engine.metric_labels(&version, &func);
            return Err(self.refused(&version, &func, started, &trace, e));
        }
        let encoding = request.payload.encoding;
        // A client that named its call knows the id: only one the server
        // makes goes back.
        let server_made = request.call_id.is_empty();
        let admitted = self.engine.admit(request).map_err(|e| {
            // Client input, cut and escaped as the status message has it.
            let (shown_func, shown_version) = (crate::error::echo(&func), crate::error::echo(&version));
            tracing::info!(func = %shown_func, version = %shown_version, status = %e.code(), error = %e.message(), "call refused");
            let (version, func) = self.engine.metric_labels(&version, &func);
            self.refused(&version, &func, started, &trace, e)
        })?;
        let call_id = admitted.request.call_id.as_str();
        trace.identify(&func, &admitted.version.name, call_id);
        let made_id = server_made.then(|| call_id.to_owned());

        let (tx, rx) = event::channel();
        let audience = match retain {
            None => call::Audience::Direct(tx, CallStatus::new()),
            Some(asked) => {
                let retention = &self.engine.retention;
                let retain = retention.effective(asked);
                if retain < asked {
                    tracing::info!(%call_id, asked_s = asked.as_secs(), retain_s = retain.as_secs(), "retain time capped by --max-retain");
                }
                let Some((record, resumes)) = retention.insert(owner, call_id, &func, retain, encoding) else {
                    return Err(status(Error::Aborted(format!(
                        "call {call_id:?} was started twice at once; retry to attach to it"
                    ))));
                };
                let me = retain::Follower { piece: Some(0), offset: None };
                let followed =
                    retain::follow(Arc::clone(retention), Arc::clone(&record), self.engine.heartbeat, me, tx);
                tokio::spawn(followed);
                call::Audience::Retained { record, resumes }
            }
        };
        // A direct call's heartbeats come from its reply stream.
        let beats = match &audience {
            call::Audience::Direct(_, status) => Some(Arc::clone(status)),
            call::Audience::Retained { .. } => None,
        };
        let chunks = self.chunks(frames, credit);
        if in_place::run(call::run(Arc::clone(&self.engine), admitted, trace, chunks, audience)) {
            self.engine.metrics.call_in_place();
        }
        Ok(self.respond(rx, made_id.as_deref(), beats, quiet_start))
    }

    /// A call whose id the server retains: resumes its interrupted upload
    /// with `frames`, or attaches to it when it is past its upload.
    async fn rejoin(
        &self,
        record: Arc<Retained>,
        request: &CallRequest,
        frames: impl Frames,
        credit: Option<Arc<Credit>>,
    ) -> crate::error::Result<Response<ReplyStream>> {
        let call_id = record.call_id().to_owned();
        if record.func != request.func {
            return Err(Error::InvalidArgument(format!(
                "call id {call_id:?} belongs to a retained call of {:?}, not {:?}; give a new call a new id",
                record.func, request.func
            )));
        }
        let me = match record.stage() {
            Stage::Receiving { .. } | Stage::Interrupted { .. } => {
                let asked = request.resume_from.unwrap_or(0);
                let chunks = self.chunks(frames, credit).map(|c| Box::pin(c) as _);
                let (offset, piece) = record.resume(chunks, asked, request.payload.encoding).await?;
                tracing::info!(%call_id, asked, offset, "resuming a retained call's upload");
                retain::Follower { piece: Some(piece), offset: Some(offset) }
            }
            _ => {
                tracing::info!(%call_id, "a client reattached to a retained call");
                retain::Follower { piece: None, offset: None }
            }
        };
        Ok(self.follow(record, me))
    }

    /// A reply stream following the retained call `record`.
    fn follow(&self, record: Arc<Retained>, me: retain::Follower) -> Response<ReplyStream> {
        let (tx, rx) = event::channel();
        let retention = Arc::clone(&self.engine.retention);
        tokio::spawn(retain::follow(retention, record, self.engine.heartbeat, me, tx));
        // Attached or resumed by the id the client gave.
        self.respond(rx, None, None, false)
    }

    /// The payload chunks of a call's frames, counted as they arrive, with
    /// the `credit` its stream took for them in the decode backlog.
    fn chunks(
        &self,
        frames: impl Frames,
        credit: Option<Arc<Credit>>,
    ) -> Incoming<impl Stream<Item = crate::error::Result<Bytes>> + Unpin + Send + 'static> {
        let metrics = Arc::clone(&self.engine.metrics);
        let chunks = frames.map(move |frame| {
            if let Ok(proto::Frame { kind: Some(proto::frame::Kind::Data(bytes)) }) = &frame {
                metrics.wire_bytes(Direction::In, bytes.len());
            }
            chunk(frame)
        });
        Incoming { chunks, credit }
    }

    /// The response of a call whose events arrive on `rx`, with heartbeats
    /// of `beats` in between (a direct call's; a retained call's followers
    /// send their own) — the first left out, with `quiet_start`, when the
    /// answer is ready before it — and the `x-aipod-call-id` of a call
    /// whose id the server made (`made_id`).
    fn respond(
        &self,
        rx: EventReceiver,
        made_id: Option<&str>,
        beats: Option<Arc<CallStatus>>,
        quiet_start: bool,
    ) -> Response<ReplyStream> {
        let metrics = Arc::clone(&self.engine.metrics);
        let to_reply = move |event: Result<Event, Failed>| {
            if let Ok(Event::Data(bytes)) = &event {
                metrics.wire_bytes(Direction::Out, bytes.len());
            }
            event.map(reply).map_err(failed)
        };
        let replies: ReplyStream = match beats {
            Some(status) => {
                let metrics = Arc::clone(&self.engine.metrics);
                let beating = Beating::new(rx, status, self.engine.heartbeat, metrics);
                let beating = if quiet_start { beating.quiet_start() } else { beating };
                Box::pin(beating.map(to_reply))
            }
            None => Box::pin(rx.map(to_reply)),
        };
        let mut response = Response::new(replies);
        if let Some(value) = made_id.and_then(call_id_value) {
            response.metadata_mut().insert(contract::CALL_ID_KEY, value);
        }
        response
    }

    /// A call refused before it was admitted: counted, and its status.
    fn refused(&self, version: &str, func: &str, started: Instant, trace: &CallTrace, e: Error) -> Status {
        self.engine.metrics.call_ended(version, func, Some(e.code()), started.elapsed());
        trace.identify(func, version, "");
        trace.end(Some(e.code()), 0, 0);
        status(e)
    }
}

/// Who owns the retained calls a request may see: its token, else its
/// client certificate's subject, else anyone.
fn owner(identity: Option<&Identity>, conn: Option<&ConnInfo>) -> Owner {
    identity.map(Identity::owner).or_else(|| conn.and_then(|c| c.client.clone()))
}

fn header_limits(engine: &Engine) -> header::HeaderLimits {
    let limits = engine.limits;
    header::HeaderLimits { max_kwargs_bytes: limits.max_kwargs_bytes, max_payload_bytes: limits.max_payload_bytes }
}

/// The description of what `engine` serves.
pub(crate) fn describe(engine: &Engine) -> proto::Description {
    let default = &engine.versions.default_version().name;
    let limits = engine.limits;
    proto::Description {
        versions: engine
            .versions
            .iter()
            .map(|v| proto::ModelVersion {
                version: v.name.clone(),
                default: &v.name == default,
                functions: v.functions(),
                spec: v.spec.clone(),
                ready: v.model.is_ready(),
            })
            .collect(),
        limits: Some(proto::Limits {
            max_payload_bytes: limits.max_payload_bytes,
            max_kwargs_bytes: limits.max_kwargs_bytes,
            max_concurrent_calls: limits.max_concurrent_calls as u32,
            max_queued_calls: limits.max_queued_calls as u32,
            max_message_bytes: limits.max_message_bytes,
        }),
        heartbeat_interval_ms: engine.heartbeat.map_or(0, |d| d.as_millis() as u64),
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        draining: engine.drain.is_draining(),
        features: vec![contract::FEATURE_CALL.to_owned()],
    }
}

fn invalid(message: &str) -> Error {
    Error::InvalidArgument(message.to_owned())
}

/// The `x-aipod-call-id` a response carries, marked never to be indexed by
/// HPACK: a value new on every call would only churn both ends' header
/// tables (evicting the headers worth keeping), and a retained call's id is
/// the key to it.
fn call_id_value(call_id: &str) -> Option<MetadataValue<tonic::metadata::Ascii>> {
    let mut value = MetadataValue::try_from(call_id).ok()?;
    value.set_sensitive(true);
    Some(value)
}

// The metadata a call is read for, named once: looked up by a parsed name,
// a lookup only hashes it.
const FUNC_NAME: HeaderName = HeaderName::from_static(contract::FUNC_NAME_KEY);
const CALL_ID: HeaderName = HeaderName::from_static(contract::CALL_ID_KEY);
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const TRACEPARENT: HeaderName = HeaderName::from_static(aipod::telemetry::TRACEPARENT);
const TRACESTATE: HeaderName = HeaderName::from_static(aipod::telemetry::TRACESTATE);

fn metadata_str<'a>(metadata: &'a MetadataMap, key: &HeaderName) -> Result<Option<&'a str>, Error> {
    let value = metadata.as_ref().get(key);
    value.map(|v| v.to_str().map_err(|_| invalid(&format!("metadata {key} must be ASCII text")))).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_id_goes_back_never_indexed() {
        let value = call_id_value("abc-123").expect("ascii");
        assert_eq!(value, "abc-123");
        assert!(value.is_sensitive(), "sent as a never-indexed literal");
        assert!(call_id_value("bad\nid").is_none());
    }
}
