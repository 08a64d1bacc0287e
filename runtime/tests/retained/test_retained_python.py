"""Retained calls from Python: the aipod Python client's `retain=` (reattach
and resume by itself through a cutting relay) and `attach()`, and the
protocol's edges spoken with raw grpcio: resume of an unknown call, attach
to an incomplete upload, the retain time capped and reported, and a drain
that drops an incomplete upload with its offset. Run by .ci/test."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import threading
import time

import grpc
import pytest

from aipod import AsyncClient, CallError, Client
from aipod._proto import ai_pb2
from test_retained import Relay, Runtime


@pytest.fixture
def runtime():
    rt = Runtime("--max-retain", "1h")
    yield rt
    rt.stop()
    shutil.rmtree(rt.spool, ignore_errors=True)


def test_the_python_client_reattaches_a_retained_call_after_a_cut(runtime):
    relay = Relay(runtime.port)
    threading.Timer(1.5, relay.cut).start()
    with Client(relay.target) as client:
        result = client.call("sleep", {"seconds": 4}, retain=60, timeout=60)
    relay.close()
    assert relay.cuts == 1
    assert result.value == {"slept": 4}
    assert result.attempts >= 2
    finished = [e for e in runtime.logged("call finished") if e.get("func") == "sleep"]
    assert len(finished) == 1 and finished[0].get("status") == "OK", "the model ran once"


def test_the_python_client_resumes_an_upload_from_the_servers_offset(runtime):
    data = os.urandom(1 << 20) * 96  # 96 MiB, compressible only across MiBs
    relay = Relay(runtime.port, cut_after=24 << 20)
    with Client(relay.target) as client:
        result = client.call("sha256", data=data, retain=60, zstd_level=None, timeout=120)
    relay.close()
    assert result.value == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    resumed = runtime.logged("resuming a retained call's upload")
    assert resumed and int(resumed[0]["offset"]) > 0, resumed
    assert relay.sent < 1.5 * len(data)


def test_the_async_client_attaches_to_a_call_started_elsewhere(runtime):
    call_id = "async-attach-0123456789abcdef"
    with Client(runtime.target) as client:
        client.call("echo", data=b"x" * 1000, retain=60, call_id=call_id)

    async def attach() -> bytes:
        async with AsyncClient(runtime.target) as client:
            result = await client.attach(call_id)
            assert result.payload is not None
            return result.payload

    assert asyncio.run(attach()) == b"x" * 1000
    with Client(runtime.target) as client, pytest.raises(CallError) as err:
        client.attach("never-retained-0123456789abcdef")
    assert err.value.code == "NOT_FOUND"


def _stub(target: str):
    channel = grpc.insecure_channel(target.removeprefix("http://"))
    chaos = channel.stream_stream("/ai.AI/chaos", request_serializer=ai_pb2.Frame.SerializeToString,
                                  response_deserializer=ai_pb2.Reply.FromString)
    attach = channel.unary_stream("/ai.AI/attach", request_serializer=ai_pb2.AttachRequest.SerializeToString,
                                  response_deserializer=ai_pb2.Reply.FromString)
    return channel, chaos, attach


def test_protocol_edges_resume_attach_and_the_retain_cap(tmp_path):
    rt = Runtime("--max-retain", "30s")
    channel, chaos, attach = _stub(rt.target)
    stop = threading.Event()
    try:
        # resume_from on an id that was never retained: INVALID_ARGUMENT.
        header = ai_pb2.Header(func="echo", call_id="never-retained-0123456789abcdef", resume_from=5)
        with pytest.raises(grpc.RpcError) as err:
            list(chaos(iter([ai_pb2.Frame(header=header)])))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()

        # An upload that stops halfway: attach says FAILED_PRECONDITION with
        # the bytes held; the retain time asked (1 h) is capped to 30 s and
        # reported in the heartbeats.
        cid = "half-upload-0123456789abcdef"

        def frames():
            yield ai_pb2.Frame(header=ai_pb2.Header(func="echo", call_id=cid, retain_seconds=3600,
                                                    payload_size=2000))
            yield ai_pb2.Frame(data=b"a" * 1000)
            stop.wait(30)

        first = chaos(frames())
        beat = next(iter(first)).heartbeat
        assert beat.retain_seconds == 30
        deadline = time.monotonic() + 10
        while True:
            with pytest.raises(grpc.RpcError) as err:
                list(attach(ai_pb2.AttachRequest(call_id=cid)))
            if "1000 bytes" in (err.value.details() or "") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "1000 bytes" in err.value.details()
        # Cancelled, not half-closed: a clean end would be the whole payload.
        first.cancel()

        # Resume asking for more than the server holds: it answers with what
        # it holds, and the rest completes the payload.
        header = ai_pb2.Header(func="echo", call_id=cid, retain_seconds=3600, payload_size=2000, resume_from=1800)
        answered = threading.Event()
        offset: list[int] = []

        def resumed():
            yield ai_pb2.Frame(header=header)
            answered.wait(10)
            yield ai_pb2.Frame(data=b"b" * (2000 - offset[0]))

        replies = iter(chaos(resumed()))
        first_beat = next(replies).heartbeat
        offset.append(first_beat.received_bytes)
        answered.set()
        assert first_beat.phase == ai_pb2.PHASE_RECEIVING and offset[0] == 1000
        rest = list(replies)
        result = [r.result for r in rest if r.WhichOneof("kind") == "result"]
        assert result and result[0].payload_size == 2000
        payload = b"".join(r.data for r in rest if r.WhichOneof("kind") == "data")
        assert payload == b"a" * 1000 + b"b" * 1000
    finally:
        stop.set()
        channel.close()
        rt.stop()
        shutil.rmtree(rt.spool, ignore_errors=True)


def test_a_drain_drops_incomplete_uploads_with_their_offset_and_finishes_running_calls():
    rt = Runtime("--drain-timeout", "20s")
    channel, chaos, _ = _stub(rt.target)
    try:
        stop = threading.Event()

        def frames():
            yield ai_pb2.Frame(header=ai_pb2.Header(func="echo", call_id="draining-upload-0123456789", retain_seconds=60,
                                                    payload_size=4000))
            yield ai_pb2.Frame(data=b"z" * 1500)
            stop.wait(30)

        upload = chaos(frames())
        replies = iter(upload)
        next(replies)
        with Client(rt.target) as client:
            running: dict = {}
            t = threading.Thread(target=lambda: running.update(
                r=client.call("sleep", {"seconds": 2}, retain=60)))
            t.start()
            time.sleep(0.5)
            rt.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as err:
                list(replies)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "1500 bytes had arrived" in err.value.details(), err.value.details()
            t.join(30)
            assert running.get("r") is not None, "a retained call that runs finishes during the drain"
        stop.set()
        assert rt.proc.wait(timeout=30) == 0
    finally:
        channel.close()
        rt.stop()
        shutil.rmtree(rt.spool, ignore_errors=True)
