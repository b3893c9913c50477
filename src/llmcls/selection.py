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
from typing import Callable, Optional

from transformers import TrainerCallback

from llmcls import dist
from llmcls.config import Config
from llmcls.encode import PromptBuilder
from llmcls.files import atomic_dir, atomic_write_json
from llmcls.infer import classify
from llmcls.metrics import dev_metrics
from llmcls.multilabel import dev_metrics as multi_dev_metrics
from llmcls.rundir import RunDir, read_json

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"nll"}


def better(metric: str, a: float, b: Optional[float]) -> bool:
    """Whether ``a`` improves on ``b`` (None: nothing yet). Ties keep the earlier evaluation."""
    if a != a:  # NaN: a diverged model is never the best
        return False
    if b is None:
        return True
    return a < b if metric in LOWER_IS_BETTER else a > b


class DevEvaluator(TrainerCallback):
    """Scores ``rows`` every ``eval.every_steps`` optimizer steps, at each epoch's end with ``eval.every_epoch``,
    and once more when training ends (so the last step always has a dev score to be compared with).

    ``save(folder)`` writes the model's current weights (the recipe's own save, FSDP gathering included; called on
    every process). ``paused()`` is a context in which the model's forwards are not training (the token counter
    stops counting). ``attn`` is the attention implementation scoring needs while training runs under packed
    attention. ``trainer`` is set by :func:`llmcls.trainer.build_trainer`: logs go through ``trainer.log``."""

    def __init__(self, model, tokenizer, rows, cfg: Config, run: RunDir, save: Callable, attn: Optional[str] = None,
                 paused: Callable = contextlib.nullcontext):
        self.model, self.rows, self.cfg, self.run, self.save = model, rows, cfg, run, save
        self.builder = PromptBuilder(tokenizer, cfg.prompt)
        self.metric = cfg.train.select_best
        self.attn, self.paused = attn, paused
        self.trainer = None
        self.history: list[dict] = []        # one entry per dev evaluation: step + metrics
        self.best: Optional[dict] = None     # the entry whose weights are in RUN/best
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

        was_training = self.model.training
        self.model.eval()
        switch = attention_implementation(self.model, self.attn) if self.attn else contextlib.nullcontext()
        try:
            with switch, self.paused():
                preds = classify(self.model, self.builder, self.rows, batch_size=self.cfg.eval.batch_size,
                                 max_length=self.cfg.data.max_length, progress=False, desc="dev",
                                 lockstep=self.cfg.train.fsdp != "off")
        finally:
            self.model.train(was_training)
        ml = self.cfg.multilabel
        m = (multi_dev_metrics(self.rows, preds, ml.default_threshold, ml.at_least_one)
             if any(r.labels is not None for r in self.rows) else dev_metrics(self.rows, preds))
        entry = {"step": state.global_step, **m}
        self.history = [h for h in self.history if h["step"] != entry["step"]] + [entry]
        self.last_preds = preds
        if self.trainer is not None:
            self.trainer.log({f"dev_{k}": v for k, v in m.items()})
        log.info("dev at step %d: accuracy %.4f macro-F1 %.4f NLL %.4f", state.global_step, m["accuracy"],
                 m["macro_f1"], m["nll"])
        if self.metric == "last":
            return
        if better(self.metric, m[self.metric], None if self.best is None else self.best[self.metric]):
            self.best, self.since_best, self.best_preds = entry, 0, preds
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
            atomic_write_json(folder / self.run.best_record.name, {**entry, "metric": self.metric})

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
        else:
            out.update(step=self.best["step"], source="best", value=self.best[self.metric])
        return out
