"""A one-node Kubernetes stand-in that runs what ``aipod-operator render``
prints, container by container, the way a kubelet would.

No API server can run here, so this module plays the parts of the cluster
that touch a pod:

- the **kubelet**: each Deployment's pod template becomes a ``podman run``
  with its image, command, args, env, ports, user/group/fsGroup, read-only
  root, dropped capabilities, no-new-privileges, emptyDir and configMap
  volumes and resource limits; startup, readiness and liveness probes run
  with the rendered periods and thresholds; deletion runs the preStop sleep,
  then SIGTERM, then SIGKILL after ``terminationGracePeriodSeconds``;
- the **Deployment controller**: it keeps ``spec.replicas`` pods;
- NetworkPolicies are not enforced (the network plugin's job): each must
  select rendered pods and admit only ports they name;
- **kube-proxy and cluster DNS**: every Service gets a stable address on the
  pod network (an extra address on the network's bridge) and a TCP proxy that
  sends each new connection to a ready, non-terminating pod the Service
  selects; every pod resolves ``NAME``, ``NAME.NS``, ``NAME.NS.svc`` and
  ``NAME.NS.svc.cluster.local`` to it (hosts entries), so generated configs
  are used unmodified. A Service can also be reached from the test on a
  loopback port (as ``kubectl port-forward`` would).

A pod template field this module does not know how to honour raises
:class:`Unsupported` naming it: nothing is silently dropped.
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
class PodTemplate:
    """A Deployment's pod template, translated to podman terms once."""

    deployment: str
    namespace: str
    labels: dict[str, str]
    image: str
    run_args: list[str]  # podman run options
    command: list[str]
    probes: list[Probe]
    pre_stop_sleep: float
    grace: float
    empty_dirs: dict[str, tuple[str, str]]  # volume name → (mount path, medium)
    config_maps: dict[str, tuple[str, str]]  # volume name → (mount path, ConfigMap name)
    fs_group: int | None
    container_ports: dict[str, int]
    memory_limit: int | None


@dataclass
class Pod:
    """A running pod: one container on the pod network."""

    name: str
    template: PodTemplate
    container: str
    ip: str
    volumes_dir: str
    ready: bool = False
    started: bool = False
    terminating: bool = False
    stopped: threading.Event = field(default_factory=threading.Event)
    restarts: int = 0
    exit_code: int | None = None
    events: list[str] = field(default_factory=list)

    def log(self) -> str:
        r = podman("logs", self.container, check=False)
        return r.stdout + r.stderr

    def memory_peak_bytes(self) -> int:
        """The container's memory high-water mark from its cgroup (v1 or v2)."""
        cgroup = podman("inspect", "--format", "{{.State.CgroupPath}}", self.container).stdout.strip()
        for path in (f"/sys/fs/cgroup/memory{cgroup}/memory.max_usage_in_bytes",
                     f"/sys/fs/cgroup{cgroup}/memory.peak"):
            if os.path.exists(path):
                with open(path) as f:
                    return int(f.read())
        raise RuntimeError(f"no memory high-water mark for cgroup {cgroup}")

    def cgroup_memory_limit(self) -> int:
        cgroup = podman("inspect", "--format", "{{.State.CgroupPath}}", self.container).stdout.strip()
        for path in (f"/sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes", f"/sys/fs/cgroup{cgroup}/memory.max"):
            if os.path.exists(path):
                with open(path) as f:
                    return int(f.read())
        raise RuntimeError(f"no memory limit for cgroup {cgroup}")


def pod_template(deployment: dict[str, Any]) -> PodTemplate:
    """Translates a rendered Deployment's pod template; raises Unsupported
    for anything it cannot honour."""
    meta = deployment["metadata"]
    name, ns = meta["name"], meta.get("namespace", "default")
    where = f"Deployment {ns}/{name} spec"
    dspec = deployment["spec"]
    _check_keys(dspec, {"replicas", "selector", "strategy", "template", "revisionHistoryLimit"}, where)
    tmpl = dspec["template"]
    _check_keys(tmpl.get("metadata", {}), {"labels", "annotations"}, f"{where}.template.metadata")
    pod = tmpl["spec"]
    where = f"{where}.template.spec"
    _check_keys(
        pod,
        {"containers", "terminationGracePeriodSeconds", "automountServiceAccountToken", "securityContext",
         "volumes"},
        where,
    )
    if pod.get("automountServiceAccountToken", True):
        raise Unsupported(f"{where}.automountServiceAccountToken must be false: there is no API server here")
    if len(pod["containers"]) != 1:
        raise Unsupported(f"{where}.containers: exactly one container is supported")

    run: list[str] = []
    psc = pod.get("securityContext", {})
    _check_keys(psc, {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"}, f"{where}.securityContext")
    if psc.get("seccompProfile", {"type": "RuntimeDefault"}) != {"type": "RuntimeDefault"}:
        raise Unsupported(f"{where}.securityContext.seccompProfile other than RuntimeDefault")
    fs_group = psc.get("fsGroup")

    c = pod["containers"][0]
    cwhere = f"{where}.containers[{c['name']}]"
    _check_keys(
        c,
        {"name", "image", "imagePullPolicy", "command", "args", "env", "ports", "readinessProbe", "livenessProbe",
         "startupProbe", "lifecycle", "resources", "securityContext", "volumeMounts"},
        cwhere,
    )
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
    if fs_group is not None:
        run += ["--group-add", str(fs_group)]
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

    for var in c.get("env", []):
        _check_keys(var, {"name", "value"}, f"{cwhere}.env[{var.get('name')}]")
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

    pre_stop = 0.0
    lifecycle = c.get("lifecycle", {})
    _check_keys(lifecycle, {"preStop"}, f"{cwhere}.lifecycle")
    if "preStop" in lifecycle:
        _check_keys(lifecycle["preStop"], {"sleep"}, f"{cwhere}.lifecycle.preStop")
        pre_stop = float(lifecycle["preStop"]["sleep"]["seconds"])

    empty_dirs: dict[str, tuple[str, str]] = {}
    config_maps: dict[str, tuple[str, str]] = {}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        _check_keys(m, {"name", "mountPath", "readOnly"}, f"{cwhere}.volumeMounts")
        v = volumes.get(m["name"])
        if v is None:
            raise Unsupported(f"{cwhere}.volumeMounts[{m['name']}] names no volume")
        _check_keys(v, {"name", "emptyDir", "configMap"}, f"{where}.volumes[{m['name']}]")
        if "emptyDir" in v:
            ed = v["emptyDir"] or {}
            _check_keys(ed, {"medium"}, f"{where}.volumes[{m['name']}].emptyDir")
            if m.get("readOnly"):
                raise Unsupported(f"{cwhere}.volumeMounts[{m['name']}].readOnly on an emptyDir")
            empty_dirs[m["name"]] = (m["mountPath"], ed.get("medium", ""))
        else:
            cm = v["configMap"]
            _check_keys(cm, {"name"}, f"{where}.volumes[{m['name']}].configMap")
            config_maps[m["name"]] = (m["mountPath"], cm["name"])

    command = [*c.get("command", []), *c.get("args", [])]
    if c.get("command"):
        run += ["--entrypoint", json.dumps(c["command"])]
        command = list(c.get("args", []))
    return PodTemplate(
        deployment=name,
        namespace=ns,
        labels=dict(tmpl["metadata"]["labels"]),
        image=c["image"],
        run_args=run,
        command=command,
        probes=probes,
        pre_stop_sleep=pre_stop,
        grace=float(pod.get("terminationGracePeriodSeconds", 30)),
        empty_dirs=empty_dirs,
        config_maps=config_maps,
        fs_group=fs_group,
        container_ports=ports,
        memory_limit=memory_limit,
    )


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
            s.close()


# ---------------------------------------------------------------------------
# The cluster


class Cluster:
    """Runs rendered objects: Deployments as pods, Services as proxies,
    ConfigMaps as volume contents."""

    def __init__(self, objects: list[dict[str, Any]], log: Callable[[str], None] = print):
        self.log = log
        self.run_id = f"aipod-pods-{os.getpid()}"
        self.network = self.run_id
        self.workdir = tempfile.mkdtemp(prefix="aipod-pods-")
        self.lock = threading.RLock()
        self.pods: list[Pod] = []
        self.services: list[ServiceProxy] = []
        self.service_addresses: list[str] = []
        self.pod_seq = itertools.count(1)
        self.config_maps = {
            (o["metadata"].get("namespace", "default"), o["metadata"]["name"]): o.get("data", {})
            for o in objects if o["kind"] == "ConfigMap"
        }
        self.deployments = [o for o in objects if o["kind"] == "Deployment"]
        self.templates = {d["metadata"]["name"]: pod_template(d) for d in self.deployments}
        self.service_objects = [o for o in objects if o["kind"] == "Service"]
        for o in objects:
            if o["kind"] == "NetworkPolicy":
                # Enforced by the network plugin, not a kubelet: checked to
                # select rendered pods by ports they have (the schema suite
                # validates the rest), not enforced here.
                self._check_network_policy(o)
            elif o["kind"] not in {"Deployment", "Service", "ConfigMap"}:
                raise Unsupported(f"kind {o['kind']} ({o['metadata']['name']}) is not run by the test kubelet")
        for t in self.templates.values():
            if podman("image", "exists", t.image, check=False).returncode != 0:
                raise RuntimeError(f"image {t.image} is not built: run .ci/images first")
        self.stopping = False

    # -- network and services ------------------------------------------------


    def _check_network_policy(self, policy: dict[str, Any]) -> None:
        name = policy["metadata"]["name"]
        want = policy["spec"]["podSelector"].get("matchLabels", {})
        selected = [d for d in self.deployments
                    if want.items() <= d["spec"]["template"]["metadata"].get("labels", {}).items()]
        if not selected:
            raise Unsupported(f"NetworkPolicy {name} selects no rendered pod ({want})")
        ports = {p["name"] for d in selected for c in d["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", []) if "name" in p}
        for rule in policy["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                if isinstance(p.get("port"), str) and p["port"] not in ports:
                    raise Unsupported(f"NetworkPolicy {name} admits port {p['port']!r}, which its pods do not name")
    def start(self) -> None:
        podman("network", "create", self.network)
        info = json.loads(podman("network", "inspect", self.network).stdout)[0]
        subnet = ipaddress.ip_network(info["subnets"][0]["subnet"])
        self.bridge = info["network_interface"]
        # Service addresses from the top of the pod subnet, like a ClusterIP range.
        hosts = list(subnet.hosts())
        self.hosts_entries = []
        for i, svc in enumerate(self.service_objects):
            addr = str(hosts[-1 - i])
            self.service_addresses.append(addr)
            n, ns = svc["metadata"]["name"], svc["metadata"].get("namespace", "default")
            for alias in (n, f"{n}.{ns}", f"{n}.{ns}.svc", f"{n}.{ns}.svc.cluster.local"):
                self.hosts_entries += ["--add-host", f"{alias}:{addr}"]
        for d in self.deployments:
            for _ in range(int(d["spec"].get("replicas", 1))):
                self.create_pod(d["metadata"]["name"])
        # The bridge exists once a container is on the network: now the
        # Service addresses can be bound on the node.
        for svc, addr in zip(self.service_objects, self.service_addresses):
            subprocess.run(["ip", "addr", "add", f"{addr}/32", "dev", self.bridge], check=True)
            self.services.append(ServiceProxy(self, svc, addr))

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
        vol_root = os.path.join(self.workdir, name)
        os.makedirs(vol_root)
        args = ["run", "-d", "--name", f"{self.run_id}-{name}", "--hostname", name, "--network", self.network,
                "--pull", "never", *ULIMITS, *self.hosts_entries, *t.run_args]
        for vol, (path, medium) in t.empty_dirs.items():
            # As the kubelet makes an emptyDir: 0777, and with an fsGroup
            # owned by that group with the setgid bit. Memory → on tmpfs.
            base = "/dev/shm" if medium == "Memory" else vol_root
            d = tempfile.mkdtemp(prefix=f"{vol}-", dir=base)
            if t.fs_group is not None:
                os.chown(d, 0, t.fs_group)
                os.chmod(d, 0o2777)
            else:
                os.chmod(d, 0o777)
            args += ["-v", f"{d}:{path}:rw"]
        for vol, (path, cm_name) in t.config_maps.items():
            data = self.config_maps.get((t.namespace, cm_name))
            if data is None:
                raise Unsupported(f"ConfigMap {t.namespace}/{cm_name} (volume {vol}) was not rendered")
            d = os.path.join(vol_root, vol)
            os.makedirs(d)
            for key, value in data.items():
                with open(os.path.join(d, key), "w") as f:
                    f.write(value)
            os.chmod(d, 0o755)
            args += ["-v", f"{d}:{path}:ro"]
        args += [t.image, *t.command]
        container = podman(*args).stdout.strip()
        ip = json.loads(podman("inspect", container).stdout)[0]["NetworkSettings"]["Networks"][self.network][
            "IPAddress"]
        pod = Pod(name=name, template=t, container=container, ip=ip, volumes_dir=vol_root)
        with self.lock:
            self.pods.append(pod)
        threading.Thread(target=self._probe_loop, args=(pod,), daemon=True).start()
        self.log(f"pod {name} created ({t.image}, {ip})")
        return pod

    def _probe_loop(self, pod: Pod) -> None:
        """The kubelet's probe workers for one pod."""
        t = pod.template
        startup = next((p for p in t.probes if p.kind == "startup"), None)
        others = [p for p in t.probes if p.kind != "startup"]
        started_at = time.monotonic()
        failures = {p.kind: 0 for p in t.probes}
        due = {p.kind: started_at + p.initial_delay for p in t.probes}
        pod.started = startup is None
        if not t.probes:
            pod.ready = True
        while not pod.stopped.is_set():
            now = time.monotonic()
            active = [startup] if (startup and not pod.started) else others
            for probe in active:
                if now < due[probe.kind]:
                    continue
                due[probe.kind] = now + probe.period
                ok = probe.check(pod.ip)
                if pod.stopped.is_set():
                    return
                failures[probe.kind] = 0 if ok else failures[probe.kind] + 1
                if probe.kind == "startup" and ok:
                    pod.started = True
                    pod.events.append(f"started after {now - started_at:.1f}s")
                    for p in others:
                        due[p.kind] = time.monotonic() + p.initial_delay
                elif probe.kind == "readiness" and not pod.terminating:
                    # A terminating pod stays out of endpoints whatever it answers.
                    if ok and not pod.ready:
                        pod.ready = True
                        self.log(f"pod {pod.name} ready after {now - started_at:.1f}s")
                    elif not ok and failures["readiness"] >= probe.failure_threshold and pod.ready:
                        pod.ready = False
                        self.log(f"pod {pod.name} not ready")
                if probe.kind in ("startup", "liveness") and failures[probe.kind] >= probe.failure_threshold:
                    if not pod.terminating:
                        self.log(f"pod {pod.name}: {probe.kind} probe failed {failures[probe.kind]} times: restart")
                        pod.events.append(f"{probe.kind} probe failed: restarted")
                        pod.restarts += 1
                        pod.ready = False
                        podman("restart", "-t", str(int(t.grace)), pod.container, check=False)
                        pod.started = startup is None
                        failures = {p.kind: 0 for p in t.probes}
            time.sleep(0.2)

    def wait_ready(self, deployment: str, timeout: float = 60) -> list[Pod]:
        """Waits until the Deployment has its replicas ready, as a rollout does."""
        want = int(next(d for d in self.deployments if d["metadata"]["name"] == deployment)["spec"].get("replicas", 1))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = [p for p in self.pods_of(deployment) if p.ready and not p.terminating]
            if len(ready) >= want:
                return ready
            for p in self.pods_of(deployment):
                state = podman("inspect", "--format", "{{.State.Status}}", p.container, check=False).stdout.strip()
                if state in ("exited", "stopped"):
                    raise RuntimeError(f"pod {p.name} exited before it was ready:\n{p.log()}")
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.log()}" for p in self.pods_of(deployment))
        raise TimeoutError(f"{deployment}: not ready within {timeout}s\n{logs}")

    def delete_pod(self, pod: Pod, replace: bool = True) -> threading.Thread:
        """Deletes a pod as the API server and kubelet do: out of the
        Service endpoints at once, a replacement created (when `replace`),
        then the preStop sleep, SIGTERM, and SIGKILL at the end of the grace
        period. Returns the thread doing the kubelet's part."""
        pod.terminating = True
        pod.ready = False
        pod.events.append("deleted")
        if replace:
            self.create_pod(pod.template.deployment)

        def kill() -> None:
            t = pod.template
            start = time.monotonic()
            time.sleep(t.pre_stop_sleep)
            pod.events.append(f"SIGTERM after {time.monotonic() - start:.1f}s")
            podman("kill", "--signal", "TERM", pod.container, check=False)
            # The grace period counts from deletion, preStop included.
            remaining = max(0.0, t.grace - (time.monotonic() - start))
            try:
                podman("wait", pod.container, check=False, timeout=remaining)
            except subprocess.TimeoutExpired:
                pass  # still running when the grace period ends
            state = json.loads(podman("inspect", pod.container).stdout)[0]["State"]
            if state["Running"]:
                pod.events.append("SIGKILL at the end of the grace period")
                podman("kill", "--signal", "KILL", pod.container, check=False)
                podman("wait", pod.container, check=False)
                state = json.loads(podman("inspect", pod.container).stdout)[0]["State"]
            pod.exit_code = int(state["ExitCode"])
            pod.events.append(f"exited {pod.exit_code} after {time.monotonic() - start:.1f}s")
            pod.stopped.set()
            self.log(f"pod {pod.name} stopped: {pod.events}")

        th = threading.Thread(target=kill, daemon=True)
        th.start()
        return th

    def close(self) -> None:
        for p in list(self.pods):
            p.stopped.set()
            podman("rm", "-f", "-t", "0", p.container, check=False)
        for s in self.services:
            s.close()
        for addr in self.service_addresses:
            subprocess.run(["ip", "addr", "del", f"{addr}/32", "dev", self.bridge], capture_output=True)
        podman("network", "rm", "-f", self.network, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)
