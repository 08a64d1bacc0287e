"""The `aipod call` progress display, as a person sees it: the CLI runs with
its stderr on a pseudo-terminal of 80 columns, and every frame it draws is
checked (no line wider than the terminal, labelled phases, nothing the
server has not said)."""

import json
import os
import pty
import re
import select
import socket
import struct
import subprocess
import termios
import fcntl
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
CLI = Path(os.environ.get("AIPOD_CLI_BIN", TARGET_DIR / "debug" / "aipod"))
RUNTIME = Path(os.environ.get("AIPOD_RUNTIME_BIN", TARGET_DIR / "debug" / "aipod-runtime"))
COLUMNS = 80
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    assert RUNTIME.exists() and CLI.exists(), "build the binaries first (cargo build --workspace --bins)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spool = tmp_path_factory.mktemp("spool")
    proc = subprocess.Popen([str(RUNTIME), "--listen", f"127.0.0.1:{port}", "--spool-dir", str(spool),
                             "--heartbeat", "200ms"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "runtime did not listen"
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def run_on_tty(args):
    """Runs the CLI with stderr on an 80-column pty; returns (exit code,
    stdout, the frames drawn on stderr without escape codes)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "AIPOD_TARGET"}
    env["TERM"] = "xterm"
    proc = subprocess.Popen([str(CLI), *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    drawn = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            drawn += chunk
        elif proc.poll() is not None:
            break
    out = proc.stdout.read()
    proc.wait(timeout=60)
    os.close(master)
    frames = [ANSI.sub(b"", f).decode("utf-8", "replace") for f in re.split(rb"[\r\n]", drawn)]
    return proc.returncode, out, [f for f in frames if f.strip()]


def mixed(path, mib):
    text = b"".join(b"2026-11-27 INFO request id=%06d path=/predict status=200\n" % i for i in range(20000))[:1 << 20]
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(os.urandom(1 << 20) if i % 2 else text)


def test_upload_frames_fit_80_columns_are_labelled_and_claim_nothing_unsaid(target, tmp_path):
    payload = tmp_path / "in.bin"
    mixed(payload, 48)
    code, out, frames = run_on_tty(["call", target, "--func", "sha256", "--file", str(payload), "--zstd-level", "9"])
    assert code == 0, frames
    assert json.loads(out)["size"] == 48 << 20
    assert frames, "a terminal gets a progress display"
    too_wide = [f for f in frames if len(f) > COLUMNS]
    assert not too_wide, f"{len(too_wide)} frames wider than {COLUMNS} columns, e.g. {too_wide[0]!r}"
    assert any(f.lstrip().startswith("upload") for f in frames), frames
    assert not any("received 0 B" in f for f in frames), "never a count the server has not acknowledged"


def test_the_model_phase_and_the_download_are_shown_as_such(target, tmp_path):
    code, out, frames = run_on_tty(["call", target, "--func", "sleep", "--kw", "seconds=1.5"])
    assert code == 0, frames
    assert any("running" in f for f in frames), frames
    assert all(len(f) <= COLUMNS for f in frames)
    payload = tmp_path / "in.bin"
    mixed(payload, 16)
    code, out, frames = run_on_tty(["call", target, "--func", "echo", "--file", str(payload),
                                    "--out", str(tmp_path / "out.bin"), "--zstd-level", "9"])
    assert code == 0, frames
    assert (tmp_path / "out.bin").read_bytes() == payload.read_bytes()
    labelled = [f.split()[0] for f in frames if f.split() and f.split()[0] in ("upload", "download")]
    # Once the download is shown, the upload is not shown again.
    if "download" in labelled:
        assert "upload" not in labelled[labelled.index("download"):], labelled
    assert all(len(f) <= COLUMNS for f in frames)
