"""MkDocs hook: links from docs/ to files elsewhere in the repository
(`../proto/ai.proto`, `../sdk/python/README.md`) become links to that file
on GitHub, so the site has no dead relative links — and a link to a file
that does not exist is a warning, which `--strict` turns into a failed build.

A page that is only `<!-- include: ../PATH.md -->` shows that repository
file (the Python client's README as the site's Python API page), its
relative links made relative to the page."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.repo_links")
LINK = re.compile(r"\]\((\.\./[^)#\s]+)(#[^)\s]*)?\)")
INCLUDE = re.compile(r"^<!-- include: (\S+) -->$", re.M)
RELATIVE = re.compile(r"\]\((?!https?:|#|mailto:)([^)#\s]+)(#[^)\s]*)?\)")


def include(markdown: str, page_dir: Path) -> str:
    """The page with each include marker replaced by that file, whose
    relative links are rewritten to go from the page's directory."""

    def one(m: re.Match[str]) -> str:
        source = Path(os.path.normpath(page_dir / m.group(1)))
        if not source.is_file():
            log.warning("an include names %s, which does not exist", m.group(1))
            return m.group(0)

        def relink(link: re.Match[str]) -> str:
            target = Path(os.path.normpath(source.parent / link.group(1)))
            return f"]({os.path.relpath(target, page_dir)}{link.group(2) or ''})"

        return RELATIVE.sub(relink, source.read_text())

    return INCLUDE.sub(one, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs = Path(os.path.abspath(config["docs_dir"]))
    repo = docs.parent
    base = config["repo_url"].rstrip("/") + "/blob/main/"
    markdown = include(markdown, docs / Path(page.file.src_path).parent)

    def rewrite(m: re.Match[str]) -> str:
        target = Path(os.path.normpath(docs / Path(page.file.src_path).parent / m.group(1)))
        if not target.is_relative_to(repo):
            log.warning("%s links outside the repository: %s", page.file.src_path, m.group(1))
            return m.group(0)
        if not target.exists():
            log.warning("%s links to %s, which does not exist", page.file.src_path, m.group(1))
            return m.group(0)
        return f"]({base}{target.relative_to(repo).as_posix()}{m.group(2) or ''})"

    return LINK.sub(rewrite, markdown)
