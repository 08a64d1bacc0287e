"""Call traces, exported by the real runtime binary (and the aipod CLI) over
OTLP/gRPC to a real OTLP TraceService server started by the test (grpcio
with the OpenTelemetry project's generated service, `opentelemetry-proto`).
Run by .ci/test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from runtime_process import RuntimeProcess

ROOT = Path(__file__).resolve().parents[3]
CLI = Path(os.environ.get("AIPOD_CLI_BIN", ROOT / "target" / "debug" / "aipod"))
WORKER = ROOT / "runtime" / "tests" / "workers" / "model.py"

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
SPAN_KIND_SERVER, SPAN_KIND_CLIENT = 2, 3
PHASES = ["aipod.receive", "aipod.queue", "aipod.run", "aipod.send"]


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.changed = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):  # noqa: N802 (the generated name)
        with self.changed:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for s in scope_spans.spans:
                        self.spans.append({
                            "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(), "name": s.name, "kind": s.kind,
                            "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in s.attributes},
                            "status": s.status.code, "resource": resource,
                        })
            self.changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate, timeout: float = 15.0) -> list[dict]:
        """Waits until `predicate(spans)` holds; returns the spans."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self.spans):
                left = deadline - time.monotonic()
                assert left > 0, f"spans never arrived; got {json.dumps(self.spans, indent=1)}"
                self.changed.wait(left)
            return list(self.spans)

    def stop(self) -> None:
        self.server.stop(0)


class Runtime(RuntimeProcess):
    def __init__(self, env: dict[str, str], *args: str) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        super().__init__(*args, env=clean | env, metrics=True)

    def call(self, func: str, *args: str, env: dict[str, str] | None = None) -> dict:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "TRACEPARENT"}
        done = subprocess.run([str(CLI), "call", self.addr, "-f", func, "-q", *args],
                              capture_output=True, text=True, timeout=60, env=clean | (env or {}))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def scrape(self, name: str) -> float:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise AssertionError(f"{name} not exported")



@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.stop()


def _models() -> list[str]:
    return ["--model", "demo=builtin:demo", "--model", f"py=exec:python3 {WORKER}"]


def test_a_call_continues_the_callers_trace_with_a_span_per_phase(collector, tmp_path):
    rt = Runtime({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
                  "OTEL_SERVICE_NAME": "aipod-under-test"}, *_models())
    try:
        payload = tmp_path / "in.bin"
        payload.write_bytes(os.urandom(300_000))
        result = rt.call("sha256", "--file", str(payload), "--version", "demo", env={"TRACEPARENT": TRACEPARENT})
        traced = rt.call("traced", "--version", "py", env={"TRACEPARENT": TRACEPARENT})
        failed = subprocess.run([str(CLI), "call", rt.addr, "-f", "fail", "-q", "--version", "demo",
                                 "--kw", "code=INTERNAL", "--attempts", "1"],
                                capture_output=True, text=True, timeout=60,
                                env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
                                | {"TRACEPARENT": TRACEPARENT})
        assert failed.returncode != 0

        def calls(spans):
            return [s for s in spans if s["name"] == "ai.AI/chaos" and s["kind"] == SPAN_KIND_SERVER]

        spans = collector.wait_for(lambda spans: len(calls(spans)) >= 3 and sum(
            s["name"].startswith("aipod.") for s in spans) >= 9)
        by_func = {c["attributes"]["aipod.func"]: c for c in calls(spans)}
        call = by_func["sha256"]
        assert call["trace_id"] == CALLER_TRACE and call["parent"] == CALLER_SPAN
        assert call["resource"]["service.name"] == "aipod-under-test"
        attrs = call["attributes"]
        assert attrs["rpc.system.name"] == "grpc" and attrs["rpc.method"] == "ai.AI/chaos"
        assert attrs["rpc.response.status_code"] == "OK" and "error.type" not in attrs
        assert attrs["aipod.version"] == "demo" and attrs["aipod.call_id"]
        assert attrs["aipod.bytes_in"] == 300_000 and attrs["aipod.bytes_out"] == 0
        assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] == int(rt.addr.rsplit(":", 1)[1])
        assert result["size"] == 300_000

        children = sorted((s for s in spans if s["parent"] == call["span_id"]), key=lambda s: s["start"])
        assert [c["name"] for c in children] == PHASES, children
        assert all(c["trace_id"] == CALLER_TRACE for c in children)
        assert children[0]["start"] >= call["start"] and children[-1]["end"] <= call["end"]
        for before, after in zip(children, children[1:]):
            assert before["end"] <= after["start"], (before, after)

        # The exec worker was handed the run span's context.
        py = by_func["traced"]
        run = next(s for s in spans if s["parent"] == py["span_id"] and s["name"] == "aipod.run")
        assert traced["traceparent"] == f"00-{CALLER_TRACE}-{run['span_id']}-01"

        bad = by_func["fail"]
        assert bad["attributes"]["rpc.response.status_code"] == "INTERNAL"
        assert bad["attributes"]["error.type"] == "INTERNAL" and bad["status"] == 2  # STATUS_CODE_ERROR

        # The call's log line names its trace.
        finished = [e for e in rt.log if e.get("message") == "call finished" and e.get("func") == "sha256"]
        assert finished and finished[0].get("trace_id") == CALLER_TRACE, finished
    finally:
        assert rt.stop() == 0


def test_the_cli_exports_its_client_span_as_the_servers_parent(collector):
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}"}
    rt = Runtime(endpoint)
    try:
        rt.call("echo", env=endpoint | {"TRACEPARENT": TRACEPARENT})
        spans = collector.wait_for(lambda spans: any(s["kind"] == SPAN_KIND_CLIENT for s in spans)
                                   and any(s["kind"] == SPAN_KIND_SERVER for s in spans))
        client = next(s for s in spans if s["kind"] == SPAN_KIND_CLIENT)
        server = next(s for s in spans if s["kind"] == SPAN_KIND_SERVER)
        assert client["trace_id"] == server["trace_id"] == CALLER_TRACE
        assert client["parent"] == CALLER_SPAN and server["parent"] == client["span_id"]
        assert client["resource"]["service.name"] == "aipod"
        assert client["attributes"]["rpc.response.status_code"] == "OK"
        assert client["attributes"]["aipod.call_id"] == server["attributes"]["aipod.call_id"]
        assert client["attributes"]["server.address"] == "127.0.0.1"
    finally:
        rt.stop()


def test_without_an_endpoint_nothing_connects_and_workers_get_the_callers_context():
    # A port that would show any connection attempt.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(2.0)
    port = listener.getsockname()[1]
    # Only the endpoint is missing: service name and sampler are set.
    rt = Runtime({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on",
                  "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "--model", f"exec:python3 {WORKER}")
    try:
        out = rt.call("traced", env={"TRACEPARENT": TRACEPARENT})
        assert out["traceparent"] == TRACEPARENT, "passed through unchanged when the runtime does not trace"
        assert rt.call("traced")["traceparent"] is None
        with pytest.raises(socket.timeout):
            listener.accept()
        assert not [e for e in rt.log if "trace" in e.get("message", "")], rt.log
    finally:
        assert rt.stop() == 0
        listener.close()
    del port


def test_an_unreachable_collector_never_slows_calls_and_drops_are_counted():
    # A closed port: every export fails at once.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    rt = Runtime({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
    try:
        started = time.monotonic()
        for _ in range(3):
            rt.call("echo")
        took = time.monotonic() - started
        time.sleep(2.5)  # the first batch is exported (and fails) within about a second
        rt.call("echo")
        time.sleep(2.5)
        dropped = rt.scrape("aipod_trace_spans_dropped_total")
        # Each call is a server span and its phase spans.
        assert dropped >= 3 * 5, dropped
        warnings = [e for e in rt.log if str(e.get("message", "")).startswith("trace spans dropped")]
        assert len(warnings) == 1, f"dropped spans are reported at most once a minute: {warnings}"
        assert took < 15, f"three calls took {took:.1f}s"
    finally:
        assert rt.stop() == 0


def test_the_python_client_sends_the_current_opentelemetry_context():
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from aipod import AsyncClient, Client

    rt = Runtime({}, "--model", f"exec:python3 {WORKER}")
    try:
        with Client(rt.addr) as client:
            assert client.call("traced").value["traceparent"] is None, "no current span: nothing sent"
            caller = SpanContext(trace_id=int(CALLER_TRACE, 16), span_id=int(CALLER_SPAN, 16), is_remote=True,
                                 trace_flags=TraceFlags(TraceFlags.SAMPLED))
            token = context.attach(trace.set_span_in_context(NonRecordingSpan(caller)))
            try:
                assert client.call("traced").value["traceparent"] == TRACEPARENT

                async def via_asyncio():
                    async with AsyncClient(rt.addr) as aclient:
                        return (await aclient.call("traced")).value

                import asyncio
                assert asyncio.run(via_asyncio())["traceparent"] == TRACEPARENT
            finally:
                context.detach(token)
    finally:
        assert rt.stop() == 0
