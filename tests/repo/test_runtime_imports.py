"""The runtime's modules depend on each other one way: no module reaches
itself through its `use crate::…` imports (a folder counts as its face
module). A loop like the one issue 27 cut — the model API importing
heartbeats, which imported metrics, which imported the model registry —
fails here, naming the modules in it."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "runtime" / "src"


def module_files() -> dict[str, list[Path]]:
    """Each top-level module and its files (its folder's included)."""
    mods = {}
    for path in SRC.glob("*.rs"):
        if path.stem in ("lib", "main"):
            continue
        mods[path.stem] = [path, *sorted((SRC / path.stem).rglob("*.rs"))]
    for folder in SRC.iterdir():
        if folder.is_dir() and (folder / "mod.rs").exists():
            mods[folder.name] = sorted(folder.rglob("*.rs"))
    return mods


def imports(mods: dict[str, list[Path]]) -> dict[str, set[str]]:
    graph = {}
    for name, files in mods.items():
        deps = set()
        for path in files:
            text = path.read_text().split("#[cfg(test)]")[0]
            for block in re.findall(r"use crate::\{([^;]*)\};", text, re.S):
                deps.update(re.findall(r"(?:^|[\s,{])([a-z_]+)(?=::|\s*,|\s*\}|$)", block))
            deps.update(re.findall(r"crate::([a-z_]+)", text))
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_runtime_has_no_import_loop():
    mods = module_files()
    assert len(mods) > 20, f"found only {sorted(mods)} under {SRC}"
    assert loops(imports(mods)) == []


def test_a_loop_is_found():
    assert loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert loops({"a": {"b"}, "b": set()}) == []
