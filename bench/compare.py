"""Side-by-side benchmark: aipod against the Python peer of the original
design (both server modes), same inputs, same machine, same run.

Run through `bench/run` (it builds the release binaries and the peer's venv,
then runs this with the peer's Python). Prints progress on stderr, writes
JSON to docs/benchmarks.json and the Markdown table into
docs/benchmarks.md (between the `bench:begin`/`bench:end` markers).

Systems: aipod (the Rust bench client), aipod-python (the Python client
against the same runtime), floor (`bench/floor.rs`: the smallest tonic
server of the same protocol -- echo and discard, no spool, queue,
heartbeats or decoding -- driven by the Rust bench client: what tonic and
h2 cost on this machine; small and upload-only only), peer-event and
peer-sleep (the Python original's two server modes).

Workloads (each for aipod, peer-event, peer-sleep; the median of --reps):
  big          1 GiB mixed file -> sha256 (hash checked)
  upload-only  the same file -> discard
  huge         4 GiB generated on the fly -> sha256 (server RSS must stay flat)
  small        1 KiB echo calls: sequential, then 16 concurrent; with aipod
               and floor both run, also alternated rounds of the two
               (--floor-rounds of --floor-n sequential and --floor-concurrent-n
               concurrent calls), whose medians the
               floor targets use; with aipod-python and peer-event both
               run, alternated rounds of the Python clients and the
               original's (--python-rounds), whose medians the Python
               targets use
  many         1,000 concurrent 10 s sleeps: server RSS and CPU
  long         one 5 s sleep: wall time and heartbeats
  cost         aipod alone: small and big with metrics served and scraped
               every second, and with traces exported to a live OTLP
               collector (every call, and 10% sampled), against the same
               runtime with both off -- four servers, runs interleaved
               (--cost-reps rounds), medians
  adaptive     aipod alone: the mixed file -> sha256 with the client's
               `auto` compression against fixed levels (none, -4, 1, 3, 7)
               on links paced to 50 MB/s and 1 GB/s by `bench-client relay`,
               and on loopback
  waiting      aipod alone: 10,000 sleeping calls on 8 connections: server
               peak RSS and the CPU of the heartbeats
  router       aipod alone: the mixed file -> sha256 directly and through
               nginx on the config the operator renders (`aipod-operator
               router-config`), rounds interleaved
Anchors: single-core `zstd -b3` on the 1 GiB file; loopback TCP throughput.
"""

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


PY_CLIENT = os.path.join(REPO, "bench", "python_client.py")
PY_WORKLOADS = ("big", "small")
FLOOR_WORKLOADS = ("upload", "small")
# Systems the Rust bench client drives.
RUST_CLIENT = ("aipod", "floor")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-home", required=True, help="the peer's folder after setup.sh (has .venv, ai_pb2.py)")
    ap.add_argument("--runtime", required=True, help="release aipod-runtime binary")
    ap.add_argument("--client", required=True, help="release bench-client binary")
    ap.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"),
                    help="interpreter with the aipod Python package installed (system aipod-python)")
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--huge-mib", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--small-n", type=int, default=2000)
    ap.add_argument("--small-n-sleep", type=int, default=20,
                    help="small calls against peer-sleep (1 call/s there: 2000 would take 33 min)")
    ap.add_argument("--floor-n", type=int, default=10000,
                    help="small calls per round against the floor (2,000 concurrent calls last ~0.1 s here: too short)")
    ap.add_argument("--floor-concurrent-n", type=int, default=50000,
                    help="16-concurrent calls per round against the floor (10,000 last ~0.5 s here: one hiccup "
                         "of the shared host moved a round by 20%%)")
    ap.add_argument("--floor-rounds", type=int, default=7, help="alternated rounds of aipod and the floor")
    ap.add_argument("--python-rounds", type=int, default=5,
                    help="alternated rounds of the aipod Python clients and the original's client (small calls)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--many", type=int, default=1000)
    ap.add_argument("--many-seconds", type=float, default=10)
    ap.add_argument("--long-seconds", type=float, default=5)
    ap.add_argument("--level", default="auto", help="aipod client compression: auto (its default), none or a zstd level (the peer uses 3)")
    ap.add_argument("--systems", default="aipod,aipod-python,floor,peer-event,peer-sleep",
                    help="systems to compare; empty with --workloads cost (or adaptive) for only those runs")
    ap.add_argument("--cost-reps", type=int, default=5, help="interleaved rounds of the cost workload")
    ap.add_argument("--workloads", default="big,upload,huge,small,many,long,cost,adaptive,waiting,router")
    ap.add_argument("--floor", default=None, help="release bench-floor binary, for the floor system")
    ap.add_argument("--operator", default=None, help="aipod-operator binary, for the router workload")
    ap.add_argument("--waiting", type=int, default=10000, help="calls of the waiting workload")
    ap.add_argument("--waiting-seconds", type=float, default=20.0, help="how long each waiting call sleeps")
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "peer-bench"))
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.json"))
    ap.add_argument("--doc", default=os.path.join(REPO, "docs", "benchmarks.md"))
    return ap.parse_args()


ARGS = parse_args()
sys.path.insert(0, ARGS.peer_home)
import bench as peer  # noqa: E402  (the peer's harness: inputs, /proc helpers, its server control)
import ai_pb2  # noqa: E402
import ai_pb2_grpc  # noqa: E402
import grpc  # noqa: E402
import zstandard  # noqa: E402
from client import open_channel  # noqa: E402
from common import BIN_SIZE_KEY, CHUNK_WRITE_SIZE, PONG  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402


# ---------------------------------------------------------------- measuring
class Meter:
    """Peak RSS and CPU seconds of the server (by pid) and of a client, over
    one measured run. The client is this process (the peer's Python client)
    or a child (aipod's bench-client), measured with wait4."""

    def __init__(self, server_pid):
        self.pid = server_pid

    def __enter__(self):
        peer.reset_hwm(self.pid)
        peer.reset_hwm(os.getpid())
        self.cpu0 = peer.proc_cpu_s(self.pid)
        self.me0 = peer.self_cpu_s()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.server_cpu = peer.proc_cpu_s(self.pid) - self.cpu0
        self.server_rss = peer.proc_status_kib(self.pid, "VmHWM") / 1024
        self.client_cpu = peer.self_cpu_s() - self.me0
        self.client_rss = peer.proc_status_kib(os.getpid(), "VmHWM") / 1024

    def child(self, argv):
        """Runs a child client; its CPU and peak RSS replace this process's."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[1]} failed with {proc.returncode}")
        self.child_usage = usage
        result = json.loads(out)
        self.child_rss_kib = result.get("peak_rss_kib")
        return result

    def record(self, **extra):
        usage = getattr(self, "child_usage", None)
        rec = {
            "wall_s": round(self.wall, 3),
            "server_peak_rss_mib": round(self.server_rss, 1),
            "server_cpu_s": round(self.server_cpu, 2),
            # The child reports its own VmHWM (wait4's ru_maxrss would include
            # this harness's RSS at fork time).
            "client_peak_rss_mib": round(self.child_rss_kib / 1024 if usage else self.client_rss, 1),
            "client_cpu_s": round(usage.ru_utime + usage.ru_stime if usage else self.client_cpu, 2),
        }
        rec.update(extra)
        return rec


def median_run(runs, key="wall_s"):
    """The run with the median `key`; peaks are the maximum of all runs."""
    ordered = sorted(runs, key=lambda r: r[key])
    out = dict(ordered[(len(ordered) - 1) // 2])
    for k in ("server_peak_rss_mib", "client_peak_rss_mib"):
        out[k] = max(r[k] for r in runs)
    out["ok"] = all(r.get("ok", True) for r in runs)
    out["runs"] = runs
    return out


# ---------------------------------------------------------------- servers
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FloorServer:
    """`bench-floor` on a free port (see bench/floor.rs)."""

    def __init__(self, log_dir):
        if not ARGS.floor:
            raise SystemExit("the floor system needs --floor BINARY (bench/run passes it)")
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.logf = open(os.path.join(log_dir, f"floor-{self.port}.log"), "w")
        self.proc = subprocess.Popen([ARGS.floor, "--listen", self.target], stdout=self.logf, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)
        self.logf.close()
        return {"exit_code": self.proc.returncode}


class AipodServer:
    def __init__(self, log_dir, extra=(), env=None, max_calls=None):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.spool = tempfile.mkdtemp(prefix="aipod-bench-spool-")
        self.logf = open(os.path.join(log_dir, f"aipod-{self.port}.log"), "w")
        base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        self.proc = subprocess.Popen(
            [ARGS.runtime, "--listen", self.target, "--spool-dir", self.spool, "--log", "warn",
             "--max-concurrent-calls", str(max_calls or max(ARGS.many, 16)), "--max-queued-calls", "1024", *extra],
            stdout=self.logf, stderr=subprocess.STDOUT, env=base | (env or {}))
        self.pid = self.proc.pid

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)
        self.logf.close()
        shutil.rmtree(self.spool, ignore_errors=True)
        return {"exit_code": self.proc.returncode}


async def wait_serving(target, proc):
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service="ai.AI"), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("server never became SERVING")


# ---------------------------------------------------------------- peer client helpers
class MixedStream:
    """A file-like of `size` bytes generated on the fly (alternating 1 MiB
    blocks of os.urandom and the peer's log/CSV text), hashed as read."""

    # The peer's text blocks, made once: building one costs more than
    # sending it, and the generator must not be what is measured.
    TEXT = []

    def __init__(self, size):
        if not MixedStream.TEXT:
            MixedStream.TEXT = [peer._text_block(i) for i in range(1, 32, 2)]
        self.left = size
        self.i = 0
        self.buf = memoryview(b"")
        self.sha = hashlib.sha256()

    def read(self, n=-1):
        if not self.buf:
            if self.left <= 0:
                return b""
            block = os.urandom(MiB) if self.i % 2 == 0 else MixedStream.TEXT[(self.i // 2) % len(MixedStream.TEXT)]
            block = block[: self.left]
            self.sha.update(block)
            self.left -= len(block)
            self.i += 1
            self.buf = memoryview(block)
        n = len(self.buf) if n is None or n < 0 else n
        out, self.buf = self.buf[:n], self.buf[n:]
        return bytes(out)


async def peer_call(channel, func, reader, size, **kwargs):
    """The peer client's framing (client.py `_requests`) over any reader."""
    def requests():
        header = dict(kwargs)
        header[BIN_SIZE_KEY] = size
        yield ai_pb2.Raw(data=zstandard.ZstdCompressor().compress(json.dumps(header).encode()))
        for chunk in zstandard.ZstdCompressor().read_to_iter(reader, write_size=CHUNK_WRITE_SIZE):
            yield ai_pb2.Raw(data=chunk)

    stub = ai_pb2_grpc.AIStub(channel)
    result, beats = None, 0
    async for msg in stub.chaos(requests(), metadata=[("x-func-name", func)]):
        if msg.data == PONG:
            beats += 1
        else:
            result = json.loads(zstandard.ZstdDecompressor().decompress(msg.data))
    return result, beats


# ---------------------------------------------------------------- workloads
async def w_file(system, srv, func, path, sha, size):
    runs = []
    for rep in range(ARGS.reps):
        with Meter(srv.pid) as m:
            if system in RUST_CLIENT:
                out = m.child([ARGS.client, "file", "--target", f"http://{srv.target}", "--func", func,
                               "--path", path, "--level", str(ARGS.level)])
                result, beats = out["result"], out["heartbeats"]
            elif system == "aipod-python":
                out = m.child([ARGS.python, PY_CLIENT, "file", "--target", srv.target, "--func", func,
                               "--path", path, "--level", str(ARGS.level)])
                result, beats = out["result"], out["heartbeats"]
            else:
                ch = open_channel(srv.target)
                with open(path, "rb") as f:
                    result, beats = await peer_call(ch, func, f, size)
                await ch.close()
        ok = result.get("size") == size and (func != "sha256" or result.get("sha256") == sha)
        runs.append(m.record(mb_per_s=round(size / m.wall / 1e6, 1), heartbeats=beats, ok=ok))
        log(f"  [{system}] {func} rep {rep + 1}: {runs[-1]['wall_s']} s, {runs[-1]['mb_per_s']} MB/s, ok={ok}")
    return median_run(runs)


# Before the huge upload's peak is reset: the runtime gives back what the
# uploads before it freed 1-2 s after its calls stop (--memory-release-delay
# 1s, looked at once a second); the upload's bound is its own, not theirs.
# Every system waits the same.
HUGE_SETTLE_S = 3


async def w_huge(system, srv):
    size = ARGS.huge_mib * MiB
    await asyncio.sleep(HUGE_SETTLE_S)
    with Meter(srv.pid) as m:
        if system == "aipod":
            out = m.child([ARGS.client, "stream", "--target", f"http://{srv.target}", "--func", "sha256",
                           "--bytes", str(size), "--level", str(ARGS.level)])
            ok = out["result"].get("sha256") == out["expected_sha256"] and out["result"].get("size") == size
        else:
            ch = open_channel(srv.target)
            stream = MixedStream(size)
            result, _ = await peer_call(ch, "sha256", stream, size)
            await ch.close()
            ok = result.get("sha256") == stream.sha.hexdigest() and result.get("size") == size
    rec = m.record(mb_per_s=round(size / m.wall / 1e6, 1), ok=ok)
    log(f"  [{system}] huge: {rec}")
    return rec


async def w_small(system, srv, n=None, concurrent_n=None):
    n = n or (ARGS.small_n_sleep if system == "peer-sleep" else ARGS.small_n)
    with Meter(srv.pid) as m:
        if system in RUST_CLIENT:
            out = m.child([ARGS.client, "small", "--target", f"http://{srv.target}", "--n", str(n),
                           "--concurrent-n", str(concurrent_n or n), "--concurrency", str(ARGS.concurrency)])
        elif system == "aipod-python":
            out = m.child([ARGS.python, PY_CLIENT, "small", "--target", srv.target, "--n", str(n),
                           "--concurrency", str(ARGS.concurrency)])
        else:
            out = await peer.bench_small(srv, n, ARGS.concurrency, os.urandom(1024))
    rec = m.record(**{k: out[k] for k in ("sequential", "sequential_async", "concurrent", "wrong_results") if k in out})
    rec["ok"] = out["wrong_results"] == 0
    log(f"  [{system}] small: seq {out['sequential']['calls_per_s']:.0f}/s p99 {out['sequential']['p99_ms']:.3f} ms,"
        f" concurrent {out['concurrent']['calls_per_s']:.0f}/s")
    return rec


async def alternated_small(servers, rounds, n=None, concurrent_n=None):
    """`rounds` of the small workload on each of the two `servers` (name ->
    server), all up at once, alternating (the order swapped each round):
    each system's medians of calls/s and p99 for every mode it reports."""
    runs = {name: [] for name in servers}
    try:
        for srv in servers.values():
            await wait_serving(srv.target, srv.proc)
        order = list(servers)
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                runs[name].append(await w_small(name, servers[name], n, concurrent_n))
    finally:
        for srv in servers.values():
            srv.stop()
    return {
        name: {mode: {key: statistics.median(r[mode][key] for r in recs) for key in ("calls_per_s", "p99_ms")}
               for mode in ("sequential", "sequential_async", "concurrent") if mode in recs[0]}
        for name, recs in runs.items()
    }


async def w_against_floor():
    """aipod and the floor on the small workload in the same minutes: both
    servers up, rounds alternating (the order swapped each round), medians.
    The systems' own runs come minutes apart, and this machine's speed
    drifts by more than the 10% a floor target allows. `--floor-n` calls a
    round: 2,000 concurrent calls last a tenth of a second here, and a
    single scheduling hiccup moved such a round by 10%."""
    servers = {"aipod": AipodServer(ARGS.data_dir), "floor": FloorServer(ARGS.data_dir)}
    medians = await alternated_small(servers, ARGS.floor_rounds, ARGS.floor_n, ARGS.floor_concurrent_n)
    return {"rounds": ARGS.floor_rounds, "calls": ARGS.floor_n, "concurrent_calls": ARGS.floor_concurrent_n} | medians


async def w_python_against_peer():
    """The aipod Python clients and the original's client on small calls in
    the same minutes: aipod's runtime and peer-event both up, rounds
    alternating (the order swapped each round), medians -- as against the
    floor, and for the same reason: the systems' own runs come minutes
    apart, and the original's client alone went 586 -> 715 calls/s between
    two runs on this machine, more than a 3x target's margin."""
    servers = {"aipod-python": AipodServer(ARGS.data_dir), "peer-event": peer.Server("event", ARGS.data_dir)}
    return {"rounds": ARGS.python_rounds, "calls": ARGS.small_n} | await alternated_small(servers, ARGS.python_rounds)


class SteadyCpu(threading.Thread):
    """Server CPU while every call sleeps: from `start` s after launch to
    1 s before they end -- the heartbeats' cost, without call set-up."""

    def __init__(self, pid, start, end):
        super().__init__(daemon=True)
        self.pid, self.start_s, self.end_s, self.pct = pid, start, end, None

    def run(self):
        time.sleep(self.start_s)
        c0, t0 = peer.proc_cpu_s(self.pid), time.perf_counter()
        time.sleep(self.end_s - self.start_s)
        self.pct = 100 * (peer.proc_cpu_s(self.pid) - c0) / (time.perf_counter() - t0)


async def w_many(system, srv):
    n, seconds = ARGS.many, ARGS.many_seconds
    steady = SteadyCpu(srv.pid, min(3.0, seconds / 3), seconds - 1)
    steady.start()
    with Meter(srv.pid) as m:
        if system == "aipod":
            out = m.child([ARGS.client, "many", "--target", f"http://{srv.target}", "--n", str(n),
                           "--seconds", str(seconds)])
            ok_count, beats = out["ok"], out["heartbeats"]
        else:
            ch = open_channel(srv.target)
            results = await asyncio.gather(*(peer_call(ch, "sleep", open(os.devnull, "rb"), 0, seconds=seconds)
                                             for _ in range(n)), return_exceptions=True)
            await ch.close()
            ok_count = sum(1 for r in results if not isinstance(r, BaseException) and r[0] == {"slept": seconds})
            beats = sum(r[1] for r in results if not isinstance(r, BaseException))
    rec = m.record(n=n, seconds=seconds, ok_count=ok_count, heartbeats=beats, ok=ok_count == n)
    # Server CPU as a share of one core: over the whole run (set-up of 1,000
    # calls included), and in the steady state where only heartbeats flow.
    rec["server_cpu_pct_of_core"] = round(100 * rec["server_cpu_s"] / m.wall, 1)
    steady.join()
    rec["heartbeat_cpu_pct_of_core"] = None if steady.pct is None else round(steady.pct, 1)
    log(f"  [{system}] many: {rec}")
    return rec


async def w_long(system, srv):
    seconds = ARGS.long_seconds
    with Meter(srv.pid) as m:
        if system == "aipod":
            out = m.child([ARGS.client, "long", "--target", f"http://{srv.target}", "--seconds", str(seconds)])
            beats, ok = out["heartbeats"], out["result_ok"]
        else:
            r = await peer.bench_long(srv, seconds)
            beats, ok = r["heartbeats"], r["result_ok"]
    rec = m.record(heartbeats=beats, ok=ok)
    log(f"  [{system}] long: {rec}")
    return rec


async def run_system(system, files):
    log(f"== {system}")
    if system == "floor":
        srv = FloorServer(ARGS.data_dir)
        func_upload = "discard"
    elif system.startswith("aipod"):
        srv = AipodServer(ARGS.data_dir)
        func_upload = "discard"
    else:
        srv = peer.Server(system.split("-")[1], ARGS.data_dir)
        func_upload = "discard"
    res = {}
    try:
        await wait_serving(srv.target, srv.proc)
        res["idle_rss_mib"] = round(peer.proc_status_kib(srv.pid, "VmRSS") / 1024, 1)
        workloads = ARGS.workloads.split(",")
        if system == "aipod-python":  # the client's own workloads; the server is aipod's
            workloads = [w for w in workloads if w in PY_WORKLOADS]
        if system == "floor":
            workloads = [w for w in workloads if w in FLOOR_WORKLOADS]
        path, sha, size = files["mixed"]
        if "big" in workloads or "upload" in workloads:
            peer.local_sha256(path)  # page-cache warm-up, as the peer does
        if "big" in workloads:
            res["big"] = await w_file(system, srv, "sha256", path, sha, size)
        if "upload" in workloads:
            res["upload"] = await w_file(system, srv, func_upload, path, sha, size)
        if "huge" in workloads:
            res["huge"] = await w_huge(system, srv)
        if "small" in workloads:
            res["small"] = await w_small(system, srv)
        if "many" in workloads:
            res["many"] = await w_many(system, srv)
        if "long" in workloads:
            res["long"] = await w_long(system, srv)
    finally:
        res["shutdown"] = srv.stop()
    return res


class Scraper(threading.Thread):
    """Scrapes a runtime's /metrics every second, as Prometheus would (more
    often than its usual 15-30 s)."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url, self.stop, self.scrapes = url, threading.Event(), 0

    def run(self):
        import urllib.request
        while not self.stop.wait(1.0):
            with urllib.request.urlopen(self.url, timeout=5) as r:
                r.read()
            self.scrapes += 1


async def w_cost(files):
    """Small and big calls against three runtimes: both off, metrics served
    and scraped, traces exported to a live collector. The counters count in
    every one (they are not optional); "metrics" adds the admin listener and
    the scrapes, "traced" the spans and their export."""
    path, sha, size = files["mixed"]
    sink = subprocess.Popen([ARGS.python, os.path.join(REPO, "bench", "otlp_sink.py")], stdout=subprocess.PIPE,
                            text=True)
    sink_port = int(sink.stdout.readline())
    metrics_port = free_port()
    servers = {
        "off": AipodServer(ARGS.data_dir),
        "metrics": AipodServer(ARGS.data_dir, ["--metrics-listen", f"127.0.0.1:{metrics_port}"]),
        "traced": AipodServer(ARGS.data_dir, env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}"}),
        "sampled": AipodServer(ARGS.data_dir, env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                                                   "OTEL_TRACES_SAMPLER": "traceidratio",
                                                   "OTEL_TRACES_SAMPLER_ARG": "0.1"}),
    }
    scraper = Scraper(f"http://127.0.0.1:{metrics_port}/metrics")
    runs = {name: {"seq": [], "conc": [], "big": [], "cpu_us_per_call": []} for name in servers}
    try:
        for srv in servers.values():
            await wait_serving(srv.target, srv.proc)
        scraper.start()
        names = list(servers)
        for rep in range(ARGS.cost_reps):
            order = names[rep % len(names):] + names[:rep % len(names)]  # none always goes first
            for name in order:
                srv = servers[name]
                with Meter(srv.pid) as m:
                    out = m.child([ARGS.client, "small", "--target", f"http://{srv.target}", "--n",
                                   str(ARGS.small_n), "--concurrency", str(ARGS.concurrency)])
                assert out["wrong_results"] == 0
                runs[name]["seq"].append(out["sequential"]["calls_per_s"])
                runs[name]["conc"].append(out["concurrent"]["calls_per_s"])
                runs[name]["cpu_us_per_call"].append(m.server_cpu / (2 * ARGS.small_n) * 1e6)
                with Meter(srv.pid) as m:
                    out = m.child([ARGS.client, "file", "--target", f"http://{srv.target}", "--func", "sha256",
                                   "--path", path, "--level", str(ARGS.level)])
                assert out["result"].get("sha256") == sha
                runs[name]["big"].append(size / m.wall / 1e6)
                log(f"  [cost {name}] rep {rep + 1}: seq {runs[name]['seq'][-1]:.0f}/s,"
                    f" concurrent {runs[name]['conc'][-1]:.0f}/s, big {runs[name]['big'][-1]:.0f} MB/s")
    finally:
        scraper.stop.set()
        for srv in servers.values():
            srv.stop()
        sink_cpu_s = peer.proc_cpu_s(sink.pid)
        sink.terminate()
        spans = int((sink.communicate(timeout=30)[0] or "0").split()[-1] or 0)

    def med(xs):
        xs = sorted(xs)
        return round(xs[len(xs) // 2], 1)

    res = {name: {k: med(v) for k, v in r.items()} | {"runs": r} for name, r in runs.items()}
    res["scrapes"], res["spans_collected"], res["sink_cpu_s"] = scraper.scrapes, spans, round(sink_cpu_s, 2)
    return res


LINKS = (("50 MB/s", 50e6), ("1 GB/s", 1e9), ("loopback", None))
ADAPTIVE_LEVELS = ("auto", "none", "-4", "1", "3", "7")


async def w_adaptive(files):
    """The mixed file to sha256 with the client's `auto` compression against
    each fixed choice, on links the bench client's relay paces (the upload
    direction) and on plain loopback; rounds interleave the levels. The
    50 MB/s link gets the first quarter of the file (same mix)."""
    path, _, size = files["mixed"]
    quarter = path + ".quarter"
    if not os.path.exists(quarter) or os.path.getsize(quarter) != size // 4:
        with open(path, "rb") as src, open(quarter, "wb") as dst:
            dst.write(src.read(size // 4))
    srv = AipodServer(ARGS.data_dir)
    out = {}
    try:
        await wait_serving(srv.target, srv.proc)
        for name, rate in LINKS:
            relay = None
            target = srv.target
            if rate is not None:
                port = free_port()
                relay = subprocess.Popen([ARGS.client, "relay", "--target", srv.target, "--listen",
                                          f"127.0.0.1:{port}", "--rate", str(int(rate))])
                target = f"127.0.0.1:{port}"
                time.sleep(0.3)
            file, n = (quarter, size // 4) if rate is not None and rate < 1e8 else (path, size)
            runs = {level: [] for level in ADAPTIVE_LEVELS}
            try:
                for rep in range(ARGS.reps):
                    for level in ADAPTIVE_LEVELS:
                        res = subprocess.run([ARGS.client, "file", "--target", f"http://{target}", "--func", "sha256",
                                              "--path", file, "--level", level], capture_output=True, text=True,
                                             check=True)
                        wall = json.loads(res.stdout.splitlines()[0])["wall_s"]
                        runs[level].append(n / wall / 1e6)
                    log(f"  [adaptive {name}] rep {rep + 1}: "
                        + ", ".join(f"{lv} {runs[lv][-1]:.0f}" for lv in ADAPTIVE_LEVELS) + " MB/s")
            finally:
                if relay is not None:
                    relay.terminate()
                    relay.wait()
            out[name] = {level: round(sorted(v)[len(v) // 2], 1) for level, v in runs.items()} | {"runs": runs}
    finally:
        srv.stop()
    return out


async def w_waiting(files):
    """10,000 sleeping calls on 8 connections to one runtime: its peak RSS
    and the CPU its heartbeats take while every call waits."""
    n, seconds, connections = ARGS.waiting, ARGS.waiting_seconds, 8
    srv = AipodServer(ARGS.data_dir, max_calls=n)
    try:
        await wait_serving(srv.target, srv.proc)
        steady = SteadyCpu(srv.pid, 5.0, seconds - 1)
        steady.start()
        with Meter(srv.pid) as m:
            out = m.child([ARGS.client, "many", "--target", f"http://{srv.target}", "--n", str(n),
                           "--seconds", str(seconds), "--connections", str(connections)])
        steady.join()
        rec = m.record(n=n, seconds=seconds, connections=connections, ok_count=out["ok"],
                       retried=out.get("retried", 0), heartbeats=out["heartbeats"], errors=out["errors"])
        rec["heartbeat_cpu_pct_of_core"] = None if steady.pct is None else round(steady.pct, 1)
        log(f"  [waiting] {rec}")
        return rec
    finally:
        srv.stop()


ROUTER_MANIFEST = """apiVersion: aipod.io/v1alpha1
kind: AIPod
metadata:
  name: bench
spec:
  route:
    router: bench
"""


def nginx_binary():
    for path in ("/usr/sbin/nginx", "/usr/bin/nginx"):
        if os.path.exists(path):
            return path
    raise RuntimeError("nginx is not installed: apt-get install nginx-light")


async def w_router(files):
    """The mixed file to sha256 directly and through nginx running the
    config the operator renders for one AIPod (its defaults, the backend
    pointed at this runtime); rounds interleave the two paths."""
    path, sha, size = files["mixed"]
    srv = AipodServer(ARGS.data_dir)
    work = tempfile.mkdtemp(prefix="aipod-bench-router-")
    nginx = None
    try:
        await wait_serving(srv.target, srv.proc)
        manifest = os.path.join(work, "aipod.yaml")
        with open(manifest, "w") as f:
            f.write(ROUTER_MANIFEST)
        port = free_port()
        conf = subprocess.run([ARGS.operator, "router-config", "--backend", f"bench={srv.target}",
                               "--listen", f"127.0.0.1:{port}", "--health-listen", f"127.0.0.1:{free_port()}",
                               "--temp-dir", work, manifest], capture_output=True, text=True, check=True).stdout
        conf_path = os.path.join(work, "nginx.conf")
        with open(conf_path, "w") as f:
            f.write(conf)
        nginx = subprocess.Popen([nginx_binary(), "-c", conf_path, "-p", work, "-g", "daemon off; user root;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start listening")
                time.sleep(0.05)
        runs = {"direct": [], "router": []}
        for rep in range(ARGS.reps):
            for name, target, extra in (("direct", srv.target, []),
                                        ("router", f"127.0.0.1:{port}", ["--upstream", "bench"])):
                res = subprocess.run([ARGS.client, "file", "--target", f"http://{target}", "--func", "sha256",
                                      "--path", path, *extra], capture_output=True, text=True, check=True)
                out = json.loads(res.stdout.splitlines()[0])
                if out["result"].get("sha256") != sha:
                    raise RuntimeError(f"{name}: wrong hash {out['result']}")
                runs[name].append(size / out["wall_s"] / 1e6)
            log(f"  [router] rep {rep + 1}: direct {runs['direct'][-1]:.0f}, "
                f"through nginx {runs['router'][-1]:.0f} MB/s")
        med = {k: round(sorted(v)[len(v) // 2], 1) for k, v in runs.items()}
        return med | {"ratio": round(med["router"] / med["direct"], 3), "runs": runs}
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)


def router_table(r):
    return "\n".join([
        "| path | 1 GiB mixed → sha256, MB/s | vs direct | target |",
        "|---|---|---|---|",
        f"| direct | {r['direct']:.0f} | | |",
        f"| through the operator's nginx config | {r['router']:.0f} | {100 * r['ratio']:.0f}% | ≥ 90% |",
        "",
        f"Medians of {ARGS.reps} interleaved rounds; nginx on the config `aipod-operator router-config` renders"
        " for one AIPod (its defaults: `client_body_buffer_size` 1 MiB), on the same two cores.",
    ])


def waiting_table(w):
    return "\n".join([
        "| waiting calls | connections | answered | of them on a retry | server peak RSS MiB |"
        " heartbeats, % of a core | target |",
        "|---|---|---|---|---|---|---|",
        f"| {w['n']:,} × sleep {w['seconds']:.0f} s | {w['connections']} | {w['ok_count']:,} of {w['n']:,} |"
        f" {w.get('retried', 0):,} | {w['server_peak_rss_mib']} | {w['heartbeat_cpu_pct_of_core']} |"
        " all, ≤ 200 MiB, ≤ 10% |",
        "",
        "Heartbeat CPU is the runtime's from 5 s after the calls start to 1 s before they end: only heartbeats"
        " flow (the demo `sleep`'s progress rises by itself, computed as each heartbeat goes out). The client"
        " uses its default retries: streams past the server's bound on those without their first message"
        " (1,024) are refused with a retryable RESOURCE_EXHAUSTED and answered on a retry.",
    ])


def adaptive_table(a):
    lines = ["| link | auto | " + " | ".join(f"level {lv}" for lv in ADAPTIVE_LEVELS[1:])
             + " | best fixed | auto vs best fixed | auto vs level 1 |",
             "|---" * (len(ADAPTIVE_LEVELS) + 4) + "|"]
    for name, _ in LINKS:
        r = a[name]
        fixed = {lv: r[lv] for lv in ADAPTIVE_LEVELS[1:]}
        best = max(fixed, key=fixed.get)
        cells = [f"{r['auto']:.0f}"] + [f"{r[lv]:.0f}" for lv in ADAPTIVE_LEVELS[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {best} | {100 * (r['auto'] / fixed[best] - 1):+.1f}%"
                     f" | {100 * (r['auto'] / r['1'] - 1):+.1f}% |")
    lines.append("")
    lines.append(f"MB/s of payload (mixed file → sha256, medians of {ARGS.reps} interleaved rounds); "
                 "`none` sends stored blocks, the others zstd at that level.")
    return "\n".join(lines)



def cost_table(c):
    off = c["off"]
    lines = ["| workload | off | metrics served + scraped | vs off | traces, every call | vs off"
             " | traces, 10% sampled | vs off |",
             "|---|---|---|---|---|---|---|---|"]
    for key, name, unit in (("seq", "1 KiB echo, sequential", "calls/s"),
                            ("conc", "1 KiB echo, 16 concurrent", "calls/s"),
                            ("cpu_us_per_call", "server CPU per small call", "µs"),
                            ("big", "1 GiB mixed -> sha256", "MB/s")):
        cells = [f"{off[key]:.0f}"]
        for config in ("metrics", "traced", "sampled"):
            v = c[config][key]
            cells += [f"{v:.0f}", f"{100 * (v / off[key] - 1):+.1f}%"]
        lines.append(f"| {name} ({unit}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Medians of {ARGS.cost_reps} interleaved rounds; {c['scrapes']} scrapes, "
                 f"{c['spans_collected']} spans collected. The collector (bench/otlp_sink.py) runs on the same two "
                 f"cores and used {c['sink_cpu_s']} CPU-s.")
    return "\n".join(lines)


def replace_block(marker, block):
    """Puts `block` (which starts `<!-- MARKER:begin` and ends
    `<!-- MARKER:end -->`) in place of the doc's block of that name, or
    appends it."""
    text = open(ARGS.doc).read() if os.path.exists(ARGS.doc) else "# Benchmarks\n\n"
    pattern = re.compile(rf"<!-- {marker}:begin.*?<!-- {marker}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    with open(ARGS.doc, "w") as f:
        f.write(text)


def write_run_doc(marker, res, table_text):
    """Replaces the doc block `marker` with this run's date, machine and table."""
    block = "\n".join([
        f"<!-- {marker}:begin (written by bench/run; edits here are overwritten) -->",
        f"Run {res['date']} on {res['machine']['nproc']} cores ({res['machine']['cpu']}).",
        "",
        table_text,
        f"<!-- {marker}:end -->",
    ])
    replace_block(marker, block)


# ---------------------------------------------------------------- anchors
def anchor_zstd(path):
    """Single-core zstd level 3 on the file: the zstd CLI's own benchmark."""
    if not shutil.which("zstd"):
        return None
    out = subprocess.run(["zstd", "-b3", "-e3", "-i3", "-T1", path], capture_output=True, text=True)
    text = (out.stdout + out.stderr).replace("\r", "\n")
    m = None
    for m in re.finditer(r"\(x?([\d.]+)\),\s*([\d.]+) MB/s\s*,\s*([\d.]+) MB/s", text):
        pass
    if not m:
        return {"error": text[-300:]}
    return {"tool": "zstd -b3 -T1", "ratio": float(m.group(1)), "compress_mb_per_s": float(m.group(2)),
            "decompress_mb_per_s": float(m.group(3))}


def anchor_loopback(mib=4096):
    """Loopback TCP: one sender thread, one receiver, 1 MiB buffers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    got = [0]

    def receive():
        conn, _ = srv.accept()
        buf = bytearray(MiB)
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            got[0] += n
        conn.close()

    t = threading.Thread(target=receive)
    t.start()
    block = os.urandom(MiB)
    c = socket.create_connection(("127.0.0.1", port))
    t0 = time.perf_counter()
    for _ in range(mib):
        c.sendall(block)
    c.close()
    t.join()
    wall = time.perf_counter() - t0
    srv.close()
    return {"tool": "python sockets, 1 MiB sends", "bytes": got[0], "mb_per_s": round(got[0] / wall / 1e6)}


# ---------------------------------------------------------------- report
def fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float):
        v = f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return f"{v}{unit}"


def table(res):
    systems = [s for s in ("aipod", "aipod-python", "floor", "peer-event", "peer-sleep") if s in res["systems"]]
    S = res["systems"]

    def g(s, *path):
        v = S.get(s, {})
        for p in path:
            if not isinstance(v, dict) or p not in v:
                return None
            v = v[p]
        return v

    rows = [
        # label, path, higher_is_better
        ("big: 1 GiB mixed → sha256, MB/s", ("big", "mb_per_s"), True),
        ("big: wall s", ("big", "wall_s"), False),
        ("big: server peak RSS MiB", ("big", "server_peak_rss_mib"), False),
        ("big: client peak RSS MiB", ("big", "client_peak_rss_mib"), False),
        ("big: server CPU s", ("big", "server_cpu_s"), False),
        ("big: client CPU s", ("big", "client_cpu_s"), False),
        ("big: hash correct", ("big", "ok"), None),
        ("upload-only: 1 GiB → discard, MB/s", ("upload", "mb_per_s"), True),
        ("upload-only: server CPU s", ("upload", "server_cpu_s"), False),
        ("huge: 4 GiB streamed → sha256, MB/s", ("huge", "mb_per_s"), True),
        ("huge: server peak RSS MiB", ("huge", "server_peak_rss_mib"), False),
        ("huge: client peak RSS MiB", ("huge", "client_peak_rss_mib"), False),
        ("huge: hash correct", ("huge", "ok"), None),
        ("small: sequential calls/s", ("small", "sequential", "calls_per_s"), True),
        ("small: sequential p50 ms", ("small", "sequential", "p50_ms"), False),
        ("small: sequential p99 ms", ("small", "sequential", "p99_ms"), False),
        ("small: sequential calls/s, Python AsyncClient", ("small", "sequential_async", "calls_per_s"), True),
        ("small: sequential p99 ms, Python AsyncClient", ("small", "sequential_async", "p99_ms"), False),
        ("small: 16 concurrent calls/s", ("small", "concurrent", "calls_per_s"), True),
        ("small: 16 concurrent p99 ms", ("small", "concurrent", "p99_ms"), False),
        ("many: 1000 × sleep 10 s, wall s", ("many", "wall_s"), False),
        ("many: server peak RSS MiB", ("many", "server_peak_rss_mib"), False),
        ("many: server CPU over the run, % of a core", ("many", "server_cpu_pct_of_core"), False),
        ("many: server CPU while only heartbeats flow, % of a core", ("many", "heartbeat_cpu_pct_of_core"), False),
        ("many: results correct", ("many", "ok_count"), True),
        ("long: sleep 5 s, wall s", ("long", "wall_s"), False),
        ("long: heartbeats", ("long", "heartbeats"), None),
        ("idle server RSS MiB", ("idle_rss_mib",), False),
    ]
    head = "| workload | " + " | ".join(systems) + " | aipod vs floor | aipod vs peer-event | aipod vs peer-sleep |"
    lines = [head, "|" + "---|" * (len(systems) + 4)]
    for label, path, higher in rows:
        vals = [g(s, *path) for s in systems]
        if all(v is None for v in vals):
            continue
        cells = [fmt(v) for v in vals]
        ratios = []
        a, f = g("aipod", *path), g("floor", *path)
        if higher is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v for v in (a, f)):
            ratios.append("")
        elif higher:
            ratios.append(f"{100 * a / f:.0f}% of the floor")
        else:
            ratios.append(f"{a - f:+.3f}" if "ms" in label else f"{100 * a / f:.0f}%")
        for other in ("peer-event", "peer-sleep"):
            a, b = g("aipod", *path), g(other, *path)
            if higher is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)) \
                    or isinstance(a, bool) or a == 0 or b == 0:
                ratios.append("")
            else:
                r = a / b if higher else b / a
                ratios.append(f"{r:.1f}× {'better' if r >= 1 else 'worse'}")
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    a = res.get("anchors", {})
    z, lo = a.get("zstd") or {}, a.get("loopback") or {}
    anchors = []
    if "compress_mb_per_s" in z:
        anchors.append(f"| anchor: zstd -b3, one core, compress / decompress MB/s | "
                       f"{z['compress_mb_per_s']:.0f} / {z['decompress_mb_per_s']:.0f} (ratio {z['ratio']}) |")
    if "mb_per_s" in lo:
        anchors.append(f"| anchor: loopback TCP MB/s | {lo['mb_per_s']} |")
    return "\n".join(lines), "\n".join(["| anchor | value |", "|---|---|"] + anchors) if anchors else ""


def targets(res):
    S = res["systems"]
    out = []

    def get(s, *path):
        v = S.get(s, {})
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        return v

    def check(name, ok, detail):
        if ok is None:
            return
        out.append(f"| {name} | {'met' if ok else '**not met**'} | {detail} |")

    big, big_peer = get("aipod", "big", "mb_per_s"), get("peer-event", "big", "mb_per_s")
    if big is not None:
        check("big ≥ 1 GB/s", big >= 1000, f"{big:.0f} MB/s")
        if big_peer:
            check("big ≥ 5× peer-event", big >= 5 * big_peer, f"{big / big_peer:.1f}×")
    up, z = get("aipod", "upload", "mb_per_s"), (res.get("anchors") or {}).get("zstd") or {}
    if up is not None and "compress_mb_per_s" in z:
        check("upload-only ≥ 75% of zstd -b3 compress", up >= 0.75 * z["compress_mb_per_s"],
              f"{up:.0f} MB/s = {100 * up / z['compress_mb_per_s']:.0f}% of {z['compress_mb_per_s']:.0f}")
    h = get("aipod", "huge")
    if h:
        check("huge: server peak RSS ≤ 16 MiB", h["server_peak_rss_mib"] <= 16, f"{h['server_peak_rss_mib']} MiB")
        check("huge: client peak RSS ≤ 32 MiB", h["client_peak_rss_mib"] <= 32, f"{h['client_peak_rss_mib']} MiB")
    s, sp, fl = get("aipod", "small"), get("peer-event", "small"), get("floor", "small")
    # Against the floor: the alternated rounds (aipod and the floor in the
    # same minutes) when they ran, else the systems' own runs.
    pair = res.get("against_floor")
    ours, floor = (pair["aipod"], pair["floor"]) if pair else (s, fl)
    if ours and floor:
        for mode in ("sequential", "concurrent"):
            calls = pair.get("concurrent_calls" if mode == "concurrent" else "calls", ARGS.small_n) if pair else 0
            how = f"; medians of {pair['rounds']} alternated rounds of {calls} calls" if pair else ""
            a, f = ours[mode]["calls_per_s"], floor[mode]["calls_per_s"]
            single = f"; the single runs above: {100 * s[mode]['calls_per_s'] / fl[mode]['calls_per_s']:.0f}%" \
                if pair and s and fl else ""
            check(f"small {mode} ≥ 90% of the floor's calls/s", a >= 0.9 * f,
                  f"{a:.0f} against {f:.0f} calls/s = {100 * a / f:.0f}%{how}{single}")
        a, f = ours["sequential"]["p99_ms"], floor["sequential"]["p99_ms"]
        how = f"; medians of {pair['rounds']} alternated rounds of {pair['calls']} calls" if pair else ""
        check("small sequential p99 within 0.05 ms of the floor's", a <= f + 0.05,
              f"{a:.3f} against {f:.3f} ms ({a - f:+.3f}{how})")
    if s and sp:
        for mode, times in (("sequential", 10), ("concurrent", 20)):
            r = s[mode]["calls_per_s"] / sp[mode]["calls_per_s"]
            detail = f"{r:.1f}×"
            if fl:
                rf = fl[mode]["calls_per_s"] / sp[mode]["calls_per_s"]
                detail += f" (the floor: {rf:.1f}×{'' if rf >= times else '; below the ratio, so its % is the target'})"
            check(f"small {mode} ≥ {times}× peer-event calls/s", r >= times, detail)
    if s and not fl:
        check("small sequential p99 ≤ 0.3 ms", s["sequential"]["p99_ms"] <= 0.3, f"{s['sequential']['p99_ms']:.3f} ms")
    fu = get("floor", "upload", "mb_per_s")
    if up is not None and fu:
        out.append(f"| upload-only against the floor's discard (no target) | – | {up:.0f} against {fu:.0f} MB/s = "
                   f"{100 * up / fu:.0f}% |")
    py, py_small = get("aipod-python", "big", "mb_per_s"), get("aipod-python", "small")
    if py is not None and big:
        check("Python client big ≥ 80% of the Rust client", py >= 0.8 * big, f"{py:.0f} MB/s = {100 * py / big:.0f}%")
    # Against the original's client: the alternated rounds when they ran,
    # else the systems' own runs.
    py_pair = res.get("python_against_peer")
    py_ours, py_peer = (py_pair["aipod-python"], py_pair["peer-event"]) if py_pair else (py_small, sp)
    if py_ours and py_peer:
        for mode, name in (("sequential", "Client"), ("sequential_async", "AsyncClient")):
            if mode not in py_ours:
                continue
            a, p = py_ours[mode]["calls_per_s"], py_peer["sequential"]["calls_per_s"]
            how = f"; medians of {py_pair['rounds']} alternated rounds of {py_pair['calls']} calls" if py_pair else ""
            single = f"; the single runs above: {py_small[mode]['calls_per_s'] / sp['sequential']['calls_per_s']:.1f}×" \
                if py_pair and py_small and sp and mode in py_small else ""
            check(f"Python {name} small sequential ≥ 3× peer-event (the original's Python client)", a >= 3 * p,
                  f"{a / p:.1f}× ({a:.0f} against {p:.0f} calls/s{how}{single})")
    m = get("aipod", "many")
    if m:
        check("many: server RSS ≤ 200 MiB", m["server_peak_rss_mib"] <= 200, f"{m['server_peak_rss_mib']} MiB")
        beat = m.get("heartbeat_cpu_pct_of_core")
        if beat is not None:
            check("many: heartbeats ≤ 10% of a core", beat <= 10,
                  f"{beat}% while only heartbeats flow ({m['server_cpu_pct_of_core']}% over the whole run)")
        check("many: all results correct", m["ok_count"] == m["n"], f"{m['ok_count']}/{m['n']}")
    return "\n".join(["| target | status | measured |", "|---|---|---|"] + out)


def write_doc(res):
    main_table, anchor_table = table(res)
    m = res["machine"]
    block = "\n".join([
        "<!-- bench:begin (written by bench/run; edits here are overwritten) -->",
        f"Run {res['date']} on {m['nproc']} cores ({m['cpu']}), {m['mem_total_gib']} GiB, kernel {m['kernel']};"
        f" client and server on the same machine over 127.0.0.1. Medians of {ARGS.reps} runs for big and"
        f" upload-only; aipod client compression {ARGS.level}, peer zstd level 3 (its design);"
        f" peer-sleep small calls: {ARGS.small_n_sleep} (one per second by design).",
        "",
        main_table,
        "",
        anchor_table,
        "",
        targets(res),
        "",
        "JSON with every run: `docs/benchmarks.json`.",
        "<!-- bench:end -->",
    ])
    replace_block("bench", block)


async def main():
    os.makedirs(ARGS.data_dir, exist_ok=True)
    mixed = os.path.join(ARGS.data_dir, f"mixed-{ARGS.big_mib}MiB.bin")
    peer.ensure_file(mixed, ARGS.big_mib, "mixed")
    files = {"mixed": (mixed, peer.local_sha256(mixed), os.path.getsize(mixed))}
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": {"nproc": os.cpu_count(), "cpu": peer._cpu_model(),
                    "mem_total_gib": round(peer.proc_meminfo_kib("MemTotal") / MiB, 1),
                    "kernel": platform.release(), "python": platform.python_version()},
        "config": {k: v for k, v in vars(ARGS).items() if k not in ("doc", "out")},
        "anchors": {},
        "systems": {},
    }
    log("== anchors")
    res["anchors"]["zstd"] = anchor_zstd(mixed)
    res["anchors"]["loopback"] = anchor_loopback()
    log(f"  {res['anchors']}")
    for system in filter(None, ARGS.systems.split(",")):
        res["systems"][system] = await run_system(system, files)
    if "cost" in ARGS.workloads.split(","):
        log("== observability cost (aipod: metrics and traces on vs off)")
        res["cost"] = await w_cost(files)
    if "adaptive" in ARGS.workloads.split(","):
        log("== adaptive compression (aipod client: auto vs fixed levels on paced links)")
        res["adaptive"] = await w_adaptive(files)
    if "waiting" in ARGS.workloads.split(","):
        log(f"== {ARGS.waiting} waiting calls (aipod)")
        res["waiting"] = await w_waiting(files)
    systems = ARGS.systems.split(",")
    if "small" in ARGS.workloads.split(",") and "aipod" in systems and "floor" in systems:
        log(f"== small calls against the floor ({ARGS.floor_rounds} alternated rounds of {ARGS.floor_n}"
            f" sequential and {ARGS.floor_concurrent_n} concurrent calls)")
        res["against_floor"] = await w_against_floor()
    if "small" in ARGS.workloads.split(",") and "aipod-python" in systems and "peer-event" in systems:
        log(f"== Python small calls against the original's client ({ARGS.python_rounds} alternated rounds of"
            f" {ARGS.small_n} calls)")
        res["python_against_peer"] = await w_python_against_peer()
    if "router" in ARGS.workloads.split(",") and ARGS.operator:
        log("== through the router (aipod: direct vs the operator's nginx config)")
        res["router"] = await w_router(files)
    os.makedirs(os.path.dirname(ARGS.out), exist_ok=True)
    if res["systems"]:
        with open(ARGS.out, "w") as f:
            json.dump(res, f, indent=2)
        write_doc(res)
        print(table(res)[0])
        print(targets(res))
    else:  # only the cost or adaptive runs: the side-by-side table and its JSON stay as they are
        extras = {"cost", "adaptive", "waiting", "router"}
        for key in extras:
            if key in res:
                with open(ARGS.out.replace(".json", f"-{key}.json"), "w") as f:
                    json.dump({k: v for k, v in res.items() if k not in extras - {key}}, f, indent=2)
    for key, render in (("cost", cost_table), ("adaptive", adaptive_table), ("waiting", waiting_table),
                        ("router", router_table)):
        if key in res:
            text = render(res[key])
            write_run_doc(f"bench-{key}", res, text)
            print(text)
    log(f"wrote {ARGS.out} and {ARGS.doc}")


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    asyncio.run(main())
