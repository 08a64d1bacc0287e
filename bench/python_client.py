"""The aipod Python client's side of the benchmark (`bench/run`, system
`aipod-python`): one workload against a running aipod-runtime, with the
same JSON output as bench/client.rs, so bench/compare.py measures it the
same way.

    python bench/python_client.py file  --target HOST:PORT --func sha256 --path FILE [--level 1|none]
    python bench/python_client.py small --target HOST:PORT --n 2000 --concurrency 16 [--payload-bytes 1024]

Runs with an interpreter where the aipod package is installed with its
client extra (bench/run installs the wheel into .venv).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from aipod import AsyncClient, Client, RetryPolicy

NO_RETRY = RetryPolicy(attempts=1)


def flags() -> tuple[str, dict[str, str]]:
    args = sys.argv[1:]
    workload, rest = args[0], args[1:]
    return workload, {rest[i].lstrip("-"): rest[i + 1] for i in range(0, len(rest), 2)}


def summary(lat: list[float], wall: float) -> dict[str, Any]:
    lat = sorted(lat)
    pct = lambda p: lat[min(len(lat), max(1, -(-int(p * len(lat)) // 100))) - 1] * 1e3  # noqa: E731
    return {"n": len(lat), "wall_s": wall, "calls_per_s": len(lat) / wall, "p50_ms": pct(50), "p99_ms": pct(99),
            "max_ms": lat[-1] * 1e3}


def file(f: dict[str, str]) -> dict[str, Any]:
    # `auto` (the client's default), `none`, or a zstd level.
    given = f.get("level", "auto")
    level = None if given == "none" else given if given == "auto" else int(given)
    beats = 0

    def progress(p: Any) -> None:
        nonlocal beats
        beats += 1

    with Client(f["target"]) as c:
        t = time.perf_counter()
        res = c.call(f["func"], file=f["path"], zstd_level=level, progress=progress)
        wall = time.perf_counter() - t
    return {"wall_s": wall, "heartbeats": beats, "result": res.value}


def small(f: dict[str, str]) -> dict[str, Any]:
    n, conc, payload = int(f.get("n", "2000")), int(f.get("concurrency", "16")), bytes(int(f.get("payload-bytes", "1024")))
    wrong = 0
    with Client(f["target"], retry=NO_RETRY) as c:
        for i in range(20):
            c.call("echo", {"i": i}, data=payload)  # warm-up
        lat = []
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            r = c.call("echo", {"i": i}, data=payload)
            lat.append(time.perf_counter() - t)
            wrong += r.value["kwargs"]["i"] != i
        sequential = summary(lat, time.perf_counter() - t0)

    async def sequential_async() -> tuple[list[float], float, int]:
        async with AsyncClient(f["target"], retry=NO_RETRY) as ac:
            for i in range(20):
                await ac.call("echo", {"i": i}, data=payload)
            lat, bad = [], 0
            t0 = time.perf_counter()
            for i in range(n):
                t = time.perf_counter()
                r = await ac.call("echo", {"i": i}, data=payload)
                lat.append(time.perf_counter() - t)
                bad += r.value["kwargs"]["i"] != i
            return lat, time.perf_counter() - t0, bad

    async def concurrent() -> tuple[list[float], float, int]:
        async with AsyncClient(f["target"], retry=NO_RETRY) as ac:
            for i in range(20):
                await ac.call("echo", {"i": i}, data=payload)
            next_i, lat, bad = iter(range(n)), [], 0

            async def worker() -> None:
                nonlocal bad
                for i in next_i:
                    t = time.perf_counter()
                    r = await ac.call("echo", {"i": i}, data=payload)
                    lat.append(time.perf_counter() - t)
                    bad += r.value["kwargs"]["i"] != i

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(conc)))
            return lat, time.perf_counter() - t0, bad

    lat, wall, bad_seq = asyncio.run(sequential_async())
    seq_async = summary(lat, wall)
    lat, wall, bad = asyncio.run(concurrent())
    result = summary(lat, wall) | {"tasks": conc}
    # `sequential` is the blocking Client, `sequential_async` AsyncClient.
    return {"sequential": sequential, "sequential_async": seq_async, "concurrent": result,
            "wrong_results": wrong + bad + bad_seq}


def peak_rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    workload, f = flags()
    out = {"file": file, "small": small}[workload](f)
    out["peak_rss_kib"] = peak_rss_kib()
    print(json.dumps(out))
