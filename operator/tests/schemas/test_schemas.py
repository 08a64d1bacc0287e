"""Every object the operator emits for the examples, validated against real schemas.

- Deployments, Services, ConfigMaps and NetworkPolicies: `kubernetes-validate
  --strict` (Kubernetes 1.36 OpenAPI);
- GRPCRoutes: the Gateway API v1.6.1 CRD's openAPIV3Schema;
- PodMonitors: prometheus-operator's monitoring.coreos.com/v1 schema, as
  compiled from its Go API types by kubernetes-models-ts (npm
  `@kubernetes-models/prometheus-operator`, pinned in
  kubernetes-models/package-lock.json; `.ci/test` runs `npm ci`);
- BackendTLSPolicies: Gateway API v1 schema, likewise (npm
  `@kubernetes-models/gateway-api`);
- the documented KEDA ScaledObject (examples/keda/): KEDA's keda.sh/v1alpha1
  schema, likewise (npm `@kubernetes-models/keda`);
- the examples themselves: our generated CRD's openAPIV3Schema.

Each validator is also shown to reject a broken object, so a pass means something.
CEL rules are exercised in the Rust tests (`AIPod::validate_cel`).
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
OPERATOR = Path(os.environ.get("AIPOD_OPERATOR_BIN", ROOT / "target" / "debug" / "aipod-operator"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
K8S_VERSION = "1.36"


def rendered():
    assert OPERATOR.exists(), f"{OPERATOR} missing: build it first (cargo build -p aipod-operator)"
    out = subprocess.run([str(OPERATOR), "render", *map(str, EXAMPLES)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def crd_schema(path, version):
    crd = yaml.safe_load(Path(path).read_text())
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def kubernetes_validate(objects, tmp_path):
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    exe = Path(sys.executable).parent / "kubernetes-validate"
    return subprocess.run([str(exe), "--strict", "-k", K8S_VERSION, str(path)], capture_output=True, text=True)


def test_examples_exist_and_render_every_kind():
    assert len(EXAMPLES) >= 2
    kinds = sorted({d["kind"] for d in rendered()})
    assert kinds == ["BackendTLSPolicy", "ConfigMap", "Deployment", "GRPCRoute", "NetworkPolicy",
                     "PodDisruptionBudget", "PodMonitor", "Service"]


def test_core_objects_pass_kubernetes_validate_strict(tmp_path):
    core = [d for d in rendered()
            if d["kind"] in ("Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget")]
    names = {(d["kind"], d["metadata"]["name"]) for d in core}
    assert ("Deployment", "aipod-router-edge") in names and ("ConfigMap", "aipod-router-edge") in names
    assert ("PodDisruptionBudget", "aipod-router-edge") in names, "the router's 2 pods have a budget"
    done = kubernetes_validate(core, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed for resource") == len(core), done.stdout


def test_every_pod_disruption_budget_selects_exactly_its_deployments_pods(tmp_path):
    objects = rendered()
    budgets = [d for d in objects if d["kind"] == "PodDisruptionBudget"]
    deployments = {d["metadata"]["name"]: d for d in objects if d["kind"] == "Deployment"}
    assert budgets
    for b in budgets:
        d = deployments[b["metadata"]["name"]]
        assert b["spec"]["selector"] == d["spec"]["selector"], b["metadata"]["name"]
        assert d["spec"]["replicas"] >= 2, "no budget for a single replica: it would block node drains"
        assert b["spec"] == {**b["spec"], "maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow"}
    single = [n for n, d in deployments.items() if d["spec"]["replicas"] < 2]
    assert single and not {b["metadata"]["name"] for b in budgets} & set(single)


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path):
    (deployment, *_) = [d for d in rendered() if d["kind"] == "Deployment"]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    done = kubernetes_validate([broken], tmp_path)
    assert done.returncode != 0, "a typo must fail --strict validation"


MODELS_VALIDATOR = HERE / "kubernetes-models" / "validate.mjs"


def validate_models(objects, tmp_path):
    import json
    path = tmp_path / "objects.json"
    path.write_text(json.dumps(objects))
    assert (MODELS_VALIDATOR.parent / "node_modules").is_dir(), \
        "run `npm ci` in operator/tests/schemas/kubernetes-models (.ci/test does)"
    return subprocess.run(["node", str(MODELS_VALIDATOR), str(path)], capture_output=True, text=True)


def test_pod_monitors_match_the_prometheus_operator_schema(tmp_path):
    monitors = [d for d in rendered() if d["kind"] == "PodMonitor"]
    assert monitors, "the gateway example asks for a PodMonitor"
    done = validate_models(monitors, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": valid") == len(monitors), done.stdout
    deployments = {d["metadata"]["name"]: d for d in rendered() if d["kind"] == "Deployment"}
    for m in monitors:
        pod = deployments[m["metadata"]["name"]]["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert m["spec"]["selector"]["matchLabels"].items() <= labels.items(), "selects the AIPod's pods"
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert m["spec"]["podMetricsEndpoints"][0]["port"] in ports, "scrapes a port the pods have"


def test_backend_tls_policies_match_the_gateway_api_v1_schema(tmp_path):
    policies = [d for d in rendered() if d["kind"] == "BackendTLSPolicy"]
    assert policies, "the gateway example serves TLS behind a GRPCRoute"
    done = validate_models(policies, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    services = {d["metadata"]["name"]: d for d in rendered() if d["kind"] == "Service"}
    for p in policies:
        (target,) = p["spec"]["targetRefs"]
        ports = {port["name"] for port in services[target["name"]]["spec"]["ports"]}
        assert target["kind"] == "Service" and target["sectionName"] in ports, "targets the Service's grpc port"
    broken = copy.deepcopy(policies[0])
    del broken["spec"]["validation"]["hostname"]
    done = validate_models([broken], tmp_path)
    assert done.returncode != 0 and "INVALID" in done.stdout, done.stdout


def test_the_pod_monitor_schema_rejects_a_broken_one(tmp_path):
    (monitor, *_) = [d for d in rendered() if d["kind"] == "PodMonitor"]
    broken = copy.deepcopy(monitor)
    broken["spec"]["podMetricsEndpoints"][0]["port"] = 9090  # must be a port name
    done = validate_models([broken], tmp_path)
    assert done.returncode != 0 and "INVALID" in done.stdout, done.stdout


KEDA_EXAMPLE = ROOT / "examples" / "keda" / "scaledobject.yaml"


def test_the_keda_example_matches_kedas_schema_and_targets_an_aipods_scale_subresource(tmp_path):
    (scaled,) = [d for d in yaml.safe_load_all(KEDA_EXAMPLE.read_text()) if d]
    done = validate_models([scaled], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("aipod.io/v1alpha1", "AIPod")
    crd = yaml.safe_load((ROOT / "crds" / "aipod.io_aipods.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }, "KEDA and HPAs scale an AIPod through its scale subresource"
    broken = copy.deepcopy(scaled)
    broken["spec"]["triggers"][0]["type"] = 5  # must be a string
    done = validate_models([broken], tmp_path)
    assert done.returncode != 0 and "INVALID" in done.stdout, done.stdout


GRPCROUTE_SCHEMA = crd_schema(HERE / "gateway-api-v1.6.1-grpcroutes.yaml", "v1")


def test_grpcroutes_match_the_gateway_api_v1_6_1_schema():
    routes = [d for d in rendered() if d["kind"] == "GRPCRoute"]
    assert routes, "the gateway example renders a GRPCRoute"
    for route in routes:
        jsonschema.validate(route, GRPCROUTE_SCHEMA)
        rule = route["spec"]["rules"][0]
        assert rule["matches"][0]["headers"] == [{"type": "Exact", "name": "x-upstream", "value": route["metadata"]["name"]}]


def test_the_gateway_schema_rejects_a_bad_header_match():
    (route,) = [d for d in rendered() if d["kind"] == "GRPCRoute"][:1]
    broken = copy.deepcopy(route)
    broken["spec"]["rules"][0]["matches"][0]["headers"][0]["type"] = "Prefix"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, GRPCROUTE_SCHEMA)


AIPOD_SCHEMA = crd_schema(ROOT / "crds" / "aipod.io_aipods.yaml", "v1alpha1")


def test_the_router_config_allow_lists_the_examples_upstreams():
    (cm,) = [d for d in rendered() if d["kind"] == "ConfigMap"]
    conf = cm["data"]["nginx.conf"]
    assert '"translate" aipod_translate;' in conf and '"summarize" aipod_summarize;' in conf
    assert "grpc://$http_x_upstream" not in conf


@pytest.mark.parametrize(
    "flags",
    [
        ["--listen", "0.0.0.0:8080; include /etc/shadow"],
        ["--health-listen", "0.0.0.0:8081 }"],
        ["--temp-dir", "/tmp;\nuser root"],
        ["--backend", "translate=10.0.0.1:50051;"],
        ["--backend", "translate=evil}:50051"],
    ],
    ids=str,
)
def test_router_config_refuses_values_that_would_reach_nginx_conf_verbatim(flags):
    example = ROOT / "examples" / "aipod-router.yaml"
    done = subprocess.run([str(OPERATOR), "router-config", *flags, str(example)], capture_output=True, text=True)
    assert done.returncode != 0 and not done.stdout, done.stdout
    assert flags[0] in done.stderr, done.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_match_our_crd_schema(example):
    for doc in yaml.safe_load_all(example.read_text()):
        jsonschema.validate(doc, AIPOD_SCHEMA)


@pytest.mark.parametrize(
    "patch",
    [
        {"replicas": "two"},
        {"replicas": -1},
        {"upstream": "Not_A_DNS_Label"},
        {"imagePullPolicy": "Sometimes"},
        {"models": [{"version": "has space", "builtin": "demo"}]},
        {"runtime": {"port": 70000}},
        {"runtime": {"heartbeat": "soon"}},
        {"runtime": {"maxCallDuration": "an hour"}},
        {"disruption": {"enabled": "yes"}},
        {"runtime": {"logFormat": "xml"}},
        {"spool": {"medium": "Disk"}},
        {"route": {"gateway": {"parentRefs": []}}},
    ],
    ids=str,
)
def test_our_crd_schema_rejects_bad_specs(patch):
    doc = {"apiVersion": "aipod.io/v1alpha1", "kind": "AIPod", "metadata": {"name": "m"}, "spec": {"image": "img", **patch}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, AIPOD_SCHEMA)


@pytest.mark.parametrize("duration", ["250ms", "30s", "1h30m", "2d", "1.5"])
def test_our_crd_schema_accepts_every_duration_the_runtime_parses(duration):
    doc = {"apiVersion": "aipod.io/v1alpha1", "kind": "AIPod", "metadata": {"name": "m"},
           "spec": {"runtime": {"drainTimeout": duration, "heartbeat": duration}}}
    jsonschema.validate(doc, AIPOD_SCHEMA)


def test_the_image_may_be_left_to_the_operator():
    # No spec.image: the operator's --runtime-image (an empty one is refused by CEL).
    jsonschema.validate({"apiVersion": "aipod.io/v1alpha1", "kind": "AIPod", "metadata": {"name": "m"}, "spec": {}}, AIPOD_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"apiVersion": "aipod.io/v1alpha1", "kind": "AIPod", "metadata": {"name": "m"}, "spec": {"image": 7}}, AIPOD_SCHEMA)
