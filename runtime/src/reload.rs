//! Values built from files and rebuilt when the files change (a mounted
//! Secret rotating, cert-manager renewing a certificate): checked every
//! second by modification time and size; a change that cannot be used keeps
//! the previous value in force and is logged.

use std::{
    path::PathBuf,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use crate::error::Result;

/// How often the files are checked for changes.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A file's modification time and size; `None` when it cannot be read.
type Stamp = Option<(SystemTime, u64)>;

/// A value built from `paths`, as last built.
#[derive(Debug)]
pub(crate) struct Reloading<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    current: RwLock<Arc<T>>,
    stamps: RwLock<Vec<Stamp>>,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Builds the value with `load` now; its error is a start-up error.
    /// `what` names it in the log ("auth tokens", "TLS certificate").
    pub(crate) fn load(what: &'static str, paths: Vec<PathBuf>, load: impl Fn() -> Result<T>) -> Result<Self> {
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        let value = load()?;
        Ok(Self { what, paths, current: RwLock::new(Arc::new(value)), stamps: RwLock::new(stamps) })
    }

    /// The value in force.
    pub(crate) fn get(&self) -> Arc<T> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Rebuilds the value with `load` whenever a file changes, forever.
    pub(crate) async fn watch(self: Arc<Self>, load: impl Fn() -> Result<T> + Send + Sync) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.check(&load);
        }
    }

    /// One check: rebuilds when a file changed. Returns whether it did.
    pub(crate) fn check(&self, load: &impl Fn() -> Result<T>) -> bool {
        let now: Vec<Stamp> = self.paths.iter().map(|p| stamp(p)).collect();
        {
            let mut stamps = self.stamps.write().unwrap_or_else(PoisonError::into_inner);
            if *stamps == now {
                return false;
            }
            *stamps = now;
        }
        match load() {
            Ok(value) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
                tracing::info!(files = ?self.paths, "{} reloaded", self.what);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "{} changed on disk but cannot be used; what was loaded before stays in force", self.what);
                false
            }
        }
    }
}

fn stamp(path: &std::path::Path) -> Stamp {
    std::fs::metadata(path).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn a_change_rebuilds_and_a_broken_one_keeps_the_old_value() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("n");
        std::fs::write(&path, "1").expect("write");
        let load = || {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::Config(e.to_string()))?;
            text.trim().parse::<u32>().map_err(|e| Error::Config(e.to_string()))
        };
        let value = Reloading::load("number", vec![path.clone()], load).expect("load");
        assert_eq!(*value.get(), 1);
        assert!(!value.check(&load), "unchanged: not rebuilt");
        std::fs::write(&path, "22").expect("write");
        assert!(value.check(&load));
        assert_eq!(*value.get(), 22);
        std::fs::write(&path, "not a number").expect("write");
        assert!(!value.check(&load));
        assert_eq!(*value.get(), 22, "a broken file keeps the value in force");
    }
}
