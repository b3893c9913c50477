"""``model.quantize: fp8``: the frozen base's matrix products in FP8 (e4m3); LoRA adapters, norms, attention,
embeddings and the LM head stay in the model's dtype (bf16 on a GPU). Two ways, ``model.fp8_weights``:

- ``stored`` (the default; :class:`StoredFP8Linear`, at the end of this file): the weights cast to e4m3 once at
  load, rowwise, and multiplied with ``torch._scaled_mm`` forward and backward; nothing but torch needed.
- ``cast``: torchao's float8 training linear (``torchao.float8.convert_to_float8_training``), which keeps the
  weights in bf16 and casts them at every call; either scaling. Described here:

What torchao does per base linear (``Float8Linear``, a subclass of ``nn.Linear``, so peft wraps it as it wraps a
plain linear and its adapter math is untouched): the input and the weight are cast to e4m3 with scales computed
from the tensors themselves at every call (dynamic scaling: ``rowwise`` = one scale per row of the input and per
output channel of the weight; ``tensorwise`` = one scale per tensor), multiplied with ``torch._scaled_mm``, and
the output comes back in bf16. The backward casts the output gradient the same way for grad_input.

Two costs a frozen base would not need, both torchao's design (it is built for full training), said here so the
benchmark's figures can be read:

- The weights stay in bf16 and are cast to e4m3 at every forward (and again, scaled along the other axis, for the
  backward's grad_input under ``rowwise``): a memory-bound pass over the weights per step (7.7 B parameters:
  ~20-40 GB of traffic, some 5-10 ms on an H200, against a ~0.3 s step). Storing the base in e4m3 once is what
  torchao's *inference* quantisation does; its tensors have no training backward, so it is not used here.
- torchao's autograd function returns a grad_weight whether the weight needs one or not. Eager, that matrix
  product (a third of the base's backward arithmetic, kept in bf16 here: see :func:`fp8_config`) is computed and
  thrown away; under ``torch.compile``
  (``train.compile``, which the fast config sets) AOTAutograd traces the backward only for inputs that need a
  gradient, and the unused product is removed from the graph. FP8 training without ``train.compile`` is
  therefore allowed but slow; the fast config is the intended use.

Export merges the adapter into the unquantised bf16 base (``model.quantize`` is set to none there, as for NF4):
FP8 is only a compute path.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

import torch

from llmcls.config import ConfigError

log = logging.getLogger(__name__)

# _scaled_mm wants both dimensions of each FP8 operand to be multiples of 16.
_ALIGN = 16
# A base linear of a decoder layer: "...layers.<i>.<self_attn|mlp>.<name>", possibly ".base_layer" under peft.
_DECODER_LINEAR = re.compile(r"(^|\.)layers\.\d+\.")
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def min_capability() -> tuple[int, int]:
    return (8, 9)


def check_device(device: str | torch.device) -> None:
    """Refuse a place where FP8 matrix products cannot run, naming what was found."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"model.quantize=fp8 runs the base's matrix products in FP8, which needs a CUDA GPU "
                          f"with FP8 matmuls (Ada/Hopper, sm_89+); this process computes on {device}. Use "
                          "model.quantize none (or nf4) here")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < min_capability():
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"model.quantize=fp8: FP8 matmuls need an Ada/Hopper GPU (sm_89+); this is {name} "
                          f"(sm_{major}{minor}). Use model.quantize none (bf16) or nf4 on this card")


def require_torchao():
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        raise ConfigError("model.quantize=fp8 needs torchao: pip install 'llmcls[fp8]'") from e
    return torchao.float8


def is_base_linear(module: torch.nn.Module, fqn: str) -> bool:
    """Whether ``fqn`` is a frozen base linear that FP8 should compute: an ``nn.Linear`` inside a decoder layer
    (attention and MLP projections; with peft, the ``base_layer`` under a LoRA wrapper), not a LoRA A/B matrix,
    not the LM head, not an embedding, and with both dimensions multiples of 16 (what ``_scaled_mm`` takes;
    another shape stays in bf16)."""
    if not isinstance(module, torch.nn.Linear) or not _DECODER_LINEAR.search(fqn):
        return False
    parts = fqn.split(".")
    if any(p in _ADAPTER_PARTS for p in parts) or "lm_head" in parts:
        return False
    if module.in_features % _ALIGN or module.out_features % _ALIGN:
        log.info("fp8: %s (%d x %d) stays in %s: dimensions not multiples of %d", fqn, module.out_features,
                 module.in_features, module.weight.dtype, _ALIGN)
        return False
    return True


FAST_ACCUM = {"none": (False, False), "forward": (True, False), "all": (True, True)}
# auto = forward: on the real 0.5B within 0.12 pt accuracy of bf16 on each of 3 seeds (docs/BENCHMARKS.md, run 5),
# 3% faster 7B-shape training than none; the backward's sums stay precise (all measured no faster)
FAST_ACCUM = {"auto": FAST_ACCUM["forward"], **FAST_ACCUM}


def fast_accum_flags(mode: str) -> tuple[bool, bool]:
    """``model.fp8_fast_accum`` as (output's product, input gradient's product) ``use_fast_accum`` flags. Fast
    accumulation lets Hopper's FP8 tensor cores keep partial sums in their own lower precision instead of
    promoting them to float32 as they go: faster, less exact sums over long inner dimensions."""
    if mode not in FAST_ACCUM:
        raise ConfigError(f"model.fp8_fast_accum: {mode!r} is not one of {', '.join(FAST_ACCUM)}")
    return FAST_ACCUM[mode]


def _nothing_to_convert() -> ConfigError:
    return ConfigError("model.quantize=fp8 found no linear layer inside decoder layers to compute in FP8 "
                       "(is this a decoder-only model with model.layers?)")


def fp8_config(scaling: str = "rowwise", emulate: bool = False, fast_accum: str = "auto"):
    """torchao's recipe: ``rowwise`` (per-row input scales, per-output-channel weight scales; closer to bf16) or
    ``tensorwise`` (one scale per tensor; cheaper casts). ``emulate`` computes the FP8 products in high precision
    from the FP8 values (CPU tests only). ``fast_accum``: ``model.fp8_fast_accum`` (auto: forward, torchao's
    own default too)."""
    import dataclasses

    float8 = require_torchao()
    from torchao.float8.config import CastConfig, Float8GemmConfig, ScalingType

    cfg = float8.Float8LinearConfig.from_recipe_name(scaling)
    # The base is frozen: its grad_weight product is traced but never used. In FP8 that product runs over the
    # token dimension, which is symbolic under train.compile's dynamic shapes, and _scaled_mm's "multiple of 16"
    # rule then fails at trace time (measured on the H200). Kept in bf16 (torchao's own "disabled" cast, as in its
    # rowwise_with_gw_hp recipe), compile's dead-code pass removes it.
    # Each with its operand's dtype (torchao requires an operand cast alike in both products it enters: rowwise
    # casts output gradients to e4m3, tensorwise to e5m2; a missing dtype is filled in place, which made one shared
    # instance fail tensorwise's check on the H200).
    off = lambda cast: CastConfig(scaling_type=ScalingType.DISABLED, target_dtype=cast.target_dtype)  # noqa: E731
    cfg = dataclasses.replace(cfg, cast_config_input_for_grad_weight=off(cfg.cast_config_input),
                              cast_config_grad_output_for_grad_weight=off(cfg.cast_config_grad_output))
    fwd, bwd = fast_accum_flags(fast_accum)
    cfg = dataclasses.replace(cfg, gemm_config_output=Float8GemmConfig(use_fast_accum=fwd),
                              gemm_config_grad_input=Float8GemmConfig(use_fast_accum=bwd))
    if emulate:
        cfg = dataclasses.replace(cfg, emulate=True)
    return cfg


def convert(model: torch.nn.Module, scaling: str = "rowwise", emulate: bool = False,
            fast_accum: str = "auto") -> list[str]:
    """Swap the base linears of the decoder layers (:func:`is_base_linear`) for torchao's ``Float8Linear`` in
    place; the weights are the same parameters (same names, same dtype, same ``requires_grad``), so state dicts,
    peft adapters and checkpoints do not change. Returns the converted modules' names."""
    float8 = require_torchao()
    chosen: list[str] = []

    def pick(mod: torch.nn.Module, fqn: str) -> bool:
        ok = is_base_linear(mod, fqn)
        if ok:
            chosen.append(fqn)
        return ok

    float8.convert_to_float8_training(model, config=fp8_config(scaling, emulate, fast_accum), module_filter_fn=pick)
    if not chosen:
        raise _nothing_to_convert()
    log.info("fp8 (%s scaling): %d base linears compute in FP8", scaling, len(chosen))
    return chosen


def apply(model: torch.nn.Module, device: str | torch.device, scaling: str = "rowwise",
          emulate: Optional[bool] = None, fast_accum: str = "auto") -> torch.nn.Module:
    """``model.quantize: fp8`` at load time: check the card, then convert. ``emulate`` (tests) skips the card
    check and computes the FP8 products in high precision on any device."""
    if not emulate:
        check_device(device)
    require_torchao()
    convert(model, scaling, emulate=bool(emulate), fast_accum=fast_accum)
    return model


# ---------------------------------------------------------------------------------------------------------------
# model.fp8_weights: stored. The base is frozen, so its weights need casting to e4m3 once, not at every step as
# torchao's training linear does (on the 7B shape those casts move ~23 GB in and ~15 GB out per step; without them
# the step went from 311 to 278 ms on an H200, docs/BENCHMARKS.md "FP8 base", run 4). torch._scaled_mm takes its
# second operand column-major: the forward's x @ W^T reads the [out, in] weight as stored; the backward's
# grad_input = g @ W needs W's transpose stored the same way, a second e4m3 copy with its own scales (one per
# input channel). Both copies together take what the bf16 weight took; scoring keeps the
# first only (half the bf16 weight).
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def rowwise_e4m3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (2-D) as e4m3 values and one float32 scale per row, ``t ~= values * scale``: each row's largest
    magnitude maps to e4m3's largest (448), as torchao's rowwise recipe does."""
    amax = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class _StoredMatmul(torch.autograd.Function):
    """x @ W^T with W stored in e4m3: activations and output gradients cast rowwise at each call, the weight
    never; no weight gradient (the base is frozen)."""

    @staticmethod
    def forward(ctx, x, w, w_scale, wt, wt_scale, fast_fwd: bool, fast_bwd: bool):
        xq, xs = rowwise_e4m3(x)
        ctx.save_for_backward(wt, wt_scale)
        ctx.fast_bwd = fast_bwd
        return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=w_scale, out_dtype=x.dtype,
                                use_fast_accum=fast_fwd)

    @staticmethod
    def backward(ctx, g):
        wt, wt_scale = ctx.saved_tensors  # already the column-major [out, in] operand (StoredFP8Linear)
        if wt is None:
            raise RuntimeError("this FP8 linear was loaded for scoring (no transposed weight); load it with "
                               "training=True to compute input gradients through it")
        gq, gs = rowwise_e4m3(g)
        grad = torch._scaled_mm(gq, wt, scale_a=gs, scale_b=wt_scale, out_dtype=g.dtype, use_fast_accum=ctx.fast_bwd)
        return grad, None, None, None, None, None, None


class StoredFP8Linear(torch.nn.Linear):
    """A frozen ``nn.Linear`` whose weight is kept in e4m3 with one scale per output channel
    (``model.fp8_weights: stored``). A subclass of ``nn.Linear`` so that peft wraps it as it wraps the linear it
    replaces; ``compute_dtype`` (peft's convention for quantised bases) keeps the adapters in the original dtype.
    The e4m3 tensors are buffers, not parameters: nothing trains them, and ``model.dtype`` (the first floating
    parameter's) stays the model's. ``fast_accum``: ``model.fp8_fast_accum``."""

    def __init__(self, linear: torch.nn.Linear, training: bool, fast_accum: str = "auto"):
        torch.nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a weight to throw away
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fast_accum = fast_accum_flags(fast_accum)
        self.compute_dtype = linear.weight.dtype
        w = linear.weight.detach()
        q, s = rowwise_e4m3(w)
        self.register_buffer("weight", q, persistent=False)
        self.register_buffer("weight_scale", s.reshape(1, -1), persistent=False)
        qt = st = None
        if training:  # W again, scaled per input channel and laid out column-major: the backward's operand
            # contiguous first: elementwise ops keep their input's strides, and w.t()'s are W's own (row-major
            # [out, in] again after the .t() below, which _scaled_mm refuses; seen on the CPU)
            qt, st = rowwise_e4m3(w.t().contiguous())
            qt, st = qt.t(), st.reshape(1, -1)
        self.register_buffer("weight_t", qt, persistent=False)
        self.register_buffer("weight_t_scale", st, persistent=False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _StoredMatmul.apply(x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.weight_t,
                                self.weight_t_scale, *self.fast_accum)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def store(model: torch.nn.Module, training: bool, fast_accum: str = "auto") -> list[str]:
    """Replace the base linears of the decoder layers (:func:`is_base_linear`) with :class:`StoredFP8Linear`
    in place, one at a time (the bf16 weight of each is freed as the next is converted, so the peak is one
    layer's above the model's). ``training``: keep the transposed copy the backward needs; ``fast_accum``:
    ``model.fp8_fast_accum``. Returns their names."""
    chosen = [name for name, mod in model.named_modules() if is_base_linear(mod, name)]
    if not chosen:
        raise _nothing_to_convert()
    for name in chosen:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, StoredFP8Linear(getattr(owner, leaf), training, fast_accum))
    log.info("fp8 (stored e4m3 weights%s): %d base linears", ", two layouts" if training else "", len(chosen))
    return chosen
