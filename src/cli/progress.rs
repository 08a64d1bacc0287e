//! Live progress on stderr while a call runs, one line that fits the
//! terminal: `upload` with bytes, rate and what the server has acknowledged;
//! then the phase, queue position, elapsed time and the model's progress;
//! then `download` for a result payload.

use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::{
    client::Progress,
    proto::{Heartbeat, Phase},
    size,
};

/// Draws one call's progress; draws nothing when hidden.
#[derive(Clone)]
pub struct Display {
    bar: ProgressBar,
    stage: Arc<Mutex<Stage>>,
}

/// What the line shows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Waiting,
    Upload,
    Server,
    Download,
}

impl Display {
    /// A display on stderr, or a hidden one.
    pub fn new(visible: bool) -> Self {
        let target = if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(spinner());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Self { bar, stage: Arc::new(Mutex::new(Stage::Waiting)) }
    }

    fn enter(&self, stage: Stage) -> bool {
        let mut now = self.stage.lock().unwrap_or_else(|e| e.into_inner());
        let changed = *now != stage;
        *now = stage;
        changed
    }

    fn stage(&self) -> Stage {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates the display from a client progress event.
    pub fn update(&self, p: &Progress) {
        match p {
            Progress::Sent { bytes, total } => {
                if let Some(total) = total {
                    if self.enter(Stage::Upload) {
                        self.bar.set_message("");
                        self.bar.set_length(*total);
                        self.bar.set_style(bar("upload"));
                    }
                    self.bar.set_position(*bytes);
                }
            }
            Progress::Heartbeat(h) => {
                let receiving = h.phase == Phase::Receiving as i32;
                if receiving && self.stage() == Stage::Upload {
                    // Only what the server has acknowledged; nothing until it has.
                    let acked = if h.received_bytes > 0 {
                        format!("server has {}", size::format(h.received_bytes))
                    } else {
                        String::new()
                    };
                    self.bar.set_message(acked);
                } else if !receiving || self.stage() == Stage::Waiting {
                    if self.enter(Stage::Server) {
                        self.bar.set_style(spinner());
                    }
                    self.bar.set_message(describe(h));
                }
            }
            Progress::Result { payload: Some(n) } => {
                self.enter(Stage::Download);
                self.bar.set_message("");
                self.bar.set_length(*n);
                self.bar.set_position(0);
                self.bar.set_style(bar("download"));
            }
            Progress::Result { payload: None } => self.bar.set_message("done"),
            Progress::Received { bytes, .. } => {
                if self.stage() == Stage::Download {
                    self.bar.set_position(*bytes);
                }
            }
            Progress::Retrying { attempt, wait, error } => {
                self.enter(Stage::Waiting);
                self.bar.set_style(spinner());
                self.bar.set_message(format!("attempt {attempt} in {}s: {error}", wait.as_secs()));
            }
        }
    }

    /// Removes the display.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `{wide_msg}` takes what is left of the terminal's width, so the line never
/// wraps.
fn spinner() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {wide_msg}").unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar(label: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{label:<8} {{bar:20}} {{bytes:>9}}/{{total_bytes:<9}} {{bytes_per_sec:>11}} {{wide_msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// A heartbeat in words: `running 1m12s, 40% epoch 2/5`.
pub fn describe(h: &Heartbeat) -> String {
    let elapsed = std::time::Duration::from_millis(h.elapsed_ms);
    let mut s = match Phase::try_from(h.phase).unwrap_or(Phase::Unspecified) {
        Phase::Receiving if h.received_bytes == 0 => "accepted, waiting for the payload".to_owned(),
        Phase::Receiving => format!("server has {}", size::format(h.received_bytes)),
        Phase::Queued => format!("queued, position {}", h.queue_position),
        Phase::Running => "running".to_owned(),
        Phase::Sending => "sending the result".to_owned(),
        Phase::Unspecified => "working".to_owned(),
    };
    s.push_str(&format!(" {}s", elapsed.as_secs()));
    if let Some(p) = h.progress {
        s.push_str(&format!(", {:.0}%", p * 100.0));
    }
    if !h.message.is_empty() {
        s.push(' ');
        s.push_str(&h.message);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_read_as_words() {
        let h = Heartbeat {
            phase: Phase::Running as i32,
            elapsed_ms: 72_000,
            progress: Some(0.4),
            message: "epoch 2/5".into(),
            ..Default::default()
        };
        assert_eq!(describe(&h), "running 72s, 40% epoch 2/5");
        let q = Heartbeat { phase: Phase::Queued as i32, queue_position: 3, elapsed_ms: 1500, ..Default::default() };
        assert_eq!(describe(&q), "queued, position 3 1s");
        let r = Heartbeat { phase: Phase::Receiving as i32, ..Default::default() };
        assert_eq!(describe(&r), "accepted, waiting for the payload 0s", "no byte count the server has not seen");
    }
}
