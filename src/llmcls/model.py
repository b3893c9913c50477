"""Stage 3 — model: find the weights (local folder, ModelScope, Hugging Face), load tokenizer and model in the
right dtype, build the random-init ``tiny`` preset, and attach LoRA adapters."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Optional

import torch

from llmcls.config import LoraConfig, ModelConfig, TinyConfig

log = logging.getLogger(__name__)

TINY = "tiny"
QWEN_VOCAB = 151936  # embedding width of Qwen1.5/Qwen2 models (the tokenizer itself has 151,646 tokens)
# Qwen's BPE split pattern, from the model card; with qwen.tiktoken it rebuilds the Qwen tokenizer exactly.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DASHSCOPE_PIN = "dashscope==2.0.2"  # a PyPI wheel that ships Qwen's BPE ranks (resources/qwen.tiktoken)


class ModelNotFound(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("LLMCLS_CACHE", Path.home() / ".cache" / "llmcls"))


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


# ------------------------------------------------------------------------------------------ tokenizer
def build_qwen_tokenizer(out_dir: Path, tiktoken_file: Optional[Path] = None) -> Path:
    """Rebuild the exact Qwen tokenizer from Qwen's BPE ranks, which the ``dashscope`` wheel on PyPI ships.
    Only that one file is taken from the wheel (``pip download --no-deps``), not the package's dependencies."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if tiktoken_file is None:
        wheel_dir = cache_root() / "wheels"
        wheels = sorted(wheel_dir.glob("dashscope-*.whl"))
        if not wheels:
            log.info("downloading %s from PyPI for Qwen's tokenizer ranks", DASHSCOPE_PIN)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                            "-d", str(wheel_dir), DASHSCOPE_PIN], check=True)
            wheels = sorted(wheel_dir.glob("dashscope-*.whl"))
        tiktoken_file = out_dir.parent / "qwen.tiktoken"
        tiktoken_file.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[-1]) as z:
            tiktoken_file.write_bytes(z.read("dashscope/resources/qwen.tiktoken"))
    core = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=QWEN_PATTERN).converted()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=QWEN_CHAT_TEMPLATE,
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tok.save_pretrained(tmp)
    if out_dir.exists():  # another process finished first; its build is identical
        shutil.rmtree(tmp)
    else:
        tmp.replace(out_dir)
    return out_dir


def qwen_tokenizer_dir() -> Path:
    """The Qwen tokenizer for the tiny preset: ``$LLMCLS_TOKENIZER``, else a cached build from PyPI."""
    env = os.environ.get("LLMCLS_TOKENIZER")
    if env:
        return Path(env)
    out = cache_root() / "qwen-tokenizer"
    if not (out / "tokenizer.json").is_file():
        build_qwen_tokenizer(out)
    return out


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


# ------------------------------------------------------------------------------------------------ model
def build_tiny(tiny: TinyConfig, tokenizer, out_dir: Path, seed: int) -> Path:
    """Materialise the random-init tiny preset as an ordinary model folder, so that every later stage (eval,
    predict, export, serve) loads it like any other local model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=max(QWEN_VOCAB, len(tokenizer)), hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size, num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads, num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=4096, tie_word_embeddings=tiny.tie_word_embeddings,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out_dir)
    return out_dir


def quantization_config(kind: str, dtype: torch.dtype):
    """bitsandbytes settings for ``model.quantize`` (None for 'none'): NF4 with double quantisation, computing in
    ``dtype``, the QLoRA paper's choice."""
    if kind == "none":
        return None
    from llmcls.config import ConfigError

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"model.quantize={kind} needs bitsandbytes: pip install 'llmcls[qlora]'") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def load_model(cfg: ModelConfig, path: str, device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    from transformers import AutoModelForCausalLM

    device = device or device_default()
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantize != "none":
        kwargs["quantization_config"] = quantization_config(cfg.quantize, dtype)
    if cfg.device_map:  # accelerate places the layers over the GPUs (and CPU if they run out); no .to() after
        if cfg.offload_embeddings:
            from llmcls.config import ConfigError

            raise ConfigError("model.device_map and model.offload_embeddings both decide where weights go; "
                              "choose one")
        return AutoModelForCausalLM.from_pretrained(path, device_map=cfg.device_map, **kwargs)
    if cfg.quantize != "none":  # weights are quantised as they are placed; a quantised model is never moved after
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return place_model(model, device, cfg.offload_embeddings)


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
        from llmcls.config import ConfigError

        raise ConfigError("model.offload_embeddings: this model ties its input embeddings to its LM head (one "
                          "table does both), so the table cannot stay on the CPU; leave offload_embeddings off")
    model.set_input_embeddings(HostEmbedding(emb.to("cpu"), device))
    return move(model)


def _base(model):
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


def add_lora(model, cfg: LoraConfig):
    """Wrap with PEFT LoRA adapters (or, for ``method: full``, leave every weight trainable)."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig, TaskType, get_peft_model

    peft_cfg = PeftLoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha,
                              lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules))
    # peft keeps adapters in float32 by default (the tutorial's setup): every LoRA input is then copied to
    # float32. dtype "auto" keeps them in the base model's dtype instead.
    return get_peft_model(model, peft_cfg, autocast_adapter_dtype=cfg.dtype == "float32")


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
    """Scoring attention over one flat batch (:func:`llmcls.infer.pack_flat`): every row's prompt, then every row's
    candidates' tokens. A prompt token sees its prompt up to itself; a candidate's token sees its whole prompt and
    its own candidate up to itself. Three variable-length attention calls (prompts, causal; candidates over their
    row's prompt; candidates over themselves, causal), the last two merged through their log-sum-exps: nothing is
    computed for padding or for masked-out pairs, and each prompt once however many candidates follow it. The
    boundaries come as keyword arguments from the model's forward (ints as ints, so that compiled layers keep
    them symbolic)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    try:
        n, pb, pmax = kwargs["prompt_tokens"], kwargs["prompt_bounds"], kwargs["prompt_max"]
    except KeyError:
        raise ValueError("shared-prompt attention needs a flat batch's boundaries: its inputs come from "
                         "llmcls.infer.pack_flat") from None
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, head_dim]
    attend = _varlen_for(query)
    out = attend(q[:n], k[:n], v[:n], pb, pb, pmax, pmax, scale=scaling, window_size=(-1, 0))
    if q.shape[0] > n:
        rows, rmax = kwargs["answer_rows"], kwargs["answer_rows_max"]
        own, omax = kwargs["answer_bounds"], kwargs["answer_max"]
        lse = _lse_request()
        on_prompt, lse_p = attend(q[n:], k[:n], v[:n], rows, pb, rmax, pmax, scale=scaling, return_aux=lse)
        on_own, lse_o = attend(q[n:], k[n:], v[n:], own, own, omax, omax, scale=scaling, window_size=(-1, 0),
                               return_aux=lse)
        # softmax over (prompt keys + own keys) = each part's softmax weighted by its share of the total mass
        w = torch.sigmoid(lse_p - lse_o).transpose(0, 1)[..., None]             # [T - n, heads, 1]
        out = torch.cat([out, (on_prompt.float() * w + on_own.float() * (1 - w)).to(out.dtype)])
    return out[None], None


def shared_prompt_ok(model) -> bool:
    """Whether :func:`shared_prompt_attention` can score for this model: on a GPU whose torch has variable-length
    FlashAttention, in 16-bit weights (all that kernel takes), with no sliding-window layers (which it does not
    apply)."""
    base = _base(model)
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
    base = _base(model)
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
    base = _base(model)
    if compute_device(base).type == "cuda" and _varlen_attn() is None:
        log.warning("torch %s has no variable-length FlashAttention (torch.nn.attention.varlen, torch >= 2.10): "
                    "packed rows fall back to a dense mask, slower than padding", torch.__version__)
    with attention_implementation(model, PACKED_ATTENTION):
        yield model


def compile_layers(model) -> None:
    """Regional ``torch.compile``: each decoder layer is compiled (the layers share their code, so compiling one
    serves all of them and compile time stays short), launches per layer drop from hundreds to a few, and the
    elementwise work between matrix products is fused. Shapes are dynamic: batches of any size and length reuse
    the compiled code."""
    base = _base(model)
    for layer in base.model.layers:
        layer.compile(dynamic=True)


def _numel(p: torch.Tensor) -> int:
    """Values a weight stands for: a bitsandbytes 4-bit weight packs two into each byte."""
    qs = getattr(p, "quant_state", None)
    return qs.shape.numel() if qs is not None else p.numel()


def trainable_summary(model) -> dict:
    # a HostEmbedding's table is a buffer, but still part of the model's size
    total = sum(_numel(p) for p in model.parameters()) + sum(
        m.weight.numel() for m in model.modules() if isinstance(m, HostEmbedding))
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": train, "trainable_pct": round(100 * train / max(total, 1), 4)}


def load_trained(run_dir: str | Path, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 device_map: Optional[str] = None, quantize: Optional[str] = None):
    """Load a finished run: (model, tokenizer, config). LoRA runs load the base named in the run's resolved
    config and apply ``adapter/``; full fine-tunes load ``model/``. ``device_map`` overrides the run's
    ``model.device_map`` (e.g. 'auto' to evaluate a model trained with FSDP on a single process), ``quantize``
    its ``model.quantize`` (export merges a QLoRA adapter into the unquantised base)."""
    from llmcls.config import load_config
    from llmcls.dist import check_device_map

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.yaml); train one with 'llmcls train'")
    cfg = load_config(run / "config.yaml")
    if device_map:
        cfg.model.device_map = device_map
    if quantize:
        cfg.model.quantize = quantize
    check_device_map(cfg.model)
    tok = load_tokenizer(cfg.model, str(run / "tokenizer"))
    if (run / "adapter").is_dir():
        from peft import PeftModel

        base = load_model(cfg.model, resolve_model_path(cfg.model), device, dtype)
        model = PeftModel.from_pretrained(base, run / "adapter")
    elif (run / "model").is_dir():
        model = load_model(cfg.model, str(run / "model"), device, dtype)
    else:
        raise FileNotFoundError(f"{run} holds neither adapter/ nor model/: did training finish? "
                                "Resume it with 'llmcls train --resume'")
    model.eval()
    return model, tok, cfg


def model_for_run(run_dir: str | Path, model_and_tokenizer=None):
    """(model, tokenizer, config) of a run for eval and predict: the caller's already-loaded pair, or
    :func:`load_trained`'s; decoder layers compiled when the run's ``eval.compile`` says so."""
    if model_and_tokenizer is None:
        model, tok, cfg = load_trained(run_dir)
    else:
        from llmcls.config import load_config

        (model, tok), cfg = model_and_tokenizer, load_config(Path(run_dir) / "config.yaml")
    if cfg.eval.compile:
        compile_layers(model)
    return model, tok, cfg
