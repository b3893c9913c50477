"""Training batches for the HF Trainer: left-padded rows (:class:`AnswerCollator`) or rows laid end to end
(:class:`PackedCollator`, ``train.packing``), each asking the model for logits only where an answer token is
predicted, and the loss over those positions (:func:`answer_loss`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from llmcls.encode import IGNORE, left_pad, positions


@dataclass
class AnswerCollator:
    """Left-pads training rows so every row's answer sits at the end, and asks the model for logits only over
    the last ``logits_to_keep`` positions: the answer is a few tokens, full logits are vocabulary-wide.

    ``labels`` is [B, 1 + K]: column 0 is padding (the Trainer counts the tokens a step learns from over
    ``labels[:, 1:]``, as for any causal LM), then the token each kept logit must predict (see :func:`answer_loss`).
    Rows with a ``weight`` (``train.class_weights``) give ``answer_weights`` [B, K], each kept position its row's."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict:
        ids, mask = left_pad([f["input_ids"] for f in features], self.pad_id)
        labels, _ = left_pad([f["labels"] for f in features], IGNORE)
        width = labels.shape[1]
        has = labels != IGNORE
        first = torch.where(has.any(1), has.float().argmax(1), torch.full((len(features),), width))
        keep = max(2, min(int((width - first).max().item()) + 1, width))
        # kept position p predicts token p + 1; the last kept position predicts nothing
        targets = torch.cat([labels[:, width - keep + 1:], torch.full((len(features), 1), IGNORE)], 1)
        out = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask),
               "labels": torch.cat([torch.full((len(features), 1), IGNORE), targets], 1), "logits_to_keep": keep}
        if "weight" in features[0]:
            out["answer_weights"] = torch.tensor([float(f["weight"]) for f in features])[:, None].expand_as(targets)
        return out


@dataclass
class PackedCollator:
    """Padding-free batches (``train.packing``): the micro-batch's rows laid end to end in one sequence, positions
    restarting at 0 on each row, and the rows' boundaries (``cu_seq_lens_*``, ``max_length_*``: the names
    transformers passes through to attention) so that attention stays within each row
    (:func:`llmcls.model.attention.packed_attention`). No compute is spent on padding, and the LM head runs only at the
    positions that predict an answer token. ``labels`` as in :class:`AnswerCollator`: [1, 1 + K]; so are
    ``answer_weights`` [1, K] for rows with a ``weight``.

    ``pad_multiple`` (``train.cuda_graphs``): the sequence is padded up to a multiple of this many tokens, and
    ``max_length_*`` set to that padded length, so that the compiled layers meet a few shapes (each a recorded CUDA
    graph) rather than one per step. The padding continues the last row: causal attention keeps every real token
    from seeing it, and its labels are ignored, so the loss and gradients are those of the unpadded batch.
    ``padding_tokens`` says how many were added (taken out of the batch before the model by
    :class:`llmcls.trainer.WeightedTrainer`, and left out of the token count)."""

    pad_multiple: int = 0
    pad_id: int = 0

    def __call__(self, features: list[dict]) -> dict:
        lengths = [len(f["input_ids"]) for f in features]
        pad = -sum(lengths) % self.pad_multiple if self.pad_multiple else 0
        ids = torch.tensor([t for f in features for t in f["input_ids"]] + [self.pad_id] * pad)
        labels = torch.tensor([t for f in features for t in f["labels"]] + [IGNORE] * pad)
        lengths[-1] += pad
        bounds = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        labels[bounds[:-1].long()] = IGNORE  # a row's first token is never predicted, least of all by the row before
        keep = (labels[1:] != IGNORE).nonzero().squeeze(1)
        # A graph is recorded per distinct value of every size its layers see: one bound per padded length
        longest = int(bounds[-1]) if self.pad_multiple else max(lengths)
        out = {"input_ids": ids[None], "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
               "labels": torch.cat([torch.tensor([IGNORE]), labels[keep + 1]])[None], "logits_to_keep": keep,
               "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}
        if "weight" in features[0]:
            per_token = torch.cat([torch.full((n,), float(f["weight"])) for n, f in zip(lengths, features)])
            out["answer_weights"] = per_token[keep + 1][None]
        if self.pad_multiple:
            out["padding_tokens"] = pad
        return out


def answer_loss(outputs, labels: torch.Tensor, num_items_in_batch: Optional[torch.Tensor | int] = None,
                weights: Optional[torch.Tensor] = None):
    """Token-level cross-entropy on the answer positions; the same value as the model's own causal-LM loss
    (sum over answer tokens / answer tokens in the whole accumulated batch) computed on a few positions.
    ``labels`` comes from the collators above: [B, 1 + K], the targets of the K kept logits after column 0.
    ``weights`` ([B, K], ``train.class_weights``) scale each answer token's term; the divisor stays the token
    count, so weights that average 1 over the rows keep the loss's scale and the learning rate's meaning."""
    logits = outputs.logits
    targets = labels[:, 1:]
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match the kept logits {tuple(logits.shape[:2])}: "
                         "batches for answer_loss come from AnswerCollator or PackedCollator")
    per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE, reduction="none")
    if weights is not None:
        per_token = per_token * weights.to(per_token.device).reshape(-1)
    loss = per_token.sum()
    n = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum()
    n = n.to(loss.device).clamp(min=1) if isinstance(n, torch.Tensor) else max(int(n), 1)
    return loss / n


class AnswerLoss:
    """:func:`answer_loss` as the Trainer's ``compute_loss_func``, holding the current batch's answer weights (set
    by :class:`llmcls.trainer.WeightedTrainer`, which takes them out of the batch before the model sees it)."""

    weights: Optional[torch.Tensor] = None

    def __call__(self, outputs, labels, num_items_in_batch=None):
        return answer_loss(outputs, labels, num_items_in_batch, self.weights)
