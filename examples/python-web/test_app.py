"""The example web app end to end: real HTTP (uvicorn) in front of the real
aipod-runtime binary, driven by httpx. Run by .ci/test."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from runtime_process import BINARY

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} did not come up in {timeout} s")


@pytest.fixture(scope="module")
def web():
    assert BINARY.exists(), f"{BINARY} missing: build it first"
    grpc_port, http_port = _free_port(), _free_port()
    spool = tempfile.mkdtemp(prefix="aipod-web-spool-")
    runtime = subprocess.Popen(
        [str(BINARY), "--listen", f"127.0.0.1:{grpc_port}", "--spool-dir", spool, "--heartbeat", "100ms"],
        stderr=subprocess.DEVNULL,
    )
    env = dict(os.environ, AIPOD_TARGET=f"127.0.0.1:{grpc_port}")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--port", str(http_port), "--log-level", "warning"],
        cwd=HERE, env=env,
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        _wait(lambda: httpx.get(f"{base}/jobs/none").status_code == 404, "the web app", server)
        yield base
    finally:
        for p in (server, runtime):
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)


def _body(mib: int):
    for i in range(mib):
        yield (bytes([i % 251]) * 4096 + os.urandom(4096)) * 128  # 1 MiB, half compressible


def test_upload_streams_in_and_the_result_payload_streams_back(web):
    sent = hashlib.sha256()
    got = hashlib.sha256()

    def body():
        for chunk in _body(64):
            sent.update(chunk)
            yield chunk

    size = 0
    with httpx.stream("POST", f"{web}/v1/echo", params={"tag": "web", "n": "3"}, content=body(), timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert json.loads(r.headers["x-aipod-result"]) == {"kwargs": {"tag": "web", "n": 3}, "size": 64 << 20}
        assert r.headers["content-length"] == str(64 << 20)
        for chunk in r.iter_bytes():
            got.update(chunk)
            size += len(chunk)
    assert size == 64 << 20 and got.hexdigest() == sent.hexdigest()


def test_a_result_without_payload_is_json(web):
    data = os.urandom(3 << 20)
    r = httpx.post(f"{web}/v1/sha256", content=data, timeout=60)
    assert r.status_code == 200 and r.json() == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def test_model_errors_map_to_http_statuses(web):
    r = httpx.post(f"{web}/v1/predict", content=b"x")
    assert r.status_code == 404 and r.json()["code"] == "UNIMPLEMENTED", r.text
    r = httpx.post(f"{web}/v1/fail", params={"code": "FAILED_PRECONDITION", "message": "train first"})
    assert (r.status_code, r.json()["code"], r.json()["message"]) == (409, "FAILED_PRECONDITION", "train first")


def test_a_long_call_shows_its_progress_then_its_result(web):
    r = httpx.post(f"{web}/jobs/sleep", params={"seconds": "1.5"})
    assert r.status_code == 202
    job = r.json()["job"]
    fractions = []
    for _ in range(100):
        state = httpx.get(f"{web}/jobs/{job}").json()
        if state["state"] != "running":
            break
        p = state["progress"]
        if p and p["phase"] == "RUNNING" and p["fraction"] is not None:
            fractions.append(p["fraction"])
        time.sleep(0.1)
    assert state == {"state": "done", "progress": state["progress"], "result": {"slept": 1.5}}, state
    assert len(fractions) >= 3 and fractions == sorted(fractions) and fractions[-1] > fractions[0], fractions
