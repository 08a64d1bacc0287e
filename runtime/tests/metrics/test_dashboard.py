"""The Grafana dashboard (charts/aipod/dashboards/aipod.json) asks only for
metrics that exist: every metric a query names is one the runtime serves
(scraped from the real binary) or the operator registers."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.openmetrics.parser import text_string_to_metric_families

from test_metrics import Runtime, WORKER

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "charts" / "aipod" / "dashboards" / "aipod.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def _queries(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        if isinstance(node.get("query"), str) and "label_values" in node["query"]:
            found.append(node["query"])
        return found + [q for v in node.values() for q in _queries(v)]
    if isinstance(node, list):
        return [q for v in node for q in _queries(v)]
    return []


def _runtime_families() -> set[str]:
    # An exec: model, so the worker families are there too, and one call
    # (families without a series yet are not listed).
    rt = Runtime("--model", f"exec:python3 {WORKER}")
    try:
        import urllib.request

        from aipod import Client

        with Client(rt.addr) as client:
            assert client.call("echo", data=b"x" * 1000).payload == b"x" * 1000
        with urllib.request.urlopen(f"http://{rt.metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        rt.stop()
    return {f.name for f in text_string_to_metric_families(text)}


def _operator_families() -> set[str]:
    source = (ROOT / "operator" / "src" / "metrics.rs").read_text()
    prefix = re.search(r'Registry::with_prefix\("([a-z_]+)"\)', source).group(1)
    return {f"{prefix}_{name}" for name in re.findall(r'registry\.register\(\s*"([a-z_]+)"', source)}


def _family(metric: str) -> str:
    for suffix in SUFFIXES:
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def test_every_dashboard_query_names_an_exported_metric():
    queries = _queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 10, queries
    exported = _runtime_families() | _operator_families()
    assert "aipod_calls" in exported and "aipod_operator_reconciles" in exported, exported
    used = {m for q in queries for m in re.findall(r"\baipod_[a-z_]+", q)}
    missing = sorted(m for m in used if _family(m) not in exported and m not in exported)
    assert not missing, f"the dashboard queries metrics nobody exports: {missing} (exported: {sorted(exported)})"
    # And the dashboard covers what operators ask first.
    for family in ("aipod_calls", "aipod_call_duration_seconds", "aipod_call_phase_seconds", "aipod_payload_bytes",
                   "aipod_calls_in_flight", "aipod_calls_queued", "aipod_workers", "aipod_worker_restarts"):
        assert any(_family(m) == family or m == family for m in used), family
