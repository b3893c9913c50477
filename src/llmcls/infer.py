"""The classifier at inference time: candidate scoring and batched generation. Used by eval, predict and serve.

``score``: the log-likelihood of each candidate label (all of its tokens, then the end token) given the prompt.
The prompt runs once per row with a KV cache and only the last position's logits; the candidates' remaining
tokens run in a second, tiny forward over the cache. Multi-token labels are scored exactly, and the end token
tells "Sport" from "Sports". Probabilities are the softmax of the log-likelihoods over the row's candidates.

``generate``: the tutorial's way, batched with left padding and greedy decoding; the text is mapped to a label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from llmcls.data import Row
from llmcls.encode import PromptBuilder, fit_prompt, left_pad, positions


@dataclass
class Prediction:
    index: int
    pred: Optional[str]                     # None: generate produced no valid label
    probs: Optional[dict[str, float]]       # per candidate (score); None for generate
    raw: Optional[str] = None               # generated text (generate)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(order: list[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(order), size):
        yield order[i:i + size]


def prompts_for(builder: PromptBuilder, rows: Sequence[Row], max_length: Optional[int]) -> list[list[int]]:
    """Prompt ids, with texts shortened exactly as in training: prompt + longest answer fit ``max_length``."""
    if max_length is None:
        return builder.batch_prompt_ids(rows)
    return [fit_prompt(builder, r, max_length - max(len(builder.answer_ids(c)) for c in r.candidates))[0]
            for r in rows]


def _packed_ok(model) -> bool:
    # A custom 4-D mask reaches the kernel with sdpa and eager attention; flash-attention takes none.
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in (None, "sdpa", "eager")


@torch.no_grad()
def score_batch(model, builder: PromptBuilder, rows: Sequence[Row], max_length: Optional[int] = None,
                prompts: Optional[list[list[int]]] = None) -> list[list[float]]:
    """Log-likelihood of every candidate of every row (same order as ``row.candidates``)."""
    prompts = prompts if prompts is not None else prompts_for(builder, rows, max_length)
    if _packed_ok(model):
        return _score_packed(model, builder, rows, prompts)
    return _score_cached(model, builder, rows, prompts)


def _score_packed(model, builder: PromptBuilder, rows: Sequence[Row], prompts: list[list[int]]) -> list[list[float]]:
    """One forward per batch: each row's prompt (left-padded) is followed by one slot per candidate holding the
    candidate's tokens. A 4-D mask lets a slot see the prompt and its own earlier tokens only, and its position
    ids continue from the prompt's end, so every slot computes exactly what a separate prompt+candidate forward
    would. Logits are taken only at the last prompt position and in the slots."""
    dev = _model_device(model)
    answers = [[builder.answer_ids(c) for c in r.candidates] for r in rows]
    B, P = len(rows), max(len(p) for p in prompts)
    W = max(len(a) for ans in answers for a in ans)
    K = max(len(ans) for ans in answers)
    L = P + K * W
    ids = torch.full((B, L), builder.tok.pad_token_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    allowed = torch.zeros((B, L, L), dtype=torch.bool)
    allowed[:, torch.arange(L), torch.arange(L)] = True  # padding attends to itself: no fully masked rows
    tri = lambda n: torch.ones(n, n, dtype=torch.bool).tril()  # noqa: E731
    pair_b, pair_pos, pair_tok, pair_valid = [], [], [], []
    for i, (p, ans) in enumerate(zip(prompts, answers)):
        off = P - len(p)
        ids[i, off:P] = torch.tensor(p)
        pos[i, off:P] = torch.arange(len(p))
        allowed[i, off:P, off:P] = tri(len(p))
        for j, a in enumerate(ans):
            s = P + j * W
            ids[i, s:s + len(a)] = torch.tensor(a)
            pos[i, s:s + len(a)] = len(p) + torch.arange(len(a))
            allowed[i, s:s + len(a), off:P] = True
            allowed[i, s:s + len(a), s:s + len(a)] = tri(len(a))
            # token t of the candidate is predicted at kept position 0 (t=0) or at its slot's position t-1
            kept = [0] + [1 + j * W + t for t in range(len(a) - 1)]
            pair_b.append([i] * W)
            pair_pos.append(kept + [0] * (W - len(a)))
            pair_tok.append(a + [0] * (W - len(a)))
            pair_valid.append([True] * len(a) + [False] * (W - len(a)))
    dtype = next(model.parameters()).dtype
    mask = torch.zeros((B, 1, L, L), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    keep = torch.cat([torch.tensor([P - 1]), torch.arange(P, L)])
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                logits_to_keep=keep.to(dev), use_cache=False)
    logits = out.logits.float()                                                  # [B, 1 + K*W, V]
    pb, pp, pt = (torch.tensor(x, device=dev) for x in (pair_b, pair_pos, pair_tok))
    picked = logits[pb, pp].gather(-1, pt[..., None]).squeeze(-1) - torch.logsumexp(logits[pb, pp], dim=-1)
    total = (picked * torch.tensor(pair_valid, device=dev)).sum(1)
    result, k = [], 0
    for ans in answers:
        result.append(total[k:k + len(ans)].tolist())
        k += len(ans)
    return result


def _score_cached(model, builder: PromptBuilder, rows: Sequence[Row], prompts: list[list[int]]) -> list[list[float]]:
    """Prompt forward with a KV cache, then the candidates' remaining tokens over copies of the cache."""
    dev = _model_device(model)
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
    dev = _model_device(model)
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
    # Tokenising the next batch on a thread (the tokenizer releases the GIL) overlaps it with the model.
    with tqdm(total=sum(map(len, batches)), desc=desc, unit="row", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=1) as pool:
        prep = lambda idx: prompts_for(builder, [rows[i] for i in idx], max_length)  # noqa: E731
        pending = pool.submit(prep, batches[0]) if batches else None
        for k, idx in enumerate(batches):
            prompts = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(prep, batches[k + 1])
            batch = [rows[i] for i in idx]
            if method == "score":
                for i, r, ll in zip(idx, batch, score_batch(model, builder, batch, prompts=prompts)):
                    probs = dict(zip(r.candidates, to_probs(ll)))
                    preds[i] = Prediction(i, max(probs, key=probs.get), probs)
            else:
                texts = generate_batch(model, builder, batch, max_new_tokens, prompts=prompts)
                for i, r, t in zip(idx, batch, texts):
                    preds[i] = Prediction(i, map_output(t, r.candidates), None, t)
            bar.update(len(idx))
    return preds  # type: ignore[return-value]
