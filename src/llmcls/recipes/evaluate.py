"""Stage 5 recipe — ``llmcls eval``: classify the whole test file with a trained run and compute metrics.

Writes ``RUN/eval/metrics.json`` (accuracy, macro-F1, per-class precision/recall/F1, confusion matrix, invalid
rate, throughput) and ``RUN/eval/predictions.jsonl`` (row index, truth, prediction, per-candidate probability).
A multi-label run writes the multi-label figures instead (micro/macro-F1, subset accuracy, Hamming loss, per-label
P/R/F1) and each row's ``truth`` and predicted ``labels`` lists (docs/MULTILABEL.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from llmcls import dist
from llmcls.config import Config, ConfigError, to_dict
from llmcls.data import read_rows
from llmcls.env import environment
from llmcls.files import write_results
from llmcls.infer import classify_with, record
from llmcls.metrics import compute_metrics, multilabel_metrics
from llmcls.multilabel import refuse_multi
from llmcls.rundir import RunDir, model_for_run
from llmcls.warmup import compile_delta, compile_stats, process_age
from llmcls.windows import settings

log = logging.getLogger(__name__)


def warn_unseen_labels(rows, trained: list[str] | None, path) -> list[str]:
    """True labels of the test rows that no training row had: the model can only guess them, which the metrics
    alone do not say."""
    unseen = sorted({t for r in rows for t in r.true_labels} - set(trained)) if trained else []
    if unseen:
        log.warning("%s: true labels never seen in training: %s", path, ", ".join(map(repr, unseen)))
    return unseen


def samples_for_tracker(rows, records: list[dict], n: int) -> list[dict]:
    """Up to n sample predictions, half wrong and half right where possible (the tutorial printed 10)."""
    wrong = [i for i, r in enumerate(records) if r["correct"] is False][: (n + 1) // 2]
    right = [i for i, r in enumerate(records) if r["correct"]][: n - len(wrong)]
    return [{"text": rows[i].text, "truth": records[i]["truth"], "pred": records[i]["pred"],
             "correct": records[i]["correct"]} for i in sorted(wrong + right)]


def evaluate(run_dir: str | Path, cfg: Optional[Config] = None, model=None, tokenizer=None, progress: bool = True,
             tracker=None, weights: str = "selected", loaded: Optional[dict] = None) -> dict:
    """Classify ``data.test_file`` (first ``data.max_eval_rows`` rows) as ``eval.*`` says. ``cfg`` is the run's
    config with the caller's overrides (default: the run's own); ``model``/``tokenizer`` an already loaded pair
    (default: :func:`llmcls.rundir.load_trained`). ``weights``: the run's own (``selected``, calibrated where the
    run has a calibration; written to RUN/eval), the last step's (``last``, RUN/eval-last) or the base model's
    (``base``: zero-shot, same prompt; RUN/zero-shot). ``loaded``: how the caller's ``model`` came to be,
    ``{"start_s": process age when loading began, "load_s": seconds}``, for the warm-up split."""
    run = RunDir(run_dir)
    loaded = dict(loaded or {"start_s": process_age(), "load_s": 0.0})
    t = time.perf_counter()
    model, tokenizer, cfg = model_for_run(run.path, cfg, model, tokenizer, weights=weights)
    loaded["load_s"] += time.perf_counter() - t  # a model loaded here; compile_layers only wraps the layers
    calibration = run.load_calibration() if weights == "selected" else None
    lexical = run.load_lexical() if weights != "base" else None  # zero-shot: the LLM alone
    if not cfg.data.test_file:
        raise ValueError("no test file: set data.test_file in the config or pass --data.test_file FILE")
    method = cfg.eval.method
    rows, invalid = read_rows(cfg.data.test_file, cfg.data, limit=cfg.data.max_eval_rows)
    warn_unseen_labels(rows, run.labels(), cfg.data.test_file)
    if run.multi_label:
        return _evaluate_multi(run, cfg, model, tokenizer, rows, invalid, progress, tracker, weights, loaded)
    refuse_multi(rows, cfg.data.test_file, cfg.data.output_field)

    # Under torchrun every process classifies a share of the rows; each gets all predictions back.
    preds, wall, warmup = _timed(loaded, classify_with, cfg, model, tokenizer, rows, progress=progress,
                                 desc=f"eval ({method}, {weights})", calibration=calibration, lexical=lexical,
                                 shortlist=cfg.eval.shortlist if lexical else 0)

    labels = sorted({r.label for r in rows})
    metrics = compute_metrics([r.label for r in rows], [p.pred for p in preds], labels)
    records = [record(r, p, with_truth=True) for r, p in zip(rows, preds)]
    metrics.update(_how_it_ran(cfg, method, rows, invalid, wall, weights))
    metrics["warmup"] = warmup
    if settings(cfg).active:  # how long texts were read: the figures depend on it
        metrics["long_text"] = vars(settings(cfg))
    if method == "score":
        metrics["calibration"] = probability_quality(rows, preds, calibration)
    if not _write(run, weights, records, metrics):
        return metrics

    if tracker is not None and weights == "selected":
        tracker.log({"eval/accuracy": metrics["accuracy"], "eval/macro_f1": metrics["macro_f1"],
                     "eval/invalid_rate": metrics["invalid_rate"],
                     **{f"eval/{k}": v for k, v in (metrics.get("calibration") or {}).get("after", {}).items()
                        if k in ("ece", "brier", "nll")}})
        tracker.log_samples(samples_for_tracker(rows, records, cfg.eval.log_samples))
        tracker.log_eval_details(metrics)
    return metrics


def _evaluate_multi(run: RunDir, cfg: Config, model, tokenizer, rows, invalid, progress, tracker, weights,
                    loaded: dict) -> dict:
    """:func:`evaluate` for a multi-label run: every candidate over its label's threshold (RUN/thresholds.json)."""
    from llmcls.multilabel import default_thresholds, predicted_sets
    from llmcls.multilabel import record as multi_record

    if cfg.eval.method != "score":
        raise ConfigError("a multi-label run is evaluated by scoring every candidate: eval.method must be score")
    # Thresholds were chosen for the run's own weights, as a calibration is.
    thresholds = run.load_thresholds(cfg) if weights == "selected" else default_thresholds(cfg)
    preds, wall, warmup = _timed(loaded, classify_with, cfg, model, tokenizer, rows, progress=progress,
                                 desc=f"eval (multi-label, {weights})")
    sets = predicted_sets(rows, preds, thresholds)
    metrics = multilabel_metrics([r.true_labels for r in rows], sets,
                                 sorted({t for r in rows for t in r.true_labels}))
    records = [multi_record(r, p, s, with_truth=True) for r, p, s in zip(rows, preds, sets)]
    metrics.update({
        "multi_label": True, "accuracy": metrics["subset_accuracy"], "invalid": 0, "invalid_rate": 0.0,
        "thresholds": {"default": thresholds.default, "per_label": thresholds.per_label,
                       "at_least_one": thresholds.at_least_one, "from_dev": thresholds.fitted_on_rows > 0},
        **_how_it_ran(cfg, "score", rows, invalid, wall, weights), "warmup": warmup,
    })
    if not _write(run, weights, records, metrics):
        return metrics
    if tracker is not None and weights == "selected":
        tracker.log({f"eval/{k}": metrics[k] for k in ("micro_f1", "macro_f1", "subset_accuracy", "hamming_loss")})
    return metrics


def _timed(loaded: dict, classify, *args, **kwargs):
    """``classify(*args, **kwargs)`` timed: (predictions, wall seconds, the warm-up split). The split (``warmup`` in
    metrics.json): ``start_s`` the process's age when loading began (for ``llmcls eval``: the interpreter and the
    imports), ``load_s`` the model and tokenizer, ``first_batch_s`` from the start of classification to the first
    batch's scores back on the host (prompt preparation and all compilation of its shapes included), ``rest_s``
    the other batches, ``compile`` what compiling took over the whole classification (seconds, graphs, cache hits;
    a compile after the first batch shows as a recompile)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timing: dict = {}
    before = compile_stats()
    t0 = time.perf_counter()
    preds = classify(*args, timing=timing, **kwargs)
    end, age = time.perf_counter(), process_age()
    first = timing.get("first_batch_at", end) - t0
    warmup = {"start_s": round(loaded["start_s"], 3), "load_s": round(loaded["load_s"], 3),
              "first_batch_s": round(first, 3), "rest_s": round(end - t0 - first, 3),
              "to_first_batch_s": round(age - (end - t0 - first), 3),  # from the process's start
              "compile": compile_delta(before)}
    return preds, end - t0, warmup


def _write(run: RunDir, weights: str, records: list[dict], metrics: dict) -> bool:
    """predictions.jsonl and metrics.json of these weights, by the main process (False elsewhere)."""
    if not dist.is_main():
        return False
    out = run.results(weights)
    write_results(out.predictions, records, out.metrics, metrics)  # both or neither
    return True


def _how_it_ran(cfg: Config, method: str, rows, invalid, wall: float, weights: str) -> dict:
    """What every metrics.json records beside the metrics: the file, the speed, the memory, the environment."""
    return {"method": method, "test_file": str(cfg.data.test_file), "skipped_invalid_rows": len(invalid),
            "wall_s": round(wall, 3), "rows_per_s": round(len(rows) / wall, 2) if wall > 0 else None,
            "peak_mem_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available()
                             else None),
            "processes": dist.world_size(), "weights": weights, "environment": environment()}


def probability_quality(rows, preds, calibration) -> dict:
    """How far the probabilities can be trusted, on the test rows: ECE (15 bins), Brier and NLL before and after
    the run's calibration, the area under the risk-coverage curve, and what abstaining below the run's threshold
    gives (the share of rows answered and their accuracy)."""
    from llmcls.calibration import risk_coverage, summary

    cands, truth = [r.candidates for r in rows], [r.label for r in rows]
    # a candidate left out by the shortlist has probability 0
    raw = [[(p.raw_probs or p.probs).get(c, 0.0) for c in r.candidates] for r, p in zip(rows, preds)]
    cal = [[p.probs.get(c, 0.0) for c in r.candidates] for r, p in zip(rows, preds)]
    conf = [p.confidence for p in preds]
    correct = [p.pred == r.label for r, p in zip(rows, preds)]
    out = {"method": calibration.method if calibration else "none",
           "temperature": calibration.temperature if calibration else None,
           "before": summary(raw, cands, truth), "after": summary(cal, cands, truth),
           "aurc": risk_coverage(conf, correct).aurc}
    if calibration is not None and calibration.threshold is not None:
        answered = [c for c, p in zip(correct, preds) if not p.abstain]
        out["abstention"] = {"threshold": calibration.threshold, "target_precision": calibration.target_precision,
                             "answered": len(answered), "coverage": len(answered) / max(len(rows), 1),
                             "precision": sum(answered) / len(answered) if answered else None}
    return out


def eval_tracker(run_dir: str | Path, cfg: Config):
    """A tracker for ``llmcls eval``: continues the SwanLab run that training started in this run directory."""
    from llmcls.reporting.track import Tracker

    return Tracker(cfg.track, run_dir, to_dict(cfg), is_main=dist.is_main(), resume=True)
