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

import os
import pickle
import subprocess
import sys
import tempfile
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


def _child_main() -> None:
    """The background baseline's process: (run_dir, cfg) pickled on stdin; ("ok", metrics) or ("error", message)
    pickled on stdout. Anything a library prints goes to stderr, so that stdout carries the result alone."""
    result = sys.stdout.buffer
    sys.stdout = sys.stderr
    try:
        run_dir, cfg = pickle.load(sys.stdin.buffer)
        out = ("ok", baseline_of_run(run_dir, cfg, progress=False))
    except Exception as e:  # noqa: BLE001 (handed to the parent, which decides)
        out = ("error", f"{type(e).__name__}: {e}")
    result.write(pickle.dumps(out))
    result.flush()


class BaselineProcess:
    """:func:`baseline_of_run` in a process of its own, so that it runs on spare CPU cores while the GPU scores
    the test file: ``llmcls run`` on a GPU starts it when training ends and waits for it before the report
    (:func:`llmcls.recipes.pipeline.start_baseline`; on a CPU-only machine nothing would overlap). On all of
    Fudan news it takes ~20 s of one core (cutting 8,344 texts to what the LLM reads, then the SVMs), which no
    longer adds to the run's wall clock.

    A new interpreter (``python -c``), not multiprocessing: a fork would copy a process that holds a CUDA context and
    running threads, and multiprocessing's spawn imports the caller's main module again, which in a script that
    calls ``llmcls.recipes.pipeline.run`` without a ``__main__`` guard would run the whole job a second time. No
    progress bars (they would cross the evaluation's); what it prints goes to a temporary file, whose end comes
    with the error when it fails; :meth:`stop` kills it (the run failed before it needed the result)."""

    def __init__(self, run_dir: str | Path, cfg: "Config"):
        import llmcls

        # the same llmcls as this process's, wherever it was imported from
        package_root = str(Path(llmcls.__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root,
                                                                        os.environ.get("PYTHONPATH")])))
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from llmcls.recipes.baseline import _child_main; _child_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env)
        try:
            self._proc.stdin.write(pickle.dumps((str(run_dir), cfg)))
            self._proc.stdin.close()
        except OSError:  # it died at once; result() says why
            pass

    def result(self) -> dict:
        """Wait for the child; its metrics, or a RuntimeError saying why there are none."""
        try:
            out = self._proc.stdout.read()
            rc = self._proc.wait()
            try:
                status, value = pickle.loads(out)
            except Exception:  # noqa: BLE001 (no result: it crashed or was killed)
                status, value = "error", f"the baseline's process ended without a result (exit code {rc})"
            if status != "ok":
                self._log.seek(0)
                tail = self._log.read().decode(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(value + ("\n" + "\n".join(tail) if tail and rc != 0 else ""))
            return value
        finally:
            self._close()

    def stop(self) -> None:
        """End the child now (the run failed before it needed the result)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close()

    def _close(self) -> None:
        self._proc.stdout.close()
        self._log.close()


def summary_line(m: dict) -> str:
    a, c = m["all_labels"], m["candidates"]
    what = {"whole": "whole texts", "same": "the text the LLM reads"}.get(m.get("text", "whole"),
                                                                           f"the first {m.get('text')} characters")
    return (f"baseline ({m['train_rows']} train / {m['test_rows']} test rows, {what}, {m['wall_s']:.0f} s): "
            f"all labels: accuracy {a['accuracy']:.4f} macro-F1 {a['macro_f1']:.4f} | "
            f"restricted to candidates: accuracy {c['accuracy']:.4f} macro-F1 {c['macro_f1']:.4f}")
