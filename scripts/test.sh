#!/usr/bin/env bash
# Sets up a virtual environment with everything the tests need, then runs them.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first, pinned: here it is a CPU build on local disk; an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
"${PIP[@]}" -e '.[test]'
# The local SwanLab dashboard is optional: its test skips with a reason when this extra cannot be installed.
"${PIP[@]}" -e '.[dashboard]' || echo "note: swanlab[dashboard] not installable; the dashboard test will skip"
# Debian's Chromium renders the report in the browser test (playwright drives it; its own browser download is
# not used).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
exec .venv/bin/python -m pytest -q "$@"
