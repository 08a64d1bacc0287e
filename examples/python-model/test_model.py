"""The example model behind the real runtime (exec: worker): bad kwargs are
the caller's INVALID_ARGUMENT before any work — never a worker crash, never
a string multiplied by the row count. Run by .ci/test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from aipod import CallError, Client, RetryPolicy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BINARY = Path(os.environ.get("AIPOD_RUNTIME_BIN", ROOT / "target" / "debug" / "aipod-runtime"))


@pytest.fixture(scope="module")
def runtime():
    spool = tempfile.mkdtemp(prefix="aipod-example-spool-")
    proc = subprocess.Popen(
        [str(BINARY), "--listen", "127.0.0.1:0", "--log-format", "json", "--spool-dir", spool,
         "--model", f"exec:{sys.executable} {HERE / 'model.py'}"],
        stderr=subprocess.PIPE, text=True,
    )
    addr = ""
    lines: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("message") == "aipod-runtime listening":
            addr = event["addr"]
            break
    assert addr, "".join(lines)
    threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True).start()
    deadline = time.monotonic() + 60
    while Client(addr).health("ai.AI") != "SERVING":  # the worker has loaded
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.1)
    yield addr
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    shutil.rmtree(spool, ignore_errors=True)


CSV = b"label,text\n" + b"".join(b"a,apples are red\nb,bananas are yellow\n" for _ in range(50))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"epochs": "3"}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"epochs": 0}, "epochs"),
        ({"alpha": "big"}, "alpha"),
        ({"alpha": 0}, "alpha"),
        ({"holdout": "x" * (256 << 10)}, "holdout"),
        ({"holdout": 0.95}, "holdout"),
        ({"seed": 1.5}, "seed"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_bad_kwargs_are_refused_before_any_work(runtime, kwargs, field):
    started = time.monotonic()
    with pytest.raises(CallError) as err:
        Client(runtime, retry=RetryPolicy(attempts=1)).call("train", kwargs, data=CSV, timeout=60)
    assert err.value.code == "INVALID_ARGUMENT", err.value
    assert field in err.value.message and len(err.value.message) < 300, err.value.message
    assert time.monotonic() - started < 10


def test_good_kwargs_train(runtime):
    r = Client(runtime).call("train", {"epochs": 2, "alpha": 0.5, "holdout": 0.2, "seed": 3}, data=CSV, timeout=60)
    assert r.value["labels"] == ["a", "b"]
