"""The documentation site (mkdocs.yml: docs/ with MkDocs' Material theme),
built as `tests/docs/site/build.sh` builds it — warnings as errors, so a
broken link or anchor fails — and opened in a real browser (Debian's
headless Chromium): each page has its title and navigation, and the browser
console stays clean (the diagrams' Mermaid is served with the site)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "tests" / "docs" / "site" / "build.sh"
MKDOCS = ROOT / ".venv" / "bin" / "mkdocs"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([str(BUILD), str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the site did not build:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return out


def test_the_site_builds_with_every_section(site: Path) -> None:
    for page in ("index.html", "tutorial/index.html", "concepts/index.html", "api/index.html",
                 "protocol/index.html", "security/index.html"):
        assert (site / page).is_file(), page
    # Links to repository files became links to them on GitHub.
    protocol = (site / "protocol" / "index.html").read_text()
    assert "https://github.com/aipod/aipod/blob/main/proto/ai.proto" in protocol
    # The client APIs: the Python README included as a page (its links to
    # docs/ now links within the site), the CLI reference, the rustdoc.
    python = (site / "python" / "index.html").read_text()
    assert "client.call(func" in python and 'href="../observability/#traces"' in python
    assert "aipod health" in (site / "cli" / "index.html").read_text()
    assert "Client" in (site / "rustdoc" / "aipod" / "index.html").read_text()


@pytest.mark.parametrize("broken", [
    "[a page that is not there](no-such-page.md)",
    "[an anchor that is not there](concepts.md#no-such-section)",
    "[a repository file that is not there](../proto/no-such.proto)",
])
def test_a_broken_link_fails_the_build(tmp_path: Path, broken: str) -> None:
    # A copy of the repository's top level (docs/ copied, the rest linked),
    # with one broken link added to the tutorial.
    for entry in ROOT.iterdir():
        if entry.name in ("docs", ".git", "site") or entry.name.startswith(".venv"):
            continue
        (tmp_path / entry.name).symlink_to(entry)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    tutorial = tmp_path / "docs" / "tutorial.md"
    tutorial.write_text(tutorial.read_text() + f"\nSee {broken}.\n")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run([str(MKDOCS), "build", "--strict", "-f", str(tmp_path / "mkdocs.yml"),
                        "--site-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0, f"built despite {broken}:\n{r.stderr[-2000:]}"
    assert "tutorial.md" in r.stderr, r.stderr[-2000:]


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Chromium is needed (.ci/test installs Debian's chromium)"
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=8000", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("page,title", [
    ("tutorial", "Tutorial - aipod"),
    ("api", "AIPod API - aipod"),
    ("concepts", "Concepts - aipod"),
    ("cli", "CLI reference - aipod"),
])
def test_pages_render_in_a_real_browser_with_a_clean_console(site: Path, page: str, title: str) -> None:
    r = chromium("--dump-dom", (site / page / "index.html").as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"<title>{title}</title>" in r.stdout
    # The navigation: every section, with links to the other pages.
    for nav in ("Tutorial", "Concepts", "Reference", "Operations", "AIPod API"):
        assert nav in r.stdout, f"{page}: no {nav!r} in the navigation"
    assert 'class="md-nav' in r.stdout
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, f"{page}: the browser console reported:\n" + "\n".join(console)


def test_a_screenshot_of_the_tutorial_is_taken(site: Path, tmp_path: Path) -> None:
    shot = tmp_path / "tutorial.png"
    r = chromium("--window-size=1280,900", f"--screenshot={shot}", (site / "tutorial" / "index.html").as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
