//! The spool: a directory owned by one runtime, holding one directory per
//! call (its decoded input and its output). A call's directory is removed
//! when the call ends, however it ends; leftovers of a crashed runtime are
//! removed at start-up.

use std::{
    fs::{self, File, TryLockError},
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use crate::error::{Error, Result};

const LOCK_FILE: &str = ".aipod-runtime.lock";
const CALL_PREFIX: &str = "call-";

/// The runtime's spool directory, locked against other runtimes.
#[derive(Debug)]
pub struct Spool {
    root: PathBuf,
    next: AtomicU64,
    _lock: File,
}

impl Spool {
    /// Creates (if needed) and locks `root`, then removes stale call
    /// directories left by an earlier runtime.
    pub fn open(root: &Path) -> Result<Self> {
        let spool_err = |source| Error::Spool { path: root.to_owned(), source };
        fs::create_dir_all(root).map_err(spool_err)?;
        let lock =
            File::options().create(true).truncate(false).write(true).open(root.join(LOCK_FILE)).map_err(spool_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(Error::SpoolInUse(root.to_owned())),
            Err(TryLockError::Error(e)) => return Err(spool_err(e)),
        }
        let mut stale = 0;
        for entry in fs::read_dir(root).map_err(spool_err)? {
            let entry = entry.map_err(spool_err)?;
            if entry.file_name().to_string_lossy().starts_with(CALL_PREFIX) {
                fs::remove_dir_all(entry.path()).map_err(spool_err)?;
                stale += 1;
            }
        }
        if stale > 0 {
            tracing::warn!(spool = %root.display(), stale, "removed call directories left by an earlier runtime");
        }
        Ok(Self { root: root.to_owned(), next: AtomicU64::new(0), _lock: lock })
    }

    /// The spool's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes free for unprivileged writers on the spool's file system.
    pub fn available_bytes(&self) -> io::Result<u64> {
        let st = rustix::fs::statvfs(&self.root)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Creates the directory of a new call: `input` (empty) and `output/`.
    pub fn create_call(&self, call_id: &str) -> io::Result<CallDir> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let safe: String =
            call_id.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')).take(48).collect();
        let path = self.root.join(format!("{CALL_PREFIX}{n}-{safe}"));
        fs::create_dir(&path)?;
        let dir = CallDir { path };
        fs::create_dir(dir.output_dir())?;
        Ok(dir)
    }
}

/// One call's spool directory; removed from disk when dropped.
#[derive(Debug)]
pub struct CallDir {
    path: PathBuf,
}

impl CallDir {
    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the decoded payload is written.
    pub fn input(&self) -> PathBuf {
        self.path.join("input")
    }

    /// Where the model writes its result payload.
    pub fn output_dir(&self) -> PathBuf {
        self.path.join("output")
    }

    /// Checks that `file` is a regular file inside the output directory and
    /// returns its canonical path.
    pub fn contain_output(&self, file: &Path) -> std::result::Result<PathBuf, String> {
        let ours = self.output_dir();
        let file = if file.is_relative() { ours.join(file) } else { file.to_owned() };
        // The common case, cheaply: a regular file directly in the output
        // directory, neither it nor the directory a symlink.
        if file.parent() == Some(ours.as_path())
            && file.file_name().is_some_and(|n| n != "." && n != "..")
            && fs::symlink_metadata(&ours).is_ok_and(|m| m.is_dir())
            && fs::symlink_metadata(&file).is_ok_and(|m| m.is_file())
        {
            return Ok(file);
        }
        let out = ours.canonicalize().map_err(|e| format!("output directory is gone: {e}"))?;
        let real =
            file.canonicalize().map_err(|e| format!("result payload {} cannot be opened: {e}", file.display()))?;
        if !real.starts_with(&out) {
            return Err(format!("result payload {} lies outside the call's output directory", file.display()));
        }
        if !real.is_file() {
            return Err(format!("result payload {} is not a regular file", file.display()));
        }
        Ok(real)
    }
}

impl Drop for CallDir {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(dir = %self.path.display(), error = %e, "could not remove call directory");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_dirs_are_removed_on_drop_and_stale_ones_at_open() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("spool");
        {
            let spool = Spool::open(&root).expect("open");
            let dir = spool.create_call("abc/../../evil").expect("call");
            assert!(dir.path().starts_with(&root));
            assert!(
                !dir.path().to_string_lossy().contains(".."),
                "no path tricks from call ids: {}",
                dir.path().display()
            );
            fs::write(dir.input(), b"x").expect("write");
            let kept = dir.path().to_owned();
            drop(dir);
            assert!(!kept.exists());
            std::mem::forget(spool.create_call("left-behind").expect("call"));
            assert!(spool.available_bytes().expect("statvfs") > 0);
        }
        let stale: Vec<_> = fs::read_dir(&root).expect("ls").filter_map(|e| e.ok()).collect();
        assert_eq!(stale.len(), 2, "lock file and one stale call dir");
        let _spool = Spool::open(&root).expect("reopen");
        let left: Vec<_> = fs::read_dir(&root).expect("ls").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from(LOCK_FILE)]);
    }

    #[test]
    fn a_second_runtime_cannot_share_the_spool() {
        let tmp = tempfile::tempdir().expect("tmp");
        let _first = Spool::open(tmp.path()).expect("open");
        assert!(matches!(Spool::open(tmp.path()), Err(Error::SpoolInUse(_))));
    }

    #[test]
    fn output_must_stay_inside_the_output_dir() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spool = Spool::open(tmp.path()).expect("open");
        let dir = spool.create_call("c").expect("call");
        fs::write(dir.output_dir().join("ok.bin"), b"1").expect("write");
        assert!(dir.contain_output(Path::new("ok.bin")).is_ok());
        assert!(dir.contain_output(&dir.output_dir().join("ok.bin")).is_ok());
        assert!(dir.contain_output(&dir.input()).is_err(), "input is outside output/");
        assert!(dir.contain_output(Path::new("../input")).is_err());
        assert!(dir.contain_output(Path::new("missing")).is_err());
        assert!(dir.contain_output(Path::new("/etc/passwd")).is_err());
        std::os::unix::fs::symlink(dir.input(), dir.output_dir().join("link")).expect("symlink");
        assert!(dir.contain_output(Path::new("link")).is_err(), "a symlink out of output/ is refused");
    }
}
