"""Interop: independent gRPC peers against the real aipod-runtime binary.

A Python grpcio client, compiled here from proto/ai.proto, streams a
zstandard-compressed file and checks the sha256; grpcurl (a Go gRPC stack)
discovers the service by reflection and reads both health services.

Run through `.ci/test`, which builds the binary and installs these peers.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc
from runtime_process import RuntimeProcess

ROOT = Path(__file__).resolve().parents[3]


def _stubs():
    out = Path(tempfile.mkdtemp(prefix="aipod-stubs-"))
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}", "ai.proto"])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    import ai_pb2, ai_pb2_grpc  # noqa: E401

    return ai_pb2, ai_pb2_grpc


ai_pb2, ai_pb2_grpc = _stubs()


@pytest.fixture(scope="module")
def runtime():
    rt = RuntimeProcess("--heartbeat", "100ms")
    yield rt.addr
    assert rt.stop() == 0


def _frames(path, size):
    yield ai_pb2.Frame(
        header=ai_pb2.Header(func="sha256", kwargs_json=b"{}", payload_size=size, encoding=ai_pb2.ENCODING_ZSTD)
    )
    with open(path, "rb") as f:
        for chunk in zstandard.ZstdCompressor(level=3).read_to_iter(f, write_size=1 << 20):
            yield ai_pb2.Frame(data=chunk)


def test_python_grpcio_uploads_a_zstd_file_and_gets_its_sha256(runtime, tmp_path):
    path = tmp_path / "payload.bin"
    with open(path, "wb") as f:
        for i in range(24):  # 24 MiB: random and text blocks
            f.write(os.urandom(1 << 20) if i % 2 else (b"ts=%d level=info msg=ok\n" % i) * 43690)
    size = path.stat().st_size
    expected = hashlib.sha256(path.read_bytes()).hexdigest()

    with grpc.insecure_channel(runtime) as channel:
        stub = ai_pb2_grpc.AIStub(channel)
        beats, result = 0, None
        for reply in stub.chaos(_frames(path, size), metadata=[("x-func-name", "sha256"), ("x-upstream", "anything")]):
            kind = reply.WhichOneof("kind")
            if kind == "heartbeat":
                beats += 1
            elif kind == "result":
                result = json.loads(reply.result.json)
    assert result == {"sha256": expected, "size": size}
    assert beats >= 1, "the first heartbeat comes at once"


def test_python_sees_grpc_status_codes(runtime):
    with grpc.insecure_channel(runtime) as channel:
        stub = ai_pb2_grpc.AIStub(channel)
        header = ai_pb2.Frame(header=ai_pb2.Header(kwargs_json=b"{}"))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.chaos(iter([header]), metadata=[("x-func-name", "predict")]))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "predict" in err.value.details()

        description = stub.describe(ai_pb2.DescribeRequest())
        assert [v.version for v in description.versions] == ["v1"]
        assert "sha256" in description.versions[0].functions


def test_python_health_checks_liveness_and_readiness(runtime):
    with grpc.insecure_channel(runtime) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ai.AI"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def _grpcurl(*args):
    exe = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    done = subprocess.run([exe, "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_lists_the_service_by_reflection(runtime):
    services = _grpcurl(runtime, "list").split()
    assert "ai.AI" in services
    assert "grpc.health.v1.Health" in services
    methods = _grpcurl(runtime, "describe", "ai.AI")
    assert "rpc chaos ( stream .ai.Frame ) returns ( stream .ai.Reply )" in methods


def test_grpcurl_reads_both_health_services_and_describe(runtime):
    assert json.loads(_grpcurl(runtime, "grpc.health.v1.Health/Check"))["status"] == "SERVING"
    ready = _grpcurl("-d", '{"service": "ai.AI"}', runtime, "grpc.health.v1.Health/Check")
    assert json.loads(ready)["status"] == "SERVING"
    description = json.loads(_grpcurl(runtime, "ai.AI/describe"))
    assert description["versions"][0]["version"] == "v1"
    assert description["heartbeatIntervalMs"] == "100"
