"""What reaches the runtime that is not a well-behaved gRPC client: requests
with other content types (HTTP 415, as the gRPC spec asks) and connections
that hold no call (closed after --idle-timeout, HTTP/2 pings or not), while
a long call on a quiet connection is never cut. The real binary, raw
sockets, curl and the aipod Python client. Run by .ci/test."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from aipod import Client
from runtime_process import RuntimeProcess

ROOT = Path(__file__).resolve().parents[3]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
PING = bytes([0, 0, 8, 6, 0, 0, 0, 0, 0]) + b"12345678"


class Runtime(RuntimeProcess):
    def __init__(self, *args: str) -> None:
        super().__init__("--heartbeat", "200ms", *args)

def _closed_within(sock: socket.socket, seconds: float, ping_every: float | None = None) -> float | None:
    """Seconds until the server closed `sock` (None if it did not within
    `seconds`), reading everything it sends and optionally pinging."""
    start = time.monotonic()
    sock.settimeout(0.1)
    next_ping = start
    while time.monotonic() - start < seconds:
        if ping_every is not None and time.monotonic() >= next_ping:
            try:
                sock.sendall(PING)
            except OSError:
                return time.monotonic() - start
            next_ping += ping_every
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - start
    return None


@pytest.fixture(scope="module")
def runtime():
    rt = Runtime("--idle-timeout", "1s")
    yield rt
    rt.stop()


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "application/grpc-web"])
def test_requests_that_are_not_grpc_get_415(runtime, content_type):
    # Headers only: the runtime does not read the body of a request it
    # refuses, so a client still sending one may see its stream reset.
    assert shutil.which("curl"), "curl is installed by .ci/test"
    done = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_code}", "-X", "POST",
         "-H", f"content-type: {content_type}",
         f"http://{runtime.addr}/ai.AI/chaos"],
        capture_output=True, text=True, timeout=30,
    )
    body, _, status = done.stdout.rpartition("\n")
    assert status == "415", done.stdout + done.stderr
    assert "gRPC only" in body
    # gRPC itself still works.
    with Client(runtime.addr) as client:
        assert client.call("echo", data=b"x").payload == b"x"


@pytest.mark.parametrize("ping", [False, True], ids=["silent", "pinging"])
def test_a_connection_without_calls_is_closed_after_the_idle_timeout(runtime, ping):
    with socket.create_connection((runtime.host, runtime.port)) as sock:
        sock.sendall(PREFACE + SETTINGS)
        took = _closed_within(sock, 6.0, ping_every=0.3 if ping else None)
    assert took is not None, "the idle connection stayed open"
    assert 0.8 <= took <= 4.0, f"closed after {took:.1f}s with --idle-timeout 1s"


def test_a_long_call_on_a_quiet_connection_is_never_cut(runtime):
    with Client(runtime.addr) as client:
        t0 = time.monotonic()
        result = client.call("sleep", {"seconds": 3})
        assert result.value and time.monotonic() - t0 >= 3
        # The same client works after its connection went idle and closed.
        time.sleep(2)
        assert client.call("echo", data=b"again").payload == b"again"


def test_idle_timeout_zero_keeps_connections_open(runtime_process):
    rt = runtime_process("--heartbeat", "200ms", "--idle-timeout", "0")
    with socket.create_connection((rt.host, rt.port)) as sock:
        sock.sendall(PREFACE + SETTINGS)
        assert _closed_within(sock, 2.5) is None
