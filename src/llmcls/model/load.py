"""Stage 3 — model: find the weights (local folder, ModelScope, Hugging Face), load the tokenizer and the model in
the right dtype and place (quantised, embeddings in host memory, or spread over GPUs), attach LoRA adapters,
compile (``model/compiling.py``). Loading a *finished run* is :func:`llmcls.rundir.load_trained`; the tiny preset
is ``model/tiny.py``; llmcls's attention functions are ``model/attention.py``."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

from llmcls.config import ConfigError, LoraConfig, ModelConfig, check_model
from llmcls.model.tiny import TINY, qwen_tokenizer_dir

log = logging.getLogger(__name__)


class ModelNotFound(RuntimeError):
    pass


def device_default() -> str:
    """The GPU of this process: under torchrun / accelerate launch, the one numbered LOCAL_RANK."""
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


# --------------------------------------------------------------------------------------------- weights
def resolve_model_path(cfg: ModelConfig) -> str:
    """A local folder holding the model. Hub ids are downloaded (or found in the hub cache when offline)."""
    name = cfg.name_or_path
    if name == TINY:
        return TINY
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local)
    if cfg.source == "local":
        raise ModelNotFound(f"model folder not found: {local}")
    if cfg.source in ("auto", "modelscope"):
        from modelscope import snapshot_download

        # local_files_only: ModelScope otherwise calls the network even when the files are cached.
        try:
            return snapshot_download(name, revision=cfg.revision, cache_dir=cfg.cache_dir,
                                     local_files_only=cfg.offline)
        except Exception as e:  # the hub client raises many types; all mean "not available"
            where = "the local ModelScope cache (offline)" if cfg.offline else "ModelScope"
            raise ModelNotFound(f"could not get '{name}' from {where}: {e}. Pass a local folder as "
                                "model.name_or_path, or model.source=huggingface.") from e
    from huggingface_hub import snapshot_download as hf_snapshot

    try:
        return hf_snapshot(name, revision=cfg.revision, cache_dir=cfg.cache_dir, local_files_only=cfg.offline)
    except Exception as e:
        where = "the local Hugging Face cache (offline)" if cfg.offline else "the Hugging Face Hub"
        raise ModelNotFound(f"could not get '{name}' from {where}: {e}") from e



def load_tokenizer(cfg: ModelConfig, path: Optional[str] = None):
    """Load from a folder (transformers 5 renamed constructor arguments; folders load the same everywhere).
    ``path`` wins over ``cfg.tokenizer``, which wins over the model's own folder."""
    from transformers import AutoTokenizer

    path = path or cfg.tokenizer
    if path is None:
        path = str(qwen_tokenizer_dir()) if cfg.name_or_path == TINY else resolve_model_path(cfg)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(kind: str, dtype: torch.dtype):
    """bitsandbytes settings for ``model.quantize`` (None for 'none', and for 'fp8', which converts the loaded
    model instead: :mod:`llmcls.model.fp8`): NF4 with double quantisation, computing in ``dtype``, the QLoRA
    paper's choice."""
    if kind in ("none", "fp8"):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"model.quantize={kind} needs bitsandbytes: pip install 'llmcls[qlora]'") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_model(cfg: ModelConfig, path: str, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
               training: bool = False):
    """The base model on ``device`` as ``cfg`` says (dtype, attention kernel, quantisation, embeddings' place).
    ``training``: gradients will flow through the base (``model.fp8_weights: stored`` keeps the weights' second
    layout for them; scoring does not need it)."""
    from transformers import AutoModelForCausalLM

    device = device or device_default()
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantize == "nf4":
        kwargs["quantization_config"] = quantization_config(cfg.quantize, dtype)
    check_model(cfg)
    if cfg.quantize == "fp8":  # refuse a card without FP8 matmuls (or a missing torchao) before loading weights
        from llmcls.model import fp8

        fp8.check_device(device)
        if cfg.fp8_weights == "cast":  # stored weights need only torch's own _scaled_mm
            fp8.require_torchao()
    if cfg.device_map:  # accelerate places the layers over the GPUs (and CPU if they run out); no .to() after
        return AutoModelForCausalLM.from_pretrained(path, device_map=cfg.device_map, **kwargs)
    if cfg.quantize == "nf4":  # weights are quantised as they are placed; a quantised model is never moved after
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model = place_model(model, device, cfg.offload_embeddings)
    # before peft wraps the linears: it wraps Float8Linear and StoredFP8Linear as it wraps nn.Linear
    if cfg.quantize == "fp8" and cfg.fp8_weights == "stored":
        fp8.store(model, training, cfg.fp8_fast_accum)
    elif cfg.quantize == "fp8":
        fp8.convert(model, cfg.fp8_scaling, fast_accum=cfg.fp8_fast_accum)
    return model


class HostEmbedding(torch.nn.Embedding):
    """A frozen input-embedding table that stays in host memory: the lookup runs on the CPU and only the looked-up
    rows (batch x tokens x hidden, a few MB) travel to ``device``. On Qwen 7B this keeps 1.2 GiB off the GPU.

    Unlike accelerate's offloading hooks, nothing wraps the rest of the model, so compiled decoder layers stay
    compiled (hooks inside a compiled region made it recompile at every step). The table is kept as a buffer
    under the same name ``weight``: state dicts and checkpoints do not change, it is frozen by construction, and
    ``model.device`` (the first *parameter*'s device, where ``generate`` moves its inputs) stays the GPU."""

    def __init__(self, table: torch.nn.Embedding, device: str | torch.device):
        super().__init__(table.num_embeddings, table.embedding_dim, padding_idx=table.padding_idx,
                         device="meta")
        del self.weight
        self.register_buffer("weight", table.weight.detach(), persistent=True)
        self.out_device = torch.device(device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids.to(self.weight.device)).to(self.out_device)

    def _apply(self, fn, recurse=True):
        # model.to(...) moves every other weight; this table stays where it is, on purpose.
        return self


def place_model(model, device: str, offload_embeddings: bool = False):
    """Move the model to ``device``; with ``offload_embeddings`` the input embedding table stays in host memory
    (:class:`HostEmbedding`)."""
    # a quantised model was placed while loading (bitsandbytes quantises on the way), and .to() is refused
    move = (lambda m: m) if getattr(model, "is_quantized", False) else (lambda m: m.to(device))
    if not offload_embeddings:
        return move(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        raise ConfigError("model.offload_embeddings: this model ties its input embeddings to its LM head (one "
                          "table does both), so the table cannot stay on the CPU; leave offload_embeddings off")
    model.set_input_embeddings(HostEmbedding(emb.to("cpu"), device))
    return move(model)


def unwrap(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_weight(model) -> torch.Tensor:
    """The LM head's weight: never offloaded (``offload_embeddings``) and never quantised (``quantize``), so it
    tells where and in what dtype the model computes, where "the first parameter" may be neither."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight if head is not None else next(p for p in model.parameters() if p.is_floating_point())


def compute_device(model) -> torch.device:
    return _head_weight(model).device


def compute_dtype(model) -> torch.dtype:
    return _head_weight(model).dtype


@contextlib.contextmanager
def peft_quietly():
    """peft (0.18-0.21) reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model, and
    transformers 5.2x warns about it on every run: a warning about library internals the user cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model, cfg: LoraConfig):
    """Wrap with PEFT LoRA adapters (or, for ``method: full``, leave every weight trainable)."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig, TaskType, get_peft_model

    # SEQ_CLS (lora.task=seq_cls) also trains the classification head in full: peft puts 'score' in
    # modules_to_save, saved with the adapter
    task = TaskType.SEQ_CLS if cfg.task == "seq_cls" else TaskType.CAUSAL_LM
    peft_cfg = PeftLoraConfig(task_type=task, r=cfg.r, lora_alpha=cfg.alpha,
                              lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules))
    with peft_quietly():
        return get_peft_model(model, peft_cfg, autocast_adapter_dtype=adapter_autocast(cfg))


def adapter_autocast(cfg: LoraConfig) -> bool:
    """Whether PEFT casts the adapter to float32, in training and when a run's adapter is loaded to score: only for
    ``lora.dtype: float32`` (the tutorial's setup). PEFT's default casts a bf16 adapter up, which copies every
    LoRA input to float32 in each of the 7 projections of every layer; loading for scoring, it would also run
    arithmetic the bf16 training never ran. ``auto`` keeps the adapter in the base model's dtype."""
    return cfg.dtype == "float32"


def _numel(p: torch.Tensor) -> int:
    """Values a weight stands for: a bitsandbytes 4-bit weight packs two into each byte."""
    qs = getattr(p, "quant_state", None)
    return qs.shape.numel() if qs is not None else p.numel()


def trainable_summary(model) -> dict:
    from llmcls.model.fp8 import StoredFP8Linear

    # a HostEmbedding's table and a StoredFP8Linear's weight are buffers, but still part of the model's size
    total = sum(_numel(p) for p in model.parameters()) + sum(
        m.weight.numel() for m in model.modules() if isinstance(m, (HostEmbedding, StoredFP8Linear)))
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": train, "trainable_pct": round(100 * train / max(total, 1), 4)}


