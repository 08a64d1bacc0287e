//! Values built from files and rebuilt when the files change (a mounted
//! Secret rotating, cert-manager renewing a certificate): checked every
//! second by modification time and size, off the async threads; a change
//! that cannot be used keeps the previous value in force and is logged.
//! Credential files are read by [`read_credential`]: regular files only,
//! and at most [`MAX_CREDENTIAL_BYTES`].

use std::{
    io::Read,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use crate::error::{Error, Result};

/// The largest credential file read (a token list, a PEM chain): a path
/// pointing at `/dev/zero` or a huge file costs no more than this.
pub(crate) const MAX_CREDENTIAL_BYTES: u64 = 1 << 20;

/// Reads the credential file at `path` (named by `flag` in errors): a
/// regular file of at most [`MAX_CREDENTIAL_BYTES`]. Opened without
/// blocking, so a FIFO cannot stall the reader; a device, directory or
/// socket is refused.
pub(crate) fn read_credential(flag: &str, path: &Path) -> Result<Vec<u8>> {
    let bad = |m: String| Error::Config(format!("{flag} {}: {m}", path.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".to_owned()));
    }
    if meta.len() > MAX_CREDENTIAL_BYTES {
        return Err(bad(format!("larger than {} bytes", MAX_CREDENTIAL_BYTES)));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_CREDENTIAL_BYTES + 1).read_to_end(&mut bytes).map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_CREDENTIAL_BYTES {
        return Err(bad(format!("larger than {} bytes", MAX_CREDENTIAL_BYTES)));
    }
    Ok(bytes)
}

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

    /// Rebuilds the value with `load` whenever a file changes, forever;
    /// the files are looked at and read on a blocking thread.
    pub(crate) async fn watch(self: Arc<Self>, load: impl Fn() -> Result<T> + Send + Sync + 'static) {
        let load = Arc::new(load);
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (this, load) = (Arc::clone(&self), Arc::clone(&load));
            let _ = tokio::task::spawn_blocking(move || this.check(&*load)).await;
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
