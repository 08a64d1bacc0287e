"""A one-node Kubernetes stand-in that runs what ``aipod-operator render``
prints, container by container, the way a kubelet would — and applies new
renders to the running cluster the way the API server's controllers would.

No API server can run here, so this module plays the parts of the cluster
that touch a pod:

- the **kubelet**: each pod is a podman pod (one network namespace; one
  process namespace too with ``shareProcessNamespace``) with a container per
  template container: image, command, args, env, ports, user/group/fsGroup,
  read-only root, dropped capabilities, no-new-privileges, emptyDir and
  configMap volumes (shared by the pod's containers) and resource limits;
  startup, readiness and liveness probes per container with the rendered
  periods and thresholds (a pod is ready when every container is);
  deletion runs each container's preStop hook (a sleep, or an HTTP GET that
  may take as long as it needs) and then SIGTERM, all containers at once,
  and SIGKILL at the end of ``terminationGracePeriodSeconds``. A ConfigMap
  that changes is updated in the volumes of running pods in place, with the
  kubelet's atomic ``..data`` swap. Environment from ``fieldRef``
  (``metadata.name``/``namespace``). A pod that mounts its service account
  token (the default) gets what a kubelet gives it — the token directory
  with a ``token``, a ``ca.crt`` and its ``namespace``, and
  ``KUBERNETES_SERVICE_HOST``/``PORT`` naming the ``kubernetes`` Service —
  but no API server answers there: its connections are refused. A bare
  ``Pod`` (a ``helm test`` hook) runs to completion with :meth:`Cluster.run_pod`:
  init containers one after another, then its containers;
- the **Deployment and ReplicaSet controllers**: a changed pod template
  rolls the Deployment honouring ``maxSurge``/``maxUnavailable`` and
  readiness; a changed ``replicas`` adds pods or deletes them in the
  ReplicaSet controller's documented order (not ready first, then lower
  ``controller.kubernetes.io/pod-deletion-cost``, then newest);
- NetworkPolicies are not enforced (the network plugin's job): each must
  select rendered pods and admit only ports they name; PodDisruptionBudgets
  are checked to select the pods of exactly one Deployment (evictions are
  not simulated);
- **kube-proxy and cluster DNS**: every Service gets a stable address on the
  pod network (an extra address on the network's bridge) and a TCP proxy that
  sends each new connection to a ready, non-terminating pod the Service
  selects; every container resolves ``NAME``, ``NAME.NS``, ``NAME.NS.svc``
  and ``NAME.NS.svc.cluster.local`` to it (a hosts file kept current as
  Services come and go), so generated configs are used unmodified. A
  Service can also be reached from the test on a loopback port (as
  ``kubectl port-forward`` would).

A field this module does not know how to honour raises :class:`Unsupported`
naming it: nothing is silently dropped.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PODMAN = ["podman", "--runtime", "runc"]
# podman's default ulimits exceed this machine's hard limits.
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
# A pod's infra container takes no --ulimit flags: the same limits (and
# runc: crun fails here) through a containers.conf.
_CONF = os.path.join(tempfile.gettempdir(), "aipod-pods-containers.conf")
with open(_CONF, "w") as _f:
    _f.write('[containers]\ndefault_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]\n[engine]\nruntime = "runc"\n')
os.environ["CONTAINERS_CONF"] = _CONF


# The fieldRef paths a container's environment may name.
FIELD_REFS = {"metadata.name", "metadata.namespace"}
# Where a kubelet mounts a pod's service account token.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class Unsupported(Exception):
    """A field of a rendered object that this harness cannot honour."""


def podman(
    *args: str, check: bool = True, capture: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PODMAN, *args], text=True, capture_output=capture, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])}… failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _check_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise Unsupported(f"{where}.{unknown[0]} is not supported by the test kubelet ({where} has {unknown})")


def _quantity_bytes(q: str | int) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    s = str(q)
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def _millicores(q: str | int) -> int:
    s = str(q)
    return int(s[:-1]) if s.endswith("m") else int(float(s) * 1000)


# ---------------------------------------------------------------------------
# Probes


@dataclass
class Probe:
    """One rendered probe: what it checks and when."""

    kind: str  # "startup" | "readiness" | "liveness"
    check: Callable[[str], bool]  # pod IP → success
    period: float
    failure_threshold: int
    initial_delay: float

    @classmethod
    def parse(cls, kind: str, spec: dict[str, Any], ports: dict[str, int], where: str) -> "Probe":
        _check_keys(
            spec,
            {"grpc", "httpGet", "periodSeconds", "failureThreshold", "timeoutSeconds", "initialDelaySeconds",
             "successThreshold"},
            where,
        )
        if spec.get("successThreshold", 1) != 1:
            raise Unsupported(f"{where}.successThreshold other than 1")
        timeout = float(spec.get("timeoutSeconds", 1))
        if "grpc" in spec:
            _check_keys(spec["grpc"], {"port", "service"}, f"{where}.grpc")
            port, service = int(spec["grpc"]["port"]), spec["grpc"].get("service", "")

            def check(ip: str) -> bool:
                with grpc.insecure_channel(f"{ip}:{port}") as ch:
                    try:
                        reply = health_pb2_grpc.HealthStub(ch).Check(
                            health_pb2.HealthCheckRequest(service=service), timeout=timeout
                        )
                    except grpc.RpcError:
                        return False
                    return reply.status == health_pb2.HealthCheckResponse.SERVING

        elif "httpGet" in spec:
            _check_keys(spec["httpGet"], {"path", "port"}, f"{where}.httpGet")
            p = spec["httpGet"]["port"]
            port = ports[p] if isinstance(p, str) else int(p)
            path = spec["httpGet"].get("path", "/")

            def check(ip: str) -> bool:
                try:
                    with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=timeout) as r:
                        return 200 <= r.status < 400
                except OSError:
                    return False

        else:
            raise Unsupported(f"{where}: only grpc and httpGet probes are supported")
        return cls(
            kind=kind,
            check=check,
            period=float(spec.get("periodSeconds", 10)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
            initial_delay=float(spec.get("initialDelaySeconds", 0)),
        )


# ---------------------------------------------------------------------------
# Pods


@dataclass
class PreStop:
    """A container's preStop hook: a sleep, or an HTTP GET to the pod."""

    sleep: float = 0.0
    http: tuple[int, str] | None = None  # (port, path)


@dataclass
class ContainerTemplate:
    """One container of a pod template, in podman terms."""

    name: str
    image: str
    run_args: list[str]  # podman run options
    command: list[str]
    probes: list[Probe]
    pre_stop: PreStop | None
    ports: dict[str, int]
    memory_limit: int | None
    mounts: list[tuple[str, str, bool]]  # (volume name, mount path, read-only)
    field_env: list[tuple[str, str]] = field(default_factory=list)  # (variable, fieldRef path)


@dataclass
class PodTemplate:
    """A Deployment's pod template, translated to podman terms once."""

    deployment: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    containers: list[ContainerTemplate]
    grace: float
    empty_dirs: dict[str, str]  # volume name → medium
    config_maps: dict[str, str]  # volume name → ConfigMap name
    fs_group: int | None
    share_process_namespace: bool
    raw: str  # the template as rendered, to tell a changed template
    service_account_token: bool = False
    init_containers: list[ContainerTemplate] = field(default_factory=list)

    @property
    def image(self) -> str:
        return self.containers[0].image

    @property
    def container_ports(self) -> dict[str, int]:
        return {name: port for c in self.containers for name, port in c.ports.items()}

    @property
    def memory_limit(self) -> int | None:
        return self.containers[0].memory_limit

    @property
    def pre_stop_sleep(self) -> float:
        pre_stop = self.containers[0].pre_stop
        return pre_stop.sleep if pre_stop else 0.0


@dataclass
class Pod:
    """A running pod: a podman pod (shared network, and process namespace
    when asked) with a container per template container."""

    name: str
    template: PodTemplate
    pod_id: str
    containers: dict[str, str]  # container name → podman container
    ip: str
    volumes_dir: str
    created: float = field(default_factory=time.monotonic)
    annotations: dict[str, str] = field(default_factory=dict)
    ready_containers: set[str] = field(default_factory=set)
    terminating: bool = False
    stopped: threading.Event = field(default_factory=threading.Event)
    restarts: int = 0
    exit_codes: dict[str, int] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)

    @property
    def container(self) -> str:
        """The first (main) container."""
        return self.containers[self.template.containers[0].name]

    @property
    def ready(self) -> bool:
        return not self.terminating and self.ready_containers >= {c.name for c in self.template.containers}

    @ready.setter
    def ready(self, value: bool) -> None:
        if not value:
            self.ready_containers.clear()

    @property
    def exit_code(self) -> int | None:
        """The first container's exit code; the worst of all when any failed."""
        if not self.exit_codes:
            return None
        main = self.exit_codes.get(self.template.containers[0].name, 0)
        worst = max(self.exit_codes.values())
        return main if worst == 0 else worst

    def log(self) -> str:
        out = []
        for name, container in self.containers.items():
            r = podman("logs", container, check=False)
            out.append(f"[{name}]\n{r.stdout}{r.stderr}" if len(self.containers) > 1 else r.stdout + r.stderr)
        return "\n".join(out)

    def _cgroup_file(self, v1: str, v2: str) -> int:
        cgroup = podman("inspect", "--format", "{{.State.CgroupPath}}", self.container).stdout.strip()
        for path in (f"/sys/fs/cgroup/memory{cgroup}/{v1}", f"/sys/fs/cgroup{cgroup}/{v2}"):
            if os.path.exists(path):
                with open(path) as f:
                    return int(f.read())
        raise RuntimeError(f"no {v2} for cgroup {cgroup}")

    def memory_peak_bytes(self) -> int:
        """The main container's memory high-water mark from its cgroup."""
        return self._cgroup_file("memory.max_usage_in_bytes", "memory.peak")

    def cgroup_memory_limit(self) -> int:
        return self._cgroup_file("memory.limit_in_bytes", "memory.max")


def _container_template(
    c: dict[str, Any], psc: dict[str, Any], volumes: dict[str, Any], where: str
) -> ContainerTemplate:
    cwhere = f"{where}.containers[{c['name']}]"
    _check_keys(
        c,
        {"name", "image", "imagePullPolicy", "command", "args", "env", "ports", "readinessProbe", "livenessProbe",
         "startupProbe", "lifecycle", "resources", "securityContext", "volumeMounts"},
        cwhere,
    )
    run: list[str] = []
    csc = {**c.get("securityContext", {})}
    _check_keys(
        csc,
        {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsNonRoot", "capabilities", "runAsUser",
         "runAsGroup"},
        f"{cwhere}.securityContext",
    )
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot", False))
    if non_root and (uid is None or int(uid) == 0):
        raise Unsupported(f"{cwhere}: runAsNonRoot needs a numeric non-zero runAsUser here (no image user lookup)")
    if uid is not None:
        run += ["--user", f"{uid}:{gid if gid is not None else uid}"]
    if psc.get("fsGroup") is not None:
        run += ["--group-add", str(psc["fsGroup"])]
    if csc.get("readOnlyRootFilesystem"):
        # Kubernetes mounts nothing writable by itself: no podman /tmp tmpfs.
        run += ["--read-only", "--read-only-tmpfs=false"]
    if csc.get("allowPrivilegeEscalation") is False:
        run += ["--security-opt", "no-new-privileges"]
    caps = csc.get("capabilities", {})
    _check_keys(caps, {"drop", "add"}, f"{cwhere}.securityContext.capabilities")
    for cap in caps.get("drop", []):
        run += ["--cap-drop", cap]
    for cap in caps.get("add", []):
        run += ["--cap-add", cap]

    field_env: list[tuple[str, str]] = []
    for var in c.get("env", []):
        vwhere = f"{cwhere}.env[{var.get('name')}]"
        _check_keys(var, {"name", "value", "valueFrom"}, vwhere)
        if "valueFrom" in var:
            _check_keys(var["valueFrom"], {"fieldRef"}, f"{vwhere}.valueFrom")
            ref = var["valueFrom"]["fieldRef"]
            _check_keys(ref, {"fieldPath", "apiVersion"}, f"{vwhere}.valueFrom.fieldRef")
            if ref["fieldPath"] not in FIELD_REFS:
                raise Unsupported(f"{vwhere}.valueFrom.fieldRef.fieldPath {ref['fieldPath']}")
            field_env.append((var["name"], ref["fieldPath"]))
        else:
            run += ["--env", f"{var['name']}={var.get('value', '')}"]

    ports: dict[str, int] = {}
    for p in c.get("ports", []):
        _check_keys(p, {"name", "containerPort", "protocol"}, f"{cwhere}.ports")
        if p.get("protocol", "TCP") != "TCP":
            raise Unsupported(f"{cwhere}.ports: protocol {p['protocol']}")
        ports[p.get("name", str(p["containerPort"]))] = int(p["containerPort"])

    memory_limit = None
    resources = c.get("resources", {})
    _check_keys(resources, {"requests", "limits"}, f"{cwhere}.resources")
    for kind, values in resources.items():
        _check_keys(values, {"cpu", "memory"}, f"{cwhere}.resources.{kind}")
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if "memory" in limits:
        memory_limit = _quantity_bytes(limits["memory"])
        # No swap, as on a kubelet node.
        run += ["--memory", str(memory_limit), "--memory-swap", str(memory_limit)]
    if "cpu" in limits:
        run += ["--cpus", f"{_millicores(limits['cpu']) / 1000:.3f}"]
    if "cpu" in requests:
        run += ["--cpu-shares", str(max(2, _millicores(requests["cpu"]) * 1024 // 1000))]
    # Memory requests only steer scheduling; one node has nothing to steer.

    probes = [
        Probe.parse(kind, c[key], ports, f"{cwhere}.{key}")
        for kind, key in (("startup", "startupProbe"), ("readiness", "readinessProbe"), ("liveness", "livenessProbe"))
        if key in c
    ]

    pre_stop = None
    lifecycle = c.get("lifecycle", {})
    _check_keys(lifecycle, {"preStop"}, f"{cwhere}.lifecycle")
    if "preStop" in lifecycle:
        hook = lifecycle["preStop"]
        _check_keys(hook, {"sleep", "httpGet"}, f"{cwhere}.lifecycle.preStop")
        if "sleep" in hook:
            pre_stop = PreStop(sleep=float(hook["sleep"]["seconds"]))
        else:
            get = hook["httpGet"]
            _check_keys(get, {"path", "port"}, f"{cwhere}.lifecycle.preStop.httpGet")
            if not isinstance(get["port"], int):
                raise Unsupported(f"{cwhere}.lifecycle.preStop.httpGet.port must be a number here")
            pre_stop = PreStop(http=(int(get["port"]), get.get("path", "/")))

    mounts: list[tuple[str, str, bool]] = []
    for m in c.get("volumeMounts", []):
        _check_keys(m, {"name", "mountPath", "readOnly"}, f"{cwhere}.volumeMounts")
        if m["name"] not in volumes:
            raise Unsupported(f"{cwhere}.volumeMounts[{m['name']}] names no volume")
        mounts.append((m["name"], m["mountPath"], bool(m.get("readOnly"))))

    command = [*c.get("command", []), *c.get("args", [])]
    if c.get("command"):
        run += ["--entrypoint", json.dumps(c["command"])]
        command = list(c.get("args", []))
    return ContainerTemplate(
        name=c["name"], image=c["image"], run_args=run, command=command, probes=probes, pre_stop=pre_stop,
        ports=ports, memory_limit=memory_limit, mounts=mounts, field_env=field_env,
    )


def pod_template(deployment: dict[str, Any]) -> PodTemplate:
    """Translates a rendered Deployment's pod template; raises Unsupported
    for anything it cannot honour."""
    meta = deployment["metadata"]
    name, ns = meta["name"], meta.get("namespace", "default")
    where = f"Deployment {ns}/{name} spec"
    dspec = deployment["spec"]
    _check_keys(dspec, {"replicas", "selector", "strategy", "template", "revisionHistoryLimit"}, where)
    strategy = dspec.get("strategy", {"type": "RollingUpdate"})
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        raise Unsupported(f"{where}.strategy.type {strategy['type']}: only RollingUpdate is rolled here")
    tmpl = dspec["template"]
    _check_keys(tmpl.get("metadata", {}), {"labels", "annotations"}, f"{where}.template.metadata")
    return _pod_spec(name, ns, tmpl, f"{where}.template.spec", bare=False)


def bare_pod_template(pod: dict[str, Any]) -> PodTemplate:
    """Translates a rendered bare Pod (one that runs to completion, such as
    a `helm test` hook); raises Unsupported for anything it cannot honour."""
    meta = pod["metadata"]
    name, ns = meta["name"], meta.get("namespace", "default")
    _check_keys(meta, {"name", "namespace", "labels", "annotations"}, f"Pod {ns}/{name} metadata")
    if pod["spec"].get("restartPolicy") != "Never":
        raise Unsupported(f"Pod {ns}/{name} spec.restartPolicy: only Never (run to completion) is run here")
    return _pod_spec(name, ns, pod, f"Pod {ns}/{name} spec", bare=True)


def _pod_spec(owner: str, ns: str, tmpl: dict[str, Any], where: str, bare: bool) -> PodTemplate:
    pod = tmpl["spec"]
    allowed = {"containers", "terminationGracePeriodSeconds", "automountServiceAccountToken", "securityContext",
               "volumes", "shareProcessNamespace", "serviceAccountName", "affinity", "imagePullSecrets"}
    _check_keys(pod, allowed | ({"restartPolicy", "initContainers"} if bare else set()), where)
    # Permissions are the API server's (RBAC): nothing to do on a node.
    # Images are all local here: pull secrets have nothing to pull.
    for term in ("podAffinity", "podAntiAffinity", "nodeAffinity"):
        rules = pod.get("affinity", {}).get(term, {})
        _check_keys(rules, {"preferredDuringSchedulingIgnoredDuringExecution"}, f"{where}.affinity.{term}")
    # (Preferences only: one node satisfies them as well as it can.)
    psc = pod.get("securityContext", {})
    _check_keys(psc, {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"}, f"{where}.securityContext")
    if psc.get("seccompProfile", {"type": "RuntimeDefault"}) != {"type": "RuntimeDefault"}:
        raise Unsupported(f"{where}.securityContext.seccompProfile other than RuntimeDefault")

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    empty_dirs: dict[str, str] = {}
    config_maps: dict[str, str] = {}
    for vname, v in volumes.items():
        _check_keys(v, {"name", "emptyDir", "configMap"}, f"{where}.volumes[{vname}]")
        if "emptyDir" in v:
            ed = v["emptyDir"] or {}
            _check_keys(ed, {"medium"}, f"{where}.volumes[{vname}].emptyDir")
            empty_dirs[vname] = ed.get("medium", "")
        else:
            cm = v["configMap"]
            _check_keys(cm, {"name"}, f"{where}.volumes[{vname}].configMap")
            config_maps[vname] = cm["name"]
    containers = [_container_template(c, psc, volumes, where) for c in pod["containers"]]
    init_containers = [_container_template(c, psc, volumes, f"{where}.init") for c in pod.get("initContainers", [])]
    if any(c.probes or c.pre_stop for c in init_containers):
        raise Unsupported(f"{where}.initContainers: probes and lifecycle hooks are not for init containers")
    ports = [p for c in containers for p in c.ports.values()]
    if len(set(ports)) != len(ports):
        raise Unsupported(f"{where}: two containers listen on one port (they share the pod's network)")
    return PodTemplate(
        deployment=owner,
        namespace=ns,
        labels=dict(tmpl["metadata"].get("labels", {})),
        annotations=dict(tmpl["metadata"].get("annotations", {})),
        containers=containers,
        grace=float(pod.get("terminationGracePeriodSeconds", 30)),
        empty_dirs=empty_dirs,
        config_maps=config_maps,
        fs_group=psc.get("fsGroup"),
        share_process_namespace=bool(pod.get("shareProcessNamespace", False)),
        raw=json.dumps(tmpl, sort_keys=True),
        service_account_token=bool(pod.get("automountServiceAccountToken", True)),
        init_containers=init_containers,
    )


@dataclass
class PodRun:
    """A bare Pod run to completion: each container's exit code and log, in
    the order they ran (containers after a failed init container never ran)."""

    name: str
    exit_codes: dict[str, int] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return bool(self.exit_codes) and all(code == 0 for code in self.exit_codes.values())


def _require_images(containers: list[ContainerTemplate]) -> None:
    for c in containers:
        if podman("image", "exists", c.image, check=False).returncode != 0:
            raise RuntimeError(f"image {c.image} is not built: run .ci/images first")


def _surge_and_unavailable(deployment: dict[str, Any], replicas: int) -> tuple[int, int]:
    """A rolling update's maxSurge and maxUnavailable as pod counts
    (percentages: surge rounds up, unavailable down, as Kubernetes does)."""
    rolling = deployment["spec"].get("strategy", {}).get("rollingUpdate", {})

    def count(value: Any, default: str, up: bool) -> int:
        v = rolling.get(value, default)
        if isinstance(v, str) and v.endswith("%"):
            share = replicas * int(v[:-1]) / 100
            return int(-(-share // 1)) if up else int(share // 1)
        return int(v)

    surge, unavailable = count("maxSurge", "25%", True), count("maxUnavailable", "25%", False)
    if surge == 0 and unavailable == 0:
        unavailable = 1  # as the API server defaults an impossible pair
    return surge, unavailable


def deletion_order(pods: list[Pod]) -> list[Pod]:
    """The ReplicaSet controller's order for scaling down (the documented
    one): pods not ready first, then lower `controller.kubernetes.io/
    pod-deletion-cost`, then the more recently created."""

    def cost(p: Pod) -> int:
        try:
            return int(p.annotations.get("controller.kubernetes.io/pod-deletion-cost", "0"))
        except ValueError:
            return 0

    return sorted(pods, key=lambda p: (p.ready, cost(p), -p.created))


# ---------------------------------------------------------------------------
# Services


class ServiceProxy:
    """kube-proxy for one Service: a stable address, and for each of its
    ports a listener whose new connections go to a ready endpoint's target
    port; established ones are left alone."""

    def __init__(self, cluster: "Cluster", service: dict[str, Any], address: str):
        spec = service["spec"]
        _check_keys(spec, {"type", "selector", "ports"}, f"Service {service['metadata']['name']} spec")
        self.ports: list[tuple[str, int, Any]] = []  # (name, port, targetPort)
        for port in spec["ports"]:
            _check_keys(port, {"name", "port", "targetPort", "protocol", "appProtocol"}, "Service port")
            self.ports.append((port.get("name", ""), int(port["port"]), port.get("targetPort", int(port["port"]))))
        if len({p[1] for p in self.ports}) != len(self.ports):
            raise Unsupported(f"Service {service['metadata']['name']}: two ports with one number")
        self.cluster = cluster
        self.name = service["metadata"]["name"]
        self.namespace = service["metadata"].get("namespace", "default")
        self.selector: dict[str, str] = spec["selector"]
        self.port = self.ports[0][1]
        self.target = self.ports[0][2]
        self.address = address
        self.rr = itertools.count()
        self.closed = False
        self.local_port: int | None = None
        self.sockets = [self._listen(address, port, target) for _, port, target in self.ports]

    def _listen(self, host: str, port: int, target: Any) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(256)
        threading.Thread(target=self._accept, args=(s, target), daemon=True).start()
        return s

    def expose_locally(self, name: str | None = None) -> int:
        """Also listens on 127.0.0.1 (like ``kubectl port-forward``), for
        the port called `name` (default: the first)."""
        target = next((t for n, _, t in self.ports if name is None or n == name), None)
        if target is None:
            raise KeyError(f"Service {self.name} has no port {name!r}")
        s = self._listen("127.0.0.1", 0, target)
        self.sockets.append(s)
        self.local_port = s.getsockname()[1]
        return self.local_port

    def endpoints(self, target: Any = None) -> list[tuple[str, int]]:
        target = self.target if target is None else target
        out = []
        for pod in self.cluster.pods_matching(self.namespace, self.selector):
            if pod.ready and not pod.terminating:
                port = pod.template.container_ports[target] if isinstance(target, str) else int(target)
                out.append((pod.ip, port))
        return out

    def _accept(self, listener: socket.socket, target: Any) -> None:
        while not self.closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            eps = self.endpoints(target)
            if not eps:
                # kube-proxy rejects connections to a Service without endpoints.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()
                continue
            ep = eps[next(self.rr) % len(eps)]
            threading.Thread(target=self._pipe_pair, args=(client, ep), daemon=True).start()

    @staticmethod
    def _pipe_pair(client: socket.socket, ep: tuple[str, int]) -> None:
        try:
            upstream = socket.create_connection(ep, timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(1 << 20):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        t = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        t.start()
        pipe(client, upstream)
        t.join()
        client.close()
        upstream.close()

    def close(self) -> None:
        self.closed = True
        for s in self.sockets:
            # shutdown wakes the thread blocked in accept(); close alone
            # would leave the port bound until its next connection.
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


# ---------------------------------------------------------------------------
# The cluster


class Cluster:
    """Runs rendered objects as a one-node cluster would: Deployments as
    pods under a Deployment controller that scales and rolls them, Services
    as proxies with DNS names, ConfigMaps as volume contents kept up to date
    in running pods. :meth:`apply` takes a new render, as ``kubectl apply``
    or the operator would write it."""

    KINDS = {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"}

    def __init__(self, objects: list[dict[str, Any]], log: Callable[[str], None] = print):
        self.log = log
        self.run_id = f"aipod-pods-{os.getpid()}-{next(_CLUSTERS)}"
        self.network = self.run_id
        self.workdir = tempfile.mkdtemp(prefix="aipod-pods-")
        self.hosts_file = os.path.join(self.workdir, "hosts")
        self.lock = threading.RLock()
        self.pods: list[Pod] = []
        self.services: list[ServiceProxy] = []
        self.service_addresses: dict[str, str] = {}  # "ns/name" → address
        self.pod_seq = itertools.count(1)
        self.volume_seq = itertools.count(1)
        self.config_maps: dict[tuple[str, str], dict[str, str]] = {}
        self.deployment_objects: dict[str, dict[str, Any]] = {}
        self.templates: dict[str, PodTemplate] = {}
        self.service_objects: list[dict[str, Any]] = []
        self.budgets: list[dict[str, Any]] = []
        self.stopping = False
        self.started = False
        self.api_address_bound = False
        # Deployments the controller leaves alone (no pod created or
        # deleted), as if the node had no room: a test's way to hold a state.
        self.paused: set[str] = set()
        self._validate(objects)
        self._pending = objects

    # -- the desired state ---------------------------------------------------

    @property
    def deployments(self) -> list[dict[str, Any]]:
        return list(self.deployment_objects.values())

    def _validate(self, objects: list[dict[str, Any]]) -> dict[str, PodTemplate]:
        """Checks everything in a render before anything of it is applied."""
        for o in objects:
            if o["kind"] not in self.KINDS:
                raise Unsupported(f"kind {o['kind']} ({o['metadata']['name']}) is not run by the test kubelet")
        templates = {o["metadata"]["name"]: pod_template(o) for o in objects if o["kind"] == "Deployment"}
        for o in objects:
            if o["kind"] == "NetworkPolicy":
                # Enforced by the network plugin, not a kubelet: checked to
                # select rendered pods by ports they have, not enforced here.
                self._check_network_policy(o, templates)
            elif o["kind"] == "PodDisruptionBudget":
                # Evictions are not simulated: a budget must protect pods.
                self._check_budget(o, templates)
        _require_images([c for t in templates.values() for c in t.containers])
        return templates

    @staticmethod
    def _check_network_policy(policy: dict[str, Any], templates: dict[str, PodTemplate]) -> None:
        name = policy["metadata"]["name"]
        want = policy["spec"]["podSelector"].get("matchLabels", {})
        selected = [t for t in templates.values() if want.items() <= t.labels.items()]
        if not selected:
            raise Unsupported(f"NetworkPolicy {name} selects no rendered pod ({want})")
        ports = {n for t in selected for n in t.container_ports}
        for rule in policy["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                if isinstance(p.get("port"), str) and p["port"] not in ports:
                    raise Unsupported(f"NetworkPolicy {name} admits port {p['port']!r}, which its pods do not name")

    @staticmethod
    def _check_budget(budget: dict[str, Any], templates: dict[str, PodTemplate]) -> None:
        name, spec = budget["metadata"]["name"], budget["spec"]
        _check_keys(spec, {"maxUnavailable", "minAvailable", "selector", "unhealthyPodEvictionPolicy"},
                    f"PodDisruptionBudget {name} spec")
        if ("maxUnavailable" in spec) == ("minAvailable" in spec):
            raise Unsupported(f"PodDisruptionBudget {name}: exactly one of maxUnavailable and minAvailable")
        want = spec["selector"].get("matchLabels", {})
        selected = [t.deployment for t in templates.values() if want.items() <= t.labels.items()
                    and t.namespace == budget["metadata"].get("namespace", "default")]
        if len(selected) != 1:
            raise Unsupported(f"PodDisruptionBudget {name} selects the pods of {selected}, not of one Deployment")

    def start(self) -> None:
        podman("network", "create", self.network)
        info = json.loads(podman("network", "inspect", self.network).stdout)[0]
        self.subnet = ipaddress.ip_network(info["subnets"][0]["subnet"])
        self.bridge = info["network_interface"]
        # Service addresses from the top of the pod subnet, like a ClusterIP range.
        self.free_addresses = [str(h) for h in reversed(list(self.subnet.hosts())[-64:])]
        # The `kubernetes` Service pods find the API server by: an address
        # nothing listens on (connections are refused at once).
        self.service_addresses["default/kubernetes"] = self.free_addresses.pop(0)
        self._write_hosts()
        objects, self._pending = self._pending, []
        self.apply(objects)
        threading.Thread(target=self._controller_loop, daemon=True).start()

    def apply(self, objects: list[dict[str, Any]]) -> None:
        """Takes a new render as the desired state: ConfigMaps are updated
        in the running pods' volumes, Deployments whose pod template
        changed roll, changed replicas scale, new objects are created and
        objects no longer rendered are deleted."""
        templates = self._validate(objects)
        with self.lock:
            new_maps = {
                (o["metadata"].get("namespace", "default"), o["metadata"]["name"]): o.get("data", {})
                for o in objects if o["kind"] == "ConfigMap"
            }
            changed_maps = {k for k, v in new_maps.items() if self.config_maps.get(k) != v}
            self.config_maps = new_maps
            for pod in self.pods:
                if pod.stopped.is_set():
                    continue
                for vol, cm in pod.template.config_maps.items():
                    if (pod.template.namespace, cm) in changed_maps:
                        self._write_config_map(os.path.join(pod.volumes_dir, vol), new_maps[(pod.template.namespace, cm)])
                        pod.events.append(f"ConfigMap {cm} updated in place")
            for key in changed_maps:
                if any(key == (p.template.namespace, cm) for p in self.pods for cm in p.template.config_maps.values()):
                    self.log(f"ConfigMap {key[1]} updated in the running pods")
            wanted = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
            for name, d in wanted.items():
                old = self.templates.get(name)
                if old is not None and old.raw != templates[name].raw:
                    self.log(f"Deployment {name}: pod template changed: rolling update")
                if old is None or old.raw != templates[name].raw:
                    self.templates[name] = templates[name]
                if name in self.deployment_objects:
                    before = int(self.deployment_objects[name]["spec"].get("replicas", 1))
                    after = int(d["spec"].get("replicas", 1))
                    if before != after:
                        self.log(f"Deployment {name}: scaled from {before} to {after}")
                self.deployment_objects[name] = d
            for name in set(self.deployment_objects) - set(wanted):
                self.log(f"Deployment {name} deleted")
                del self.deployment_objects[name]
            self.service_objects = [o for o in objects if o["kind"] == "Service"]
            self.budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
            self._allocate_services()
            if not self.started:
                # The first pods (their names resolve already): the network's
                # bridge exists once a container is on it, and then Service
                # addresses can be bound on the node.
                for name, d in self.deployment_objects.items():
                    for _ in range(int(d["spec"].get("replicas", 1))):
                        self.create_pod(name)
                self.started = True
            self._sync_services()

    def _allocate_services(self) -> None:
        """Addresses and DNS names for new Services (cluster DNS answers
        before kube-proxy has programmed anything)."""
        for o in self.service_objects:
            key = f"{o['metadata'].get('namespace', 'default')}/{o['metadata']['name']}"
            if key not in self.service_addresses:
                self.service_addresses[key] = self.free_addresses.pop(0)
        self._write_hosts()

    def _sync_services(self) -> None:
        """kube-proxy: each Service's address bound and proxied; those of
        Services gone released."""
        wanted = {f"{o['metadata'].get('namespace', 'default')}/{o['metadata']['name']}": o
                  for o in self.service_objects}
        for proxy in list(self.services):
            key = f"{proxy.namespace}/{proxy.name}"
            if key not in wanted:
                proxy.close()
                self.services.remove(proxy)
                address = self.service_addresses.pop(key)
                subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", self.bridge], capture_output=True)
                self.free_addresses.append(address)
        proxied = {f"{p.namespace}/{p.name}" for p in self.services}
        for key, svc in wanted.items():
            if key in proxied:
                continue
            address = self.service_addresses[key]
            self._pin_bridge_mac()
            subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", self.bridge], check=True)
            self.services.append(ServiceProxy(self, svc, address))
        if not self.api_address_bound:
            self._pin_bridge_mac()
            subprocess.run(["ip", "addr", "add", f"{self.service_addresses['default/kubernetes']}/32", "dev",
                            self.bridge], check=True)
            self.api_address_bound = True
        self._write_hosts()

    def _pin_bridge_mac(self) -> None:
        """Fixes the bridge's MAC address at its current value. A Linux
        bridge whose address was never set follows the lowest MAC of its
        ports, so a new pod's veth can change it — and every running pod
        then sends to the old address until its neighbour entry expires
        (15–45 s): a silent stall of the connections to the Service
        addresses on the bridge. (The CNI bridge plugin sets the address
        for the same reason.)"""
        sys_net = f"/sys/class/net/{self.bridge}"
        with open(f"{sys_net}/addr_assign_type") as f:
            if f.read().strip() == "3":  # NET_ADDR_SET: pinned already
                return
        with open(f"{sys_net}/address") as f:
            mac = f.read().strip()
        subprocess.run(["ip", "link", "set", "dev", self.bridge, "address", mac], check=True)

    def _write_hosts(self) -> None:
        """Cluster DNS as a hosts file every container mounts: rewritten in
        place (the same inode) so running containers see new Services."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        for key, address in sorted(self.service_addresses.items()):
            ns, n = key.split("/")
            lines.append(f"{address} {n} {n}.{ns} {n}.{ns}.svc {n}.{ns}.svc.cluster.local")
        with open(self.hosts_file, "a+") as f:
            f.seek(0)
            f.truncate()
            f.write("\n".join(lines) + "\n")
        os.chmod(self.hosts_file, 0o644)

    def _write_config_map(self, d: str, data: dict[str, str]) -> None:
        """A ConfigMap volume as the kubelet writes it: the files in a
        timestamped directory, `..data` pointing at it, and each key a link
        through `..data` — an update swaps `..data` atomically (a rename),
        so a reader sees the old files or the new ones, never a mix."""
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
        stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{next(self.volume_seq)}"
        os.makedirs(os.path.join(d, stamp))
        for key, value in data.items():
            path = os.path.join(d, stamp, key)
            with open(path, "w") as f:
                f.write(value)
            os.chmod(path, 0o644)
        os.chmod(os.path.join(d, stamp), 0o755)
        old = os.readlink(os.path.join(d, "..data")) if os.path.islink(os.path.join(d, "..data")) else None
        os.symlink(stamp, os.path.join(d, "..data_tmp"))
        os.replace(os.path.join(d, "..data_tmp"), os.path.join(d, "..data"))
        for entry in os.listdir(d):
            if not entry.startswith("..") and entry not in data:
                os.unlink(os.path.join(d, entry))
        for key in data:
            link = os.path.join(d, key)
            if not os.path.islink(link):
                os.symlink(os.path.join("..data", key), link)
        if old:
            shutil.rmtree(os.path.join(d, old), ignore_errors=True)

    # -- the Deployment controller -------------------------------------------

    def _controller_loop(self) -> None:
        while not self.stopping:
            with self.lock:
                names = set(self.deployment_objects) | {p.template.deployment for p in self.pods}
            for name in sorted(names):
                try:
                    self._sync_deployment(name)
                except Exception as e:  # noqa: BLE001 - the loop must go on; the test sees the events
                    self.log(f"Deployment {name}: controller error: {e!r}")
            time.sleep(0.2)

    def _sync_deployment(self, name: str) -> None:
        with self.lock:
            if self.stopping or name in self.paused:
                return
            d = self.deployment_objects.get(name)
            alive = [p for p in self.pods if p.template.deployment == name and not p.terminating
                     and not p.stopped.is_set()]
            if d is None:
                for p in alive:
                    self.delete_pod(p, replace=False)
                return
            template = self.templates[name]
            replicas = int(d["spec"].get("replicas", 1))
            new = [p for p in alive if p.template is template]
            old = [p for p in alive if p.template is not template]
            if not old:
                if len(new) < replicas:
                    for _ in range(replicas - len(new)):
                        self.create_pod(name)
                elif len(new) > replicas:
                    for p in deletion_order(new)[: len(new) - replicas]:
                        self.log(f"Deployment {name}: scale down removes {p.name}")
                        self.delete_pod(p, replace=False)
                return
            surge, unavailable = _surge_and_unavailable(d, replicas)
            room = replicas + surge - len(alive)
            for _ in range(max(0, min(room, replicas - len(new)))):
                self.create_pod(name)
            # Old pods go as long as enough pods stay ready; old pods that
            # are not ready may always go.
            removable = sum(p.ready for p in alive) - (replicas - unavailable)
            for p in deletion_order(old):
                if not p.ready:
                    self.delete_pod(p, replace=False)
                elif removable > 0 and len(alive) > replicas - unavailable:
                    removable -= 1
                    self.delete_pod(p, replace=False)
                    alive.remove(p)

    def rolled(self, deployment: str) -> bool:
        """Whether the Deployment runs only its current template, with its
        replicas ready (old pods may still be terminating)."""
        with self.lock:
            d = self.deployment_objects[deployment]
            template = self.templates[deployment]
            alive = [p for p in self.pods_of(deployment) if not p.terminating]
            return (all(p.template is template for p in alive)
                    and sum(p.ready for p in alive) >= int(d["spec"].get("replicas", 1)))

    def wait_rolled(self, deployment: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.rolled(deployment):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{deployment}: rollout not complete within {timeout}s: "
                                   f"{[(p.name, p.ready, p.terminating) for p in self.pods_of(deployment)]}")
            time.sleep(0.2)

    # -- queries -------------------------------------------------------------

    def service(self, name: str) -> ServiceProxy:
        return next(s for s in self.services if s.name == name)

    def pods_matching(self, namespace: str, selector: dict[str, str]) -> list[Pod]:
        with self.lock:
            return [
                p for p in self.pods
                if p.template.namespace == namespace and all(p.template.labels.get(k) == v for k, v in selector.items())
            ]

    def pods_of(self, deployment: str) -> list[Pod]:
        with self.lock:
            return [p for p in self.pods if p.template.deployment == deployment and not p.stopped.is_set()]

    # -- pods ----------------------------------------------------------------

    def create_pod(self, deployment: str) -> Pod:
        t = self.templates[deployment]
        name = f"{deployment}-{next(self.pod_seq)}"
        pod_id, volumes, vol_root = self._sandbox(t, name)
        containers: dict[str, str] = {}
        for c in t.containers:
            containers[c.name] = self._start(t, c, name, pod_id, volumes)
        infra = podman("pod", "inspect", "--format", "{{.InfraContainerID}}", pod_id).stdout.strip()
        ip = json.loads(podman("inspect", infra).stdout)[0]["NetworkSettings"]["Networks"][self.network]["IPAddress"]
        pod = Pod(name=name, template=t, pod_id=pod_id, containers=containers, ip=ip, volumes_dir=vol_root,
                  annotations=dict(t.annotations))
        with self.lock:
            self.pods.append(pod)
        for c in t.containers:
            threading.Thread(target=self._probe_loop, args=(pod, c), daemon=True).start()
        self.log(f"pod {name} created ({', '.join(c.image for c in t.containers)}, {ip})")
        return pod

    def _sandbox(self, t: PodTemplate, name: str) -> tuple[str, dict[str, str], str]:
        """The podman pod of a new pod and its volumes: (pod id, volume →
        host directory, the pod's directory)."""
        pod_id = f"{self.run_id}-{name}"
        vol_root = os.path.join(self.workdir, name)
        os.makedirs(vol_root)
        share = "ipc,net,uts,pid" if t.share_process_namespace else "ipc,net,uts"
        podman("pod", "create", "--name", pod_id, "--network", self.network, "--hostname", name, "--share", share)
        volumes: dict[str, str] = {}
        for vol, medium in t.empty_dirs.items():
            # As the kubelet makes an emptyDir: 0777, and with an fsGroup
            # owned by that group with the setgid bit. Memory → on tmpfs.
            base = "/dev/shm" if medium == "Memory" else vol_root
            d = tempfile.mkdtemp(prefix=f"{vol}-", dir=base)
            if t.fs_group is not None:
                os.chown(d, 0, t.fs_group)
                os.chmod(d, 0o2777)
            else:
                os.chmod(d, 0o777)
            volumes[vol] = d
        for vol, cm_name in t.config_maps.items():
            data = self.config_maps.get((t.namespace, cm_name))
            if data is None:
                raise Unsupported(f"ConfigMap {t.namespace}/{cm_name} (volume {vol}) was not rendered")
            d = os.path.join(vol_root, vol)
            self._write_config_map(d, data)
            volumes[vol] = d
        return pod_id, volumes, vol_root

    def _start(self, t: PodTemplate, c: ContainerTemplate, name: str, pod_id: str, volumes: dict[str, str]) -> str:
        """Starts one container of pod `name` (`podman run -d`); its id."""
        args = ["run", "-d", "--pod", pod_id, "--name", f"{pod_id}-{c.name}", "--pull",
                "never", *ULIMITS, "-v", f"{self.hosts_file}:/etc/hosts:ro", *c.run_args]
        fields = {"metadata.name": name, "metadata.namespace": t.namespace}
        for var, path in c.field_env:
            args += ["--env", f"{var}={fields[path]}"]
        if t.service_account_token:
            args += ["-v", f"{self._service_account(t.namespace)}:{SERVICE_ACCOUNT_DIR}:ro",
                     "--env", f"KUBERNETES_SERVICE_HOST={self.service_addresses['default/kubernetes']}",
                     "--env", "KUBERNETES_SERVICE_PORT=443"]
        for vol, path, read_only in c.mounts:
            args += ["-v", f"{volumes[vol]}:{path}:{'ro' if read_only else 'rw'}"]
        return podman(*args, c.image, *c.command).stdout.strip()

    def _service_account(self, namespace: str) -> str:
        """The token directory a kubelet mounts: a token, the cluster's CA
        (a self-signed certificate made once per cluster) and the pod's
        namespace. Nothing here accepts the token: there is no API server."""
        d = os.path.join(self.workdir, "serviceaccount", namespace)
        if not os.path.isdir(d):
            os.makedirs(d)
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", os.path.join(d, "ca.key"), "-out", os.path.join(d, "ca.crt"), "-subj", "/CN=kubernetes",
                 "-days", "2"],
                check=True, capture_output=True,
            )
            os.unlink(os.path.join(d, "ca.key"))
            with open(os.path.join(d, "token"), "w") as f:
                f.write(f"aipod-test-kubelet.{self.run_id}")
            with open(os.path.join(d, "namespace"), "w") as f:
                f.write(namespace)
            for entry in os.listdir(d):
                os.chmod(os.path.join(d, entry), 0o644)
            os.chmod(d, 0o755)
        return d

    def run_pod(self, obj: dict[str, Any], timeout: float = 300) -> "PodRun":
        """Runs a bare Pod to completion, as a kubelet runs a `helm test`
        hook with restartPolicy Never: each init container in turn, the next
        only after the last exited 0, then the containers together. The
        pod succeeded when every container it ran exited 0."""
        t = bare_pod_template(obj)
        _require_images([*t.init_containers, *t.containers])
        name = t.deployment
        pod_id, volumes, vol_root = self._sandbox(t, name)
        run = PodRun(name=name)
        deadline = time.monotonic() + timeout
        try:
            for c in t.init_containers:
                self._wait_for(run, c.name, self._start(t, c, name, pod_id, volumes), deadline)
                if run.exit_codes[c.name] != 0:
                    return run
            started = [(c.name, self._start(t, c, name, pod_id, volumes)) for c in t.containers]
            for cname, container in started:
                self._wait_for(run, cname, container, deadline)
            return run
        finally:
            # Gone, as `helm test` deletes the hook before its next run.
            podman("pod", "rm", "-f", "-t", "0", pod_id, check=False)
            shutil.rmtree(vol_root, ignore_errors=True)

    def _wait_for(self, run: "PodRun", name: str, container: str, deadline: float) -> None:
        """Waits for a container of `run` to exit (killed at the deadline)
        and records its exit code (-1: killed) and log."""
        try:
            waited = subprocess.run([*PODMAN, "wait", container], capture_output=True, text=True,
                                    timeout=max(1.0, deadline - time.monotonic()))
            run.exit_codes[name] = int(waited.stdout.strip() or -1)
        except subprocess.TimeoutExpired:
            podman("kill", container, check=False)
            run.exit_codes[name] = -1
        logs = podman("logs", container, check=False)
        run.logs[name] = logs.stdout + logs.stderr
        self.log(f"pod {run.name}: container {name} exited {run.exit_codes[name]}")

    def _probe_loop(self, pod: Pod, c: ContainerTemplate) -> None:
        """The kubelet's probe workers for one container."""
        startup = next((p for p in c.probes if p.kind == "startup"), None)
        others = [p for p in c.probes if p.kind != "startup"]
        started_at = time.monotonic()
        failures = {p.kind: 0 for p in c.probes}
        due = {p.kind: started_at + p.initial_delay for p in c.probes}
        started = startup is None
        if not any(p.kind == "readiness" for p in c.probes):
            pod.ready_containers.add(c.name)
        while not pod.stopped.is_set():
            now = time.monotonic()
            active = [startup] if (startup and not started) else others
            for probe in active:
                if now < due[probe.kind]:
                    continue
                due[probe.kind] = now + probe.period
                ok = probe.check(pod.ip)
                if pod.stopped.is_set():
                    return
                failures[probe.kind] = 0 if ok else failures[probe.kind] + 1
                if probe.kind == "startup" and ok:
                    started = True
                    pod.events.append(f"{c.name} started after {now - started_at:.1f}s")
                    for p in others:
                        due[p.kind] = time.monotonic() + p.initial_delay
                elif probe.kind == "readiness" and not pod.terminating:
                    # A terminating pod stays out of endpoints whatever it answers.
                    was = pod.ready
                    if ok:
                        pod.ready_containers.add(c.name)
                    elif failures["readiness"] >= probe.failure_threshold:
                        pod.ready_containers.discard(c.name)
                    if pod.ready != was:
                        self.log(f"pod {pod.name} {'ready' if pod.ready else 'not ready'} after "
                                 f"{now - pod.created:.1f}s")
                if probe.kind in ("startup", "liveness") and failures[probe.kind] >= probe.failure_threshold:
                    if not pod.terminating:
                        self.log(f"pod {pod.name}: {c.name} {probe.kind} probe failed {failures[probe.kind]} times: "
                                 "restart")
                        pod.events.append(f"{c.name} {probe.kind} probe failed: restarted")
                        pod.restarts += 1
                        pod.ready_containers.discard(c.name)
                        podman("restart", "-t", str(int(pod.template.grace)), pod.containers[c.name], check=False)
                        started = startup is None
                        failures = {p.kind: 0 for p in c.probes}
            time.sleep(0.2)

    def wait_ready(self, deployment: str, timeout: float = 60) -> list[Pod]:
        """Waits until the Deployment has its replicas ready on its current
        template, as a rollout does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                want = int(self.deployment_objects[deployment]["spec"].get("replicas", 1))
                template = self.templates[deployment]
                ready = [p for p in self.pods_of(deployment) if p.ready and p.template is template]
            if len(ready) >= want:
                return ready
            for p in self.pods_of(deployment):
                for container in p.containers.values():
                    state = podman("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
                    if state in ("exited", "stopped") and not p.terminating:
                        raise RuntimeError(f"pod {p.name} exited before it was ready:\n{p.log()}")
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.log()}" for p in self.pods_of(deployment))
        raise TimeoutError(f"{deployment}: not ready within {timeout}s\n{logs}")

    def delete_pod(self, pod: Pod, replace: bool = True) -> threading.Thread:
        """Deletes a pod as the API server and kubelet do: out of the
        Service endpoints at once, a replacement created (when `replace`:
        what the ReplicaSet does for a pod deleted by hand), then for each
        container at the same time its preStop hook (a sleep, or a GET that
        may take as long as it needs) and SIGTERM, and SIGKILL for whatever
        still runs at the end of ``terminationGracePeriodSeconds``. Returns
        the thread doing the kubelet's part."""
        pod.terminating = True
        pod.ready = False
        pod.events.append("deleted")
        if replace:
            self.create_pod(pod.template.deployment)
        start = time.monotonic()
        deadline = start + pod.template.grace

        def stop(c: ContainerTemplate) -> None:
            hook = c.pre_stop
            if hook and hook.sleep:
                time.sleep(min(hook.sleep, max(0.0, deadline - time.monotonic())))
            elif hook and hook.http:
                port, path = hook.http
                try:
                    with urllib.request.urlopen(f"http://{pod.ip}:{port}{path}",
                                                timeout=max(1.0, deadline - time.monotonic())) as r:
                        pod.events.append(f"{c.name} preStop GET {path}: HTTP {r.status}")
                except OSError as e:
                    pod.events.append(f"{c.name} preStop GET {path} failed: {e}")
            who = "" if len(pod.containers) == 1 else f" to {c.name}"
            pod.events.append(f"SIGTERM{who} after {time.monotonic() - start:.1f}s")
            podman("kill", "--signal", "TERM", pod.containers[c.name], check=False)

        def kill() -> None:
            hooks = [threading.Thread(target=stop, args=(c,), daemon=True) for c in pod.template.containers]
            for h in hooks:
                h.start()
            running = dict(pod.containers)
            def state(container: str) -> dict[str, Any] | None:
                # podman inspect can fail for a moment under load (seen once
                # in CI: an exit code lost as -1); only at teardown, when the
                # containers are removed, is a failure final.
                for _ in range(10):
                    r = podman("inspect", container, check=False)
                    if r.returncode == 0:
                        return json.loads(r.stdout)[0]["State"]
                    if self.stopping:
                        return None
                    time.sleep(0.2)
                pod.events.append(f"podman inspect {container} failed: {r.stderr.strip()[:200]}")
                return None

            while running and time.monotonic() < deadline and not self.stopping:
                for name, container in list(running.items()):
                    st = state(container)
                    if st is None or not st["Running"]:
                        pod.exit_codes[name] = int(st["ExitCode"]) if st else -1
                        del running[name]
                time.sleep(0.2)
            if self.stopping:
                pod.stopped.set()
                return
            if running:
                pod.events.append("SIGKILL at the end of the grace period")
                for name, container in running.items():
                    podman("kill", "--signal", "KILL", container, check=False)
                    podman("wait", container, check=False)
                    st = state(container)
                    pod.exit_codes[name] = int(st["ExitCode"]) if st else -1
            pod.events.append(f"exited {pod.exit_code} after {time.monotonic() - start:.1f}s")
            pod.stopped.set()
            self.log(f"pod {pod.name} stopped: {pod.events}")

        th = threading.Thread(target=kill, daemon=True)
        th.start()
        return th

    def close(self) -> None:
        self.stopping = True
        with self.lock:
            pods = list(self.pods)
        for p in pods:
            p.stopped.set()
            podman("pod", "rm", "-f", "-t", "0", p.pod_id, check=False)
        for s in self.services:
            s.close()
        for addr in self.service_addresses.values():
            subprocess.run(["ip", "addr", "del", f"{addr}/32", "dev", self.bridge], capture_output=True)
        podman("network", "rm", "-f", self.network, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


_CLUSTERS = itertools.count(1)
