"""Builds the generated protocol module into the package.

`proto/ai.proto` (the repository's wire contract) is compiled with
grpcio-tools into `aipod/_proto/ai_pb2.py` and its type stub at build time.
An sdist carries a copy of the .proto (`proto/ai.proto` inside the sdist),
so wheels built from it generate the same code.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
CANDIDATES = [HERE / "proto" / "ai.proto", HERE.parent.parent / "proto" / "ai.proto"]


def _proto() -> Path:
    for path in CANDIDATES:
        if path.is_file():
            return path
    raise SystemExit(f"ai.proto not found (looked in {', '.join(str(p) for p in CANDIDATES)})")


def _generate(out: Path) -> Path:
    """Compiles ai.proto into `out`; returns the generated module."""
    from grpc_tools import protoc

    proto = _proto()
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{proto.parent}", f"--python_out={out}", f"--pyi_out={out}", proto.name]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {proto}")
    return out / "ai_pb2.py"


def _protobuf_requirement() -> str:
    """The protobuf runtime the generated code checks for at import: at least
    the version that generated it, within its major version."""
    with tempfile.TemporaryDirectory() as tmp:
        text = _generate(Path(tmp)).read_text()
    m = re.search(r"Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", text)
    if not m:
        return "protobuf>=5.27"
    major, minor, patch = (int(x) for x in m.groups())
    return f"protobuf>={major}.{minor}.{patch},<{major + 1}"


class BuildPyWithProto(build_py):
    """build_py that first generates aipod/_proto/ai_pb2.py(i)."""

    def run(self) -> None:
        _generate(Path(self.build_lib) / "aipod" / "_proto")
        super().run()


class SdistWithProto(sdist):
    """sdist that carries the .proto the wheel is generated from."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        target = Path(base_dir) / "proto" / "ai.proto"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_proto(), target)


setup(
    cmdclass={"build_py": BuildPyWithProto, "sdist": SdistWithProto},
    extras_require={
        "client": [
            "grpcio>=1.66,<2",
            "grpcio-health-checking>=1.66,<2",
            "zstandard>=0.23",
            _protobuf_requirement(),
        ],
    },
)
