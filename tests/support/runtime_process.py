"""The runtime binary as the Python tests run it — the twin of testkit's
`RuntimeProcess` (tests/testkit): started on a free port with a JSON log,
its addresses read from that log, every line kept, stopped with SIGTERM.

`pytest.ini` puts this folder on the import path; the root `conftest.py`
offers it as the `runtime_process` fixture, which stops what it started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: The runtime under test: `AIPOD_RUNTIME_BIN`, else the debug build.
BINARY = Path(os.environ.get("AIPOD_RUNTIME_BIN", ROOT / "target" / "debug" / "aipod-runtime"))


def event(line: str) -> dict:
    """A log line as one flat dict: a JSON event's fields and span beside
    its message and level; any other line as its text."""
    try:
        parsed = json.loads(line)
    except ValueError:
        return {"message": line.strip()}
    if not isinstance(parsed, dict):
        return {"message": line.strip()}
    return {**parsed, **parsed.get("fields", {}), **parsed.get("span", {})}


class RuntimeProcess:
    """`aipod-runtime --listen 127.0.0.1:0 --log-format json` with `args`,
    a spool of its own (or `spool`), and `--metrics-listen` on a free port
    when `metrics`. `addr`, `host`, `port`, `target`, `metrics` and
    `health` come from its log; `log` holds every line as a dict, `lines`
    as text."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        spool: str | None = None,
        metrics: bool = False,
        keep_spool: bool = False,
    ) -> None:
        assert BINARY.exists(), f"{BINARY} missing: build it first (cargo build -p aipod-runtime)"
        self.spool = spool or tempfile.mkdtemp(prefix="aipod-test-spool-")
        self.keep_spool = keep_spool or spool is not None
        argv = [str(BINARY), "--listen", "127.0.0.1:0", "--log-format", "json", "--spool-dir", self.spool]
        if metrics:
            argv += ["--metrics-listen", "127.0.0.1:0"]
        self.proc = subprocess.Popen([*argv, *args], stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.log: list[dict] = []
        self.addr = self.metrics = self.health = ""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            logged = self._keep(line)
            message = str(logged.get("message", ""))
            if message == "metrics listening on /metrics":
                self.metrics = logged["addr"]
            if message.startswith("health listening"):
                self.health = logged["addr"]
            if message == "aipod-runtime listening":
                self.addr = logged["addr"]
                break
        assert self.addr, f"the runtime did not start:\n{self.text()}"
        self.host, port = self.addr.rsplit(":", 1)
        self.port = int(port)
        self.target = f"http://{self.addr}"
        threading.Thread(target=self._drain, daemon=True).start()

    def _keep(self, line: str) -> dict:
        self.lines.append(line)
        self.log.append(event(line))
        return self.log[-1]

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._keep(line)

    def logged(self, message: str) -> list[dict]:
        """The log events with this message."""
        return [e for e in list(self.log) if e.get("message") == message]

    def text(self) -> str:
        """The whole log so far, as written."""
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signals the runtime (SIGTERM: a drain), waits for it, removes a
        spool it made, and returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        if not self.keep_spool:
            shutil.rmtree(self.spool, ignore_errors=True)
        return code
