"""Whole documents: a text longer than ``data.max_length`` read in windows instead of cut to its lead.

With ``data.long_text: windows`` a long text is split into windows of its own tokens; each window becomes a row
(same candidates, same label) whose prompt — system message, user template with the window's text, candidates —
plus the longest candidate's answer and end token fits ``max_length``. Every window is scored like any row (one
:func:`llmcls.infer.classify` over all windows, so batching is unchanged), and the per-window scores of a document
are combined into one set of per-candidate log-likelihoods (:func:`combine`). A text that fits is one window: the
row itself, scored exactly as with ``cut``.

Windows are slices of the text's own tokenisation, ``data.window_overlap`` tokens shared by neighbours (at most
half a window), the last one aligned to the text's end (so it is full, overlapping its neighbour more). A slice
ends only where a character ends (byte-level BPE splits some characters, e.g. rare CJK or emoji, over two tokens),
so each window's text is whole characters and the windows' texts, overlaps removed, are the text. The window's
text is re-tokenised inside the prompt, where the tokens at its two edges can merge differently: where a prompt
then comes out longer than the limit, the window width is tightened by the excess and the text split again.

Beyond ``data.max_windows`` windows, that many are kept evenly spaced over the document (the first and the last
always among them); the text between them is not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from llmcls.data import Row
from llmcls.encode import PromptBuilder, PromptTooLong

COMBINE = ("mean", "max", "sum")
# Tokens a window's text costs inside the prompt beyond its own (its edges merge with the template's text):
# starting this much under the limit, most rows' windows fit at the first tokenisation of their prompts (on Fudan
# texts an exact start needed three rounds for nearly every row).
JOIN_MARGIN = 3


@dataclass(frozen=True)
class WindowSettings:
    """``data.long_text`` / ``data.window_overlap`` / ``data.max_windows`` / ``eval.window_combine``."""

    long_text: str = "cut"
    overlap: int = 64
    max_windows: Optional[int] = 16
    combine: str = "mean"

    def __post_init__(self):
        from llmcls.config import ConfigError

        if self.overlap < 0:
            raise ConfigError(f"data.window_overlap={self.overlap}: 0 or more tokens")
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(f"data.max_windows={self.max_windows}: 1 or more (null: no cap)")
        if self.combine not in COMBINE:
            raise ConfigError(f"eval.window_combine={self.combine!r}: one of {', '.join(COMBINE)}")

    @property
    def active(self) -> bool:
        return self.long_text == "windows"


def settings(cfg) -> WindowSettings:
    """A run's window settings (a :class:`llmcls.config.Config`)."""
    return WindowSettings(cfg.data.long_text, cfg.data.window_overlap, cfg.data.max_windows, cfg.eval.window_combine)


@dataclass
class Window:
    row: Row                 # the window as a row: its text, the document's candidates and label
    prompt: list[int]        # its prompt ids (fits max_length with the longest answer)
    start: int               # token span [start, end) of the document's own tokenisation
    end: int
    chars: tuple[int, int]   # its text's character span in the document's text


def _clean(offsets: Sequence[tuple[int, int]], k: int) -> bool:
    """A cut before token ``k`` falls between two characters (not inside a character split over two tokens)."""
    return k <= 0 or k >= len(offsets) or offsets[k][0] >= offsets[k - 1][1]


def _back(offsets, k: int, floor: int) -> int:
    """The nearest clean cut at or before ``k`` and after ``floor`` (``k`` itself where there is none)."""
    j = k
    while j > floor and not _clean(offsets, j):
        j -= 1
    return j if j > floor else k


def _forward(offsets, k: int, ceiling: int) -> int:
    """The nearest clean cut at or after ``k`` and at most ``ceiling``."""
    j = k
    while j < ceiling and not _clean(offsets, j):
        j += 1
    return j


def spans(offsets: Sequence[tuple[int, int]], width: int, overlap: int) -> list[tuple[int, int]]:
    """Token spans [start, end) of windows of at most ``width`` tokens covering ``len(offsets)`` tokens,
    neighbours sharing ``min(overlap, width // 2)`` tokens (more where a cut moves back to a character boundary,
    and for the last window, aligned to the end)."""
    n, width = len(offsets), max(1, width)
    if n <= width:
        return [(0, n)]
    overlap = max(0, min(overlap, width // 2))
    out: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(n, start + width)
        if end >= n:  # the last window: as full as the width allows, ending with the text
            start = _forward(offsets, n - width, start)
            while out and start <= out[-1][0]:
                out.pop()  # the previous window lies wholly inside this one
            out.append((start, n))
            return out
        end = _back(offsets, end, start)
        out.append((start, end))
        start = _back(offsets, end - overlap, start)


def pick(spans_: list[tuple[int, int]], max_windows: Optional[int]) -> list[tuple[int, int]]:
    """At most ``max_windows`` of the spans, evenly spaced, the first and the last among them."""
    k = len(spans_)
    if not max_windows or k <= max_windows:
        return spans_
    if max_windows == 1:
        return spans_[:1]
    return [spans_[round(j * (k - 1) / (max_windows - 1))] for j in range(max_windows)]


def _chars(row: Row, offsets, start: int, end: int) -> tuple[int, int]:
    # Cuts at token starts, so the windows' texts tile the text (whitespace between tokens included).
    return (0 if start == 0 else offsets[start][0]), (len(row.text) if end >= len(offsets) else offsets[end][0])


def split(builder: PromptBuilder, rows: Sequence[Row], max_length: int, s: WindowSettings) -> list[list[Window]]:
    """The windows of each row: one (the row itself, its prompt as :func:`llmcls.infer.prompts_for` builds it)
    where the text fits, else as many as cover the text, capped at ``s.max_windows``. Each window's prompt plus
    the row's longest candidate answer is at most ``max_length`` tokens. Batched tokenizer calls throughout.
    Raises :class:`PromptTooLong` when even an empty text does not fit."""
    limits = [max_length - max(len(builder.answer_ids(c)) for c in r.candidates) for r in rows]
    _, offsets = builder.encode_texts([r.text for r in rows], offsets=True)
    out: list[Optional[list[Window]]] = [None] * len(rows)
    width: dict[int, int] = {}
    whole = []
    for i, empty in enumerate(builder.empty_prompt_lengths([r.candidates for r in rows])):
        if limits[i] - empty <= 0:
            raise PromptTooLong(
                f"the prompt without any text is already {empty} tokens; the limit of {limits[i]} leaves no "
                "room for the text (raise max_length, or shorten the system prompt or the candidates)")
        width[i] = max(1, limits[i] - empty - JOIN_MARGIN)
        if len(offsets[i]) <= width[i] + 8:  # may fit whole (the template's joins shift a few tokens)
            whole.append(i)
    for i, p in zip(whole, builder.batch_prompt_ids([rows[i] for i in whole]) if whole else []):
        if len(p) <= limits[i]:
            out[i] = [Window(rows[i], p, 0, len(offsets[i]), (0, len(rows[i].text)))]
            del width[i]
        else:
            width[i] = min(width[i], len(offsets[i]) - (len(p) - limits[i]))
    while width:
        todo = list(width)
        cut = {i: pick(spans(offsets[i], width[i], s.overlap), s.max_windows) for i in todo}
        flat = [(i, a, b, Row(rows[i].text[slice(*_chars(rows[i], offsets[i], a, b))], rows[i].candidates,
                              rows[i].label, rows[i].line)) for i in todo for a, b in cut[i]]
        prompts = builder.batch_prompt_ids([w for *_, w in flat])
        excess: dict[int, int] = {i: 0 for i in todo}
        for (i, *_), p in zip(flat, prompts):
            excess[i] = max(excess[i], len(p) - limits[i])
        for i in todo:
            if excess[i] <= 0:
                out[i] = [Window(w, p, a, b, _chars(rows[i], offsets[i], a, b))
                          for (j, a, b, w), p in zip(flat, prompts) if j == i]
                del width[i]
            elif width[i] - excess[i] - 1 < 1:
                raise PromptTooLong(f"row at line {rows[i].line}: no window of its text fits {max_length} tokens")
            else:
                width[i] -= excess[i] + 1
    return out  # type: ignore[return-value]


def combine(scores: Sequence[Sequence[float]], rule: str = "mean") -> list[float]:
    """One document's per-candidate scores from its windows' log-likelihoods (one list per window). One window:
    its scores unchanged (so the prediction is the one ``cut`` gives). Several: each window's scores are
    normalised to log-probabilities over the candidates (log-softmax), then ``mean`` (log of the geometric mean
    of the windows' probabilities; the default: a document's confidence does not grow with its number of
    windows, which overlap and share evidence, so one calibration fits short and long documents), ``max`` (each
    candidate's best window: a label signalled in one passage wins) or ``sum`` (product of experts: windows as
    independent evidence, over-confident where they are not)."""
    if len(scores) == 1:
        return [float(x) for x in scores[0]]
    lp = torch.log_softmax(torch.tensor(scores, dtype=torch.float64), dim=-1)
    if rule == "mean":
        out = lp.mean(0)
    elif rule == "max":
        out = lp.max(0).values
    elif rule == "sum":
        out = lp.sum(0)
    else:
        raise ValueError(f"eval.window_combine={rule!r}: one of {', '.join(COMBINE)}")
    return out.tolist()


def expand(builder: PromptBuilder, rows: Sequence[Row], max_length: int, s: WindowSettings
           ) -> tuple[list[Row], list[int]]:
    """The windows of all rows as rows, and for each window the index of its row."""
    flat, owner = [], []
    for i, ws in enumerate(split(builder, rows, max_length, s)):
        flat += [w.row for w in ws]
        owner += [i] * len(ws)
    return flat, owner


def regroup(values: Sequence, owner: Sequence[int], n: int) -> list[list]:
    """Per-window values grouped by their row (``n`` rows)."""
    groups: list[list] = [[] for _ in range(n)]
    for o, v in zip(owner, values):
        groups[o].append(v)
    return groups


def as_read(builder: PromptBuilder, rows: Sequence[Row], max_length: int, s: WindowSettings) -> list[Row]:
    """The rows as windows read them: the whole text, or, past ``max_windows``, the text of the windows kept
    (each character once, in order)."""
    out = []
    for r, ws in zip(rows, split(builder, rows, max_length, s)):
        parts, seen = [], 0
        for a, b in (w.chars for w in ws):
            parts.append(r.text[max(a, seen):b])
            seen = max(seen, b)
        out.append(r if len(ws) == 1 else Row("".join(parts), r.candidates, r.label, r.line))
    return out
