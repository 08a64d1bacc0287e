//! One worker process: started in its own process group with piped stdio,
//! protocol lines in and out, stderr copied to the runtime's log (tagged with
//! version and worker index) and its tail kept for crash reports.

use std::{
    collections::VecDeque,
    io,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, ChildStdout, Command},
    task::JoinHandle,
};

use super::protocol::{FromWorker, ToWorker};

/// Longest protocol line a worker may send: a result's JSON at its limit
/// (`model::MAX_RESULT_JSON`, checked when the result arrives) with room
/// for the line's envelope and escaping.
const MAX_LINE: usize = crate::model::MAX_RESULT_JSON + (1 << 20);
/// Longest stderr line kept whole; longer ones are cut.
const MAX_STDERR_LINE: usize = 4096;
/// Stderr lines kept for crash reports.
const TAIL_LINES: usize = 20;

/// Who a worker is, for logs and errors: `v1#0`.
#[derive(Debug, Clone)]
pub(crate) struct Label {
    /// The model version it serves.
    pub version: String,
    /// Its index among the version's workers.
    pub index: usize,
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker {} of version {:?}", self.index, self.version)
    }
}

/// A running worker process.
#[derive(Debug)]
pub(crate) struct Process {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    line: Vec<u8>,
    tail: Arc<Mutex<VecDeque<String>>>,
    stderr: Option<JoinHandle<()>>,
    pid: Option<u32>,
    label: Label,
    /// Whether the worker has sent `ready`: from then on its stdout is the
    /// protocol alone.
    ready: bool,
}

impl Process {
    /// Starts `argv` as worker `label`.
    pub(crate) fn spawn(argv: &[String], label: &Label) -> io::Result<Self> {
        let (program, args) =
            argv.split_first().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        let mut child = Command::new(program)
            .args(args)
            .env("AIPOD_WORKER_PROTOCOL", super::protocol::PROTOCOL.to_string())
            .env("AIPOD_MODEL_VERSION", &label.version)
            .env("AIPOD_WORKER_INDEX", label.index.to_string())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C in the terminal reaches the
            // runtime, which drains, not the workers in the middle of calls.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let missing = || io::Error::other("worker stdio was not piped");
        let stdin = child.stdin.take().ok_or_else(missing)?;
        let stdout = BufReader::with_capacity(64 << 10, child.stdout.take().ok_or_else(missing)?);
        let stderr = child.stderr.take().ok_or_else(missing)?;
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let stderr = tokio::spawn(copy_stderr(BufReader::new(stderr), label.clone(), Arc::clone(&tail)));
        let pid = child.id();
        Ok(Self {
            child,
            stdin,
            stdout,
            line: Vec::new(),
            tail,
            stderr: Some(stderr),
            pid,
            label: label.clone(),
            ready: false,
        })
    }

    /// The process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Sends one message.
    pub(crate) async fn send(&mut self, message: &ToWorker<'_>) -> io::Result<()> {
        self.stdin.write_all(&message.to_line()).await?;
        self.stdin.flush().await
    }

    /// The next message; `Ok(None)` when the worker closed its stdout (it
    /// exited). Blank lines are skipped. Until `ready`, lines that are not
    /// protocol messages are the model's own output (a `print()` at import
    /// or in a constructor, before the SDK took stdout over): logged like
    /// stderr, not a protocol violation. After `ready` they break the
    /// protocol. Cancel-safe: a partly read line is kept for the next call.
    pub(crate) async fn next(&mut self) -> Result<Option<FromWorker>, String> {
        loop {
            match read_line(&mut self.stdout, &mut self.line, MAX_LINE).await {
                Err(e) => return Err(format!("reading the worker's stdout failed: {e}")),
                Ok(Line::Eof) => return Ok(None),
                Ok(Line::TooLong) => {
                    return Err(format!("the worker sent a protocol line longer than {} MiB", MAX_LINE >> 20));
                }
                Ok(Line::Complete) => {
                    let line = std::mem::take(&mut self.line);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    match FromWorker::parse(&line) {
                        Ok(message) => {
                            self.ready |= matches!(message, FromWorker::Ready { .. });
                            return Ok(Some(message));
                        }
                        Err(_) if !self.ready => {
                            let text = String::from_utf8_lossy(&line);
                            let label = &self.label;
                            tracing::info!(
                                target: "aipod_runtime::worker",
                                version = %label.version,
                                worker = label.index,
                                stdout = true,
                                "{}",
                                text.trim_end()
                            );
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// Sends a signal to the worker's process group (the worker and whatever
    /// it started).
    pub(crate) fn signal(&self, signal: rustix::process::Signal) {
        let pid = self.pid.and_then(|p| i32::try_from(p).ok()).and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            // The group may be gone already; that is what we wanted.
            let _ = rustix::process::kill_process_group(pid, signal);
        }
    }

    /// Kills the worker and everything in its process group.
    pub(crate) fn kill(&mut self) {
        self.signal(rustix::process::Signal::KILL);
        let _ = self.child.start_kill();
    }

    /// Waits up to `grace` for the worker to exit by itself, then kills it.
    /// Returns how it ended.
    pub(crate) async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(status) = tokio::time::timeout(grace, self.child.wait()).await {
            return status.ok();
        }
        self.kill();
        self.child.wait().await.ok()
    }

    /// After the worker's stdout closed or it broke the protocol: reaps it
    /// and says how it ended, with the tail of its stderr.
    pub(crate) async fn post_mortem(&mut self) -> PostMortem {
        let status = self.stop(Duration::from_secs(1)).await;
        // Its last stderr lines may still be in the pipe.
        if let Some(task) = self.stderr.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        let how = match status {
            Some(s) => describe_exit(s),
            None => "ended".to_owned(),
        };
        PostMortem { how, tail: self.stderr_tail() }
    }

    /// The last lines the worker wrote to stderr.
    pub(crate) fn stderr_tail(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tail.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }
}

/// How a worker ended, and its last stderr lines. Displayed whole, for the
/// log; a client is told `how` alone: the tail may hold other calls' lines
/// and the server's paths.
#[derive(Debug)]
pub(crate) struct PostMortem {
    /// How it ended, in a few words.
    pub(crate) how: String,
    /// Its last stderr lines.
    pub(crate) tail: String,
}

impl std::fmt::Display for PostMortem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tail.is_empty() {
            write!(f, "{}; it wrote nothing to stderr", self.how)
        } else {
            write!(f, "{}; stderr ends:\n{}", self.how, self.tail)
        }
    }
}

/// Says how a process ended, in words.
fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(9)) => "was killed (SIGKILL; out of memory?)".to_owned(),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "ended".to_owned(),
    }
}

/// Copies a worker's stderr into the log, line by line, keeping the tail.
async fn copy_stderr<R: AsyncBufRead + Unpin>(mut reader: R, label: Label, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut line = Vec::new();
    loop {
        let cut = match read_line(&mut reader, &mut line, MAX_STDERR_LINE).await {
            Ok(Line::Eof) | Err(_) => return,
            Ok(Line::Complete) => false,
            Ok(Line::TooLong) => true,
        };
        let mut text = String::from_utf8_lossy(&line).trim_end().to_owned();
        line.clear();
        if cut {
            text.push_str(" […]");
        }
        tracing::info!(target: "aipod_runtime::worker", version = %label.version, worker = label.index, "{text}");
        let mut tail = tail.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text);
    }
}

/// How a bounded line read ended.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// `buf` holds a whole line, without its newline.
    Complete,
    /// The line passed the limit: `buf` holds its first `max` bytes and the
    /// rest of the line was skipped.
    TooLong,
    /// End of stream (a last line without newline counts as complete).
    Eof,
}

/// Reads one line into `buf` (appending to what an interrupted read left),
/// holding at most `max` bytes of it. Cancel-safe.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    let mut skipping = buf.len() > max;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() { Line::Eof } else { Line::Complete });
        }
        let (chunk, used, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..i], i + 1, true),
            None => (available, available.len(), false),
        };
        if !skipping {
            let room = (max + 1).saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            skipping = buf.len() > max;
        }
        reader.consume(used);
        if done {
            if skipping {
                buf.truncate(max);
                return Ok(Line::TooLong);
            }
            return Ok(Line::Complete);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<(Line, Vec<u8>)> {
        let mut reader = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            let line = read_line(&mut reader, &mut buf, max).await.expect("read");
            if line == Line::Eof {
                return out;
            }
            out.push((line, buf));
        }
    }

    #[tokio::test]
    async fn reads_lines_across_small_buffers() {
        let got = lines(b"one\ntwo three\n\nlast", 100).await;
        let texts: Vec<_> = got.iter().map(|(_, b)| String::from_utf8_lossy(b).into_owned()).collect();
        assert_eq!(texts, ["one", "two three", "", "last"]);
        assert!(got.iter().all(|(l, _)| *l == Line::Complete));
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_the_next_line_is_intact() {
        let got = lines(b"0123456789abcdef\nok\n", 5).await;
        assert_eq!(got[0], (Line::TooLong, b"01234".to_vec()));
        assert_eq!(got[1], (Line::Complete, b"ok".to_vec()));
    }
}
