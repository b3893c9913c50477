"""Recipe — ``llmcls export --as seq-cls``: a run as a standard sequence classifier (``AutoModelForSequenceClassification``,
``pipeline("text-classification")``), optionally also as ONNX (``--onnx``).

The fine-tuned causal LM answers with a label; its first answer token is read from the final hidden state at the
prompt's last position through the LM head. A sequence classifier whose score layer is the LM head's rows for the
labels' first tokens (``[num_labels, hidden]``, no bias) computes exactly those logits, pooling the same position
(the last non-pad token, so ``pad_token_id`` is set in the config). What is equal, precisely:

* ``logits[c] = lm_logits[first_token(c)]`` at the prompt's last position, so ``softmax(logits)`` equals the
  causal LM's next-token distribution renormalised over the labels' first tokens;
* llmcls's exact scorer adds the rest: the log-probability of each label's remaining tokens and of the end token.
  Where every label is a single token, the exact scorer's softmax equals ``softmax(logits)`` up to the end-token
  term ``log p(eos | prompt, label)``; the labels are ranked the same whenever that term does not reorder them.

Labels that share their first token cannot be told apart this way; they are refused. How often the exported
classifier picks the exact scorer's label is measured on ``data.test_file`` (every label offered, as the export
offers them) and written into ``llmcls.json`` (``seq_cls.agreement``) and the model card.

The export's input is the run's chat prompt with the text in it: ``llmcls.json`` holds ``seq_cls.prompt_prefix``
and ``prompt_suffix``, so ``pipe(prefix + text + suffix)`` tokenizes to exactly the ids llmcls scores (the texts are
not shortened: keep them within ``max_length``). Calibration (temperature, label biases) is fitted on the exact
scores and is not carried over.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from llmcls.config import Config
from llmcls.files import atomic_dir
from llmcls.rundir import EXPORT_META, load_trained, read_json

log = logging.getLogger(__name__)
SEQ_CLS_FORMAT = "llmcls-seq-cls"  # not "llmcls-export": llmcls serve must not load it as a causal LM
ONNX_FILE = "model.onnx"
_SENTINEL = "\u2063LLMCLS_TEXT\u2063"  # an invisible separator around a name no prompt contains


def first_tokens(tok, labels: list[str]) -> list[int]:
    """Each label's first answer token; refuses labels that share one (their first-token logits are one number)."""
    from llmcls.seqcls import first_token_ids

    firsts = first_token_ids(tok, labels)
    seen: dict[int, str] = {}
    for label, t in zip(labels, firsts):
        if t in seen:
            raise ValueError(f"--as seq-cls needs labels with distinct first tokens: {seen[t]!r} and {label!r} both "
                             f"start with token {t} ({tok.decode([t])!r}); use the causal-LM export, which scores "
                             "every token of a label")
        seen[t] = label
    return firsts


def prompt_parts(builder, labels: list[str]) -> tuple[str, str]:
    """The rendered chat prompt around the text, for a row offered every label."""
    from llmcls.data import Row

    rendered = builder.prompt_text(Row(_SENTINEL, list(labels), None))
    prefix, found, suffix = rendered.partition(_SENTINEL)
    if not found or _SENTINEL in suffix:
        raise ValueError("the prompt template must contain {text} exactly once for --as seq-cls")
    return prefix, suffix


def build_seq_cls(model, labels: list[str], token_ids: list[int], pad_token_id: int):
    """A ``*ForSequenceClassification`` of the same architecture: the causal LM's backbone (its modules, shared:
    :func:`llmcls.seqcls.with_head`, as ``lora.task: seq_cls`` builds its initial classifier), and a score layer
    made of the LM head's rows for ``token_ids``."""
    from llmcls.seqcls import with_head

    seq = with_head(model, labels, token_ids, pad_token_id)
    seq.config.architectures = [type(model).__name__.replace("ForCausalLM", "ForSequenceClassification")]
    return seq.eval()


@torch.no_grad()
def seq_cls_logits(seq, prompts: list[list[int]], pad_token_id: int, batch_size: int = 16,
                   padding_side: str = "left") -> torch.Tensor:
    """Label logits of tokenized prompts, batched with padding as a pipeline would pad them."""
    out = []
    dev = next(seq.parameters()).device
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, p in enumerate(chunk):
            sl = slice(width - len(p), width) if padding_side == "left" else slice(0, len(p))
            ids[k, sl], mask[k, sl] = torch.tensor(p), 1
        out.append(seq(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, seq.config.num_labels)


def agreement(cfg: Config, model, seq, tok, labels: list[str], limit: Optional[int] = None) -> Optional[dict]:
    """How often the sequence classifier picks the exact scorer's label, on ``data.test_file`` with every label
    offered; None without a test file."""
    from llmcls.data import read_rows, source_exists
    from llmcls.encode import PromptBuilder
    from llmcls.infer import classify, prompts_for

    test = cfg.data.test_file
    if not test or not source_exists(test):
        return None
    rows, _ = read_rows(test, cfg.data, on_invalid="skip", limit=limit or cfg.data.max_eval_rows)
    for r in rows:  # the export offers every label; single-label truths outside the set cannot be checked
        r.candidates = list(labels)
    builder = PromptBuilder(tok, cfg.prompt)
    exact = classify(model, builder, rows, "score", cfg.eval.batch_size, max_length=cfg.data.max_length,
                     progress=False)
    t0 = time.perf_counter()
    logits = seq_cls_logits(seq, prompts_for(builder, rows, cfg.data.max_length), tok.pad_token_id,
                            cfg.eval.batch_size)
    seconds = time.perf_counter() - t0
    picks = [labels[i] for i in logits.argmax(-1).tolist()]
    same = sum(p == e.pred for p, e in zip(picks, exact))
    truth = [r.label for r in rows]
    return {"file": str(test), "rows": len(rows), "agreement": same / len(rows),
            "accuracy_seq_cls": sum(p == t for p, t in zip(picks, truth)) / len(rows),
            "accuracy_exact": sum(e.pred == t for e, t in zip(exact, truth)) / len(rows),
            "rows_per_s_torch": len(rows) / seconds if seconds > 0 else None}


def export_onnx(seq, path: Path, pad_token_id: int) -> None:
    """The classifier through torch.onnx's exporter (dynamo): inputs ``input_ids`` and ``attention_mask``
    (batch and length dynamic), output ``logits``. Exported in float32, what ONNX Runtime's CPU kernels run."""

    class Logits(torch.nn.Module):  # a plain tensor out, not a ModelOutput
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    m = Logits(copy.deepcopy(seq).float().cpu()).eval()
    ids = torch.full((2, 8), 100, dtype=torch.long)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = pad_token_id, 0  # a padded row among the examples, so padding is traced
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    torch.onnx.export(m, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamo=True,
                      dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}})


def _card(meta: dict) -> str:
    s = meta["seq_cls"]
    if s.get("trained"):
        return _trained_card(meta)
    agree = s.get("agreement")
    measured = (f"On {agree['file']} ({agree['rows']} rows, every label offered) it picks the exact scorer's label "
                f"for {agree['agreement']:.2%} of rows (accuracy {agree['accuracy_seq_cls']:.4f} vs "
                f"{agree['accuracy_exact']:.4f} exact)." if agree else "No test file was available to measure "
                                                                       "agreement with the exact scorer.")
    onnx = (f"\n`{ONNX_FILE}` is the same classifier for ONNX Runtime (inputs `input_ids`, `attention_mask`; output "
            "`logits`).\n" if s.get("onnx") else "")
    return f"""# Text classifier exported by llmcls (sequence classification)

Labels: {", ".join(meta["labels"])}. Load with `AutoModelForSequenceClassification` or
`pipeline("text-classification", model=THIS_FOLDER)`; no PEFT or llmcls needed.

The input must be the chat prompt the model was trained with, the text inside it:

```python
import json
from transformers import pipeline
meta = json.load(open("THIS_FOLDER/llmcls.json"))["seq_cls"]
pipe = pipeline("text-classification", model="THIS_FOLDER")
pipe(meta["prompt_prefix"] + text + meta["prompt_suffix"], top_k=None)
```

Each label's logit is the fine-tuned LM's logit for the label's first token after the prompt; the labels' first
tokens are distinct. llmcls's own scorer also counts the labels' later tokens and the end token. {measured}
Texts are not shortened: keep prompt + text within {meta["max_length"]} tokens.
{onnx}"""


def _trained_card(meta: dict) -> str:
    s = meta["seq_cls"]
    ev = s.get("eval")
    measured = (f"llmcls eval of the run: accuracy {ev['accuracy']:.4f}, macro-F1 {ev['macro_f1']:.4f} on {ev['rows']} "
                "test rows (each row offered its own candidates)." if ev else "")
    return f"""# Text classifier exported by llmcls (sequence classification, trained as one)

Labels: {", ".join(meta["labels"])}. Load with `AutoModelForSequenceClassification` or
`pipeline("text-classification", model=THIS_FOLDER)`; no PEFT or llmcls needed.

Trained with `lora.task: seq_cls`: LoRA adapters (merged here) and a classification head over these labels, on the
chat prompt below. The input must be that prompt with the text inside it; `llmcls.json` holds the prompt around the
text with every label offered as a candidate (render your own candidates with its `prompt` settings and take the
highest-scoring of them, as llmcls does):

```python
import json
from transformers import pipeline
meta = json.load(open("THIS_FOLDER/llmcls.json"))["seq_cls"]
pipe = pipeline("text-classification", model="THIS_FOLDER")
pipe(meta["prompt_prefix"] + text + meta["prompt_suffix"], top_k=None)
```

{measured} Texts are not shortened: keep prompt + text within {meta["max_length"]} tokens.
""" + (f"\n`{ONNX_FILE}` is the same classifier for ONNX Runtime (inputs `input_ids`, `attention_mask`; output "
       "`logits`).\n" if s.get("onnx") else "")


def export_seq_cls(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False, cfg: Optional[Config] = None,
                   onnx: bool = False, device: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> dict:
    """Write the sequence-classification export (and ``model.onnx`` with ``onnx``); returns its ``llmcls.json``."""
    from llmcls.encode import PromptBuilder
    from llmcls.recipes.export import _base_dtype, export_target

    run, out, labels = export_target(run_dir, out_dir, overwrite)
    if run.multi_label:
        raise ValueError("--as seq-cls exports a single-label classifier (softmax over the labels); this run is "
                         "multi-label: use the causal-LM export")
    if onnx:  # before the merge: a missing exporter should not cost a model load
        try:
            import onnx as _onnx  # noqa: F401
            import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter)
        except ImportError as e:
            raise ValueError(f"--onnx needs the onnx and onnxscript packages ({e.name} is missing): "
                             "pip install 'llmcls[onnx]'") from None
    cfg = cfg or run.load_config()
    device = device or cfg.export.device
    if dtype is None and cfg.export.dtype != "auto":
        dtype = getattr(torch, cfg.export.dtype)
    dtype = dtype or _base_dtype(run, cfg)
    m = read_json(run.eval.metrics)
    cfg.model.quantize = "none"  # as the causal-LM export: the adapter goes into the unquantised base
    model, tok, cfg = load_trained(run.path, cfg, device=device, dtype=dtype, merge=True)
    trained = cfg.lora.task == "seq_cls"  # the run's own classifier (llmcls.seqcls), head and all
    # refuses shared first tokens before the measurement (a trained head has its own rows)
    token_ids = None if trained else first_tokens(tok, labels)
    if trained:
        seq, agree = model, None
    else:
        seq = build_seq_cls(model, labels, token_ids, tok.pad_token_id)
        agree = agreement(cfg, model, seq, tok, labels)
    prefix, suffix = prompt_parts(PromptBuilder(tok, cfg.prompt), labels)
    del model
    meta = {
        "format": SEQ_CLS_FORMAT, "format_version": 1, "labels": labels, "max_length": cfg.data.max_length,
        "prompt": {"system": cfg.prompt.system, "user_template": cfg.prompt.user_template,
                   "category_format": cfg.prompt.category_format},
        "seq_cls": ({"prompt_prefix": prefix, "prompt_suffix": suffix, "trained": True,
                     "scoring": "the classification head trained with lora.task=seq_cls (initialised from the LM "
                                "head's first-token rows); a row's candidates restrict the softmax",
                     "eval": {k: m[k] for k in ("rows", "accuracy", "macro_f1") if k in m} if m else None,
                     "onnx": ONNX_FILE if onnx else None} if trained else
                    {"prompt_prefix": prefix, "prompt_suffix": suffix, "label_token_ids": token_ids,
                     "label_tokens": [tok.decode([t]) for t in token_ids],
                     "single_token_labels": all(len(tok(l, add_special_tokens=False)["input_ids"]) == 1
                                                for l in labels),
                     "scoring": "logit of each label's first token after the prompt (LM head rows); llmcls's exact "
                                "scorer adds the later tokens and the end token",
                     "agreement": agree, "onnx": ONNX_FILE if onnx else None}),
        "calibration": None,
        "dtype": str(dtype).replace("torch.", ""),
        "source": {"run_dir": str(run.path.resolve()), "method": run.method(),
                   "base_model": cfg.model.name_or_path},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tok = copy.deepcopy(tok)
    tok.model_max_length = cfg.data.max_length
    with atomic_dir(out, exists="replace" if overwrite else "error") as tmp:
        seq.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if onnx:
            t0 = time.perf_counter()
            export_onnx(seq, tmp / ONNX_FILE, tok.pad_token_id)
            log.info("ONNX export in %.1f s", time.perf_counter() - t0)
        (tmp / EXPORT_META).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_card(meta), encoding="utf-8")
    if agree:
        log.info("seq-cls export agrees with the exact scorer on %.2f%% of %d rows", 100 * agree["agreement"],
                 agree["rows"])
    return meta
