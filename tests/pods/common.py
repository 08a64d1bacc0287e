"""What the pod tests share: where the binaries and images are, the test
nginx image, and small helpers (a log line with the time, the CLI).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

import yaml

import kubelet

ROOT = Path(__file__).resolve().parents[2]
DIST = Path(os.environ.get("AIPOD_DIST_DIR", ROOT / "target" / "dist"))
CLI = DIST / "aipod"
OPERATOR = DIST / "aipod-operator"
VERSION = next(
    line.split('"')[1]
    for line in (ROOT / "Cargo.toml").read_text().split("[workspace.package]")[1].splitlines()
    if line.startswith("version")
)
# The registry the manifests name; images are made available under it the
# way `kind load` / `k3d image import` do.
REGISTRY = "ghcr.io/aipod"
IMAGES = ["aipod-runtime", "aipod-operator", "aipod-python", "aipod-example-python-model"]
NGINX_IMAGE = "localhost/aipod-test-nginx:debian"
ROUTER_READ_TIMEOUT = "2s"
EXAMPLES = [ROOT / "examples" / "aipod.yaml", ROOT / "examples" / "aipod-python-model.yaml"]
GiB = 1 << 30
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# Images


def build_test_nginx_image() -> None:
    """An nginx image built here from Debian's nginx (the router's default
    image, nginxinc/nginx-unprivileged, cannot be pulled here): the binary and
    the libraries ldd names, user 101 as in nginx-unprivileged, error log on
    stderr, nothing writable."""
    if kubelet.podman("image", "exists", NGINX_IMAGE, check=False).returncode == 0:
        return
    nginx = "/usr/sbin/nginx"
    root = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip())
    libs = [
        part for line in subprocess.run(["ldd", nginx], capture_output=True, text=True, check=True).stdout.splitlines()
        for part in line.split() if part.startswith("/")
    ]
    for f in [nginx, *libs]:
        dst = root / f.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-L", f, str(dst)], check=True)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0::/:/sbin/nologin\nnginx:x:101:101::/:/sbin/nologin\n")
    (root / "etc/group").write_text("root:x:0:\nnginx:x:101:\n")
    (root / "etc/nsswitch.conf").write_text("hosts: files dns\n")
    (root / "var/log/nginx").mkdir(parents=True)
    (root / "var/log/nginx/error.log").symlink_to("/dev/stderr")
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run([*kubelet.PODMAN, "import", "-q", "-", NGINX_IMAGE], stdin=tar.stdout, check=True,
                   capture_output=True)
    tar.wait()
    subprocess.run(["rm", "-rf", str(root)], check=True)




def render(files: list[Path] = EXAMPLES) -> list[dict[str, Any]]:
    """What the operator makes of the AIPods in `files` (the examples)."""
    out = subprocess.run(
        [str(OPERATOR), "render", "--router-image", NGINX_IMAGE, "--router-read-timeout", ROUTER_READ_TIMEOUT,
         *map(str, files)],
        capture_output=True, text=True, check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def target(c: kubelet.Cluster) -> str:
    return f"http://127.0.0.1:{c.service('aipod-router-edge').local_port}"


def aipod(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=timeout)


def mixed_file(path: Path, size: int) -> str:
    """Alternating 1 MiB blocks of random bytes and log-like text (the
    benchmark's mixed payload); returns its sha256."""
    h = hashlib.sha256()
    text = b"".join(b"2026-11-27T08:00:%02d INFO call finished func=sha256 bytes=%d\n" % (i % 60, i * 7919)
                    for i in range(20000))[:MiB]
    with open(path, "wb") as f:
        for i in range(size // MiB):
            block = os.urandom(MiB) if i % 2 == 0 else text
            f.write(block)
            h.update(block)
    return h.hexdigest()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_cluster(
    objects: list[dict[str, Any]], expose: str | None = "aipod-router-edge"
) -> Iterator[kubelet.Cluster]:
    """`objects` running under the test kubelet, every Deployment ready and
    the Service `expose` (the `edge` router) reachable on a loopback port;
    each pod's events are logged and everything is removed at the end."""
    c = kubelet.Cluster(objects, log=log)
    try:
        started = time.monotonic()
        c.start()
        for d in c.deployments:
            c.wait_ready(d["metadata"]["name"], timeout=120)
        log(f"all deployments ready in {time.monotonic() - started:.1f}s")
        if expose:
            c.service(expose).expose_locally()
        yield c
    finally:
        for p in c.pods:
            if p.events:
                log(f"{p.name}: {p.events}")
        c.close()
