#!/usr/bin/env bash
# Writes the chart README's parameter table from values.yaml's `## @param`
# comments (@bitnami/readme-generator-for-helm, installed here from npm).
# With --check, writes into a copy and fails when the committed README
# differs: values.yaml changed and the table was not regenerated.
# AIPOD_CHART_DIR points it at another copy of the chart.
set -euo pipefail
cd "$(dirname "$0")"
chart="${AIPOD_CHART_DIR:-../../charts/aipod}"
[ -d node_modules/@bitnami/readme-generator-for-helm ] || npm ci --no-audit --no-fund --loglevel=error
if [ "${1:-}" = "--check" ]; then
  copy=$(mktemp)
  trap 'rm -f "$copy"' EXIT
  cp "$chart/README.md" "$copy"
  node node_modules/.bin/readme-generator --values "$chart/values.yaml" --readme "$copy" >/dev/null
  if ! diff -u "$chart/README.md" "$copy"; then
    echo "charts/aipod/README.md is out of date with values.yaml: run tests/chart/readme.sh" >&2
    exit 1
  fi
  echo "charts/aipod/README.md's parameter table matches values.yaml"
else
  node node_modules/.bin/readme-generator --values "$chart/values.yaml" --readme "$chart/README.md"
fi
