//! One worker slot's life: start the process, wait for `ready`, take calls
//! one at a time, restart with backoff when it dies, shut it down on stop.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use super::{
    Shared,
    process::{Label, Process},
    protocol::{self, FromWorker, PROTOCOL, ToWorker},
};
use crate::{
    code::ErrorCode,
    code::ModelError,
    model::{ModelCall, ModelOutput},
};

/// First wait before restarting a dead worker; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that lived this long resets the backoff.
const STABLE: Duration = Duration::from_secs(60);

/// A call handed to whichever worker is free.
#[derive(Debug)]
pub(crate) struct Job {
    /// The call.
    pub call: ModelCall,
    /// Where its outcome goes; closed when the call was abandoned.
    pub reply: oneshot::Sender<Result<ModelOutput, ModelError>>,
}

/// How serving ended.
enum End {
    /// The runtime is stopping.
    Stop,
    /// The worker died or broke the protocol; the reason, for the log.
    Died(String),
    /// The runtime killed it: it did not stop a cancelled call in time. Not
    /// a crash: it is replaced at once, without backoff.
    Killed(String),
}

/// Runs worker `index` until the runtime stops. Its first start-up outcome
/// goes to `started`.
pub(crate) async fn supervise(shared: Arc<Shared>, index: usize, started: mpsc::Sender<Result<(), String>>) {
    let label = Label { version: shared.version.clone(), index };
    let mut started = Some(started);
    let mut backoff = FIRST_BACKOFF;
    while !shared.stop.is_cancelled() {
        let began = Instant::now();
        let why = match start(&shared, &label).await {
            Ok(mut process) => {
                if let Some(tx) = started.take() {
                    let _ = tx.send(Ok(())).await;
                }
                shared.live.fetch_add(1, Ordering::SeqCst);
                tracing::info!(version = %label.version, worker = index, pid = process.pid(), "worker ready");
                let end = serve(&shared, &label, &mut process).await;
                shared.live.fetch_sub(1, Ordering::SeqCst);
                match end {
                    End::Stop => {
                        shut_down(&shared, &label, process).await;
                        return;
                    }
                    End::Died(why) => why,
                    End::Killed(why) => {
                        shared.restarts.fetch_add(1, Ordering::SeqCst);
                        tracing::info!(version = %label.version, worker = index, "{label} {why}; replacing it now");
                        continue;
                    }
                }
            }
            Err(why) => {
                if let Some(tx) = started.take() {
                    let _ = tx.send(Err(why.clone())).await;
                }
                why
            }
        };
        if began.elapsed() >= STABLE {
            backoff = FIRST_BACKOFF;
        }
        shared.restarts.fetch_add(1, Ordering::SeqCst);
        tracing::error!(
            version = %label.version, worker = index, restart_in = %aipod::duration::format(backoff),
            "{label} {why}"
        );
        tokio::select! {
            () = shared.stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Starts the process and waits for its `ready`.
async fn start(shared: &Shared, label: &Label) -> Result<Process, String> {
    let mut process = Process::spawn(&shared.argv, label)
        .map_err(|e| format!("could not be started ({:?}): {e}", shared.argv.join(" ")))?;
    let timeout = shared.settings.start_timeout;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        let message = tokio::select! {
            () = shared.stop.cancelled() => {
                process.kill();
                return Err("was stopped while starting".to_owned());
            }
            () = &mut deadline => {
                process.kill();
                let tail = process.stderr_tail();
                return Err(format!(
                    "did not send ready within {} (raise --worker-start-timeout if loading takes longer){}",
                    aipod::duration::format(timeout),
                    if tail.is_empty() { String::new() } else { format!("; stderr ends:\n{tail}") },
                ));
            }
            m = process.next() => m,
        };
        match message {
            Ok(Some(FromWorker::Ready { protocol, functions })) => {
                return match check_ready(shared, protocol, functions) {
                    Ok(()) => Ok(process),
                    Err(e) => {
                        process.kill();
                        Err(e)
                    }
                };
            }
            Ok(Some(FromWorker::Log { id, level, message })) => log(label, id.as_deref(), level.as_deref(), &message),
            Ok(Some(other)) => {
                process.kill();
                return Err(format!("sent {} before ready", kind(&other)));
            }
            Ok(None) => return Err(format!("exited before it was ready: {}", process.post_mortem().await)),
            Err(e) => {
                process.kill();
                return Err(format!("broke the worker protocol while starting: {e}"));
            }
        }
    }
}

/// Checks a `ready` against the protocol and against the version's other
/// workers: every worker of a version serves the same functions.
fn check_ready(shared: &Shared, protocol: u32, mut functions: Vec<String>) -> Result<(), String> {
    if protocol != PROTOCOL {
        return Err(format!("speaks worker protocol {protocol}; this runtime speaks {PROTOCOL}"));
    }
    functions.sort();
    functions.dedup();
    if functions.is_empty() || functions.iter().any(String::is_empty) {
        return Err("sent ready without any function names".to_owned());
    }
    let known = shared.functions.get_or_init(|| functions.clone());
    if *known != functions {
        return Err(format!(
            "serves [{}] but the version's other workers serve [{}]",
            functions.join(", "),
            known.join(", ")
        ));
    }
    Ok(())
}

/// Takes calls until the runtime stops or the worker dies.
async fn serve(shared: &Shared, label: &Label, process: &mut Process) -> End {
    loop {
        let job = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return End::Stop,
            message = process.next() => match message {
                Ok(Some(FromWorker::Log { id, level, message })) => {
                    log(label, id.as_deref(), level.as_deref(), &message);
                    continue;
                }
                Ok(Some(other)) => {
                    tracing::warn!(version = %label.version, worker = label.index, "ignored {} sent while no call runs", kind(&other));
                    continue;
                }
                Ok(None) => return End::Died(format!("exited while idle: {}", process.post_mortem().await)),
                Err(e) => {
                    process.kill();
                    return End::Died(format!("broke the worker protocol: {e}"));
                }
            },
            job = async { shared.jobs.lock().await.recv().await } => match job {
                Some(job) => job,
                None => return End::Stop,
            },
        };
        if job.reply.is_closed() {
            continue; // abandoned while it waited for a worker
        }
        shared.busy.fetch_add(1, Ordering::SeqCst);
        let ran = run(shared, label, process, job).await;
        shared.busy.fetch_sub(1, Ordering::SeqCst);
        if let Err(end) = ran {
            return end;
        }
    }
}

/// Runs one call on the worker. `Err` when the worker is no longer usable.
async fn run(shared: &Shared, label: &Label, process: &mut Process, job: Job) -> Result<(), End> {
    let Job { call, reply } = job;
    let id = call.call_id.as_str();
    // Workers are promised an input file and an existing output directory
    // (both at most a small write or a mkdir: done in line).
    let (input, output_dir) = match (call.input.path(), call.output_dir.create()) {
        (Ok(input), Ok(output)) => (input.to_string_lossy(), output.to_string_lossy()),
        (Err(e), _) | (_, Err(e)) => {
            let _ = reply.send(Err(ModelError::internal(format!("preparing the call's spool files: {e}"))));
            return Ok(());
        }
    };
    let message = ToWorker::Call {
        id,
        function: &call.func,
        kwargs: &call.kwargs,
        input: &input,
        input_size: call.input_size,
        output_dir: &output_dir,
        traceparent: call.traceparent.as_deref(),
    };
    if let Err(e) = process.send(&message).await {
        let end = process.post_mortem().await;
        let told = format!("{label} could not be sent the call: it {}; its stderr is in the runtime's log", end.how);
        let _ = reply.send(Err(ModelError::internal(told)));
        return Err(End::Died(format!("could not be sent the call ({e}): {end}")));
    }
    // Set when the call was cancelled: the worker must answer by then.
    let mut answer_by: Option<Instant> = None;
    loop {
        let wait_for_answer = async {
            match answer_by {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            message = process.next() => match message {
                Ok(Some(FromWorker::Progress { id: of, fraction, message })) if of == id => {
                    call.progress.report(fraction, message.unwrap_or_default());
                }
                Ok(Some(FromWorker::Log { id: of, level, message })) => {
                    log(label, of.as_deref().or(Some(id)), level.as_deref(), &message);
                }
                Ok(Some(FromWorker::Result { id: of, result, output })) if of == id => {
                    let _ = reply.send(Ok(ModelOutput { json: result, payload: output.map(|p| PathBuf::from(p).into()) }));
                    return Ok(());
                }
                Ok(Some(FromWorker::Error { id: of, code, message })) if of == id => {
                    let (code, message) = protocol::error_code(&code, message);
                    let _ = reply.send(Err(ModelError::new(code, message)));
                    return Ok(());
                }
                Ok(Some(FromWorker::Progress { id: of, .. })) => {
                    // A finished call's late progress: the call is gone,
                    // the message harmless.
                    tracing::debug!(call_id = %of, version = %label.version, worker = label.index, "ignored progress of a call that is not running");
                }
                Ok(Some(other)) => {
                    process.kill();
                    let why = format!("broke the worker protocol: sent {} for call {:?} while running {id:?}", kind(&other), other.call_id().unwrap_or(""));
                    let _ = reply.send(Err(ModelError::internal(format!("{label} {why}"))));
                    return Err(End::Died(why));
                }
                Ok(None) => {
                    // The client hears how, the log also what the worker wrote.
                    let end = process.post_mortem().await;
                    let told = format!("{label} {} during the call; its stderr is in the runtime's log", end.how);
                    let _ = reply.send(Err(ModelError::internal(told)));
                    return Err(End::Died(format!("ended during call {id:?}: {end}")));
                }
                Err(e) => {
                    process.kill();
                    let why = format!("broke the worker protocol: {e}");
                    let _ = reply.send(Err(ModelError::internal(format!("{label} {why}"))));
                    return Err(End::Died(why));
                }
            },
            () = cancelled(shared, &call), if answer_by.is_none() => {
                tracing::info!(call_id = %id, version = %label.version, worker = label.index, "cancelling the call in the worker");
                if process.send(&ToWorker::Cancel { id }).await.is_err() {
                    // It is dying; the next read says how.
                }
                answer_by = Some(Instant::now() + shared.settings.grace);
            }
            () = wait_for_answer => {
                process.kill();
                let why = format!(
                    "did not stop within {} of being cancelled and was killed",
                    aipod::duration::format(shared.settings.grace)
                );
                let _ = reply.send(Err(ModelError::new(ErrorCode::Cancelled, format!("{label} {why}"))));
                let _ = process.post_mortem().await;
                return Err(End::Killed(why));
            }
        }
    }
}

/// Resolves when the call is cancelled or the runtime stops.
async fn cancelled(shared: &Shared, call: &ModelCall) {
    tokio::select! {
        () = call.cancel.cancelled() => {}
        () = shared.stop.cancelled() => {}
    }
}

/// Asks an idle worker to exit; kills it after the grace period.
async fn shut_down(shared: &Shared, label: &Label, mut process: Process) {
    let _ = process.send(&ToWorker::Shutdown).await;
    let grace = shared.settings.grace;
    let how = match process.stop(grace).await {
        Some(status) if status.success() => "exited".to_owned(),
        Some(status) => format!("ended with {status}"),
        None => "ended".to_owned(),
    };
    tracing::info!(version = %label.version, worker = label.index, "worker {how} after shutdown");
}

/// Writes a worker's `log` message into the runtime's log.
fn log(label: &Label, call_id: Option<&str>, level: Option<&str>, message: &str) {
    let (version, worker, call_id) = (&label.version, label.index, call_id.unwrap_or(""));
    match level.unwrap_or("info").to_ascii_lowercase().as_str() {
        "error" | "critical" => {
            tracing::error!(target: "aipod_runtime::worker", %version, worker, call_id, "{message}")
        }
        "warning" | "warn" => tracing::warn!(target: "aipod_runtime::worker", %version, worker, call_id, "{message}"),
        "debug" | "trace" => tracing::debug!(target: "aipod_runtime::worker", %version, worker, call_id, "{message}"),
        _ => tracing::info!(target: "aipod_runtime::worker", %version, worker, call_id, "{message}"),
    }
}

/// A message's type, for errors.
fn kind(message: &FromWorker) -> &'static str {
    match message {
        FromWorker::Ready { .. } => "ready",
        FromWorker::Progress { .. } => "progress",
        FromWorker::Log { .. } => "log",
        FromWorker::Result { .. } => "result",
        FromWorker::Error { .. } => "error",
    }
}
