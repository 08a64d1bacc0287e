"""The runtime's Prometheus metrics, scraped from the real binary after a
scripted mix of calls (made with the aipod Python client) and parsed with
the Prometheus project's own Python parser (prometheus_client's OpenMetrics
parser, as the runtime serves OpenMetrics text). Run by .ci/test."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from aipod import CallError, Client, Progress, RetryPolicy
from runtime_process import BINARY, RuntimeProcess

ROOT = Path(__file__).resolve().parents[3]
WORKER = ROOT / "runtime" / "tests" / "workers" / "model.py"


class Runtime(RuntimeProcess):
    def __init__(self, *args: str) -> None:
        super().__init__("--heartbeat", "100ms", *args, metrics=True)

    def scrape(self) -> dict[tuple[str, tuple], float]:
        """Every sample, keyed by (name, sorted labels)."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text"), r.headers
            text = r.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name, **labels) -> float:
    """Sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def wait_until(check, what: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


def test_a_scripted_mix_of_calls_is_counted_exactly(tmp_path):
    rt = Runtime("--max-concurrent-calls", "1")
    try:
        client = Client(rt.addr, retry=RetryPolicy(attempts=1))
        sizes = [1000, 3 << 20, 12345]
        for n in sizes:
            data = os.urandom(n)
            assert client.call("sha256", data=data).value["sha256"] == hashlib.sha256(data).hexdigest()
        for _ in range(2):
            with pytest.raises(CallError):
                client.call("fail", {"code": "FAILED_PRECONDITION", "message": "no"})
        for name in ("predict", "x" * 1000):
            with pytest.raises(CallError):
                client.call(name, data=b"abc")
        # One call its client cancels mid-run.
        def cancel_when_running(p: Progress) -> None:
            if p.phase == "RUNNING":
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            client.call("sleep", {"seconds": 30}, progress=cancel_when_running)
        # One call that queues behind another (one slot).
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.call, "sleep", {"seconds": 0.6})
            time.sleep(0.2)
            queued = pool.submit(client.call, "echo", data=b"q" * 100)
            assert first.result(timeout=30).value == {"slept": 0.6}
            assert queued.result(timeout=30).payload == b"q" * 100
        client.close()

        wait_until(lambda: value(rt.scrape(), "aipod_calls_in_flight", version="v1") == 0, "no call in flight")
        m = rt.scrape()
        calls = lambda **l: value(m, "aipod_calls_total", version="v1", **l)  # noqa: E731
        assert calls(func="sha256", code="OK") == 3
        assert calls(func="fail", code="FAILED_PRECONDITION") == 2
        assert calls(func="unknown", code="UNIMPLEMENTED") == 2, "unknown functions share one label value"
        assert calls(func="sleep", code="CANCELLED") == 1
        assert calls(func="sleep", code="OK") == 1 and calls(func="echo", code="OK") == 1
        assert total(m, "aipod_calls_total") == 10
        assert value(m, "aipod_payload_bytes_total", version="v1", func="sha256", direction="in") == sum(sizes)
        assert value(m, "aipod_payload_bytes_total", version="v1", func="echo", direction="out") == 100
        for func, n in (("sha256", 3), ("fail", 2), ("unknown", 2), ("sleep", 2), ("echo", 1)):
            assert value(m, "aipod_call_duration_seconds_count", version="v1", func=func) == n, func
            assert value(m, "aipod_call_duration_seconds_bucket", version="v1", func=func, le="+Inf") == n
        # Every admitted call received; the queued echo waited.
        assert value(m, "aipod_call_phase_seconds_count", version="v1", phase="receiving") == 8
        assert value(m, "aipod_call_phase_seconds_count", version="v1", phase="queued") >= 7
        assert value(m, "aipod_call_phase_seconds_sum", version="v1", phase="queued") >= 0.2
        assert value(m, "aipod_calls_queued", version="v1") == 0
        assert value(m, "aipod_calls_in_flight", version="v1") == 0
        assert m.get(("aipod_zstd_memory_bytes", ())) == 0, "every decoder gave its memory back"
        assert value(m, "aipod_heartbeats_sent_total") >= 8
        assert value(m, "aipod_wire_bytes_total", direction="in") > 0
        assert value(m, "aipod_wire_bytes_total", direction="out") > 0
        assert value(m, "aipod_draining") == 0 and value(m, "aipod_spool_bytes") == 0
        assert total(m, "aipod_build_info") == 1
        assert not [k for k in m if k[0] == "aipod_workers"], "no worker series for a built-in model"
    finally:
        rt.stop()


def test_worker_gauges_and_restarts_follow_a_killed_worker():
    rt = Runtime("--model", f"exec:python3 {WORKER}", "--workers", "2")
    try:
        wait_until(lambda: value(rt.scrape(), "aipod_workers", version="v1", state="ready") == 2, "two ready workers")
        m = rt.scrape()
        assert value(m, "aipod_worker_restarts_total", version="v1") == 0
        with Client(rt.addr) as client, ThreadPoolExecutor(1) as pool:
            slow = pool.submit(client.call, "slow", {"seconds": 1.5})
            wait_until(lambda: value(rt.scrape(), "aipod_workers", version="v1", state="busy") == 1, "one busy")
            m = rt.scrape()
            assert value(m, "aipod_workers", version="v1", state="ready") == 1
            with pytest.raises(CallError):
                client.call("crash")
            m = rt.scrape()
            assert value(m, "aipod_workers", version="v1", state="starting") == 1, m
            assert value(m, "aipod_worker_restarts_total", version="v1") == 1
            assert slow.result(timeout=30).value["slept"] == 1.5
        wait_until(lambda: value(rt.scrape(), "aipod_workers", version="v1", state="ready") == 2, "restarted")
        assert value(rt.scrape(), "aipod_workers", version="v1", state="starting") == 0
    finally:
        rt.stop()


def test_only_metrics_and_healthz_are_served():
    rt = Runtime()
    try:
        with urllib.request.urlopen(f"http://{rt.metrics}/healthz", timeout=5) as r:
            assert r.status == 200
        for path in ("/", "/metrics/x", "/debug/pprof"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://{rt.metrics}{path}", timeout=5)
            assert err.value.code == 404, path
    finally:
        rt.stop()


def test_a_metrics_port_in_use_stops_the_runtime_at_start_naming_it():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [str(BINARY), "--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30,
        )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], proc.stderr
