//! The spool: a directory owned by one runtime, holding for each call its
//! decoded input (`call-N-ID.input`) and its output directory
//! (`call-N-ID.output/`), side by side rather than in a directory of their
//! own: on a journaling file system every directory created and removed is
//! a visible share of a small call's cost. Both are removed when the call
//! ends, however it ends; leftovers of a crashed runtime are removed at
//! start-up.

use std::{
    fs::{self, File, TryLockError},
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::error::{Error, Result};

const LOCK_FILE: &str = ".aipod-runtime.lock";
const CALL_PREFIX: &str = "call-";

/// The runtime's spool directory, locked against other runtimes.
#[derive(Debug)]
pub(crate) struct Spool {
    root: Arc<Path>,
    next: AtomicU64,
    _lock: File,
}

impl Spool {
    /// Creates (if needed) and locks `root`, then removes stale call
    /// directories left by an earlier runtime.
    pub(crate) fn open(root: &Path) -> Result<Self> {
        let spool_err = |source: io::Error| match source.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                Error::SpoolNotWritable { path: root.to_owned(), uid: rustix::process::getuid().as_raw() }
            }
            _ => Error::Spool { path: root.to_owned(), source },
        };
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
                let path = entry.path();
                if entry.file_type().map_err(spool_err)?.is_dir() {
                    fs::remove_dir_all(path).map_err(spool_err)?;
                } else {
                    fs::remove_file(path).map_err(spool_err)?;
                }
                stale += 1;
            }
        }
        if stale > 0 {
            tracing::warn!(spool = %root.display(), stale, "removed call directories left by an earlier runtime");
        }
        Ok(Self { root: Arc::from(root), next: AtomicU64::new(0), _lock: lock })
    }

    /// The spool's root directory.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes free for unprivileged writers on the spool's file system.
    pub(crate) fn available_bytes(&self) -> io::Result<u64> {
        let st = rustix::fs::statvfs(&*self.root)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Names the spool entries of a new call. Nothing is created yet: the
    /// input file by whoever writes it, the output directory by a model that
    /// writes a result file (most calls never need one).
    pub(crate) fn call_paths(&self, call_id: &str) -> CallPaths {
        CallPaths(Arc::new(Entries {
            root: Arc::clone(&self.root),
            n: self.next.fetch_add(1, Ordering::Relaxed),
            call_id: call_id.to_owned(),
            input: OnceLock::new(),
            output: OnceLock::new(),
            made: Mutex::new(Made::default()),
        }))
    }
}

/// One call's spool entries — its input file and output directory, side by
/// side — and which of them were made. Shared by the call ([`CallPaths`],
/// which removes them) and what the model holds (its input and output
/// directory), so that a call that never touched the disk costs no
/// file-system call at its end either.
#[derive(Debug)]
pub(crate) struct Entries {
    root: Arc<Path>,
    /// The call's number in this spool and its id, which name its entries
    /// (`call-N-ID`).
    n: u64,
    call_id: String,
    /// Named on first use: most small calls never ask.
    input: OnceLock<PathBuf>,
    output: OnceLock<PathBuf>,
    made: Mutex<Made>,
}

/// What exists of a call's entries; `closed` once the call has ended and
/// its entries were removed (nothing may be made after).
#[derive(Debug, Default, Clone, Copy)]
struct Made {
    input: bool,
    output: bool,
    closed: bool,
}

impl Entries {
    fn input_path(&self) -> &Path {
        self.input.get_or_init(|| self.named("input"))
    }

    fn output_path(&self) -> &Path {
        self.output.get_or_init(|| self.named("output"))
    }

    /// `call-N-ID.suffix` in the spool, the id cut to what is safe in a
    /// file name.
    fn named(&self, suffix: &str) -> PathBuf {
        let safe: String =
            self.call_id.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')).take(48).collect();
        self.root.join(format!("{CALL_PREFIX}{}-{safe}.{suffix}", self.n))
    }

    fn made(&self) -> std::sync::MutexGuard<'_, Made> {
        self.made.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where the decoded payload is (or would be) written.
    pub(crate) fn input(&self) -> &Path {
        self.input_path()
    }

    /// Creates the input file, for a payload received onto the disk.
    pub(crate) fn create_input(&self) -> io::Result<File> {
        let mut made = self.made();
        if made.closed {
            return Err(ended());
        }
        let file = File::create(self.input_path())?;
        made.input = true;
        Ok(file)
    }

    /// Writes `bytes` as the input file unless it exists already: the path
    /// of a payload held in memory, made when a model first asks for it.
    pub(crate) fn materialise_input(&self, bytes: &[u8]) -> io::Result<()> {
        let mut made = self.made();
        if made.closed {
            return Err(ended());
        }
        if !made.input {
            fs::write(self.input_path(), bytes)?;
            made.input = true;
        }
        Ok(())
    }

    /// The output directory's path, noted as handed to the model: it may
    /// create it, so it is removed at the end.
    pub(crate) fn output(&self) -> &Path {
        self.made().output = true;
        self.output_path()
    }
}

fn ended() -> io::Error {
    io::Error::other("the call has ended and its spool entries were removed")
}

/// The owner of one call's spool entries: whatever of them was made is
/// removed from disk when it is dropped.
#[derive(Debug)]
pub(crate) struct CallPaths(Arc<Entries>);

impl CallPaths {
    /// The entries, for the model's input and output directory.
    pub(crate) fn entries(&self) -> &Arc<Entries> {
        &self.0
    }

    /// Where the decoded payload is written.
    pub(crate) fn input(&self) -> &Path {
        self.0.input_path()
    }

    /// Removes the input file now (a retained call keeps only its result).
    pub(crate) fn remove_input(&self) {
        let mut made = self.0.made();
        if !made.input {
            return;
        }
        made.input = false;
        if let Err(e) = fs::remove_file(self.0.input_path())
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(call = %self.0.input_path().display(), error = %e, "could not remove the call's input file");
        }
    }

    /// Checks that `file` is a regular file inside the output directory and
    /// returns its canonical path.
    pub(crate) fn contain_output(&self, file: &Path) -> std::result::Result<PathBuf, String> {
        let ours = self.0.output_path();
        let file = if file.is_relative() { ours.join(file) } else { file.to_owned() };
        // The call's own input may go back as it is (`echo` does).
        if file == self.0.input_path() && fs::symlink_metadata(&file).is_ok_and(|m| m.is_file()) {
            return Ok(file);
        }
        // The common case, cheaply: a regular file directly in the output
        // directory, neither it nor the directory a symlink.
        if file.parent() == Some(ours)
            && file.file_name().is_some_and(|n| n != "." && n != "..")
            && fs::symlink_metadata(ours).is_ok_and(|m| m.is_dir())
            && fs::symlink_metadata(&file).is_ok_and(|m| m.is_file())
        {
            return Ok(file);
        }
        // The fence is the output directory itself: it must still be a real
        // directory, or a model could move the fence by replacing it with a
        // symlink (to /etc, or to another call's spool).
        if !fs::symlink_metadata(ours).is_ok_and(|m| m.is_dir()) {
            return Err(format!("the call's output directory {} is no longer a directory", ours.display()));
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

impl Drop for CallPaths {
    fn drop(&mut self) {
        let made = {
            let mut made = self.0.made();
            made.closed = true;
            *made
        };
        let entries = &*self.0;
        let mut removed = Ok(());
        if made.input {
            removed = fs::remove_file(entries.input_path()).or_else(ignore_missing);
        }
        if made.output && removed.is_ok() {
            // An empty output directory goes with one rmdir; a full one
            // needs a walk.
            let output = entries.output_path();
            removed = fs::remove_dir(output)
                .or_else(|e| match e.kind() {
                    io::ErrorKind::NotFound => Err(e),
                    _ => fs::remove_dir_all(output),
                })
                .or_else(ignore_missing);
        }
        if let Err(e) = removed {
            tracing::warn!(call = %entries.input_path().display(), error = %e, "could not remove the call's spool files");
        }
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(e) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_that_never_asks_for_its_paths_names_none() {
        // Four allocations a call (two names, two joins) that a small call
        // in memory never used.
        let tmp = tempfile::tempdir().expect("tmp");
        let spool = Spool::open(tmp.path()).expect("open");
        let dir = spool.call_paths("small");
        assert!(dir.entries().input.get().is_none() && dir.entries().output.get().is_none());
        assert_eq!(dir.input().file_name().and_then(|n| n.to_str()), Some("call-0-small.input"));
        assert!(dir.entries().output.get().is_none(), "the output directory is named when asked");
        drop(dir);
        assert!(
            fs::read_dir(tmp.path())
                .expect("ls")
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with(CALL_PREFIX))
        );
    }

    #[test]
    fn call_dirs_are_removed_on_drop_and_stale_ones_at_open() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("spool");
        {
            let spool = Spool::open(&root).expect("open");
            let dir = spool.call_paths("abc/../../evil");
            let out = dir.entries().output().to_owned();
            fs::create_dir(&out).expect("the model makes its output dir");
            for path in [dir.input(), &out] {
                assert_eq!(path.parent(), Some(root.as_path()));
                assert!(!path.to_string_lossy().contains(".."), "no path tricks from call ids: {}", path.display());
            }
            drop(dir.entries().create_input().expect("create"));
            fs::write(out.join("result"), b"y").expect("write");
            let input = dir.input().to_owned();
            let entries = Arc::clone(dir.entries());
            drop(dir);
            assert!(!input.exists() && !out.exists());
            assert!(entries.create_input().is_err() && entries.materialise_input(b"late").is_err(), "ended");
            assert!(!input.exists());
            let left = spool.call_paths("left-behind");
            left.entries().materialise_input(b"x").expect("write");
            fs::create_dir(left.entries().output()).expect("mkdir");
            std::mem::forget(left);
            assert!(spool.available_bytes().expect("statvfs") > 0);
        }
        let stale: Vec<_> = fs::read_dir(&root).expect("ls").filter_map(|e| e.ok()).collect();
        assert_eq!(stale.len(), 3, "lock file and one stale call's input and output");
        let _spool = Spool::open(&root).expect("reopen");
        let left: Vec<_> = fs::read_dir(&root).expect("ls").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from(LOCK_FILE)]);
    }

    #[test]
    fn a_call_that_made_nothing_removes_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spool = Spool::open(tmp.path()).expect("open");
        let dir = spool.call_paths("c");
        // Made behind the call's back: not the call's to remove.
        fs::write(dir.input(), b"someone else's").expect("write");
        let input = dir.input().to_owned();
        drop(dir);
        assert!(input.exists(), "nothing was made, so nothing is removed (and no syscall spent trying)");
        let dir = spool.call_paths("d");
        dir.entries().materialise_input(b"abc").expect("write");
        dir.entries().materialise_input(b"other").expect("once only");
        assert_eq!(fs::read(dir.input()).expect("read"), b"abc");
        dir.remove_input();
        assert!(!dir.input().exists());
        let input = dir.input().to_owned();
        fs::write(&input, b"made by someone else after").expect("write");
        drop(dir);
        assert!(input.exists(), "removed once: the call's own file is gone already");
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
        let dir = spool.call_paths("c");
        assert!(dir.contain_output(dir.input()).is_err(), "no input file yet");
        fs::write(dir.input(), b"in").expect("write");
        assert_eq!(
            dir.contain_output(dir.input()).ok().as_deref(),
            Some(dir.input()),
            "the input may go back as it is"
        );
        let out = dir.entries().output().to_owned();
        fs::create_dir(&out).expect("mkdir");
        fs::write(out.join("ok.bin"), b"1").expect("write");
        assert!(dir.contain_output(Path::new("ok.bin")).is_ok());
        assert!(dir.contain_output(&out.join("ok.bin")).is_ok());
        assert!(dir.contain_output(Path::new("../c.input")).is_err(), "only the input's own path, not a way around");
        assert!(dir.contain_output(Path::new("missing")).is_err());
        assert!(dir.contain_output(Path::new("/etc/passwd")).is_err());
        std::os::unix::fs::symlink(dir.input(), out.join("link")).expect("symlink");
        assert!(dir.contain_output(Path::new("link")).is_err(), "a symlink out of output/ is refused");
        // The model replaces its output directory with a symlink elsewhere:
        // the fence does not move with it.
        let elsewhere = tempfile::tempdir().expect("elsewhere");
        fs::write(elsewhere.path().join("secret"), b"s").expect("write");
        fs::remove_dir_all(&out).expect("rm");
        std::os::unix::fs::symlink(elsewhere.path(), &out).expect("symlink the output dir");
        let e = dir.contain_output(Path::new("secret")).expect_err("moved fence");
        assert!(e.contains("no longer a directory"), "{e}");
        assert!(dir.contain_output(&out.join("secret")).is_err());
    }
}
