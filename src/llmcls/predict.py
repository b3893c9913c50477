"""``llmcls predict``: classify new rows (jsonl file or stdin) with a trained run.

Each input row needs ``text``; its candidates come from its own ``category`` field or, for every row, from a
fixed label set (``labels=``, default: the labels the run was trained on). Output: one JSON line per input row,
in input order, with the label and the probability of each candidate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, TextIO

from llmcls import dist
from llmcls.data import read_rows
from llmcls.encode import PromptBuilder
from llmcls.io import atomic_open, refuse_overwrite


def trained_labels(run_dir: str | Path) -> Optional[list[str]]:
    summary = Path(run_dir) / "data" / "prepare.json"
    if summary.is_file():
        return sorted(json.loads(summary.read_text(encoding="utf-8"))["labels"])
    return None


def predict(run_dir: str | Path, input_path: Optional[str], output: Optional[str] = None,
            labels: Optional[list[str]] = None, method: Optional[str] = None, batch_size: Optional[int] = None,
            overwrite: bool = False, progress: bool = True, stdin: Optional[TextIO] = None,
            stdout: Optional[TextIO] = None, model_and_tokenizer=None) -> int:
    """Returns the number of rows written."""
    import tempfile

    from llmcls.model import model_for_run

    if output:
        refuse_overwrite(output, overwrite)
    model, tok, cfg = model_for_run(run_dir, model_and_tokenizer)
    from_stdin = input_path in (None, "-")
    if from_stdin:  # stdin is read whole, then parsed with the same validation as files
        # Under torchrun every process inherits stdin: rank 0 reads it, all get the text.
        text = dist.on_main(lambda: (stdin or sys.stdin).read())
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as tmp:
            tmp.write(text)
        input_path = tmp.name
    labels = labels or trained_labels(run_dir)
    try:
        rows, _ = read_rows(input_path, cfg.data, need_label=False, on_invalid="error", labels=labels)
    finally:
        if from_stdin:
            Path(input_path).unlink(missing_ok=True)
    preds = dist.classify(model, PromptBuilder(tok, cfg.prompt), rows, method=method or cfg.eval.method,
                          batch_size=batch_size or cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                          max_length=cfg.data.max_length, progress=progress, desc="predict")
    if not dist.is_main():
        return len(preds)
    lines = []
    for r, p in zip(rows, preds):
        rec = {"index": p.index, "line": r.line, "label": p.pred}
        if p.probs is not None:
            rec["probs"] = {k: round(v, 6) for k, v in p.probs.items()}
        if p.raw is not None:
            rec["raw"] = p.raw
        lines.append(json.dumps(rec, ensure_ascii=False))
    if output:
        with atomic_open(output) as fh:
            fh.write("\n".join(lines) + "\n")
    else:
        (stdout or sys.stdout).write("\n".join(lines) + "\n")
    return len(lines)
