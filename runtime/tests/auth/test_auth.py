"""Token authentication against the real runtime binary (--auth-token-file),
driven by the aipod Python client, grpcurl (reflection) and the aipod CLI.
Run by .ci/test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from aipod import CallError, Client, RetryPolicy
from runtime_process import BINARY, RuntimeProcess

ROOT = Path(__file__).resolve().parents[3]
CLI = Path(os.environ.get("AIPOD_CLI_BIN", ROOT / "target" / "debug" / "aipod"))
ALL = "tok-all-0123456789abcdef"
LIMITED = "tok-lim-0123456789abcdef"
ROTATED = "tok-new-0123456789abcdef"
ONCE = RetryPolicy(attempts=1)


class Runtime(RuntimeProcess):
    def __init__(self, tokens: Path) -> None:
        super().__init__("--auth-token-file", str(tokens), metrics=True)

    def wire_in(self) -> float:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith('aipod_wire_bytes_total{direction="in"}'):
                    return float(line.split()[-1])
        return 0.0

    def stop(self) -> str:  # type: ignore[override]
        """Stops the runtime and returns its whole log."""
        super().stop()
        return self.text()


@pytest.fixture()
def tokens(tmp_path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# the team's tokens\n{ALL}\n{LIMITED}   sha256, echo   # the web app\n")
    return path


def code(fn) -> str:
    with pytest.raises(CallError) as err:
        fn()
    return err.value.code


def test_calls_and_describe_need_a_token_health_does_not(tokens):
    rt = Runtime(tokens)
    try:
        anonymous = Client(rt.addr, retry=ONCE, token="")
        wrong = Client(rt.addr, retry=ONCE, token="tok-bad-0123456789abcdef")
        assert code(lambda: anonymous.call("sha256", data=b"x")) == "UNAUTHENTICATED"
        # No function-name oracle: an unknown function is not revealed either.
        assert code(lambda: anonymous.call("no-such-function")) == "UNAUTHENTICATED"
        assert code(lambda: wrong.call("sha256", data=b"x")) == "UNAUTHENTICATED"
        assert code(anonymous.describe) == "UNAUTHENTICATED"
        assert anonymous.health() == "SERVING" and anonymous.health("") == "SERVING"
        # Refused before any payload byte is read.
        assert code(lambda: anonymous.call("sha256", data=os.urandom(8 << 20))) == "UNAUTHENTICATED"
        assert rt.wire_in() == 0

        full = Client(rt.addr, retry=ONCE, token=ALL)
        assert full.call("sha256", data=b"abc").value["size"] == 3
        assert "sleep" in full.describe()["versions"][0]["functions"]
        assert full.call("sleep", {"seconds": 0}).value == {"slept": 0}

        limited = Client(rt.addr, retry=ONCE, token=LIMITED)
        assert limited.call("echo", data=b"hi").payload == b"hi"
        assert code(lambda: limited.call("sleep", {"seconds": 0})) == "PERMISSION_DENIED"
        # Whether a function exists is not revealed to a token that may not call it.
        assert code(lambda: limited.call("no-such-function")) == "PERMISSION_DENIED"
        # describe lists only what the token may call.
        assert sorted(limited.describe()["versions"][0]["functions"]) == ["echo", "sha256"]
    finally:
        log = rt.stop()
    for secret in (ALL, LIMITED):
        assert secret not in log, "a token appeared in the runtime's log"


def test_a_rotated_token_file_takes_effect_without_a_restart(tokens):
    rt = Runtime(tokens)
    try:
        assert Client(rt.addr, retry=ONCE, token=ALL).call("sha256", data=b"x").value["size"] == 1
        tokens.write_text(f"{ROTATED}\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                Client(rt.addr, retry=ONCE, token=ROTATED).call("sha256", data=b"x")
                break
            except CallError:
                time.sleep(0.2)
        assert Client(rt.addr, retry=ONCE, token=ROTATED).call("sha256", data=b"x").value["size"] == 1
        assert code(lambda: Client(rt.addr, retry=ONCE, token=ALL).call("sha256", data=b"x")) == "UNAUTHENTICATED"
        # A rotation with a malformed line: that line is skipped, the others
        # take effect, and the token no longer listed is revoked.
        tokens.write_text(f"short\n{ALL}\n")
        wait_refused(rt, ROTATED)
        assert Client(rt.addr, retry=ONCE, token=ALL).call("sha256", data=b"x").value["size"] == 1
    finally:
        log = rt.stop()
    assert "--auth-token-file line 1 is malformed and skipped" in log
    assert ROTATED not in log and ALL not in log


def wait_refused(rt: "Runtime", token: str, within: float = 10) -> float:
    """Waits until `token` is refused; returns how long that took."""
    started = time.monotonic()
    while True:
        try:
            Client(rt.addr, retry=ONCE, token=token).call("sha256", data=b"x")
        except CallError as e:
            assert e.code == "UNAUTHENTICATED", e
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"{token[:8]}… still accepted after {within}s"
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_emptying_or_deleting_the_token_file_revokes_every_token(tokens, how):
    rt = Runtime(tokens)
    try:
        assert Client(rt.addr, retry=ONCE, token=ALL).call("sha256", data=b"x").value["size"] == 1
        if how == "emptied":
            tokens.write_text("")
        else:
            tokens.unlink()
        took = wait_refused(rt, ALL)
        assert code(lambda: Client(rt.addr, retry=ONCE, token=LIMITED).call("echo")) == "UNAUTHENTICATED"
        assert Client(rt.addr).health("") == "SERVING", "the server itself goes on"
        # Tokens come back with the file.
        tokens.write_text(f"{ROTATED}\n")
        deadline = time.monotonic() + 10
        while True:
            try:
                Client(rt.addr, retry=ONCE, token=ROTATED).call("sha256", data=b"x")
                break
            except CallError:
                assert time.monotonic() < deadline, "the new file was not read"
                time.sleep(0.2)
    finally:
        rt.stop()
    assert took < 5


def test_a_token_file_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "tokens"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        started = time.monotonic()
        proc = subprocess.run([str(BINARY), "--listen", "127.0.0.1:0", "--auth-token-file", str(path)],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "not a regular file" in proc.stderr, proc.stderr
        assert time.monotonic() - started < 10, "refused at once, not blocked on the FIFO or reading /dev/zero"


def test_a_token_file_swapped_for_a_fifo_does_not_stall_the_server(tokens):
    rt = Runtime(tokens)
    try:
        tokens.unlink()
        os.mkfifo(tokens)  # nobody ever writes it
        time.sleep(2.5)
        started = time.monotonic()
        assert Client(rt.addr).health("") == "SERVING"
        assert code(lambda: Client(rt.addr, retry=ONCE, token=ALL).call("echo")) == "UNAUTHENTICATED"
        assert time.monotonic() - started < 2, "the server answers while the file is a FIFO"
    finally:
        log = rt.stop()
    assert "not a regular file" in log


def test_reflection_is_behind_the_token_and_the_cli_sends_one(tokens):
    rt = Runtime(tokens)
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    try:
        denied = subprocess.run([grpcurl, "-plaintext", rt.addr, "list"], capture_output=True, text=True, timeout=30)
        assert denied.returncode != 0 and "Unauthenticated" in denied.stderr, denied
        allowed = subprocess.run([grpcurl, "-plaintext", "-H", f"authorization: Bearer {ALL}", rt.addr, "list"],
                                 capture_output=True, text=True, timeout=30)
        assert allowed.returncode == 0 and "ai.AI" in allowed.stdout, allowed.stderr

        env = dict(os.environ, AIPOD_TARGET=f"http://{rt.addr}")
        env.pop("AIPOD_TOKEN", None)
        cli = subprocess.run([str(CLI), "call", "-f", "sha256"], capture_output=True, text=True, env=env, timeout=30)
        assert cli.returncode == 10 and "credentials" in cli.stderr, cli
        env["AIPOD_TOKEN"] = ALL
        cli = subprocess.run([str(CLI), "call", "-f", "sha256"], capture_output=True, text=True, env=env, timeout=30)
        assert cli.returncode == 0 and json.loads(cli.stdout)["size"] == 0, cli.stderr
        cli = subprocess.run([str(CLI), "describe", "--token", LIMITED], capture_output=True, text=True, env=env,
                             timeout=30)
        assert cli.returncode == 0, cli.stderr
    finally:
        rt.stop()


def test_a_malformed_token_file_stops_the_runtime_at_start_naming_the_line(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{ALL}\n{LIMITED} a b\n")
    proc = subprocess.run([str(BINARY), "--listen", "127.0.0.1:0", "--auth-token-file", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "line 2" in proc.stderr and str(path) in proc.stderr and ALL not in proc.stderr and LIMITED not in proc.stderr
