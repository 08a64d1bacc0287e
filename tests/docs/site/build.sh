#!/usr/bin/env bash
# Builds the documentation site (mkdocs.yml: docs/ with the Material theme)
# into DIR (default: site/ at the repository root), warnings as errors — a
# broken link or anchor fails. Mermaid, which draws the diagrams, comes from
# npm and is served with the site (no CDN). MkDocs comes from
# .ci/requirements.txt (.venv). The Rust API reference (rustdoc of the aipod
# crate, warnings as errors) is served with it under rustdoc/. Extra
# arguments go to `mkdocs build`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="$(realpath -m "${1:-$root/site}")"
[ $# -gt 0 ] && shift
(cd "$here" && { [ -d node_modules/mermaid ] || npm ci --no-audit --no-fund --loglevel=error; })
mkdir -p "$root/docs/assets/javascripts"
cp "$here/node_modules/mermaid/dist/mermaid.min.js" "$root/docs/assets/javascripts/mermaid.min.js"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --no-deps --locked -p aipod
rm -rf docs/rustdoc
cp -r "$target/doc" docs/rustdoc
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir "$out" "$@"
