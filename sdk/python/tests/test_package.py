"""The distribution: an sdist and a wheel built from the source tree, the
protocol module generated into the wheel, and a fresh venv that installs
the wheel with and without the client extra."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

SDK = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and wheel .ci/test built (AIPOD_PYTHON_DIST), else built here."""
    given = os.environ.get("AIPOD_PYTHON_DIST")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "-q", "--no-isolation", "--outdir", str(out), str(SDK)], check=True)
    return out


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {dist}, found {found}"
    return found[0]


def test_the_wheel_carries_the_generated_protocol_and_type_information(dist):
    names = set(zipfile.ZipFile(_one(dist, "aipod-*.whl")).namelist())
    for name in ("aipod/_proto/ai_pb2.py", "aipod/_proto/ai_pb2.pyi", "aipod/py.typed", "aipod/worker.py",
                 "aipod/client.py", "aipod/aio.py"):
        assert name in names, f"{name} missing from the wheel: {sorted(names)}"


def test_the_sdist_carries_the_proto_not_generated_code(dist):
    names = tarfile.open(_one(dist, "aipod-*.tar.gz")).getnames()
    assert any(n.endswith("/proto/ai.proto") for n in names), names
    assert not any("ai_pb2" in n for n in names), "generated code is built, never shipped as source"
    proto = next(n for n in names if n.endswith("/proto/ai.proto"))
    shipped = tarfile.open(_one(dist, "aipod-*.tar.gz")).extractfile(proto).read()
    assert shipped == (SDK.parents[1] / "proto" / "ai.proto").read_bytes()


def test_a_fresh_venv_imports_the_worker_alone_and_the_client_with_its_extra(dist, tmp_path):
    wheel = _one(dist, "aipod-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(wheel)], check=True)
    worker = subprocess.run([py, "-c", "import aipod.worker, sys; print('grpc' in sys.modules)"],
                            capture_output=True, text=True)
    assert worker.returncode == 0 and worker.stdout.strip() == "False", worker.stderr
    client = subprocess.run([py, "-c", "from aipod import Client"], capture_output=True, text=True)
    assert client.returncode != 0 and "pip install 'aipod[client]'" in client.stderr, client.stderr

    subprocess.run([*pip, f"{wheel}[client]"], check=True)
    both = subprocess.run(
        [py, "-c", "from aipod import AsyncClient, CallError, Client, Progress, Result; import aipod.worker; "
                   "Client('127.0.0.1:9').close(); print('ok')"],
        capture_output=True, text=True,
    )
    assert both.returncode == 0 and both.stdout.strip() == "ok", both.stderr
