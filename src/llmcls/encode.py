"""Stage 2 — encoding: chat-template prompts, answer-keeping truncation, label masking, padding. Training batches
are made in ``llmcls.collate``.

The tutorial appends the answer to the prompt and then cuts the row at ``max_length`` from the right, which on
Fudan news removes the answer from most training rows. Here the *text* is shortened instead (cut on a character
boundary, the prompt rebuilt and re-tokenised), so every training row keeps its whole answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from llmcls.config import PromptConfig
from llmcls.data import Row, user_message

IGNORE = -100


class PromptTooLong(ValueError):
    """Even with an empty text, the prompt and answer exceed ``max_length``."""


class PromptBuilder:
    """Builds token ids of prompts and answers with the tokenizer's own chat template."""

    def __init__(self, tokenizer, prompt: PromptConfig):
        self.tok = tokenizer
        self.prompt = prompt
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end token (eos); chat models end each turn with one")
        self.end_id = tokenizer.eos_token_id
        self._answer_cache: dict[str, list[int]] = {}
        self._empty_cache: dict[tuple, int] = {}
        self._frame: Optional[tuple[str, str]] | bool = False  # False: not looked at yet (see _template_frame)

    def messages(self, row: Row) -> list[dict]:
        return self._messages(user_message(row, self.prompt))

    def _messages(self, user: str) -> list[dict]:
        return [{"role": "system", "content": self.prompt.system}, {"role": "user", "content": user}]

    def _render(self, user: str) -> str:
        return self.tok.apply_chat_template(self._messages(user), tokenize=False, add_generation_prompt=True)

    def _template_frame(self) -> Optional[tuple[str, str]]:
        """(before, after): the rendered prompt around the user message, where the chat template inserts that
        message as it is; None where it changes it (trims it, say), and every prompt is then rendered. Rendering
        the template (jinja, per row) was ~8% of prepare's time. Checked on probes with edge spaces, newlines,
        braces and a special token: each must come out as before + probe + after."""
        if self._frame is False:
            probes = ("llmcls-probe", " \n llmcls probe\twith {{ braces }}, {% tags %} and <|im_end|>\n ")
            first = self._render(probes[0])
            frame = None
            if first.count(probes[0]) == 1:
                k = first.index(probes[0])
                frame = (first[:k], first[k + len(probes[0]):])
                if any(self._render(p) != frame[0] + p + frame[1] for p in probes[1:]):
                    frame = None
            self._frame = frame
        return self._frame  # type: ignore[return-value]

    def prompt_text(self, row: Row) -> str:
        frame = self._template_frame()
        if frame is None:
            return self.tok.apply_chat_template(self.messages(row), tokenize=False, add_generation_prompt=True)
        return frame[0] + user_message(row, self.prompt) + frame[1]

    def encode_texts(self, texts: Sequence[str], offsets: bool = False) -> tuple[list[list[int]], Optional[list]]:
        """Ids (and, with ``offsets``, each token's character span) of many texts, no special tokens added, in one
        batched call. A fast tokenizer's own batch call where it cuts and pads nothing (what ``tokenizer(texts)``
        runs, without transformers converting every field of every encoding: ~6% of prepare's time); the
        tokenizer's ``__call__`` otherwise."""
        backend = getattr(self.tok, "backend_tokenizer", None) if getattr(self.tok, "is_fast", False) else None
        if backend is not None and backend.truncation is None and backend.padding is None:
            encs = backend.encode_batch(list(texts), add_special_tokens=False)
            return [e.ids for e in encs], ([e.offsets for e in encs] if offsets else None)
        out = self.tok(list(texts), add_special_tokens=False, return_offsets_mapping=offsets)
        return out["input_ids"], (out["offset_mapping"] if offsets else None)

    def prompt_ids(self, row: Row) -> list[int]:
        # Special tokens are already in the rendered template; add_special_tokens would add a BOS for some models.
        return self.tok(self.prompt_text(row), add_special_tokens=False)["input_ids"]

    def batch_prompt_ids(self, rows: Sequence[Row]) -> list[list[int]]:
        """Prompt ids of many rows in one call (the fast tokenizer works on them in parallel)."""
        return self.encode_texts([self.prompt_text(r) for r in rows])[0]

    def empty_prompt_length(self, candidates: Sequence[str]) -> int:
        """Tokens of the prompt around an empty text: the part no shortening can remove."""
        return self.empty_prompt_lengths([candidates])[0]

    def empty_prompt_lengths(self, candidate_sets: Sequence[Sequence[str]]) -> list[int]:
        """:meth:`empty_prompt_length` of many candidate sets, the new ones in one batched call (a data set of
        shuffled candidate lists has nearly one set per row)."""
        new = list(dict.fromkeys(tuple(c) for c in candidate_sets if tuple(c) not in self._empty_cache))
        if new:
            ids, _ = self.encode_texts([self.prompt_text(Row("", list(c), None)) for c in new])
            self._empty_cache.update((c, len(i)) for c, i in zip(new, ids))
        return [self._empty_cache[tuple(c)] for c in candidate_sets]

    def label_ids(self, label: str) -> list[int]:
        """Tokens of a label as the assistant's reply (no end token)."""
        if label not in self._answer_cache:
            self._answer_cache[label] = self.tok(label, add_special_tokens=False)["input_ids"]
        return self._answer_cache[label]

    def answer_ids(self, label: str) -> list[int]:
        return self.label_ids(label) + [self.end_id]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    shortened: bool      # the text was cut to fit
    answer_kept: bool    # every answer token is still trained on
    # prompt + answer tokens before any cut; None where prepare's fast path (encode_train_fit) did not tokenise the
    # whole prompt because a head of its text already proved it at least max_length tokens long
    full_length: Optional[int]


def _first_head(budget_tokens: int) -> int:
    return max(64, budget_tokens * 2)  # characters: enough for the budget unless a token averages over two


def _cut_at(row: Row, offsets: Sequence[tuple[int, int]], budget_tokens: int) -> Row:
    """The row with its text cut on the character boundary after ``budget_tokens`` of its tokens (``offsets``)."""
    keep = max(0, min(budget_tokens, len(offsets)))
    cut = offsets[keep - 1][1] if keep > 0 else 0
    return Row(text=row.text[:cut], candidates=row.candidates, label=row.label, line=row.line)


def _tokenise_whole(row: Row, max_tokens: int) -> bool:
    # Past 2 characters per token of budget a text is usually too long (Chinese news runs ~1.3 characters a
    # token): only its head is tokenised then (fit_rows), which also handles one that fits after all.
    return len(row.text) <= 2 * max_tokens


def fit_prompt(builder: PromptBuilder, row: Row, max_tokens: int,
               prompt_ids: Optional[list[int]] = None) -> tuple[list[int], bool]:
    """Prompt ids of at most ``max_tokens``, shortening the text (never the instructions or candidates).
    Returns (ids, shortened). Raises :class:`PromptTooLong` when even an empty text does not fit."""
    fitted, ids = fit_row(builder, row, max_tokens, prompt_ids)
    return ids, fitted is not row


def fit_prompts(builder: PromptBuilder, rows: Sequence[Row], max_tokens: Sequence[int]) -> list[list[int]]:
    """:func:`fit_prompt`'s ids for many rows (``max_tokens`` per row), in batched tokenizer calls."""
    return [ids for _, ids in fit_rows(builder, rows, max_tokens)]


def fit_row(builder: PromptBuilder, row: Row, max_tokens: int,
            prompt_ids: Optional[list[int]] = None) -> tuple[Row, list[int]]:
    """The row (with its text shortened if needed) and its prompt ids, at most ``max_tokens`` of them."""
    return fit_rows(builder, [row], [max_tokens], [prompt_ids])[0]


def fit_rows(builder: PromptBuilder, rows: Sequence[Row], max_tokens: Sequence[int],
             prompt_ids: Optional[Sequence[Optional[list[int]]]] = None,
             heads: Optional[dict] = None) -> list[tuple[Row, list[int]]]:
    """Each row (its text shortened if needed) with its prompt ids, at most ``max_tokens[i]`` of them, from batched
    tokenizer calls (parallel, and off the GIL). A long text is never tokenised whole (slow for long Chinese
    texts): only as much of its head as can fit, cut after its token budget; the cut prompt is re-tokenised, and
    where the template's token boundaries moved the budget is tightened and the row cut again. The rows go
    through that loop in lockstep: each round, one tokenizer call for the heads and one for the cut prompts.
    Raises :class:`PromptTooLong` when even an empty text does not fit. ``heads``, if given, receives for each
    row index that was cut (tokens of the text's head in the round that made the accepted cut, whether that head
    was the whole text, the head's characters): what :func:`encode_train_fit` proves a prompt's length with."""
    prompts = list(prompt_ids) if prompt_ids is not None else [None] * len(rows)
    whole = [i for i, p in enumerate(prompts) if p is None and _tokenise_whole(rows[i], max_tokens[i])]
    for i, p in zip(whole, builder.batch_prompt_ids([rows[i] for i in whole]) if whole else []):
        prompts[i] = p
    out: list[Optional[tuple[Row, list[int]]]] = [
        (r, p) if p is not None and len(p) <= n else None for r, n, p in zip(rows, max_tokens, prompts)]
    budget: dict[int, int] = {}
    left = [i for i, o in enumerate(out) if o is None]
    for i, empty in zip(left, builder.empty_prompt_lengths([rows[i].candidates for i in left])):
        if max_tokens[i] - empty <= 0:
            raise PromptTooLong(
                f"the prompt without any text is already {empty} tokens; the limit of {max_tokens[i]} leaves no "
                "room for the text (raise max_length, or shorten the system prompt or the candidates)")
        budget[i] = max_tokens[i] - empty
    head = {i: _first_head(b) for i, b in budget.items()}  # characters of the text tokenised this round
    while budget:
        todo = list(budget)
        _, offsets = builder.encode_texts([rows[i].text[:head[i]] for i in todo], offsets=True)
        cuts = []
        for i, off in zip(todo, offsets):
            if len(off) > budget[i] or head[i] >= len(rows[i].text):
                cuts.append((i, _cut_at(rows[i], off, budget[i])))
                if heads is not None:
                    heads[i] = (len(off), head[i] >= len(rows[i].text), head[i])
            else:
                head[i] *= 2  # the head held too few tokens: a longer one next round
        for (i, cut), p in zip(cuts, builder.batch_prompt_ids([c for _, c in cuts]) if cuts else []):
            excess = len(p) - max_tokens[i]
            if excess <= 0:
                out[i] = (cut if len(cut.text) < len(rows[i].text) else rows[i], p)
                del budget[i]
            else:  # token boundaries moved at the cut: tighten, and cut from a head of the new budget
                budget[i] -= excess
                head[i] = _first_head(budget[i])
    return out  # type: ignore[return-value]


def encode_train(builder: PromptBuilder, row: Row, max_length: int, truncation: str = "text",
                 prompt_ids: Optional[list[int]] = None) -> Encoded:
    """Token ids and loss labels of one training row (prompt tokens masked with -100)."""
    answer = builder.answer_ids(row.label)
    prompt = prompt_ids if prompt_ids is not None else builder.prompt_ids(row)
    full = len(prompt) + len(answer)
    if full <= max_length:
        return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, False, True, full)
    if truncation == "right":  # the tutorial's way, kept for comparisons and benchmarks
        ids = (prompt + answer)[:max_length]
        labels = ([IGNORE] * len(prompt) + answer)[:max_length]
        return Encoded(ids, labels, True, False, full)
    prompt, _ = fit_prompt(builder, row, max_length - len(answer), prompt)
    return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, True, True, full)


def encode_train_many(builder: PromptBuilder, rows: Sequence[Row], max_length: int, truncation: str = "text",
                      prompt_ids: Optional[Sequence[list[int]]] = None) -> list[Encoded]:
    """:func:`encode_train` of many rows, exactly: the rows to shorten go through :func:`fit_rows` together (a
    few batched tokenizer calls for all of them instead of a few per row)."""
    prompts = list(prompt_ids) if prompt_ids is not None else builder.batch_prompt_ids(rows)
    out: list[Optional[Encoded]] = []
    fit = []
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        if len(prompt) + len(builder.answer_ids(row.label)) <= max_length or truncation == "right":
            out.append(encode_train(builder, row, max_length, truncation, prompt))  # no tokenizer call
        else:
            out.append(None)
            fit.append(i)
    fitted = fit_rows(builder, [rows[i] for i in fit],
                      [max_length - len(builder.answer_ids(rows[i].label)) for i in fit], [prompts[i] for i in fit])
    for i, (_, prompt) in zip(fit, fitted):
        answer = builder.answer_ids(rows[i].label)
        out[i] = Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, True, True, len(prompts[i]) + len(answer))
    return out  # type: ignore[return-value]


# Tokens by which a prompt can fall short of (the empty prompt + the tokens of its text's head): the head's last
# pre-token, cut mid-way, can tokenise into more pieces than the whole one does, and the text's edges can merge with
# the template's around them. Both are a few tokens; 32 leaves room. A head that beats the budget by less is
# settled by tokenising the whole prompt, as the reference does.
PROOF_SLACK = 32


def encode_train_fit(builder: PromptBuilder, rows: Sequence[Row], max_length: int,
                     measure: Optional[Sequence[bool]] = None) -> list[Encoded]:
    """:func:`encode_train_many` with truncation 'text' (the same ids, labels, ``shortened``, ``answer_kept``), without
    tokenising every long prompt whole: that was half of prepare's time, and only the summary's length statistic
    used it. A row's whole prompt is tokenised when ``measure[i]`` (prepare's sample for that statistic), when its
    text is short (:func:`fit_rows` would anyway), or when the head that :func:`fit_rows` tokenised does not prove
    the prompt at least ``max_length`` tokens long (by :data:`PROOF_SLACK`); every other row is cut straight from
    its head and gets ``full_length`` None, meaning "at least max_length": the tutorial's right cut would keep no
    answer token of it, and it was shortened, as the reference finds from the whole prompt."""
    measure = [True] * len(rows) if measure is None else list(measure)
    answers = [builder.answer_ids(r.label) for r in rows]
    limit = [max_length - len(a) for a in answers]
    whole = [i for i, r in enumerate(rows) if measure[i] or _tokenise_whole(r, limit[i])]
    prompts: dict[int, list[int]] = dict(zip(whole, builder.batch_prompt_ids([rows[i] for i in whole]) if whole else []))
    heads: dict[int, tuple[int, bool]] = {}
    rest = [i for i in range(len(rows)) if i not in prompts]
    fitted = dict(zip(rest, fit_rows(builder, [rows[i] for i in rest], [limit[i] for i in rest], heads=heads)))
    out: list[Optional[Encoded]] = [None] * len(rows)

    def proven(i: int, n: int) -> bool:  # prompt >= empty + n - slack >= limit + len(answer) = max_length
        return n - (limit[i] - builder.empty_prompt_length(rows[i].candidates)) >= PROOF_SLACK + len(answers[i])

    longer: dict[int, int] = {}  # row -> characters of a longer head, for a head too short to prove the length
    unproven: list[int] = []     # rows whose whole prompt is tokenised: the reference's way
    for k, i in enumerate(rest):
        row, ids = fitted[i]
        if row is rows[i]:  # the whole text fitted after all: ids are the whole prompt's
            out[i] = Encoded(ids + answers[i], [IGNORE] * len(ids) + answers[i], False, True, len(ids) + len(answers[i]))
            continue
        n, was_whole, chars = heads[k]
        if not was_whole and proven(i, n):  # cut, as from the whole prompt
            out[i] = Encoded(ids + answers[i], [IGNORE] * len(ids) + answers[i], True, True, None)
        elif not was_whole:
            longer[i] = 2 * chars
        else:
            unproven.append(i)
    # A head that beat the budget by too little: twice as much of the text usually proves it, for a fraction of
    # the whole text's tokens (such rows were ~5% of Fudan's and ~8% of prepare's time, tokenised whole)
    rows_longer = sorted(longer)
    counts, _ = builder.encode_texts([rows[i].text[:longer[i]] for i in rows_longer]) if rows_longer else ([], None)
    for i, ids in zip(rows_longer, counts):
        if longer[i] < len(rows[i].text) and proven(i, len(ids)):
            cut = fitted[i][1]
            out[i] = Encoded(cut + answers[i], [IGNORE] * len(cut) + answers[i], True, True, None)
        else:
            unproven.append(i)
    for i, ids in zip(unproven, builder.batch_prompt_ids([rows[i] for i in unproven]) if unproven else []):
        prompts[i] = ids
    todo = sorted(prompts)
    for i, enc in zip(todo, encode_train_many(builder, [rows[i] for i in todo], max_length, "text",
                                              [prompts[i] for i in todo]) if todo else []):
        out[i] = enc
    return out  # type: ignore[return-value]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to a rectangle; returns (ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=dtype)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=dtype)
            mask[i, width - len(s):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, so left padding changes nothing."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
