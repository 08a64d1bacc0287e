"""Every Python test file in the repository runs somewhere: in a folder of
pytest.ini's `testpaths` (what `.ci/test` runs), or in a folder run apart
by a named CI script. A new test folder nobody adds fails here instead of
silently never running."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Folders of tests run by a CI script of their own, not by `.ci/test`.
APART = {"tests/pods": ".ci/pods"}

SKIP_DIRS = {".git", ".venv", ".venv-checkov", "node_modules", "target", "__pycache__", ".pytest_cache"}


def configured_paths() -> list[str]:
    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    return ini["pytest"]["testpaths"].split()


def python_test_files() -> list[Path]:
    found = []
    stack = [ROOT]
    while stack:
        folder = stack.pop()
        for entry in folder.iterdir():
            if entry.is_dir() and entry.name not in SKIP_DIRS and not entry.name.startswith("."):
                stack.append(entry)
            elif entry.is_file() and entry.suffix == ".py" and (entry.name.startswith("test_") or entry.stem.endswith("_test")):
                found.append(entry.relative_to(ROOT))
    return found


def test_every_test_file_is_in_a_test_path_or_run_apart():
    paths = configured_paths()
    for path in paths:
        assert (ROOT / path).is_dir(), f"pytest.ini names {path}, which is not a folder"
    for folder, script in APART.items():
        assert folder in (ROOT / script).read_text(), f"{script} no longer runs {folder}"
    homes = [*paths, *APART]
    stray = [str(f) for f in python_test_files() if not any(f.is_relative_to(h) for h in homes)]
    assert not stray, f"test files no CI step runs (add their folder to pytest.ini's testpaths): {stray}"


def test_the_ci_runs_pytest_on_its_test_paths():
    ci = (ROOT / ".ci" / "test").read_text()
    line = next(l for l in ci.splitlines() if "-m pytest" in l)
    assert not any(path in line for path in configured_paths()), "`.ci/test` lists folders again; pytest.ini is the one list"
