//! `exec:` models: long-lived worker processes in any language, speaking the
//! worker protocol ([`protocol`], `docs/worker-protocol.md`) over their
//! stdin and stdout. Each worker runs one call at a time; a [`supervisor`]
//! per worker starts it, feeds it calls and restarts it when it dies.

pub(crate) mod process;
pub(crate) mod protocol;
pub(crate) mod supervisor;

use std::{
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    code::ErrorCode,
    code::ModelError,
    model::{BoxFuture, Model, ModelCall, ModelOutput, WorkerCounts},
};
use supervisor::Job;

/// How a version's workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Worker processes; each runs one call at a time.
    pub workers: usize,
    /// How long a worker may take to send `ready`.
    pub start_timeout: Duration,
    /// How long a worker gets to answer a `cancel` or obey a `shutdown`
    /// before it is killed.
    pub grace: Duration,
}

/// What a version's workers and their supervisors share.
#[derive(Debug)]
pub(crate) struct Shared {
    version: String,
    argv: Vec<String>,
    settings: Settings,
    /// The functions, from the first worker's `ready`.
    functions: OnceLock<Vec<String>>,
    /// Workers that are ready now (idle or busy).
    live: AtomicUsize,
    /// Workers running a call now.
    busy: AtomicUsize,
    /// Restarts after a worker died.
    restarts: AtomicU64,
    /// Every worker has been ready once.
    started: AtomicBool,
    jobs: tokio::sync::Mutex<mpsc::Receiver<Job>>,
    stop: CancellationToken,
}

/// A model served by worker processes.
#[derive(Debug)]
pub(crate) struct Exec {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
    supervisors: Mutex<Vec<JoinHandle<()>>>,
}

/// Splits an `exec:` command line into words, POSIX-shell style (the
/// operator quotes each word that way).
pub(crate) fn split_command(command: &str) -> Result<Vec<String>, String> {
    match shlex::split(command) {
        Some(words) if !words.is_empty() => Ok(words),
        Some(_) => Err("exec: needs a command, e.g. exec:python3 model.py".to_owned()),
        None => Err(format!("exec:{command}: unbalanced quotes or a trailing backslash")),
    }
}

/// Checks that `program` can be started: an existing file when it names a
/// path, else found on `PATH`; says which, when it cannot.
pub(crate) fn find_program(program: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let runnable =
        |p: &std::path::Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        return if runnable(std::path::Path::new(program)) {
            Ok(())
        } else {
            Err(format!("the program {program:?} does not exist or is not executable"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| runnable(&dir.join(program))) {
        Ok(())
    } else {
        Err(format!("the program {program:?} was not found on PATH"))
    }
}

impl Exec {
    /// A model for `version` run by `argv`; no process starts until
    /// [`Model::start`].
    pub(crate) fn new(version: &str, argv: Vec<String>, settings: Settings) -> Self {
        let workers = settings.workers.max(1);
        let (jobs, rx) = mpsc::channel(workers);
        let shared = Shared {
            version: version.to_owned(),
            argv,
            settings: Settings { workers, ..settings },
            functions: OnceLock::new(),
            live: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            restarts: AtomicU64::new(0),
            started: AtomicBool::new(false),
            jobs: tokio::sync::Mutex::new(rx),
            stop: CancellationToken::new(),
        };
        Self { shared: Arc::new(shared), jobs, supervisors: Mutex::new(Vec::new()) }
    }

    /// Workers that are ready now.
    pub(crate) fn live_workers(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }
}

impl Model for Exec {
    fn functions(&self) -> Vec<String> {
        self.shared.functions.get().cloned().unwrap_or_default()
    }

    fn serves(&self, func: &str) -> bool {
        self.shared.functions.get().is_some_and(|f| f.binary_search_by(|x| x.as_str().cmp(func)).is_ok())
    }

    /// Ready once every worker has been ready, and while at least one is.
    fn is_ready(&self) -> bool {
        self.shared.started.load(Ordering::SeqCst) && self.live_workers() > 0
    }

    fn start(&self) -> BoxFuture<Result<(), String>> {
        let shared = Arc::clone(&self.shared);
        let workers = shared.settings.workers;
        let (tx, mut rx) = mpsc::channel(workers);
        {
            let mut supervisors = self.supervisors.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for index in 0..workers {
                supervisors.push(tokio::spawn(supervisor::supervise(Arc::clone(&shared), index, tx.clone())));
            }
        }
        drop(tx);
        Box::pin(async move {
            for _ in 0..workers {
                match rx.recv().await {
                    Some(Ok(())) => {}
                    Some(Err(why)) => return Err(format!("a worker {why}")),
                    None => return Err("the workers stopped while starting".to_owned()),
                }
            }
            shared.started.store(true, Ordering::SeqCst);
            let functions = shared.functions.get().map(|f| f.join(", ")).unwrap_or_default();
            tracing::info!(version = %shared.version, workers, %functions, "model version ready");
            Ok(())
        })
    }

    fn call(&self, call: ModelCall) -> BoxFuture<Result<ModelOutput, ModelError>> {
        let jobs = self.jobs.clone();
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            jobs.send(Job { call, reply })
                .await
                .map_err(|_| ModelError::new(ErrorCode::Unavailable, "the model's workers are stopping"))?;
            answer.await.unwrap_or_else(|_| Err(ModelError::internal("the worker stopped before it answered")))
        })
    }

    fn workers(&self) -> Option<WorkerCounts> {
        let s = &self.shared;
        let (live, busy) = (s.live.load(Ordering::SeqCst), s.busy.load(Ordering::SeqCst));
        Some(WorkerCounts {
            ready: live.saturating_sub(busy),
            starting: s.settings.workers.saturating_sub(live),
            busy: busy.min(live),
            restarts: s.restarts.load(Ordering::SeqCst),
        })
    }

    /// Stops the workers: idle ones get `shutdown`, busy ones `cancel`; any
    /// still running after the grace period are killed.
    fn shutdown(&self) -> BoxFuture<()> {
        self.shared.stop.cancel();
        let handles = std::mem::take(&mut *self.supervisors.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        Box::pin(async move {
            for handle in handles {
                let _ = handle.await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_split_like_a_shell_and_round_trip_the_operator_quoting() {
        assert_eq!(split_command("python3 m.py --lr=0.1").expect("split"), ["python3", "m.py", "--lr=0.1"]);
        // What the operator writes for ["python3", "/app/m.py", "--name", "it's"].
        assert_eq!(
            split_command(r"python3 /app/m.py --name 'it'\''s'").expect("split"),
            ["python3", "/app/m.py", "--name", "it's"]
        );
        assert!(split_command("python3 'open").expect_err("bad").contains("unbalanced"));
        assert!(split_command("   ").is_err());
    }
}
