"""Stage 5 recipe — ``llmcls eval``: classify the whole test file with a trained run and compute metrics.

Writes ``RUN/eval/metrics.json`` (accuracy, macro-F1, per-class precision/recall/F1, confusion matrix, invalid
rate, throughput) and ``RUN/eval/predictions.jsonl`` (row index, truth, prediction, per-candidate probability).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from llmcls import dist
from llmcls.config import Config
from llmcls.data import read_rows
from llmcls.encode import PromptBuilder
from llmcls.env import environment
from llmcls.infer import Prediction
from llmcls.io import atomic_write_json, atomic_write_jsonl

INVALID = "<invalid>"


def compute_metrics(truth: Sequence[str], pred: Sequence[Optional[str]], labels: Optional[list[str]] = None) -> dict:
    """Accuracy, macro-F1 over the true classes, per-class P/R/F1 and the confusion matrix (scikit-learn).
    An invalid prediction (None) counts as wrong and gets its own confusion-matrix column."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y_pred = [p if p is not None else INVALID for p in pred]
    classes = labels or sorted(set(truth) | {p for p in y_pred if p != INVALID})
    p, r, f, s = precision_recall_fscore_support(truth, y_pred, labels=classes, zero_division=0)
    cm_labels = classes + ([INVALID] if INVALID in y_pred else [])
    return {
        "rows": len(truth),
        "accuracy": float(accuracy_score(truth, y_pred)),
        "macro_f1": float(f1_score(truth, y_pred, labels=classes, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(truth, y_pred, labels=classes, average="weighted", zero_division=0)),
        "invalid": sum(x == INVALID for x in y_pred),
        "invalid_rate": sum(x == INVALID for x in y_pred) / max(len(y_pred), 1),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": {"labels": cm_labels,
                             "matrix": confusion_matrix(truth, y_pred, labels=cm_labels).tolist()},
    }


def prediction_records(rows, preds: Sequence[Prediction]) -> list[dict]:
    out = []
    for r, p in zip(rows, preds):
        rec = {"index": p.index, "line": r.line, "truth": r.label, "pred": p.pred,
               "correct": p.pred == r.label if r.label is not None else None}
        if p.probs is not None:
            rec["probs"] = {k: round(v, 6) for k, v in p.probs.items()}
            rec["confidence"] = round(max(p.probs.values()), 6)
        if p.raw is not None:
            rec["raw"] = p.raw
        out.append(rec)
    return out


def samples_for_tracker(rows, records: list[dict], n: int) -> list[dict]:
    """Up to n sample predictions, half wrong and half right where possible (the tutorial printed 10)."""
    wrong = [i for i, r in enumerate(records) if r["correct"] is False][: (n + 1) // 2]
    right = [i for i, r in enumerate(records) if r["correct"]][: n - len(wrong)]
    return [{"text": rows[i].text, "truth": records[i]["truth"], "pred": records[i]["pred"],
             "correct": records[i]["correct"]} for i in sorted(wrong + right)]


def evaluate(run_dir: str | Path, test_file: Optional[str] = None, method: Optional[str] = None,
             batch_size: Optional[int] = None, max_rows: Optional[int] = None, progress: bool = True,
             model_and_tokenizer=None, tracker=None) -> dict:
    from llmcls.model import model_for_run

    run = Path(run_dir)
    model, tok, cfg = model_for_run(run, model_and_tokenizer)
    test_file = test_file or cfg.data.test_file
    if not test_file:
        raise ValueError("no test file: set data.test_file in the config or pass --test FILE")
    method = method or cfg.eval.method
    rows, invalid = read_rows(test_file, cfg.data, limit=max_rows or cfg.data.max_eval_rows)
    builder = PromptBuilder(tok, cfg.prompt)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    # Under torchrun every process classifies a share of the rows; each gets all predictions back.
    preds = dist.classify(model, builder, rows, method=method, batch_size=batch_size or cfg.eval.batch_size,
                          max_new_tokens=cfg.eval.max_new_tokens, max_length=cfg.data.max_length,
                          progress=progress, desc=f"eval ({method})")
    wall = time.perf_counter() - t0

    labels = sorted({r.label for r in rows})
    metrics = compute_metrics([r.label for r in rows], [p.pred for p in preds], labels)
    records = prediction_records(rows, preds)
    metrics.update({
        "method": method, "test_file": str(test_file), "skipped_invalid_rows": len(invalid),
        "wall_s": round(wall, 3), "rows_per_s": round(len(rows) / wall, 2) if wall > 0 else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        "processes": dist.world_size(),
        "environment": environment(),
    })
    if not dist.is_main():
        return metrics
    out = run / "eval"
    atomic_write_jsonl(out / "predictions.jsonl", records)
    atomic_write_json(out / "metrics.json", metrics)

    if tracker is not None:
        tracker.log({"eval/accuracy": metrics["accuracy"], "eval/macro_f1": metrics["macro_f1"],
                     "eval/invalid_rate": metrics["invalid_rate"]})
        tracker.log_samples(samples_for_tracker(rows, records, cfg.eval.log_samples))
        tracker.log_eval_details(metrics)
    return metrics


def eval_tracker(run_dir: str | Path, cfg: Config):
    """A tracker for ``llmcls eval``: continues the SwanLab run that training started in this run directory."""
    from llmcls.config import to_dict
    from llmcls.track import Tracker

    return Tracker(cfg.track, run_dir, to_dict(cfg), is_main=dist.is_main(), resume=True)
