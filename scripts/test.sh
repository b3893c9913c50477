#!/usr/bin/env bash
# Sets up a virtual environment with everything the tests need, then runs them.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# The installs below are skipped when this environment already holds them for the same pyproject.toml and torch pin
# (CI calls this script once per test tier; pip's own "already satisfied" pass costs ~20 s on 2 cores).
STAMP=".venv/.llmcls-installed"
WANT="$(cat pyproject.toml scripts/test.sh | sha256sum | cut -c1-16) torch==${TORCH_VERSION:-2.13.0}"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  rm -f "$STAMP"
  # torch first, pinned: here it is a CPU build on local disk; an unpinned torch would pull a multi-GB CUDA build.
  "${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
  "${PIP[@]}" -e '.[test]'
  # The local SwanLab dashboard is optional: its test skips with a reason when this extra cannot be installed.
  "${PIP[@]}" -e '.[dashboard]' || echo "note: swanlab[dashboard] not installable; the dashboard test will skip"
  echo "$WANT" > "$STAMP"
fi
# Debian's Chromium renders the report in the browser test (playwright drives it; its own browser download is
# not used).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# Two pytest-xdist workers, one thread each: on CI's 2 cores the tiers took 5:40 and 5:05 against 7:22 and
# 8:50 in one process (torch's ops on these tiny models are short, so Python, not arithmetic, fills most of a test).
# LLMCLS_TEST_WORKERS=0 runs everything in this process (pytest-xdist's -n 0).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -n "${LLMCLS_TEST_WORKERS:-2}" "$@"
