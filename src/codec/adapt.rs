//! Adaptive compression, in the spirit of `zstd --adapt`: the encoder of an
//! upload picks the zstd level chunk by chunk from the payload throughput
//! each level actually achieved — bytes of payload handed to the network per
//! second, which includes waiting for a slow link and CPU shared with
//! whatever else runs — by hill climbing over a few levels, holding the best
//! for a while, then probing its neighbours again so a link that changes
//! speed is followed within seconds. Every level yields ordinary zstd
//! frames (the lowest, stored blocks), so the server sees one zstd stream.

use std::time::{Duration, Instant};

/// The levels tried, from none (stored blocks: no CPU, no saving) to strong.
pub const LEVELS: [Option<i32>; 5] = [None, Some(-4), Some(1), Some(3), Some(7)];

/// Where an upload starts: zstd level 1, the fixed default — what a payload
/// too short to measure gets.
const START: usize = 2;
/// Chunks handed on after a level change before measuring: what the
/// pipeline behind the encoder (a few chunks) still held at the old level.
const WARMUP: u32 = 12;
/// Chunks handed on before the first measurement: the buffers between
/// encoder and server (channels, HTTP/2 windows) fill at the encoder's
/// pace before they pass on the link's.
const FIRST_WARMUP: u32 = 16;
/// Chunks measured per window.
const WINDOW: u32 = 16;
/// A window lasts at least this long, so fast links still measure something.
const MIN_WINDOW: Duration = Duration::from_millis(60);
/// How long the best level is kept before its neighbours are tried again.
const HOLD: Duration = Duration::from_secs(2);
/// A stronger level must beat the best by this factor to be taken.
const GAIN: f64 = 1.04;
/// A cheaper level is taken unless the best beats it by more than this
/// factor: within the noise of a measurement the level that spends less CPU
/// wins (on a machine whose cores the receiver shares, that CPU is the
/// receiver's); on a slow link the stronger levels win by far more.
const SLACK: f64 = 1.08;

/// The level chooser of one upload.
#[derive(Debug, Clone)]
pub struct Adapt {
    /// The level in use.
    current: usize,
    /// The best level measured this round (`current`, unless probing).
    best: usize,
    /// Payload bytes per second each level achieved in this round of probes.
    scores: [Option<f64>; LEVELS.len()],
    seen: u32,
    /// Chunks to let pass before this window is measured.
    warmup: u32,
    window_start: Option<Instant>,
    window_bytes: u64,
    /// Holding the current level until then, measuring nothing.
    hold_until: Option<Instant>,
}

impl Default for Adapt {
    fn default() -> Self {
        Self::new()
    }
}

impl Adapt {
    /// A chooser starting at zstd level 1.
    pub fn new() -> Self {
        Self {
            current: START,
            best: START,
            scores: [None; LEVELS.len()],
            seen: 0,
            warmup: FIRST_WARMUP,
            window_start: None,
            window_bytes: 0,
            hold_until: None,
        }
    }

    /// The level for the next chunk: `None` for stored blocks.
    pub fn level(&self) -> Option<i32> {
        LEVELS[self.current]
    }

    /// Records that a chunk made of `bytes` payload bytes was handed on to
    /// the network at `now` (after any wait for room).
    pub fn handed_on(&mut self, bytes: u64, now: Instant) {
        if let Some(until) = self.hold_until {
            if now < until {
                return;
            }
            // Time to look around again: this round starts afresh.
            self.hold_until = None;
            self.scores = [None; LEVELS.len()];
            self.restart();
        }
        self.seen += 1;
        if self.seen <= self.warmup {
            if self.seen == self.warmup {
                self.window_start = Some(now);
            }
            return;
        }
        self.window_bytes += bytes;
        let Some(start) = self.window_start else { return };
        let elapsed = now.saturating_duration_since(start);
        if self.seen < self.warmup + WINDOW || elapsed < MIN_WINDOW {
            return;
        }
        self.scores[self.current] = Some(self.window_bytes as f64 / elapsed.as_secs_f64().max(1e-9));
        self.decide(now);
    }

    /// After a measurement: a probed level that beat the best (see [`GAIN`]
    /// and [`SLACK`]) becomes the best; then an unmeasured neighbour of the best
    /// is probed, or, all measured, the best is held.
    fn decide(&mut self, now: Instant) {
        let score = |i: usize| self.scores[i].unwrap_or(0.0);
        let better = if self.current < self.best {
            score(self.current) * SLACK >= score(self.best)
        } else {
            score(self.current) > score(self.best) * GAIN
        };
        if self.current != self.best && better {
            self.best = self.current;
        }
        let best = self.best;
        tracing::debug!(level = ?LEVELS[self.current], rate_mb_s = score(self.current) / 1e6, best = ?LEVELS[best], "compression level measured");
        let neighbours = [best.checked_sub(1), Some(best + 1).filter(|i| *i < LEVELS.len())];
        match neighbours.into_iter().flatten().find(|i| self.scores[*i].is_none()) {
            Some(next) => self.switch(next),
            None => {
                self.switch(best);
                self.hold_until = Some(now + HOLD);
            }
        }
    }

    fn switch(&mut self, to: usize) {
        self.current = to;
        self.restart();
    }

    fn restart(&mut self) {
        self.seen = 0;
        self.warmup = WARMUP;
        self.window_start = None;
        self.window_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated upload: each level's compression speed and ratio on one
    /// core, a link of `link` wire bytes per second; the payload rate is
    /// the slower of the compressor and the link times the ratio.
    fn rate(level: Option<i32>, link: f64) -> f64 {
        let (speed, ratio): (f64, f64) = match level {
            None => (5e9, 1.0),
            Some(-4) => (1.6e9, 1.35),
            Some(1) => (1.0e9, 1.8),
            Some(3) => (0.55e9, 1.95),
            _ => (0.12e9, 2.1),
        };
        speed.min(link * ratio)
    }

    /// Runs `adapt` from simulated second `from` to `to` (after `base`) on a
    /// link whose speed `link(t)` may change; returns the level used at the
    /// end and the payload bytes moved.
    fn run(adapt: &mut Adapt, base: Instant, from: f64, to: f64, link: impl Fn(f64) -> f64) -> (Option<i32>, f64) {
        let start = base;
        let mut t = from;
        let mut moved = 0.0;
        while t < to {
            let r = rate(adapt.level(), link(t));
            let chunk = 1_048_576.0;
            t += chunk / r;
            moved += chunk;
            adapt.handed_on(chunk as u64, start + Duration::from_secs_f64(t));
        }
        (adapt.level(), moved)
    }

    fn simulate(adapt: &mut Adapt, seconds: f64, link: impl Fn(f64) -> f64) -> (Option<i32>, f64) {
        run(adapt, Instant::now(), 0.0, seconds, link)
    }

    #[test]
    fn a_slow_link_gets_strong_compression_and_a_fast_one_little() {
        let (level, _) = simulate(&mut Adapt::new(), 20.0, |_| 50e6);
        assert_eq!(level, Some(7), "at 50 MB/s the strongest level moves the most payload");
        let (level, _) = simulate(&mut Adapt::new(), 5.0, |_| 1e9);
        assert_eq!(level, Some(-4), "at 1 GB/s a fast level: the link takes more than level 1 makes");
        let (level, _) = simulate(&mut Adapt::new(), 5.0, |_| 10e9);
        assert_eq!(level, None, "a link faster than any compressor: stored blocks");
    }

    #[test]
    fn auto_is_within_ten_percent_of_the_best_fixed_level() {
        for link in [50e6, 200e6, 1e9, 5e9] {
            let (_, auto) = simulate(&mut Adapt::new(), 30.0, |_| link);
            let best = LEVELS.iter().map(|l| rate(*l, link) * 30.0).fold(0.0, f64::max);
            assert!(auto >= 0.9 * best, "link {link}: auto moved {auto:.3e}, the best fixed level {best:.3e}");
        }
    }

    #[test]
    fn a_link_that_changes_speed_is_followed_within_seconds() {
        let mut adapt = Adapt::new();
        let base = Instant::now();
        let (level, _) = run(&mut adapt, base, 0.0, 10.0, |_| 5e9);
        assert_eq!(level, None);
        // The link drops to 50 MB/s: within a few seconds the level climbs.
        let (level, _) = run(&mut adapt, base, 10.0, 16.0, |_| 50e6);
        assert!(level.is_some_and(|l| l >= 3), "{level:?} after the link slowed");
    }
}
