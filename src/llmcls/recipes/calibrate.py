"""Recipe — ``llmcls calibrate``: probabilities that mean what they say, and a threshold to abstain.

Fits temperature scaling (or vector scaling) on the dev set's candidate log-likelihoods, by minimising the
negative log-likelihood of the true labels (``llmcls.calibration``, L-BFGS), and, given a target precision, the
lowest confidence threshold whose answered dev rows reach it. Writes ``RUN/calibration.json``; eval, predict, serve
and export use it from then on. Training calls :func:`fit_and_save` with the dev predictions it already has;
``llmcls calibrate RUN`` scores the dev set again with the run's weights (to change the method or the target).

A multi-label run gets per-label thresholds instead (``llmcls.multilabel``, ``RUN/thresholds.json``): its
probabilities share each row's mass among several true labels, which a single-truth temperature fit would misread.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

from llmcls.calibration import (Calibration, UnreachablePrecision, confidences, fit_temperature,
                                fit_vector_scaling, summary)
from llmcls.config import Config, ConfigError, check_calibration
from llmcls.data import Row, read_rows, source_exists
from llmcls.files import atomic_write_json
from llmcls.rundir import RunDir

log = logging.getLogger(__name__)


def fit(cfg: Config, rows: Sequence[Row], logliks: Sequence[Sequence[float]],
        candidates: Optional[Sequence[Sequence[str]]] = None,
        lexical: Optional[Sequence[Sequence[float]]] = None) -> tuple[Calibration, dict]:
    """The calibration ``calibration.*`` asks for, fitted on ``rows`` and their candidates' log-likelihoods
    (``candidates``: those scored, where a shortlist cut them; default the rows'), and the dev figures before and
    after (accuracy, NLL, Brier, ECE). With ``eval.hybrid``, ``lexical`` holds each candidate's TF-IDF score and
    its weight is fitted too."""
    cands, truth = list(candidates or [r.candidates for r in rows]), [r.label for r in rows]
    if cfg.eval.hybrid and lexical is None:
        raise ValueError("eval.hybrid: the dev rows' TF-IDF scores are needed to fit the hybrid's weight")
    lexical = lexical if cfg.eval.hybrid else None
    if cfg.calibration.method == "vector":
        cal = fit_vector_scaling(logliks, cands, truth, sorted(set(truth)),
                                 min_rows_per_label=cfg.calibration.min_rows_per_label, lexical=lexical)
    else:
        cal = fit_temperature(logliks, cands, truth, lexical=lexical)
    raw = Calibration().probs(logliks, cands)
    probs = cal.probs(logliks, cands, lexical)
    report = {"dev_rows": len(rows), "before": summary(raw, cands, truth), "after": summary(probs, cands, truth)}
    target = cfg.calibration.target_precision
    if target is not None:
        conf, correct = confidences(probs, cands, truth)
        try:
            cal = cal.with_threshold(conf, correct, target)
        except UnreachablePrecision as e:
            log.warning("no abstention threshold: %s", e)
            report["threshold_error"] = str(e)
    return cal, report


def fit_thresholds_and_save(run: RunDir, cfg: Config, rows: Sequence[Row], preds: Optional[list]) -> Optional[dict]:
    """A multi-label run: per-label thresholds chosen on dev predictions, written to ``RUN/thresholds.json``."""
    from llmcls.multilabel import fit_on

    if preds is None:
        log.warning("no dev predictions of the selected weights in memory (a resumed run): run 'llmcls calibrate "
                    "%s' to choose the thresholds", run.path)
        return None
    if not all(math.isfinite(x) for p in preds for x in p.logliks):
        log.warning("the dev scores are not finite (a diverged model?): no thresholds chosen")
        return None
    th = fit_on(rows, preds, cfg)
    out = th.to_dict()
    atomic_write_json(run.thresholds, out)
    log.info("thresholds on %d dev rows: %d labels their own, the others %.4f (dev micro-F1 %.4f)", len(rows),
             len(th.per_label), th.default, th.default_dev_micro_f1)
    return out


def fit_and_save(run: RunDir, cfg: Config, rows: Sequence[Row], preds: Optional[list]) -> Optional[dict]:
    """Fit on dev predictions (:class:`llmcls.infer.Prediction`, with their log-likelihoods) and write
    ``RUN/calibration.json`` (a multi-label run: ``RUN/thresholds.json``); returns what was written (None when
    there was nothing to fit on)."""
    if run.multi_label:
        return fit_thresholds_and_save(run, cfg, rows, preds)
    if preds is None or cfg.calibration.method == "none":
        if preds is None:
            log.warning("no dev predictions of the selected weights in memory (a resumed run): run "
                        "'llmcls calibrate %s' to fit the calibration", run.path)
        return None
    logliks = [p.logliks for p in preds]
    if not all(math.isfinite(x) for ll in logliks for x in ll):
        log.warning("the dev scores are not finite (a diverged model?): no calibration fitted")
        return None
    cal, report = fit(cfg, rows, logliks, [p.candidates or r.candidates for r, p in zip(rows, preds)],
                      [p.lexical for p in preds] if cfg.eval.hybrid else None)
    out = {**cal.to_dict(), "report": report}
    atomic_write_json(run.calibration, out)
    b, a = report["before"], report["after"]
    log.info("calibration (%s, T=%.3f) on %d dev rows: ECE %.4f -> %.4f, NLL %.4f -> %.4f%s", cal.method,
             cal.temperature, len(rows), b["ece"], a["ece"], b["nll"], a["nll"],
             f", abstain below {cal.threshold:.4f} (dev coverage {cal.coverage:.1%})" if cal.threshold else "")
    return out


def calibrate(run_dir: str | Path, cfg: Optional[Config] = None, model=None, tokenizer=None,
              progress: bool = True) -> dict:
    """Score the run's dev set with its weights, fit ``calibration.*`` and write ``RUN/calibration.json``."""
    from llmcls.infer import classify_with
    from llmcls.rundir import model_for_run

    run = RunDir(run_dir)
    cfg = cfg or run.load_config()
    check_calibration(cfg)  # before anything is loaded or scored
    dev_file = run.dev_file(cfg)
    if dev_file is None or not source_exists(dev_file):
        raise FileNotFoundError(f"{run.path}: no dev set to calibrate on (data.dev_file, or data.dev_fraction at "
                                "training time)")
    if cfg.calibration.method == "none" and not run.multi_label:
        raise ConfigError("calibration.method=none: nothing to fit")
    model, tokenizer, cfg = model_for_run(run.path, cfg, model, tokenizer)
    rows, _ = read_rows(dev_file, cfg.data)
    preds = classify_with(cfg, model, tokenizer, rows, method="score", progress=progress, desc="dev",
                          lexical=run.load_lexical())
    return fit_and_save(run, cfg, rows, preds)


def summary_lines(out: dict) -> list[str]:
    """``llmcls calibrate``'s answer: what was fitted and what it gives on the dev rows."""
    if "per_label" in out:  # a multi-label run's thresholds
        return [f"thresholds on {out['fitted_on_rows']} dev rows: global {out['default']:.4f} (pooled dev micro-F1 "
                f"{out['default_dev_micro_f1']:.4f})"] + [
            f"  {label:<24} {t:.4f}  dev F1 {out['dev_f1'][label]:.4f}" for label, t in out["per_label"].items()]
    r = out["report"]
    b, a = r["before"], r["after"]
    lines = [f"{out['method']} scaling on {r['dev_rows']} dev rows: T = {out['temperature']:.4f}"
             + (f", {sum(1 for v in out['bias'].values() if v)} label biases" if out.get("bias") else ""),
             f"  ECE   {b['ece']:.4f} -> {a['ece']:.4f}",
             f"  NLL   {b['nll']:.4f} -> {a['nll']:.4f}",
             f"  Brier {b['brier']:.4f} -> {a['brier']:.4f}"]
    if out.get("threshold") is not None:
        lines.append(f"abstain below {out['threshold']:.4f}: dev precision {out['precision']:.4f} "
                     f"(target {out['target_precision']}) at coverage {out['coverage']:.1%}")
    elif r.get("threshold_error"):
        lines.append(f"no threshold: {r['threshold_error']}")
    return lines
