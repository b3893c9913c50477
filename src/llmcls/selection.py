"""Keeping the best model by a real metric: the dev set is scored during training with the same fast scorer as
``llmcls eval`` (sharded over the processes of a launch, on the model being trained: no second copy), dev
accuracy, macro-F1 and NLL are logged through the Trainer (so they reach ``train_log.jsonl`` and the tracker), the
weights of the best evaluation so far are kept in ``RUN/best`` and training stops early after
``train.early_stopping_patience`` evaluations without improvement.

Token accuracy, what a Trainer's evaluation reports for a causal LM, is not the classifier's accuracy: a row can
get most answer tokens right and still pick the wrong label (LLaMA-Factory#8187). Here a dev evaluation is the
classifier's own decision over each row's candidates.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional, Sequence

import numpy as np
from transformers import TrainerCallback

from llmcls import dist
from llmcls.config import Config
from llmcls.encode import PromptBuilder
from llmcls.files import atomic_dir, atomic_write_json
from llmcls.infer import classify
from llmcls.metrics import dev_metrics
from llmcls.multilabel import dev_metrics as multi_dev_metrics
from llmcls.rundir import RunDir, read_json
from llmcls.windows import settings

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"nll"}


def better(metric: str, a: float, b: Optional[float]) -> bool:
    """Whether ``a`` improves on ``b`` (None: nothing yet). Ties keep the earlier evaluation."""
    if a != a:  # NaN: a diverged model is never the best
        return False
    if b is None:
        return True
    return a < b if metric in LOWER_IS_BETTER else a > b


def per_row(rows, preds) -> dict:
    """What a paired comparison of two evaluations needs of each dev row: the prediction and -log p(truth)
    (uncalibrated, as dev_metrics' NLL)."""
    import math

    out = {"pred": [p.pred for p in preds], "nll": []}
    for r, p in zip(rows, preds):
        q = (p.raw_probs or p.probs or {}).get(r.label, 0.0)
        out["nll"].append(-math.log(q) if q > 0 else 1e9)
    return out


def bootstrap_wins(metric: str, truth: Sequence[str], a: dict, b: dict, resamples: int = 2000,
                   seed: int = 0) -> float:
    """The share of paired bootstrap resamples of the dev rows (the same rows drawn for both) in which evaluation
    ``a`` (:func:`per_row`) is strictly better than ``b`` on ``metric``. Macro-F1 averages F1 = 2tp / (2tp + fp +
    fn) over the labels of ``truth`` (0 where a resample leaves a label nothing), which is scikit-learn's
    ``f1_score(average="macro", labels=..., sample_weight=counts, zero_division=0)`` on each resample."""
    n = len(truth)
    if n == 0:
        return 0.0
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)

    def score(ev: dict) -> np.ndarray:
        pred = ev["pred"]
        if metric == "nll":
            return -(counts @ np.asarray(ev["nll"], dtype=np.float64)) / n  # higher is better here
        hit = np.array([p == t for p, t in zip(pred, truth)], dtype=np.float64)
        if metric == "accuracy":
            return counts @ hit / n
        f1 = []
        for label in sorted(set(truth)):
            is_t = np.array([t == label for t in truth], dtype=np.float64)
            is_p = np.array([p == label for p in pred], dtype=np.float64)
            tp, fp, fn = counts @ (is_t * is_p), counts @ (is_p * (1 - is_t)), counts @ (is_t * (1 - is_p))
            den = 2 * tp + fp + fn
            f1.append(np.divide(2 * tp, den, out=np.zeros_like(den), where=den > 0))
        return np.mean(f1, axis=0)

    return float(np.mean(score(a) > score(b)))


class DevEvaluator(TrainerCallback):
    """Scores ``rows`` every ``eval.every_steps`` optimizer steps, at each epoch's end with ``eval.every_epoch``,
    and once more when training ends (so the last step always has a dev score to be compared with).

    ``save(folder)`` writes the model's current weights (the recipe's own save, FSDP gathering included; called on
    every process). ``paused()`` is a context in which the model's forwards are not training (the token counter
    stops counting). ``attn`` is the attention implementation scoring needs while training runs under packed
    attention. ``trainer`` is set by :func:`llmcls.trainer.build_trainer`: logs go through ``trainer.log``."""

    def __init__(self, model, tokenizer, rows, cfg: Config, run: RunDir, save: Callable, attn: Optional[str] = None,
                 paused: Callable = contextlib.nullcontext, lexical=None):
        self.model, self.rows, self.cfg, self.run, self.save = model, rows, cfg, run, save
        self.lexical = lexical  # the run's TF-IDF model (eval.hybrid / eval.shortlist): dev scores carry its scores
        self.builder = PromptBuilder(tokenizer, cfg.prompt)
        self.metric = cfg.train.select_best
        self.attn, self.paused = attn, paused
        self.trainer = None
        self.history: list[dict] = []        # one entry per dev evaluation: step + metrics
        self.best: Optional[dict] = None     # the entry whose weights are in RUN/best
        self.best_rows: Optional[dict] = None  # its per-row dev results (per_row), for the paired comparison
        self.last_rows: Optional[dict] = None
        self.since_best = 0
        self.last_preds: Optional[list] = None
        self.best_preds: Optional[list] = None

    # ---- resume: what the checkpoint's log history says, and the best weights kept on disk
    def on_train_begin(self, args, state, control, **kw):
        self.history = [{"step": h["step"], **{k[4:]: h[k] for k in h if k.startswith("dev_")}}
                        for h in state.log_history if "dev_accuracy" in h]
        self.best, self.since_best = None, 0
        record = read_json(self.run.best_record)
        if self.metric == "last" or record is None:
            return
        self.best_rows = record.pop("dev_rows", None)
        self.best = record
        if record["step"] > state.global_step:
            # A crashed run evaluated beyond the checkpoint it resumes from: those weights really scored this,
            # so they stay a candidate (the replayed steps may or may not reproduce them).
            log.warning("resuming from step %d: the best weights kept (step %d) come from after the checkpoint; "
                        "they stay a candidate", state.global_step, record["step"])
        later = [h for h in self.history if h["step"] > record["step"]]
        self.since_best = len(later)

    def on_step_end(self, args, state, control, **kw):
        every = self.cfg.eval.every_steps
        if every and state.global_step % every == 0:
            self._evaluate(state, control)

    def on_epoch_end(self, args, state, control, **kw):
        if self.cfg.eval.every_epoch and not self._evaluated_at(state.global_step):
            self._evaluate(state, control)

    def on_train_end(self, args, state, control, **kw):
        if not self._evaluated_at(state.global_step) or self.last_preds is None:
            self._evaluate(state, control, final=True)

    def _evaluated_at(self, step: int) -> bool:
        return bool(self.history) and self.history[-1]["step"] == step

    # ---- one evaluation
    def _evaluate(self, state, control, final: bool = False) -> None:
        from llmcls.model.attention import attention_implementation
        from llmcls.model.compiling import stack_uncompiled

        was_training = self.model.training
        self.model.eval()
        switch = attention_implementation(self.model, self.attn) if self.attn else contextlib.nullcontext()
        try:
            with switch, self.paused(), stack_uncompiled(self.model):
                preds = classify(self.model, self.builder, self.rows, batch_size=self.cfg.eval.batch_size,
                                 max_length=self.cfg.data.max_length, progress=False, desc="dev",
                                 lockstep=self.cfg.train.fsdp != "off", lexical=self.lexical,
                                 shortlist=self.cfg.eval.shortlist, windows=settings(self.cfg))
        finally:
            self.model.train(was_training)
        ml = self.cfg.multilabel
        m = (multi_dev_metrics(self.rows, preds, ml.default_threshold, ml.at_least_one)
             if any(r.labels is not None for r in self.rows) else dev_metrics(self.rows, preds))
        entry = {"step": state.global_step, **m}
        self.history = [h for h in self.history if h["step"] != entry["step"]] + [entry]
        self.last_preds, self.last_rows = preds, per_row(self.rows, preds)
        if self.trainer is not None:
            self.trainer.log({f"dev_{k}": v for k, v in m.items()})
        log.info("dev at step %d: accuracy %.4f macro-F1 %.4f NLL %.4f", state.global_step, m["accuracy"],
                 m["macro_f1"], m["nll"])
        if self.metric == "last":
            return
        if better(self.metric, m[self.metric], None if self.best is None else self.best[self.metric]):
            self.best, self.since_best, self.best_preds, self.best_rows = entry, 0, preds, self.last_rows
            if not final:  # at the end the recipe saves the last weights anyway; they are the best then
                self._keep(entry)
        else:
            self.since_best += 1
            patience = self.cfg.train.early_stopping_patience
            if patience and self.since_best >= patience and not final:
                log.info("no dev %s improvement in %d evaluations: stopping at step %d (best: step %d)",
                         self.metric, patience, state.global_step, self.best["step"])
                control.should_training_stop = True

    def _keep(self, entry: dict) -> None:
        """The current weights to RUN/best (every process takes part in saving; rank 0 writes)."""
        def write(folder):
            self.save(folder)
            atomic_write_json(folder / self.run.best_record.name,
                              {**entry, "metric": self.metric, "dev_rows": self.best_rows})

        if dist.is_main():
            with atomic_dir(self.run.best, exists="replace") as tmp:
                write(tmp)
        else:
            self.save(None)  # FSDP: this process's shards still take part in gathering the weights
        dist.barrier()

    # ---- what training ends with
    def selection(self, final_step: int) -> dict:
        """Which evaluation's weights the run keeps, and every dev evaluation (for train_summary.json)."""
        out = {"metric": self.metric, "history": self.history}
        if self.metric == "last" or self.best is None or self.best["step"] == final_step:
            out.update(step=final_step, source="last")
            return out
        confidence = self.cfg.train.select_confidence
        if confidence > 0 and self.best_rows is not None and self.last_rows is not None:
            # The best of many noisy evaluations looks better than it is; the last step is kept unless the
            # earlier one is better beyond what resampling the dev rows explains.
            wins = bootstrap_wins(self.metric, [r.label for r in self.rows], self.best_rows, self.last_rows)
            out["bootstrap"] = {"best_step": self.best["step"], "best_value": self.best[self.metric],
                                "wins": wins, "confidence": confidence}
            if wins < confidence:
                log.info("dev %s: step %d scored %.4f against the last step's %.4f, but beats it in only %.0f%% of "
                         "bootstrap resamples of the dev rows (train.select_confidence %.2f): keeping the last step",
                         self.metric, self.best["step"], self.best[self.metric],
                         self.history[-1][self.metric], 100 * wins, confidence)
                out.update(step=final_step, source="last")
                return out
        out.update(step=self.best["step"], source="best", value=self.best[self.metric])
        return out
