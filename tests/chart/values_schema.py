"""The chart's values.schema.json, checked through helm itself (run by
.ci/chart with the helm it fetched): every bad value in the table is
rejected by `helm template` with a message naming the value, and the
defaults and every documented example still render.

    python tests/chart/values_schema.py HELM
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHART = Path(__file__).resolve().parents[2] / "charts" / "aipod"

# (--set arguments, the value path helm's message must name)
BAD = [
    (["replicas=-1"], "/replicas"),
    (["replicas=0"], "/replicas"),
    (["--set-string", "replicas=two"], "/replicas"),
    (["router.replicas=0"], "/router/replicas"),
    (["router.readTimeout=soon"], "/router/readTimeout"),
    (["router.readTimeout=60 s"], "/router/readTimeout"),
    (["router.bodyBuffer=lots"], "/router/bodyBuffer"),
    (["router.bodyBuffer=1PiB"], "/router/bodyBuffer"),
    (["router.serviceType=NodePort"], "/router/serviceType"),
    (["image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["image.digest=latest"], "/image/digest"),
    (["watchNamespace=Models_Team"], "/watchNamespace"),
    (["metrics.podMonitor.interval=often"], "/metrics/podMonitor/interval"),
    (["leaderElection.enabled=maybe"], "/leaderElection/enabled"),
    (["networkPolicy.enabled=1"], "/networkPolicy/enabled"),
    (["replica=3"], "'replica'"),
    (["router.readtimeout=60s"], "'readtimeout'"),
    (["podDisruptionBudget.maxUnavailable=-1"], "/podDisruptionBudget/maxUnavailable"),
]

# Values the docs and CI use, and the edges of what is allowed.
GOOD = [
    [],
    ["registry=localhost"],
    ["watchNamespace=models"],
    ["metrics.dashboard.enabled=true"],
    ["metrics.podMonitor.enabled=true", "metrics.podMonitor.interval=30s", "metrics.podMonitor.labels.release=prometheus"],
    ["replicas=1", "leaderElection.enabled=false"],
    ["router.readTimeout=1h30m", "router.bodyBuffer=512KiB", "router.serviceType=LoadBalancer"],
    ["router.readTimeout=90", "router.bodyBuffer=1.5MB"],
    ["image.digest=sha256:" + "0" * 64, "image.pullPolicy=Always"],
    ["podDisruptionBudget.maxUnavailable=50%"],
]


def template(helm: str, sets: list[str]) -> subprocess.CompletedProcess[str]:
    args: list[str] = []
    pending_flag = None
    for s in sets:
        if s.startswith("--"):
            pending_flag = s
            continue
        args += [pending_flag or "--set", s]
        pending_flag = None
    return subprocess.run([helm, "template", "aipod", str(CHART), "--namespace", "aipod-system", *args],
                          capture_output=True, text=True, timeout=120)


def main() -> int:
    helm = sys.argv[1]
    failures = []
    for sets, path in BAD:
        r = template(helm, sets)
        if r.returncode == 0:
            failures.append(f"accepted {sets}")
        elif "schema" not in r.stderr or path not in r.stderr:
            failures.append(f"rejected {sets} without naming {path}: {r.stderr.strip()}")
    for sets in GOOD:
        r = template(helm, sets)
        if r.returncode != 0:
            failures.append(f"refused the good values {sets}: {r.stderr.strip()}")
    for f in failures:
        print(f"values.schema.json: {f}", file=sys.stderr)
    print(f"values.schema.json: {len(BAD)} bad values rejected naming the value, {len(GOOD)} good sets render"
          if not failures else f"values.schema.json: {len(failures)} failures", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
