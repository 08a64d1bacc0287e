//! The attempt loops: a call's spec, its retries and rejoins, and one
//! attempt from the header to the result.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{CallOutput, FRAME_DEPTH, Output, Payload, Progress, ProgressFn};
use super::{
    replies::{Replies, Sink},
    upload::{Source, Upload},
};
use crate::{
    client::{
        Client,
        error::{CallError, ErrorKind},
        retry::{RetryPolicy, should_rejoin, should_retry},
        trace::{CallTrace, Parent},
    },
    codec::Compression,
    contract,
    proto::{self, Frame, Phase, frame, reply},
};

/// Whether `status` says the server has no such method (one older than
/// `call`, behind a router that lists it), not that a function is unknown:
/// gRPC servers answer a missing method UNIMPLEMENTED with no message
/// (tonic's router), "Not yet implemented" (tonic's default stubs) or
/// "Method not found!" (gRPC core); aipod names the function.
fn method_missing(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unimplemented
        && matches!(status.message(), "" | "Not yet implemented" | "Method not found!")
}

/// Everything about a call but its payload and output.
pub(super) struct Spec {
    pub(super) client: Client,
    pub(super) func: String,
    pub(super) version: String,
    pub(super) upstream: Option<String>,
    pub(super) kwargs: serde_json::Map<String, serde_json::Value>,
    pub(super) compression: Compression,
    pub(super) call_id: Option<String>,
    pub(super) timeout: Option<Duration>,
    pub(super) idempotent: bool,
    pub(super) retry: RetryPolicy,
    pub(super) progress: Option<ProgressFn>,
    pub(super) trace_parent: Option<Parent>,
    /// Retain the call this long without a client.
    pub(super) retain: Option<Duration>,
    /// Only pick up the retained call `call_id` (`Client::attach`).
    pub(super) attach_only: bool,
}

/// How an attempt opens its call.
pub(super) enum Opening {
    /// A new call, sending the payload.
    Call(Source),
    /// Resumes a retained call's upload from the offset the server holds.
    Resume(Source),
    /// Attaches to a retained call.
    Attach,
}

/// What one attempt came to.
pub(super) struct Attempt {
    pub(super) result: Result<CallOutput, CallError>,
    /// The output, handed back for the next attempt.
    pub(super) output: Output,
    /// The server accepted the call's header (at least one reply came).
    pub(super) accepted: bool,
}

impl Spec {
    pub(super) async fn send(&self, payload: Payload, output: Output) -> Result<CallOutput, CallError> {
        let trace = CallTrace::start(self.trace_parent.as_ref(), &self.func, &self.client.target);
        let result = self.send_traced(payload, output, &trace).await;
        match &result {
            Ok(out) => trace.end("OK", out.call_id.as_deref()),
            Err(e) => trace.end(e.code_name(), e.call_id.as_deref()),
        }
        result
    }

    pub(super) async fn send_traced(
        &self,
        mut payload: Payload,
        output: Output,
        trace: &CallTrace,
    ) -> Result<CallOutput, CallError> {
        if self.retain.is_some() || self.attach_only {
            return self.send_retained(payload, output, trace).await;
        }
        let mut output = Some(output);
        let replayable = !matches!(payload, Payload::Reader(_));
        let mut attempt = 1;
        // What the server itself last said: a server that refused (draining)
        // and then went away is reported by its reason, not as unreachable.
        let mut said: Option<CallError> = None;
        loop {
            let source = Source::of(&mut payload);
            let tried = self.attempt(Opening::Call(source), output.take().unwrap_or(Output::Discard), trace).await;
            output = Some(tried.output);
            match tried.result {
                Ok(mut out) => {
                    out.attempts = attempt;
                    return Ok(out);
                }
                Err(e) => {
                    let e = self.stamp(e, attempt);
                    if attempt >= self.retry.max_attempts || !should_retry(&e, replayable, self.idempotent) {
                        return Err(match (e.kind, said) {
                            (ErrorKind::Connect, Some(mut earlier)) => {
                                earlier.attempts = attempt;
                                earlier
                            }
                            _ => e,
                        });
                    }
                    if e.kind == ErrorKind::Status {
                        said = Some(e.clone());
                    }
                    let wait = self.retry.backoff(attempt);
                    attempt += 1;
                    self.pause(attempt, wait, &e).await;
                }
            }
        }
    }

    /// A retained call (or an attach): after the server accepted it, a
    /// broken stream is followed by a reattach — or a resume of the upload
    /// when the server says it is incomplete — with backoff, until the
    /// call's deadline or its retain time since the last contact passes.
    pub(super) async fn send_retained(
        &self,
        mut payload: Payload,
        output: Output,
        trace: &CallTrace,
    ) -> Result<CallOutput, CallError> {
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        let retain = self.retain.unwrap_or(Duration::ZERO);
        let replayable = !matches!(payload, Payload::Reader(_));
        let mut output = Some(output);
        // Whether the server accepted the call: from then on it is rejoined,
        // never started again.
        let mut accepted = self.attach_only;
        let (mut attempt, mut rejoins) = (1, 0);
        let mut last_contact = tokio::time::Instant::now();
        loop {
            let was_writer = matches!(output, Some(Output::Writer(_)));
            let out = output.take().unwrap_or(Output::Discard);
            let mut tried = if accepted {
                let attached = self.attempt(Opening::Attach, out, trace).await;
                match attached.result {
                    Err(e) if e.code == tonic::Code::FailedPrecondition && e.kind == ErrorKind::Status => {
                        if !replayable {
                            let mut e = e;
                            e.message = format!(
                                "{}; the payload came from a stream that cannot be read again, so the upload \
                                 cannot be resumed",
                                e.message
                            );
                            return Err(self.finish_error(e, attempt));
                        }
                        self.attempt(Opening::Resume(Source::of(&mut payload)), attached.output, trace).await
                    }
                    _ => attached,
                }
            } else {
                self.attempt(Opening::Call(Source::of(&mut payload)), out, trace).await
            };
            if tried.accepted {
                last_contact = tokio::time::Instant::now();
            }
            let consumed_writer = was_writer && !matches!(tried.output, Output::Writer(_));
            output = Some(std::mem::replace(&mut tried.output, Output::Discard));
            let e = match tried.result {
                Ok(mut out) => {
                    out.attempts = attempt;
                    return Ok(out);
                }
                Err(e) => e,
            };
            accepted |= tried.accepted;
            let now = tokio::time::Instant::now();
            // The server keeps an unattended call its retain time; a call
            // with a deadline is worth rejoining until then.
            let limit = deadline.unwrap_or(last_contact + retain);
            if accepted && should_rejoin(&e) && now < limit && !consumed_writer {
                rejoins += 1;
                attempt += 1;
                self.pause(attempt, self.retry.backoff(rejoins).min(limit - now), &e).await;
                continue;
            }
            if !accepted && attempt < self.retry.max_attempts && should_retry(&e, replayable, self.idempotent) {
                let wait = self.retry.backoff(attempt);
                attempt += 1;
                self.pause(attempt, wait, &e).await;
                continue;
            }
            return Err(self.finish_error(e, attempt));
        }
    }

    /// Logs and reports that attempt number `attempt` follows `wait` after
    /// `error`, then waits.
    pub(super) async fn pause(&self, attempt: u32, wait: Duration, error: &CallError) {
        let call_id = self.call_id.as_deref().unwrap_or_default();
        tracing::warn!(func = %self.func, call_id, attempt, wait_ms = wait.as_millis() as u64, error = %error, "retrying call");
        self.report(&Progress::Retrying { attempt, wait, error: error.to_string() });
        tokio::time::sleep(wait).await;
    }

    /// Fills in what a failed attempt's error reports about the call: its
    /// function, the attempts so far and the target.
    pub(super) fn stamp(&self, mut e: CallError, attempts: u32) -> CallError {
        e.func.clone_from(&self.func);
        e.attempts = attempts;
        e.target = Some(self.client.target.clone());
        e
    }

    /// A retained call's final error: stamped, with the call's id when the
    /// server named none (it is the key to attach with).
    pub(super) fn finish_error(&self, e: CallError, attempts: u32) -> CallError {
        let mut e = self.stamp(e, attempts);
        if e.call_id.is_none() {
            e.call_id.clone_from(&self.call_id);
        }
        e
    }

    pub(super) fn report(&self, p: &Progress) {
        if let Some(f) = &self.progress {
            f(p);
        }
    }

    /// One attempt; hands the output back so a retry can reuse it.
    pub(super) async fn attempt(&self, opening: Opening, output: Output, trace: &CallTrace) -> Attempt {
        let failed = |e: CallError, output: Output| Attempt { result: Err(e), output, accepted: false };
        let call_id = self.call_id.clone().unwrap_or_default();
        let mut grpc = self.client.grpc.clone();
        let (response, upload, deferred) = match opening {
            Opening::Attach => {
                let mut request = tonic::Request::new(proto::AttachRequest { call_id: call_id.clone() });
                self.decorate(&mut request, trace);
                match grpc.attach(request).await {
                    Ok(r) => (r, None, None),
                    Err(status) => return failed(CallError::from_status(&status), output),
                }
            }
            opening => {
                let (source, resume) = match opening {
                    Opening::Call(source) => (source, false),
                    Opening::Resume(source) => (source, true),
                    Opening::Attach => unreachable!("handled above"),
                };
                let total = match source.size() {
                    Ok(total) => total,
                    Err(e) => return failed(e, output),
                };
                let encoding = self.compression.encoding(total);
                let header = proto::Header {
                    func: self.func.clone(),
                    version: self.version.clone(),
                    kwargs_json: serde_json::to_vec(&self.kwargs).unwrap_or_else(|_| b"{}".to_vec()).into(),
                    payload_size: total,
                    encoding: proto::Encoding::from(encoding) as i32,
                    call_id: call_id.clone(),
                    retain_seconds: self.retain.map(|d| d.as_secs().max(1)),
                    // Ask for everything: the server answers with what it holds.
                    resume_from: resume.then(|| total.unwrap_or(u64::MAX)),
                };
                let (tx, mut rx) = mpsc::channel::<Frame>(FRAME_DEPTH);
                if tx.send(Frame { kind: Some(frame::Kind::Header(header)) }).await.is_err() {
                    return failed(CallError::local("the request stream closed before the header"), output);
                }
                let upload = Upload { source, tx, encoding, compression: self.compression, total };
                let (upload, deferred) = if resume {
                    // Sent from the offset the server's first heartbeat names.
                    (None, Some(upload))
                } else if upload.fits_in_line() {
                    if let Err(e) = upload.send_in_line(self.progress.clone()).await {
                        return failed(e, output);
                    }
                    // The whole call is queued: one message when it fits and
                    // the server serves `call`, else these frames by chaos.
                    let frames = std::iter::from_fn(|| rx.try_recv().ok()).collect::<Vec<_>>();
                    let opened = match self.one_message(&frames).await {
                        Some(one) => match grpc.call(self.request(one, trace)).await {
                            Err(status) if method_missing(&status) => {
                                // A server without `call` behind this upstream.
                                self.client.remember_one_message(self.upstream(), false);
                                None
                            }
                            opened => Some(opened),
                        },
                        None => None,
                    };
                    let opened = match opened {
                        Some(opened) => opened,
                        None => grpc.chaos(self.request(tokio_stream::iter(frames), trace)).await,
                    };
                    match opened {
                        Ok(r) => return self.follow(r, None, None, output).await,
                        Err(status) => return failed(CallError::from_status(&status), output),
                    }
                } else {
                    (Some(upload.spawn(0, self.progress.clone())), None)
                };
                match grpc.chaos(self.request(ReceiverStream::new(rx), trace)).await {
                    Ok(r) => (r, upload, deferred),
                    Err(status) => {
                        if let Some(u) = upload {
                            u.abort();
                        }
                        return failed(CallError::from_status(&status), output);
                    }
                }
            }
        };
        self.follow(response, upload, deferred, output).await
    }

    /// The call as one `Call` message, when its queued `frames` (the header
    /// and at most one data frame) fit one and the server serves `call`.
    async fn one_message(&self, frames: &[Frame]) -> Option<proto::Call> {
        let (header, payload) = match frames {
            [Frame { kind: Some(frame::Kind::Header(h)) }] => (h, bytes::Bytes::new()),
            [Frame { kind: Some(frame::Kind::Header(h)) }, Frame { kind: Some(frame::Kind::Data(d)) }]
                if d.len() as u64 <= contract::CALL_PAYLOAD_MAX =>
            {
                (h, d.clone())
            }
            _ => return None,
        };
        if !self.client.has_one_message(self.upstream()).await {
            return None;
        }
        Some(proto::Call { header: Some(header.clone()), payload })
    }

    /// The upstream this call goes to: its own, else the client's.
    fn upstream(&self) -> Option<&str> {
        self.upstream.as_deref().or(self.client.upstream.as_deref())
    }

    /// A call's request carrying `message`: its metadata, function name and
    /// deadline.
    fn request<T>(&self, message: T, trace: &CallTrace) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        self.decorate(&mut request, trace);
        if let Ok(v) = self.func.parse() {
            request.metadata_mut().insert(contract::FUNC_NAME_KEY, v);
        }
        if let Some(t) = self.timeout {
            request.set_timeout(t);
        }
        request
    }

    /// Follows an opened call's replies to its result, sending the rest of
    /// the payload (`upload`, or `deferred` from the offset a resuming
    /// server names) beside them.
    async fn follow(
        &self,
        response: tonic::Response<tonic::Streaming<proto::Reply>>,
        mut upload: Option<tokio::task::JoinHandle<Result<(), CallError>>>,
        mut deferred: Option<Upload>,
        output: Output,
    ) -> Attempt {
        // The client names every call (`send`); a server sends the id back
        // only when it made one.
        let call_id = self.call_id.clone();
        let mut replies = response.into_inner();
        let mut state = Replies { progress: self.progress.clone(), ..Replies::default() };
        let mut output = Some(output);
        let result = loop {
            let next = tokio::select! {
                biased;
                done = async { upload.as_mut().expect("present while polled").await }, if upload.is_some() => {
                    upload = None;
                    match done {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => break Err(e),
                        Err(e) => break Err(CallError::local(format!("payload reader failed: {e}"))),
                    }
                }
                next = replies.message() => next,
            };
            match next {
                Ok(Some(proto::Reply { kind: Some(kind) })) => {
                    if let (Some(pending), reply::Kind::Heartbeat(h)) = (deferred.take(), &kind) {
                        // A resume: the server holds the payload up to here.
                        if h.phase == Phase::Receiving as i32 {
                            match pending.resume_at(h.received_bytes) {
                                Ok(pending) => upload = Some(pending.spawn(h.received_bytes, self.progress.clone())),
                                Err(e) => break Err(e),
                            }
                        }
                    }
                    if let Err(e) = state.on_reply(kind, &mut output).await {
                        break Err(e);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break state.finish().await,
                Err(status) => break Err(CallError::from_status(&status)),
            }
        };
        if let Some(u) = upload {
            u.abort();
        }
        let handed_back = state.sink.take().map(Sink::into_output).or(output).unwrap_or(Output::Discard);
        let accepted = state.heartbeats > 0 || state.result.is_some();
        let result = result
            .map(|(json, payload_size)| CallOutput {
                json,
                call_id: call_id.clone(),
                payload_size,
                heartbeats: state.heartbeats,
                attempts: 1,
            })
            .map_err(|mut e| {
                e.call_id = e.call_id.or(call_id);
                e.phase = e.phase.or(state.phase);
                e
            });
        Attempt { result, output: handed_back, accepted }
    }

    /// Adds the call's metadata to `request`: the client's own, the trace
    /// context, upstream and a retained call's id.
    pub(super) fn decorate<T>(&self, request: &mut tonic::Request<T>, trace: &CallTrace) {
        self.client.decorate(request);
        let metadata = request.metadata_mut();
        trace.inject(metadata);
        if let Some(v) = self.upstream.as_deref().and_then(|u| u.parse().ok()) {
            metadata.insert(contract::UPSTREAM_KEY, v);
        }
        // In metadata only where a router must find the replica that holds
        // the call (call affinity): a retained call, its resumes and
        // attaches. Any other call's id goes in its header alone, so no
        // header costs either end an HPACK literal.
        if (self.retain.is_some() || self.attach_only)
            && let Some(v) = self.call_id.as_deref().and_then(|c| c.parse().ok())
        {
            metadata.insert(contract::CALL_ID_KEY, v);
        }
    }
}
