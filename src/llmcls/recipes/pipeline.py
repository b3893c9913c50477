"""Recipe — ``llmcls run``: the whole job in one go, what the demo runs. Train, evaluate the whole test file,
score the TF-IDF baseline on the same data, write the report."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from llmcls import dist
from llmcls.config import Config
from llmcls.rundir import RunDir
from llmcls.warmup import process_age, split_line

if TYPE_CHECKING:
    from llmcls.recipes.baseline import BaselineProcess

log = logging.getLogger(__name__)


def after_eval(run_dir: str | Path, cfg: Optional[Config] = None, with_baseline: bool = False,
               echo: Callable[[str], None] = print, baseline_job: Optional["BaselineProcess"] = None) -> None:
    """What follows an evaluation: the baseline on the run's own data (``llmcls run``; ``baseline_job``: the one
    :func:`start_baseline` started, whose result is awaited here), then RUN/report.html. Neither may fail a
    finished run: a problem is logged and the run's results stand."""
    run = RunDir(run_dir)
    if baseline_job is not None or (with_baseline and wants_baseline(run, cfg)):
        from llmcls.recipes.baseline import baseline_of_run, summary_line

        try:
            echo(summary_line(baseline_job.result() if baseline_job is not None else baseline_of_run(run.path, cfg)))
        except Exception as e:  # noqa: BLE001 (e.g. a single-label training file)
            log.warning("baseline skipped: %s", e)
    try:
        from llmcls.reporting.report import write_report

        echo(f"report: {write_report([run.path])}")
    except Exception as e:  # noqa: BLE001
        log.warning("report not written: %s (run 'llmcls report %s' to retry)", e, run.path)


def wants_baseline(run: RunDir, cfg: Optional[Config]) -> bool:
    # the baseline is a single-label classifier: nothing to compare a multi-label run with
    return bool(cfg is not None and cfg.data.train_file and cfg.data.test_file and not run.multi_label)


def start_baseline(run: RunDir, cfg: Config, overlap: Optional[bool] = None) -> Optional["BaselineProcess"]:
    """The baseline in a process of its own, started before the evaluation so that the two overlap; None where
    the run gets none, where nothing would overlap, or where the process could not start (after_eval then computes
    it). ``overlap``: whether the evaluation leaves the CPU free, i.e. runs on a GPU (the default test); on a
    CPU-only machine both would share the same cores, and the child's start (a fresh interpreter's imports, ~5 s
    on 2 cores) would only add to the run."""
    import torch

    if overlap is None:
        overlap = torch.cuda.is_available()
    if not (overlap and dist.is_main() and wants_baseline(run, cfg)):
        return None
    from llmcls.recipes.baseline import BaselineProcess

    try:
        return BaselineProcess(run.path, cfg)
    except Exception as e:  # noqa: BLE001
        log.warning("baseline not started in the background (%s): it runs after the evaluation", e)
        return None


def run(cfg: Config, resume: bool = False, overwrite: bool = False, with_baseline: bool = True,
        echo: Callable[[str], None] = print, callbacks: list | None = None) -> dict:
    """Train, evaluate, baseline, report; returns the evaluation metrics. ``echo`` prints progress lines (rank 0).
    ``callbacks``: extra TrainerCallbacks for the training.

    The base model is loaded once: the evaluations (the run's weights, the zero-shot base, the last step's) score
    with the model training leaves in memory, its adapter weights swapped from the run directory
    (:class:`llmcls.rundir.TrainedInMemory`), and give what ``llmcls eval RUN`` gives after a fresh load. Where
    that is not done (:func:`llmcls.trainer.reuse_refused`: full fine-tunes, several processes, a quantised base,
    ``model.device_map``) each evaluation loads the model again."""
    from llmcls.recipes.evaluate import eval_tracker, evaluate
    from llmcls.recipes.train import train
    from llmcls.rundir import TrainedInMemory

    say = echo if dist.is_main() else (lambda _: None)
    out, trained, tokenizer = train(cfg, resume=resume, overwrite=overwrite, callbacks=callbacks, keep_model=True)
    say(f"trained {out['global_step']} steps in {out['wall_s']:.0f} s, final loss {out['final_logged_loss']}")
    _free_memory()  # the Trainer, its optimizer and (without reuse) the trained model
    run_dir = RunDir(cfg.train.output_dir)
    saved = run_dir.load_config()  # what training resolved (the tiny preset's base, for one)
    memory = TrainedInMemory(trained, tokenizer, run_dir.path, saved) if trained is not None else None
    if memory is not None:
        log.info("evaluating with the trained model in memory (no reload)")

    def evaluate_weights(weights: str, **kwargs) -> dict:
        if memory is None:
            return evaluate(run_dir.path, saved, weights=weights, **kwargs)
        started, t = process_age(), time.perf_counter()
        # eval.merge_lora merges the run's own adapter into the base in memory for good: scored last
        with memory.weights(weights, merge=saved.eval.merge_lora and weights == "selected") as (model, tokenizer):
            loaded = {"start_s": started, "load_s": time.perf_counter() - t}  # the adapter's load
            return evaluate(run_dir.path, saved, model, tokenizer, weights=weights, loaded=loaded, **kwargs)

    # the baseline needs only the CPU and the run's files: it runs while the GPU evaluates
    background = start_baseline(run_dir, cfg) if with_baseline else None
    try:
        others = (["base"] if saved.eval.zero_shot else []) + (["last"] if run_dir.last.is_dir() else [])
        before = {w: evaluate_weights(w) for w in others} if saved.eval.merge_lora and memory is not None else {}
        tracker = eval_tracker(run_dir.path, saved)
        metrics = evaluate_weights("selected", tracker=tracker)
        tracker.finish()
        say(metrics_line(metrics))
        if out.get("warmup"):  # where the time before the first step and the first scored batch went
            say(split_line("training", out["warmup"]))
        say(split_line("eval", metrics["warmup"]))
        # what fine-tuning bought, and what selecting on the dev set bought: same prompt, same test rows
        for w in others:
            m = before[w] if w in before else evaluate_weights(w)
            say(("zero-shot (base model): " if w == "base" else "last step: ") + metrics_line(m))
        del memory, trained, tokenizer
        _free_memory()
        if dist.is_main():
            after_eval(run_dir.path, cfg, with_baseline=with_baseline and background is None, echo=say,
                       baseline_job=background)
            say(f"run directory: {run_dir.path}")
    finally:
        if background is not None:  # a failed evaluation leaves no baseline process behind
            background.stop()
    return metrics


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def metrics_line(m: dict) -> str:
    if m.get("multi_label"):
        return (f"micro-F1 {m['micro_f1']:.4f}  macro-F1 {m['macro_f1']:.4f}  subset accuracy "
                f"{m['subset_accuracy']:.4f}  Hamming loss {m['hamming_loss']:.4f}  rows {m['rows']}  "
                f"{m['rows_per_s']} rows/s")
    line = (f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  invalid {m['invalid_rate']:.2%}  "
            f"rows {m['rows']}  {m['rows_per_s']} rows/s")
    cal = m.get("calibration") or {}
    if cal.get("method", "none") != "none":
        line += f"  ECE {cal['before']['ece']:.4f} -> {cal['after']['ece']:.4f}"
    if cal.get("abstention"):
        ab = cal["abstention"]
        line += f"  answered {ab['coverage']:.1%} at precision {ab['precision'] or 0:.4f}"
    return line
