"""Stage 1 — data: read the tutorial's raw jsonl, validate every row, convert to the instruction format.

Raw rows look like ``{"text": "...", "category": ["Politics", "Education"], "output": "Politics"}``; ``category``
may also be a string separated by commas or the Chinese enumeration comma 、. ``output`` may hold several true
labels (a multi-label row, docs/MULTILABEL.md): a list, or a string with the same separators (one that is itself a
candidate stays one label). Every problem is reported with file, line and field; with ``on_invalid="skip"`` bad
rows are counted and left out instead.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from llmcls.config import DataConfig, PromptConfig

_SPLIT = re.compile(r"\s*[,，、]\s*")


class DataError(ValueError):
    """A row of an input file is invalid; the message names the file, the line and the field."""

    def __init__(self, path: str | Path, line: int, field: str | None, message: str):
        self.path, self.line, self.field, self.reason = str(path), line, field, message
        where = f"{path}:{line}"
        super().__init__(f"{where}: field '{field}': {message}" if field else f"{where}: {message}")


@dataclass
class Row:
    """One classification example: the text, its candidate labels and (for training/eval) the true label; a row
    with several true labels has them in ``labels`` (candidate order) and ``label`` None."""

    text: str
    candidates: list[str]
    label: Optional[str]
    line: int = 0
    labels: Optional[list[str]] = None

    @property
    def true_labels(self) -> list[str]:
        """Every true label: ``labels``, else ``[label]``, else none."""
        return list(self.labels) if self.labels is not None else ([self.label] if self.label is not None else [])


def parse_candidates(value) -> list[str]:
    if isinstance(value, str):
        parts = _SPLIT.split(value.strip().strip("[]"))
        return [p.strip().strip("'\"") for p in parts if p.strip().strip("'\"")]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise TypeError("expected a list of strings or a comma/、-separated string")


def render_candidates(candidates: list[str], fmt: str) -> str:
    # The tutorial formats the list with an f-string, i.e. Python's repr: "['Politics', 'Education']".
    return str(list(candidates)) if fmt == "python_list" else ", ".join(candidates)


def _parse_line(raw: bytes, path: Path, lineno: int, cfg: DataConfig, need_label: bool,
                labels: Optional[list[str]]) -> Row:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # Find the field holding the bad bytes so the user knows where to look.
        field = None
        try:
            loose = json.loads(raw.decode("utf-8", errors="replace"))
            field = next((k for k, v in loose.items() if "\ufffd" in json.dumps(v, ensure_ascii=False)), None)
        except (json.JSONDecodeError, AttributeError):
            pass
        raise DataError(path, lineno, field, f"undecodable bytes (not UTF-8) at byte {e.start}") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(path, lineno, None, "invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise DataError(path, lineno, None, f"invalid JSON: {str(e).split(':')[0]}") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
    if "\\u" in line.lower():  # only an escape can make a lone surrogate, which no tokenizer can encode
        field = next((k for k, v in obj.items() if not _encodable(v)), None)
        if field is not None:
            raise DataError(path, lineno, field, "an unpaired surrogate escape (e.g. \\ud800): not valid text")

    text = obj.get(cfg.text_field)
    if text is None:
        raise DataError(path, lineno, cfg.text_field, "missing")
    if not isinstance(text, str):
        raise DataError(path, lineno, cfg.text_field, f"expected a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(path, lineno, cfg.text_field, "empty")

    if labels is not None and cfg.category_field not in obj:
        candidates = list(labels)  # a fixed label set replaces per-row candidates
    else:
        raw_cands = obj.get(cfg.category_field)
        if raw_cands is None:
            raise DataError(path, lineno, cfg.category_field, "missing")
        try:
            candidates = parse_candidates(raw_cands)
        except TypeError as e:
            raise DataError(path, lineno, cfg.category_field, str(e)) from None
        if not candidates:
            raise DataError(path, lineno, cfg.category_field, "empty")
        dup = [c for c, n in Counter(candidates).items() if n > 1]
        if dup:
            raise DataError(path, lineno, cfg.category_field, f"duplicate candidate {dup[0]!r}")

    label = obj.get(cfg.output_field)
    several = None
    if label is None:
        if need_label:
            raise DataError(path, lineno, cfg.output_field, "missing")
    elif isinstance(label, list):
        several = _several(label, candidates, path, lineno, cfg)
    else:
        if not isinstance(label, str):
            raise DataError(path, lineno, cfg.output_field, f"expected a string, got {type(label).__name__}")
        label = label.strip()
        if not label:
            if need_label:
                raise DataError(path, lineno, cfg.output_field, "empty")
            label = None
        elif label not in candidates:
            if not _SPLIT.search(label):
                raise DataError(path, lineno, cfg.output_field, f"{label!r} is not among the candidates {candidates}")
            several = _several(parse_candidates(label), candidates, path, lineno, cfg)
    if several is not None:  # a one-label list is an ordinary single-label row
        label, several = (several[0], None) if len(several) == 1 else (None, several)
    return Row(text=text, candidates=candidates, label=label, line=lineno, labels=several)


def _encodable(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return True
    except (UnicodeEncodeError, RecursionError):
        return False


def _several(values: list, candidates: list[str], path: Path, lineno: int, cfg: DataConfig) -> list[str]:
    """The true labels of a multi-label ``output`` (a list, or a separated string split), in candidate order."""
    field = cfg.output_field
    if not values:
        raise DataError(path, lineno, field, "empty list of labels")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(path, lineno, field, f"label {i + 1} of the list: expected a string, got "
                                                 f"{type(v).__name__}")
        v = v.strip()
        if not v:
            raise DataError(path, lineno, field, f"label {i + 1} of the list is empty")
        if v not in candidates:
            raise DataError(path, lineno, field, f"{v!r} is not among the candidates {candidates}")
        if v in out:
            raise DataError(path, lineno, field, f"duplicate label {v!r}")
        out.append(v)
    if len(out) > 1 and cfg.multi_label == "false":
        raise DataError(path, lineno, field, f"{len(out)} true labels {out}, but data.multi_label is false")
    return sorted(out, key=candidates.index)


def iter_rows(path: str | Path, cfg: DataConfig, need_label: bool = True, on_invalid: str | None = None,
              labels: Optional[list[str]] = None, invalid: Optional[list[DataError]] = None) -> Iterator[Row]:
    """Yield valid rows of a raw jsonl file. Bad rows raise :class:`DataError` or, with ``on_invalid="skip"``,
    are appended to ``invalid`` and skipped. Blank lines are ignored."""
    path = Path(path)
    on_invalid = on_invalid or cfg.on_invalid
    if path.is_dir():
        raise FileNotFoundError(f"{path}: is a directory, not a data file")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                yield _parse_line(raw.rstrip(b"\r\n"), path, lineno, cfg, need_label, labels)
            except DataError as e:
                if on_invalid != "skip":
                    raise
                if invalid is not None:
                    invalid.append(e)


def read_rows(path: str | Path, cfg: DataConfig, need_label: bool = True, on_invalid: str | None = None,
              labels: Optional[list[str]] = None, limit: Optional[int] = None) -> tuple[list[Row], list[DataError]]:
    invalid: list[DataError] = []
    rows = []
    for row in iter_rows(path, cfg, need_label, on_invalid, labels, invalid):
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataError(path, 0, None, "no valid rows")
    return rows, invalid


def user_message(row: Row, prompt: PromptConfig) -> str:
    return prompt.user_template.format(text=row.text, category=render_candidates(row.candidates,
                                                                                  prompt.category_format))


def to_instruction(row: Row, prompt: PromptConfig) -> dict:
    """The tutorial's instruction format (instruction, input, output), plus the parsed candidate list so that
    evaluation never has to parse it back out of the prompt text."""
    return {"instruction": prompt.system, "input": user_message(row, prompt), "output": row.labels or row.label,
            "category": row.candidates}



def split_dev(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, dev): ``fraction`` of each label's rows, drawn with ``seed``, become the dev set, so that every label
    with two rows or more is represented as in the whole file and rare labels are not left out by chance. A label
    keeps at least one training row. Written out per label rather than with scikit-learn's stratified splitter,
    which refuses labels with a single row (real data has them)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(rows):  # a multi-label row goes with its first true label in sorted order
        by_label.setdefault(r.label if r.labels is None else min(r.labels), []).append(i)
    dev: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label]
        k = min(len(idx) - 1, max(1 if len(idx) >= 2 else 0, round(fraction * len(idx))))
        dev.update(int(i) for i in rng.permutation(idx)[:k])
    return [r for i, r in enumerate(rows) if i not in dev], [r for i, r in enumerate(rows) if i in dev]


def to_raw(row: Row, cfg: DataConfig) -> dict:
    """A row in the input format it was read from (the configured field names)."""
    return {cfg.text_field: row.text, cfg.category_field: list(row.candidates),
            cfg.output_field: list(row.labels) if row.labels is not None else row.label}
