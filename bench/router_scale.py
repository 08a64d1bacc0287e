#!/usr/bin/env python3
"""A router carrying 1,000 AIPods: how long the operator takes to render its
nginx config, how long nginx takes to reload it in place (the reloader's
"loaded" after a ConfigMap-style file swap), and nginx's memory before and
after ten reloads while calls are in flight.

Real parts: `aipod-operator router-config` renders the config the operator
writes into the router's ConfigMap (every upstream pointed at one local
runtime), Debian's nginx serves it, `aipod-operator router-reloader` reloads
it, and calls through nginx stay open across the reloads (each is checked
when it ends). Needs root (nginx as root, /proc of its workers).

    bench/router_scale.py [--aipods 1000] [--reloads 10] [--calls 20]

Prints a table; numbers are medians where a step repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def manifests(path: Path, n: int) -> list[str]:
    names = [f"m{i:04d}" for i in range(n)]
    path.write_text("".join(
        f"---\napiVersion: aipod.io/v1alpha1\nkind: AIPod\nmetadata:\n  name: {name}\nspec:\n  route:\n    router: edge\n"
        for name in names))
    return names


def render(operator: Path, files: list[Path], names: list[str], runtime: str, listen: str, health: str,
           temp: Path) -> tuple[str, float]:
    args = [str(operator), "router-config", "--router", "edge", "--listen", listen, "--health-listen", health,
            "--temp-dir", str(temp), *(f"--backend={n}={runtime}" for n in names), *map(str, files)]
    started = time.perf_counter()
    conf = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return conf, time.perf_counter() - started


def nginx_rss_kib(master: int) -> tuple[int, int]:
    """RSS of nginx's master and all its workers (old generations
    included), and how many processes that is."""
    pids = [master] + [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == master]
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total, len(pids)


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rfind(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def status(addr: str) -> dict:
    with urllib.request.urlopen(f"http://{addr}/status", timeout=5) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aipods", type=int, default=1000)
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--calls", type=int, default=20, help="calls in flight through nginx across the reloads")
    ap.add_argument("--profile", default="release")
    a = ap.parse_args()
    binaries = TARGET / a.profile
    operator, runtime_bin, cli = binaries / "aipod-operator", binaries / "aipod-runtime", binaries / "aipod"
    for b in (operator, runtime_bin, cli):
        if not b.exists():
            raise SystemExit(f"{b} missing: cargo build --{a.profile} -p aipod-operator -p aipod-runtime -p aipod")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = Path(tempfile.mkdtemp(prefix="aipod-router-scale-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        temp = work / "nginx"
        temp.mkdir()
        rt_port, listen, health, reloader = free_port(), free_port(), free_port(), f"127.0.0.1:{free_port()}"
        runtime = f"127.0.0.1:{rt_port}"
        procs.append(subprocess.Popen([str(runtime_bin), "--listen", runtime, "--spool-dir", str(work / "spool"),
                                       "--max-concurrent-calls", str(a.calls + 8)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        many = work / "aipods.yaml"
        names = manifests(many, a.aipods)
        extra = work / "extra.yaml"
        extra.write_text("apiVersion: aipod.io/v1alpha1\nkind: AIPod\nmetadata:\n  name: extra\n"
                         "spec:\n  route:\n    router: edge\n")
        renders = []
        conf = ""
        for _ in range(5):
            conf, took = render(operator, [many], names, runtime, f"127.0.0.1:{listen}", f"127.0.0.1:{health}", temp)
            renders.append(took)
        conf_with, _ = render(operator, [many, extra], [*names, "extra"], runtime, f"127.0.0.1:{listen}",
                              f"127.0.0.1:{health}", temp)
        conf_path = work / "nginx.conf"
        conf_path.write_text(conf)
        started = time.perf_counter()
        procs.append(subprocess.Popen([nginx, "-c", str(conf_path), "-p", str(temp), "-g", "daemon off; user root;"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                break
            except OSError:
                time.sleep(0.01)
        first_load = time.perf_counter() - started
        procs.append(subprocess.Popen([str(operator), "router-reloader", "--config", str(conf_path), "--pid-file",
                                       str(temp / "nginx.pid"), "--listen", reloader],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        while status(reloader).get("loaded") is None:
            time.sleep(0.1)
        master = int((temp / "nginx.pid").read_text())
        rss_before, procs_before = nginx_rss_kib(master)

        seconds = 30 + a.reloads * 3
        def call(i: int) -> str:
            done = subprocess.run([str(cli), "call", f"http://127.0.0.1:{listen}", "--upstream", names[i * 37 % len(names)],
                                   "-f", "sleep", "--kw", f"seconds={seconds}", "-q", "--attempts", "1"],
                                  capture_output=True, text=True, timeout=seconds + 120)
            return "ok" if done.returncode == 0 and json.loads(done.stdout)["slept"] == seconds else done.stderr
        pool = ThreadPoolExecutor(a.calls)
        calls = [pool.submit(call, i) for i in range(a.calls)]
        time.sleep(3)
        reload_times = []
        for i in range(a.reloads):
            text = conf_with if i % 2 == 0 else conf
            swap = work / "nginx.conf.next"
            swap.write_text(text)
            before = status(reloader)["reloads"]
            t0 = time.perf_counter()
            os.replace(swap, conf_path)
            while status(reloader)["reloads"] == before:
                time.sleep(0.01)
            reload_times.append(time.perf_counter() - t0)
            time.sleep(1.2)  # reloads are coalesced to one a second
        rss_during, procs_during = nginx_rss_kib(master)
        results = [c.result() for c in calls]
        time.sleep(2)
        rss_after, procs_after = nginx_rss_kib(master)
        failed = [r for r in results if r != "ok"]
        print(f"router with {a.aipods} AIPods (config {len(conf) / 1024:.0f} KiB, "
              f"{conf.count('upstream aipod_')} upstreams)")
        print("| measure | value |")
        print("|---|---|")
        print(f"| operator renders the config (`router-config`, median of 5) | {statistics.median(renders) * 1000:.0f} ms |")
        print(f"| nginx starts on it (to listening) | {first_load * 1000:.0f} ms |")
        print(f"| file swap → reload confirmed by the reloader (median of {a.reloads}; includes its 250 ms poll) | "
              f"{statistics.median(reload_times) * 1000:.0f} ms (max {max(reload_times) * 1000:.0f} ms) |")
        print(f"| nginx RSS before (master + workers) | {rss_before / 1024:.1f} MiB ({procs_before} processes) |")
        print(f"| nginx RSS after {a.reloads} reloads, {a.calls} calls in flight | {rss_during / 1024:.1f} MiB "
              f"({procs_during} processes: old workers finish their calls) |")
        print(f"| nginx RSS once the calls ended | {rss_after / 1024:.1f} MiB ({procs_after} processes) |")
        print(f"| calls through the {a.reloads} reloads | {len(results) - len(failed)} of {len(results)} ok |")
        if failed:
            raise SystemExit(f"calls failed across the reloads: {failed[:3]}")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
