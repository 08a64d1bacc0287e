"""`helm test` on containers: the chart rendered by `helm template` with its
demo model for the test, the operator's Deployment and Service run by the
test kubelet, the demo AIPod (a test hook) turned into its Deployment and
Service by `aipod-operator render` — what the operator would create — and
then the chart's test hook Pod run to completion against them, as
`helm test` has a kubelet do.

There is no API server here: the operator's pods get what a kubelet gives
them (token, CA, `KUBERNETES_SERVICE_HOST`) and their requests to it are
refused; the operator is ready without one (followers wait for the Lease),
which is what the hook's first step checks.

Needs root, podman and runc, the images (`.ci/images`) and helm (fetched
by `.ci/chart`). Run with `.ci/pods`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

import kubelet
from common import ROOT, log, render, running_cluster

HELM = Path(os.environ.get("AIPOD_HELM", Path(os.environ.get("AIPOD_TOOLS_DIR", Path.home() / ".cache/aipod-tools"))
                           / "helm"))
NAMESPACE = "aipod-system"
# What the API server keeps and a kubelet never sees.
API_SERVER_ONLY = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def helm_template(*sets: str) -> list[dict[str, Any]]:
    if not HELM.exists():
        raise RuntimeError(f"{HELM} missing: .ci/chart fetches helm (or set AIPOD_HELM)")
    args = [str(HELM), "template", "aipod", str(ROOT / "charts/aipod"), "--namespace", NAMESPACE]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def is_test_hook(o: dict[str, Any]) -> bool:
    return o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"


def split(objects: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(what the install runs on nodes, the test hooks); every other kind is
    the API server's alone — anything else fails the test."""
    hooks = [o for o in objects if is_test_hook(o)]
    installed = [o for o in objects if not is_test_hook(o)]
    unknown = {o["kind"] for o in installed} - kubelet.Cluster.KINDS - API_SERVER_ONLY
    assert not unknown, f"the chart renders kinds this test does not place: {unknown}"
    return [o for o in installed if o["kind"] in kubelet.Cluster.KINDS], hooks


@pytest.fixture(scope="module")
def release(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[kubelet.Cluster, list]]:
    installed, hooks = split(helm_template("test.demo.enabled=true", "test.wait=90s"))
    (aipod,) = [h for h in hooks if h["kind"] == "AIPod"]
    manifest = tmp_path_factory.mktemp("helm-test") / "demo.yaml"
    manifest.write_text(yaml.safe_dump(aipod))
    demo = render([manifest])
    with running_cluster([*installed, *demo], expose=None) as c:
        yield c, hooks


def test_helm_test_checks_the_operator_and_calls_the_demo_through_its_service(
    release: tuple[kubelet.Cluster, list]
) -> None:
    cluster, hooks = release
    (pod,) = [h for h in hooks if h["kind"] == "Pod"]
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["operator-ready", "demo-ready"]
    operators = cluster.pods_of("aipod-operator")
    assert len(operators) == 2 and all(p.ready for p in operators)
    started = time.monotonic()
    run = cluster.run_pod(pod, timeout=240)
    log(f"helm test pod: {run.exit_codes} in {time.monotonic() - started:.1f}s")
    assert run.succeeded, run.logs
    assert json.loads(run.logs["operator-ready"]) == {"service": "/readyz", "status": "SERVING"}
    assert json.loads(run.logs["demo-ready"]) == {"service": "ai.AI", "status": "SERVING"}
    assert json.loads(run.logs["demo-call"])["kwargs"] == {"from": "helm-test"}
    # The operator found its in-cluster configuration: it asked the
    # `kubernetes` Service for the Lease and was refused (no API server).
    logs = operators[0].log()
    assert "waiting to lead" in logs, logs[-2000:]


def test_helm_test_fails_naming_the_step_when_the_demo_is_gone(release: tuple[kubelet.Cluster, list]) -> None:
    cluster, _ = release
    installed, hooks = split(helm_template("test.demo.enabled=true", "test.wait=3s"))
    (pod,) = [h for h in hooks if h["kind"] == "Pod"]
    # The demo's Deployment and Service deleted; the operator stays.
    cluster.apply(installed)
    started = time.monotonic()
    run = cluster.run_pod(pod, timeout=120)
    log(f"helm test pod without the demo: {run.exit_codes} in {time.monotonic() - started:.1f}s")
    assert not run.succeeded
    assert run.exit_codes["operator-ready"] == 0
    assert run.exit_codes["demo-ready"] != 0, run.logs
    assert "demo-call" not in run.exit_codes, "a failed init container stops the pod"
    assert "aipod-test-demo" in run.logs["demo-ready"], run.logs["demo-ready"]
