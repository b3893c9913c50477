#!/usr/bin/env bash
# Issue 15's lever table on the real 0.5B model: several real_accuracy.py runs side by side on one GPU (a 0.5B model
# keeps an H200 ~10% busy, so four runs take little longer than one). Each run: the fast config + issue 14's
# trusted-classifier settings + the hybrid (eval.hybrid: its eval gives the hybrid and, from the same predictions,
# the LLM alone) + its own lever. Results: OUT/NAME/real_accuracy.json, run-files.tar.gz, weights/ (LoRA).
#
#   bash benchmarks/real_levers.sh MODEL_DIR DATA_DIR OUT NAME="KEY=VALUE ..." [NAME="..."]...
set -uo pipefail
model=$1 data=$2 out=$3; shift 3
common="eval.compile=false eval.hybrid=true baseline.text=same"
pids=()
for spec in "$@"; do
  name=${spec%%=*} sets=${spec#*=}
  mkdir -p "$out/$name"
  # shellcheck disable=SC2086
  python3 benchmarks/real_accuracy.py run --model "$model" --data "$data" --out "$out/$name" \
    --workdir "/tmp/levers/$name" --keep-weights --set $common $sets >"$out/$name/log.txt" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
