"""GPU speed and memory of the tutorial's recipe against llmcls, timed in one process on one card.

Training (same rows, max length 384, 16 rows per optimizer step, LoRA r=8 on all 7 projections):
  (a) tutorial   — its Trainer arguments (batch 4 x accum 4, gradient checkpointing), fp32 LoRA weights (peft's
                   default), right cut at 384, DataCollatorForSeq2Seq, the model's full-logits loss;
  (b) llmcls     — the default GPU path: no recomputation, micro-batch 16, bf16 LoRA weights, rows packed end to
                   end (varlen FlashAttention; ``llmcls-padded``: left padding instead), logits and loss only at
                   answer positions, answer-keeping truncation, compiled decoder layers;
  (c) llmcls-16gb — the low-memory path: the frozen input embedding table kept in host memory, micro-batch
                   4 x accum 4 with gradient checkpointing, bf16 LoRA, answer-position logits; eager and compiled.
                   QLoRA (``llmcls-qlora*``, needs bitsandbytes): the default path on a 4-bit NF4 base.
Evaluation (prompts of ~380 tokens): (a) tutorial-style one-row ``generate``; (b) llmcls ``score``;
(c) llmcls batched ``generate``. Before timing, the fast path's loss and LoRA gradients on one batch are compared
with the tutorial path's.

Every llmcls variant is one of the shipped configs (``configs/qwen1.5-7b-chat-fudan*.yaml``, read with
``llmcls.config.load_config``), with at most one lever changed (``VARIANTS``) and the settings a benchmark must
control overridden (``BENCH_OVERRIDES``): a change to a shipped config changes what is measured. The tutorial's
own recipe (``run_tutorial``: its Trainer, collator and peft defaults, as published) stays the reference; its
settings are checked against ``configs/qwen1.5-7b-chat-fudan.yaml`` (``tutorial_config_drift``), and
``llmcls-tutorial`` runs that config through llmcls.

The model is a random-init model of a real shape (cost depends on shapes, not weight values). Output: a JSON
file with every number and the environment, and a markdown table.

    python benchmarks/gpu_speed.py --shape ../shared/model-shapes/qwen1.5-7b-chat.json --out bench-out
    python benchmarks/gpu_speed.py --shape tiny --device cpu --steps 2 --rows 64   # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llmcls.collate import AnswerCollator, PackedCollator, answer_loss
from llmcls.config import Config, DataConfig, PromptConfig, load_config
from llmcls.data import Row, read_rows
from llmcls.encode import IGNORE, PromptBuilder, encode_train
from llmcls.env import environment
from llmcls.files import atomic_write_json, atomic_write_text
from llmcls.infer import classify, generate_batch
from llmcls.model.attention import packed_rows
from llmcls.model.compiling import compile_layers
from llmcls.model.load import HostEmbedding, load_model, place_model
from llmcls.trainer import build_trainer, graph_padding, prepare_for_training, training_arguments

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMCLS_SHARED", ROOT.parent / "shared"))
MAX_LEN = 384


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device):
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if str(device).startswith("cuda") else None


def reset_peak(device):
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build_model(shape: str, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if shape == "tiny":
        cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    else:
        cfg = Qwen2Config(**json.loads(Path(shape).read_text()))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(cfg, dtype=dtype)
    model.eval()
    return model, cfg


def matmul_tflops(device) -> float | None:
    if not device.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    sync(device)
    return 20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


# ------------------------------------------------------------------------------------------------ data
def tutorial_encode(tok, row: Row):
    """The tutorial's process_func, as published: prompt + answer + pad token, cut from the right at 384."""
    system = PromptConfig().system
    inst = tok(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nText: {row.text}, Type Options: "
               f"{row.candidates}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    resp = tok(f"{row.label}", add_special_tokens=False)
    ids = inst["input_ids"] + resp["input_ids"] + [tok.pad_token_id]
    labels = [IGNORE] * len(inst["input_ids"]) + resp["input_ids"] + [tok.pad_token_id]
    return {"input_ids": ids[:MAX_LEN], "attention_mask": [1] * len(ids[:MAX_LEN]), "labels": labels[:MAX_LEN]}


def load_rows(n: int, short: bool):
    """Training rows: with ``short``, those with the token lengths of the published zh_cls_fudan-news subsets
    (texts <= 600 characters, ~300 tokens), else any row (most are cut at 384 tokens: the memory worst case).
    Evaluation rows: long texts (prompts cut to ~380 tokens)."""
    cfg = DataConfig()
    train, _ = read_rows(SHARED / "data/fudan-news/train.jsonl", cfg)
    test, _ = read_rows(SHARED / "data/fudan-news/test.jsonl", cfg)
    train = [r for r in train if len(r.text) <= 600] if short else train
    return (train * (n // len(train) + 1))[:n], test[:n]


# -------------------------------------------------------------------------------------------- training
class EpochTimer:
    """Wall time of one Trainer epoch. The GPU is synchronised only where the epoch starts and ends: a sync per
    step would drain the queue that the fast path keeps full, and so slow down what it measures."""

    def __init__(self, device):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if timer.t0 is None:
                    sync(device)
                    timer.t0, timer.step0 = time.perf_counter(), state.global_step

            def on_train_end(self, args, state, control, **kw):
                sync(device)
                timer.t1, timer.steps = time.perf_counter(), state.global_step - timer.step0

        self.t0 = self.t1 = self.step0 = self.steps = None
        self.callback = _CB()

    def summary(self, ds) -> dict:
        """Every variant feeds the same rows once, so the real tokens are counted from the rows themselves."""
        dt, tokens = self.t1 - self.t0, sum(len(r["input_ids"]) for r in ds)
        return {"step_s": round(dt / self.steps, 4), "tokens_per_step": round(tokens / self.steps, 1),
                "tokens_per_s": round(tokens / dt, 1), "rows_per_s": round(len(ds) / dt, 2),
                "timed_steps": self.steps}


class ProfileSteps:
    """``torch.profiler`` over optimizer steps ``start`` .. ``start + n - 1`` of a Trainer run, which it then stops:
    GPU-busy time (kernels) against wall time per step, and the top kernels and operators."""

    def __init__(self, device, start=1, n=2):
        from torch.profiler import ProfilerActivity, profile
        from transformers import TrainerCallback

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
        prof, me = profile(activities=acts), self
        self.result, self.table = None, ""

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == start and not me.t0:
                    sync(device)
                    prof.__enter__()
                    me.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == start + n:
                    control.should_training_stop = True
                    self.on_train_end(args, state, control)

            def on_train_end(self, args, state, control, **kw):  # also when the epoch ends first
                if me.t0 and me.result is None:
                    sync(device)
                    wall = time.perf_counter() - me.t0
                    prof.__exit__(None, None, None)
                    steps = state.global_step - start
                    ev = prof.key_averages()
                    key = "self_device_time_total"
                    busy = sum(getattr(e, key, 0) for e in ev
                               if str(getattr(e, "device_type", "")).endswith("CUDA")) / 1e6
                    me.result = {"steps": steps, "wall_s_per_step": round(wall / steps, 4),
                                 "gpu_busy_s_per_step": round(busy / steps, 4)}
                    me.table = (ev.table(sort_by=key, row_limit=50) + "\n"
                                + ev.table(sort_by="self_cpu_time_total", row_limit=15))

        self.t0, self.callback = None, _CB()


def timed_training(make_trainer, ds, device, warmup_epochs=1, profile_to=None) -> dict:
    """Warm up with ``warmup_epochs`` epochs over the encoded rows ``ds``, then time one more with a fresh Trainer. A fresh Trainer
    with the same seed draws the same batches in the same order, so every shape the timed epoch meets (and with it
    every compiled graph: with or without a padding mask, first layer or not) was met in the warm-up, and no
    compilation falls inside the timing. Every variant times the same rows, whatever its batching."""
    reset_peak(device)  # the peak covers the warm-up too: a real run goes through it as well
    for _ in range(warmup_epochs):
        make_trainer(ds, callbacks=[]).train()
    timer = EpochTimer(device)
    make_trainer(ds, callbacks=[timer.callback]).train()
    out = timer.summary(ds)
    if profile_to is not None:  # after the timing, so that the profiler's own cost stays out of it
        prof = ProfileSteps(device)
        make_trainer(ds, callbacks=[prof.callback]).train()
        out["profile"] = prof.result
        atomic_write_text(profile_to, json.dumps(prof.result) + "\n" + prof.table)
    return out


# The tutorial's recipe as published (its Trainer arguments, LoRA settings, max length). These are the tutorial's
# own values, not llmcls's: the reference must not move when a config does. configs/qwen1.5-7b-chat-fudan.yaml
# states the same recipe for llmcls; tutorial_config_drift() tells where the two part.
TUTORIAL = {"batch_size": 4, "grad_accum": 4, "lr": 1e-4, "gradient_checkpointing": True, "max_length": MAX_LEN,
            "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.1,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
CONFIGS = ROOT / "configs"
TUTORIAL_CONFIG = CONFIGS / "qwen1.5-7b-chat-fudan.yaml"


def tutorial_config_drift(path: Path = TUTORIAL_CONFIG) -> dict:
    """Settings of the tutorial's recipe that the shipped tutorial config states differently: {key: [tutorial,
    config]} (empty when they agree)."""
    c = load_config(path)
    mine = {"batch_size": c.train.batch_size, "grad_accum": c.train.grad_accum, "lr": c.train.lr,
            "gradient_checkpointing": c.train.gradient_checkpointing, "max_length": c.data.max_length,
            "lora_r": c.lora.r, "lora_alpha": c.lora.alpha, "lora_dropout": c.lora.dropout,
            "target_modules": list(c.lora.target_modules)}
    return {k: [v, mine[k]] for k, v in TUTORIAL.items() if mine[k] != v}


def tutorial_lora(model):
    """The tutorial's adapter on ``model``: input gradients switched on (for its gradient checkpointing), then peft's
    LoRA with its settings (fp32 adapter weights, peft's default)."""
    from peft import LoraConfig, TaskType, get_peft_model

    t = TUTORIAL
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=list(t["target_modules"]), inference_mode=False,
                     r=t["lora_r"], lora_alpha=t["lora_alpha"], lora_dropout=t["lora_dropout"])
    model.enable_input_require_grads()
    return get_peft_model(model, cfg)


def tutorial_trainer(peft_model, tok, ds, output_dir, callbacks=(), **changes):
    """The tutorial's Trainer: its TrainingArguments as published (2 epochs, a checkpoint every 100 steps, its
    SwanLab callback aside: ``report_to`` was "none" there too) with ``changes`` over them, and its collator."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    t = TUTORIAL
    kw = dict(output_dir=str(output_dir), per_device_train_batch_size=t["batch_size"],
              gradient_accumulation_steps=t["grad_accum"], logging_steps=10, num_train_epochs=2, save_steps=100,
              learning_rate=t["lr"], save_on_each_node=True, gradient_checkpointing=t["gradient_checkpointing"],
              report_to="none")
    args = TrainingArguments(**{**kw, **changes})
    return Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=list(callbacks),
                   data_collator=DataCollatorForSeq2Seq(tokenizer=tok, padding=True))


def run_tutorial(model, tok, rows, device, out_dir, warmup_epochs=1):
    t = TUTORIAL
    peft_model = tutorial_lora(model)

    def make_trainer(ds, callbacks):  # one epoch per Trainer (timed_training), no checkpoint inside the timing
        return tutorial_trainer(peft_model, tok, ds, out_dir / "tutorial", callbacks, num_train_epochs=1,
                                save_strategy="no", disable_tqdm=True)

    ds = [tutorial_encode(tok, r) for r in rows]  # the Trainer takes any sized sequence of examples
    res = {**timed_training(make_trainer, ds, device, warmup_epochs), "peak_gib": peak_gib(device),
           "micro_batch": t["batch_size"], "grad_accum": t["grad_accum"], "checkpointing": recomputing(peft_model),
           "lora_dtype": "float32"}
    base = peft_model.unload()
    base.disable_input_require_grads()  # (the recomputation it switched on: prepare_for_training turns it off)
    reset_peak(device)
    return base, res


@dataclasses.dataclass(frozen=True)
class Variant:
    """An llmcls training path: a shipped config, the lever changed against it (config keys), and whether the
    Trainer's per-step GPU reads are switched back on (``syncs``: not a config key, a benchmark-only lever)."""

    config: str                                   # file name under configs/
    changes: dict = dataclasses.field(default_factory=dict)
    syncs: bool = False


FAST = "qwen1.5-7b-chat-fudan-fast.yaml"
LOW_MEM = "qwen1.5-7b-chat-fudan-16gb.yaml"
QLORA = "qwen1.5-7b-chat-fudan-qlora.yaml"
VARIANTS = {  # llmcls training paths; each keeps the config's 16 rows per optimizer step
    # "llmcls" is the fast config as shipped: rows packed end to end (train.packing), compiled layers
    "llmcls": Variant(FAST),
    # the levers, one at a time: left-padded batches (the default before packing), no compilation, half the
    # micro-batch (half the activation memory)
    "llmcls-padded": Variant(FAST, {"train.packing": False}),
    "llmcls-eager": Variant(FAST, {"train.compile": False}),
    "llmcls-m8": Variant(FAST, {"train.batch_size": 8, "train.grad_accum": 2}),
    # each compiled layer replayed from recorded CUDA graphs (small models: steps bound by kernel launches)
    "llmcls-graphs": Variant(FAST, {"train.cuda_graphs": True}),
    # the Trainer's defaults that wait for the GPU in every step (token count, NaN filter, blocking batch
    # copies): what llmcls's training arguments switch off
    "llmcls-syncs": Variant(FAST, syncs=True),
    # 16 GB mode: the input table in host memory, recomputation, small micro-batches. "-compiled" is the 16gb
    # config as shipped; the others are the levers measured against it.
    "llmcls-16gb": Variant(LOW_MEM, {"train.compile": False}),
    "llmcls-16gb-compiled": Variant(LOW_MEM),
    "llmcls-16gb-packed": Variant(LOW_MEM, {"train.packing": True}),
    "llmcls-16gb-m8": Variant(LOW_MEM, {"train.batch_size": 8, "train.grad_accum": 2}),
    "llmcls-16gb-nockpt": Variant(LOW_MEM, {"train.gradient_checkpointing": False}),
    # QLoRA (model.quantize=nf4): the fast path on a frozen 4-bit base, loaded from a folder as users load it;
    # "-ckpt" is the qlora config as shipped (it recomputes), "llmcls-qlora" the same without recomputation
    "llmcls-qlora": Variant(QLORA, {"train.gradient_checkpointing": False}),
    "llmcls-qlora-ckpt": Variant(QLORA),
    # the tutorial's config run by llmcls (fp32 adapters, 4 x 4, recomputation, left padding, answer-position
    # logits, no compilation): what 'llmcls train -c configs/qwen1.5-7b-chat-fudan.yaml' gets
    "llmcls-tutorial": Variant(TUTORIAL_CONFIG.name),
}

# What the benchmark itself must control, over every variant's config:
BENCH_OVERRIDES = {
    "train.epochs": 1,              # timed_training runs whole epochs over the same rows, one epoch per Trainer
    "train.max_steps": -1,          # ... and all of the epoch
    "train.save_steps": 10**6,      # no checkpoint is written inside the timing
    "train.logging_steps": 10**6,   # no loss read back inside the timing (the Trainer still logs its first step)
    "track.tracker": "none",        # no tracker: nothing uploaded or written beside the numbers
}
# Not overridden but not read either: model.name_or_path/source (the random-init model of --shape is built in
# this process; QLoRA variants save it to a folder and load it with the config's model section), data.train_file
# and data.test_file (the rows come from SHARED, the same for every variant), eval.* (the evaluation part has its
# own table), train.output_dir (OUT/VARIANT, set per variant; nothing is saved there).


def variant_config(name: str, out_dir: Path | None = None) -> Config:
    """The config a variant trains with: its shipped file, its lever, then ``BENCH_OVERRIDES``."""
    v = VARIANTS[name]
    over = {**v.changes, **BENCH_OVERRIDES}
    if out_dir is not None:
        over["train.output_dir"] = str(out_dir / name)
    return load_config(CONFIGS / v.config, over)


def settings(cfg: Config) -> dict:
    """The config's training settings as the result JSON names them (the same keys before configs drove this)."""
    return {"micro_batch": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "offload_embeddings": cfg.model.offload_embeddings, "compile": cfg.train.compile,
            "group_by_length": cfg.train.group_by_length, "packing": cfg.train.packing,
            **({"quantize": cfg.model.quantize} if cfg.model.quantize != "none" else {}),
            **({"fp8_weights": cfg.model.fp8_weights, "fp8_fast_accum": cfg.model.fp8_fast_accum}
               if cfg.model.quantize == "fp8" else {})}


def recomputing(model) -> bool:
    """Whether any layer actually runs under gradient checkpointing (what was measured, not what was asked)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def uncompile(model):
    """Back to eager decoder layers. ``Module.compile`` has no public undo; without this, a variant measured
    after a compiled one (or the tutorial after the compiled evaluation) would silently run compiled layers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        layer._compiled_call_impl = None
    base.model._compiled_call_impl = None  # train.cuda_graphs compiles the whole stack
    # The compiled code of earlier variants (eval mode, other adapters) also stays cached per code object, and
    # once the recompile limit is reached dynamo quietly runs the layers eagerly: start each variant afresh.
    torch._dynamo.reset()


def _table_on_device(base, device):
    """Undo ``offload_embeddings``: the input table back on the GPU for the next variant."""
    table = base.get_input_embeddings()
    if isinstance(table, HostEmbedding):
        base.set_input_embeddings(torch.nn.Embedding.from_pretrained(table.weight.data.to(device),
                                                                     padding_idx=table.padding_idx))
    return base


def run_llmcls(model, tok, rows, device, cfg: Config, name: str, syncs=False, warmup_epochs=1, profile_to=None):
    """One variant's training, timed (``timed_training``), on ``model`` as given; returns the base model again
    (adapters unloaded, eager layers, the input table on the device) and the result."""
    b = PromptBuilder(tok, cfg.prompt)
    if cfg.model.offload_embeddings:
        model = place_model(model, device, offload_embeddings=True)
    peft_model = prepare_for_training(model, cfg)
    out = Path(cfg.train.output_dir)

    def make_trainer(ds, callbacks):
        args = training_arguments(cfg, out, progress=False)
        if syncs:
            args.include_num_input_tokens_seen, args.logging_nan_inf_filter = "non_padding", True
            args.accelerator_config.non_blocking = False
        return build_trainer(peft_model, tok, ds, args, callbacks=callbacks, packing=cfg.train.packing,
                             pad_multiple=graph_padding(cfg))

    ds = [{"input_ids": e.input_ids, "labels": e.labels}
          for e in (encode_train(b, r, cfg.data.max_length, cfg.data.truncation) for r in rows)]

    static = torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else None
    if cfg.train.cuda_graphs:
        # torch runs a shape's first call unrecorded and records it at the second: with one warm-up epoch, every
        # step length met once there would be recorded inside the timed epoch (run 26 was, docs/BENCHMARKS.md)
        warmup_epochs = max(warmup_epochs, 2)
    try:
        timing = timed_training(make_trainer, ds, device, warmup_epochs, profile_to)
        recomputed = recomputing(peft_model)
        lora_dtype = next(p.dtype for n, p in peft_model.named_parameters() if "lora_" in n)
    except Exception:  # out of memory, or a library failing: the base model as it was, for the next variant
        uncompile(_table_on_device(peft_model.unload(), device))
        reset_peak(device)
        raise
    res = {**timing, "warmup_epochs": warmup_epochs, "peak_gib": peak_gib(device), **settings(cfg),
           "checkpointing": recomputed,
           "lora_dtype": str(lora_dtype).replace("torch.", ""), "trainer_syncs": syncs,
           "static_gib": round(static, 2) if static is not None else None}
    base = _table_on_device(peft_model.unload(), device)
    uncompile(base)
    reset_peak(device)
    return base, res


def run_qlora(model, tok, rows, device, cfg: Config, name: str, **kw):
    """A variant on a 4-bit base (``model.quantize``), loaded the way users load one: from a folder, quantised by
    bitsandbytes on the way to the GPU, with the config's model section. The bf16 model waits in host memory
    meanwhile, so the peak is the 4-bit model's alone; the random weights are saved once (their values do not
    matter, their shapes do)."""
    # in the temp dir, not under --out: 15 GB of weights are not a result
    c = model.config
    folder = Path(tempfile.gettempdir()) / f"llmcls-bench-base-{c.num_hidden_layers}x{c.hidden_size}x{c.vocab_size}"
    model.to("cpu")
    if not folder.is_dir():  # written aside, then renamed: a save cut short is never taken for a model
        import shutil

        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tmp.replace(folder)
    reset_peak(device)
    # the model section as configured, pointed at the saved random weights (the benchmark's one change to it)
    mcfg = dataclasses.replace(cfg.model, name_or_path=str(folder), source="local")
    qmodel = load_model(mcfg, str(folder), device=device)
    try:
        _, res = run_llmcls(qmodel, tok, rows, device, cfg, name, **kw)
    finally:
        del qmodel
        reset_peak(device)
        model.to(device)
    return model, res


def same_results(model, tok, rows, device) -> dict:
    """Loss and LoRA gradients of one batch: tutorial path (fp32 LoRA, right padding, full logits) vs the fast
    path (bf16 LoRA, left padding, answer-position logits). Rows short enough that neither path cuts them."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorForSeq2Seq

    b = PromptBuilder(tok, PromptConfig())
    batch_rows = [r for r in rows if len(b.prompt_ids(r)) + 8 < MAX_LEN][:4]
    lcfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(model, lcfg)  # fp32 adapters (peft's default, the tutorial's)
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:  # B starts at zero; give it values so that A's gradients are not zero
            p.data.normal_(0, 0.02)
    init = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}

    enc = [encode_train(b, r, MAX_LEN) for r in batch_rows]
    feats = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in enc]
    ref_batch = {k: v.to(device) for k, v in DataCollatorForSeq2Seq(tok, padding=True)(feats).items()}
    pm.zero_grad()
    ref_loss = pm(**ref_batch).loss
    ref_loss.backward()
    ref_grads = {n: p.grad.float().clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()

    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in enc]

    def fast(dtype, collator=AnswerCollator(tok.pad_token_id)):
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collator(feats).items()}
        labels = batch.pop("labels")
        for n, p in pm.named_parameters():  # the same adapter values in the given dtype
            if p.requires_grad:
                p.data = init[n].to(dtype)
        pm.zero_grad()
        with packed_rows(pm, isinstance(collator, PackedCollator)):
            loss = answer_loss(pm(**batch), labels)
        loss.backward()
        num = den = 0.0
        cos = []
        for n, p in pm.named_parameters():
            if p.requires_grad:
                g, r = p.grad.float(), ref_grads[n]
                num += (g - r).pow(2).sum().item()
                den += r.pow(2).sum().item()
                cos.append(torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0).item())
        return {"loss": loss.item(), "loss_rel_diff": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
                "grad_rel_err": (num / den) ** 0.5, "grad_min_cosine": min(cos)}

    # fp32 adapters isolate the algorithm (left padding, answer-only logits); bf16 adds the dtype change.
    # The packed path (train.packing) in bf16 runs FlashAttention's variable-length kernel on a GPU.
    low = torch.bfloat16 if device.startswith("cuda") else torch.float32
    out = {"rows": len(batch_rows), "loss_tutorial": ref_loss.item(), "same_dtype": fast(torch.float32),
           "llmcls": fast(low), "llmcls_packed": fast(low, PackedCollator())}
    pm.zero_grad()
    pm.unload()
    reset_peak(device)
    return out


# ------------------------------------------------------------------------------------------ evaluation
def run_eval(model, tok, rows, device, batch, n_single, compiled=True) -> dict:
    from llmcls.encode import fit_row

    b = PromptBuilder(tok, PromptConfig())
    # Every method gets the same prompts of ~380 tokens: texts are cut once, outside the timed regions.
    rows = [fit_row(b, r, MAX_LEN - 4)[0] for r in rows]
    lens = [len(p) for p in b.batch_prompt_ids(rows)]
    out = {}
    # (a) the tutorial's way: one row at a time, 4 new tokens (forced, so a random model can't stop early)
    single = [b.prompt_ids(r) for r in rows[:n_single]]
    generate_batch(model, b, rows[:1], 4, prompts=single[:1], min_new_tokens=4)
    sync(device)
    # generate reads its tokens back every step, so each row's own time is exact without extra syncs; their
    # spread shows how much the host (which bounds this method) moved during the run
    per_row = []
    for r, p in zip(rows, single):
        t = time.perf_counter()
        generate_batch(model, b, [r], 4, prompts=[p], min_new_tokens=4)
        sync(device)
        per_row.append(time.perf_counter() - t)
    q = statistics.quantiles(per_row, n=10) if len(per_row) > 1 else per_row * 9
    out["tutorial_generate"] = {"rows_per_s": round(n_single / sum(per_row), 2), "batch": 1,
                                "row_ms_median": round(1e3 * statistics.median(per_row), 1),
                                "row_ms_p10": round(1e3 * q[0], 1), "row_ms_p90": round(1e3 * q[-1], 1)}
    # (b) llmcls score, (c) llmcls batched generate; then score again with compiled decoder layers (eval.compile),
    # unless ``compiled`` is off (--no-eval-compile: a CPU smoke run, where Inductor would take most of the time)
    methods = [("llmcls_score", {"method": "score"}),
               ("llmcls_generate", {"method": "generate", "max_new_tokens": 4}),
               ("llmcls_score_b64", {"method": "score", "batch_size": 2 * batch})]
    if compiled:
        methods += [("llmcls_score_compiled", {"method": "score", "compile": True}),
                    ("llmcls_score_compiled_b64", {"method": "score", "batch_size": 2 * batch, "compile": True})]
    for name, kw in methods:
        # classify() tokenises inside the timed region: the llmcls numbers are end to end
        kw = {"batch_size": batch, **kw}
        bs = kw["batch_size"]
        if kw.pop("compile", False):
            compile_layers(model)
        for _ in range(2 if "compiled" in name else 1):  # warm-up (compilation: first call)
            classify(model, b, rows[:bs], max_length=MAX_LEN, progress=False, **kw)
        reset_peak(device)
        sync(device)
        t = time.perf_counter()
        try:
            classify(model, b, rows, max_length=MAX_LEN, progress=False, **kw)
        except torch.OutOfMemoryError:
            out[name] = {"rows_per_s": 0, "batch": bs, "peak_gib": "OOM"}
            reset_peak(device)
            continue
        sync(device)
        out[name] = {"rows_per_s": round(len(rows) / (time.perf_counter() - t), 2), "batch": bs,
                     "peak_gib": peak_gib(device)}
    uncompile(model)
    out["prompt_tokens_sample"] = lens[:16]
    out["prompt_tokens_mean"] = round(statistics.mean(lens), 1)
    return out


def add_ratios(res: dict, n_embed: int) -> None:
    """MFU and the ratio to the tutorial for every training variant and evaluation method, in place."""
    # Model-FLOP utilisation against the measured matmul rate: frozen weights cost a forward (2N) and an
    # input-gradient backward (2N) per token; no recomputation is counted (so checkpointing lowers MFU).
    body = res["params"] - n_embed
    peak = res["matmul_tflops"]
    train_flops = 4 * body
    ref = res["train"].get("tutorial", {}).get("tokens_per_s")
    for v in res["train"].values():
        if "tokens_per_s" not in v:
            continue
        v["mfu"] = round(v["tokens_per_s"] * train_flops / (peak * 1e12), 3) if peak else None
        v["vs_tutorial"] = round(v["tokens_per_s"] / ref, 2) if ref else None
    if "eval" in res:
        plen = res["eval"]["prompt_tokens_mean"]
        eref = res["eval"]["tutorial_generate"]["rows_per_s"]
        # The forward floor: 2 FLOPs per weight and prompt token for every weight but the input table (the LM
        # head counted at every position), at the measured matmul rate; MFU is the fraction of it reached.
        floor = peak * 1e12 / (2 * body * plen) if peak else None
        res["eval"]["forward_floor_rows_per_s"] = round(floor, 1) if floor else None
        for k, v in res["eval"].items():
            if isinstance(v, dict):
                v["mfu"] = round(v["rows_per_s"] / floor, 3) if floor else None
                v["vs_tutorial"] = round(v["rows_per_s"] / eref, 2)


def markdown(res: dict) -> str:
    """The run's tables (training, evaluation, same-results check) in markdown."""
    gpu = (res["gpu"] or {}).get("name", "CPU")
    lines = [f"Card: {gpu}; shape {Path(res['shape']).name}; measured bf16 matmul {res['matmul_tflops']} TFLOP/s; "
             f"training rows: {res['train_rows']}", "",
             "| training | tokens/s | rows/s | peak GiB | MFU | vs tutorial |", "|---|---|---|---|---|---|"]
    for k, v in res["train"].items():
        if "tokens_per_s" not in v:
            lines.append(f"| {k} | {v.get('error', 'failed')} | | | | |")
            continue
        extra = ", compiled" if v.get("compile") else ""
        extra += ", length-grouped" if v.get("group_by_length") else ""
        extra += ", packed rows" if v.get("packing") else ""
        extra += ", embeddings on CPU" if v.get("offload_embeddings") else ""
        extra += ", Trainer's per-step GPU reads" if v.get("trainer_syncs") else ""
        extra += f", base in {v['quantize']}" if v.get("quantize") else ""
        lines.append(f"| {k} (micro {v['micro_batch']} x accum {v['grad_accum']}, ckpt {v['checkpointing']}{extra}) | "
                     f"{v['tokens_per_s']:,.0f} | {v['rows_per_s']} | {v['peak_gib']} | {v['mfu']} | {v['vs_tutorial']}x |")
    if "eval" in res:
        lines += ["", f"Forward floor: {res['eval']['forward_floor_rows_per_s']} rows/s "
                  f"({res['eval']['prompt_tokens_mean']} prompt tokens per row)", "",
                  "| evaluation | rows/s | batch | peak GiB | MFU (of floor) | vs tutorial |",
                  "|---|---|---|---|---|---|"]
        for k, v in res["eval"].items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {v['rows_per_s']} | {v['batch']} | {v.get('peak_gib')} | {v['mfu']} | "
                             f"{v['vs_tutorial']}x |")
        tut = res["eval"]["tutorial_generate"]
        if "row_ms_median" in tut:
            lines += ["", f"Tutorial-style generate, one row: median {tut['row_ms_median']} ms "
                          f"(10th-90th percentile {tut['row_ms_p10']}-{tut['row_ms_p90']} ms)."]
    if "same_results" in res:
        s = res["same_results"]
        for k, label in (("same_dtype", "fp32 adapters"), ("llmcls", "bf16 adapters"),
                         ("llmcls_packed", "bf16 adapters, packed rows")):
            if k not in s:  # runs before packing existed
                continue
            v = s[k]
            lines.append(f"Same batch, tutorial path vs llmcls path ({label}): loss {s['loss_tutorial']:.5f} vs "
                         f"{v['loss']:.5f} (rel diff {v['loss_rel_diff']:.2e}); LoRA gradients rel error "
                         f"{v['grad_rel_err']:.2e}, min cosine {v['grad_min_cosine']:.4f}")
    return "\n".join(lines)


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every single-card benchmark here takes: the model shape and the device."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=str(SHARED / "model-shapes/qwen1.5-7b-chat.json"),
                    help="config.json of a real model, or 'tiny'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=8,
                    help="timed optimizer steps per training variant: one epoch over the same 16 x STEPS rows")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed epochs over the same rows first (compilation of every shape happens there)")
    ap.add_argument("--rows", type=int, default=256, help="evaluation rows")
    ap.add_argument("--train-rows", choices=("short", "long"), default="short",
                    help="short: texts <= 600 characters (~300 tokens, the published subsets); long: any text, "
                         "cut at 384 tokens (memory's worst case)")
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--single-rows", type=int, default=96, help="rows for one-at-a-time generate")
    ap.add_argument("--no-eval-compile", action="store_true",
                    help="leave out the evaluation's compiled scoring (llmcls_score_compiled*): a CPU smoke run")
    ap.add_argument("--only", default="check,eval,tutorial,llmcls,llmcls-padded,llmcls-16gb-compiled",
                    help="what to run, comma-separated: check, eval, tutorial, " + ", ".join(VARIANTS))
    ap.add_argument("--profile", default="", help="training variants to profile (comma-separated): two steps "
                    "under torch.profiler after the timing, tables in OUT/profile-VARIANT.txt")
    ap.add_argument("--out", default="bench-out")
    a = ap.parse_args(argv)
    only = set(filter(None, a.only.split(",")))
    unknown = only - {"check", "eval", "tutorial", *VARIANTS}
    if unknown:
        ap.error(f"--only: unknown {', '.join(sorted(unknown))}")
    for name in VARIANTS:  # every variant's config must load before anything runs (a key a config lost, say)
        variant_config(name)
    out_dir = Path(a.out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHARED / "qwen-tokenizer"))
    model, _ = build_model(a.shape, a.device)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    peak = matmul_tflops(a.device)
    train_rows, eval_rows = load_rows(16 * a.steps, short=a.train_rows == "short")
    eval_rows = eval_rows[:a.rows]
    drift = tutorial_config_drift()
    if drift:
        print(f"note: {TUTORIAL_CONFIG.name} differs from the tutorial's recipe: {drift}", flush=True)
    res = {"shape": a.shape, "device": a.device, "gpu": environment()["gpu"], "params": n_params,
           "train_rows": a.train_rows, "tutorial_config_drift": drift,
           "matmul_tflops": round(peak, 1) if peak else None, "environment": environment(), "train": {}}
    print(json.dumps({"gpu": res["gpu"], "params": n_params, "matmul_tflops": res["matmul_tflops"]}), flush=True)

    if "check" in only:
        res["same_results"] = same_results(model, tok, train_rows, a.device)
        print("same_results", json.dumps(res["same_results"]), flush=True)
        save(res, n_embed, out_dir)
    if "eval" in only:
        res["eval"] = run_eval(model, tok, eval_rows, a.device, a.eval_batch, a.single_rows,
                               compiled=not a.no_eval_compile)
        print("eval", json.dumps(res["eval"]), flush=True)
        save(res, n_embed, out_dir)
    if "tutorial" in only:
        model, res["train"]["tutorial"] = run_tutorial(model, tok, train_rows, a.device, out_dir, a.warmup)
        print("tutorial", json.dumps(res["train"]["tutorial"]), flush=True)
        save(res, n_embed, out_dir)
    for name, v in VARIANTS.items():
        if name not in only:
            continue
        t0 = time.perf_counter()
        cfg = variant_config(name, out_dir)
        made = {"config": f"configs/{v.config}", "changes": v.changes, **settings(cfg),
                "checkpointing": cfg.train.gradient_checkpointing}
        runner = run_qlora if cfg.model.quantize != "none" else run_llmcls
        try:  # compilation, if any, happens in the untimed warm-up steps
            model, res["train"][name] = runner(model, tok, train_rows, a.device, cfg, name, syncs=v.syncs,
                                               warmup_epochs=a.warmup,
                                               profile_to=out_dir / f"profile-{name}.txt"
                                               if name in a.profile.split(",") else None)
        except torch.OutOfMemoryError as e:
            res["train"][name] = {"error": f"out of memory: {e}"[:300], **made}
            print(name, "OOM", flush=True)
            continue
        except Exception as e:  # one variant failing (e.g. a kernel a library lacks) must not lose the run
            import traceback

            res["train"][name] = {"error": f"{type(e).__name__}: {e}"[:300], **made}
            print(name, "failed", traceback.format_exc()[-3000:], flush=True)
            continue
        res["train"][name] = {**res["train"][name], "config": made["config"], "changes": made["changes"],
                              "wall_s": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps(res["train"][name]), flush=True)
        save(res, n_embed, out_dir)  # a run cut short (a time limit) keeps what it measured

    print(save(res, n_embed, out_dir))


def save(res: dict, n_embed: int, out_dir: Path) -> str:
    add_ratios(res, n_embed)
    table = markdown(res)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "gpu_speed.json", res)
    atomic_write_text(out_dir / "gpu_speed.md", table + "\n")
    return table



if __name__ == "__main__":
    main()
