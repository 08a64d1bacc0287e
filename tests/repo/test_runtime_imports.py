"""The runtime's modules depend on each other one way: no module reaches
itself through its `crate::…` imports, and neither does a folder (a
folder counts with its face module: `engine.rs` and `engine/`). A loop like
the one issue 27 cut — the model API importing heartbeats, which imported
metrics, which imported the model registry — fails here, naming the
modules in it."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "runtime" / "src"


def module_of(path: Path) -> str:
    """`engine/call.rs` is `engine::call`; `engine.rs` is `engine`; deeper
    files belong to their second-level module (`server/service/header.rs`
    is `server::service`)."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return "::".join(parts[:2])


def expand(tree: str) -> list[str]:
    """The full paths of a use tree: `a::{b, c::{d, e}}` is `a::b`, `a::c::d`, `a::c::e`."""
    tree = re.sub(r"\s+", "", tree)
    if "{" not in tree:
        return [tree]
    head, _, rest = tree.partition("{")
    inner = rest[: rest.rindex("}")]
    items, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            items.append(inner[start:i])
            start = i + 1
    items.append(inner[start:])
    return [path for item in items if item for path in expand(head + item)]


def references(text: str) -> list[str]:
    """Every `crate::` path a file names outside its tests."""
    text = text.split("#[cfg(test)]")[0]
    paths = []
    for tree in re.findall(r"\buse\s+crate::([^;]*);", text):
        paths += expand(tree)
    text = re.sub(r"\buse\s+crate::[^;]*;", "", text)
    paths += re.findall(r"\bcrate::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)?)", text)
    return paths


def graph() -> dict[str, set[str]]:
    files = [p for p in SRC.rglob("*.rs") if p.name not in ("lib.rs", "main.rs")]
    modules = {module_of(p) for p in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for path in files:
        me = module_of(path)
        for ref in references(path.read_text()):
            parts = ref.split("::")
            target = "::".join(parts[:2]) if "::".join(parts[:2]) in modules else parts[0]
            if target in modules and target != me:
                edges[me].add(target)
    return edges


def folders(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    top = lambda m: m.split("::")[0]  # noqa: E731
    out: dict[str, set[str]] = {}
    for m, deps in edges.items():
        out.setdefault(top(m), set()).update(top(d) for d in deps if top(d) != top(m))
    return out


def loops(edges: dict[str, set[str]]) -> list[list[str]]:
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
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_of_the_runtime_reaches_itself():
    edges = graph()
    assert len(edges) > 30, f"found only {sorted(edges)} under {SRC}"
    assert loops(edges) == []


def test_no_folder_reaches_itself():
    tops = folders(graph())
    assert {"model", "versions", "engine", "server", "observe"} <= set(tops), sorted(tops)
    assert loops(tops) == []
    # The model API sits at the bottom: it imports none of the others.
    assert tops["model"] <= {"code", "error"}, tops["model"]


def test_a_loop_is_found():
    assert loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert loops({"a": {"b"}, "b": set()}) == []
    assert expand("a::{b, c::{d, e}}") == ["a::b", "a::c::d", "a::c::e"]
