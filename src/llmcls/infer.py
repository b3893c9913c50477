"""The classifier at inference time: candidate scoring and batched generation. Used by eval, predict and serve.

``score``: the log-likelihood of each candidate label (all of its tokens, then the end token) given the prompt.
One forward per batch, each prompt followed by its candidates' tokens, logits computed only where a candidate token
is predicted. On a GPU with variable-length FlashAttention the batch is one sequence without padding
(:func:`pack_flat`, attended by :func:`llmcls.model.shared_prompt_attention`); elsewhere rows are left-padded and a
4-D attention mask keeps each row's candidates apart (:func:`pack`, :func:`score_packed`); attention kernels that
take neither (flash-attention set by the user, without varlen) use a KV-cache path: the prompt once, then the
candidates over copies of its cache (:func:`layout_for` picks). Multi-token labels are scored exactly, and the end
token tells "Sport" from "Sports". Probabilities are the softmax of the log-likelihoods over the row's candidates.

``generate``: the tutorial's way, batched with left padding and greedy decoding; the text is mapped to a label.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from typing import Iterable, Optional, Sequence

import torch

from llmcls.data import Row
from llmcls.encode import PromptBuilder, fit_prompts, left_pad, positions
from llmcls.model import (SHARED_PROMPT_ATTENTION, attention_implementation, compute_device, compute_dtype,
                          shared_prompt_ok)


@dataclass
class Prediction:
    index: int
    pred: Optional[str]                     # None: generate produced no valid label
    probs: Optional[dict[str, float]]       # per candidate (score); None for generate
    raw: Optional[str] = None               # generated text (generate)


def _batches(order: list[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(order), size):
        yield order[i:i + size]


def prompts_for(builder: PromptBuilder, rows: Sequence[Row], max_length: Optional[int]) -> list[list[int]]:
    """Prompt ids, with texts shortened exactly as in training: prompt + longest answer fit ``max_length``."""
    if max_length is None:
        return builder.batch_prompt_ids(rows)
    return fit_prompts(builder, rows, [max_length - max(len(builder.answer_ids(c)) for c in r.candidates)
                                       for r in rows])


def _packed_ok(model) -> bool:
    # A custom 4-D mask reaches the kernel with sdpa and eager attention; flash-attention takes none.
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in (None, "sdpa", "eager")


def layout_for(model) -> str:
    """How :func:`score_batch` lays out a batch for this model: ``flat`` (no padding, variable-length
    FlashAttention: a GPU whose torch has it), ``padded`` (a 4-D mask: sdpa or eager attention elsewhere) or
    ``cached`` (a KV cache: attention kernels that take no custom mask)."""
    if shared_prompt_ok(model):
        return "flat"
    return "padded" if _packed_ok(model) else "cached"


@torch.no_grad()
def score_batch(model, builder: PromptBuilder, rows: Sequence[Row], max_length: Optional[int] = None,
                prompts: Optional[list[list[int]]] = None, packed: Optional["Packed | Flat"] = None
                ) -> list[list[float]]:
    """Log-likelihood of every candidate of every row (same order as ``row.candidates``). ``packed`` is
    :func:`pack` or :func:`pack_flat` of the same rows (as :func:`layout_for` says), made ahead (e.g. on another
    thread)."""
    if packed is None:
        layout = layout_for(model)
        prompts = prompts if prompts is not None else prompts_for(builder, rows, max_length)
        if layout == "cached":
            return _score_cached(model, builder, rows, prompts)
        packed = (pack_flat if layout == "flat" else pack)(builder, rows, prompts)
    return queue_scores(model, packed).result()


def queue_scores(model, packed: "Packed | Flat") -> "QueuedScores":
    """Queue the forward of a prepared batch; :meth:`QueuedScores.result` waits for its scores."""
    return queue_flat(model, packed) if isinstance(packed, Flat) else queue_packed(model, packed)


def _pinned(batch):
    """The same batch with its tensors in page-locked memory, which a GPU copies from without holding up the host
    (a copy from pageable memory can wait for the GPU to catch up first)."""
    return replace(batch, **{f.name: getattr(batch, f.name).pin_memory() for f in fields(batch)
                             if isinstance(getattr(batch, f.name), torch.Tensor)})


@dataclass
class Packed:
    """One scoring batch as CPU tensors: each row's prompt (left-padded to P) followed by its candidates back to
    back, each candidate holding all its tokens but the last (that one is only ever predicted, never read).
    ``segment`` says what each position is (-1 padding, 0 prompt, j + 1 candidate j); the attention mask is
    derived from it on the device (a B x L x L mask is cheap there, not on the host)."""

    ids: torch.Tensor          # [B, L]
    pos: torch.Tensor          # [B, L] position ids: a candidate's tokens continue from its prompt's end
    segment: torch.Tensor      # [B, L]
    keep: torch.Tensor         # [1 + L - P] positions whose logits are needed: last prompt position and after
    pair_row: torch.Tensor     # [N, W] per (row, candidate): its row ...
    pair_at: torch.Tensor      # [N, W] ... the kept position predicting each of its tokens ...
    pair_tok: torch.Tensor     # [N, W] ... the token ...
    pair_valid: torch.Tensor   # [N, W] ... and whether it is a real token (candidates differ in length)
    counts: list[int]          # candidates per row

    def pin(self) -> "Packed":
        return _pinned(self)


def pack(builder: PromptBuilder, rows: Sequence[Row], prompts: list[list[int]]) -> Packed:
    answers = [[builder.answer_ids(c) for c in r.candidates] for r in rows]
    B, P = len(rows), max(len(p) for p in prompts)
    W = max(len(a) for ans in answers for a in ans)
    # Candidates back to back rather than in slots of the longest one's width: a batch of Fudan rows computes
    # 4.7% more positions than its prompts instead of 7.0%.
    L = P + max(sum(len(a) - 1 for a in ans) for ans in answers)
    ids = torch.full((B, L), builder.tok.pad_token_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    seg = torch.full((B, L), -1, dtype=torch.long)
    pair_b, pair_pos, pair_tok, pair_valid = [], [], [], []
    for i, (p, ans) in enumerate(zip(prompts, answers)):
        off = P - len(p)
        ids[i, off:P] = torch.tensor(p)
        pos[i, off:P] = torch.arange(len(p))
        seg[i, off:P] = 0
        s = P
        for j, a in enumerate(ans):
            n = len(a) - 1
            ids[i, s:s + n] = torch.tensor(a[:-1])
            pos[i, s:s + n] = len(p) + torch.arange(n)
            seg[i, s:s + n] = j + 1
            # token 0 of the candidate is predicted at kept position 0 (the prompt's last), token t at kept
            # position 1 + (s - P) + t - 1, the candidate's own token t - 1
            kept = [0] + [1 + s - P + t for t in range(n)]
            pair_b.append([i] * W)
            pair_pos.append(kept + [0] * (W - len(a)))
            pair_tok.append(a + [0] * (W - len(a)))
            pair_valid.append([True] * len(a) + [False] * (W - len(a)))
            s += n
    return Packed(ids, pos, seg, torch.cat([torch.tensor([P - 1]), torch.arange(P, L)]), torch.tensor(pair_b),
                  torch.tensor(pair_pos), torch.tensor(pair_tok), torch.tensor(pair_valid),
                  [len(a) for a in answers])


@dataclass
class Flat:
    """One scoring batch as one sequence without padding, for :func:`llmcls.model.shared_prompt_attention`: every
    row's prompt, then every row's candidates (each candidate's tokens but its last, as in :class:`Packed`)."""

    ids: torch.Tensor            # [1, T]
    pos: torch.Tensor            # [1, T] position ids: a candidate's tokens continue from its prompt's end
    prompt_bounds: torch.Tensor  # [B + 1] where each row's prompt starts and ends (int32, as the kernel takes)
    answer_rows: torch.Tensor    # [B + 1] the same for each row's candidate tokens, counted after the prompts
    answer_bounds: torch.Tensor  # [M + 1] the same for each candidate that has tokens here
    keep: torch.Tensor           # [B + T - n] positions whose logits are needed: each prompt's last, then after
    pair_at: torch.Tensor        # [N, W] per (row, candidate): the kept position predicting each of its tokens ...
    pair_tok: torch.Tensor       # [N, W] ... the token ...
    pair_valid: torch.Tensor     # [N, W] ... and whether it is a real token (candidates differ in length)
    counts: list[int]            # candidates per row
    sizes: dict                  # prompt_tokens (n), prompt_max, answer_rows_max, answer_max

    def pin(self) -> "Flat":
        return _pinned(self)


def pack_flat(builder: PromptBuilder, rows: Sequence[Row], prompts: list[list[int]]) -> Flat:
    answers = [[builder.answer_ids(c) for c in r.candidates] for r in rows]
    B, W = len(rows), max(len(a) for ans in answers for a in ans)
    n = sum(map(len, prompts))
    ids, pos = [t for p in prompts for t in p], [i for p in prompts for i in range(len(p))]
    row_ends, own_ends, pairs = [], [], []
    for i, (p, ans) in enumerate(zip(prompts, answers)):
        for a in ans:
            start = len(ids) - n  # where this candidate's tokens start among the kept positions after B
            ids += a[:-1]
            pos += range(len(p), len(p) + len(a) - 1)
            if len(a) > 1:
                own_ends.append(len(ids) - n)
            # token 0 is predicted by the row's last prompt position (kept position i), token t by the
            # candidate's own token t - 1 (kept position B + start + t - 1)
            pairs.append(([i] + [B + start + t for t in range(len(a) - 1)], a))
        row_ends.append(len(ids) - n)
    bounds = lambda ends: torch.tensor([0] + ends, dtype=torch.int32)  # noqa: E731
    prompt_ends = list(itertools.accumulate(map(len, prompts)))
    lengths = lambda ends: [b - a for a, b in zip([0] + ends, ends)] or [0]  # noqa: E731
    return Flat(
        torch.tensor([ids]), torch.tensor([pos]), bounds(prompt_ends), bounds(row_ends), bounds(own_ends),
        torch.cat([torch.tensor(prompt_ends) - 1, torch.arange(n, len(ids))]),
        torch.tensor([at + [0] * (W - len(at)) for at, _ in pairs]),
        torch.tensor([a + [0] * (W - len(a)) for _, a in pairs]),
        torch.tensor([[True] * len(a) + [False] * (W - len(a)) for _, a in pairs]),
        [len(a) for a in answers],
        # The kernel needs upper bounds only; 2 at least, because torch.compile may specialise compiled layers on
        # an int of 0 or 1 and recompile them when a batch of one-token labels is followed by longer ones.
        {"prompt_tokens": n, "prompt_max": max(map(len, prompts)), "answer_rows_max": max(2, *lengths(row_ends)),
         "answer_max": max(2, *lengths(own_ends))})


def _packed_mask(seg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: a prompt token sees the prompt up to itself; a candidate's token sees the whole
    prompt and its own candidate up to itself, never another candidate. Padding sees only itself, so that no
    row of the mask is empty."""
    L = seg.shape[1]
    idx = torch.arange(L, device=seg.device)
    q, k = seg[:, :, None], seg[:, None, :]
    allowed = (idx[:, None] >= idx[None, :]) & (k >= 0) & (q >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool, device=seg.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@torch.no_grad()
def score_packed(model, packed: Packed) -> list[list[float]]:
    """One forward per batch over prompts and their candidates (:class:`Packed`): every candidate's position
    computes exactly what a separate prompt + candidate forward would, and logits are taken only where a candidate
    token is predicted."""
    return queue_packed(model, packed).result()


class QueuedScores:
    """Scores of a batch whose forward is queued on the GPU; :meth:`result` waits for them. Until then the host
    is free to queue the next batch, so the GPU does not idle while scores are read back."""

    def __init__(self, total: torch.Tensor, counts: list[int]):
        self.counts, self._ready = counts, None
        if total.is_cuda:
            self._host = torch.empty(total.shape, dtype=total.dtype, pin_memory=True)
            self._host.copy_(total, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = total

    def result(self) -> list[list[float]]:
        if self._ready is not None:
            self._ready.synchronize()
        total, result, k = self._host.tolist(), [], 0
        for n in self.counts:
            result.append(total[k:k + n])
            k += n
        return result


@torch.no_grad()
def queue_packed(model, packed: Packed) -> QueuedScores:
    """:func:`score_packed` without waiting for the GPU. With ``packed`` pinned (:meth:`Packed.pin`) no copy
    waits either: a pageable copy to the GPU can hold the host until the GPU has caught up."""
    dev = compute_device(model)
    to = lambda t: t.to(dev, non_blocking=True)  # noqa: E731
    mask = _packed_mask(to(packed.segment), compute_dtype(model))
    out = model(input_ids=to(packed.ids), attention_mask=mask, position_ids=to(packed.pos),
                logits_to_keep=to(packed.keep), use_cache=False)
    logits = out.logits.float()                                                  # [B, 1 + L - P, V]
    lse = torch.logsumexp(logits, dim=-1)  # once per kept position, however many candidates read it
    pb, pp = to(packed.pair_row), to(packed.pair_at)
    picked = logits[pb, pp, to(packed.pair_tok)] - lse[pb, pp]
    return QueuedScores((picked * to(packed.pair_valid)).sum(1), packed.counts)


@torch.no_grad()
def queue_flat(model, flat: Flat) -> QueuedScores:
    """:func:`queue_packed` for a :class:`Flat` batch: the model attends with
    :func:`llmcls.model.shared_prompt_attention` for this forward only."""
    dev = compute_device(model)
    to = lambda t: t.to(dev, non_blocking=True)  # noqa: E731
    with attention_implementation(model, SHARED_PROMPT_ATTENTION):
        out = model(input_ids=to(flat.ids), position_ids=to(flat.pos), logits_to_keep=to(flat.keep), use_cache=False,
                    prompt_bounds=to(flat.prompt_bounds), answer_rows=to(flat.answer_rows),
                    answer_bounds=to(flat.answer_bounds), **flat.sizes)
    logits = out.logits[0].float()                                               # [B + T - n, V]
    lse = torch.logsumexp(logits, dim=-1)  # once per kept position, however many candidates read it
    at = to(flat.pair_at)
    picked = logits[at, to(flat.pair_tok)] - lse[at]
    return QueuedScores((picked * to(flat.pair_valid)).sum(1), flat.counts)


def _score_cached(model, builder: PromptBuilder, rows: Sequence[Row], prompts: list[list[int]]) -> list[list[float]]:
    """Prompt forward with a KV cache, then the candidates' remaining tokens over copies of the cache."""
    dev = compute_device(model)
    ids, mask = left_pad(prompts, builder.tok.pad_token_id)
    ids, mask = ids.to(dev), mask.to(dev)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)          # [B, V]

    # One continuation per (row, candidate): the candidate's tokens and the end token.
    pair_row, conts = [], []
    for i, r in enumerate(rows):
        for c in r.candidates:
            pair_row.append(i)
            conts.append(builder.answer_ids(c))
    pair_row_t = torch.tensor(pair_row, device=dev)
    width = max(len(c) for c in conts)
    tgt = torch.full((len(conts), width), builder.tok.pad_token_id, dtype=torch.long)
    valid = torch.zeros((len(conts), width), dtype=torch.bool)
    for j, c in enumerate(conts):
        tgt[j, :len(c)] = torch.tensor(c)
        valid[j, :len(c)] = True
    tgt, valid = tgt.to(dev), valid.to(dev)
    total = first[pair_row_t].gather(1, tgt[:, :1]).squeeze(1)             # first token of each candidate

    if width > 1:
        cache = out.past_key_values
        cache.batch_select_indices(pair_row_t)  # one copy of the row's prompt cache per candidate
        step_in = tgt[:, :-1]
        attn = torch.cat([mask[pair_row_t], valid[:, :-1].long()], dim=1)
        pos = mask.sum(1)[pair_row_t, None] + torch.arange(width - 1, device=dev)[None]
        out2 = model(input_ids=step_in, attention_mask=attn, position_ids=pos, past_key_values=cache,
                     use_cache=True)
        logp = torch.log_softmax(out2.logits.float(), dim=-1).gather(2, tgt[:, 1:, None]).squeeze(2)
        total = total + (logp * valid[:, 1:]).sum(1)

    result, k = [], 0
    for r in rows:
        result.append(total[k:k + len(r.candidates)].tolist())
        k += len(r.candidates)
    return result


def to_probs(logliks: Sequence[float]) -> list[float]:
    return torch.softmax(torch.tensor(logliks, dtype=torch.float64), 0).tolist()


def map_output(text: str, candidates: Sequence[str]) -> Optional[str]:
    """A generated reply as a label: exact match first, then case-insensitive, then the one candidate it
    starts with or contains. Anything else is invalid (None)."""
    t = text.strip().strip("。.\"'`").strip()
    if t in candidates:
        return t
    low = {c.lower(): c for c in candidates}
    if t.lower() in low:
        return low[t.lower()]
    starts = [c for c in candidates if t.lower().startswith(c.lower())]
    if len(starts) == 1:
        return starts[0]
    inside = [c for c in candidates if c.lower() in t.lower()]
    return inside[0] if len(inside) == 1 else None


@torch.no_grad()
def generate_batch(model, builder: PromptBuilder, rows: Sequence[Row], max_new_tokens: int,
                   max_length: Optional[int] = None, prompts: Optional[list[list[int]]] = None,
                   **generate_kwargs) -> list[str]:
    dev = compute_device(model)
    prompts = prompts if prompts is not None else prompts_for(builder, rows, max_length)
    ids, mask = left_pad(prompts, builder.tok.pad_token_id)
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=builder.tok.pad_token_id,
                         eos_token_id=builder.tok.eos_token_id, **generate_kwargs)
    return builder.tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def classify(model, builder: PromptBuilder, rows: Sequence[Row], method: str = "score", batch_size: int = 16,
             max_new_tokens: int = 8, max_length: Optional[int] = None, progress: bool = True,
             desc: str = "classify", shard: Optional[tuple[int, int]] = None) -> list[Prediction]:
    """Classify rows in batches (longest first, so padding stays small); results come back in input order.
    ``shard=(rank, world)`` classifies only batches rank, rank + world, ... of that plan and leaves the other
    rows None (``llmcls.dist.classify`` merges the shards of all processes)."""
    from tqdm.auto import tqdm

    from concurrent.futures import ThreadPoolExecutor

    lengths = [len(r.text) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    batches = list(_batches(order, batch_size))
    if shard is not None:
        batches = batches[shard[0]::shard[1]]
    preds: list[Optional[Prediction]] = [None] * len(rows)
    layout = layout_for(model) if method == "score" else None
    packing = layout in ("flat", "padded")
    pin = packing and compute_device(model).type == "cuda"

    def prep(idx):  # the next batch's tokens and tensors, made on a thread while the model runs this one
        prompts = prompts_for(builder, [rows[i] for i in idx], max_length)
        packed = (pack_flat if layout == "flat" else pack)(builder, [rows[i] for i in idx], prompts) if packing \
            else None
        return prompts, (packed.pin() if pin else packed)

    def scored(idx, lls):
        for i, ll in zip(idx, lls):
            probs = dict(zip(rows[i].candidates, to_probs(ll)))
            preds[i] = Prediction(i, max(probs, key=probs.get), probs)
        bar.update(len(idx))

    with tqdm(total=sum(map(len, batches)), desc=desc, unit="row", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prep, batches[0]) if batches else None
        queued = None  # the batch on the GPU whose scores are read back once the next one is queued behind it
        for k, idx in enumerate(batches):
            prompts, packed = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(prep, batches[k + 1])
            batch = [rows[i] for i in idx]
            if packing:
                now = (idx, queue_scores(model, packed))
                if queued is not None:
                    scored(queued[0], queued[1].result())
                queued = now
            elif method == "score":
                scored(idx, score_batch(model, builder, batch, prompts=prompts))
            else:
                texts = generate_batch(model, builder, batch, max_new_tokens, prompts=prompts)
                for i, r, t in zip(idx, batch, texts):
                    preds[i] = Prediction(i, map_output(t, r.candidates), None, t)
                bar.update(len(idx))
        if queued is not None:
            scored(queued[0], queued[1].result())
    return preds  # type: ignore[return-value]
