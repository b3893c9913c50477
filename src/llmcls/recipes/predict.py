"""Recipe — ``llmcls predict``: classify new rows (jsonl file or stdin) with a trained run.

Each input row needs ``text``; its candidates come from its own ``category`` field or, for every row, from a
fixed label set (``labels=``, default: the labels the run was trained on). Output: one JSON line per input row,
in input order, with the label and the probability of each candidate (calibrated where the run is), its confidence,
``abstain`` where a threshold is set (the run's calibrated one, or ``predict.abstain_below``) and the
``predict.top_k`` most probable candidates. A multi-label run writes ``labels``, every candidate over its label's
threshold (``label`` stays the most probable one).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional, TextIO

from llmcls import dist
from llmcls.config import Config, ConfigError
from llmcls.data import DataError, read_rows
from llmcls.files import atomic_open, refuse_overwrite
from llmcls.infer import classify_with, record
from llmcls.multilabel import predicted_sets
from llmcls.multilabel import record as multi_record
from llmcls.rundir import RunDir, model_for_run

log = logging.getLogger(__name__)


def predict(run_dir: str | Path, input_path: Optional[str], output: Optional[str] = None,
            labels: Optional[list[str]] = None, cfg: Optional[Config] = None, overwrite: bool = False,
            progress: bool = True, stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None,
            model=None, tokenizer=None) -> int:
    """Returns the number of rows written. ``cfg``: the run's config with the caller's overrides (``eval.method``,
    ``eval.batch_size``...); ``model``/``tokenizer``: an already loaded pair."""
    if output:
        refuse_overwrite(output, overwrite)
    run = RunDir(run_dir)
    model, tokenizer, cfg = model_for_run(run.path, cfg, model, tokenizer)
    from_stdin = input_path in (None, "-")
    if from_stdin:  # stdin is read whole, then parsed with the same validation as files
        # Under torchrun every process inherits stdin: rank 0 reads it, all get the text.
        text = dist.on_main(lambda: (stdin or sys.stdin).read())
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as tmp:
            tmp.write(text)
        input_path = tmp.name
    trained = run.labels()
    unknown = [x for x in labels or [] if trained and x not in trained]
    if unknown:  # scoring works on any words, but these were never trained on: say so
        log.warning("labels %s are not among the run's training labels (%s)", ", ".join(map(repr, unknown)),
                    ", ".join(trained))
    labels = labels or trained
    try:
        rows, _ = read_rows(input_path, cfg.data, need_label=False, on_invalid="error", labels=labels)
    except DataError as e:
        if not from_stdin:
            raise
        # the temporary file is an implementation detail: the user gave stdin, and its line numbers are the same
        raise DataError("<stdin>", e.line, e.field, e.reason) from None
    finally:
        if from_stdin:
            Path(input_path).unlink(missing_ok=True)
    multi = run.multi_label
    if multi and cfg.eval.method != "score":
        raise ConfigError("a multi-label run predicts by scoring every candidate: eval.method must be score")
    preds = classify_with(cfg, model, tokenizer, rows, progress=progress, desc="predict",
                          calibration=run.load_calibration(), abstain_below=cfg.predict.abstain_below,
                          lexical=run.load_lexical())
    if not dist.is_main():
        return len(preds)
    if multi:
        sets = predicted_sets(rows, preds, run.load_thresholds(cfg))
        recs = [multi_record(r, p, s, with_truth=False) for r, p, s in zip(rows, preds, sets)]
    else:
        recs = [record(r, p, with_truth=False, top_k=cfg.predict.top_k) for r, p in zip(rows, preds)]
    lines = [json.dumps(rec, ensure_ascii=False) for rec in recs]
    if output:
        with atomic_open(output) as fh:
            fh.write("\n".join(lines) + "\n")
    else:
        (stdout or sys.stdout).write("\n".join(lines) + "\n")
    return len(lines)
