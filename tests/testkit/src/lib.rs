//! Test support shared by the workspace's test suites, so each exists once:
//!
//! - [`RuntimeProcess`]: the real `aipod-runtime` binary on a free loopback
//!   port, started and waited for (by its "listening" log line), built first
//!   when a test of another package needs it;
//! - [`Mixed`]: a deterministic payload of alternating log text and
//!   pseudo-random blocks, like real mixed data, never held in memory.

use std::{
    io::{self, BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::Duration,
};

/// How long a runtime may take to report its address.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `aipod-runtime` binary of this build, in the target directory the
/// running test lives in, brought up to date with `cargo build --workspace
/// --bins` first (a no-op of a fraction of a second when it is): a test of
/// another package never runs a missing or stale runtime. `AIPOD_RUNTIME_BIN`
/// names a binary built beforehand instead (`.ci/test` builds the workspace
/// first, so the hundred test processes do not each ask cargo).
pub fn runtime_binary() -> PathBuf {
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(bin) = std::env::var_os("AIPOD_RUNTIME_BIN").filter(|b| !b.is_empty()) {
                let bin = PathBuf::from(bin);
                assert!(bin.exists(), "AIPOD_RUNTIME_BIN={} does not exist", bin.display());
                return bin;
            }
            // target/<profile>/deps/<test> → target/<profile>/aipod-runtime
            let exe = std::env::current_exe().expect("the test's own path");
            let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("a cargo target directory");
            let bin = profile_dir.join("aipod-runtime");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                // The whole workspace, as `.ci/test` and `cargo test --workspace` select
                // it: building one package alone would resolve the `aipod` crate
                // with other features and rebuild (and overwrite) the binary.
                .args(["build", "--quiet", "--workspace", "--bins"])
                .env("CARGO_TARGET_DIR", profile_dir.parent().expect("target dir"))
                .status()
                .expect("run cargo build for the aipod-runtime binary");
            assert!(status.success(), "cargo build --workspace --bins failed");
            assert!(bin.exists(), "{} missing after cargo build", bin.display());
            bin
        })
        .clone()
}

/// The real `aipod-runtime` on 127.0.0.1 with its own spool, killed when
/// dropped (`stop` to end it with SIGTERM instead).
pub struct RuntimeProcess {
    /// The process.
    pub child: Child,
    /// `HOST:PORT` it listens on.
    pub addr: String,
    /// Its spool directory.
    pub spool: tempfile::TempDir,
    /// Every log line so far (JSON).
    pub log: Arc<Mutex<Vec<String>>>,
}

impl RuntimeProcess {
    /// Starts the binary with JSON logs on a free port, then `args`, and
    /// waits until it listens.
    pub fn start(args: &[&str]) -> Self {
        let spool = tempfile::tempdir().expect("spool dir");
        let mut child = Command::new(runtime_binary())
            .args(["--listen", "127.0.0.1:0", "--log-format", "json", "--spool-dir"])
            .arg(spool.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn aipod-runtime");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        std::thread::spawn({
            let log = Arc::clone(&log);
            // Keeps draining the log, so the runtime never blocks on a full pipe.
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                        && v["message"] == "aipod-runtime listening"
                    {
                        let _ = addr_tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
                    }
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            }
        });
        let addr = match addr_rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let lines = log.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
                panic!("aipod-runtime did not report its address; its log:\n{lines}");
            }
        };
        Self { child, addr, spool, log }
    }

    /// `http://HOST:PORT`.
    pub fn target(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The log lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for the process to exit (at most `limit`) and returns its exit
    /// code (`None` when a signal ended it).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(std::time::Instant::now() < deadline, "aipod-runtime did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (e.g. "TERM") to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -s {signal}");
    }
}

impl Drop for RuntimeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A deterministic payload of `len` bytes: alternating 64 KiB blocks of
/// log-like text and xorshift pseudo-random bytes.
pub struct Mixed {
    remaining: u64,
    pos: u64,
    rng: u64,
}

impl Mixed {
    /// `len` bytes of it.
    pub fn new(len: u64) -> Self {
        Self { remaining: len, pos: 0, rng: 0x2545_F491_4F6C_DD1D }
    }
}

const TEXT: &[u8] = b"2026-11-26T15:57:26Z INFO predict user=4711 model=v1 latency_ms=12 ok\n";
const BLOCK: u64 = 64 << 10;

impl Read for Mixed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let in_block = (BLOCK - self.pos % BLOCK) as usize;
        let n = buf.len().min(in_block).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let out = &mut buf[..n];
        if (self.pos / BLOCK).is_multiple_of(2) {
            for (i, b) in out.iter_mut().enumerate() {
                *b = TEXT[(usize::try_from(self.pos).unwrap_or(0) + i) % TEXT.len()];
            }
        } else {
            for word in out.chunks_mut(8) {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                word.copy_from_slice(&self.rng.to_le_bytes()[..word.len()]);
            }
        }
        self.pos += n as u64;
        self.remaining -= n as u64;
        Ok(n)
    }
}
