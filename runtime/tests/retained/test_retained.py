"""Retained calls survive the network: a relay the test owns sits between
client and runtime and cuts every TCP connection on command; the aipod CLI
(the Rust client) reattaches or resumes by itself, `aipod attach` picks a
call up from another process, results expire and are evicted, other tokens
see nothing, and a restarted runtime holds nothing. The real binaries over
real sockets. Run by .ci/test."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from runtime_process import BINARY, RuntimeProcess

ROOT = Path(__file__).resolve().parents[3]
CLI = Path(os.environ.get("AIPOD_CLI_BIN", BINARY.parent / "aipod"))
WORKER = ROOT / "runtime" / "tests" / "workers" / "model.py"


class Runtime(RuntimeProcess):
    """The runtime binary on a free port with 200 ms heartbeats; its spool
    is kept when it stops, for a runtime started again on it."""

    def __init__(self, *args: str, spool: str | None = None) -> None:
        super().__init__("--heartbeat", "200ms", *args, spool=spool, keep_spool=True)

class Relay:
    """A loopback TCP relay that forwards to `port` and can cut every
    connection at once — by command, or once `cut_after` client bytes passed."""

    def __init__(self, port: int, cut_after: int | None = None) -> None:
        self.upstream = port
        self.cut_after = cut_after
        self.sent = 0  # client-to-server bytes forwarded
        self.cuts = 0
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.target = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            with self.lock:
                self.socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if upstream:
                    with self.lock:
                        self.sent += len(data)
                        due = self.cut_after is not None and self.sent >= self.cut_after
                    if due:
                        self.cut_after = None
                        self.cut()
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self, count: bool = True) -> None:
        """Resets every connection, as a restarting proxy would."""
        with self.lock:
            socks, self.socks = self.socks, []
            self.cuts += count
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.cut(count=False)


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def call_id(stderr: str) -> str:
    for line in stderr.splitlines():
        if "retained call " in line:
            return line.split("retained call ", 1)[1].split()[0]
    raise AssertionError(f"no call id announced: {stderr}")


@pytest.fixture
def worker_runtime():
    rt = Runtime("--model", "demo=builtin:demo", "--model", f"py=exec:python3 {WORKER}", "--default-version", "demo")
    deadline = time.monotonic() + 30
    while cli("health", rt.target).returncode != 0:
        assert time.monotonic() < deadline, "the worker never became ready"
        time.sleep(0.2)
    yield rt
    rt.stop()
    shutil.rmtree(rt.spool, ignore_errors=True)


def test_a_cut_connection_is_reattached_and_the_model_runs_once(worker_runtime, tmp_path):
    counter = tmp_path / "runs"
    relay = Relay(worker_runtime.port)
    threading.Timer(2.0, relay.cut).start()
    started = time.monotonic()
    done = cli("call", relay.target, "-f", "counted", "--version", "py", "--retain", "1m", "-q",
               "--kw", f"counter={counter}", "--kw", "seconds=6")
    took = time.monotonic() - started
    relay.close()
    assert done.returncode == 0, done.stderr
    assert relay.cuts >= 1
    assert json.loads(done.stdout)["runs"] == 1
    assert counter.read_text().count("\n") == 1, "the model ran exactly once"
    assert 5.5 < took < 30, took
    assert worker_runtime.logged("a client attached to a retained call") or \
        worker_runtime.logged("a client reattached to a retained call")


def test_without_retain_the_same_cut_cancels_the_model(worker_runtime, tmp_path):
    counter = tmp_path / "runs"
    relay = Relay(worker_runtime.port)
    threading.Timer(2.0, relay.cut).start()
    done = cli("call", relay.target, "-f", "counted", "--version", "py", "-q",
               "--kw", f"counter={counter}", "--kw", "seconds=6")
    relay.close()
    assert done.returncode != 0
    assert "lost" in done.stderr or "UNAVAILABLE" in done.stderr, done.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ended = [e for e in worker_runtime.logged("call finished") if e.get("func") == "counted"]
        if ended:
            break
        time.sleep(0.1)
    assert ended and ended[0].get("status") == "CANCELLED", ended


def test_a_one_gib_upload_cut_halfway_resumes_from_the_servers_offset(tmp_path):
    rt = Runtime()
    try:
        size = 1 << 30
        payload = tmp_path / "payload.bin"
        digest = hashlib.sha256()
        with payload.open("wb") as f:
            block = os.urandom(1 << 20)
            for i in range(size >> 20):
                # Incompressible, and no two mebibytes alike.
                chunk = hashlib.sha256(i.to_bytes(8, "little")).digest() + block[32:]
                digest.update(chunk)
                f.write(chunk)
        relay = Relay(rt.port, cut_after=size // 2)
        done = cli("call", relay.target, "-f", "sha256", "--file", str(payload), "--retain", "10m", "-q",
                   timeout=600)
        relay.close()
        assert done.returncode == 0, done.stderr
        assert relay.cuts == 1
        assert json.loads(done.stdout) == {"sha256": digest.hexdigest(), "size": size}
        resumed = rt.logged("resuming a retained call's upload")
        assert resumed and int(resumed[0]["offset"]) > 0, resumed
        print(f"resumed at {resumed[0]['offset']} of {size} bytes; {relay.sent} bytes through the relay")
        assert relay.sent < 1.6 * size, f"{relay.sent} bytes sent for a {size}-byte payload"
    finally:
        rt.stop()
        shutil.rmtree(rt.spool, ignore_errors=True)


def test_attach_from_another_process_after_the_first_was_killed(worker_runtime, tmp_path):
    payload = tmp_path / "in.bin"
    payload.write_bytes(os.urandom(3 << 20))
    first = subprocess.Popen(
        [str(CLI), "call", worker_runtime.target, "-f", "slow_echo", "--version", "py", "--retain", "1m", "-q",
         "--kw", "seconds=3", "--file", str(payload), "--out", str(tmp_path / "lost.bin")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert first.stderr is not None
    cid = call_id(first.stderr.readline())
    time.sleep(1.0)  # uploaded, and the model is running
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (tmp_path / "lost.bin").exists(), "killed mid-call, before any result"
    out = tmp_path / "picked-up.bin"
    done = cli("attach", cid, worker_runtime.target, "--out", str(out), "-q")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["size"] == 3 << 20
    assert out.read_bytes() == payload.read_bytes(), "the result payload, byte for byte"
    again = cli("attach", cid, worker_runtime.target, "-q")
    assert again.returncode == 0, "a kept result can be picked up again"


def test_attach_to_a_running_call_follows_it_to_the_end(worker_runtime, tmp_path):
    counter = tmp_path / "runs"
    cid = "a-running-call-0123456789abcdef"
    first = subprocess.Popen(
        [str(CLI), "call", worker_runtime.target, "-f", "counted", "--version", "py", "--retain", "1m", "-q",
         "--call-id", cid, "--kw", f"counter={counter}", "--kw", "seconds=3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = cli("attach", cid, worker_runtime.target, "-q")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["runs"] == 1
    # The same id through `call` attaches too: a retried retained call never runs twice.
    again = cli("call", worker_runtime.target, "-f", "counted", "--version", "py", "--retain", "1m", "-q",
                "--call-id", cid, "--kw", f"counter={counter}", "--kw", "seconds=3")
    assert again.returncode == 0, again.stderr
    assert counter.read_text().count("\n") == 1


def test_results_expire_and_the_byte_budget_evicts_the_oldest_first(tmp_path):
    rt = Runtime("--max-retain", "2s", "--retain-bytes", "5MiB")
    try:
        payload = tmp_path / "in.bin"
        payload.write_bytes(os.urandom(2 << 20))
        ids = []
        for i in range(3):
            cid = f"budget-call-{i}-0123456789abcdef"
            done = cli("call", rt.target, "-f", "echo", "--retain", "1h", "-q", "--call-id", cid,
                       "--file", str(payload))
            assert done.returncode == 0, done.stderr
            ids.append(cid)
        # 3 results of 2 MiB against a 5 MiB budget: the first is evicted.
        gone = cli("attach", ids[0], rt.target, "-q", "--timeout", "1s")
        assert gone.returncode != 0 and "NOT_FOUND" in gone.stderr, gone.stderr
        assert rt.logged("evicting a retained call: what is kept exceeds --retain-bytes or a count cap")
        kept = cli("attach", ids[2], rt.target, "-q")
        assert kept.returncode == 0, kept.stderr
        # The retain time asked (1h) was capped to --max-retain (2s).
        time.sleep(3.5)
        expired = cli("attach", ids[2], rt.target, "-q", "--timeout", "1s")
        assert expired.returncode != 0 and "NOT_FOUND" in expired.stderr, expired.stderr
        assert rt.logged("a retained call expired")
        left = [p for p in Path(rt.spool).iterdir() if p.name.startswith("call-")]
        assert left == [], f"spool entries of expired results: {left}"
    finally:
        rt.stop()
        shutil.rmtree(rt.spool, ignore_errors=True)


def test_another_token_cannot_attach(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token-0001\nbob-token-000002\n")
    rt = Runtime("--auth-token-file", str(tokens))
    try:
        cid = "alices-call-0123456789abcdef"
        done = cli("call", rt.target, "-f", "sleep", "--kw", "seconds=0.2", "--retain", "1m", "-q",
                   "--call-id", cid, env={"AIPOD_TOKEN": "alice-token-0001"})
        assert done.returncode == 0, done.stderr
        bob = cli("attach", cid, rt.target, "-q", "--timeout", "1s", env={"AIPOD_TOKEN": "bob-token-000002"})
        assert bob.returncode != 0
        assert "NOT_FOUND" in bob.stderr and "PERMISSION" not in bob.stderr, bob.stderr
        alice = cli("attach", cid, rt.target, "-q", env={"AIPOD_TOKEN": "alice-token-0001"})
        assert alice.returncode == 0, alice.stderr
    finally:
        rt.stop()
        shutil.rmtree(rt.spool, ignore_errors=True)


def test_a_restarted_runtime_holds_no_retained_calls_and_cleans_its_spool(tmp_path):
    spool = tempfile.mkdtemp(prefix="aipod-retain-restart-")
    rt = Runtime(spool=spool)
    cid = "before-restart-0123456789abcdef"
    done = cli("call", rt.target, "-f", "echo", "--retain", "1m", "-q", "--call-id", cid,
               "--file", str(Path(__file__)))
    assert done.returncode == 0, done.stderr
    assert [p for p in Path(spool).iterdir() if p.name.startswith("call-")], "the result is kept on the spool"
    rt.stop(signal.SIGKILL)
    rt = Runtime(spool=spool)
    try:
        assert not [p for p in Path(spool).iterdir() if p.name.startswith("call-")], "cleaned at start"
        gone = cli("attach", cid, rt.target, "-q", "--timeout", "1s")
        assert gone.returncode != 0 and "NOT_FOUND" in gone.stderr, gone.stderr
    finally:
        rt.stop()
        shutil.rmtree(spool, ignore_errors=True)


def test_bad_retain_and_resume_requests_are_refused_clearly(worker_runtime):
    short = cli("call", worker_runtime.target, "-f", "echo", "--retain", "1m", "--call-id", "short", "-q")
    assert short.returncode != 0 and "INVALID_ARGUMENT" in short.stderr and "16" in short.stderr, short.stderr
    never = cli("attach", "never-retained-0123456789abcdef", worker_runtime.target, "-q", "--timeout", "1s")
    assert never.returncode != 0 and "NOT_FOUND" in never.stderr, never.stderr
