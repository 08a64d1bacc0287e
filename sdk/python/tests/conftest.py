"""The package under test: the installed wheel when there is one (.ci/test
builds and installs it; the client's protocol module exists only in a
built package), else the source tree, which is enough for the worker tests."""

import sys
from pathlib import Path

try:
    import aipod._proto.ai_pb2  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
