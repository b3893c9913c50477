"""``lora.task: seq_cls`` — the classifier as a sequence-classification model (``*ForSequenceClassification``):
the chat model's backbone, a linear head over a fixed label set (the training file's labels, sorted: ``RunDir.labels``),
LoRA on the same projections and the head trained in full (peft's ``SEQ_CLS`` task keeps ``score`` in
``modules_to_save``), as ms-swift's ``task_type seq_cls`` does.

What stays the same as the generative recipe, so the two can be compared like for like: the model reads the very
prompt the generative model answers (system message, user message with the row's candidates, the assistant turn's
header), its text cut exactly as there (``data.max_length``, ``data.truncation: text``: the prompt part of
prepare's encoded rows); the head pools the last prompt token, the position whose LM-head output is the first
answer token. The head starts as the LM head's rows for each label's first token, so before any step the
classifier is the zero-shot first-token classifier (``llmcls export --as seq-cls``'s construction).

At inference the head's logits take the place of the candidate log-likelihoods: a row's candidates pick their
labels' logits, the others are masked, and the log-softmax over the row's candidates is what calibration,
selection, the hybrid and the metrics read (:class:`SeqClsLayout`, which :func:`llmcls.layouts.layout_for` returns
for such a model, so ``classify``, dev scoring and serving need no branch of their own). A candidate outside the
label set has no logit: that is an error, naming it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from llmcls.encode import IGNORE, left_pad, positions

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ the model
def seq_cls_config(config, labels: Sequence[str], pad_token_id: int):
    """A causal LM's config made a sequence classifier's over ``labels``."""
    conf = copy.deepcopy(config)
    conf.architectures = [a.replace("ForCausalLM", "ForSequenceClassification") for a in (conf.architectures or [])]
    conf.id2label = dict(enumerate(labels))
    conf.label2id = {l: i for i, l in enumerate(labels)}
    conf.num_labels = len(labels)
    conf.pad_token_id = pad_token_id  # the pooled position is the last token that is not padding
    conf.tie_word_embeddings = False  # the score layer is a copy of some rows, not the embedding matrix
    conf.use_cache = False
    conf.problem_type = "single_label_classification"
    return conf


def first_token_ids(tok, labels: Sequence[str]) -> list[int]:
    return [tok(l, add_special_tokens=False)["input_ids"][0] for l in labels]


def from_causal(causal, tok, labels: Sequence[str]):
    """The sequence classifier on ``causal``'s own backbone (the same modules: no copy of the weights, wherever
    and however they were loaded), its head the LM head's rows for each label's first token."""
    ids = first_token_ids(tok, labels)
    shared = len(set(ids)) < len(ids)
    if shared:  # allowed here (the head is trained apart), unlike the export, whose head is never trained
        log.warning("lora.task=seq_cls: some labels share their first token, so their head rows start equal "
                    "(training sets them apart)")
    return with_head(causal, labels, ids, tok.pad_token_id)


def with_head(causal, labels: Sequence[str], token_ids: Sequence[int], pad_token_id: int):
    """A ``*ForSequenceClassification`` over ``labels`` on ``causal``'s own backbone (shared, not copied) whose
    bias-free ``score`` layer is the LM head's rows for ``token_ids`` (a copy: training it leaves the LM head).
    :func:`from_causal` and ``llmcls export --as seq-cls`` (``build_seq_cls``) both build it here."""
    from transformers import AutoModelForSequenceClassification

    head = causal.get_output_embeddings().weight
    with torch.device("meta"):  # the backbone is the causal LM's: nothing to allocate but the head
        seq = AutoModelForSequenceClassification.from_config(seq_cls_config(causal.config, labels, pad_token_id),
                                                             dtype=head.dtype)
    score = getattr(seq, "score", None)
    if not isinstance(score, torch.nn.Linear) or score.bias is not None:
        raise ValueError(f"{type(seq).__name__} has no bias-free 'score' layer to fill from the LM head")
    setattr(seq, seq.base_model_prefix, getattr(causal, causal.base_model_prefix))
    seq.score = torch.nn.Linear(head.shape[1], len(labels), bias=False, device=head.device, dtype=head.dtype)
    with torch.no_grad():
        seq.score.weight.copy_(head[list(token_ids)])
    meta = [n for n, p in [*seq.named_parameters(), *seq.named_buffers()] if p.device.type == "meta"]
    if meta:
        raise RuntimeError(f"sequence classifier left uninitialised: {meta[:3]}")
    return seq


def load(cfg, tok, labels: Sequence[str], folder, device=None, dtype=None, adapter_name: str = "default"):
    """A ``seq_cls`` run's model for :func:`llmcls.rundir.load_trained`: ``folder`` holds a LoRA adapter (with the
    trained head), a full fine-tune's model, or is None (the base with the initial head: zero-shot)."""
    from llmcls.model.load import load_model, place_model, resolve_model_path

    if folder is not None and (folder / "config.json").is_file():  # lora.method=full: a complete classifier
        from transformers import AutoModelForSequenceClassification

        from llmcls.model.load import device_default, resolve_dtype

        device = device or device_default()
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=dtype or resolve_dtype(cfg.model.dtype, device))
        return place_model(model, device)
    seq = from_causal(load_model(cfg.model, resolve_model_path(cfg.model), device, dtype), tok, labels)
    if folder is None:
        return seq
    from peft import PeftModel

    from llmcls.model.load import adapter_autocast, peft_quietly

    with peft_quietly():
        return PeftModel.from_pretrained(seq, folder, adapter_name=adapter_name,
                                         autocast_adapter_dtype=adapter_autocast(cfg.lora))


def is_seq_cls(model) -> bool:
    from llmcls.model.load import unwrap

    return type(unwrap(model)).__name__.endswith("ForSequenceClassification")


# -------------------------------------------------------------------------------------------------- training
def to_examples(dataset, labels: Sequence[str]):
    """Prepare's encoded rows (prompt + answer, the prompt masked) as classifier examples: the prompt part, cut as
    the generative recipe cuts it, and the label's index in ``labels``."""
    index = {l: i for i, l in enumerate(labels)}

    def one(ex):
        n = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE)  # the answer's first position
        return {"input_ids": ex["input_ids"][:n], "length": n, "class": index[ex["label"]]}

    return dataset.map(one, remove_columns=["labels"], desc="seq_cls examples")


@dataclass
class LabelCollator:
    """Right-padded prompts and their label indices. The head pools each row's last non-pad token, wherever the
    padding is (transformers' pooling); padding on the right keeps every padded position attending to real tokens
    before it. Left padding would give the pads queries with nothing to attend to: a 0.5B run on an H200 went NaN
    in its second epoch with it (the generative path never trains on padded rows: it packs them).

    ``labels`` is [B, 2], column 0 ignored: transformers releases differ in whether the Trainer counts a batch's
    items over ``labels`` or ``labels[:, 1:]``; column 1 alone is counted either way."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict:
        seqs = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=self.pad_id)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
        cls = torch.tensor([int(f["class"]) for f in features])
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.stack([torch.full_like(cls, IGNORE), cls], 1)}


def label_loss(logits: torch.Tensor, target: torch.Tensor, num_items: Optional[torch.Tensor | int] = None,
               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy of the label logits, each row's term times its label's weight (``train.class_weights``),
    summed over the accumulated batch's rows: as the generative loss, the divisor stays the row count, so weights
    that average 1 over the rows (``balanced``) keep the loss's scale and the learning rate's meaning."""
    ce = F.cross_entropy(logits.float(), target, weight=None if weights is None else weights.to(logits.device),
                         reduction="sum")
    n = num_items if num_items is not None else target.numel()
    n = n.to(ce.device).clamp(min=1) if isinstance(n, torch.Tensor) else max(int(n), 1)
    return ce / n


class LabelLoss:
    """:func:`label_loss` as the Trainer's ``compute_loss_func`` (the model gets no labels, so its own unweighted
    loss is never computed)."""

    weights = None  # WeightedTrainer sets a batch's answer weights here; a head's weights are per label, fixed

    def __init__(self, class_weights: Optional[torch.Tensor] = None):
        self.class_weights = class_weights

    def __call__(self, outputs, labels, num_items_in_batch=None):
        return label_loss(outputs.logits, labels[:, 1].to(outputs.logits.device), num_items_in_batch,
                          self.class_weights)


# ------------------------------------------------------------------------------------------------- inference
@dataclass
class SeqClsBatch:
    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    cand: torch.Tensor    # [B, C] label index of each candidate (0 where the row has fewer)
    valid: torch.Tensor   # [B, C] bool
    counts: list[int]

    def pin(self) -> "SeqClsBatch":
        return SeqClsBatch(self.ids.pin_memory(), self.mask.pin_memory(), self.pos.pin_memory(),
                           self.cand.pin_memory(), self.valid.pin_memory(), self.counts)


class SeqClsLayout:
    """The :class:`llmcls.layouts.Layout` of a sequence classifier: one left-padded forward per batch; each row's
    score of a candidate is its log-probability among the row's candidates (the other labels masked)."""

    name = "seq_cls"

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self.index = {l: i for i, l in enumerate(self.labels)}

    def prepare(self, builder, rows, prompts, pin: bool = False) -> SeqClsBatch:
        for r in rows:
            unknown = [c for c in r.candidates if c not in self.index]
            if unknown:
                where = f"row at line {r.line}" if r.line else "a row"
                raise ValueError(f"{where}: candidate {unknown[0]!r} is not one of the labels the classification "
                                 f"head was trained on (lora.task=seq_cls): {', '.join(self.labels)}")
        ids, mask = left_pad(prompts, builder.tok.pad_token_id)
        width = max(len(r.candidates) for r in rows)
        cand = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for k, r in enumerate(rows):
            cand[k, :len(r.candidates)] = torch.tensor([self.index[c] for c in r.candidates])
            valid[k, :len(r.candidates)] = True
        batch = SeqClsBatch(ids, mask, positions(mask), cand, valid, [len(r.candidates) for r in rows])
        return batch.pin() if pin else batch

    @torch.no_grad()
    def queue(self, model, batch: SeqClsBatch) -> "QueuedLogits":
        from llmcls.model.load import compute_device

        dev = compute_device(model)
        to = lambda t: t.to(dev, non_blocking=True)  # noqa: E731
        logits = model(input_ids=to(batch.ids), attention_mask=to(batch.mask), position_ids=to(batch.pos),
                       use_cache=False).logits.float()                                   # [B, labels]
        valid = to(batch.valid)
        picked = logits.gather(1, to(batch.cand)).masked_fill(~valid, float("-inf"))
        scores = torch.log_softmax(picked, -1)[valid]  # the row's candidates, in its order, flattened
        return QueuedLogits(scores, batch.counts)


class QueuedLogits:
    """A batch's scores, left on the device until :meth:`result` (``classify`` queues the next batch first)."""

    def __init__(self, flat: torch.Tensor, counts: list[int]):
        self.flat, self.counts = flat, counts

    def result(self) -> list[list[float]]:
        flat, out, k = self.flat.tolist(), [], 0
        for n in self.counts:
            out.append(flat[k:k + n])
            k += n
        return out


def layout(model) -> SeqClsLayout:
    from llmcls.model.load import unwrap

    conf = unwrap(model).config
    return SeqClsLayout([conf.id2label[i] for i in range(conf.num_labels)])
