"""llmcls's two attention functions, registered through transformers' ``AttentionInterface`` (no patching):
``packed_attention`` for training on rows laid end to end (``train.packing``) and ``shared_prompt_attention`` for
scoring a flat batch of prompts and their candidates; their dense reference for CPUs and tests; and the context
managers that switch a model to them and back."""

from __future__ import annotations

import contextlib
import logging
import types

import torch

from llmcls.model.load import compute_device, compute_dtype, unwrap

log = logging.getLogger(__name__)

PACKED_ATTENTION = "llmcls_packed"


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over rows laid end to end in one sequence (``train.packing``, batches from
    :class:`llmcls.encode.PackedCollator`): each token sees the tokens before it in its own row, nothing else.
    Called by transformers' attention layers with [1, heads, T, head_dim] tensors; returns [1, T, heads,
    head_dim] as its own attention functions do. On a GPU it runs FlashAttention's variable-length kernel
    (``torch.nn.attention.varlen``), whose cost is that of the rows apart; elsewhere its dense reference
    (:func:`dense_varlen_attn`) gives the same result."""
    from transformers.integrations.sdpa_attention import repeat_kv

    bounds, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if bounds is None:
        raise ValueError("packed attention needs the rows' boundaries (cu_seq_lens_q): its batches come from "
                         "llmcls.encode.PackedCollator")
    if dropout and module.training:
        raise ValueError("packed attention has no attention dropout (Qwen models use none)")
    window = kwargs.get("sliding_window")
    if window is not None and longest is not None and longest > window:
        raise ValueError(f"a row of {longest} tokens is longer than this layer's sliding window ({window}), which "
                         "packed attention does not apply: turn train.packing off for rows this long")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, head_dim]
    out = _varlen_for(query)(q, k, v, bounds, bounds, longest, longest, scale=scaling, window_size=(-1, 0))
    return out[None], None


SHARED_PROMPT_ATTENTION = "llmcls_shared_prompt"


def shared_prompt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Scoring attention over one flat batch (:func:`llmcls.layouts.pack_batch`): every row's prompt, then every
    row's candidates as a prefix trie (:class:`llmcls.layouts.Trie`). A prompt token sees its prompt up to itself;
    a trie node sees its whole prompt and its ancestors and itself. Prompts run causal and the nodes over their
    row's prompt in variable-length attention calls; the nodes over their ancestors (a trie's branches are not
    contiguous) as a gathered attention over at most depth keys (:func:`ancestor_attention`); those last two are
    merged through their log-sum-exps. Nothing is computed for padding or for masked-out pairs, each prompt once
    however many candidates follow it, each shared prefix once. The boundaries come as keyword arguments from the
    model's forward (ints as ints, so that compiled layers keep them symbolic)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    try:
        n, pb, pmax = kwargs["prompt_tokens"], kwargs["prompt_bounds"], kwargs["prompt_max"]
    except KeyError:
        raise ValueError("shared-prompt attention needs a flat batch's boundaries: its inputs come from "
                         "llmcls.layouts.pack_batch") from None
    groups = getattr(module, "num_key_value_groups", 1)
    k_own, v_own = key[0, :, n:].transpose(0, 1), value[0, :, n:].transpose(0, 1)  # [T - n, kv heads, head_dim]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, head_dim]
    attend = _varlen_for(query)
    out = attend(q[:n], k[:n], v[:n], pb, pb, pmax, pmax, scale=scaling, window_size=(-1, 0))
    if q.shape[0] > n:
        rows, rmax = kwargs["answer_rows"], kwargs["answer_rows_max"]
        on_prompt, lse_p = attend(q[n:], k[:n], v[:n], rows, pb, rmax, pmax, scale=scaling,
                                  return_aux=_lse_request())
        on_own, lse_o = ancestor_attention(q[n:], k_own, v_own, kwargs["answer_ancestors"], scaling)
        # softmax over (prompt keys + ancestor keys) = each part's softmax weighted by its share of the total mass
        w = torch.sigmoid(lse_p.float() - lse_o).transpose(0, 1)[..., None]     # [T - n, heads, 1]
        out = torch.cat([out, (on_prompt.float() * w + on_own * (1 - w)).to(out.dtype)])
    return out[None], None


def ancestor_attention(query, key, value, ancestors, scale=None):
    """Each query over its own few keys: ``ancestors`` [T, D] indexes ``key`` / ``value`` ([T_k, kv heads,
    head_dim]; -1 for none), ``query`` is [T, heads, head_dim] (heads a multiple of the kv heads, as grouped-query
    attention shares them). Returns the output in float32 [T, heads, head_dim] and the log-sum-exp [heads, T]
    (as the variable-length kernel does). One gather of [T, kv heads, head_dim] per depth rather than all at
    once: a trie is a few levels deep, and its nodes may be many thousands."""
    t, h, d = query.shape
    hk = key.shape[1]
    scale = d ** -0.5 if scale is None else scale
    q = query.float().reshape(t, hk, h // hk, d)
    idx = ancestors.clamp(min=0)
    # a product and a sum over head_dim, not einsum: that would be a batched matmul of T x heads 1 x d x 1 pieces
    scores = torch.stack([(q * key[idx[:, j]].float()[:, :, None]).sum(-1)
                          for j in range(ancestors.shape[1])], -1) * scale        # [T, kv heads, groups, D]
    scores = scores.masked_fill((ancestors < 0)[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    p = torch.exp(scores - lse[..., None])
    out = sum(p[..., j, None] * value[idx[:, j]].float()[:, :, None] for j in range(ancestors.shape[1]))
    return out.reshape(t, h, d), lse.reshape(t, h).transpose(0, 1)


def shared_prompt_ok(model) -> bool:
    """Whether :func:`shared_prompt_attention` can score for this model: on a GPU whose torch has variable-length
    FlashAttention, in 16-bit weights (all that kernel takes), with no sliding-window layers (which it does not
    apply)."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None or compute_device(base).type != "cuda" or _varlen_attn() is None:
        return False
    if compute_dtype(base) not in (torch.bfloat16, torch.float16):
        return False
    return "sliding_attention" not in (getattr(config, "layer_types", None) or ())


def dense_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                      return_aux=None):
    """``torch.nn.attention.varlen.varlen_attn`` written out densely (same arguments and results, the log-sum-exp
    as [heads, T_q]): where that FlashAttention kernel does not run (a CPU), and as its reference. Without the
    log-sum-exp it is sdpa under a [T_q, T_k] mask (as fast as attention under a dense mask gets on a CPU); with
    it, the softmax written out in float32."""
    tq, tk = query.shape[0], key.shape[0]
    seg_q = torch.searchsorted(cu_seq_q[1:].to(query.device), torch.arange(tq, device=query.device), right=True)
    seg_k = torch.searchsorted(cu_seq_k[1:].to(query.device), torch.arange(tk, device=query.device), right=True)
    allowed = seg_q[:, None] == seg_k[None, :]
    if window_size == (-1, 0):  # causal, aligned at the end of each sequence pair as FlashAttention does
        from_end_q = cu_seq_q[1:].to(query.device)[seg_q] - torch.arange(tq, device=query.device)
        from_end_k = cu_seq_k[1:].to(query.device)[seg_k] - torch.arange(tk, device=query.device)
        allowed &= from_end_q[:, None] <= from_end_k[None, :]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if return_aux is None or not return_aux.lse:
        # [1, heads, T, head_dim]: sdpa's fast CPU kernel takes 4-D inputs only (3-D ones run ~4x slower)
        q, k, v = (t.transpose(0, 1)[None] for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
        return out[0].transpose(0, 1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), key.float()) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                            # [heads, T_q]
    out = torch.einsum("hqk,khd->qhd", torch.exp(scores - lse[..., None]), value.float()).to(query.dtype)
    return out, lse


def _lse_request():
    try:
        from torch.nn.attention.varlen import AuxRequest
    except ImportError:  # torch < 2.10: only dense_varlen_attn runs, and it reads .lse alone
        return types.SimpleNamespace(lse=True)
    return AuxRequest(lse=True)


def _varlen_for(query):
    """FlashAttention's variable-length kernel for a GPU query where torch has it, else its dense reference."""
    return (_varlen_attn() if query.is_cuda else None) or dense_varlen_attn


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10
    except ImportError:
        return None
    return varlen_attn


def _register_attention() -> None:
    # transformers' documented extension point for attention functions; no mask function is registered with
    # them, so transformers builds no attention mask for their batches (the boundaries say it all)
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionInterface.register(SHARED_PROMPT_ATTENTION, shared_prompt_attention)


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Inside, the model attends with the attention function registered as ``name`` (one of llmcls's, above);
    after, as before."""
    base = unwrap(model)
    before = base.config._attn_implementation
    _register_attention()
    base.set_attn_implementation(name)
    try:
        yield model
    finally:
        base.set_attn_implementation(before)


@contextlib.contextmanager
def packed_rows(model, enabled: bool = True):
    """Inside, the model attends with :func:`packed_attention`; after, as before (a model handed back to its user
    should attend as it did)."""
    if not enabled:
        yield model
        return
    base = unwrap(model)
    if compute_device(base).type == "cuda" and _varlen_attn() is None:
        log.warning("torch %s has no variable-length FlashAttention (torch.nn.attention.varlen, torch >= 2.10): "
                    "packed rows fall back to a dense mask, slower than padding", torch.__version__)
    with attention_implementation(model, PACKED_ATTENTION):
        yield model

