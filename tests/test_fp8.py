"""model.quantize=fp8: the refusals (no torchao needed), which modules compute in FP8, and what FP8 does to the
numbers. On a CPU torchao's FP8 products are emulated (the same e4m3 casts and scales, the product in high
precision), so the selection and the rounding's size are checked here; the real kernels on an sm_89+ GPU."""

import sys

import pytest
import torch

from llmcls.config import ConfigError, LoraConfig, ModelConfig, check_launch, load_config
from llmcls.model import fp8
from llmcls.model.load import add_lora, load_model

LORA = LoraConfig(dropout=0.0)  # no dropout: two passes must see the same adapters' inputs


def small_qwen(hidden: int = 256, layers: int = 2, seed: int = 0, dtype=torch.float32, device="cpu"):
    """A random Qwen2 whose every projection is a multiple of 16 (what FP8 matmuls take)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def nonzero_adapters(model, seed: int = 1):
    """peft starts every B at zero (the adapter adds nothing, and A gets no gradient); random B makes the
    adapters' own gradients and outputs part of the comparison."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


# ------------------------------------------------------------------------------------------------ refusals
def test_refused_without_a_gpu():
    with pytest.raises(ConfigError, match=r"needs a CUDA GPU with FP8 matmuls \(Ada/Hopper, sm_89\+\); this "
                                          r"process computes on cpu"):
        fp8.check_device("cpu")


def test_refused_on_a_card_before_ada(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"FP8 matmuls need an Ada/Hopper GPU \(sm_89\+\); this is NVIDIA "
                                          r"A100-SXM4-80GB \(sm_80\)"):
        fp8.check_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    fp8.check_device("cuda:0")  # a Hopper card passes


def test_without_torchao_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import fails as if it were not installed
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ConfigError, match=r"needs torchao: pip install 'llmcls\[fp8\]'"):
        fp8.require_torchao()


def test_load_refuses_before_reading_weights(tmp_path):
    # the folder does not exist: the refusal must come from the FP8 check, not from transformers
    with pytest.raises(ConfigError, match="sm_89"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "none"), quantize="fp8"), str(tmp_path / "none"),
                   device="cpu")


@pytest.mark.parametrize("overrides, message", [
    ({"lora.method": "full"}, r"frozen base in FP8 under LoRA adapters; lora.method=full"),
    ({"train.fsdp": "full_shard"}, r"model.quantize=fp8 with train.fsdp: not supported"),
    ({"model.device_map": "auto"}, r"model.quantize=fp8 with model.device_map"),
    ({"model.quantize": "none", "model.fp8_fast_accum": "all"},
     r"model.fp8_fast_accum=all changes FP8 matrix products; model.quantize=none computes none"),
])
def test_config_combinations_refused(overrides, message):
    cfg = load_config(None, {"model.quantize": "fp8", **overrides})
    with pytest.raises(ConfigError, match=message):
        check_launch(cfg, world_size=2, cuda=True)


def test_config_key_reads_from_overrides():
    cfg = load_config(None, {"model.quantize": "fp8", "model.fp8_scaling": "tensorwise"})
    assert (cfg.model.quantize, cfg.model.fp8_scaling) == ("fp8", "tensorwise")
    assert load_config(None, {}).model.fp8_scaling == "rowwise"
    assert load_config(None, {}).model.fp8_weights == "stored"  # the faster path, and no torchao needed
    assert load_config(None, {"model.fp8_weights": "cast"}).model.fp8_weights == "cast"
    assert load_config(None, {}).model.fp8_fast_accum == "auto"  # forward: measured on the real model (run 5)
    assert fp8.fast_accum_flags("auto") == fp8.fast_accum_flags("forward") == (True, False)
    assert load_config(None, {"model.fp8_fast_accum": "forward"}).model.fp8_fast_accum == "forward"
    with pytest.raises(ConfigError):
        load_config(None, {"model.quantize": "int8"})


# ------------------------------------------------------------------------------------- what is converted
def test_selection_is_the_decoder_layers_base_linears_only():
    """Names alone decide (no torchao needed): the projections inside decoder layers, peft's base_layer under a
    LoRA wrapper, never the adapters, the LM head or a shape _scaled_mm cannot take."""
    lin = torch.nn.Linear(32, 64)
    assert fp8.is_base_linear(lin, "model.layers.0.self_attn.q_proj")
    assert fp8.is_base_linear(lin, "base_model.model.model.layers.11.mlp.down_proj.base_layer")
    assert not fp8.is_base_linear(lin, "base_model.model.model.layers.3.mlp.down_proj.lora_A.default")
    assert not fp8.is_base_linear(lin, "base_model.model.model.layers.3.mlp.down_proj.lora_B.default")
    assert not fp8.is_base_linear(lin, "lm_head")
    assert not fp8.is_base_linear(lin, "base_model.model.lm_head")
    assert not fp8.is_base_linear(torch.nn.Embedding(10, 32), "model.layers.0.embed")
    assert not fp8.is_base_linear(torch.nn.Linear(32, 40), "model.layers.0.self_attn.q_proj")  # 40 % 16


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("order", ["fp8 then lora", "lora then fp8"])
def test_conversion_swaps_exactly_the_base_linears(order, scaling):
    float8 = pytest.importorskip("torchao.float8", reason="torchao not installed (pip install 'llmcls[fp8]')")
    Float8Linear = float8.float8_linear.Float8Linear
    model = small_qwen(hidden=64)
    if order == "fp8 then lora":  # what load_model + prepare_for_training do
        fp8.convert(model, scaling, emulate=True)
        model = add_lora(model, LORA)
    else:
        model = add_lora(model, LORA)
        fp8.convert(model, scaling, emulate=True)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    expected = {f"base_model.model.model.layers.{i}.{part}.base_layer" for i in range(2)
                for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert converted == expected  # 14: seven projections x two layers, nothing else
    base = model.get_base_model()
    assert type(base.lm_head) is torch.nn.Linear and type(base.model.embed_tokens) is torch.nn.Embedding
    # the weights are the same parameters: names and frozenness unchanged, adapters alone trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # stored in the model's dtype, not e4m3


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def test_emulated_fp8_stays_close_to_the_full_precision_model():
    """The rounding FP8 adds, measured with torchao's emulation on a CPU (same casts and scales as the kernels):
    on this random 2-layer model (hidden 256) measured 7.8% relative norm on the logits, at most 19.8% on a LoRA
    gradient, cosine at least 0.980 (tensorwise: 7.0%, 17.9%, 0.984); bf16 against float32 on the same model:
    0.9%, 2.3%, 0.9997. e4m3 keeps 3 mantissa bits to bf16's 7, hence about ten times bf16's error; the bounds
    are those figures with a margin."""
    pytest.importorskip("torchao.float8", reason="torchao not installed (pip install 'llmcls[fp8]')")
    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = add_lora(small_qwen(), LORA)
    nonzero_adapters(ref)
    q = add_lora(small_qwen(), LORA)
    nonzero_adapters(q)
    fp8.convert(q, emulate=True)
    l_ref, g_ref = _logits_and_grads(ref, ids)
    l_q, g_q = _logits_and_grads(q, ids)
    assert 0.02 < rel_err(l_q, l_ref) < 0.12  # above bf16's 0.9%: the FP8 rounding did happen
    assert g_q.keys() == g_ref.keys() and len(g_q) == 28
    assert max(rel_err(g_q[n], g_ref[n]) for n in g_ref) < 0.30
    assert min(cosine(g_q[n], g_ref[n]) for n in g_ref) > 0.97


def test_training_steps_change_only_the_adapters():
    pytest.importorskip("torchao.float8", reason="torchao not installed (pip install 'llmcls[fp8]')")
    _train_and_check(device="cpu", dtype=torch.float32, emulate=True)


def _adapters_alone_train(model, ids) -> list[float]:
    """Four AdamW steps: every adapter moves, no base weight does. Returns the losses."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {n for n in before if "lora_" in n}  # every adapter moved, no base weight did
    return losses


def _train_and_check(device, dtype, emulate):
    model = add_lora(fp8.apply(small_qwen(dtype=dtype, device=device), device, emulate=emulate), LORA)
    ids = torch.randint(0, 1024, (4, 64), generator=torch.Generator().manual_seed(0)).to(device)
    losses = _adapters_alone_train(model, ids)
    assert losses[-1] < losses[0]
    return model


# ------------------------------------------------------------------------------------------ on an FP8 GPU
def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= fp8.min_capability()


def _fp8_on_a_gpu_matches_bf16(to_fp8):
    """``to_fp8`` (a base converted in place and returned) against the same bf16 base, same adapters, eager and
    with compiled layers; returns the compiled FP8 model."""
    from llmcls.model.compiling import compile_layers

    dev = "cuda"
    ids = torch.randint(0, 1024, (4, 128), generator=torch.Generator().manual_seed(0)).to(dev)
    ref = add_lora(small_qwen(dtype=torch.bfloat16, device=dev), LORA)
    nonzero_adapters(ref)
    q = add_lora(to_fp8(small_qwen(dtype=torch.bfloat16, device=dev)), LORA)
    nonzero_adapters(q)
    l_ref, g_ref = _logits_and_grads(ref, ids)
    l_q, g_q = _logits_and_grads(q, ids)
    assert 0.02 < rel_err(l_q, l_ref) < 0.12
    assert max(rel_err(g_q[n], g_ref[n]) for n in g_ref) < 0.30
    assert min(cosine(g_q[n], g_ref[n]) for n in g_ref) > 0.97
    compile_layers(q)
    l_c, g_c = _logits_and_grads(q, ids)
    # compiled and eager are two FP8 roundings of the same bf16 logits (Inductor casts the norm's float32 output,
    # eager its bf16 one): each within the eager bound of bf16, and apart by no more than they each are from it
    assert rel_err(l_c, l_ref) < 0.12
    assert rel_err(l_c, l_q) < 0.10
    assert max(rel_err(g_c[n], g_ref[n]) for n in g_ref) < 0.30
    assert min(cosine(g_c[n], g_ref[n]) for n in g_ref) > 0.97
    return q


@pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU with FP8 matmuls (sm_89+)")
@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_fp8_kernels_on_a_gpu_match_bf16(scaling):
    """torch._scaled_mm through torchao against the bf16 model, same weights and adapters (hidden 256, bf16):
    the bounds of the emulated test (logits 12% relative norm, LoRA gradients 30%, cosine 0.97; the emulation
    measured 7.8%, 19.8%, 0.980), the compiled layers give the eager FP8 logits to 5% and stay within the same
    bounds of bf16 as eager FP8 does (compiled and eager round differently: tensorwise gradients measured 11.2%
    apart on an H200, each an FP8 approximation of the bf16 ones), and four AdamW steps move the adapters only."""
    pytest.importorskip("torchao.float8", reason="torchao not installed (pip install 'llmcls[fp8]')")
    _fp8_on_a_gpu_matches_bf16(lambda m: fp8.apply(m, "cuda", scaling))
    _train_and_check(device="cuda", dtype=torch.bfloat16, emulate=False)


# ------------------------------------------------------------------ model.fp8_weights: stored (torch._scaled_mm)
# torch's CPU build runs _scaled_mm with row scales (2.13; 2.11's CPU kernel takes one scale per tensor), so these
# run the stored path's real arithmetic.
def _row_scales_on_cpu() -> bool:
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
        return True
    except RuntimeError:
        return False


_ROW_SCALES_ON_CPU = pytest.mark.skipif(not _row_scales_on_cpu(), reason=f"torch {torch.__version__}'s CPU "
                                        "_scaled_mm takes one scale per tensor only; the GPU test covers the path")


def test_rowwise_e4m3_keeps_each_rows_largest_value_and_e4m3_precision():
    t = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 64)[:, None]
    q, s = fp8.rowwise_e4m3(t)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(-1), torch.full((64,), 448.0))  # each row spans e4m3's range
    back = q.float() * s
    big = t.abs() > t.abs().amax(-1, keepdim=True) / 64  # normal e4m3 numbers: 3 mantissa bits, error <= 1/16
    assert ((back - t).abs() <= t.abs() / 16 + 1e-9)[big].all()


@_ROW_SCALES_ON_CPU
def test_stored_linear_computes_x_w_with_the_stored_values_forward_and_backward():
    """The forward is x @ W^T and the input gradient g @ W, both from e4m3 operands with row scales: equal to
    the same products computed in float32 from the dequantised operands, and within FP8's rounding of the
    float32 linear. The e4m3 weights are buffers: no parameter of the base is left to train but the bias, which
    is frozen too."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 64, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 96, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(64, generator=g))
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    st = fp8.StoredFP8Linear(lin, training=True)
    assert [n for n, p in st.named_parameters() if p.requires_grad] == []
    assert st.weight.dtype == st.weight_t.dtype == torch.float8_e4m3fn
    assert st.weight.shape == st.weight_t.shape == (64, 96) and st.weight_t.stride() == (1, 64)  # column-major
    x = torch.randn(3, 5, 96, generator=g, requires_grad=True)
    y = st(x)
    go = torch.randn(3, 5, 64, generator=g)
    y.backward(go)
    # the same arithmetic from the e4m3 values, in float32
    xq, xs = fp8.rowwise_e4m3(x.detach().reshape(-1, 96))
    exact_y = (xq.float() * xs) @ (st.weight.float() * st.weight_scale.t()).t() + ref_b
    gq, gs = fp8.rowwise_e4m3(go.reshape(-1, 64))
    exact_gx = (gq.float() * gs) @ (st.weight_t.float() * st.weight_t_scale)
    assert rel_err(y.detach().reshape(-1, 64), exact_y) < 1e-5
    assert rel_err(x.grad.reshape(-1, 96), exact_gx) < 1e-5
    # and FP8's rounding of the float32 linear: visible, within e4m3's
    assert 0.005 < rel_err(y.detach(), x.detach() @ ref_w.t() + ref_b) < 0.06
    assert 0.005 < rel_err(x.grad, go @ ref_w) < 0.08
    # scoring keeps one e4m3 copy: a byte per weight, half what bf16 takes
    score = fp8.StoredFP8Linear(torch.nn.Linear(96, 64), training=False)
    assert score.weight_t is None and score.weight.element_size() == 1
    with pytest.raises(RuntimeError, match="loaded for scoring"):
        score(torch.randn(2, 96, requires_grad=True)).sum().backward()


@_ROW_SCALES_ON_CPU
def test_stored_weights_under_lora_train_the_adapters_only_and_match_float32():
    """fp8.store on a tiny Qwen2 (what load_model does for fp8_weights=stored), then peft: peft wraps every
    stored linear and keeps the adapters in float32 (StoredFP8Linear.compute_dtype); logits and LoRA gradients
    within the bounds the torchao path is held to; four AdamW steps move every adapter and nothing else, the
    e4m3 weights bit for bit unchanged; the model's size counts the e4m3 weights."""
    from llmcls.model.load import trainable_summary

    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = add_lora(small_qwen(), LORA)
    nonzero_adapters(ref)
    base = small_qwen()
    size = sum(p.numel() for p in base.parameters())
    assert len(fp8.store(base, training=True)) == 14  # 7 projections x 2 layers
    q = add_lora(base, LORA)
    nonzero_adapters(q)
    wrapped = [m for m in q.modules() if hasattr(m, "base_layer") and isinstance(m.base_layer, fp8.StoredFP8Linear)]
    assert len(wrapped) == 14
    assert {p.dtype for n, p in q.named_parameters() if "lora_" in n} == {torch.float32}
    assert trainable_summary(q)["parameters"] == size + sum(p.numel() for n, p in q.named_parameters()
                                                            if "lora_" in n)
    l_ref, g_ref = _logits_and_grads(ref, ids)
    l_q, g_q = _logits_and_grads(q, ids)
    assert 0.02 < rel_err(l_q, l_ref) < 0.12
    assert g_q.keys() == g_ref.keys() and len(g_q) == 28
    assert max(rel_err(g_q[n], g_ref[n]) for n in g_ref) < 0.30
    assert min(cosine(g_q[n], g_ref[n]) for n in g_ref) > 0.97
    stored = {n: b.clone() for n, b in q.named_buffers() if b is not None and b.dtype == torch.float8_e4m3fn}
    losses = _adapters_alone_train(q, ids)
    assert len(stored) == 28 and all(torch.equal(b.view(torch.uint8), stored[n].view(torch.uint8))
                                     for n, b in q.named_buffers() if n in stored)
    assert losses[-1] < losses[0]


@_ROW_SCALES_ON_CPU
@pytest.mark.parametrize("mode, flags", [("none", (False, False)), ("forward", (True, False)), ("all", (True, True)),
                                         ("auto", (True, False))])
def test_fast_accumulation_reaches_each_product_it_names(monkeypatch, mode, flags):
    """model.fp8_fast_accum as load_model passes it to fp8.store: every forward product of the 14 stored linears
    gets the first flag, every input-gradient product the second; the numbers on the CPU stay those of the
    precise path (its kernel has one accumulation)."""
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    calls = []
    real = torch._scaled_mm

    def spy(a, b, **kw):
        calls.append(kw.get("use_fast_accum"))
        return real(a, b, **kw)

    models = []
    for acc in ("none", mode):
        base = small_qwen()
        fp8.store(base, training=True, fast_accum=acc)
        models.append(add_lora(base, LORA))
        nonzero_adapters(models[-1])
    l_ref, g_ref = _logits_and_grads(models[0], ids)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    l_q, g_q = _logits_and_grads(models[1], ids)
    # 14 forward products, then 11 input gradients: the first layer's q, k and v take the frozen embeddings'
    # output, which needs none
    assert calls == [flags[0]] * 14 + [flags[1]] * 11
    assert rel_err(l_q, l_ref) < 1e-6 and max(rel_err(g_q[k], g_ref[k]) for k in g_ref) < 1e-6


def test_torchao_path_takes_the_same_fast_accumulation_setting():
    pytest.importorskip("torchao.float8")
    for mode, (fwd, bwd) in fp8.FAST_ACCUM.items():
        cfg = fp8.fp8_config("rowwise", fast_accum=mode)
        assert (cfg.gemm_config_output.use_fast_accum, cfg.gemm_config_grad_input.use_fast_accum) == (fwd, bwd)
    with pytest.raises(ConfigError, match="model.fp8_fast_accum: 'some' is not one of auto, none, forward, all"):
        fp8.fast_accum_flags("some")


def test_stored_weights_refuse_tensorwise_scales():
    with pytest.raises(ConfigError, match="fp8_weights=stored keeps the weights in e4m3 with one scale per output "
                                          "channel"):
        check_launch(load_config(overrides={"model.quantize": "fp8", "model.fp8_weights": "stored",
                                            "model.fp8_scaling": "tensorwise", "lora.method": "lora"}))


@_ROW_SCALES_ON_CPU
def test_stored_weights_trace_into_one_graph_per_layer_stack():
    """Dynamo traces the stored path (its autograd.Function and _scaled_mm) into the compiled layers with dynamic
    shapes (the ``eager`` backend: dynamo's graphs without code generation): one graph for both layers, none
    again for a new length, and the same logits and gradients as without compiling."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from llmcls.model.compiling import compile_layers

    torch._dynamo.reset()
    counters.clear()
    base = small_qwen()
    fp8.store(base, training=True)
    q = add_lora(base, LORA)
    nonzero_adapters(q)
    batches = [torch.randint(0, 1024, (2, n), generator=torch.Generator().manual_seed(n)) for n in (48, 80)]
    eager = [_logits_and_grads(q, ids) for ids in batches]
    compile_layers(q, backend="eager")
    graphs = []
    for ids, (l_e, g_e) in zip(batches, eager):
        l_c, g_c = _logits_and_grads(q, ids)
        graphs.append(counters["stats"]["unique_graphs"])
        assert rel_err(l_c, l_e) < 1e-6 and max(rel_err(g_c[k], g_e[k]) for k in g_e) < 1e-6
    # the first layer's input needs no gradient, the second's does: two graphs, and none for the new length
    assert graphs == [2, 2], graphs


@pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU with FP8 matmuls (sm_89+)")
@pytest.mark.parametrize("fast_accum", ["none", "auto", "all"])
def test_stored_fp8_on_a_gpu_matches_bf16(fast_accum):
    """The stored path's real kernels against the bf16 model (hidden 256, bf16), eager and compiled, to the
    bounds the torchao path is held to, with precise and with fast accumulation (``model.fp8_fast_accum``);
    four AdamW steps move the adapters only."""
    def store(base):
        fp8.store(base, training=True, fast_accum=fast_accum)
        return base

    q = _fp8_on_a_gpu_matches_bf16(store)
    _adapters_alone_train(q, torch.randint(0, 1024, (4, 128), generator=torch.Generator().manual_seed(0)).cuda())
