"""Stage 1 — data: read the tutorial's raw jsonl (or csv, parquet, a JSON list, a dataset: :func:`iter_rows`),
validate every row, convert to the instruction format.

Raw rows look like ``{"text": "...", "category": ["Politics", "Education"], "output": "Politics"}``; ``category``
may also be a string separated by commas or the Chinese enumeration comma 、. ``output`` may hold several true
labels (a multi-label row, docs/MULTILABEL.md): a list, or a string with the same separators (one that is itself a
candidate stays one label). Every problem is reported with file, line and field; with ``on_invalid="skip"`` bad
rows are counted and left out instead.

Just over 400 lines on purpose: every input form (jsonl, JSON, csv, parquet, dataset folders and hub ids) feeds one
validation of a row, so that a bad row is named the same way (file, line or row, field) whatever it came from.
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
    """A row of an input file is invalid; the message names the file, the line (jsonl, csv) or, where a source
    has no lines (parquet, a JSON list, a dataset), the row index (``unit="row"``), and the field."""

    def __init__(self, path: str | Path, line: int, field: str | None, message: str, unit: str = "line"):
        self.path, self.line, self.field, self.reason, self.unit = str(path), line, field, message, unit
        where = f"{path}:{line}" if unit == "line" else f"{path}:row {line}"
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
    if isinstance(obj, dict) and "\\u" in line.lower():
        # only a JSON escape can make a lone surrogate (a decoded file cannot), which no tokenizer can encode
        field = next((k for k, v in obj.items() if not _encodable(v)), None)
        if field is not None:
            raise DataError(path, lineno, field, "an unpaired surrogate escape (e.g. \\ud800): not valid text")
    return _parse_obj(obj, path, lineno, cfg, need_label, labels)


def _parse_obj(obj, path, lineno: int, cfg: DataConfig, need_label: bool, labels: Optional[list[str]]) -> Row:
    """One record, whatever the file format, validated as a jsonl line is."""
    if not isinstance(obj, dict):
        raise DataError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")

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


HUB_PREFIXES = ("hf:", "modelscope:")


def source_exists(path: str | Path) -> bool:
    """Whether a data source is there to read: a file, a local dataset folder, or a hub id (checked on reading)."""
    return str(path).startswith(HUB_PREFIXES) or Path(path).exists()


def source_fingerprint(path: str | Path) -> str:
    """A content hash of a data source, for prepare's cache: a file's bytes, a folder's files (names and bytes);
    a hub id is hashed as its name (a dataset that changes on the hub under the same id is not noticed: pin a
    split or prepare afresh)."""
    from llmcls.files import sha256_file, sha256_json

    text = str(path)
    if text.startswith(HUB_PREFIXES):
        return sha256_json({"hub": text})
    p = Path(path)
    if p.is_dir():
        return sha256_json({str(f.relative_to(p)): sha256_file(f) for f in sorted(p.rglob("*")) if f.is_file()})
    return sha256_file(p)


def _hub_id(source: str) -> tuple[str, str, Optional[str]]:
    """``hf:owner/name[:split]`` -> (hub, name, split)."""
    hub, _, rest = source.partition(":")
    name, _, split = rest.partition(":")
    if not name:
        raise ValueError(f"{source}: expected {hub}:owner/name[:split]")
    return hub, name, split or None


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")


def is_dataset_folder(folder: str | Path) -> bool:
    """A folder that holds a dataset: one written by ``save_to_disk``, or data files ``load_dataset`` reads."""
    folder = Path(folder)
    return ((folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()
            or any(f.suffix.lower() in DATA_SUFFIXES for f in folder.rglob("*") if f.is_file()))


def _load_dataset_rows(source: str | Path):
    """Records of a dataset: ``hf:owner/name[:split]`` (datasets.load_dataset: the Hub, or its local cache when
    HF_DATASETS_OFFLINE=1; a local folder works too), ``modelscope:owner/name[:split]`` (the repository's
    data files through ModelScope's snapshot download and its cache), or a local folder (one written by ``Dataset.save_to_disk``, or one of data files that
    ``load_dataset(folder)`` reads). The split defaults to ``train``."""
    import datasets

    text = str(source)
    if text.startswith("modelscope:"):
        # The repository's files (ModelScope's own cache, which it fills once online), then read as a folder of
        # data files: MsDataset itself needs modelscope's [datasets] extras that plain installs lack.
        _, name, split = _hub_id(text)
        from modelscope.hub.snapshot_download import dataset_snapshot_download

        try:
            folder = dataset_snapshot_download(name)
        except Exception as e:  # network or hub errors: one line naming the source and what to do
            raise ValueError(f"{text}: could not fetch the dataset from ModelScope ({type(e).__name__}: {e}); "
                             "fetch it once online, or point the data file at its downloaded files") from None
        ds = datasets.load_dataset(str(folder))
        split = split or "train"
    elif text.startswith("hf:"):
        _, name, split = _hub_id(text)
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except (FileNotFoundError, ConnectionError, ValueError) as e:  # not found, offline without a cache, no split
            raise ValueError(f"{text}: datasets could not load it ({type(e).__name__}: {str(e).splitlines()[0]})"
                             ) from None
    else:
        folder = Path(text)
        if not is_dataset_folder(folder):
            raise FileNotFoundError(f"{folder}: is a directory with no data files or saved dataset in it")
        if (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(folder))  # save_to_disk's layout: load_dataset cannot read it
        else:
            ds = datasets.load_dataset(str(folder))
        split = None
    if isinstance(ds, (datasets.DatasetDict, dict)):
        split = split or "train"
        if split not in ds:
            raise ValueError(f"{text}: no split {split!r} (it has {sorted(ds)}); name one as {text}:SPLIT")
        ds = ds[split]
    return ds


def _records(path: str | Path) -> Iterator[tuple[int, str, object]]:
    """(number, unit, record) of every record of a source: jsonl lines stay raw bytes (parsed by
    :func:`_parse_line`, which reports undecodable bytes); csv rows are dicts numbered by the line they start on;
    parquet, JSON-list and dataset rows are dicts numbered by their 0-based row index."""
    text = str(path)
    if text.startswith(HUB_PREFIXES) or Path(text).is_dir():
        for i, rec in enumerate(_load_dataset_rows(text)):
            yield i, "row", rec
        return
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv" or suffix == ".tsv":
        import csv

        # The csv module, not pandas or datasets' csv loader: every cell stays a string (a text "2024" is not
        # turned into a number) and line_num gives the line a row starts on, even when a quoted cell spans lines.
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            start = 1
            try:
                if reader.fieldnames is None:  # reads the header, so line_num counts it (an empty file: no rows)
                    return
                start = reader.line_num + 1
                for rec in reader:
                    if any(v for v in rec.values() if isinstance(v, str) and v.strip()):
                        # an empty cell is a missing value, as in a jsonl row without the key
                        yield start, "line", {k: v for k, v in rec.items() if k is not None and v not in ("", None)}
                    start = reader.line_num + 1
            except UnicodeDecodeError as e:
                raise DataError(path, start, None, f"undecodable bytes (not UTF-8) at byte {e.start}") from None
            except csv.Error as e:
                raise DataError(path, start, None, f"invalid CSV: {e}") from None
        return
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                yield -1, "row", rec
        return
    if suffix == ".json":
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):  # a JSON list of objects; anything else is read as JSON lines
            try:
                items = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(path, getattr(e, "lineno", 0), None, f"invalid JSON: {e}") from None
            for i, rec in enumerate(items):
                yield i, "row", rec
            return
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.strip():
                yield lineno, "raw", raw.rstrip(b"\r\n")


def texts_at(path: str | Path, text_field: str, numbers: set[int]) -> dict[int, str]:
    """The texts of the records numbered ``numbers`` (``Row.line``: a line, or a row index), unvalidated; for the
    report, which shows the text of each mistake."""
    out: dict[int, str] = {}
    index = -1
    for number, unit, rec in _records(path):
        index += 1
        number = index if number < 0 else number
        if number not in numbers:
            continue
        try:
            obj = json.loads(rec) if unit == "raw" else rec
            out[number] = str(obj.get(text_field, ""))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    return out


def iter_rows(path: str | Path, cfg: DataConfig, need_label: bool = True, on_invalid: str | None = None,
              labels: Optional[list[str]] = None, invalid: Optional[list[DataError]] = None) -> Iterator[Row]:
    """Yield valid rows of a data source: jsonl (blank lines ignored), .json (a list of objects, or JSON lines),
    .csv / .tsv (a header row names the columns), .parquet, a local dataset folder, or ``hf:owner/name[:split]``
    / ``modelscope:owner/name[:split]``. Bad rows raise :class:`DataError` or, with ``on_invalid="skip"``, are
    appended to ``invalid`` and skipped."""
    on_invalid = on_invalid or cfg.on_invalid
    index = -1
    for number, unit, rec in _records(path):
        index += 1
        if number < 0:  # parquet: the row index, counted here across record batches
            number = index
        try:
            if unit == "raw":
                yield _parse_line(rec, Path(path), number, cfg, need_label, labels)
                continue
            try:
                yield _parse_obj(rec, path, number, cfg, need_label, labels)
            except DataError as e:
                raise DataError(e.path, e.line, e.field, e.reason, unit) from None
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
