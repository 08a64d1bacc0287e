//! Retained calls: calls that outlive their client's connection. A retained
//! call keeps receiving, running and holding its result while no client is
//! attached; any connection of the identity that started it can attach to
//! it again, or resume its upload from the offset the server holds. State
//! lives in this process only: a retained call survives its client, not
//! the runtime.

use std::{
    collections::HashMap,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aipod::codec::Encoding;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

use crate::{
    code::ErrorCode,
    engine::event::{Event, Events, Failed},
    engine::heartbeat::Ticker,
    engine::result,
    engine::status::{CallStatus, Phase},
    error::{Error, Result},
    model::spool::CallPaths,
};

/// The shortest call id a retained call may have: ids are its key, so they
/// must be unguessable.
pub(crate) const MIN_CALL_ID_LEN: usize = 16;

/// Outcomes (results and failures) and interrupted uploads kept at most,
/// whatever their size: each costs memory however small its payload;
/// beyond it the oldest go first.
const MAX_KEPT_RESULTS: usize = 10_000;

/// Interrupted uploads kept at most (they also count in
/// [`MAX_KEPT_RESULTS`] and their spooled bytes in `--retain-bytes`);
/// beyond it the oldest go first.
const MAX_INTERRUPTED: usize = 1024;

/// How long a resume waits for the call to take it over.
const RESUME_WAIT: Duration = Duration::from_secs(30);

/// The payload pieces of a call as the engine reads them.
pub(crate) type Chunks = crate::engine::payload::Incoming<Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>>;

/// Who may see a retained call: the token or client certificate that
/// started it; `None` when the server authenticates no one.
pub(crate) type Owner = Option<Arc<str>>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    owner: Owner,
    call_id: String,
}

/// The retained calls of a server, and its retention limits.
#[derive(Debug)]
pub(crate) struct Retention {
    /// The longest a call is kept without a client (`--max-retain`).
    max: Duration,
    /// Spool bytes finished results may hold (`--retain-bytes`).
    budget: u64,
    calls: Mutex<HashMap<Key, Arc<Retained>>>,
    /// Finished results no client has collected yet: a draining server
    /// waits for them (up to its drain timeout).
    uncollected: watch::Sender<usize>,
}

/// Where a retained call is.
#[derive(Debug, Clone)]
pub(crate) enum Stage {
    /// Receiving its payload: piece 0 from the first connection, later
    /// pieces from resumes.
    Receiving {
        /// Which piece.
        piece: u64,
    },
    /// Its upload broke off with `held` bytes kept; waiting for a resume.
    Interrupted {
        /// Decoded bytes the server holds.
        held: u64,
    },
    /// Queued or running.
    Working,
    /// Finished: what every attacher is sent.
    Finished(Arc<Outcome>),
    /// No longer kept, and why.
    Gone(Gone),
}

/// Why a retained call is no longer kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gone {
    /// Its retain time passed without a client.
    Expired,
    /// The retain byte budget needed its room.
    Evicted,
    /// The server drains while the upload was incomplete.
    Draining {
        /// The bytes that had arrived.
        held: u64,
    },
}

/// How a retained call ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The model's result.
    Result {
        /// The JSON result, serialized.
        json: Bytes,
        /// The result payload file and its size.
        payload: Option<(PathBuf, u64)>,
    },
    /// The call failed.
    Failed {
        /// The status code.
        code: ErrorCode,
        /// The message the first client got.
        message: String,
        /// Where the call was.
        phase: Phase,
    },
}

/// A resume of an interrupted upload, handed to the call's task.
pub(crate) struct Resume {
    /// The rest of the payload.
    pub(crate) chunks: Chunks,
    /// The offset the client asked to send from.
    pub(crate) from: u64,
    /// How the rest is encoded.
    pub(crate) encoding: Encoding,
    /// The offset the server takes the payload from, and the piece's number.
    pub(crate) answer: oneshot::Sender<Result<(u64, u64)>>,
}

/// One retained call.
#[derive(Debug)]
pub(crate) struct Retained {
    key: Key,
    /// The function it runs.
    pub(crate) func: String,
    /// How long it is kept without a client.
    pub(crate) retain: Duration,
    /// Its live status, for heartbeats.
    pub(crate) status: Arc<CallStatus>,
    /// How its result payload is encoded.
    pub(crate) encoding: Encoding,
    stage: watch::Sender<Stage>,
    attached: Mutex<Attached>,
    resumes: mpsc::Sender<Resume>,
    /// Stops the piece being received (a resume takes over).
    piece: Mutex<CancellationToken>,
    /// Cancelled when the call is no longer kept.
    gone: CancellationToken,
    /// The finished call's spool entries (its result payload).
    kept: Mutex<Option<Kept>>,
}

#[derive(Debug)]
struct Attached {
    count: usize,
    /// When the last client left (or the call was retained, or finished).
    since: Instant,
}

/// What a call waiting for a client holds, for the budget.
#[derive(Debug, Clone, Copy)]
struct Settled {
    since: Instant,
    bytes: u64,
    interrupted: bool,
    idle: bool,
}

#[derive(Debug)]
struct Kept {
    _paths: CallPaths,
    bytes: u64,
    finished: Instant,
    collected: bool,
}

impl std::fmt::Debug for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resume").field("from", &self.from).finish_non_exhaustive()
    }
}

/// A call's receiving end of resumes.
pub(crate) type Resumes = mpsc::Receiver<Resume>;

impl Retention {
    /// Retention capped at `max` per call and `budget` spool bytes of
    /// finished results.
    pub(crate) fn new(max: Duration, budget: u64) -> Self {
        Self { max, budget, calls: Mutex::new(HashMap::new()), uncollected: watch::Sender::new(0) }
    }

    /// How long a call that asked for `asked` is kept: capped by `--max-retain`.
    pub(crate) fn effective(&self, asked: Duration) -> Duration {
        asked.min(self.max)
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Retained>>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The retained call `call_id` of `owner`, if it is kept.
    pub(crate) fn find(&self, owner: &Owner, call_id: &str) -> Option<Arc<Retained>> {
        let calls = self.calls();
        // Most servers retain nothing: no key is built for them.
        if call_id.is_empty() || calls.is_empty() {
            return None;
        }
        calls.get(&Key { owner: owner.clone(), call_id: call_id.to_owned() }).cloned()
    }

    /// Retains a new call; `None` if `owner` already keeps one with this id.
    pub(crate) fn insert(
        &self,
        owner: Owner,
        call_id: &str,
        func: &str,
        retain: Duration,
        encoding: Encoding,
    ) -> Option<(Arc<Retained>, Resumes)> {
        let key = Key { owner, call_id: call_id.to_owned() };
        let mut calls = self.calls();
        if calls.contains_key(&key) {
            return None;
        }
        let (resumes, rx) = mpsc::channel(4);
        let status = CallStatus::new();
        status.set_retain(retain);
        let record = Arc::new(Retained {
            key: key.clone(),
            func: func.to_owned(),
            retain,
            status,
            encoding,
            stage: watch::Sender::new(Stage::Receiving { piece: 0 }),
            attached: Mutex::new(Attached { count: 0, since: Instant::now() }),
            resumes,
            piece: Mutex::new(CancellationToken::new()),
            gone: CancellationToken::new(),
            kept: Mutex::new(None),
        });
        calls.insert(key, Arc::clone(&record));
        Some((record, rx))
    }

    /// Records `record`'s end: the result is kept (with its spool entries)
    /// until it expires or the budget needs the room, oldest first.
    pub(crate) fn finish(&self, record: &Arc<Retained>, outcome: Outcome, paths: Option<CallPaths>) {
        if record.gone.is_cancelled() {
            return; // dropped meanwhile (the server drains): nothing to keep
        }
        let bytes = match &outcome {
            Outcome::Result { payload: Some((_, size)), .. } => *size,
            _ => 0,
        };
        if let Some(paths) = paths {
            let mut kept = record.kept.lock().unwrap_or_else(|e| e.into_inner());
            *kept = Some(Kept { _paths: paths, bytes, finished: Instant::now(), collected: false });
            self.uncollected.send_modify(|n| *n += 1);
        }
        record.stage.send_replace(Stage::Finished(Arc::new(outcome)));
        self.enforce_budget();
    }

    /// Evicts the oldest outcomes and interrupted uploads no client is
    /// reading until what is kept fits the byte budget, [`MAX_KEPT_RESULTS`]
    /// and [`MAX_INTERRUPTED`].
    pub(crate) fn enforce_budget(&self) {
        self.enforce(self.budget, MAX_KEPT_RESULTS, MAX_INTERRUPTED);
    }

    fn enforce(&self, budget: u64, max_kept: usize, max_interrupted: usize) {
        let mut calls = self.calls();
        let mut settled: Vec<(Settled, Key)> =
            calls.values().filter_map(|r| r.settled().map(|s| (s, r.key.clone()))).collect();
        let mut held: u64 = settled.iter().map(|(s, _)| s.bytes).sum();
        let mut kept = settled.len();
        let mut interrupted = settled.iter().filter(|(s, _)| s.interrupted).count();
        settled.sort_by_key(|(s, _)| s.since);
        for (s, key) in settled {
            let over_interrupted = s.interrupted && interrupted > max_interrupted;
            if held <= budget && kept <= max_kept && !over_interrupted {
                continue;
            }
            if !s.idle {
                continue;
            }
            if let Some(record) = calls.remove(&key) {
                tracing::warn!(
                    call_id = %key.call_id,
                    bytes = s.bytes,
                    budget,
                    kept,
                    interrupted = s.interrupted,
                    "evicting a retained call: what is kept exceeds --retain-bytes or a count cap"
                );
                held -= s.bytes;
                kept -= 1;
                interrupted -= usize::from(s.interrupted);
                self.remove(&record, Gone::Evicted);
            }
        }
    }

    /// Marks `record` gone and frees what it holds (called with it already
    /// out of the map).
    fn remove(&self, record: &Retained, why: Gone) {
        record.stage.send_replace(Stage::Gone(why));
        record.gone.cancel();
        record.piece.lock().unwrap_or_else(|e| e.into_inner()).cancel();
        let kept = record.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        if kept.is_some_and(|k| !k.collected) {
            self.uncollected.send_modify(|n| *n = n.saturating_sub(1));
        }
    }

    /// Removes the calls whose retain time passed without a client:
    /// interrupted uploads and finished results (queued and running calls
    /// go on).
    pub(crate) fn sweep(&self, now: Instant) {
        let mut calls = self.calls();
        let expired: Vec<Key> = calls.iter().filter(|(_, r)| r.expired(now)).map(|(k, _)| k.clone()).collect();
        for key in expired {
            if let Some(record) = calls.remove(&key) {
                tracing::info!(call_id = %key.call_id, retain_s = record.retain.as_secs(), "a retained call expired");
                self.remove(&record, Gone::Expired);
            }
        }
    }

    /// Sweeps every second until the process ends.
    pub(crate) async fn run_sweeper(self: Arc<Self>) {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.sweep(Instant::now());
        }
    }

    /// The server drains: incomplete uploads are dropped (their clients are
    /// told the offset); queued and running calls finish and keep their
    /// results.
    pub(crate) fn drain(&self) {
        let mut calls = self.calls();
        let receiving: Vec<Key> = calls
            .iter()
            .filter(|(_, r)| matches!(*r.stage.borrow(), Stage::Receiving { .. } | Stage::Interrupted { .. }))
            .map(|(k, _)| k.clone())
            .collect();
        for key in receiving {
            if let Some(record) = calls.remove(&key) {
                let held = record.status.received();
                tracing::info!(call_id = %key.call_id, held, "draining: dropping a retained call's incomplete upload");
                self.remove(&record, Gone::Draining { held });
            }
        }
    }

    /// Resolves once every finished result has been collected by a client
    /// (a draining server waits for this, up to its drain timeout).
    pub(crate) async fn collected(&self) {
        let mut rx = self.uncollected.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Finished results not collected yet.
    pub(crate) fn uncollected(&self) -> usize {
        *self.uncollected.borrow()
    }

    /// Calls retained now.
    pub(crate) fn len(&self) -> usize {
        self.calls().len()
    }

    fn collect(&self, record: &Retained) {
        let mut kept = record.kept.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = kept.as_mut().filter(|k| !k.collected) {
            k.collected = true;
            self.uncollected.send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

impl Retained {
    /// The call's id.
    pub(crate) fn call_id(&self) -> &str {
        &self.key.call_id
    }

    /// Where the call is now.
    pub(crate) fn stage(&self) -> Stage {
        self.stage.borrow().clone()
    }

    /// Moves the call to `stage`.
    pub(crate) fn set_stage(&self, stage: Stage) {
        self.stage.send_replace(stage);
    }

    /// A fresh stop token for the piece about to be received.
    pub(crate) fn new_piece(&self) -> CancellationToken {
        let token = CancellationToken::new();
        let mut piece = self.piece.lock().unwrap_or_else(|e| e.into_inner());
        piece.cancel();
        *piece = token.clone();
        if self.gone.is_cancelled() {
            token.cancel();
        }
        token
    }

    /// Resolves when the call is no longer kept.
    pub(crate) async fn gone(&self) {
        self.gone.cancelled().await;
    }

    /// Why the call is no longer kept, as the error its task ends with.
    pub(crate) fn gone_error(&self) -> Error {
        self.gone_error_or(Error::Cancelled)
    }

    /// Hands the rest of the payload to the call's task, taking over from a
    /// piece still being received; returns the offset the server takes it
    /// from and the new piece's number.
    pub(crate) async fn resume(&self, chunks: Chunks, from: u64, encoding: Encoding) -> Result<(u64, u64)> {
        let (answer, rx) = oneshot::channel();
        self.resumes
            .send(Resume { chunks, from, encoding, answer })
            .await
            .map_err(|_| Error::NoRetainedCall(self.call_id().to_owned()))?;
        // The current piece, if its connection is not known dead yet, stops.
        self.piece.lock().unwrap_or_else(|e| e.into_inner()).cancel();
        match tokio::time::timeout(RESUME_WAIT, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(self.gone_error_or(Error::NoRetainedCall(self.call_id().to_owned()))),
            Err(_) => Err(Error::Busy(format!("call {} did not take the resume within 30 s; retry", self.call_id()))),
        }
    }

    fn gone_error_or(&self, other: Error) -> Error {
        match self.stage() {
            Stage::Gone(why) => why.error(self.call_id()),
            _ => other,
        }
    }

    /// What the call holds while it waits for a client: an interrupted
    /// upload's spooled bytes, or an outcome's payload, JSON and message.
    fn settled(&self) -> Option<Settled> {
        let attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        let (since, bytes, interrupted) = match &*self.stage.borrow() {
            Stage::Interrupted { held } => (attached.since, *held, true),
            Stage::Finished(outcome) => {
                let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
                let (finished, payload) = kept.as_ref().map_or((attached.since, 0), |k| (k.finished, k.bytes));
                let own = match &**outcome {
                    Outcome::Result { json, .. } => json.len(),
                    Outcome::Failed { message, .. } => message.len(),
                };
                (finished, payload + own as u64, false)
            }
            _ => return None,
        };
        Some(Settled { since, bytes, interrupted, idle: attached.count == 0 })
    }

    fn expired(&self, now: Instant) -> bool {
        let attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        if attached.count > 0 {
            return false;
        }
        let since = match &*self.stage.borrow() {
            Stage::Interrupted { .. } => attached.since,
            Stage::Finished(_) => {
                let finished = self.kept.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|k| k.finished);
                finished.map_or(attached.since, |f| f.max(attached.since))
            }
            _ => return false,
        };
        now.saturating_duration_since(since) >= self.retain
    }

    fn attach(self: &Arc<Self>) -> AttachGuard {
        self.attached.lock().unwrap_or_else(|e| e.into_inner()).count += 1;
        AttachGuard(Arc::clone(self))
    }
}

impl Gone {
    fn error(self, call_id: &str) -> Error {
        match self {
            Self::Expired | Self::Evicted => Error::NoRetainedCall(call_id.to_owned()),
            Self::Draining { held } => Error::RetainedFailure {
                code: ErrorCode::Unavailable,
                message: format!(
                    "the server is shutting down: the retained call's upload was incomplete ({held} bytes had \
                     arrived) and was dropped; start the call again on another replica"
                ),
            },
        }
    }
}

/// Counts a client as attached until dropped.
struct AttachGuard(Arc<Retained>);

impl Drop for AttachGuard {
    fn drop(&mut self) {
        let mut attached = self.0.attached.lock().unwrap_or_else(|e| e.into_inner());
        attached.count -= 1;
        attached.since = Instant::now();
    }
}

/// What an attached client is: a plain attacher, or the client uploading
/// piece `piece` (told when its piece is interrupted or taken over).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Follower {
    /// The piece this client uploads, if it uploads.
    pub(crate) piece: Option<u64>,
    /// The offset to report in the first heartbeat (a resume's answer).
    pub(crate) offset: Option<u64>,
}

/// Sends a retained call's heartbeats to one client as they happen, then
/// its result and result payload (or its failure), as `chaos` would have.
pub(crate) async fn follow(
    retention: Arc<Retention>,
    record: Arc<Retained>,
    heartbeat: Option<Duration>,
    me: Follower,
    events: Events,
) {
    let _attached = record.attach();
    let mut stage = record.stage.subscribe();
    let mut ticker = Ticker::new(heartbeat);
    if ticker.is_on() {
        let mut beat = record.status.snapshot();
        if let Some(offset) = me.offset {
            beat.phase = Phase::Receiving;
            beat.received_bytes = offset;
        }
        let _ = events.try_send(Ok(Event::Beat(beat)));
    }
    loop {
        let now = stage.borrow_and_update().clone();
        let phase = record.status.phase();
        let end = |error| Err(Failed { error, phase });
        let ending = match now {
            Stage::Finished(outcome) => {
                if deliver(&record, &outcome, &events).await {
                    retention.collect(&record);
                }
                return;
            }
            Stage::Gone(why) => Some(end(why.error(record.call_id()))),
            Stage::Interrupted { held } if me.piece.is_some() => Some(end(Error::Unavailable(format!(
                "the upload was interrupted with {held} bytes held; resume it with resume_from"
            )))),
            Stage::Receiving { piece } if me.piece.is_some_and(|mine| mine != piece) => {
                Some(end(Error::Aborted("another connection resumed this call's upload".into())))
            }
            _ => None,
        };
        if let Some(ending) = ending {
            let _ = events.send(ending).await;
            return;
        }
        tokio::select! {
            biased;
            () = events.closed() => return,
            changed = stage.changed() => if changed.is_err() { return },
            () = ticker.tick() => { let _ = events.try_send(Ok(Event::Beat(record.status.snapshot()))); }
        }
    }
}

/// Sends a finished call's outcome; whether all of it reached the client.
async fn deliver(record: &Retained, outcome: &Outcome, events: &Events) -> bool {
    match outcome {
        Outcome::Failed { code, message, phase } => {
            let error = Error::RetainedFailure { code: *code, message: message.clone() };
            events.send(Err(Failed { error, phase: *phase })).await.is_ok()
        }
        Outcome::Result { json, payload } => {
            let result = Event::Result {
                json: json.clone(),
                payload_size: payload.as_ref().map(|p| p.1),
                encoding: record.encoding,
            };
            if events.send(Ok(result)).await.is_err() {
                return false;
            }
            let Some((path, size)) = payload else { return true };
            match result::send_file(path, *size, record.encoding, events).await {
                Ok(()) => true,
                Err(Error::Cancelled) => false,
                Err(e) => {
                    let _ = events.send(Err(Failed { error: e, phase: Phase::Sending })).await;
                    false
                }
            }
        }
    }
}

/// Receives a retained call's payload: piece after piece, each resumed
/// from the offset the server holds, until the payload is complete; an
/// upload that is not resumed within the retain time is dropped.
pub(crate) async fn receive(
    retention: &Retention,
    record: &Retained,
    resumes: &mut Resumes,
    slot: &mut Slot<'_>,
    mut upload: crate::engine::payload::Upload,
    mut chunks: Chunks,
) -> Result<crate::engine::payload::Received> {
    use crate::engine::payload::Step;
    let mut from = 0;
    let mut piece = 0;
    let mut encoding = None;
    loop {
        let stop = record.new_piece();
        record.set_stage(Stage::Receiving { piece });
        let step = upload.piece(chunks, from, encoding, &record.status, Some(&stop)).await?;
        let (rest, why) = match step {
            Step::Done(received) => return Ok(received),
            Step::Interrupted(rest, why) => (rest, why),
        };
        upload = rest;
        let held = upload.held();
        if record.gone.is_cancelled() {
            return Err(record.gone_error());
        }
        tracing::info!(held, reason = %why, "retained call's upload interrupted; waiting for a resume");
        record.set_stage(Stage::Interrupted { held });
        // Waiting holds no call slot, and counts in the retention caps.
        slot.held = None;
        retention.enforce_budget();
        // Resumes until one whose client is still there takes the upload on.
        let resume = loop {
            let mut resume = tokio::select! {
                r = resumes.recv() => r.ok_or_else(|| record.gone_error())?,
                () = record.gone() => return Err(record.gone_error()),
            };
            // Only the latest of several waiting resumes goes on.
            while let Ok(newer) = resumes.try_recv() {
                let _ = resume.answer.send(Err(Error::Aborted("a later resume of this call took over".into())));
                resume = newer;
            }
            let Resume { chunks, from: asked, encoding, answer } = resume;
            match slot.retake() {
                Ok(held_slot) => {
                    if answer.send(Ok((asked.min(held), piece + 1))).is_ok() {
                        slot.held = Some(held_slot);
                        break (chunks, asked, encoding);
                    }
                }
                Err(busy) => {
                    let _ = answer.send(Err(busy));
                }
            }
        };
        let asked;
        (chunks, asked, encoding) = (resume.0, resume.1, Some(resume.2));
        from = asked.min(held);
        piece += 1;
        tracing::info!(asked, offset = from, held, piece, "retained call's upload resumed");
    }
}

/// A retained call's slot among the calls the server holds: given up
/// while its upload waits for a resume, taken again for the resume.
#[derive(Debug)]
pub(crate) struct Slot<'a> {
    /// The slot, while the call holds one.
    pub(crate) held: Option<crate::engine::drain::InFlight>,
    drain: &'a Arc<crate::engine::drain::Drain>,
    max: usize,
}

impl<'a> Slot<'a> {
    /// `held`, taken again from `drain` (at most `max` calls) when given up.
    pub(crate) fn new(
        held: crate::engine::drain::InFlight,
        drain: &'a Arc<crate::engine::drain::Drain>,
        max: usize,
    ) -> Self {
        Self { held: Some(held), drain, max }
    }

    fn retake(&self) -> Result<crate::engine::drain::InFlight> {
        self.drain.enter(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retention(budget: u64) -> Retention {
        Retention::new(Duration::from_secs(3600), budget)
    }

    fn owner(name: &str) -> Owner {
        Some(Arc::from(name))
    }

    #[test]
    fn a_call_is_found_only_by_the_identity_that_retained_it() {
        let r = retention(1 << 30);
        let (_record, _rx) =
            r.insert(owner("a"), "0123456789abcdef", "echo", Duration::from_secs(60), Encoding::Zstd).expect("new");
        assert!(r.find(&owner("a"), "0123456789abcdef").is_some());
        assert!(r.find(&owner("b"), "0123456789abcdef").is_none(), "another token");
        assert!(r.find(&None, "0123456789abcdef").is_none());
        assert!(r.insert(owner("a"), "0123456789abcdef", "echo", Duration::ZERO, Encoding::Zstd).is_none());
        assert!(r.insert(owner("b"), "0123456789abcdef", "echo", Duration::ZERO, Encoding::Zstd).is_some());
        assert_eq!(r.effective(Duration::from_secs(7200)), Duration::from_secs(3600), "capped by --max-retain");
    }

    fn finish(r: &Retention, id: &str, bytes: u64, spool: &crate::model::spool::Spool) -> Arc<Retained> {
        let (record, _rx) = r.insert(None, id, "echo", Duration::from_secs(60), Encoding::Zstd).expect("new");
        let paths = spool.call_paths(id);
        paths.entries().materialise_input(&vec![0u8; bytes as usize]).expect("write");
        let payload = Some((paths.input().to_owned(), bytes));
        let outcome = Outcome::Result { json: Bytes::from_static(b"{}"), payload };
        r.finish(&record, outcome, Some(paths));
        record
    }

    #[test]
    fn finished_results_expire_after_their_retain_time_and_free_their_spool() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spool = crate::model::spool::Spool::open(tmp.path()).expect("spool");
        let r = retention(1 << 30);
        let record = finish(&r, "a-finished-call-1", 10, &spool);
        assert_eq!(r.uncollected(), 1);
        r.sweep(Instant::now());
        assert!(r.find(&None, "a-finished-call-1").is_some(), "kept within its retain time");
        r.sweep(Instant::now() + Duration::from_secs(61));
        assert!(r.find(&None, "a-finished-call-1").is_none(), "expired");
        assert!(matches!(record.stage(), Stage::Gone(Gone::Expired)));
        assert_eq!(r.uncollected(), 0);
        let left = std::fs::read_dir(tmp.path()).expect("ls").count();
        assert_eq!(left, 1, "only the lock file: the result's spool entries are removed");
    }

    #[test]
    fn the_byte_budget_evicts_the_oldest_finished_results_first() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spool = crate::model::spool::Spool::open(tmp.path()).expect("spool");
        let r = retention(250);
        let first = finish(&r, "first-call-0000000", 100, &spool);
        let second = finish(&r, "second-call-000000", 100, &spool);
        assert_eq!(r.len(), 2);
        let third = finish(&r, "third-call-0000000", 100, &spool);
        assert!(matches!(first.stage(), Stage::Gone(Gone::Evicted)), "the oldest goes");
        assert!(matches!(second.stage(), Stage::Finished(_)));
        assert!(matches!(third.stage(), Stage::Finished(_)));
        assert_eq!(r.len(), 2);
        // However small, results are counted too.
        r.enforce(u64::MAX, 1, MAX_INTERRUPTED);
        assert!(matches!(second.stage(), Stage::Gone(Gone::Evicted)));
        assert!(matches!(third.stage(), Stage::Finished(_)));
    }

    #[test]
    fn interrupted_uploads_and_failures_count_in_the_budget_and_the_caps() {
        let r = retention(1000);
        let interrupted = |id: &str, held: u64| {
            let (record, _rx) = r.insert(None, id, "echo", Duration::from_secs(60), Encoding::Zstd).expect("new");
            record.set_stage(Stage::Interrupted { held });
            r.enforce_budget();
            record
        };
        // Spooled bytes of interrupted uploads are in --retain-bytes.
        let a = interrupted("upload-call-00000a", 600);
        let b = interrupted("upload-call-00000b", 600);
        assert!(matches!(a.stage(), Stage::Gone(Gone::Evicted)), "the older upload goes: 1200 > 1000");
        assert!(matches!(b.stage(), Stage::Interrupted { .. }));
        // Interrupted uploads have a count cap of their own.
        let c = interrupted("upload-call-00000c", 1);
        r.enforce(u64::MAX, usize::MAX, 1);
        assert!(matches!(b.stage(), Stage::Gone(Gone::Evicted)), "the oldest interrupted upload goes");
        assert!(matches!(c.stage(), Stage::Interrupted { .. }));
        // A failure counts in the cap and its message in the bytes.
        let (failed, _rx) =
            r.insert(None, "failed-call-00000", "fail", Duration::from_secs(60), Encoding::Zstd).expect("new");
        r.finish(
            &failed,
            Outcome::Failed { code: ErrorCode::Internal, message: "m".repeat(1000), phase: Phase::Running },
            None,
        );
        assert!(matches!(c.stage(), Stage::Gone(Gone::Evicted)), "1 + 1000 bytes are over 1000: c, the older, goes");
        r.enforce(u64::MAX, 0, MAX_INTERRUPTED);
        assert!(matches!(failed.stage(), Stage::Gone(Gone::Evicted)), "failures are in the count cap");
    }

    #[test]
    fn running_calls_never_expire_and_draining_drops_only_uploads() {
        let r = retention(1 << 30);
        let (running, _a) = r.insert(None, "running-call-00000", "sleep", Duration::ZERO, Encoding::Zstd).expect("a");
        running.set_stage(Stage::Working);
        let (upload, _b) = r.insert(None, "upload-call-000000", "echo", Duration::ZERO, Encoding::Zstd).expect("b");
        upload.set_stage(Stage::Interrupted { held: 5 });
        r.sweep(Instant::now() + Duration::from_secs(1));
        assert!(r.find(&None, "running-call-00000").is_some(), "a running call is never expired");
        assert!(r.find(&None, "upload-call-000000").is_none(), "an abandoned upload is");
        let (upload, _c) =
            r.insert(None, "upload-call-000001", "echo", Duration::from_secs(60), Encoding::Zstd).expect("c");
        r.drain();
        assert!(matches!(upload.stage(), Stage::Gone(Gone::Draining { .. })));
        assert!(upload.gone_error().to_string().contains("bytes had arrived"));
        assert!(r.find(&None, "running-call-00000").is_some(), "running calls finish during a drain");
    }
}
