"""``train.cuda_graphs`` on a real small model (issue 16, item 3: the real 0.5B at the tutorial's 16 rows per step):
the fast config as shipped against the same config with ``train.cuda_graphs: true``, one after the other in one
process, on the same files, dev split, steps and seed.

For each: train tokens/s in steady state (the real tokens, padding not counted), the whole run's wall seconds, the
warm-up split (to the first step done; with graphs the whole decoder stack compiles and each padded length is
recorded), peak memory, and test accuracy and macro-F1 of the last step (graphs must not change what is learned).
The runs share the process, so the second inherits nothing compiled from the first (different compile units) but
does inherit the warm interpreter; run ``--variants graphs`` again in a fresh process for the graphs' start with a
filled compile cache.

On the GPU machine (the model from ``../shared/tools/real-qwen.sh hf``)::

    PYTHONUNBUFFERED=1 python benchmarks/cuda_graphs_real.py --model DIR --data DIR --out OUT [--variants plain,graphs]

writes ``OUT/cuda_graphs_real.json`` and ``.md``. ``--model tiny`` smoke-tests the plain variant on a CPU (graphs
need a GPU).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from llmcls.env import environment
from llmcls.files import atomic_write_json, atomic_write_text
# A sibling module: ``python benchmarks/cuda_graphs_real.py`` puts this folder on sys.path, as it does any script's.
from seqcls_vs_generative import FAST, header, one_mode, run_overrides

VARIANTS = {"plain": {}, "graphs": {"train.cuda_graphs": True}}
KEYS = [("accuracy", "test accuracy"), ("macro_f1", "test macro-F1"),
        ("train_tokens_per_s_steady", "train tokens/s (steady)"), ("train_wall_s", "train wall s"),
        ("to_first_step_s", "to the first step done, s"), ("peak_mem_gib", "train peak GiB"),
        ("eval_rows_per_s", "eval rows/s (warm)")]


def say(msg: str) -> None:
    print(f"[cuda_graphs_real {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def table(res: dict) -> str:
    names = list(res["variants"])
    lines = ["| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for k, label in KEYS:
        vals = [res["variants"][n].get(k) for n in names]
        lines.append(f"| {label} | " + " | ".join("" if v is None else str(v) for v in vals) + " |")
    return header(res) + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face folder of the pretrained chat model, or 'tiny'.")
    p.add_argument("--data", required=True, help="Folder with train.jsonl and test.jsonl.")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=str(FAST))
    p.add_argument("--workdir", default="/tmp/llmcls-graphs-bench")
    p.add_argument("--variants", default="plain,graphs", help="Comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--rows", type=int, default=None, help="Only the first N training rows and N test rows.")
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}")
    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = run_overrides(a.model, data, a.max_steps, a.rows)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    res = {"model": a.model, "data": str(data), "config": a.config, "overrides": common, "device": device,
           "variants": {}, "environment": environment()}
    for name in names:
        say(f"{name}: {VARIANTS[name] or 'the config as shipped'}")
        args = copy.copy(a)
        args.workdir = str(Path(a.workdir) / name)
        r = one_mode("generate", args, {**common, **VARIANTS[name]}, {})
        r["to_first_step_s"] = (r.get("warmup") or {}).get("to_first_step_s")
        res["variants"][name] = r
        atomic_write_json(out / "cuda_graphs_real.json", res)  # each variant kept as soon as it is done
        say(f"{name}: {r['train_tokens_per_s_steady']} tokens/s steady, accuracy {r['accuracy']:.4f}")
    md = table(res)
    atomic_write_text(out / "cuda_graphs_real.md", md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
