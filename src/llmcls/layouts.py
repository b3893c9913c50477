"""How a scoring batch is laid out for the model: three layouts behind one small protocol (:class:`Layout`), each
giving the log-likelihood of every candidate of every row.

- ``packed`` (a GPU whose torch has variable-length FlashAttention, 16-bit weights): the batch is one sequence
  without padding, every row's prompt then every row's candidates, attended by
  :func:`llmcls.model.attention.shared_prompt_attention`: nothing is computed for padding, each prompt once.
- ``padded`` (sdpa or eager attention elsewhere, e.g. a CPU): rows left-padded, each prompt followed by its
  candidates' trie, a 4-D mask keeping the trie's branches apart.
- ``cached`` (attention kernels that take neither, e.g. flash-attention set by the user without varlen): the
  prompt once with a KV cache, then the candidates over copies of it.

In every layout a candidate is all of its tokens and then the end token (which tells "Sport" from "Sports"), and
logits are computed only where a candidate token is predicted. In ``packed`` and ``padded`` a row's candidates are
laid out as a prefix trie over their tokens (:func:`answer_trie`): a prefix that several candidates share
("Sports/Football", "Sports/Tennis"; "Economy" and "Economics" share their first token) is computed once, each
trie node attending to the prompt and to its ancestors only. :func:`layout_for` picks one for a model;
``llmcls.infer`` runs them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Protocol, Sequence

import torch

from llmcls.data import Row
from llmcls.encode import PromptBuilder, left_pad, positions
from llmcls.model.attention import SHARED_PROMPT_ATTENTION, attention_implementation, shared_prompt_ok
from llmcls.model.load import compute_device, compute_dtype

# transformers 5.2x renamed the forward's and the output's ``past_key_values`` to ``cache`` (the old name warns and
# goes in 5.40); earlier 5.x releases (the GPU image's 5.17) know only the old one.
_CACHE = "cache" if "cache" in getattr(__import__("transformers").modeling_outputs.CausalLMOutputWithPast,
                                       "__dataclass_fields__", {}) else "past_key_values"


class Layout(Protocol):
    """``prepare`` makes a batch's CPU tensors (thread-safe: it runs on a helper thread while the model works);
    ``queue`` starts its forward and returns scores to read later."""

    name: str

    def prepare(self, builder: PromptBuilder, rows: Sequence[Row], prompts: list[list[int]], pin: bool = False
                ) -> Any: ...

    def queue(self, model, batch: Any) -> "QueuedScores": ...


def _pinned(batch):
    """The same batch with its tensors in page-locked memory, which a GPU copies from without holding up the host
    (a copy from pageable memory can wait for the GPU to catch up first)."""
    return replace(batch, **{f.name: getattr(batch, f.name).pin_memory() for f in fields(batch)
                             if isinstance(getattr(batch, f.name), torch.Tensor)})


@dataclass
class Trie:
    """A row's candidates as a prefix trie over their tokens, each candidate's last token (the end token) left out:
    it is only ever predicted, never read. Nodes come parents first; node ``k`` holds token ``tokens[k]`` at depth
    ``depth[k]`` (1 for a candidate's first token). ``paths[c]`` is candidate ``c``'s nodes: node ``paths[c][t]``
    predicts its token ``t + 1``, and the prompt's last position its token 0."""

    tokens: list[int]
    depth: list[int]
    ancestors: list[list[int]]   # per node: its ancestors, root side first, then itself
    paths: list[list[int]]


def answer_trie(answers: Sequence[Sequence[int]], share: bool = True) -> Trie:
    """The trie of one row's answers (:meth:`llmcls.encode.PromptBuilder.answer_ids`). ``share=False`` gives every
    candidate its own chain (no prefix computed once: the layout before the trie, kept for benchmarks)."""
    index: dict[tuple, int] = {}
    tokens: list[int] = []
    depth: list[int] = []
    ancestors: list[list[int]] = []
    paths = []
    for c, a in enumerate(answers):
        path: list[int] = []
        for t in range(len(a) - 1):
            key = (path[-1] if path else -1, a[t]) if share else (c, t)
            node = index.get(key)
            if node is None:
                node = index[key] = len(tokens)
                tokens.append(a[t])
                depth.append(t + 1)
                ancestors.append((ancestors[path[-1]] if path else []) + [node])
            path.append(node)
        paths.append(path)
    return Trie(tokens, depth, ancestors, paths)


def _tries(builder: PromptBuilder, rows: Sequence[Row], share: bool) -> tuple[list[list[list[int]]], list[Trie], int]:
    answers = [[builder.answer_ids(c) for c in r.candidates] for r in rows]
    made: dict[tuple[str, ...], Trie] = {}  # the rows of a task mostly share one label set: one trie for them
    tries = []
    for r, ans in zip(rows, answers):
        key = tuple(r.candidates)
        if key not in made:
            made[key] = answer_trie(ans, share)
        tries.append(made[key])
    return answers, tries, max([1] + [d for t in tries for d in t.depth])


def _ancestor_rows(trie: Trie, D: int, offset: int = 0) -> list[list[int]]:
    """Each node's ancestors (and itself) shifted by ``offset``, padded with -1 to the batch's depth ``D``."""
    return [[offset + k for k in a] + [-1] * (D - len(a)) for a in trie.ancestors]


def _pairs(answers, paths, first_at, node_at):
    """Per (row, candidate), padded to the longest answer W: the kept position predicting each of its tokens (the
    prompt's last for token 0, then its trie nodes), the token, whether it is a real one."""
    W = max(len(a) for ans in answers for a in ans)
    at, tok, valid = [], [], []
    for i, (ans, path) in enumerate(zip(answers, paths)):
        for a, nodes in zip(ans, path):
            at.append([first_at(i)] + [node_at(i, k) for k in nodes] + [0] * (W - len(a)))
            tok.append(a + [0] * (W - len(a)))
            valid.append([True] * len(a) + [False] * (W - len(a)))
    return torch.tensor(at), torch.tensor(tok), torch.tensor(valid)


@dataclass
class PaddedBatch:
    """One scoring batch as CPU tensors: each row's prompt (left-padded to P) followed by its candidates' trie
    nodes (:class:`Trie`). ``segment`` says what each position is (-1 padding, 0 prompt, 1 trie node) and
    ``ancestors`` whom each node sees; the attention mask is derived from them on the device (a B x L x L mask is
    cheap there, not on the host)."""

    ids: torch.Tensor          # [B, L]
    pos: torch.Tensor          # [B, L] position ids: a node continues from its prompt's end at its depth
    segment: torch.Tensor      # [B, L]
    ancestors: torch.Tensor    # [B, L - P, D] per node: its ancestors and itself, as node indices (-1: none)
    keep: torch.Tensor         # [1 + L - P] positions whose logits are needed: last prompt position and after
    pair_row: torch.Tensor     # [N, W] per (row, candidate): its row ...
    pair_at: torch.Tensor      # [N, W] ... the kept position predicting each of its tokens ...
    pair_tok: torch.Tensor     # [N, W] ... the token ...
    pair_valid: torch.Tensor   # [N, W] ... and whether it is a real token (candidates differ in length)
    counts: list[int]          # candidates per row

    def pin(self) -> "PaddedBatch":
        return _pinned(self)


def pad_batch(builder: PromptBuilder, rows: Sequence[Row], prompts: list[list[int]], share: bool = True
              ) -> PaddedBatch:
    answers, tries, D = _tries(builder, rows, share)
    B, P = len(rows), max(len(p) for p in prompts)
    La = max(len(t.tokens) for t in tries)
    L = P + La
    ids = torch.full((B, L), builder.tok.pad_token_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    seg = torch.full((B, L), -1, dtype=torch.long)
    anc = torch.full((B, La, D), -1, dtype=torch.long)
    for i, (p, trie) in enumerate(zip(prompts, tries)):
        off, n = P - len(p), len(trie.tokens)
        ids[i, off:P] = torch.tensor(p)
        pos[i, off:P] = torch.arange(len(p))
        seg[i, off:P] = 0
        ids[i, P:P + n] = torch.tensor(trie.tokens, dtype=torch.long)
        pos[i, P:P + n] = len(p) - 1 + torch.tensor(trie.depth, dtype=torch.long)
        seg[i, P:P + n] = 1
        anc[i, :n] = torch.tensor(_ancestor_rows(trie, D), dtype=torch.long).reshape(n, D)
    # kept position 0 is the prompt's last, kept position 1 + k the row's node k
    at, tok, valid = _pairs(answers, [t.paths for t in tries], lambda i: 0, lambda i, k: 1 + k)
    pair_b = torch.tensor([i for i, ans in enumerate(answers) for _ in ans])[:, None].expand_as(at).contiguous()
    return PaddedBatch(ids, pos, seg, anc, torch.cat([torch.tensor([P - 1]), torch.arange(P, L)]), pair_b, at, tok,
                       valid, [len(a) for a in answers])


@dataclass
class PackedBatch:
    """One scoring batch as one sequence without padding, for :func:`llmcls.model.attention.shared_prompt_attention`:
    every row's prompt, then every row's candidates' trie nodes (:class:`Trie`)."""

    ids: torch.Tensor              # [1, T]
    pos: torch.Tensor              # [1, T] position ids: a node continues from its prompt's end at its depth
    prompt_bounds: torch.Tensor    # [B + 1] where each row's prompt starts and ends (int32, as the kernel takes)
    answer_rows: torch.Tensor      # [B + 1] the same for each row's nodes, counted after the prompts
    answer_ancestors: torch.Tensor  # [T - n, D] per node: its ancestors and itself, counted after the prompts (-1)
    keep: torch.Tensor             # [B + T - n] positions whose logits are needed: each prompt's last, then after
    pair_at: torch.Tensor          # [N, W] per (row, candidate): the kept position predicting each of its tokens ...
    pair_tok: torch.Tensor         # [N, W] ... the token ...
    pair_valid: torch.Tensor       # [N, W] ... and whether it is a real token (candidates differ in length)
    counts: list[int]              # candidates per row
    sizes: dict                    # prompt_tokens (n), prompt_max, answer_rows_max

    def pin(self) -> "PackedBatch":
        return _pinned(self)


def pack_batch(builder: PromptBuilder, rows: Sequence[Row], prompts: list[list[int]], share: bool = True
               ) -> PackedBatch:
    answers, tries, D = _tries(builder, rows, share)
    B, n = len(rows), sum(map(len, prompts))
    ids, pos = [t for p in prompts for t in p], [i for p in prompts for i in range(len(p))]
    row_starts, anc = [], []
    for p, trie in zip(prompts, tries):
        row_starts.append(len(ids) - n)
        ids += trie.tokens
        pos += [len(p) - 1 + d for d in trie.depth]
        anc += _ancestor_rows(trie, D, row_starts[-1])
    row_ends = row_starts[1:] + [len(ids) - n]
    bounds = lambda ends: torch.tensor([0] + ends, dtype=torch.int32)  # noqa: E731
    prompt_ends = list(itertools.accumulate(map(len, prompts)))
    # token 0 of row i's candidates is predicted by its last prompt position (kept position i), the rest by
    # the row's nodes (kept position B + the node's place after the prompts)
    at, tok, valid = _pairs(answers, [t.paths for t in tries], lambda i: i, lambda i, k: B + row_starts[i] + k)
    return PackedBatch(
        torch.tensor([ids]), torch.tensor([pos]), bounds(prompt_ends), bounds(row_ends),
        torch.tensor(anc, dtype=torch.long).reshape(len(anc), D),
        torch.cat([torch.tensor(prompt_ends) - 1, torch.arange(n, len(ids))]), at, tok, valid,
        [len(a) for a in answers],
        # The kernel needs upper bounds only; 2 at least, because torch.compile may specialise compiled layers on
        # an int of 0 or 1 and recompile them when a batch of one-token labels is followed by longer ones.
        {"prompt_tokens": n, "prompt_max": max(map(len, prompts)),
         "answer_rows_max": max(2, *(b - a for a, b in zip(row_starts, row_ends)))})


def _padded_mask(seg: torch.Tensor, anc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: a prompt token sees the prompt up to itself; a trie node sees the whole prompt
    and its ancestors and itself, never another branch. Padding sees only itself, so that no row of the mask is
    empty."""
    B, L = seg.shape
    La = anc.shape[1]
    idx = torch.arange(L, device=seg.device)
    allowed = (idx[:, None] >= idx[None, :]) & (seg[:, None, :] == 0) & (seg[:, :, None] >= 0)
    tree = torch.zeros((B, La, La + 1), dtype=torch.bool, device=seg.device)
    tree.scatter_(2, anc.masked_fill(anc < 0, La), True)  # column La takes the "none" entries, then goes
    allowed[:, L - La:, L - La:] = tree[..., :La]
    allowed |= torch.eye(L, dtype=torch.bool, device=seg.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


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
def queue_padded(model, batch: PaddedBatch) -> QueuedScores:
    """One forward over prompts and their candidates, queued without waiting for the GPU: every candidate's
    position computes exactly what a separate prompt + candidate forward would, and logits are taken only where a
    candidate token is predicted. With the batch pinned (:meth:`PaddedBatch.pin`) no copy waits
    either: a pageable copy to the GPU can hold the host until the GPU has caught up."""
    dev = compute_device(model)
    to = lambda t: t.to(dev, non_blocking=True)  # noqa: E731
    mask = _padded_mask(to(batch.segment), to(batch.ancestors), compute_dtype(model))
    out = model(input_ids=to(batch.ids), attention_mask=mask, position_ids=to(batch.pos),
                logits_to_keep=to(batch.keep), use_cache=False)
    logits = out.logits.float()                                                  # [B, 1 + L - P, V]
    lse = torch.logsumexp(logits, dim=-1)  # once per kept position, however many candidates read it
    pb, pp = to(batch.pair_row), to(batch.pair_at)
    picked = logits[pb, pp, to(batch.pair_tok)] - lse[pb, pp]
    return QueuedScores((picked * to(batch.pair_valid)).sum(1), batch.counts)


@torch.no_grad()
def queue_packed(model, batch: PackedBatch) -> QueuedScores:
    """:func:`queue_padded` for a :class:`PackedBatch`: the model attends with
    :func:`llmcls.model.attention.shared_prompt_attention` for this forward only."""
    dev = compute_device(model)
    to = lambda t: t.to(dev, non_blocking=True)  # noqa: E731
    with attention_implementation(model, SHARED_PROMPT_ATTENTION):
        out = model(input_ids=to(batch.ids), position_ids=to(batch.pos), logits_to_keep=to(batch.keep),
                    use_cache=False, prompt_bounds=to(batch.prompt_bounds), answer_rows=to(batch.answer_rows),
                    answer_ancestors=to(batch.answer_ancestors), **batch.sizes)
    logits = out.logits[0].float()                                               # [B + T - n, V]
    lse = torch.logsumexp(logits, dim=-1)  # once per kept position, however many candidates read it
    at = to(batch.pair_at)
    picked = logits[at, to(batch.pair_tok)] - lse[at]
    return QueuedScores((picked * to(batch.pair_valid)).sum(1), batch.counts)


@torch.no_grad()
def score_cached(model, builder: PromptBuilder, rows: Sequence[Row], prompts: list[list[int]]) -> list[list[float]]:
    """Prompt forward with a KV cache, then the candidates' remaining tokens over copies of the cache: one copy per
    candidate, no prefix trie (this layout serves only attention kernels that take no mask, where a trie's
    branches could not be kept apart)."""
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
        cache = getattr(out, _CACHE)
        cache.batch_select_indices(pair_row_t)  # one copy of the row's prompt cache per candidate
        step_in = tgt[:, :-1]
        attn = torch.cat([mask[pair_row_t], valid[:, :-1].long()], dim=1)
        pos = mask.sum(1)[pair_row_t, None] + torch.arange(width - 1, device=dev)[None]
        out2 = model(input_ids=step_in, attention_mask=attn, position_ids=pos, use_cache=True, **{_CACHE: cache})
        logp = torch.log_softmax(out2.logits.float(), dim=-1).gather(2, tgt[:, 1:, None]).squeeze(2)
        total = total + (logp * valid[:, 1:]).sum(1)

    result, k = [], 0
    for r in rows:
        result.append(total[k:k + len(r.candidates)].tolist())
        k += len(r.candidates)
    return result


@dataclass
class CachedBatch:
    builder: PromptBuilder
    rows: Sequence[Row]
    prompts: list[list[int]]


@dataclass(frozen=True)
class _TensorLayout:
    """A layout whose batch is CPU tensors made ahead (and pinned on a GPU) and queued in one forward."""

    name: str
    make: Callable[[PromptBuilder, Sequence[Row], list[list[int]]], Any]
    run: Callable[[Any, Any], "QueuedScores"]

    def prepare(self, builder, rows, prompts, pin=False):
        batch = self.make(builder, rows, prompts)
        return batch.pin() if pin else batch

    def queue(self, model, batch):
        return self.run(model, batch)


class _Cached:
    name = "cached"

    def prepare(self, builder, rows, prompts, pin=False):
        return CachedBatch(builder, rows, prompts)

    def queue(self, model, batch):
        # runs at once: the cache path needs the prompt's forward before it can lay out the candidates
        scores = score_cached(model, batch.builder, batch.rows, batch.prompts)
        return QueuedScores(torch.tensor([s for row in scores for s in row]), [len(s) for s in scores])


LAYOUTS: dict[str, Layout] = {"packed": _TensorLayout("packed", pack_batch, queue_packed),
                              "padded": _TensorLayout("padded", pad_batch, queue_padded), "cached": _Cached()}


def _mask_ok(model) -> bool:
    # A custom 4-D mask reaches the kernel with sdpa and eager attention; flash-attention takes none.
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in (None, "sdpa", "eager")


def layout_for(model) -> Layout:
    """``packed`` where shared-prompt attention can run (:func:`llmcls.model.attention.shared_prompt_ok`), else
    ``padded`` where the attention kernel takes a 4-D mask, else ``cached``. A sequence classifier
    (``lora.task: seq_cls``) has label logits, not candidate tokens: :class:`llmcls.seqcls.SeqClsLayout`."""
    from llmcls import seqcls

    if seqcls.is_seq_cls(model):
        return seqcls.layout(model)
    if shared_prompt_ok(model):
        return LAYOUTS["packed"]
    return LAYOUTS["padded" if _mask_ok(model) else "cached"]
