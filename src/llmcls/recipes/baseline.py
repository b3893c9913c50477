"""Recipe — ``llmcls baseline``: the classical model an LLM fine-tune has to beat.

Character 1–2-gram TF-IDF and a linear SVM per label (:class:`llmcls.lexical.LexicalModel`, the same model the
hybrid and the shortlist use). Scored with the
same ``compute_metrics`` as ``llmcls eval``, twice:

- ``all_labels``: the best of every label seen in training (what a plain classifier does);
- ``candidates``: the best of each row's own candidates, by the SVM's decision values (what the LLM is asked).

Writes ``OUT/metrics.json`` (both score sets, timings, environment) and ``OUT/predictions.jsonl`` (per row: truth,
both predictions and the decision value of every label, so any metric can be recomputed from the file).
``llmcls run`` writes it to ``RUN/baseline/`` and the report shows it beside the LLM.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from llmcls.config import ConfigError, DataConfig
from llmcls.data import Row, read_rows
from llmcls.multilabel import refuse_multi
from llmcls.env import environment
from llmcls.files import write_results
from llmcls.metrics import compute_metrics
from llmcls.rundir import ResultsDir

if TYPE_CHECKING:
    from llmcls.config import Config

MODEL = "char 1-2-gram TF-IDF (sublinear tf) + LinearSVC (C={C}), one-vs-rest"


def baseline(train_file: str | Path, test_file: str | Path, out_dir: Optional[str | Path] = None,
             data_cfg: Optional[DataConfig] = None, C: float = 2.0, progress: bool = True,
             max_train_rows: Optional[int] = None, max_test_rows: Optional[int] = None, text: str = "whole",
             view: Optional[Callable[[list[Row]], list[Row]]] = None) -> dict:
    """Train on ``train_file``, score ``test_file``; returns the metrics (also written to ``out_dir``). The row
    limits match ``data.max_train_rows`` / ``data.max_eval_rows``, so ``llmcls run`` compares like with like.
    ``text`` (``baseline.text``): what of each text is read: ``whole``, the first N characters (a number), or
    ``same``: what the LLM reads, ``view`` (the rows as the run's prompt fitting cuts them)."""
    from llmcls.lexical import LexicalModel, cut_texts

    data_cfg = data_cfg or DataConfig()
    t_start = time.perf_counter()
    train_rows, train_invalid = read_rows(train_file, data_cfg, limit=max_train_rows)
    test_rows, test_invalid = read_rows(test_file, data_cfg, limit=max_test_rows)
    for path, rows in ((train_file, train_rows), (test_file, test_rows)):  # a single-label classifier
        refuse_multi(rows, path, data_cfg.output_field, "the TF-IDF baseline is single-label")
    if text == "same" and view is None:
        raise ConfigError("baseline.text=same reads what a run's LLM reads: give the run (llmcls baseline --run "
                          "RUN), or set baseline.text to whole or a number of characters")
    train_rows, test_rows = cut_texts(train_rows, text, view), cut_texts(test_rows, text, view)
    read_chars = sum(len(r.text) for r in test_rows) / max(len(test_rows), 1)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    try:
        model = LexicalModel.fit(train_rows, C=C, text=text, progress=progress, desc="baseline")
    except ValueError as e:
        raise ValueError(f"{train_file}: {e}") from None
    timings["fit_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    scores = model.scores([r.text for r in test_rows])
    timings["score_s"] = round(time.perf_counter() - t, 2)
    classes = model.labels

    col = {c: j for j, c in enumerate(classes)}
    pred_all = [classes[j] for j in scores.argmax(1)]
    # A candidate never seen in training has no SVM; it can't win against one that has a score.
    pred_cand = [max(r.candidates, key=lambda c: scores[i, col[c]] if c in col else -np.inf)
                 for i, r in enumerate(test_rows)]
    truth = [r.label for r in test_rows]
    labels = sorted(set(classes) | set(truth))
    wall = time.perf_counter() - t_start
    metrics = {
        "model": MODEL.format(C=C), "C": C, "train_file": str(train_file), "test_file": str(test_file),
        "text": text, "mean_test_chars_read": round(read_chars, 1),
        "train_rows": len(train_rows), "test_rows": len(test_rows),
        "skipped_invalid_rows": {"train": len(train_invalid), "test": len(test_invalid)},
        "features": model.features, "labels": labels,
        "all_labels": compute_metrics(truth, pred_all, labels),
        "candidates": compute_metrics(truth, pred_cand, labels),
        "wall_s": round(wall, 2), **timings, "environment": environment(),
    }
    if out_dir is not None:
        out = ResultsDir(Path(out_dir))
        write_results(out.predictions, (
            {"index": i, "line": r.line, "truth": r.label, "pred": pa, "pred_candidates": pc,
             "candidates": r.candidates, "scores": {c: float(scores[i, j]) for c, j in col.items()}}
            for i, (r, pa, pc) in enumerate(zip(test_rows, pred_all, pred_cand))), out.metrics, metrics)
    return metrics


def view_of_run(run_dir: str | Path) -> Callable[[list[Row]], list[Row]]:
    """The rows as the run's LLM reads them: its tokenizer, prompt and ``data.max_length`` cut each text
    (:func:`llmcls.infer.as_read`; with ``data.long_text: windows``, what its windows read), so that the baseline
    reads the same characters."""
    from llmcls.encode import PromptBuilder
    from llmcls.infer import reader
    from llmcls.model.load import load_tokenizer
    from llmcls.rundir import RunDir
    from llmcls.windows import settings

    run = RunDir(run_dir)
    cfg = run.load_config()
    builder = PromptBuilder(load_tokenizer(cfg.model, str(run.tokenizer)), cfg.prompt)
    return reader(builder, cfg.data.max_length, settings(cfg))


def baseline_of_run(run_dir: str | Path, cfg: "Config", progress: bool = True) -> dict:
    """The baseline ``llmcls run`` writes to ``RUN/baseline``: the run's data files and row limits, and with
    ``baseline.text: same`` the text as the run's LLM reads it."""
    from llmcls.rundir import RunDir

    text = cfg.baseline.text
    return baseline(cfg.data.train_file, cfg.data.test_file, RunDir(run_dir).baseline.path, cfg.data,
                    C=cfg.baseline.svm_c, progress=progress, max_train_rows=cfg.data.max_train_rows,
                    max_test_rows=cfg.data.max_eval_rows, text=text,
                    view=view_of_run(run_dir) if text == "same" else None)


def _baseline_child(conn, run_dir: str, cfg: "Config") -> None:
    try:
        conn.send(("ok", baseline_of_run(run_dir, cfg, progress=False)))
    except Exception as e:  # noqa: BLE001 (handed to the parent, which decides)
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


class BaselineProcess:
    """:func:`baseline_of_run` in a process of its own, so that it runs on spare CPU cores while the GPU scores
    the test file: ``llmcls run`` starts it when training ends and waits for it before the report. On all of
    Fudan news it takes ~20 s of one core (cutting 8,344 texts to what the LLM reads, then the SVMs), which no
    longer adds to the run's wall clock.

    A spawned process, not a fork: the parent holds a CUDA context, and the child needs no GPU. No progress bars
    (they would cross the evaluation's); a failure comes back as a message from :meth:`result`. Daemonic: if the
    parent dies, so does the child, and nothing is left half-written (the results are written atomically)."""

    def __init__(self, run_dir: str | Path, cfg: "Config"):
        ctx = multiprocessing.get_context("spawn")
        self._conn, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_baseline_child, args=(send, str(run_dir), cfg), daemon=True,
                                 name="llmcls-baseline")
        self._proc.start()
        send.close()  # the child holds the only sending end: its death reads as EOF here

    def result(self) -> dict:
        """Wait for the child; its metrics, or a RuntimeError saying why there are none."""
        try:
            status, value = self._conn.recv()
        except EOFError:
            status, value = "error", "the baseline's process ended without a result"
        finally:
            self._proc.join()
            self._conn.close()
        if status != "ok":
            raise RuntimeError(value if self._proc.exitcode == 0 else f"{value} (exit code {self._proc.exitcode})")
        return value

    def stop(self) -> None:
        """End the child now (the run failed before it needed the result)."""
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()
        self._conn.close()


def summary_line(m: dict) -> str:
    a, c = m["all_labels"], m["candidates"]
    what = {"whole": "whole texts", "same": "the text the LLM reads"}.get(m.get("text", "whole"),
                                                                           f"the first {m.get('text')} characters")
    return (f"baseline ({m['train_rows']} train / {m['test_rows']} test rows, {what}, {m['wall_s']:.0f} s): "
            f"all labels: accuracy {a['accuracy']:.4f} macro-F1 {a['macro_f1']:.4f} | "
            f"restricted to candidates: accuracy {c['accuracy']:.4f} macro-F1 {c['macro_f1']:.4f}")
