"""Rows per second of a seq-cls export on the CPU: ONNX Runtime against PyTorch, same inputs, same threads, and
whether they pick the same labels (issue 17, item 2).

The export is ``llmcls export RUN OUT --as seq-cls --onnx`` (a ``Qwen2ForSequenceClassification`` folder with
``model.onnx`` beside it). Its input is the run's chat prompt with the text inside (``llmcls.json``'s
``seq_cls.prompt_prefix`` / ``prompt_suffix``); the text is cut to ``--chars`` characters, about what the model
read in training::

    python benchmarks/onnx_speed.py --export OUT --data ../shared/data/fudan-news/test.jsonl --rows 64 \\
        --batch 1,8 --out docs/bench/onnx_speed-....json

Both runtimes get the same tokenised batches (right-padded: the classifier pools each row's last non-pad token),
one untimed warm-up batch each, then every row; the JSON holds rows/s per batch size, the label agreement, the
largest logit difference, the CPU and thread count, versions and the git commit.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from llmcls.env import cpu_model, environment
from llmcls.files import atomic_write_json


def texts(path: Path, rows: int, chars: int) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                out.append(json.loads(line)["text"][:chars])
            if len(out) == rows:
                break
    return out


def batches(tok, prompts: list[str], size: int):
    for i in range(0, len(prompts), size):
        enc = tok(prompts[i:i + size], padding=True, return_tensors="np", add_special_tokens=False)
        yield enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def timed(fn, tok, prompts: list[str], size: int):
    first = next(batches(tok, prompts[:size], size))
    fn(*first)  # warm-up: allocations, ONNX Runtime's first-run optimisations
    logits, t0 = [], time.perf_counter()
    for ids, mask in batches(tok, prompts, size):
        logits.append(fn(ids, mask))
    return np.concatenate(logits), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True, help="A seq-cls export folder with model.onnx.")
    ap.add_argument("--data", required=True, help="A jsonl file with a 'text' field (the first --rows rows).")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--chars", type=int, default=500, help="Characters of each text put into the prompt.")
    ap.add_argument("--batch", default="1,8", help="Batch sizes, comma-separated.")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="Threads for both runtimes.")
    ap.add_argument("--out", required=True, help="The JSON to write.")
    a = ap.parse_args()

    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    export = Path(a.export)
    meta = json.loads((export / "llmcls.json").read_text())["seq_cls"]
    tok = AutoTokenizer.from_pretrained(export)
    tok.padding_side = "right"
    prompts = [meta["prompt_prefix"] + t + meta["prompt_suffix"] for t in texts(Path(a.data), a.rows, a.chars)]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]

    torch.set_num_threads(a.threads)
    model = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32).eval()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    session = ort.InferenceSession(str(export / (meta.get("onnx") or "model.onnx")), opts,
                                   providers=["CPUExecutionProvider"])

    @torch.inference_mode()
    def run_torch(ids, mask):
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.float().numpy()

    def run_ort(ids, mask):
        return session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]

    runs = {}
    for size in [int(b) for b in a.batch.split(",")]:
        pt, pt_s = timed(run_torch, tok, prompts, size)
        ox, ox_s = timed(run_ort, tok, prompts, size)
        runs[f"batch_{size}"] = {
            "torch_rows_per_s": round(len(prompts) / pt_s, 2), "onnxruntime_rows_per_s": round(len(prompts) / ox_s, 2),
            "onnxruntime_over_torch": round(pt_s / ox_s, 3),
            "same_labels": float(np.mean(pt.argmax(-1) == ox.argmax(-1))),
            "max_abs_logit_diff": float(np.abs(pt - ox).max())}
        print(f"batch {size}: torch {runs[f'batch_{size}']['torch_rows_per_s']} rows/s, onnxruntime "
              f"{runs[f'batch_{size}']['onnxruntime_rows_per_s']} rows/s, same labels "
              f"{runs[f'batch_{size}']['same_labels']:.3f}", flush=True)
    res = {"export": str(export), "model_type": model.config.model_type,
           "params": sum(p.numel() for p in model.parameters()), "labels": model.config.num_labels,
           "rows": len(prompts), "chars": a.chars, "prompt_tokens": {"mean": float(np.mean(lengths)),
                                                                        "max": int(max(lengths))},
           "cpu": {"name": cpu_model(), "threads": a.threads, "count": os.cpu_count()},
           "onnxruntime": ort.__version__, "runs": runs, "environment": environment()}
    atomic_write_json(Path(a.out), res)
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
