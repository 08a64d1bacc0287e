"""The example model behind the real runtime (exec: worker): bad kwargs are
the caller's INVALID_ARGUMENT before any work — never a worker crash, never
a string multiplied by the row count. Run by .ci/test."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from aipod import CallError, Client, RetryPolicy
from runtime_process import RuntimeProcess

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def runtime():
    rt = RuntimeProcess("--model", f"exec:{sys.executable} {HERE / 'model.py'}")
    deadline = time.monotonic() + 60
    while Client(rt.addr).health("ai.AI") != "SERVING":  # the worker has loaded
        assert time.monotonic() < deadline, rt.text()
        time.sleep(0.1)
    yield rt.addr
    rt.stop()


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
