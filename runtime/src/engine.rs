//! The engine: everything a call needs (versions, spool, limits, drain
//! state), admission of new calls, and the description clients discover.
//! It knows nothing of gRPC.
//!
//! The folder is a call's life after the edge hands it over: `request`
//! (what a call asks), `call` (drives it to its end), `payload` (decoded as
//! it arrives into memory or the spool) within the decode `backlog` and
//! the in-memory budget (`memory`), `result` (the result payload),
//! `event`s for the reply stream, the call's live `status` and the
//! `heartbeat`s that report it, `retain` (calls that outlive their
//! connection), `drain` (a graceful stop) and `release` (memory a burst
//! freed, given back once calls are quiet).

pub(crate) mod backlog;
pub(crate) mod call;
pub(crate) mod drain;
pub(crate) mod event;
pub(crate) mod heartbeat;
pub(crate) mod memory;
pub(crate) mod payload;
pub(crate) mod release;
pub(crate) mod request;
pub(crate) mod result;
pub(crate) mod retain;
pub(crate) mod status;

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use crate::{
    config::Config,
    engine::drain::{Drain, InFlight},
    engine::memory::{DEFAULT_MEMORY_PAYLOAD_BUDGET, MemoryBudget, Reservation},
    engine::request::CallRequest,
    engine::retain::Retention,
    error::{Error, Result},
    model::spool::{CallPaths, Spool},
    observe::metrics::{self, Metrics},
    observe::trace::Tracing,
    versions::{Registered, Version, Versions},
};

/// Declared payloads smaller than this skip the free-space check (a
/// `statfs` per call): a full disk still fails them, with RESOURCE_EXHAUSTED.
const DISK_CHECK_MIN: u64 = 8 << 20;

/// The server's limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Largest uncompressed payload.
    pub max_payload_bytes: u64,
    /// Largest kwargs JSON.
    pub max_kwargs_bytes: u64,
    /// Largest gRPC message.
    pub max_message_bytes: u64,
    /// Calls run at once per version.
    pub max_concurrent_calls: usize,
    /// Calls waiting per version.
    pub max_queued_calls: usize,
    /// The longest pause between two payload frames.
    pub receive_timeout: Duration,
    /// The slowest average upload, bytes per second, after a minute; 0: none.
    pub min_receive_rate: u64,
    /// The largest zstd window a payload may ask for, as a power of two.
    pub max_zstd_window_log: u32,
    /// The longest a call may last (`--max-call-duration`); `None`: no limit.
    pub max_call_duration: Option<Duration>,
}

/// Shared state of a running server.
#[derive(Debug)]
pub(crate) struct Engine {
    /// The served versions.
    pub versions: Versions,
    /// Where payloads are spooled.
    pub spool: Spool,
    /// The limits.
    pub limits: Limits,
    /// The heartbeat interval; `None` when off.
    pub heartbeat: Option<Duration>,
    /// Drain state and in-flight calls.
    pub drain: Arc<Drain>,
    /// The Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Call traces (off unless the server turns export on).
    pub tracing: Tracing,
    /// Calls that outlive their client's connection.
    pub retention: Arc<Retention>,
    /// Room for small payloads held in memory.
    pub memory: Arc<MemoryBudget>,
    /// Decoder memory the zstd payloads being received share.
    pub zstd: Arc<aipod::codec::WindowBudget>,
    ids: CallIds,
}

/// After the drain timeout, how long abandoned calls get to tell their
/// clients why before connections close.
const ABANDON_GRACE: Duration = Duration::from_secs(2);

/// `--max-retain`'s default.
pub(crate) const DEFAULT_MAX_RETAIN: Duration = Duration::from_secs(3600);

/// `--zstd-memory-budget`'s default.
pub(crate) const DEFAULT_ZSTD_MEMORY_BUDGET: u64 = 256 << 20;

/// `--retain-bytes`' default.
pub(crate) const DEFAULT_RETAIN_BYTES: u64 = 10 << 30;

/// A call that passed admission: it may receive its payload.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// The request, with its call id filled in.
    pub request: CallRequest,
    /// The version that will run it.
    pub version: Arc<Version>,
    /// Its spool entries, removed when dropped.
    pub paths: CallPaths,
    /// Room to receive its payload in memory, when it is small and the
    /// budget allowed; `None`: spooled.
    pub memory: Option<Reservation>,
    /// Counts it as in flight for drain.
    pub in_flight: InFlight,
}

impl Engine {
    /// Builds the engine a server on `port` runs: the `registered` models
    /// and the versions the flags name, the spool (opened and locked), the
    /// limits and the heartbeat. No model starts yet.
    pub(crate) fn build(config: &Config, registered: &[Registered], port: u16) -> Result<Self> {
        let limits = Limits {
            max_payload_bytes: config.max_payload_bytes,
            max_kwargs_bytes: config.max_kwargs_bytes,
            max_message_bytes: config.max_message_bytes,
            max_concurrent_calls: config.max_concurrent_calls.max(1),
            max_queued_calls: config.max_queued_calls,
            receive_timeout: config.receive_timeout,
            min_receive_rate: config.min_receive_rate,
            max_zstd_window_log: config.max_zstd_window_log()?,
            max_call_duration: (!config.max_call_duration.is_zero()).then_some(config.max_call_duration),
        };
        let versions = Versions::build(
            registered,
            &config.models,
            config.default_version.as_deref(),
            limits.max_concurrent_calls,
            limits.max_queued_calls,
            &|version| config.exec_settings(version),
        )?;
        for workers in &config.workers {
            if let Some(name) = &workers.version {
                versions.get(name).map_err(|_| {
                    Error::Config(format!("--workers {name}={}: there is no model version {name:?}", workers.count))
                })?;
            }
        }
        let spool = Spool::open(&config.spool_dir_for(port))?;
        let mut engine = Self::new(versions, spool, limits, Some(config.heartbeat));
        engine.retention = Arc::new(Retention::new(config.max_retain, config.retain_bytes));
        engine.memory = MemoryBudget::new(config.memory_payload_budget);
        engine.zstd = aipod::codec::WindowBudget::new(config.zstd_memory_budget);
        Ok(engine)
    }

    /// The drain sequence, once the server is asked to stop: new calls are
    /// refused, retained uploads still incomplete end (retained calls that
    /// run finish, and their results wait for their clients), `not_ready`
    /// turns readiness off, and in-flight calls get `timeout` to finish;
    /// after it, each abandoned call gets UNAVAILABLE saying why before
    /// connections close.
    pub(crate) async fn drain_calls(&self, timeout: Duration, not_ready: impl Future<Output = ()>) {
        self.drain.start();
        self.retention.drain();
        not_ready.await;
        let in_flight = self.drain.in_flight();
        tracing::info!(in_flight, timeout = %aipod::duration::format(timeout), "draining: new calls are refused");
        let finished = async {
            self.drain.idle().await;
            if self.retention.uncollected() > 0 {
                tracing::info!(
                    results = self.retention.uncollected(),
                    "draining: waiting for clients to collect retained results"
                );
            }
            self.retention.collected().await;
        };
        match tokio::time::timeout(timeout, finished).await {
            Ok(()) => tracing::info!("drained: every call finished"),
            Err(_) => {
                tracing::warn!(abandoned = self.drain.in_flight(), "drain timeout: abandoning unfinished calls");
                self.drain.abandon();
                let _ = tokio::time::timeout(ABANDON_GRACE, self.drain.idle()).await;
            }
        }
    }

    /// Every call the server holds at once, from its header on (receiving,
    /// queued and running): what its versions can run and queue.
    pub(crate) fn max_calls(&self) -> usize {
        self.versions.iter().map(|v| v.queue.running_limit() + self.limits.max_queued_calls).sum()
    }

    /// An engine over these parts.
    pub(crate) fn new(versions: Versions, spool: Spool, limits: Limits, heartbeat: Option<Duration>) -> Self {
        let metrics = Arc::new(Metrics::default());
        metrics.register_versions(versions.iter().map(sample));
        Self {
            versions,
            spool,
            limits,
            heartbeat: heartbeat.filter(|d| !d.is_zero()),
            drain: Drain::new(),
            metrics,
            tracing: Tracing::default(),
            retention: Arc::new(Retention::new(DEFAULT_MAX_RETAIN, DEFAULT_RETAIN_BYTES)),
            memory: MemoryBudget::new(DEFAULT_MEMORY_PAYLOAD_BUDGET),
            zstd: aipod::codec::WindowBudget::new(DEFAULT_ZSTD_MEMORY_BUDGET),
            ids: CallIds::new(),
        }
    }

    /// The metric labels of a call for `version` (empty: the default) and
    /// `func`: the served version's name and the function when the version
    /// serves it, else `unknown` — so label values stay bounded whatever
    /// clients send.
    pub(crate) fn metric_labels(&self, version: &str, func: &str) -> (String, String) {
        match self.versions.get(version) {
            Ok(v) => {
                let func = if v.model.serves(func) { func } else { metrics::UNKNOWN };
                (v.name.clone(), func.to_owned())
            }
            Err(_) => (metrics::UNKNOWN.to_owned(), metrics::UNKNOWN.to_owned()),
        }
    }

    /// The metrics in the Prometheus text format, with what the network
    /// edge holds (`held`'s inbound fields) and the engine's own.
    pub(crate) fn render_metrics(&self, held: metrics::Held) -> String {
        let (root, draining) = (self.spool.root(), self.drain.is_draining());
        let held = metrics::Held {
            retained: self.retention.len(),
            memory_payload: self.memory.used(),
            zstd_memory: self.zstd.used(),
            ..held
        };
        self.metrics.render(self.versions.iter().map(sample), root, draining, &held)
    }

    /// Admits a call or says why not, before any payload byte is read:
    /// draining, unknown version or function, no room in the queue, or not
    /// enough disk for the declared payload.
    pub(crate) fn admit(&self, mut request: CallRequest) -> Result<Admitted> {
        let in_flight = self.drain.enter(self.max_calls())?;
        let version = Arc::clone(self.versions.get(&request.version)?);
        if !version.model.is_ready() {
            return Err(Error::NotReady(version.name.clone()));
        }
        if !version.model.serves(&request.func) {
            return Err(Error::UnknownFunction {
                func: request.func,
                version: version.name.clone(),
                available: version.functions().join(", "),
            });
        }
        version
            .queue
            .check_room()
            .map_err(|full| Error::Busy(format!("model version {:?} is busy: {full}", version.name)))?;
        if let Some(size) = request.payload.declared.filter(|s| *s > DISK_CHECK_MIN) {
            let free = self.spool.available_bytes().map_err(|e| Error::spool_io("checking free space", e))?;
            if size > free {
                return Err(Error::Busy(format!(
                    "payload of {size} bytes does not fit on the spool disk ({free} bytes free)"
                )));
            }
        }
        if request.call_id.is_empty() {
            request.call_id = self.ids.next();
        }
        let paths = self.spool.call_paths(&request.call_id);
        // A retained call's upload may resume: it is always spooled.
        let memory = match (request.payload.declared, request.retain) {
            (Some(size), None) => self.memory.reserve(size),
            _ => None,
        };
        request.version = version.name.clone();
        Ok(Admitted { request, version, paths, memory, in_flight })
    }

    /// Whether the server should report ready: every model loaded and not
    /// draining.
    pub(crate) fn is_ready(&self) -> bool {
        !self.drain.is_draining() && self.versions.all_ready()
    }
}

/// Makes call ids unique across restarts and replicas without a random
/// number crate: a per-process random key hashed with the process's start
/// time and a counter.
#[derive(Debug)]
struct CallIds {
    key: RandomState,
    started: u128,
    counter: AtomicU64,
}

impl CallIds {
    fn new() -> Self {
        let started = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        Self { key: RandomState::new(), started, counter: AtomicU64::new(0) }
    }

    /// 16 lowercase hex digits (written out by hand: `format!` cost a
    /// small call ~500 instructions).
    fn next(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = self.key.hash_one((n, self.started));
        let mut hex = [0u8; 16];
        for (i, digit) in hex.iter_mut().enumerate() {
            *digit = DIGITS[usize::try_from((id >> (60 - 4 * i)) & 0xf).unwrap_or(0)];
        }
        String::from_utf8_lossy(&hex).into_owned()
    }
}

/// What the metrics read of `version` at a scrape.
fn sample(version: &Arc<Version>) -> metrics::VersionSample<'_> {
    let (_, waiting) = version.queue.load();
    metrics::VersionSample { name: &version.name, waiting, workers: version.model.workers() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_ids_are_unique_hex() {
        let ids = CallIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        // Every digit of the hash, in order: the same as `{:016x}`.
        let key = ids.key.hash_one((2_u64, ids.started));
        assert_eq!(ids.next(), format!("{key:016x}"));
    }
}
