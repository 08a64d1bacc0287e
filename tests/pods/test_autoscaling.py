"""Autoscaling with real pods: the operator's own autoscaler — the pod reads
and decisions of operator/src/autoscaler.rs and autoscale.rs, run as
`aipod-operator autoscale-pods` — drives the pods the test kubelet runs.
Every second the test hands it the AIPod's pods (name, readiness, metrics
address) and carries its decision out as the operator does against the API
server: the pod-deletion costs first, then the replicas (a new render, as
the reconciler applies spec.replicas). The kubelet's ReplicaSet removes
pods in the documented order (not ready, lowest deletion cost, newest).

The model (manifests/scaled.yaml): 2 calls per pod, 1 to 3 pods, read
every second, pods removed after 8 s in which fewer were enough.

1. Load grows through the router (30 s `sleep` calls, one every 2 s, beside
   a trickle of small calls): pods are added, and calls made once the new
   pods are ready land on them (the router opens a connection per call in
   flight; the Service spreads new connections).
2. The load stops while two long calls run, one on the first pod and one
   on a pod the scale-up added: the idle pod goes at once, the busy ones
   stay (ScaleDownDeferred); when the shorter long call ends, its pod goes;
   the first stays (minReplicas 1) and its call ends with the right result.

Zero failed calls throughout; every removed pod held no call when chosen,
exited 0 and was not killed. The timings are logged.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

import kubelet
from common import OPERATOR, log, running_cluster
from test_changes import Load, render, router, with_replicas

import aipod

DEPLOYMENT = "aipod-scaled"
MANIFEST = Path(__file__).resolve().parent / "manifests" / "scaled.yaml"
COST = "controller.kubernetes.io/pod-deletion-cost"


class Autoscaler:
    """`aipod-operator autoscale-pods` over the kubelet's pods, once a
    second, its decisions applied as the operator applies them."""

    def __init__(self, cluster: kubelet.Cluster):
        self.cluster = cluster
        self.replicas = 1
        self.started = time.monotonic()
        self.decisions: list[tuple[float, dict[str, Any]]] = []
        self.changes: list[tuple[float, int, int]] = []  # (seconds, replicas, calls in flight)
        self.removed: list[tuple[float, str, int]] = []  # (seconds, pod, its calls in the reading)
        self.errors: list[str] = []
        self.proc = subprocess.Popen([str(OPERATOR), "autoscale-pods", str(MANIFEST)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        while not self.stopping.is_set():
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - reported by stop()
                self.errors.append(repr(e))
                return
            time.sleep(1)

    def _step(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        pods = [p for p in self.cluster.pods_of(DEPLOYMENT) if not p.terminating]
        reading = {
            "replicas": self.replicas,
            "pods": [{"name": p.name, "ready": p.ready, "metrics": f"{p.ip}:{p.template.container_ports['metrics']}"}
                     for p in pods],
        }
        self.proc.stdin.write(json.dumps(reading) + "\n")
        self.proc.stdin.flush()
        decision = json.loads(self.proc.stdout.readline())
        now = time.monotonic() - self.started
        self.decisions.append((now, decision))
        by_name = {p.name: p for p in pods}
        # Costs first, then the replicas: the order the operator writes.
        with self.cluster.lock:
            for name, cost in decision["costs"].items():
                by_name[name].annotations[COST] = str(cost)
        for name, cost in decision["costs"].items():
            if cost < 0:
                self.removed.append((now, name, decision["pods"][name]))
        if decision["replicas"] != self.replicas:
            log(f"autoscaler at {now:.1f}s: {decision['decision']} {self.replicas} → {decision['replicas']} "
                f"({decision['inFlight']} calls in flight)")
            self.replicas = decision["replicas"]
            self.changes.append((now, self.replicas, decision["inFlight"]))
            self.cluster.apply(with_replicas(render("scaled.yaml"), DEPLOYMENT, self.replicas))

    def reasons(self) -> list[str]:
        return [d["decision"] for _, d in self.decisions]

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)
        assert not self.errors, self.errors
        assert self.proc.returncode == 0, f"autoscale-pods exited {self.proc.returncode}"


def in_flight(pod: kubelet.Pod) -> int:
    """The calls a pod's runtime holds, from its metrics port."""
    port = pod.template.container_ports["metrics"]
    with urllib.request.urlopen(f"http://{pod.ip}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("aipod_calls_in_flight"))


def sleep_call(target: str, upstream: str | None, seconds: float) -> float:
    started = time.monotonic()
    with aipod.Client(target, upstream=upstream) as client:
        r = client.call("sleep", {"seconds": seconds}, timeout=seconds + 120)
    assert r.value == {"slept": seconds}, r.value
    return time.monotonic() - started


def wait_for(what: str, done: Any, timeout: float) -> float:
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout}s"
        time.sleep(0.2)
    return time.monotonic() - started


@pytest.fixture
def cluster(images: None) -> Iterator[kubelet.Cluster]:
    with running_cluster(render("scaled.yaml")) as c:
        yield c


def test_load_adds_pods_and_a_scale_down_removes_only_idle_ones(cluster: kubelet.Cluster) -> None:
    (first,) = cluster.pods_of(DEPLOYMENT)
    scaler = Autoscaler(cluster)
    # A trickle of small calls (one every 0.2 s: rarely in flight when the
    # pods are read, so the long calls decide).
    load = Load(router(cluster), DEPLOYMENT, threads=1, pause=0.2)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        # The first long call, straight to the first pod: 100 s.
        long_first = pool.submit(sleep_call, f"{first.ip}:50051", None, 100)
        # 1. Load grows: a 30 s call through the router every 2 s.
        started = time.monotonic()
        calls = []
        for _ in range(5):
            calls.append(pool.submit(sleep_call, router(cluster), DEPLOYMENT, 30))
            time.sleep(2)
        wait_for("3 pods ready", lambda: sum(p.ready for p in cluster.pods_of(DEPLOYMENT)) == 3, 60)
        log(f"scale-up: 6 calls asked for 3 pods; 3 ready {time.monotonic() - started:.1f}s after the first call; "
            f"changes (s, replicas, calls): {scaler.changes}")
        added = [p for p in cluster.pods_of(DEPLOYMENT) if p is not first]
        # Calls made now land on the new pods too.
        before = {p.name: in_flight(p) for p in added}
        calls += [pool.submit(sleep_call, router(cluster), DEPLOYMENT, 20) for _ in range(3)]
        time.sleep(3)
        after = {p.name: in_flight(p) for p in added}
        log(f"calls on the added pods before and after 3 more through the router: {before} → {after}")
        assert sum(after.values()) > sum(before.values()), "no call through the router reached an added pod"
        # The second long call, straight to an added pod: 45 s.
        second = added[0]
        long_second = pool.submit(sleep_call, f"{second.ip}:50051", None, 45)
        for c in calls:
            c.result(timeout=120)
        ended = time.monotonic()
        log(f"router calls done; in flight now: first {in_flight(first)}, {second.name} {in_flight(second)}")

        # 2. Only the two long calls remain: the idle pod goes, the busy stay.
        idle = [p for p in added if p is not second]
        wait_for("the idle pod removed", lambda: all(p.terminating for p in idle), 60)
        log(f"the idle pod went {time.monotonic() - ended:.1f}s after the load stopped")
        assert not first.terminating and not second.terminating, "a busy pod was removed"
        wait_for("a deferred scale-down", lambda: "ScaleDownDeferred" in scaler.reasons(), 30)
        assert long_second.result(timeout=120) >= 45
        second_done = time.monotonic()
        wait_for("the second pod removed once idle", lambda: second.terminating, 30)
        log(f"{second.name} went {time.monotonic() - second_done:.1f}s after its call ended")
        assert not first.terminating, "the pod holding the first long call was removed"
        assert long_first.result(timeout=150) >= 100
    scaler.stop()
    for _, pod, calls_then in scaler.removed:
        assert calls_then == 0, f"{pod} held {calls_then} calls when it was chosen to go"
    for p in [*idle, second]:
        p.stopped.wait(timeout=60)
        assert p.exit_code == 0 and not any("SIGKILL" in e for e in p.events), (p.name, p.events)
    assert [p.name for p in cluster.pods_of(DEPLOYMENT) if not p.terminating] == [first.name]
    log(f"autoscaler changes (s, replicas, calls in flight): {scaler.changes}; removed {scaler.removed}")
    ok, failures = load.stop()
    log(f"small calls through the router throughout: {ok}, {len(failures)} failed")
    assert not failures, failures[:10]
