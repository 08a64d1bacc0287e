"""End to end on containers: the images `.ci/images` builds, running what
`aipod-operator render` prints for examples/aipod.yaml (the demo model) and
examples/aipod-python-model.yaml (the example Python model), both behind the
`edge` router, under the test kubelet (kubelet.py).

Needs root, podman and runc, the images (`.ci/images`) and the dist binaries
it builds. Run with `.ci/pods`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

import kubelet
from common import (
    GiB, MiB, ROOT, ROUTER_READ_TIMEOUT, VERSION, aipod, free_port, log, mixed_file, render, running_cluster,
    target,
)


# ---------------------------------------------------------------------------
# The cluster


@pytest.fixture(scope="module")
def cluster(images: None) -> Iterator[kubelet.Cluster]:
    objects = render()
    with running_cluster(objects) as c:
        yield c


# ---------------------------------------------------------------------------
# Scenarios


def test_the_router_runs_the_rendered_config_with_a_short_read_timeout(cluster: kubelet.Cluster) -> None:
    (cm,) = [d for d in render() if d["kind"] == "ConfigMap"]
    conf = cm["data"]["nginx.conf"]
    assert f"grpc_read_timeout {ROUTER_READ_TIMEOUT};" in conf
    assert "server aipod-demo.default.svc.cluster.local:50051;" in conf
    router_pods = cluster.pods_of("aipod-router-edge")
    assert len(router_pods) == 2 and all(p.ready for p in router_pods)


def test_a_1gib_upload_through_the_router_hashes_right_within_the_memory_limit(
    cluster: kubelet.Cluster, tmp_path: Path
) -> None:
    path = tmp_path / "mixed.bin"
    want = mixed_file(path, GiB)
    (demo,) = cluster.pods_of("aipod-demo")
    start = time.monotonic()
    done = aipod("call", target(cluster), "--upstream", "aipod-demo", "-f", "sha256", "--file", str(path), "-q")
    elapsed = time.monotonic() - start
    path.unlink()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"sha256": want, "size": GiB}
    peak, limit = demo.memory_peak_bytes(), demo.cgroup_memory_limit()
    log(f"1 GiB sha256 through the router: {elapsed:.1f}s ({GiB / elapsed / 1e6:.0f} MB/s); "
        f"runtime container memory peak {peak / MiB:.1f} MiB of its {limit / MiB:.0f} MiB limit")
    assert limit == demo.template.memory_limit, "the rendered limit is the container's cgroup limit"
    assert peak < limit


def test_the_python_model_answers_through_the_same_router(cluster: kubelet.Cluster, tmp_path: Path) -> None:
    subprocess.run(["python3", str(ROOT / "examples/python-model/make_data.py"), str(tmp_path), "--rows", "600"],
                   check=True, capture_output=True)
    described = aipod("describe", target(cluster), "--upstream", "text-classifier")
    assert described.returncode == 0, described.stderr
    assert {"train", "predict", "log"} <= set(json.dumps(json.loads(described.stdout)).replace('"', " ").split())
    trained = aipod("call", target(cluster), "--upstream", "text-classifier", "-f", "train",
                    "--file", str(tmp_path / "train.csv"), "--kw", "epochs=3", "--out", str(tmp_path / "model.json"),
                    "-q")
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout)
    assert result["labels"] == ["billing", "shipping", "technical"]
    assert result["saved_to"] == "/tmp/weights.json", "written to the pod's /tmp emptyDir"
    assert result["heldout_accuracy"] > 0.6
    assert json.loads((tmp_path / "model.json").read_text())["trained"]["labels"] == result["labels"]
    predicted = aipod("call", target(cluster), "--upstream", "text-classifier", "-f", "predict",
                      "--file", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "labels.csv"), "-q")
    assert predicted.returncode == 0, predicted.stderr
    texts = (tmp_path / "texts.txt").read_text().splitlines()
    header, *rows = (tmp_path / "labels.csv").read_text().splitlines()
    assert header == "label,score" and len(rows) == len(texts)
    assert {r.split(",")[0] for r in rows} == {"billing", "shipping", "technical"}


def test_the_model_pods_serve_prometheus_metrics_on_the_services_metrics_port(cluster: kubelet.Cluster) -> None:
    import urllib.request

    port = cluster.service("aipod-demo").expose_locally("metrics")
    out = aipod("call", target(cluster), "--upstream", "aipod-demo", "-f", "sha256", timeout=60)
    assert out.returncode == 0, out.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'aipod_calls_total{version="v1",func="sha256",code="OK"}' in text, text
    assert "aipod_build_info" in text


def test_an_unknown_upstream_gets_not_found_from_the_router(cluster: kubelet.Cluster) -> None:
    done = aipod("call", target(cluster), "--upstream", "no-such-model", "-f", "echo", "-q", "--attempts", "1")
    assert done.returncode == 5, (done.returncode, done.stderr)
    assert "NOT_FOUND" in done.stderr or "no model is routed" in done.stderr, done.stderr


def test_a_20s_call_outlives_the_routers_2s_read_timeout(cluster: kubelet.Cluster) -> None:
    start = time.monotonic()
    done = aipod("call", target(cluster), "--upstream", "aipod-demo", "-f", "sleep", "--kw", "seconds=20", "-q")
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["slept"] == 20
    assert elapsed >= 20
    log(f"20 s call through a router with grpc_read_timeout {ROUTER_READ_TIMEOUT}: {elapsed:.1f}s")


def test_deleting_the_demo_pod_loses_no_running_call(cluster: kubelet.Cluster) -> None:
    """Three calls run; the pod is deleted with no replacement ready yet:
    the calls finish (preStop, then drain on SIGTERM); new calls are refused
    with UNAVAILABLE until a replacement is ready, then succeed."""
    (old,) = cluster.pods_of("aipod-demo")
    # No replacement until the test says so (as if the node had no room).
    cluster.paused.add("aipod-demo")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        running = [
            pool.submit(aipod, "call", target(cluster), "--upstream", "aipod-demo", "-f", "sleep", "--kw",
                        "seconds=10", "-q", "--attempts", "1")
            for _ in range(3)
        ]
        time.sleep(2)  # the calls are running on the old pod
        kubelet_part = cluster.delete_pod(old, replace=False)
        # After the preStop sleep the runtime is draining: a new call is refused.
        deadline = time.monotonic() + old.template.pre_stop_sleep + 2
        while not any(e.startswith("SIGTERM") for e in old.events) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        refused = aipod("call", target(cluster), "--upstream", "aipod-demo", "-f", "echo", "-q", "--attempts", "1")
        assert refused.returncode == 8, (refused.returncode, refused.stderr)
        assert "UNAVAILABLE" in refused.stderr, refused.stderr
        results = [f.result(timeout=60) for f in running]
    for r in results:
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["slept"] == 10
    kubelet_part.join(timeout=old.template.grace + 10)
    assert old.exit_code == 0, old.log()
    assert not any("SIGKILL" in e for e in old.events), old.events
    # Still no ready pod: refused, not hung.
    again = aipod("call", target(cluster), "--upstream", "aipod-demo", "-f", "echo", "-q", "--attempts", "1")
    assert again.returncode == 8, (again.returncode, again.stderr)
    # The Deployment controller's replacement: ready, then serving.
    started = time.monotonic()
    cluster.paused.discard("aipod-demo")
    cluster.wait_ready("aipod-demo", timeout=60)
    log(f"replacement ready after {time.monotonic() - started:.1f}s")
    ok = aipod("call", target(cluster), "--upstream", "aipod-demo", "-f", "echo", "--kw", "n=1", "-q")
    assert ok.returncode == 0, ok.stderr


# ---------------------------------------------------------------------------
# Images on their own


def test_a_bare_run_of_the_runtime_image_serves_the_demo_and_stops_cleanly(images: None) -> None:
    port = free_port()
    name = f"aipod-bare-{os.getpid()}"
    kubelet.podman("run", "-d", "--name", name, *kubelet.ULIMITS, "-p", f"127.0.0.1:{port}:50051",
                   f"localhost/aipod-runtime:{VERSION}")
    try:
        deadline = time.monotonic() + 20
        while aipod("health", f"http://127.0.0.1:{port}", timeout=10).returncode != 0:
            assert time.monotonic() < deadline, kubelet.podman("logs", name, check=False).stderr
            time.sleep(0.2)
        done = aipod("call", f"http://127.0.0.1:{port}", "-f", "sha256", "--kw", "x=1", "-q")
        assert done.returncode == 0, done.stderr
        inspect = json.loads(kubelet.podman("inspect", name).stdout)[0]
        assert inspect["Config"]["User"] == "65532:65532"
        start = time.monotonic()
        kubelet.podman("stop", "-t", "20", name)
        assert time.monotonic() - start < 10, "SIGTERM with no calls: drains at once"
        state = json.loads(kubelet.podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0
    finally:
        kubelet.podman("rm", "-f", name, check=False)


def test_an_unwritable_spool_stops_the_runtime_with_one_line_naming_path_user_and_fix(
    images: None, tmp_path: Path
) -> None:
    # A root-owned 0755 volume: what a pod gets from a volume without an
    # fsGroup. The runtime must say what to do, not just "denied".
    os.chmod(tmp_path, 0o755)
    done = kubelet.podman(
        "run", "--rm", *kubelet.ULIMITS, "--read-only", "--read-only-tmpfs=false", "--user", "65532:65532",
        "-v", f"{tmp_path}:/var/spool/aipod", "-e", "AIPOD_SPOOL_DIR=/var/spool/aipod",
        f"localhost/aipod-runtime:{VERSION}", check=False, timeout=30,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "/var/spool/aipod" in lines[0] and "user id 65532" in lines[0] and "emptyDir" in lines[0], lines[0]


def test_the_operator_image_prints_the_crd_in_the_repository(images: None) -> None:
    done = kubelet.podman("run", "--rm", *kubelet.ULIMITS, "--read-only", f"localhost/aipod-operator:{VERSION}", "crd")
    assert done.stdout == (ROOT / "crds" / "aipod.io_aipods.yaml").read_text()


def test_the_python_base_imports_the_worker_sdk_as_user_65532(images: None) -> None:
    done = kubelet.podman(
        "run", "--rm", *kubelet.ULIMITS, "--read-only", "--entrypoint", "python3", f"localhost/aipod-python:{VERSION}",
        "-c", "import os, aipod.worker; print(os.getuid(), aipod.worker.__name__)",
    )
    assert done.stdout.split() == ["65532", "aipod.worker"]


def test_the_harness_refuses_a_pod_field_it_cannot_honour() -> None:
    (deployment, *_) = [d for d in render() if d["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["hostNetwork"] = True
    with pytest.raises(kubelet.Unsupported, match="hostNetwork"):
        kubelet.pod_template(deployment)
    deployment["spec"]["template"]["spec"].pop("hostNetwork")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    # The pod's name and namespace are honoured (the operator's pods name
    # themselves by them); its IP, or a Secret, are not.
    env.append({"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    assert ("X", "metadata.name") in kubelet.pod_template(deployment).containers[0].field_env
    for source in ({"fieldRef": {"fieldPath": "status.podIP"}}, {"secretKeyRef": {"name": "s", "key": "k"}}):
        env[-1] = {"name": "X", "valueFrom": source}
        with pytest.raises(kubelet.Unsupported, match="valueFrom"):
            kubelet.pod_template(deployment)
