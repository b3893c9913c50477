"""Stage 1+2 recipe — ``llmcls prepare``: validate the raw file, write the tutorial's instruction jsonl, encode
every row and report what the encoding did (rows, invalid, labels, token lengths, shortened, answer kept). A row
with several true labels (a multi-label run) becomes one training example per true label: the prompt, then that
label (docs/MULTILABEL.md).

Outputs are cached on the input file's content, the data and prompt settings and the tokenizer, never on the
mere existence of a file (the tutorial's ``if not os.path.exists``), so an edited input is always re-read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import statistics
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from tqdm.auto import tqdm

from llmcls.config import Config
from llmcls.data import DataError, Row, read_rows, source_fingerprint, split_dev, to_instruction, to_raw
from llmcls.encode import Encoded, PromptBuilder, PromptTooLong, encode_train, encode_train_fit, encode_train_many
from llmcls.files import atomic_dir, atomic_write_json, atomic_write_jsonl, clean_leftovers, sha256_json
from llmcls.multilabel import is_multi_label
from llmcls.rundir import DataDir
from llmcls.windows import WindowSettings, settings, split

CACHE_VERSION = 3  # 2: the encoded rows carry their label (train.class_weights); 3: token_lengths sampled
# Rows whose whole prompt is tokenised for the summary's "tokens before the cut" figures (every row of a smaller
# file): tokenising every long prompt whole was half of prepare's time, for this statistic alone.
LENGTH_SAMPLE_ROWS = 500
# Characters per token that no tokenizer's vocabulary reaches on ordinary text (Qwen's longest tokens are runs of
# whitespace or punctuation of about 16 characters; words average 3-5): a text's first max_length * 16 characters
# hold at least max_length tokens, so a cut there (data.long_text=cut) drops nothing training would have kept.
CHARS_PER_TOKEN = 16

log = logging.getLogger(__name__)


def _tokenizer_key(tok) -> str:
    return sha256_json({"name": tok.name_or_path.rsplit("/", 1)[-1], "vocab": len(tok),
                        "template": tok.chat_template or "", "eos": tok.eos_token_id})


def _percentiles(values: list[int]) -> dict:
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"min": s[0], "median": statistics.median(s), "p90": pick(0.9), "p99": pick(0.99), "max": s[-1],
            "mean": round(sum(s) / len(s), 1)}


def prepare(cfg: Config, tokenizer, out_dir: str | Path, train_file: Optional[str] = None,
            progress: bool = True) -> dict:
    """Convert, validate and encode the training file into ``out_dir``; returns the summary (also written to
    ``out_dir/prepare.json``). Re-running with the same inputs and settings reuses the outputs."""
    train_file = train_file or cfg.data.train_file
    if not train_file:
        raise ValueError("no training file: set data.train_file in the config or pass --train FILE")
    out = DataDir(Path(out_dir))
    every_window = cfg.train.long_text_windows == "all"
    data = {k: v for k, v in vars(cfg.data).items() if k != "num_proc"}  # how many processes changes no output
    key = sha256_json({"v": CACHE_VERSION, "input": source_fingerprint(train_file), "data": data,
                       "prompt": vars(cfg.prompt), "tokenizer": _tokenizer_key(tokenizer),
                       **({"windows": "all"} if every_window else {})})
    clean_leftovers(out.path.parent, names={out.path.name})
    clean_leftovers(out.path)
    if out.summary.is_file() and out.encoded.is_dir():
        cached = json.loads(out.summary.read_text(encoding="utf-8"))
        if cached.get("cache_key") == key:
            cached["cached"] = True
            return cached
    if out.path.is_dir() and any(out.path.iterdir()) and not out.summary.is_file():
        # the folder is replaced as a whole below: one that is not an earlier prepare's may hold a user's files
        raise FileExistsError(f"{out.path} holds files that are not 'llmcls prepare' outputs (no "
                              f"{out.summary.name}); choose an empty or new folder")
    final = out
    with atomic_dir(final.path, exists="replace") as tmp:  # every output replaced as a set, or none
        summary = _prepare_into(cfg, tokenizer, DataDir(tmp), final, train_file, key, progress)
    return summary


def _cut_for_encoding(row: Row, budget: Optional[int]) -> tuple[Row, bool]:
    """A text longer than ``budget`` characters reduced to its lead before it is tokenised: with data.long_text=cut
    only the lead is ever kept, and tokenising all of a 20 MB line cost 2.7 GB. ``budget`` is max_length *
    CHARS_PER_TOKEN, more characters than max_length tokens cover (see the constant), so the cut changes no
    encoded example; the token-length statistics of such a text count its first ``budget`` characters only."""
    if budget is None or len(row.text) <= budget:
        return row, False
    return dataclasses.replace(row, text=row.text[:budget]), True


@dataclass(frozen=True)
class EncodeParams:
    """What encoding a training row depends on besides the tokenizer and the prompt settings."""

    max_length: int
    truncation: str
    every_window: bool                   # train.long_text_windows=all
    windows: WindowSettings
    budget: Optional[int]                # characters tokenised at most (_cut_for_encoding)


@dataclass
class RowEncoding:
    """A row's training examples: per true label (label, its encoding, the examples trained on: the encoding
    itself, or one per window), or the reason the row cannot be encoded."""

    was_cut: bool = False
    examples: list[tuple[str, Encoded, list[Encoded]]] = field(default_factory=list)
    error: Optional[str] = None


def encode_one_by_one(builder: PromptBuilder, rows: Sequence[Row], p: EncodeParams) -> list[RowEncoding]:
    """The rows encoded one at a time (a few tokenizer calls per row): the reference the batched path must equal
    (tests, benchmarks/prepare_speed.py), and the path that says which row of a chunk cannot be encoded."""
    out = []
    for start in range(0, len(rows), 256):
        chunk = rows[start:start + 256]
        cut = [_cut_for_encoding(r, p.budget) for r in chunk]
        for (short, was_cut), ids in zip(cut, builder.batch_prompt_ids([c for c, _ in cut])):
            res = RowEncoding(was_cut)
            try:
                for one in one_per_label(short):  # a multi-label row: one example per true label
                    enc = encode_train(builder, one, p.max_length, p.truncation, ids)
                    # train.long_text_windows=all: every window of a long text is an example (windows as eval
                    # reads them); the statistics stay those of the whole text.
                    wins = (split(builder, [one], p.max_length, p.windows)[0]
                            if p.every_window and enc.shortened else [])
                    res.examples.append((one.label, enc, [encode_train(builder, w.row, p.max_length, p.truncation,
                                                                       w.prompt) for w in wins] or [enc]))
            except PromptTooLong as e:
                res = RowEncoding(was_cut, error=str(e))
            out.append(res)
    return out


def encode_batched(builder: PromptBuilder, rows: Sequence[Row], p: EncodeParams,
                   measure: Optional[Sequence[bool]] = None) -> list[RowEncoding]:
    """:func:`encode_one_by_one`'s result, from a few batched tokenizer calls for all the rows (the same strings
    tokenised, so the same ids), except that with truncation 'text' an example's ``full_length`` is None where the
    row is not in ``measure`` (default: all are) and a head of its text proved it at least max_length tokens long
    (:func:`llmcls.encode.encode_train_fit`): its whole prompt is then never tokenised."""
    measure = [True] * len(rows) if measure is None else measure
    cut = [_cut_for_encoding(r, p.budget) for r in rows]
    ex = [(i, one) for i, (short, _) in enumerate(cut) for one in one_per_label(short)]
    try:
        if p.truncation == "text":
            encs = encode_train_fit(builder, [one for _, one in ex], p.max_length, [measure[i] for i, _ in ex])
        else:  # the right cut keeps the whole prompt's first tokens: every prompt is tokenised whole
            whole = builder.batch_prompt_ids([c for c, _ in cut]) if rows else []
            encs = encode_train_many(builder, [one for _, one in ex], p.max_length, p.truncation,
                                     [whole[i] for i, _ in ex])
        long = [k for k, e in enumerate(encs) if p.every_window and e.shortened]
        wins = dict(zip(long, split(builder, [ex[k][1] for k in long], p.max_length, p.windows) if long else []))
    except PromptTooLong:  # a batched call stops at its first such row: one at a time tells each row's fate
        return encode_one_by_one(builder, rows, p)
    out = [RowEncoding(was_cut) for _, was_cut in cut]
    for k, ((i, one), enc) in enumerate(zip(ex, encs)):
        examples = [encode_train(builder, w.row, p.max_length, p.truncation, w.prompt) for w in wins.get(k, [])]
        out[i].examples.append((one.label, enc, examples or [enc]))
    return out


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_worker: Optional[tuple[PromptBuilder, EncodeParams]] = None


def _start_worker(tokenizer, prompt, p: EncodeParams) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # see _pool (a spawned worker gets here before any call)
    _worker = (PromptBuilder(tokenizer, prompt), p)


def _encode_in_worker(chunk: tuple[list[Row], list[bool]]) -> list[RowEncoding]:
    builder, p = _worker  # type: ignore[misc]
    return encode_batched(builder, chunk[0], p, chunk[1])


@contextmanager
def _pool(procs: int, builder: PromptBuilder, p: EncodeParams):
    # Each worker is one core of the spread, so the tokenizer's own threads would oversubscribe; and a forked child
    # must not touch the parent's thread pool (tokenizers turns it off then, with a warning on stderr). With the
    # setting present at the fork, the children start with it off, quietly; the parent gets its value back.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(procs, _start_worker, (builder.tok, builder.prompt, p))
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    with pool:
        yield pool


def encode_rows(builder: PromptBuilder, rows: Sequence[Row], p: EncodeParams, num_proc: Optional[int] = None,
                progress: bool = False, measure: Optional[Sequence[bool]] = None) -> Iterator[RowEncoding]:
    """Each row's :class:`RowEncoding`, in order: chunks of rows encoded by :func:`encode_batched` in ``num_proc``
    processes (default: every core this process may use), or in this process (1, or too few rows for two chunks),
    where the tokenizer's batched calls use its own threads. ``measure``: the rows whose whole prompt length must
    be known (default: all; see :func:`encode_batched`)."""
    measure = [True] * len(rows) if measure is None else list(measure)
    procs = num_proc or available_cpus()
    # Several chunks per process even out their different lengths; a chunk of at least 32 rows keeps each
    # tokenizer call a batch, and small inputs in this process.
    size = 256 if procs == 1 else max(32, min(256, -(-len(rows) // (procs * 8))))
    chunks = [(list(rows[i:i + size]), measure[i:i + size]) for i in range(0, len(rows), size)]
    procs = 1 if multiprocessing.current_process().daemon else min(procs, len(chunks))  # no children of a daemon
    bar = tqdm(total=len(rows), desc="encode", unit="row", disable=not progress)
    try:
        if procs <= 1:
            for chunk, flags in chunks:
                yield from encode_batched(builder, chunk, p, flags)
                bar.update(len(chunk))
        else:
            with _pool(procs, builder, p) as pool:
                for chunk, res in zip(chunks, pool.imap(_encode_in_worker, chunks)):
                    yield from res
                    bar.update(len(chunk[0]))
    finally:
        bar.close()


def _prepare_into(cfg: Config, tokenizer, out: DataDir, final: DataDir, train_file: str, key: str,
                  progress: bool) -> dict:
    """Write prepare's outputs into ``out`` (a temporary folder), naming ``final`` where the summary records a
    path."""
    from datasets import Dataset

    every_window = cfg.train.long_text_windows == "all"
    budget = (cfg.data.max_length * CHARS_PER_TOKEN
              if cfg.data.long_text == "cut" and not every_window else None)  # windows read the whole text

    rows, invalid = read_rows(train_file, cfg.data, limit=cfg.data.max_train_rows)
    duplicates = count_duplicates(rows)
    if duplicates:
        log.warning("%s: %d rows repeat an earlier row (same text, candidates and labels); kept", train_file,
                    duplicates)
    multi = is_multi_label(rows, cfg.data.multi_label)  # decided on every row read, the dev rows included
    dev_info = None
    if cfg.data.dev_fraction > 0:  # the dev rows leave training before anything is encoded
        rows, dev = split_dev(rows, cfg.data.dev_fraction, cfg.data.split_seed)
        atomic_write_jsonl(out.dev, (to_raw(r, cfg.data) for r in dev))
        dev_labels = Counter(t for r in dev for t in r.true_labels)
        dev_info = {"file": str(final.dev), "rows": len(dev), "fraction": cfg.data.dev_fraction,
                    "seed": cfg.data.split_seed, "labels": dict(dev_labels.most_common()),
                    "lines": [r.line for r in dev]}  # lines of the training file: the split can be checked
    params = EncodeParams(cfg.data.max_length, cfg.data.truncation, every_window, settings(cfg), budget)
    cols: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "label": []}
    full_lengths, shortened, kept, tutorial_kept, sampled = [], 0, 0, 0, 0
    used, windows_per_row = [], []
    builder = PromptBuilder(tokenizer, cfg.prompt)
    # The rows whose whole prompt is measured: every stride-th, at most LENGTH_SAMPLE_ROWS (all of a smaller file);
    # a fixed stride, so the same file gives the same figures, and the summary says how many were measured.
    stride = -(-len(rows) // LENGTH_SAMPLE_ROWS) if rows else 1
    measure = [i % stride == 0 for i in range(len(rows))]
    encodings = encode_rows(builder, rows, params, cfg.data.num_proc, progress, measure=measure)
    for row, measured, res in zip(rows, measure, encodings):
        if res.error is not None:
            err = DataError(train_file, row.line, cfg.data.category_field, res.error)
            if cfg.data.on_invalid != "skip":
                raise err from None
            invalid.append(err)
            continue
        used.append(row)
        windows_per_row.append(sum(len(es) for _, _, es in res.examples))
        for label, enc, examples in res.examples:
            for e in examples:
                cols["input_ids"].append(e.input_ids)
                cols["labels"].append(e.labels)
                cols["length"].append(len(e.input_ids))
                cols["label"].append(label)
            if measured:
                full_lengths.append(enc.full_length)
            shortened += enc.shortened or res.was_cut
            kept += enc.answer_kept
            # The tutorial cuts prompt+answer from the right: an answer token survives iff the prompt is shorter.
            # full_length None: a head of the text proved the prompt at least max_length long (encode_train_fit).
            tutorial_kept += (enc.full_length is not None
                              and enc.full_length - len(builder.answer_ids(label)) < cfg.data.max_length)
        sampled += measured

    rows = used
    if not rows:
        raise DataError(train_file, 0, None, "no row fits max_length")
    atomic_write_jsonl(out.instructions, (to_instruction(r, cfg.prompt) for r in rows))
    with atomic_dir(out.encoded, exists="replace") as tmp:
        Dataset.from_dict(cols).save_to_disk(str(tmp))

    labels = Counter(t for r in rows for t in r.true_labels)
    summary = {
        "file": str(train_file), "rows": len(rows), "invalid": len(invalid),
        "invalid_examples": [str(e) for e in invalid[:20]],
        "labels": dict(labels.most_common()), "num_labels": len(labels),
        "max_length": cfg.data.max_length, "truncation": cfg.data.truncation,
        # measured on a sample of the rows (every row of a file of at most LENGTH_SAMPLE_ROWS): said in the summary
        "token_lengths": {**(_percentiles(full_lengths) if full_lengths else {}), "sampled_rows": sampled,
                          "of": len(rows)},
        "trained_tokens": sum(cols["length"]),
        "shortened": shortened, "answer_kept": kept, "tutorial_answer_kept": tutorial_kept,
        "dev": dev_info, "cache_key": key, "cached": False, "duplicates": duplicates,
    }
    if every_window:
        summary["windows"] = {"long_text_windows": "all", "examples": len(cols["label"]),
                              "overlap": cfg.data.window_overlap, "max_windows": cfg.data.max_windows,
                              "per_row": _percentiles(windows_per_row)}
    if multi:  # shortened, answer_kept and the token lengths count training examples, one per true label
        summary.update(multi_label=True, examples=len(cols["input_ids"]),
                       rows_with_several_labels=sum(r.labels is not None for r in rows))
    atomic_write_json(out.summary, summary)
    return summary


def one_per_label(row: Row) -> list[Row]:
    """The training examples of a row: itself, or for a multi-label row one per true label (the same prompt, each
    answered with one of its labels), so that every true label is taught and the scorer's softmax learns to share
    the probability among them."""
    if row.labels is None:
        return [row]
    return [dataclasses.replace(row, label=label, labels=None) for label in row.labels]


def load_encoded(out_dir: str | Path):
    from datasets import load_from_disk

    return load_from_disk(str(DataDir(Path(out_dir)).encoded))


def count_duplicates(rows: list[Row]) -> int:
    """Rows repeating an earlier row (same text, candidates and true labels): kept, as the file asks, but counted,
    since they weigh their label twice and can leak into a dev split."""
    seen: set = set()
    n = 0
    for r in rows:
        key = (r.text, tuple(r.candidates), tuple(r.true_labels))
        n += key in seen
        seen.add(key)
    return n


def _sampled(token_lengths: dict) -> str:
    """How many rows the token lengths were measured on, where that is not every row."""
    n, of = token_lengths.get("sampled_rows"), token_lengths.get("of")
    return f" (sampled: {n} of {of} rows, a fixed stride)" if n is not None and n != of else ""


def summary_lines(summary: dict) -> list[str]:
    """The summary as ``llmcls prepare`` prints it."""
    lines = [f"{summary['rows']} rows ({summary['invalid']} invalid skipped), {summary['num_labels']} labels"]
    if summary.get("multi_label"):
        lines.append(f"multi-label: {summary['rows_with_several_labels']} rows with several true labels, "
                     f"{summary['examples']} training examples (one per true label)")
    lines += [f"  {label:<24} {n}" for label, n in summary["labels"].items()]
    tl = summary["token_lengths"]
    lines.append(f"tokens per row before the cut{_sampled(tl)}: median {tl.get('median')}, p90 {tl.get('p90')}, "
                 f"max {tl.get('max')}")
    lines.append(f"shortened to {summary['max_length']} tokens: {summary['shortened']}; whole answer kept: "
                 f"{summary['answer_kept']}/{summary['rows']} (the tutorial's right cut keeps an answer token in "
                 f"{summary['tutorial_answer_kept']})")
    if summary.get("windows"):
        w = summary["windows"]
        lines.append(f"every window of a long text trained on: {w['examples']} examples from {summary['rows']} rows "
                     f"(windows per row: median {w['per_row']['median']}, p90 {w['per_row']['p90']}, "
                     f"max {w['per_row']['max']})")
    lines += [f"  skipped: {e}" for e in summary["invalid_examples"]]
    if summary.get("duplicates"):
        lines.append(f"duplicate rows (same text, candidates and labels as an earlier row; kept): "
                     f"{summary['duplicates']}")
    if summary.get("dev"):
        d = summary["dev"]
        lines.append(f"dev set: {d['rows']} rows ({d['fraction']:.0%} of each label, seed {d['seed']}) in {d['file']}")
    return lines
