"""The Python client against the real aipod-runtime binary (and, for the
retry rules, a scripted gRPC server that refuses on command).

Needs the built package (.ci/test builds the wheel and installs it) and
AIPOD_RUNTIME_BIN (the binary; .ci/test sets it).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import zstandard

import aipod
from aipod import AsyncClient, CallError, Client, Progress, Result, RetryPolicy
from aipod import _call
from aipod._proto import ai_pb2
from runtime_process import RuntimeProcess

ROOT = Path(__file__).resolve().parents[3]
FAST_RETRY = RetryPolicy(attempts=4, initial_backoff=0.05, max_backoff=0.2)


class Runtime(RuntimeProcess):
    """The runtime binary on a free port with 100 ms heartbeats."""

    def __init__(self, *args: str, metrics: bool = False) -> None:
        super().__init__("--heartbeat", "100ms", *args, metrics=metrics)

@pytest.fixture(scope="module")
def runtime():
    rt = Runtime()
    yield rt
    rt.stop()


@pytest.fixture(scope="module")
def mixed_256(tmp_path_factory) -> Path:
    """256 MiB: random, text and zero stretches, as real payloads mix them."""
    path = tmp_path_factory.mktemp("payload") / "mixed.bin"
    text = b"".join(b"ts=%d level=info msg=request served path=/v1/predict\n" % i for i in range(20000))
    with open(path, "wb") as f:
        for i in range(256):
            kind = i % 3
            f.write(os.urandom(1 << 20) if kind == 0 else (text[: 1 << 20] if kind == 1 else bytes(1 << 20)))
    return path


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# -- round trips ----------------------------------------------------------------


def test_sync_round_trip_of_256_mib_through_echo_is_byte_identical(runtime, mixed_256, tmp_path):
    out = tmp_path / "out.bin"
    with Client(runtime.addr) as client:
        res = client.call("echo", {"tag": "sync"}, file=mixed_256, out=out, timeout=300)
    assert res.value == {"kwargs": {"tag": "sync"}, "size": mixed_256.stat().st_size}
    assert res.payload is None and res.payload_size == mixed_256.stat().st_size
    assert _sha(out) == _sha(mixed_256)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"], "no temporary file left behind"


def test_async_round_trip_of_256_mib_through_echo_is_byte_identical(runtime, mixed_256, tmp_path):
    out = tmp_path / "out.bin"

    async def main() -> Result:
        async with AsyncClient(f"http://{runtime.addr}") as client:
            return await client.call("echo", file=mixed_256, out=out, timeout=300)

    res = asyncio.run(main())
    assert res.payload_size == mixed_256.stat().st_size
    assert _sha(out) == _sha(mixed_256)


def test_sha256_matches_for_every_payload_form(runtime, tmp_path):
    blob = os.urandom(3 << 20) + b"tail" * 1000
    want = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    path = tmp_path / "blob"
    path.write_bytes(blob)
    pieces = [blob[i : i + 7777] for i in range(0, len(blob), 7777)]  # odd sizes, re-chunked
    with Client(runtime.addr) as client:
        assert client.call("sha256", file=path).value == want
        assert client.call("sha256", file=str(path), zstd_level=None).value == want
        assert client.call("sha256", data=blob).value == want
        assert client.call("sha256", data=memoryview(blob)).value == want
        assert client.call("sha256", data=io.BytesIO(blob)).value == want
        assert client.call("sha256", data=iter(pieces)).value == want
        assert client.call("sha256", data=[blob], zstd_level=9).value == want
        assert client.call("sha256").value == {"sha256": hashlib.sha256(b"").hexdigest(), "size": 0}


def test_a_result_payload_of_many_zstd_frames_is_decoded_whole(runtime):
    # 24 MiB echoed in zstd: the runtime sends one frame per chunk (≥ 24).
    blob = os.urandom(1 << 20) * 12 + bytes(12 << 20)
    with Client(runtime.addr) as client:
        res = client.call("echo", data=blob)
    assert res.payload_size == len(blob)
    assert res.payload is not None and hashlib.sha256(res.payload).digest() == hashlib.sha256(blob).digest()


def test_the_decoder_reads_across_frames_and_checks_the_size():
    frames = b"".join(zstandard.ZstdCompressor(level=1).compress(bytes([i]) * 100_000) for i in range(40))
    sink = _call.Sink(None)
    r = _call.Receiver(sink, None, time.monotonic(), 1)
    r.reply(ai_pb2.Reply(result=ai_pb2.Result(json=b'{"ok":1}', payload_size=4_000_000, encoding=ai_pb2.ENCODING_ZSTD)))
    for i in range(0, len(frames), 333):  # chunk boundaries inside frames
        r.reply(ai_pb2.Reply(data=frames[i : i + 333]))
    res = r.finish("id", 1)
    assert res.payload == b"".join(bytes([i]) * 100_000 for i in range(40))

    short = _call.Receiver(_call.Sink(None), None, time.monotonic(), 1)
    short.reply(ai_pb2.Reply(result=ai_pb2.Result(json=b"1", payload_size=10, encoding=ai_pb2.ENCODING_IDENTITY)))
    short.reply(ai_pb2.Reply(data=b"12345"))
    with pytest.raises(CallError) as err:
        short.finish("id", 1)
    assert err.value.code == "DATA_LOSS"
    long = _call.Receiver(_call.Sink(None), None, time.monotonic(), 1)
    long.reply(ai_pb2.Reply(result=ai_pb2.Result(json=b"1", payload_size=2, encoding=ai_pb2.ENCODING_IDENTITY)))
    with pytest.raises(CallError) as err:
        long.reply(ai_pb2.Reply(data=b"123"))
    assert err.value.code == "DATA_LOSS"


def test_a_short_result_payload_leaves_no_file(tmp_path):
    out = tmp_path / "result.bin"
    sink = _call.Sink(out)
    r = _call.Receiver(sink, None, time.monotonic(), 1)
    r.reply(ai_pb2.Reply(result=ai_pb2.Result(json=b"1", payload_size=10, encoding=ai_pb2.ENCODING_IDENTITY)))
    r.reply(ai_pb2.Reply(data=b"12345"))
    with pytest.raises(CallError):
        r.finish("id", 1)
    sink.discard()
    assert list(tmp_path.iterdir()) == [], "neither the result nor a partial file"


# -- progress ---------------------------------------------------------------------


def test_progress_rises_during_sleep(runtime):
    seen: list[Progress] = []
    with Client(runtime.addr) as client:
        res = client.call("sleep", {"seconds": 1.2}, progress=seen.append)
    assert res.value == {"slept": 1.2}
    running = [p.fraction for p in seen if p.phase == "RUNNING" and p.fraction is not None]
    assert len(running) >= 5, seen
    assert running == sorted(running) and running[-1] > running[0] + 0.5, running
    assert all(b.elapsed >= a.elapsed for a, b in zip(seen, seen[1:]))


def test_upload_progress_counts_sent_and_acknowledged_bytes(runtime):
    seen: list[Progress] = []
    blob = os.urandom(8 << 20)
    with Client(runtime.addr) as client:
        client.call("sha256", data=blob, progress=seen.append)
    sent = [p.sent_bytes for p in seen]
    assert sent == sorted(sent) and max(sent) == len(blob)
    assert all(p.received_bytes <= len(blob) for p in seen)


# -- errors -----------------------------------------------------------------------

CODES = [
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
]


@pytest.mark.parametrize("code", CODES)
def test_every_status_code_surfaces_as_call_error(runtime, code):
    with Client(runtime.addr, retry=FAST_RETRY) as client:
        with pytest.raises(CallError) as err:
            client.call("fail", {"code": code, "message": f"model says {code.lower()}"})
    e = err.value
    assert (e.code, e.message, e.phase) == (code, f"model says {code.lower()}", "RUNNING")
    assert e.attempts == 1, "the model ran: never retried"
    assert e.call_id and len(e.call_id) == 32


def test_unknown_function_and_version(runtime):
    with Client(runtime.addr) as client:
        with pytest.raises(CallError) as err:
            client.call("predict", data=b"x" * 100)
        assert err.value.code == "UNIMPLEMENTED" and err.value.phase is None
        with pytest.raises(CallError) as err:
            client.call("echo", version="v9")
        assert err.value.code == "NOT_FOUND"


def test_a_refused_streamed_call_reports_the_servers_status_every_time(runtime):
    # The payload waits for the header's acceptance: before, grpc.aio turned
    # about 1 refusal in 70 into INTERNAL ("Internal error from Core") when
    # frames were still going out.
    async def body():
        for _ in range(64):
            yield b"x" * 65536
            await asyncio.sleep(0)

    async def main() -> list[str]:
        async with AsyncClient(runtime.addr, retry=RetryPolicy(attempts=1)) as client:
            codes = []
            for _ in range(150):
                with pytest.raises(CallError) as err:
                    await client.call("predict", data=body())
                codes.append(err.value.code)
            return codes

    codes = asyncio.run(main())
    assert set(codes) == {"UNIMPLEMENTED"}, {c: codes.count(c) for c in set(codes)}


def test_describe_and_health(runtime):
    with Client(runtime.addr) as client:
        d = client.describe()
        assert d["versions"][0]["functions"] == ["chaos", "discard", "echo", "fail", "sha256", "sleep"]
        assert d["limits"]["max_message_bytes"] == 2 << 20 and d["heartbeat_interval_ms"] == 100
        assert client.health() == "SERVING" and client.health("") == "SERVING"
        with pytest.raises(CallError) as err:
            client.health("no.such.Service")
        assert err.value.code == "NOT_FOUND"


def test_deadline_cancels_the_call_and_frees_its_slot():
    rt = Runtime("--max-concurrent-calls", "1")
    try:
        with Client(rt.addr) as client:
            t0 = time.monotonic()
            with pytest.raises(CallError) as err:
                client.call("sleep", {"seconds": 30}, timeout=1.0)
            assert err.value.code == "DEADLINE_EXCEEDED"
            assert time.monotonic() - t0 < 5
            # The only slot is free again: the next call is never queued.
            seen: list[Progress] = []
            t0 = time.monotonic()
            client.call("sleep", {"seconds": 0}, progress=seen.append, timeout=10)
            assert time.monotonic() - t0 < 2 and "QUEUED" not in {p.phase for p in seen}, seen
    finally:
        rt.stop()


# -- retries, with a server that refuses on command ---------------------------------


class Scripted:
    """A gRPC server for /ai.AI/chaos that refuses the first `refusals`
    attempts with `code` (after reading the whole payload, so each attempt's
    bytes can be checked), then answers the sha256 of what it received.
    With `features`, it also answers describe, listing them (and counting
    describes) — but never has the one-message `call` method."""

    def __init__(self, refusals: int, code=grpc.StatusCode.UNAVAILABLE, retryable=True, features=None):
        self.refusals, self.code, self.retryable = refusals, code, retryable
        self.attempts: list[tuple[str, str, int]] = []  # (call id, sha256, bytes)
        self.describes = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {"chaos": grpc.stream_stream_rpc_method_handler(
            self._chaos, request_deserializer=ai_pb2.Frame.FromString, response_serializer=ai_pb2.Reply.SerializeToString
        )}
        if features is not None:
            def describe(request, context):
                self.describes += 1
                return ai_pb2.Description(features=features)

            handlers["describe"] = grpc.unary_unary_rpc_method_handler(
                describe, request_deserializer=ai_pb2.DescribeRequest.FromString,
                response_serializer=ai_pb2.Description.SerializeToString,
            )
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("ai.AI", handlers)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _chaos(self, frames, context):
        header = next(frames).header
        dec = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
        h, n = hashlib.sha256(), 0
        for f in frames:
            data = dec.decompress(f.data) if header.encoding == ai_pb2.ENCODING_ZSTD else f.data
            h.update(data)
            n += len(data)
        self.attempts.append((header.call_id, h.hexdigest(), n))
        if len(self.attempts) <= self.refusals:
            if self.retryable:
                context.set_trailing_metadata([("x-aipod-retryable", "true")])
            context.abort(self.code, f"refusal {len(self.attempts)}")
        yield ai_pb2.Reply(result=ai_pb2.Result(json=json.dumps({"sha256": h.hexdigest()}).encode()))

    def stop(self):
        self.server.stop(None)


def test_refused_calls_are_retried_with_the_whole_file(tmp_path):
    path = tmp_path / "p.bin"
    path.write_bytes(os.urandom(5 << 20))
    want = _sha(path)
    s = Scripted(refusals=2)
    try:
        with Client(f"127.0.0.1:{s.port}", retry=FAST_RETRY) as client:
            res = client.call("sha256", file=path)
        assert res.value == {"sha256": want} and res.attempts == 3
        assert [a[1:] for a in s.attempts] == [(want, 5 << 20)] * 3, "every attempt sent the whole payload"
        assert len({a[0] for a in s.attempts}) == 1, "one call id across attempts"
    finally:
        s.stop()


def test_retries_stop_at_the_limit_and_skip_unrereadable_payloads(tmp_path):
    s = Scripted(refusals=100, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    try:
        with Client(f"127.0.0.1:{s.port}", retry=FAST_RETRY) as client:
            with pytest.raises(CallError) as err:
                client.call("sha256", data=b"abc")
            assert (err.value.code, err.value.attempts, len(s.attempts)) == ("RESOURCE_EXHAUSTED", 4, 4)
            with pytest.raises(CallError) as err:
                client.call("sha256", data=iter([b"abc"]))  # cannot be read twice
            assert (err.value.attempts, len(s.attempts)) == (1, 5)
    finally:
        s.stop()
    s = Scripted(refusals=100, code=grpc.StatusCode.RESOURCE_EXHAUSTED, retryable=False)
    try:
        with Client(f"127.0.0.1:{s.port}", retry=FAST_RETRY) as client:
            with pytest.raises(CallError) as err:
                client.call("sha256", data=b"abc")
            assert err.value.attempts == 1, "RESOURCE_EXHAUSTED without x-aipod-retryable is final"
    finally:
        s.stop()


def _counter(metrics: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_small_calls_go_in_one_message_when_the_server_lists_it(tmp_path):
    rt = Runtime(metrics=True)
    try:
        payload = os.urandom(4096)
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(1 << 20))
        with Client(rt.target) as client:
            assert "call" in client.describe()["features"]
            for i in range(20):
                res = client.call("echo", {"i": i}, data=payload)
                assert (res.value["kwargs"], res.payload) == ({"i": i}, payload)
            assert client.call("sha256", file=big).value["sha256"] == _sha(big)  # streamed: chaos
            assert client.call("sha256", data=os.urandom(300 << 10)).value["size"] == 300 << 10  # too big for one

        async def many() -> None:
            async with AsyncClient(rt.target) as client:
                for i in range(20):
                    res = await client.call("echo", {"i": i}, data=payload, zstd_level=3)
                    assert (res.value["kwargs"], res.payload) == ({"i": i}, payload)

        asyncio.run(many())
        assert _counter(rt.metrics, "aipod_calls_one_message_total") == 40
        assert _counter(rt.metrics, 'aipod_calls_total{version="v1",func="sha256",code="OK"}') == 2
    finally:
        rt.stop()


def test_a_server_without_the_one_message_call_gets_chaos(tmp_path):
    # A server whose describe lists "call" but which has no such method (a
    # router's upstream mid-rollout): the call goes by chaos at once, and
    # so do the next ones — describe was asked once.
    s = Scripted(refusals=0, features=["call"])
    try:
        with Client(f"127.0.0.1:{s.port}", retry=FAST_RETRY) as client:
            for i in range(3):
                assert client.call("sha256", data=b"abc").value == {"sha256": hashlib.sha256(b"abc").hexdigest()}
        assert (len(s.attempts), s.describes) == (3, 1)

        async def once() -> None:
            async with AsyncClient(f"127.0.0.1:{s.port}", retry=FAST_RETRY) as client:
                assert (await client.call("sha256", data=b"abc")).attempts == 1

        asyncio.run(once())
        assert (len(s.attempts), s.describes) == (4, 2)
        # A payload that cannot go in one message asks nothing first.
        with Client(f"127.0.0.1:{s.port}", retry=FAST_RETRY) as client:
            client.call("sha256", data=iter([b"abc"]))
        assert (len(s.attempts), s.describes) == (5, 2)
    finally:
        s.stop()
    # A server with no describe at all: chaos.
    s = Scripted(refusals=0)
    try:
        with Client(f"127.0.0.1:{s.port}", retry=FAST_RETRY) as client:
            assert client.call("sha256", data=b"abc").attempts == 1
        assert len(s.attempts) == 1
    finally:
        s.stop()


def test_async_client_retries_too(tmp_path):
    s = Scripted(refusals=1)

    async def main() -> Result:
        async with AsyncClient(f"127.0.0.1:{s.port}", retry=FAST_RETRY) as client:
            return await client.call("sha256", data=b"x" * 3_000_000)

    try:
        res = asyncio.run(main())
        assert res.attempts == 2 and res.value == {"sha256": hashlib.sha256(b"x" * 3_000_000).hexdigest()}
    finally:
        s.stop()


# -- the asyncio client's own thread for a lone call (aipod._lane) ----------------------


def _lane_ends(within: float = 5.0) -> bool:
    """Whether the lane threads have ended within `within` seconds."""
    deadline = time.monotonic() + within
    while any(t.name == "aipod-lane" for t in threading.enumerate()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_async_small_calls_run_on_the_clients_threads_with_callbacks_on_the_loop(runtime):
    async def main() -> tuple[AsyncClient, set[int], list[str]]:
        seen: set[int] = set()
        phases: list[str] = []

        def progress(p: Progress) -> None:
            seen.add(threading.get_ident())
            phases.append(p.phase)

        async with AsyncClient(runtime.addr) as client:
            for i in range(20):
                res = await client.call(
                    "echo", {"i": i}, data=bytes([i]) * 1000, on_result=lambda v, n: seen.add(threading.get_ident())
                )
                assert (res.value["kwargs"], res.payload) == ({"i": i}, bytes([i]) * 1000)
            # Not answered at once: heartbeats, handed to the loop as they come.
            assert (await client.call("sleep", {"seconds": 0.5}, data=b"x", progress=progress)).value == {"slept": 0.5}
        return client, seen, phases

    client, seen, phases = asyncio.run(main())
    assert client._lane.calls == 21, "every small call went on the lane"
    assert seen == {threading.get_ident()}, "callbacks ran on the event loop's thread"
    assert phases.count("RUNNING") >= 3, phases
    assert _lane_ends(), "closing ended the lane"


def test_concurrent_calls_and_calls_beside_a_long_one_go_by_grpc_aio(runtime):
    async def main() -> tuple[int, int, int]:
        async with AsyncClient(runtime.addr) as client:
            results = await asyncio.gather(*(client.call("echo", {"i": i}, data=b"y") for i in range(20)))
            assert [r.value["kwargs"]["i"] for r in results] == list(range(20))
            gathered = client._lane.calls  # at most the first, which started alone
            long = asyncio.create_task(client.call("sleep", {"seconds": 1.5}, data=b"x"))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            for i in range(10):
                assert (await client.call("echo", {"i": i}, data=b"y")).value["kwargs"] == {"i": i}
            assert time.monotonic() - t0 < 1.0, "the small calls did not wait for the long one's thread"
            during = client._lane.calls
            assert (await long).value == {"slept": 1.5}
            await client.call("echo", data=b"z")  # alone again
            return gathered, during, client._lane.calls

    gathered, during, after = asyncio.run(main())
    assert gathered <= 1 and during == gathered + 1 and after == during + 1, (gathered, during, after)


def test_with_lone_thread_off_calls_still_go_in_one_message(tmp_path):
    rt = Runtime(metrics=True)

    async def main() -> AsyncClient:
        async with AsyncClient(rt.target, lone_thread=False) as client:
            for i in range(5):
                assert (await client.call("echo", {"i": i}, data=b"y")).value["kwargs"] == {"i": i}
        return client

    try:
        assert asyncio.run(main())._lane.calls == 0
        assert _counter(rt.metrics, "aipod_calls_one_message_total") == 5
    finally:
        rt.stop()


def test_the_lone_thread_speaks_tls_and_sends_the_token(tmp_path):
    # The thread's channel is a second connection: the same credentials
    # and metadata as the client's grpc.aio channel.
    cert, key, tokens = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "tokens"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    tokens.write_text("s3cret-token-of-the-test\n")
    rt = Runtime("--tls-cert", str(cert), "--tls-key", str(key), "--auth-token-file", str(tokens))

    async def main(token: str) -> tuple[list[Result], int]:
        async with AsyncClient(f"https://127.0.0.1:{rt.port}", ca=cert, token=token) as client:
            alone = [await client.call("echo", {"i": i}, data=b"t") for i in range(3)]
            together = await asyncio.gather(*(client.call("echo", {"i": i}, data=b"t") for i in range(3, 6)))
            return alone + list(together), client._lane.calls

    try:
        # The server refuses a call without the token: these went with it.
        results, on_lane = asyncio.run(main("s3cret-token-of-the-test"))
        assert [r.value["kwargs"]["i"] for r in results] == list(range(6)) and on_lane >= 3
    finally:
        rt.stop()


def _calls_in_flight(rt: Runtime) -> float:
    """The runtime's `aipod_calls_in_flight`, summed over its versions."""
    import urllib.request

    with urllib.request.urlopen(f"http://{rt.metrics}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("aipod_calls_in_flight"))


def test_cancelling_or_timing_out_a_call_on_a_lane_stops_the_model_and_frees_the_lane():
    rt = Runtime("--max-concurrent-calls", "1", metrics=True)

    async def main() -> None:
        async with AsyncClient(rt.addr, retry=RetryPolicy(attempts=1)) as client:
            task = asyncio.create_task(client.call("sleep", {"seconds": 30}, data=b"x"))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The lane's thread sees the cancel and is free again.
            deadline = time.monotonic() + 5
            while client._lane._busy and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            with pytest.raises(CallError) as err:
                await client.call("sleep", {"seconds": 30}, data=b"x", timeout=1.0)
            assert err.value.code == "DEADLINE_EXCEEDED"
            # The client's deadline and the server's pass together: the
            # server stops the 30 s model and frees the slot within moments.
            deadline = time.monotonic() + 3
            while _calls_in_flight(rt) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert _calls_in_flight(rt) == 0, "the model stopped at the deadline"
            # The only slot is free (never QUEUED) and so is the only lane.
            seen: list[Progress] = []
            t0 = time.monotonic()
            await client.call("sleep", {"seconds": 0}, data=b"x", progress=seen.append, timeout=10)
            assert time.monotonic() - t0 < 2 and "QUEUED" not in {p.phase for p in seen}, seen
            assert client._lane.calls == 3

    try:
        asyncio.run(main())
    finally:
        rt.stop()


def test_closing_the_client_cancels_a_call_on_a_lane(runtime):
    async def main() -> None:
        client = AsyncClient(runtime.addr, retry=RetryPolicy(attempts=1))
        task = asyncio.create_task(client.call("sleep", {"seconds": 30}, data=b"x"))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await client.close()
        with pytest.raises(CallError) as err:
            await task
        assert err.value.code == "CANCELLED" and time.monotonic() - t0 < 5

    asyncio.run(main())
    assert _lane_ends()


class _Replies:
    """A blocking call's replies as a lane reads them, counting what was read."""

    def __init__(self, n: int, fail: BaseException | None = None, gap: float = 0.0) -> None:
        self.n, self.read, self.fail, self.cancelled, self.gap = n, 0, fail, False, gap

    def __iter__(self):
        for i in range(self.n):
            time.sleep(self.gap)  # replies that come apart, as a network's do
            self.read += 1
            yield ai_pb2.Reply(data=b"%d" % i)
        if self.fail is not None:
            raise self.fail

    def cancel(self) -> None:
        self.cancelled = True


@pytest.mark.parametrize("eager", [True, False], ids=["every-reply-wakes", "the-end-wakes"])
def test_a_lane_reads_at_most_a_few_replies_ahead_of_the_loop(eager):
    from aipod import _lane

    async def main() -> tuple[list[bytes], int]:
        replies = _Replies(200)
        call = _lane.LaneCall(asyncio.get_running_loop(), replies, eager)
        lane = threading.Thread(target=lambda: call.end(call.read()))
        lane.start()
        got, most_ahead = [], 0
        async for reply in call:
            await asyncio.sleep(0.002)  # a slow consumer: writing the result out
            most_ahead = max(most_ahead, replies.read - len(got))
            got.append(reply.data)
        lane.join(5)
        return got, most_ahead

    got, most_ahead = asyncio.run(main())
    assert got == [b"%d" % i for i in range(200)], "every reply, in order"
    assert most_ahead <= _lane._AHEAD + 1, most_ahead


class _CountingLoop:
    """An event loop, counting the wake-ups a lane asks of it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.asked = loop, 0

    def call_soon_threadsafe(self, f: Any) -> Any:
        self.asked += 1
        return self.loop.call_soon_threadsafe(f)

    def create_future(self) -> Any:
        return self.loop.create_future()


def test_an_unwatched_call_on_a_lane_wakes_the_loop_once():
    # No progress or result callback: the replies wait for the call's end
    # (or for _AHEAD of them), one wake-up of the event loop for a small call.
    from aipod import _lane

    async def wakes(n: int) -> int:
        loop = _CountingLoop(asyncio.get_running_loop())
        call = _lane.LaneCall(loop, _Replies(n, gap=0.005), eager=False)  # type: ignore[arg-type]
        lane = threading.Thread(target=lambda: call.end(call.read()))
        lane.start()
        assert [r.data async for r in call] == [b"%d" % i for i in range(n)]
        lane.join(5)
        return loop.asked

    assert asyncio.run(wakes(2)) == 1
    assert asyncio.run(wakes(3 * _lane._AHEAD)) <= 3 + 1, "a wake-up per _AHEAD replies, then the end"


def test_a_quick_call_is_taken_on_the_loops_thread_with_no_wake_up_and_a_slow_one_holds_it_briefly():
    from aipod import _lane

    async def run(replies: _Replies, bound: float) -> tuple[bool, float, list[bytes], int]:
        loop = _CountingLoop(asyncio.get_running_loop())
        call = _lane.LaneCall(loop, replies, eager=False)  # type: ignore[arg-type]
        lane = threading.Thread(target=lambda: call.end(call.read()))
        lane.start()
        started = time.monotonic()
        here = call.wait_here(bound)
        held = time.monotonic() - started
        got = [r.data async for r in call]
        lane.join(5)
        return here, held, got, loop.asked

    # Replies 20 ms apart: the loop's thread is waiting before the end.
    here, _, got, asked = asyncio.run(run(_Replies(2, gap=0.02), 5.0))
    assert here and got == [b"0", b"1"] and asked == 0, (here, got, asked)
    here, held, got, asked = asyncio.run(run(_Replies(1, gap=0.3), 0.01))
    assert not here and held < 0.2, (here, held)
    assert got == [b"0"] and asked == 1, "followed as usual once the wait is over"


def test_lone_quick_calls_are_answered_on_the_loops_thread_and_a_slow_one_never_holds_it(runtime, monkeypatch):
    from aipod import _lane

    # 50 ms instead of 2: "quick" must not depend on how fast this machine
    # (a debug runtime, a busy CI host) answers; the bound is checked as well.
    monkeypatch.setattr(_lane, "WAIT_HERE", 0.05)

    async def main() -> tuple[AsyncClient, float]:
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.001)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        async with AsyncClient(runtime.addr) as client:
            for i in range(20):
                assert (await client.call("echo", {"i": i}, data=b"q")).value["kwargs"] == {"i": i}
            ticking = asyncio.create_task(ticker())
            await asyncio.sleep(0.05)
            gaps.clear()
            # After quick calls: a slow one is waited for here WAIT_HERE at most.
            assert (await client.call("sleep", {"seconds": 0.3}, data=b"s")).value == {"slept": 0.3}
            ticking.cancel()
        return client, max(gaps)

    client, most = asyncio.run(main())
    assert client._lane.calls == 21
    assert client._lane.answered_here >= 15, f"quick calls answered on the loop's thread: {client._lane.answered_here}"
    assert most < 0.15, f"the event loop was held {most * 1000:.0f} ms (WAIT_HERE: 50)"


def test_a_lane_hands_on_the_calls_error_and_stops_reading_a_cancelled_call():
    from aipod import _lane

    async def failing() -> None:
        call = _lane.LaneCall(asyncio.get_running_loop(), _Replies(3, fail=RuntimeError("the call broke")))
        threading.Thread(target=lambda: call.end(call.read())).start()
        assert [r.data async for r in _until_error(call)] == [b"0", b"1", b"2"]

    async def _until_error(call: _lane.LaneCall):
        with pytest.raises(RuntimeError, match="the call broke"):
            async for r in call:
                yield r

    async def cancelled() -> _Replies:
        replies = _Replies(10_000)
        call = _lane.LaneCall(asyncio.get_running_loop(), replies)
        lane = threading.Thread(target=lambda: call.end(call.read()))
        lane.start()
        await call.__anext__()
        call.cancel()
        lane.join(5)
        assert not lane.is_alive(), "the lane stopped reading"
        return replies

    asyncio.run(failing())
    replies = asyncio.run(cancelled())
    assert replies.cancelled and replies.read <= _lane._AHEAD + 2, replies.read


# -- concurrency and memory ---------------------------------------------------------


def test_100_concurrent_async_calls_on_one_client(runtime):
    async def main() -> list[Result]:
        async with AsyncClient(runtime.addr) as client:
            calls = [client.call("echo", {"i": i}, data=os.urandom(1000 + i)) for i in range(90)]
            calls += [client.call("sleep", {"seconds": 0.3}) for _ in range(10)]
            return await asyncio.gather(*calls)

    t0 = time.monotonic()
    results = asyncio.run(main())
    assert [r.value["kwargs"]["i"] for r in results[:90]] == list(range(90))
    assert all(r.payload_size == 1000 + i for i, r in enumerate(results[:90]))
    assert all(r.value == {"slept": 0.3} for r in results[90:])
    assert len({r.call_id for r in results}) == 100
    assert time.monotonic() - t0 < 20


def _peak_rss_mib(script: str) -> float:
    """Runs `script` in a fresh interpreter; its peak RSS in MiB."""
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across exec.
    script += "\nprint(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1]) / 1024


def test_client_memory_stays_bounded_for_1_gib_each_way(runtime, tmp_path):
    path = tmp_path / "1g.bin"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(1024):
            f.write(block if i % 2 else bytes(1 << 20))
    connect = f"from aipod import Client\nc = Client({runtime.addr!r})\n"
    base = _peak_rss_mib(connect + "c.health()")
    up = _peak_rss_mib(connect + f"assert c.call('discard', file={str(path)!r}).value['size'] == 1 << 30")
    both = _peak_rss_mib(
        connect + f"assert c.call('echo', file={str(path)!r}, out={str(tmp_path / 'back.bin')!r}).payload_size == 1 << 30"
    )
    print(f"client peak RSS: {base:.1f} MiB idle, {up:.1f} MiB sending 1 GiB, {both:.1f} MiB for 1 GiB each way")
    assert up < 64, f"sending 1 GiB: client peak RSS {up:.1f} MiB"
    assert both < base + 48, f"1 GiB each way: client peak RSS {both:.1f} MiB (idle: {base:.1f} MiB)"
    assert _sha(tmp_path / "back.bin") == _sha(path)


# -- bad input ----------------------------------------------------------------------

NOWHERE = "127.0.0.1:9"  # nothing listens: anything sent would fail as UNAVAILABLE


def test_a_call_id_goes_in_metadata_only_for_a_retained_call():
    """Every call is named in its header; the `x-aipod-call-id` metadata a
    router with call affinity hashes goes only with a retained call (and its
    attaches), so no other call spells out a new header literal."""
    from aipod._retry import Plan

    def plan(**kw):
        return Plan.make(
            "echo", None, file=None, data=b"x", out=None, timeout=None, progress=None, on_result=None,
            idempotent=False, zstd_level=None, version=None, upstream="u", retry=RetryPolicy(), **kw,
        )

    plain, retained = plan(call_id=None), plan(call_id=None, retain=60)
    assert _call.CALL_ID_KEY not in dict(plain.metadata), plain.metadata
    assert dict(retained.metadata)[_call.CALL_ID_KEY] == retained.call_id
    for p in (plain, retained):
        header, _, _ = p.start_attempt()
        assert header.header.call_id == p.call_id and len(p.call_id) == 32
    assert plain.call_id != plan(call_id=None).call_id, "a new id for every call"
    attach = Plan.attach(
        "k" * 16, out=None, timeout=None, progress=None, on_result=None, upstream=None, retry=RetryPolicy(),
        auth=None, patience=1.0,
    )
    assert dict(attach.metadata)[_call.CALL_ID_KEY] == "k" * 16


def test_bad_input_fails_before_anything_is_sent(tmp_path):
    with Client(NOWHERE) as client:
        with pytest.raises(TypeError, match="JSON"):
            client.call("echo", {"when": object()})
        with pytest.raises(TypeError):
            client.call("echo", {"x": float("nan")})
        with pytest.raises(FileNotFoundError):
            client.call("echo", file=tmp_path / "missing.bin")
        with pytest.raises(ValueError, match="not both"):
            client.call("echo", file=__file__, data=b"x")
        with pytest.raises(TypeError, match="str"):
            client.call("echo", data="text")  # type: ignore[arg-type]
        with pytest.raises(FileNotFoundError, match="does not exist"):
            client.call("echo", out=tmp_path / "no" / "such" / "dir" / "out.bin")
    with pytest.raises(ValueError, match="need an https:// target"):
        Client("http://example.com:80", ca=__file__)
    with pytest.raises(ValueError, match="go together"):
        Client("https://example.com:443", cert=__file__)
    with pytest.raises(ValueError, match="cannot read the CA certificate"):
        Client("https://example.com:443", ca=tmp_path / "missing.pem")


def test_an_unreachable_target_is_unavailable_after_the_retries_naming_the_address():
    with Client(NOWHERE, retry=FAST_RETRY) as client:
        t0 = time.monotonic()
        with pytest.raises(CallError) as err:
            client.call("echo", data=b"x")
    e = err.value
    assert e.code == "UNAVAILABLE" and e.attempts == 4 and e.phase is None
    assert "127.0.0.1:9" in e.message and "could not reach" in e.message, e.message
    assert time.monotonic() - t0 < 10


def test_an_unresolvable_host_is_not_retried():
    with Client("no-such-host.invalid:50051", retry=RetryPolicy(attempts=5, initial_backoff=1)) as client:
        with pytest.raises(CallError) as err:
            client.call("echo", timeout=20)
    assert err.value.code == "UNAVAILABLE" and err.value.attempts == 1, err.value


def test_call_error_reads_as_one_sentence_and_pickles():
    import pickle

    e = CallError("FAILED_PRECONDITION", "train first", call_id="abc", phase="RUNNING", attempts=2)
    assert str(e) == "FAILED_PRECONDITION while RUNNING after 2 attempts (call id abc): train first"
    back = pickle.loads(pickle.dumps(e))
    assert (back.code, back.message, back.call_id, back.phase, back.attempts) == ("FAILED_PRECONDITION", "train first", "abc", "RUNNING", 2)


def test_the_package_exports_the_documented_names():
    assert set(aipod.__all__) == {"AsyncClient", "CallError", "Client", "Progress", "Result", "RetryPolicy"}
    with pytest.raises(AttributeError):
        aipod.NoSuchThing  # noqa: B018


def test_auto_compression_stores_small_payloads_and_adapts_large_ones(runtime):
    from aipod._call import FRAME_MAX, LEVELS, Adapt, Encoder, _stored_frame

    assert Encoder("auto", 1000).encoding == ai_pb2_encoding("IDENTITY"), "a small payload goes uncompressed"
    big = Encoder("auto", 64 << 20)
    assert big.encoding == ai_pb2_encoding("ZSTD") and big.adapt is not None
    block = os.urandom(300_000) + b"text " * 50_000
    stored = _stored_frame(block)
    whole = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(stored), read_across_frames=True).read()
    assert whole == block, "stored blocks are valid zstd"
    # A frame per FRAME_MAX bytes, each with its content size: the server's
    # decoder memory per upload is one frame's.
    assert stored.count(b"\x28\xb5\x2f\xfd") >= -(-len(block) // FRAME_MAX)
    first = zstandard.get_frame_parameters(stored)
    assert first.content_size == FRAME_MAX and first.window_size <= FRAME_MAX
    compressed = Encoder(3).encode(block)
    assert zstandard.get_frame_parameters(compressed).content_size == FRAME_MAX
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed), read_across_frames=True).read() == block
    with pytest.raises(ValueError):
        Encoder("fast", None)

    # A slow link (every block waits for the network in proportion to its
    # encoded size) drives the level up; an instant one, down to none.
    block = b"".join(f"{i} model call {i * i % 97} {i % 13}\n".encode() for i in range(40_000))
    for seconds_per_byte, expect_up in ((1 / 20e6, True), (0.0, False)):
        adapt, now = Adapt(), 0.0
        for _ in range(400):
            level = adapt.level()
            size = len(_stored_frame(block) if level is None else zstandard.ZstdCompressor(level=level).compress(block))
            now += size * seconds_per_byte + 1e-4 * (0 if level is None else max(level, 1))
            adapt.handed_on(len(block), now)
        assert (LEVELS.index(adapt.level()) > 2) == expect_up, (seconds_per_byte, adapt.level())

    # And a whole call with the default ("auto") round-trips a larger payload.
    data = os.urandom(1 << 20) * 20
    with Client(runtime.addr) as client:
        result = client.call("sha256", data=data)
    assert result.value == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def ai_pb2_encoding(name: str) -> int:
    from aipod._proto import ai_pb2

    return int(getattr(ai_pb2, f"ENCODING_{name}"))
