//! Prometheus metrics of the runtime: calls by outcome, their duration and
//! phases, payload and wire bytes, load, heartbeats, workers, spool and
//! drain (docs/observability.md). Label values are bounded: a version is
//! one the server serves or `unknown`, a function one of its version's or
//! `unknown`.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, OnceLock, PoisonError, RwLock},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    code::{ErrorCode, Phase},
    model::WorkerCounts,
};

/// Label value for a version or function the server does not serve.
pub(crate) const UNKNOWN: &str = "unknown";

/// Histogram buckets in seconds for calls and their phases: 100 µs to an
/// hour, about three per decade (docs/observability.md lists them).
pub(crate) const BUCKETS: [f64; 22] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 1800.0, 3600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    version: String,
    func: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FuncLabels {
    version: String,
    func: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    version: String,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PayloadLabels {
    version: String,
    func: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    version: String,
    state: &'static str,
}

/// Which way bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// From the client.
    In,
    /// To the client.
    Out,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Self::In => "in",
            Self::Out => "out",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::In => 0,
            Self::Out => 1,
        }
    }
}

/// The series the calls of one version's function write, looked up in
/// their families once and kept: a call then writes them without hashing
/// label sets or making label strings (eleven family lookups a call
/// before). Each is made on its first use, so `/metrics` shows the same
/// series as it would without the cache.
#[derive(Debug)]
pub(crate) struct CallSeries {
    version: String,
    func: String,
    ok: OnceLock<Counter>,
    duration: OnceLock<Histogram>,
    /// By [`phase_index`].
    phases: [OnceLock<Histogram>; 4],
    /// By [`Direction::index`].
    payload: [OnceLock<Counter>; 2],
    in_flight: OnceLock<Gauge>,
}

fn phase_index(phase: Phase) -> usize {
    match phase {
        Phase::Receiving => 0,
        Phase::Queued => 1,
        Phase::Running => 2,
        Phase::Sending => 3,
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// What clients make the server hold at a scrape.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// Retained calls.
    pub(crate) retained: usize,
    /// Bytes reserved by payloads held in memory.
    pub(crate) memory_payload: u64,
    /// Announced bytes of the messages arriving now.
    pub(crate) receive_buffer: u64,
    /// Streams without their first message.
    pub(crate) awaiting_header: usize,
    /// zstd decoder memory taken from `--zstd-memory-budget`.
    pub(crate) zstd_memory: u64,
    /// Payload bytes read and not yet decoded, of `--decode-backlog-budget`.
    pub(crate) decode_backlog: u64,
}

/// The runtime's metrics. Counters and histograms are updated as calls
/// happen; gauges of state held elsewhere (queues, workers, spool, drain)
/// are read when scraped.
#[derive(Debug)]
pub(crate) struct Metrics {
    /// Every family below, registered once.
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    duration: HistogramFamily<FuncLabels>,
    phase: HistogramFamily<PhaseLabels>,
    payload: Family<PayloadLabels, Counter>,
    wire: Family<DirectionLabels, Counter>,
    in_flight: Family<VersionLabels, Gauge>,
    queued: Family<VersionLabels, Gauge>,
    /// Each served version's functions' series, by version and function
    /// (bounded: only admitted calls, of served functions, ask).
    series: RwLock<BTreeMap<String, BTreeMap<String, Arc<CallSeries>>>>,
    /// The wire byte counters, by [`Direction::index`].
    wire_by_direction: [OnceLock<Counter>; 2],
    heartbeats: Counter,
    in_place: Counter,
    one_message: Counter,
    workers: Family<WorkerLabels, Gauge>,
    worker_restarts: Family<VersionLabels, Counter>,
    spool_bytes: Gauge,
    draining: Gauge,
    retained: Gauge,
    memory_payload: Gauge,
    receive_buffer: Gauge,
    awaiting_header: Gauge,
    zstd_memory: Gauge,
    decode_backlog: Gauge,
    spans_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let calls = Family::<CallLabels, Counter>::default();
        let duration: HistogramFamily<FuncLabels> = Family::new_with_constructor(histogram);
        let phase: HistogramFamily<PhaseLabels> = Family::new_with_constructor(histogram);
        let payload = Family::<PayloadLabels, Counter>::default();
        let wire = Family::<DirectionLabels, Counter>::default();
        let in_flight = Family::<VersionLabels, Gauge>::default();
        let queued = Family::<VersionLabels, Gauge>::default();
        let heartbeats = Counter::default();
        let in_place = Counter::default();
        let one_message = Counter::default();
        let workers = Family::<WorkerLabels, Gauge>::default();
        let worker_restarts = Family::<VersionLabels, Counter>::default();
        let spool_bytes = Gauge::default();
        let draining = Gauge::default();
        let retained = Gauge::default();
        let memory_payload = Gauge::default();
        let receive_buffer = Gauge::default();
        let awaiting_header = Gauge::default();
        let zstd_memory = Gauge::default();
        let decode_backlog = Gauge::default();
        let spans_dropped = Counter::default();
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info.get_or_create(&VersionLabels { version: env!("CARGO_PKG_VERSION").to_owned() }).set(1);

        let mut registry = Registry::with_prefix("aipod");
        registry.register("calls", "Calls that ended, by version, function and gRPC status code", calls.clone());
        registry.register("call_duration_seconds", "Time from a call's header to its final status", duration.clone());
        registry.register(
            "call_phase_seconds",
            "Time calls spent receiving, queued, running and sending",
            phase.clone(),
        );
        registry.register("payload_bytes", "Uncompressed payload bytes, in (from clients) and out", payload.clone());
        registry.register("wire_bytes", "Payload bytes as sent on the wire (compressed), in and out", wire.clone());
        registry.register("calls_in_flight", "Calls held now, from their header on", in_flight.clone());
        registry.register("calls_queued", "Calls waiting for a model slot", queued.clone());
        registry.register("heartbeats_sent", "Heartbeats sent to clients", heartbeats.clone());
        registry.register(
            "calls_in_place",
            "Calls that ran to their end in place, within their first poll (no task of their own)",
            in_place.clone(),
        );
        registry.register(
            "calls_one_message",
            "Calls made with the one-message `call` method (header and payload in one request)",
            one_message.clone(),
        );
        registry.register("workers", "exec: worker processes by state", workers.clone());
        registry.register(
            "worker_restarts",
            "exec: worker processes restarted after they died",
            worker_restarts.clone(),
        );
        registry.register("spool_bytes", "Bytes in the spool directory (payloads and results)", spool_bytes.clone());
        registry.register("draining", "1 while the server drains", draining.clone());
        registry.register(
            "retained_calls",
            "Retained calls held now: receiving, interrupted, running or holding a result",
            retained.clone(),
        );
        registry.register(
            "memory_payload_bytes",
            "Bytes reserved now by small payloads held in memory instead of the spool (--memory-payload-budget)",
            memory_payload.clone(),
        );
        registry.register(
            "receive_buffer_bytes",
            "Announced bytes of the gRPC messages buffered whole arriving now (headers and small messages; data \
             messages pass in cuts as they arrive)",
            receive_buffer.clone(),
        );
        registry.register(
            "zstd_memory_bytes",
            "zstd decoder memory held now by payloads being received, of --zstd-memory-budget",
            zstd_memory.clone(),
        );
        registry.register(
            "decode_backlog_bytes",
            "Payload bytes read from clients and not yet decoded, of --decode-backlog-budget",
            decode_backlog.clone(),
        );
        registry.register(
            "streams_awaiting_header",
            "Streams that have not sent their first message yet (each gets 10 s)",
            awaiting_header.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Trace spans not exported: the export queue was full or the collector did not take them",
            spans_dropped.clone(),
        );
        registry.register("build_info", "The runtime's version, as a label", build_info);
        Self {
            registry,
            calls,
            duration,
            phase,
            payload,
            wire,
            in_flight,
            queued,
            series: RwLock::default(),
            wire_by_direction: Default::default(),
            heartbeats,
            in_place,
            one_message,
            workers,
            worker_restarts,
            spool_bytes,
            draining,
            retained,
            memory_payload,
            receive_buffer,
            awaiting_header,
            zstd_memory,
            decode_backlog,
            spans_dropped,
        }
    }
}

impl Metrics {
    /// Trace spans that were not exported.
    pub(crate) fn spans_dropped(&self, spans: u64) {
        self.spans_dropped.inc_by(spans);
    }

    /// A call refused before admission, `error`, with how long it took
    /// from its header on (an admitted call's end: [`Metrics::ended`]).
    pub(crate) fn call_ended(&self, version: &str, func: &str, error: Option<ErrorCode>, took: Duration) {
        let (version, func) = (version.to_owned(), func.to_owned());
        let code = error.map_or("OK", ErrorCode::name);
        self.calls.get_or_create(&CallLabels { version: version.clone(), func: func.clone(), code }).inc();
        self.duration.get_or_create(&FuncLabels { version, func }).observe(took.as_secs_f64());
    }

    /// Bytes of payload frames as they crossed the wire (compressed).
    pub(crate) fn wire_bytes(&self, direction: Direction, bytes: usize) {
        self.wire_by_direction[direction.index()]
            .get_or_init(|| self.wire.get_or_create(&DirectionLabels { direction: direction.label() }).clone())
            .inc_by(bytes as u64);
    }

    /// The series of the calls of `func` of `version`, a served version
    /// and function (an admitted call's).
    pub(crate) fn series(&self, version: &str, func: &str) -> Arc<CallSeries> {
        let known = self.series.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = known.get(version).and_then(|funcs| funcs.get(func)) {
            return Arc::clone(series);
        }
        drop(known);
        let mut known = self.series.write().unwrap_or_else(PoisonError::into_inner);
        let funcs = known.entry(version.to_owned()).or_default();
        Arc::clone(funcs.entry(func.to_owned()).or_insert_with(|| {
            Arc::new(CallSeries {
                version: version.to_owned(),
                func: func.to_owned(),
                ok: OnceLock::new(),
                duration: OnceLock::new(),
                phases: Default::default(),
                payload: Default::default(),
                in_flight: OnceLock::new(),
            })
        }))
    }

    /// An admitted call that ended (finished or failed: `error` is None
    /// when it succeeded), with how long it took from its header on.
    pub(crate) fn ended(&self, series: &CallSeries, error: Option<ErrorCode>, took: Duration) {
        let CallSeries { version, func, .. } = series;
        match error {
            None => series
                .ok
                .get_or_init(|| {
                    self.calls
                        .get_or_create(&CallLabels { version: version.clone(), func: func.clone(), code: "OK" })
                        .clone()
                })
                .inc(),
            Some(code) => self
                .calls
                .get_or_create(&CallLabels { version: version.clone(), func: func.clone(), code: code.name() })
                .inc(),
        };
        series
            .duration
            .get_or_init(|| {
                self.duration.get_or_create(&FuncLabels { version: version.clone(), func: func.clone() }).clone()
            })
            .observe(took.as_secs_f64());
    }

    /// Time a call spent in one phase.
    pub(crate) fn phase(&self, series: &CallSeries, phase: Phase, took: Duration) {
        series.phases[phase_index(phase)]
            .get_or_init(|| {
                self.phase.get_or_create(&PhaseLabels { version: series.version.clone(), phase: phase.label() }).clone()
            })
            .observe(took.as_secs_f64());
    }

    /// Uncompressed payload bytes of a call.
    pub(crate) fn payload_bytes(&self, series: &CallSeries, direction: Direction, bytes: u64) {
        if bytes > 0 {
            series.payload[direction.index()]
                .get_or_init(|| {
                    let CallSeries { version, func, .. } = series;
                    let labels =
                        PayloadLabels { version: version.clone(), func: func.clone(), direction: direction.label() };
                    self.payload.get_or_create(&labels).clone()
                })
                .inc_by(bytes);
        }
    }

    /// Counts a call in flight until the guard drops.
    pub(crate) fn in_flight(&self, series: &CallSeries) -> InFlightGauge {
        let gauge = series
            .in_flight
            .get_or_init(|| self.in_flight.get_or_create(&VersionLabels { version: series.version.clone() }).clone())
            .clone();
        gauge.inc();
        InFlightGauge(gauge)
    }

    /// A call that ran to its end in place (see `server/service/in_place.rs`).
    pub(crate) fn call_in_place(&self) {
        self.in_place.inc();
    }

    /// A call made with the one-message `call` method.
    pub(crate) fn call_one_message(&self) {
        self.one_message.inc();
    }

    /// One heartbeat sent.
    pub(crate) fn heartbeat_sent(&self) {
        self.heartbeats.inc();
    }

    /// Makes every series of the served `versions` exist from the start
    /// (at zero), so dashboards and alerts see them before the first call.
    pub(crate) fn register_versions<'a>(&self, versions: impl IntoIterator<Item = VersionSample<'a>>) {
        for v in versions {
            let version = VersionLabels { version: v.name.to_owned() };
            let _ = self.in_flight.get_or_create(&version);
            let _ = self.queued.get_or_create(&version);
            if v.workers.is_some() {
                let _ = self.worker_restarts.get_or_create(&version);
            }
        }
    }

    /// The metrics in the Prometheus text format, with the scrape-time
    /// gauges read from the `versions` sampled now, the spool at `spool`,
    /// the drain state and what clients make the server `held` now.
    pub(crate) fn render<'a>(
        &self,
        versions: impl IntoIterator<Item = VersionSample<'a>>,
        spool: &Path,
        draining: bool,
        held: &Held,
    ) -> String {
        for v in versions {
            let waiting = v.waiting;
            self.queued.get_or_create(&VersionLabels { version: v.name.to_owned() }).set(waiting as i64);
            if let Some(w) = v.workers {
                for (state, n) in [("ready", w.ready), ("starting", w.starting), ("busy", w.busy)] {
                    self.workers.get_or_create(&WorkerLabels { version: v.name.to_owned(), state }).set(n as i64);
                }
                // The model counts restarts; the counter catches up with it.
                let restarts = self.worker_restarts.get_or_create(&VersionLabels { version: v.name.to_owned() });
                restarts.inc_by(w.restarts.saturating_sub(restarts.get()));
            }
        }
        self.spool_bytes.set(i64::try_from(dir_bytes(spool)).unwrap_or(i64::MAX));
        self.draining.set(i64::from(draining));
        self.retained.set(i64::try_from(held.retained).unwrap_or(i64::MAX));
        self.memory_payload.set(i64::try_from(held.memory_payload).unwrap_or(i64::MAX));
        self.receive_buffer.set(i64::try_from(held.receive_buffer).unwrap_or(i64::MAX));
        self.awaiting_header.set(i64::try_from(held.awaiting_header).unwrap_or(i64::MAX));
        self.zstd_memory.set(i64::try_from(held.zstd_memory).unwrap_or(i64::MAX));
        self.decode_backlog.set(i64::try_from(held.decode_backlog).unwrap_or(i64::MAX));

        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// One served version as the metrics see it at a scrape: its name, the
/// calls waiting for a slot, and its workers (for `exec:` models).
#[derive(Debug, Clone, Copy)]
pub(crate) struct VersionSample<'a> {
    pub(crate) name: &'a str,
    pub(crate) waiting: usize,
    pub(crate) workers: Option<WorkerCounts>,
}

/// Counts one call in flight until dropped.
#[derive(Debug)]
pub(crate) struct InFlightGauge(Gauge);

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Bytes of the files under `dir` (the spool: a directory per call).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_rise_from_100_microseconds_to_an_hour() {
        assert_eq!(BUCKETS[0], 0.0001);
        assert_eq!(BUCKETS[BUCKETS.len() - 1], 3600.0);
        assert!(BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_functions_kept_series_write_the_families_and_appear_only_once_used() {
        let metrics = Metrics::default();
        let render = || metrics.render(std::iter::empty(), Path::new("/nonexistent"), false, &Held::default());
        let series = metrics.series("v1", "echo");
        assert!(Arc::ptr_eq(&series, &metrics.series("v1", "echo")), "looked up once, then kept");
        assert!(!Arc::ptr_eq(&series, &metrics.series("v1", "sha256")), "a series set per function");
        let guard = metrics.in_flight(&series);
        assert!(render().contains("aipod_calls_in_flight{version=\"v1\"} 1"), "{}", render());
        drop(guard);
        for _ in 0..2 {
            metrics.phase(&series, Phase::Running, Duration::from_millis(2));
            metrics.payload_bytes(&series, Direction::In, 1024);
            metrics.payload_bytes(&series, Direction::Out, 0);
            metrics.ended(&series, None, Duration::from_millis(3));
        }
        metrics.ended(&series, Some(ErrorCode::Cancelled), Duration::from_millis(1));
        let text = render();
        for line in [
            "aipod_calls_in_flight{version=\"v1\"} 0",
            "aipod_calls_total{version=\"v1\",func=\"echo\",code=\"OK\"} 2",
            "aipod_calls_total{version=\"v1\",func=\"echo\",code=\"CANCELLED\"} 1",
            "aipod_call_duration_seconds_count{version=\"v1\",func=\"echo\"} 3",
            "aipod_call_phase_seconds_count{version=\"v1\",phase=\"running\"} 2",
            "aipod_payload_bytes_total{version=\"v1\",func=\"echo\",direction=\"in\"} 2048",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // Never counted, so never shown: no series at zero appears.
        assert!(!text.contains("direction=\"out\""), "{text}");
        assert!(!text.contains("phase=\"queued\""), "{text}");
        assert!(!text.contains("func=\"sha256\""), "{text}");
    }

    #[test]
    fn dir_bytes_sums_files_in_subdirectories() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("call")).expect("mkdir");
        std::fs::write(dir.path().join("call/input"), vec![0u8; 1000]).expect("write");
        std::fs::write(dir.path().join("top"), vec![0u8; 24]).expect("write");
        assert_eq!(dir_bytes(dir.path()), 1024);
        assert_eq!(dir_bytes(&dir.path().join("missing")), 0);
    }
}
