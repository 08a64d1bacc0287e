"""Does memory come back after a burst? Starts a release aipod-runtime,
fires N concurrent calls each uploading SIZE bytes to `sha256` (the aipod
Python AsyncClient, so the server holds them all at once), and reports the
server's RSS: at start, idle after one call (what a first call sets up once
is not burst memory), the peak, and 2, 10 and 30 s after the burst (the
runtime gives freed memory back once calls are quiet for
`--memory-release-delay`; `--env AIPOD_MEMORY_RELEASE_DELAY=0` measures it
without). docs/security.md has the figures.

    python bench/memory.py RUNTIME_BINARY [--calls 200] [--size 1MiB] [--env K=V ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from aipod import AsyncClient


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


async def burst(target: str, calls: int, size: int) -> float:
    payload = os.urandom(size)
    async with AsyncClient(target) as client:
        t0 = time.monotonic()
        results = await asyncio.gather(*(client.call("sha256", data=payload) for _ in range(calls)))
        assert all(r.value["size"] == size for r in results)
        return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runtime")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the runtime")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    env = dict(os.environ) | dict(kv.split("=", 1) for kv in args.env)
    spool = tempfile.mkdtemp(prefix="aipod-mem-spool-")
    proc = subprocess.Popen([args.runtime, "--listen", "127.0.0.1:0", "--log-format", "json", "--spool-dir", spool,
                             "--max-concurrent-calls", str(args.calls), "--log", "info"],
                            stderr=subprocess.PIPE, text=True, env=env)
    addr = ""
    assert proc.stderr is not None
    for line in proc.stderr:
        event = json.loads(line)
        if event.get("message") == "aipod-runtime listening":
            addr = event.get("addr") or event["fields"]["addr"]
            break
    # Keep reading its log, or a full pipe would stall the runtime.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    try:
        time.sleep(0.5)
        cold = rss_mib(proc.pid)
        # Idle is a server that has served: one call first (what a first
        # call sets up once — the shared zstd contexts, the metrics of a
        # function — is not burst memory).
        asyncio.run(burst(addr, 1, args.size))
        time.sleep(0.5)
        idle = rss_mib(proc.pid)
        took = asyncio.run(burst(addr, args.calls, args.size))
        peak = rss_mib(proc.pid, "VmHWM")
        time.sleep(2)
        after2 = rss_mib(proc.pid)
        time.sleep(8)
        after10 = rss_mib(proc.pid)
        time.sleep(20)
        after30 = rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(spool, ignore_errors=True)
    print(json.dumps({"label": args.label, "calls": args.calls, "size": args.size, "burst_s": round(took, 2),
                      "cold_mib": round(cold, 1), "idle_mib": round(idle, 1), "peak_mib": round(peak, 1),
                      "after_2s_mib": round(after2, 1), "after_10s_mib": round(after10, 1),
                      "after_30s_mib": round(after30, 1)}))


if __name__ == "__main__":
    sys.exit(main())
