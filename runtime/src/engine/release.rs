//! Memory a burst of calls freed goes back to the system once the calls
//! are quiet. glibc keeps freed memory in its arenas: each thread that
//! allocates gets one, the payload buffers of a burst are freed in between
//! chunks still live, and glibc's own trimming only returns the top of a
//! heap — so a server that took 200 uploads at once would stay near its
//! peak for good. When no call has started or ended for
//! `--memory-release-delay`, and the process grew since it last gave
//! memory back, the codec's idle zstd contexts are freed and
//! `malloc_trim(0)` returns every arena's free pages. Never under load:
//! the trim takes each arena's lock in turn.
//!
//! Calls tell it nothing one by one: they count their starts and ends in
//! an [`Activity`], which the release looks at once per delay while calls
//! come and go, and which wakes it only for the first call after it went
//! to sleep. (Woken by every call, it cost each small call a wake-up on
//! the other worker thread: the reply's HTTP/2 frames then went out from
//! there.)
//!
//! While calls run, buffers of 1 MiB and more (a payload chunk in flight,
//! an HTTP/2 read buffer grown to hold one) are mapped on their own and
//! unmapped when freed ([`map_large_buffers`]): glibc's default raises its
//! mapping threshold to the largest such buffer freed and then keeps them
//! in the arenas, where they stay once freed. And the process keeps at
//! most one arena per core ([`limit_arenas`]): glibc's default, eight per
//! core, gave each blocking-pool thread that decodes a payload an arena of
//! its own, each holding its share of freed memory.

use std::{
    io,
    sync::{
        OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

/// Growth of the resident set since the last release that is worth a
/// trim; below it the walk over the arenas would free next to nothing.
const WORTH_RELEASING: u64 = 1 << 20;

/// Allocations from this size on are mapped on their own and given back
/// when freed. 1 MiB: a 4 GiB upload peaks 1.5–2.5 MiB lower (15.0–15.9
/// against 16.8–18.2 MiB) for ~4% of its throughput (each decoded piece a
/// fresh mapping); at 128–256 KiB every 256 KiB cut of a message would be
/// one too, and an uncompressed upload ran 30–45% slower
/// (docs/security.md, memory after a burst).
const MMAP_THRESHOLD: usize = 1 << 20;

/// What [`tune`] set for the process: `None` where the environment had
/// its say or the C library is not glibc.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuned {
    arenas: Option<usize>,
    mmap_threshold: Option<usize>,
}

impl Tuned {
    /// Logs the settings (at debug): [`tune`] runs before logging starts.
    pub(crate) fn log(self) {
        tracing::debug!(
            arenas = ?self.arenas,
            mmap_threshold_bytes = ?self.mmap_threshold,
            "glibc allocator settings (none: left to the environment)"
        );
    }
}

/// Sets glibc's allocator up once for the process ([`limit_arenas`],
/// [`map_large_buffers`]); later calls say what the first set.
pub(crate) fn tune() -> Tuned {
    static TUNED: OnceLock<Tuned> = OnceLock::new();
    *TUNED.get_or_init(|| Tuned {
        arenas: limit_arenas().then(arenas_per_process),
        mmap_threshold: map_large_buffers().then_some(MMAP_THRESHOLD),
    })
}

/// One arena per core the process may use, at least two.
fn arenas_per_process() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}

/// Caps glibc's arenas at [`arenas_per_process`], unless `MALLOC_ARENA_MAX`
/// or `GLIBC_TUNABLES`' `glibc.malloc.arena_max` already does (the
/// operator's choice stands). Set before the async runtime starts its
/// threads, or they keep the arenas they made. Whether it was set.
///
/// A 4 GiB upload after three 1 GiB ones (`bench/run`'s order) peaked at
/// 15.5–15.9 MiB instead of 16.4–17.3 (16.0–16.3 when set only once the
/// threads had started), at the same speed; small calls, 16 at once, the
/// same.
fn limit_arenas() -> bool {
    let tuned = std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
    !tuned && mallopt(Setting::ArenaMax, arenas_per_process())
}

/// Has glibc map buffers of [`MMAP_THRESHOLD`] and more on their own and
/// unmap them when freed, for the whole process, unless `GLIBC_TUNABLES`
/// already sets `glibc.malloc.mmap_threshold` (the operator's choice
/// stands). Whether it was set.
fn map_large_buffers() -> bool {
    let tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("mmap_threshold"));
    !tuned && mallopt(Setting::MmapThreshold, MMAP_THRESHOLD)
}

/// A glibc `mallopt` setting.
#[derive(Debug, Clone, Copy)]
enum Setting {
    /// `M_MMAP_THRESHOLD`, bytes.
    MmapThreshold,
    /// `M_ARENA_MAX`, arenas.
    ArenaMax,
}

/// Sets `setting` to `value` for the whole process; whether glibc took it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "mallopt is a glibc extension with no safe binding")]
fn mallopt(setting: Setting, value: usize) -> bool {
    let Ok(value) = libc::c_int::try_from(value) else { return false };
    let param = match setting {
        Setting::MmapThreshold => libc::M_MMAP_THRESHOLD,
        Setting::ArenaMax => libc::M_ARENA_MAX,
    };
    // SAFETY: mallopt takes no pointers; glibc serializes it with every
    // other allocator call, and both settings only steer later allocations
    // (where they come from, how many arenas later threads may create).
    unsafe { libc::mallopt(param, value) == 1 }
}

/// Other C libraries (musl) map large allocations themselves and have no
/// arenas to cap.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn mallopt(_: Setting, _: usize) -> bool {
    false
}

/// Calls starting and ending, as the release watches them: a count of
/// the changes, and a wake-up for the first one after the watcher went to
/// sleep.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    changes: AtomicU64,
    asleep: AtomicBool,
    woken: Notify,
}

impl Activity {
    /// A call started or ended.
    pub(crate) fn touch(&self) {
        // SeqCst on both sides: a watcher going to sleep either sees this
        // change or is seen asleep (and woken).
        self.changes.fetch_add(1, Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst) && self.asleep.swap(false, Ordering::SeqCst) {
            self.woken.notify_one();
        }
    }

    /// The changes so far.
    fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// Resolves once the count of changes differs from `seen`; the next
    /// [`Activity::touch`] wakes it.
    async fn changed_from(&self, seen: u64) {
        loop {
            self.asleep.store(true, Ordering::SeqCst);
            if self.changes() != seen {
                self.asleep.store(false, Ordering::SeqCst);
                return;
            }
            self.woken.notified().await;
        }
    }

    /// Resolves once a whole `quiet` passed without a change; looks once
    /// per `quiet`, so between one and two of them after the last change.
    async fn quiet_for(&self, quiet: Duration) {
        loop {
            let before = self.changes();
            tokio::time::sleep(quiet).await;
            if self.changes() == before {
                return;
            }
        }
    }
}

/// Gives memory back after each burst of calls: `calls` counts calls
/// starting and ending; once it has not changed for `quiet`, memory is
/// released if the process grew by [`WORTH_RELEASING`]. Runs until aborted.
pub(crate) async fn after_bursts(calls: std::sync::Arc<Activity>, quiet: Duration) {
    watch_bursts(&calls, quiet, resident_bytes, || async {
        let contexts = aipod::codec::release_idle();
        let trimmed = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
        (contexts, trimmed)
    })
    .await;
}

/// [`after_bursts`] with how the resident set is read and how memory is
/// released given.
async fn watch_bursts<R, F>(calls: &Activity, quiet: Duration, resident: impl Fn() -> io::Result<u64>, release: R)
where
    R: Fn() -> F,
    F: Future<Output = (usize, bool)>,
{
    // The resident set after the last release: what the process needs.
    let mut settled = resident().unwrap_or(0);
    let mut seen = calls.changes();
    loop {
        calls.changed_from(seen).await;
        calls.quiet_for(quiet).await;
        seen = calls.changes();
        let Ok(before) = resident() else { continue };
        if before < settled.saturating_add(WORTH_RELEASING) {
            continue;
        }
        let (contexts, trimmed) = release().await;
        settled = resident().unwrap_or(before);
        tracing::debug!(
            rss_before_kib = before >> 10,
            rss_after_kib = settled >> 10,
            contexts,
            trimmed,
            "calls are quiet: gave freed memory back to the system"
        );
    }
}

/// The process's resident set, in bytes (`VmRSS` of `/proc/self/status`).
fn resident_bytes() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib << 10)
        .ok_or_else(|| io::Error::other("no VmRSS line in /proc/self/status"))
}

/// Returns the free pages of every glibc arena to the system; whether any
/// came back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "malloc_trim is a glibc extension with no safe binding")]
fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointers and has no preconditions; glibc
    // serializes it with every other allocator call.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other C libraries (musl) return freed memory themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::AtomicUsize};

    use super::*;

    /// Allocates `bytes`, touches every page and frees it; the resident
    /// set's growth that stays.
    fn kept_after(bytes: usize) -> u64 {
        let before = resident_bytes().expect("VmRSS");
        let buffer = std::hint::black_box(vec![1u8; bytes]);
        drop(buffer);
        resident_bytes().expect("VmRSS").saturating_sub(before)
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn large_buffers_go_back_to_the_system_when_freed() {
        // glibc's default: a freed 8 MiB buffer raises the mapping
        // threshold past the next 6 MiB one, which then stays in the arena
        // once freed. With the threshold fixed, it is unmapped.
        assert!(map_large_buffers(), "mallopt(M_MMAP_THRESHOLD) refused");
        kept_after(8 << 20);
        let kept = kept_after(6 << 20);
        assert!(kept < 1 << 20, "a freed 6 MiB buffer kept {kept} bytes resident");
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_arena_cap() {
        // nextest runs each test in a process of its own: the cap stays here.
        assert!(std::env::var_os("MALLOC_ARENA_MAX").is_none(), "the test environment sets its own cap");
        assert!(limit_arenas(), "mallopt(M_ARENA_MAX) refused");
    }

    #[test]
    fn the_resident_set_is_read_and_follows_touched_memory() {
        let before = resident_bytes().expect("VmRSS");
        assert!(before > 1 << 20, "a test process holds more than 1 MiB: {before}");
        // 64 MiB written: resident now.
        let held = vec![1u8; 64 << 20];
        let during = resident_bytes().expect("VmRSS");
        assert!(during >= before + (48 << 20), "{before} then {during} with 64 MiB touched");
        drop(held);
    }

    /// Runs [`watch_bursts`] with a resident set the test sets, counting
    /// releases; a release brings the resident set back to 10 MiB.
    fn watched(quiet: Duration) -> (Arc<Activity>, Arc<AtomicU64>, Arc<AtomicUsize>) {
        let calls = Arc::new(Activity::default());
        let count = Arc::clone(&calls);
        let rss = Arc::new(AtomicU64::new(10 << 20));
        let releases = Arc::new(AtomicUsize::new(0));
        let reader = Arc::clone(&rss);
        let resident = move || Ok(reader.load(Ordering::SeqCst));
        let (writer, counter) = (Arc::clone(&rss), Arc::clone(&releases));
        tokio::spawn(async move {
            watch_bursts(&calls, quiet, resident, move || {
                counter.fetch_add(1, Ordering::SeqCst);
                writer.store(10 << 20, Ordering::SeqCst);
                async { (0, true) }
            })
            .await;
        });
        (count, rss, releases)
    }

    /// Waits up to 10 s for `releases` to reach `n`.
    async fn released(releases: &AtomicUsize, n: usize) {
        for _ in 0..200 {
            if releases.load(Ordering::SeqCst) >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Real time (tokio's `test-util` clock would change tokio's build for
    // every crate): quiet is half a second, calls change every 50 ms.
    #[tokio::test]
    async fn memory_is_released_once_the_calls_are_quiet_and_not_before() {
        let (count, rss, releases) = watched(Duration::from_millis(500));
        tokio::task::yield_now().await;
        rss.store(60 << 20, Ordering::SeqCst);
        // Calls keep starting and ending: never quiet.
        for _ in 0..30 {
            count.touch();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(releases.load(Ordering::SeqCst), 0, "released while calls came and went");
        // Quiet: released once, and not again while quiet.
        released(&releases, 1).await;
        assert_eq!(releases.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(releases.load(Ordering::SeqCst), 1);
    }

    /// A waker that counts its wake-ups.
    struct Counting(AtomicUsize);

    impl std::task::Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_burst_of_calls_wakes_the_watcher_once() {
        // Each wake-up was a hop to the other worker thread for the call
        // that caused it: only the first call after a quiet moment may.
        let activity = Activity::default();
        let counting = Arc::new(Counting(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&counting));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut asleep = Box::pin(activity.changed_from(activity.changes()));
        assert!(asleep.as_mut().poll(&mut cx).is_pending(), "nothing changed yet");
        for _ in 0..1000 {
            activity.touch();
        }
        assert_eq!(counting.0.load(Ordering::SeqCst), 1, "woken once for a burst of 1,000 starts and ends");
        assert!(asleep.as_mut().poll(&mut cx).is_ready(), "the watcher sees the change");
        // Awake, it looks on its own: the next burst wakes nobody.
        for _ in 0..1000 {
            activity.touch();
        }
        assert_eq!(counting.0.load(Ordering::SeqCst), 1);
        // Asleep again: the first call after the quiet moment wakes it.
        let mut asleep = Box::pin(activity.changed_from(activity.changes()));
        assert!(asleep.as_mut().poll(&mut cx).is_pending());
        activity.touch();
        assert_eq!(counting.0.load(Ordering::SeqCst), 2, "the next burst's first call wakes it");
        assert!(asleep.as_mut().poll(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_quiet_moment_without_growth_releases_nothing() {
        let (count, rss, releases) = watched(Duration::from_millis(200));
        tokio::task::yield_now().await;
        // A call comes and goes; the process grew by half a MiB.
        rss.store((10 << 20) + (512 << 10), Ordering::SeqCst);
        count.touch();
        count.touch();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(releases.load(Ordering::SeqCst), 0);
        // The next burst grows it by 20 MiB: released.
        rss.store(30 << 20, Ordering::SeqCst);
        count.touch();
        released(&releases, 1).await;
        assert_eq!(releases.load(Ordering::SeqCst), 1);
    }
}
