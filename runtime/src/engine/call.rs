//! A call's life after admission: receive the payload, wait for a slot, run
//! the model, send the result — with heartbeats throughout, cancellation when
//! the client leaves, and the spool directory removed however it ends. A
//! retained call instead outlives its client: its upload can be resumed, and
//! its result is kept for whoever attaches.

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::Poll,
    time::Instant,
};

use aipod::codec::Encoding;
use bytes::Bytes;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    engine::event::{Event, Events, Failed},
    engine::payload::{self, Keep},
    engine::request::CallRequest,
    engine::result,
    engine::retain::{self, Outcome, Resumes, Retained, Stage},
    engine::status::{CallStatus, Phase},
    engine::{Admitted, Engine},
    error::{Error, Result},
    model::MAX_RESULT_JSON,
    model::input::Input,
    model::output::{OutputDir, ResultPayload},
    model::progress::Progress,
    model::spool::CallPaths,
    model::{ModelCall, ModelOutput},
    observe::metrics::{CallSeries, Direction, Metrics},
    observe::trace::CallTrace,
};

/// Who hears of a call: its one client, or — when retained — whoever
/// attaches to it.
pub(crate) enum Audience {
    /// The client that sent it, and the status its heartbeats report
    /// (the service's reply stream sends them); a closed channel means it
    /// left, and the call is cancelled.
    Direct(Events, Arc<CallStatus>),
    /// Nobody in particular: the call goes on without a client and keeps
    /// its outcome in `record`; its upload resumes from `resumes`.
    Retained {
        /// The retained call.
        record: Arc<Retained>,
        /// Resumes of its upload.
        resumes: Resumes,
    },
}

/// Runs an admitted call to its end, telling `audience`.
pub(crate) async fn run<S>(
    engine: Arc<Engine>,
    call: Admitted,
    trace: CallTrace,
    chunks: payload::Incoming<S>,
    audience: Audience,
) where
    S: Stream<Item = Result<Bytes>> + Unpin + Send + 'static,
{
    let started = Instant::now();
    // `--max-call-duration`: the call's whole life, result included.
    let too_long = engine.limits.max_call_duration.map(|limit| (started + limit, limit));
    let Admitted { request, version, paths, memory, in_flight } = call;
    // The call's slot; a retained upload gives it up while it waits for a resume.
    let mut in_flight = Some(in_flight);
    let series = engine.metrics.series(&version.name, &request.func);
    let _counted = engine.metrics.in_flight(&series);
    let marks = Marks::default();
    let (status, events, mut retained) = match audience {
        Audience::Direct(events, status) => (status, Some(events), None),
        Audience::Retained { record, resumes } => (Arc::clone(&record.status), None, Some((record, resumes))),
    };
    let cancel = CancellationToken::new();
    let span = tracing::info_span!(
        "call",
        call_id = %request.call_id,
        func = %request.func,
        version = %version.name,
        trace_id = tracing::field::Empty,
    );
    if let Some(id) = trace.trace_id() {
        span.record("trace_id", id);
    }
    marks.enter(Phase::Receiving, &status, &trace);
    // The call id, function and kwargs go to the model, moved, not copied.
    let CallRequest { call_id, func, kwargs, payload: spec, deadline, .. } = request;

    let outcome = {
        // Pinned where it is built and instrumented by reference: the work
        // (most of this future's size) is never moved.
        let work = std::pin::pin!(async {
            let tap = version.model.tap(&func, &kwargs);
            let limits = payload::ReceiveLimits {
                timeout: engine.limits.receive_timeout,
                min_rate: engine.limits.min_receive_rate,
                window_log: engine.limits.max_zstd_window_log,
                zstd: Arc::clone(&engine.zstd),
            };
            let entries = paths.entries();
            let received = match &mut retained {
                None => {
                    let keep = if memory.is_some() { Keep::Memory } else { Keep::File(entries) };
                    payload::receive(chunks, keep, spec, limits, tap, &status).await?
                }
                Some((record, resumes)) => {
                    let upload = payload::Upload::start(Keep::File(entries), spec, limits, tap)?;
                    let held = in_flight.take().expect("a retained call starts with its slot");
                    let mut held = retain::Slot::new(held, &engine.drain, engine.max_calls());
                    // Boxed, as a streamed payload's decoding is: retained
                    // calls are few, and small calls should not carry it.
                    let received = Box::pin(retain::receive(
                        &engine.retention,
                        record,
                        resumes,
                        &mut held,
                        upload,
                        chunks.map(|c| Box::pin(c) as _),
                    ))
                    .await;
                    in_flight = held.held;
                    let received = received?;
                    record.set_stage(Stage::Working);
                    received
                }
            };
            marks.enter(Phase::Queued, &status, &trace);
            let _permit = version
                .queue
                .acquire(&status)
                .await
                .map_err(|full| Error::Busy(format!("model version {:?} is busy: {full}", version.name)))?;
            marks.enter(Phase::Running, &status, &trace);
            let output = version
                .model
                .call(ModelCall {
                    call_id,
                    func,
                    kwargs,
                    input: Input::new(received.memory, Arc::clone(entries)),
                    input_size: received.size,
                    tapped: received.tapped,
                    output_dir: OutputDir::new(Arc::clone(entries)),
                    progress: Progress::new(Arc::clone(&status) as _),
                    cancel: cancel.clone(),
                    traceparent: trace.traceparent(),
                })
                .await?;
            Ok::<_, Error>(output)
        });
        let mut work = work.instrument(span.clone());
        // Heartbeats are the reply stream's (`heartbeat::Beating`), or for a
        // retained call its followers': this task wakes only for its own work.
        //
        // Work that finishes at its first poll (a small call whose payload
        // came with its header) needs none of the watchers below: nothing
        // registers with the client's channel, the drain or a timer.
        match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut work).poll(cx))).await {
            Poll::Ready(done) => done,
            Poll::Pending => {
                let left = async {
                    match &events {
                        Some(events) => events.closed().await,
                        None => std::future::pending().await,
                    }
                };
                let deadline = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                let ended_by_limit = async {
                    match too_long {
                        Some((at, limit)) => {
                            tokio::time::sleep_until(at.into()).await;
                            limit
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    () = left => Err(Error::Cancelled),
                    () = deadline => Err(Error::DeadlineExceeded),
                    limit = ended_by_limit => Err(Error::CallTooLong(limit)),
                    () = engine.drain.abandoned() => Err(Error::ShutDown),
                    r = &mut work => r,
                }
            }
        }
    };
    // Whatever happened, nothing may keep working for this call.
    cancel.cancel();

    let mut paths = Some(paths);
    let result = match (outcome, &events) {
        (Ok(output), Some(events)) => {
            let paths = paths.as_ref().expect("kept until the end");
            let send = send_output(paths, output, spec.encoding, &status, &marks, &trace, events);
            match too_long {
                Some((at, limit)) => {
                    tokio::time::timeout_at(at.into(), send).await.unwrap_or(Err(Error::CallTooLong(limit)))
                }
                None => send.await,
            }
        }
        (Ok(output), None) => match kept_output(paths.as_ref().expect("kept until the end"), output) {
            Ok((outcome, size)) => {
                if let Some((record, _)) = &retained {
                    engine.retention.finish(record, outcome, paths.take());
                }
                Ok(size)
            }
            Err(e) => Err(e),
        },
        (Err(e), _) => Err(e),
    };
    let ended = Ended {
        metrics: &engine.metrics,
        series: &series,
        span: &span,
        started,
        status: &status,
        marks: &marks,
        trace: &trace,
    };
    let failure = record_end(&ended, result);
    if let Some(error) = failure {
        let phase = status.phase();
        match (&events, &retained) {
            (Some(events), _) => {
                let _ = events.send(Err(Failed { error, phase })).await;
            }
            (None, Some((record, _))) => {
                let outcome = Outcome::Failed { code: error.code(), message: error.message(), phase };
                engine.retention.finish(record, outcome, None);
            }
            (None, None) => {}
        }
    }
    drop(paths);
    drop(memory);
    drop(in_flight);
}

/// The call that ended, for [`record_end`].
struct Ended<'a> {
    metrics: &'a Metrics,
    series: &'a CallSeries,
    span: &'a tracing::Span,
    started: Instant,
    status: &'a CallStatus,
    marks: &'a Marks,
    trace: &'a CallTrace,
}

/// What a call leaves when it ends — its metrics, the end of its trace, one
/// log line — given how it ended (`result`: the result payload's size);
/// the error when it failed.
fn record_end(ended: &Ended<'_>, result: Result<u64>) -> Option<Error> {
    let Ended { metrics, series, span, started, status, marks, trace } = *ended;
    let bytes_in = status.received();
    let took = started.elapsed();
    let duration_ms = took.as_millis() as u64;
    metrics.ended(series, result.as_ref().err().map(Error::code), took);
    trace.end(result.as_ref().err().map(Error::code), bytes_in, *result.as_ref().unwrap_or(&0));
    marks.observe(|phase, d| metrics.phase(series, phase, d), started, Instant::now());
    metrics.payload_bytes(series, Direction::In, bytes_in);
    if let Ok(bytes_out) = &result {
        metrics.payload_bytes(series, Direction::Out, *bytes_out);
    }
    let _enter = span.enter();
    match result {
        Ok(bytes_out) => {
            tracing::info!(bytes_in, bytes_out, duration_ms, status = "OK", "call finished");
            None
        }
        Err(e) => {
            let code = e.code();
            if matches!(e, Error::Internal(_) | Error::ModelCrashed(_)) {
                tracing::error!(bytes_in, duration_ms, status = %code, error = %e.message(), "call failed");
            } else {
                tracing::info!(bytes_in, duration_ms, status = %code, error = %e.message(), "call finished");
            }
            Some(e)
        }
    }
}

/// A retained call's result, kept for its clients: the JSON and the result
/// payload's file and size (a payload in memory is written to the output
/// directory: kept results live on the spool, within `--retain-bytes`).
fn kept_output(paths: &CallPaths, output: ModelOutput) -> Result<(Outcome, u64)> {
    let ModelOutput { json, payload } = output;
    let payload = match outgoing(paths, payload)? {
        None => None,
        Some(Outgoing::File(path, size)) => Some((path, size)),
        Some(Outgoing::Bytes(bytes)) => {
            let written = paths.entries().output().join("result");
            std::fs::create_dir_all(paths.entries().output())
                .and_then(|()| std::fs::write(&written, &bytes))
                .map_err(|e| Error::spool_io("keeping the result payload", e))?;
            Some((written, bytes.len() as u64))
        }
    };
    let json = result_json(&json)?;
    if payload.as_ref().is_none_or(|(path, _)| path != paths.input()) {
        // The input is no longer needed: only the result is kept.
        paths.remove_input();
    }
    let size = payload.as_ref().map_or(0, |p| p.1);
    Ok((Outcome::Result { json: json.into(), payload }, size))
}

/// The model's result JSON, serialized and checked against
/// [`MAX_RESULT_JSON`] as soon as the model returns: a result too large to
/// send fails with a message naming the limit, never in the encoder.
fn result_json(json: &serde_json::Value) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(json).map_err(|e| Error::Internal(format!("result JSON: {e}")))?;
    if json.len() > MAX_RESULT_JSON {
        return Err(Error::ResourceExhausted(format!(
            "the model's result JSON is {} bytes; a result may be at most {MAX_RESULT_JSON} bytes (8 MiB less 64 \
             KiB): return large outputs as the result payload (a file or bytes), which streams",
            json.len()
        )));
    }
    Ok(json)
}

/// A result payload, checked and ready to send.
enum Outgoing {
    /// A file in the call's output (or its input), and its size.
    File(PathBuf, u64),
    /// Bytes the model returned.
    Bytes(Bytes),
}

/// The model's result payload: a file is checked to lie in the call's
/// output and measured; bytes go as they are.
fn outgoing(paths: &CallPaths, payload: Option<ResultPayload>) -> Result<Option<Outgoing>> {
    match payload {
        None => Ok(None),
        Some(ResultPayload::Bytes(bytes)) => Ok(Some(Outgoing::Bytes(bytes))),
        Some(ResultPayload::File(path)) => {
            let path = paths.contain_output(&path).map_err(Error::ModelCrashed)?;
            let size = std::fs::metadata(&path).map_err(|e| Error::spool_io("reading the result payload", e))?.len();
            Ok(Some(Outgoing::File(path, size)))
        }
    }
}

/// Sends the result and its payload; returns the result payload's size.
async fn send_output(
    paths: &CallPaths,
    output: ModelOutput,
    encoding: Encoding,
    status: &CallStatus,
    marks: &Marks,
    trace: &CallTrace,
    events: &Events,
) -> Result<u64> {
    let ModelOutput { json, payload } = output;
    let payload = outgoing(paths, payload)?;
    let json = result_json(&json)?;
    marks.enter(Phase::Sending, status, trace);
    let payload_size = payload.as_ref().map(|p| match p {
        Outgoing::File(_, size) => *size,
        Outgoing::Bytes(bytes) => bytes.len() as u64,
    });
    events.send(Ok(Event::Result { json: json.into(), payload_size, encoding })).await.map_err(|_| Error::Cancelled)?;
    match payload {
        None => Ok(0),
        Some(Outgoing::File(path, size)) => {
            result::send_file(&path, size, encoding, events).await?;
            Ok(size)
        }
        Some(Outgoing::Bytes(bytes)) => {
            let size = bytes.len() as u64;
            result::send_bytes(bytes, encoding, events).await?;
            Ok(size)
        }
    }
}

/// When a call entered each phase after receiving, for the phase metrics.
#[derive(Debug, Default)]
struct Marks {
    queued: OnceLock<Instant>,
    running: OnceLock<Instant>,
    sending: OnceLock<Instant>,
}

impl Marks {
    /// The call moves to `phase`: its heartbeats say so, the phase
    /// metrics time it from now, and its trace opens the phase's span.
    fn enter(&self, phase: Phase, status: &CallStatus, trace: &CallTrace) {
        status.set_phase(phase);
        let entered = match phase {
            Phase::Queued => Some(&self.queued),
            Phase::Running => Some(&self.running),
            Phase::Sending => Some(&self.sending),
            Phase::Receiving => None, // from the call's start
        };
        if let Some(entered) = entered {
            let _ = entered.set(Instant::now());
        }
        trace.enter(phase);
    }

    /// Hands each phase the call reached, with the time it spent there, to
    /// `observe`; the call started at `started` and ended at `end`.
    fn observe(&self, mut observe: impl FnMut(Phase, std::time::Duration), started: Instant, end: Instant) {
        let phases = [
            (Phase::Receiving, Some(started)),
            (Phase::Queued, self.queued.get().copied()),
            (Phase::Running, self.running.get().copied()),
            (Phase::Sending, self.sending.get().copied()),
        ];
        for (i, (phase, entered)) in phases.iter().enumerate() {
            let Some(entered) = entered else { break };
            let left = phases[i + 1..].iter().find_map(|(_, at)| *at).unwrap_or(end);
            observe(*phase, left.saturating_duration_since(*entered));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn marks_split_a_call_into_the_phases_it_reached() {
        let t0 = Instant::now();
        let marks = Marks::default();
        marks.queued.set(t0 + Duration::from_millis(10)).expect("set");
        marks.running.set(t0 + Duration::from_millis(30)).expect("set");
        let mut seen = Vec::new();
        marks.observe(|p, d| seen.push((p, d.as_millis())), t0, t0 + Duration::from_millis(100));
        assert_eq!(seen, [(Phase::Receiving, 10), (Phase::Queued, 20), (Phase::Running, 70)]);
        let mut seen = Vec::new();
        Marks::default().observe(|p, d| seen.push((p, d.as_millis())), t0, t0 + Duration::from_millis(5));
        assert_eq!(seen, [(Phase::Receiving, 5)], "a call that failed while receiving");
    }

    #[test]
    fn a_result_json_is_checked_against_the_one_limit() {
        let output = |len: usize| serde_json::json!("x".repeat(len));
        assert!(result_json(&output(MAX_RESULT_JSON - 2)).is_ok(), "exactly at the limit (two quotes)");
        let e = result_json(&output(MAX_RESULT_JSON - 1)).expect_err("one byte over");
        assert_eq!(e.code(), crate::code::ErrorCode::ResourceExhausted);
        assert!(e.to_string().contains("at most 8323072 bytes"), "{e}");
    }
}
