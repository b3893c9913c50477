"""Recipe — ``llmcls export``: a finished run as a standard Hugging Face model folder that plain ``transformers`` loads.

LoRA runs are merged into their base (PEFT ``merge_and_unload``), so neither PEFT nor llmcls is needed to use the
result; full fine-tunes are re-saved as they are. Beside the weights (safetensors), the tokenizer and a generation
config, ``llmcls.json`` records what a classifier needs and a bare model folder cannot say: the label set and the
exact prompt (system message, user template, how candidates are rendered, the token budget).

Export layout::

    OUT/config.json, OUT/model*.safetensors, OUT/generation_config.json   the merged model
    OUT/tokenizer.json, OUT/tokenizer_config.json, ...                     the run's tokenizer (with chat template)
    OUT/llmcls.json                                                        labels and prompt settings
    OUT/README.md                                                          how to use it

The folder is built under a temporary name beside OUT and renamed into place, so OUT is either absent, the old
export, or the complete new one; an existing OUT is replaced only when asked (``overwrite``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from llmcls.config import Config, to_dict
from llmcls.env import environment
from llmcls.files import atomic_dir
from llmcls.model.load import resolve_model_path
from llmcls.rundir import EXPORT_FORMAT, EXPORT_META, EXPORT_VERSION, RunDir, load_trained, read_json

log = logging.getLogger(__name__)
LEXICAL_DIR = "lexical"  # the run's TF-IDF model, copied as is (llmcls.lexical reads it without pickle)


def _base_dtype(run: RunDir, cfg: Config) -> torch.dtype:
    """The dtype the weights were stored in: exporting must not silently double (fp32) or halve the folder."""
    folder = run.model if run.model.is_dir() else Path(resolve_model_path(cfg.model))
    try:
        conf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return torch.float32
    name = conf.get("dtype") or conf.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def _generation_config(model, tok, cfg, labels: list[str]):
    """Greedy decoding that stops at the chat turn's end: a classifier's reply is one label, so sampling settings
    inherited from a chat model (temperature, top_p) would only make ``generate`` disagree with scoring."""
    from transformers import GenerationConfig

    eos = [tok.eos_token_id]
    base_eos = model.config.eos_token_id
    for e in (base_eos if isinstance(base_eos, list) else [base_eos]):
        if e is not None and e not in eos:
            eos.append(e)
    longest = max((len(tok(l, add_special_tokens=False)["input_ids"]) for l in labels), default=0)
    return GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                            bos_token_id=model.config.bos_token_id,
                            max_new_tokens=max(longest + 1, cfg.eval.max_new_tokens))


def _model_card(meta: dict) -> str:
    labels = ", ".join(meta["labels"])
    return f"""# Text classifier exported by llmcls

A causal LM fine-tuned ({meta['source']['method']}) to answer with one label. Labels: {labels}.

Load it with plain `transformers` (`AutoModelForCausalLM`, `AutoTokenizer`); no PEFT or llmcls is needed.
`{EXPORT_META}` holds the prompt it was trained with: the system message, the user template (`{{text}}` and
`{{category}}` are filled in; candidates render as {meta['prompt']['category_format']}), and `max_length`, the token
budget of prompt + answer. Classify by scoring each candidate's log-likelihood (its tokens plus the end-of-turn
token) after the chat-template prompt, or by greedy generation (`generation_config.json`).

Serve it over HTTP with `llmcls serve {'{'}this folder{'}'}`.
"""


def _refuse_self_destruction(run: Path, out: Path) -> None:
    r, o = run.resolve(), out.resolve()
    if o == r or o in r.parents:
        raise ValueError(f"{out} holds the run {run}: exporting there would replace the run itself")


def export_target(run_dir: str | Path, out_dir: str | Path, overwrite: bool) -> tuple[RunDir, Path, list[str]]:
    """The run, the output folder and the run's labels, once it is clear the export may be written there."""
    run, out = RunDir(run_dir).require(), Path(out_dir)
    _refuse_self_destruction(run.path, out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    labels = run.labels()
    if not labels:
        raise FileNotFoundError(f"{run.data.summary} is missing: the run's label set is unknown")
    return run, out, labels


def export_kind(cfg: Config, requested: Optional[str], onnx: bool = False) -> str:
    """What ``llmcls export`` writes for this run: ``--as`` (``requested``), by default ``causal-lm``, and
    ``seq-cls`` for a ``lora.task=seq_cls`` run (its trained head is the classifier; it has no LM head to export)."""
    if cfg.lora.task == "seq_cls":
        if requested == "causal-lm":
            raise ValueError("this run trained a classification head (lora.task=seq_cls), not the LM head a "
                             "causal-LM export scores with: export it as it is (--as seq-cls, the default here)")
        return "seq-cls"
    if onnx and requested != "seq-cls":
        raise ValueError("--onnx exports the sequence classifier: add --as seq-cls")
    return requested or "causal-lm"


def export(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False, cfg: Optional[Config] = None,
           device: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> dict:
    """Merge and write the export; returns the contents of ``llmcls.json``. ``cfg`` is the run's config with the
    caller's overrides (``export.device``, ``export.dtype``).

    ``dtype`` (else ``export.dtype``) defaults to the dtype the base (or fine-tuned) weights are stored in. LoRA
    deltas are added in that dtype, the single rounding ``merge_and_unload`` always makes."""
    run, out, labels = export_target(run_dir, out_dir, overwrite)
    cfg = cfg or run.load_config()
    if cfg.lora.task == "seq_cls":  # export_seqcls builds on this module: the CLI picks that export for such a run
        raise ValueError(f"{run.path} trained a classification head (lora.task=seq_cls), not the LM head this "
                         "export scores with: export it with llmcls.recipes.export_seqcls.export_seq_cls "
                         "('llmcls export' does so by itself)")
    device = device or cfg.export.device
    if dtype is None and cfg.export.dtype != "auto":
        dtype = getattr(torch, cfg.export.dtype)
    dtype = dtype or _base_dtype(run, cfg)
    t0 = time.perf_counter()
    trained_on = cfg.model.quantize
    # A QLoRA adapter goes into the base's own unquantised weights: the export needs neither bitsandbytes nor a
    # second rounding of the base (the adapter was trained against the NF4-rounded base; the difference is small)
    cfg.model.quantize = "none"
    model, tok, cfg = load_trained(run.path, cfg, device=device, dtype=dtype, merge=True)
    method = run.method()
    model.config.use_cache = True  # training switched it off; users of the export generate with a cache
    model.generation_config = _generation_config(model, tok, cfg, labels)

    summary = read_json(run.train_summary) or {}
    calibration = run.load_calibration()
    metrics = read_json(run.eval.metrics)
    env = environment()
    meta = {
        # An older reader would silently drop the thresholds: only an export carrying them needs version 3.
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION if run.multi_label else 2,
        "labels": labels,
        "prompt": {"system": cfg.prompt.system, "user_template": cfg.prompt.user_template,
                   "category_format": cfg.prompt.category_format},
        "max_length": cfg.data.max_length,
        "eval_method": cfg.eval.method,
        "scoring": "log-likelihood of each candidate's tokens plus the tokenizer's eos token after the chat-template "
                   "prompt (add_generation_prompt=True); probabilities are the softmax over the candidates",
        "dtype": str(dtype).replace("torch.", ""),
        "source": {"run_dir": str(run.path.resolve()), "method": method, "base_model": cfg.model.name_or_path,
                   "base_quantized_in_training": trained_on,
                   "global_step": summary.get("global_step"), "train_loss": summary.get("train_loss")},
        "eval": {k: metrics[k] for k in ("rows", "accuracy", "macro_f1") if k in metrics} if metrics else None,
        # probabilities = softmax over the candidates of (loglik + bias[label]) / temperature; abstain below
        # threshold (see examples/classify_with_transformers.py)
        "calibration": calibration.to_dict() if calibration is not None else None,
        # the TF-IDF model of a hybrid (calibration.lexical) or a shortlist, as arrays in lexical/
        "lexical": LEXICAL_DIR if run.lexical.is_dir() else None,
        "shortlist": cfg.eval.shortlist if run.lexical.is_dir() else 0,
        # a multi-label run's per-label thresholds (llmcls.multilabel): labels = every candidate over its threshold
        "thresholds": run.load_thresholds(cfg).to_dict() if run.multi_label else None,
        "config": to_dict(cfg),
        "llmcls_version": env["versions"].get("llmcls"), "git_commit": env["git_commit"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    with atomic_dir(out, exists="replace" if overwrite else "error") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if run.lexical.is_dir():
            shutil.copytree(run.lexical, tmp / LEXICAL_DIR)
        (tmp / EXPORT_META).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(meta), encoding="utf-8")
    log.info("exported %s (%s) to %s in %.1f s", run.path, method, out, time.perf_counter() - t0)
    return meta
