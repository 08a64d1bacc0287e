"""The image names a user meets agree with the version this repository builds:
the Dockerfiles' default base images, the chart, and the example AIPods all
name `VERSION` = the workspace version (what `.ci/images` tags)."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
VERSION = re.search(r'\[workspace\.package\][^\[]*?\nversion = "([^"]+)"', (ROOT / "Cargo.toml").read_text()).group(1)


def test_the_chart_ships_the_workspace_version():
    chart = yaml.safe_load((ROOT / "charts/aipod/Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION
    values = yaml.safe_load((ROOT / "charts/aipod/values.yaml").read_text())
    assert values["registry"] == "ghcr.io/aipod"
    assert values["image"]["repository"] == "aipod-operator" and values["runtimeImage"]["repository"] == "aipod-runtime"


def test_dockerfile_defaults_name_this_version():
    pinned = {
        "sdk/python/Dockerfile": "ARG RUNTIME_IMAGE=ghcr.io/aipod/aipod-runtime:",
        "examples/python-model/Dockerfile": "ARG AIPOD_PYTHON_IMAGE=ghcr.io/aipod/aipod-python:",
    }
    for path, prefix in pinned.items():
        (line,) = [l for l in (ROOT / path).read_text().splitlines() if l.startswith(prefix)]
        assert line == prefix + VERSION, f"{path}: {line}"


def test_example_aipods_name_images_this_repository_builds():
    built = {"aipod-runtime", "aipod-python", "aipod-example-python-model"}
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(example.read_text()):
            image = doc["spec"].get("image")
            if image is None or not image.startswith("ghcr.io/aipod/"):
                continue  # the operator's default, or a user's own image
            name, tag = image.removeprefix("ghcr.io/aipod/").split(":")
            assert name in built and tag == VERSION, f"{example.name}: {image}"
