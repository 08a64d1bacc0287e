"""Fixtures every pod test shares: the images, built by `.ci/images` and
made available under the registry the manifests name (as `kind load`
would)."""

from __future__ import annotations

import pytest

import kubelet
from common import IMAGES, REGISTRY, VERSION, build_test_nginx_image


@pytest.fixture(scope="session")
def images() -> None:
    for name in IMAGES:
        local = f"localhost/{name}:{VERSION}"
        if kubelet.podman("image", "exists", local, check=False).returncode != 0:
            pytest.fail(f"{local} is not built: run .ci/images first")
        kubelet.podman("tag", local, f"{REGISTRY}/{name}:{VERSION}")
    build_test_nginx_image()
