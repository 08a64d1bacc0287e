//! A call's life after admission: receive the payload, wait for a slot, run
//! the model, send the result — with heartbeats throughout, cancellation when
//! the client leaves, and the spool directory removed however it ends.

use std::{sync::Arc, time::Instant};

use aipod::codec::Encoding;
use bytes::Bytes;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    engine::{Admitted, Engine},
    error::{Error, Result},
    event::{Event, Events, Failed},
    heartbeat::{CallStatus, Phase, Ticker},
    model::{ModelCall, ModelOutput, Progress},
    payload, result,
};

/// Runs an admitted call to its end, sending its events to `events`.
pub(crate) async fn run<S>(engine: Arc<Engine>, call: Admitted, chunks: S, events: Events)
where
    S: Stream<Item = Result<Bytes>> + Unpin + Send,
{
    let started = Instant::now();
    let Admitted { request, version, dir, in_flight } = call;
    let status = CallStatus::new();
    let cancel = CancellationToken::new();
    let span = tracing::info_span!("call", call_id = %request.call_id, func = %request.func, version = %version.name);

    let work = async {
        let tap = version.model.tap(&request.func, &request.kwargs);
        let limits = payload::ReceiveLimits {
            timeout: engine.limits.receive_timeout,
            window_log: engine.limits.max_zstd_window_log,
        };
        let received = payload::receive(chunks, &dir.input(), request.payload, limits, tap, &status).await?;
        status.set_phase(Phase::Queued);
        let _permit = version
            .queue
            .acquire(status.queue_position_cell())
            .await
            .map_err(|full| Error::Busy(format!("model version {:?} is busy: {full}", version.name)))?;
        status.set_phase(Phase::Running);
        let output = version
            .model
            .call(ModelCall {
                call_id: request.call_id.clone(),
                func: request.func.clone(),
                kwargs: request.kwargs.clone(),
                input: dir.input(),
                input_size: received.size,
                tapped: received.tapped,
                output_dir: dir.output_dir(),
                progress: Progress::new(Arc::clone(&status)),
                cancel: cancel.clone(),
            })
            .await?;
        Ok::<_, Error>(output)
    }
    .instrument(span.clone());

    let outcome = {
        tokio::pin!(work);
        let mut ticker = Ticker::new(engine.heartbeat);
        if ticker.is_on() {
            // The first heartbeat goes out at once: the client knows the
            // header was accepted before it streams the payload.
            let _ = events.try_send(Ok(Event::Beat(status.snapshot())));
        }
        let deadline = async {
            match request.deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                () = events.closed() => break Err(Error::Cancelled),
                () = &mut deadline => break Err(Error::DeadlineExceeded),
                () = engine.drain.abandoned() => break Err(Error::ShutDown),
                r = &mut work => break r,
                () = ticker.tick() => {
                    // A client that has not read the last beat needs no new one.
                    let _ = events.try_send(Ok(Event::Beat(status.snapshot())));
                }
            }
        }
    };
    // Whatever happened, nothing may keep working for this call.
    cancel.cancel();

    let result = match outcome {
        Ok(output) => send_output(&dir, output, request.payload.encoding, &status, &events).await,
        Err(e) => Err(e),
    };
    let bytes_in = status.received();
    let duration_ms = started.elapsed().as_millis() as u64;
    let failure = {
        let _enter = span.enter();
        match result {
            Ok(bytes_out) => {
                tracing::info!(bytes_in, bytes_out, duration_ms, status = "OK", "call finished");
                None
            }
            Err(e) => {
                let code = e.code();
                if matches!(e, Error::Internal(_) | Error::ModelCrashed(_)) {
                    tracing::error!(bytes_in, duration_ms, status = %code, error = %e, "call failed");
                } else {
                    tracing::info!(bytes_in, duration_ms, status = %code, error = %e, "call finished");
                }
                Some(e)
            }
        }
    };
    if let Some(error) = failure {
        let _ = events.send(Err(Failed { error, phase: status.snapshot().phase })).await;
    }
    drop(dir);
    drop(in_flight);
}

/// Sends the result and its payload; returns the result payload's size.
async fn send_output(
    dir: &crate::spool::CallPaths,
    output: ModelOutput,
    encoding: Encoding,
    status: &CallStatus,
    events: &Events,
) -> Result<u64> {
    let payload = match &output.payload {
        None => None,
        Some(path) => {
            let path = dir.contain_output(path).map_err(Error::ModelCrashed)?;
            let size = std::fs::metadata(&path).map_err(|e| Error::spool_io("reading the result payload", e))?.len();
            Some((path, size))
        }
    };
    let json = serde_json::to_vec(&output.json).map_err(|e| Error::Internal(format!("result JSON: {e}")))?;
    status.set_phase(Phase::Sending);
    let gone = || Error::Cancelled;
    events
        .send(Ok(Event::Result { json: json.into(), payload_size: payload.as_ref().map(|p| p.1), encoding }))
        .await
        .map_err(|_| gone())?;
    match payload {
        None => Ok(0),
        Some((path, size)) => {
            result::send_payload(path, size, encoding, events).await?;
            Ok(size)
        }
    }
}
