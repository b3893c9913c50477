"""Training components for the HF Trainer: its arguments (one process or a DDP/FSDP launch), the model made ready
to train, the collator and loss chosen together, and the callbacks that count tokens, time the steps (the warm-up
split, ``llmcls.warmup``) and switch packed attention on and off. ``llmcls.recipes.train`` puts them together into
a run. Over 400 lines on purpose: the arguments, the collator, the loss and the callbacks are chosen together in
:func:`build_trainer` (packing, seq_cls, FSDP each change several of them), and one module shows what a training
step is made of. ``llmcls eval`` never imports it (the Trainer's modules pull in peft)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from llmcls import dist
from llmcls.collate import AnswerCollator, AnswerLoss, PackedCollator
from llmcls.config import Config
from llmcls.model.attention import packed_rows
from llmcls.model.compiling import compile_layers, compile_stack, uncompile_stack
from llmcls.model.load import add_lora, unwrap
from llmcls.warmup import compile_delta, compile_stats

log = logging.getLogger(__name__)


class _Arguments(TrainingArguments):
    """llmcls places the model itself (``model.load_model``), so the Trainer must not move it: with
    ``model.offload_embeddings`` part of it stays on the CPU on purpose. This property is the documented hook."""

    @property
    def place_model_on_device(self) -> bool:
        return False



# transformers 5.2x renamed gradient checkpointing to activation checkpointing (the old names warn, and go in v6);
# earlier 5.x releases (the GPU image's 5.17) know only the old ones.
_CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in
                  {f.name for f in dataclasses.fields(TrainingArguments)} else "gradient_checkpointing")

def training_arguments(cfg: Config, checkpoints: Path, progress: bool = True) -> TrainingArguments:
    return _Arguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=cfg.train.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.train.weight_decay,
        logging_steps=cfg.train.logging_steps,
        logging_first_step=True,
        save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit,
        **{_CHECKPOINTING: cfg.train.gradient_checkpointing,
           f"{_CHECKPOINTING}_kwargs": {"use_reentrant": False} if cfg.train.gradient_checkpointing else None},
        seed=cfg.train.seed,
        dataloader_num_workers=cfg.train.dataloader_workers,
        train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
        # Nothing in a step may wait for the GPU: the Trainer's own token count and NaN filter read a GPU value
        # after every micro-batch, and a blocking copy of the batch waits for the queue to drain; each leaves the
        # GPU idle while the CPU prepares the next step (15% of a 7B step; docs/BENCHMARKS.md). Tokens are counted
        # by TokenCounter instead; a NaN loss shows up in the log as NaN rather than being averaged away.
        include_num_input_tokens_seen="no",
        # With train.skip_nonfinite_steps a step is checked anyway, and a skipped step's NaN loss is left out of
        # the logged mean as its update is left out of the weights.
        logging_nan_inf_filter=cfg.train.skip_nonfinite_steps > 0,
        accelerator_config={"non_blocking": torch.cuda.is_available()},  # pinned batches only (see next line)
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs a GPU; on a CPU torch warns every run
        remove_unused_columns=False,  # the collator needs 'labels'; 'length' is dropped there
        report_to="none",             # trackers are attached explicitly (see track.py)
        disable_tqdm=not progress,
        **launch_arguments(cfg),  # several processes: DDP / FSDP settings
    )



def launch_arguments(cfg: Config) -> dict:
    """TrainingArguments for several processes (harmless for one).

    FSDP (``train.fsdp``) is FSDP2 through accelerate: the units gathered for compute are the model's own
    ``_no_split_modules`` (whole decoder layers), accelerate's default. With ``cpu_ram_efficient_loading`` only
    the first process of each node reads the checkpoint; the others start from zero-filled placeholders and
    accelerate sends rank 0's weights into every shard."""
    # Every trainable weight gets a gradient each step; DDP's search for unused ones would cost every step.
    out: dict = {"ddp_find_unused_parameters": False}
    if dist.launched() and not torch.cuda.is_available():  # see dist.state(): the CI's gloo runs
        out.update(use_cpu=True, ddp_backend="gloo")
    if cfg.train.fsdp != "off":
        out.update(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": cfg.train.fsdp == "full_shard",
                                           "cpu_ram_efficient_loading": True})
    return out


def fsdp_loading(cfg: Config, on: bool) -> None:
    """Switch transformers' FSDP loading mode: with it on, ``from_pretrained`` reads real weights only on each
    node's first process, the others get zeros (accelerate then sends rank 0's into every shard). On before the
    model is loaded
    (the Trainer's own switch comes with its construction, too late); off once training is over, or a later
    load in the same process (``llmcls run`` evaluates next) would get zeros on the other processes."""
    if cfg.train.fsdp == "off":
        return
    from accelerate.utils import disable_fsdp_ram_efficient_loading, enable_fsdp_ram_efficient_loading

    enable_fsdp_ram_efficient_loading() if on else disable_fsdp_ram_efficient_loading()


def full_state_dict(model, trainable_only: bool) -> dict:
    """The whole weights of an FSDP-sharded model on rank 0 (empty dict elsewhere). Every process must call it:
    each contributes its shards. ``trainable_only`` gathers just the adapter, not the frozen base model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=trainable_only))


def prepare_for_training(model, cfg: Config):
    """Attach adapters (or unfreeze everything) and switch off what training doesn't need."""
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    # The Trainer switches recomputation on when asked, never off: a model reused in one process (a notebook, a
    # benchmark running the tutorial's recipe first) would otherwise keep recomputing every layer, unasked.
    if not cfg.train.gradient_checkpointing and getattr(model, f"is_{_CHECKPOINTING}", False):
        getattr(model, f"{_CHECKPOINTING}_disable")()
    model = add_lora(model, cfg.lora)
    if cfg.train.cuda_graphs:
        compile_stack(model, cfg.model.compile_cache)
    elif cfg.train.compile:
        one_graph_for_all_layers(model)
        compile_layers(model, cfg.model.compile_cache)
    return model


def one_graph_for_all_layers(model) -> None:
    """With a frozen input table (LoRA, QLoRA, the 16 GB mode's table in host memory) the first decoder layer's
    input needs no gradient and every later layer's does. Whether an input requires a gradient is part of what a
    compiled graph is specialised on (its backward differs), so the first layer would compile a second graph, which
    doubles the compile time of a run's first step. Marking the table's output as requiring a gradient
    (transformers' ``enable_input_require_grads``, the hook PEFT uses for gradient checkpointing) makes every layer
    alike: one graph. The price is the first layer's backward computing the gradient of its input, which nothing
    uses: about 1% of a 7B step (that layer's q/k/v/gate/up input gradients, ~0.7 of one layer's forward matrix
    work, in a step of ~64 such units over 32 layers), against tens of seconds of compile time per run.
    ``tests/test_warmup.py`` counts the graphs."""
    base = unwrap(model)
    table = base.get_input_embeddings()
    if table is not None and not any(p.requires_grad for p in table.parameters()):
        base.enable_input_require_grads()


class TokenCounter(TrainerCallback):
    """Counts the real (non-padding) tokens the model is fed into ``state.num_input_tokens_seen``, summed over
    processes. The count stays on the GPU and is read only when the Trainer is about to log, save or stop, so no
    step waits for it; a resumed run starts from the checkpoint's count."""

    def __init__(self, model):
        self.model, self.count, self.base, self.hook, self.off = model, None, 0, None, False
        self.padding = 0  # tokens fed but not real: PackedCollator's pad_multiple (train.cuda_graphs)

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside are not training (a dev evaluation): not counted."""
        self.off = True
        try:
            yield
        finally:
            self.off = False

    def _add(self, module, args, kwargs):
        if self.off:
            return
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        n = mask.sum() if mask is not None and mask.dim() == 2 else (ids.numel() if ids is not None else 0)
        self.count = n if self.count is None else self.count + n

    def on_train_begin(self, args, state, control, **kw):
        self.base, self.count, self.padding = state.num_input_tokens_seen, None, 0
        self.hook = self.model.register_forward_pre_hook(self._add, with_kwargs=True)

    def on_step_end(self, args, state, control, **kw):
        if control.should_log or control.should_save or control.should_training_stop:
            self._publish(args, state)

    def on_train_end(self, args, state, control, **kw):
        self._publish(args, state)
        self.hook.remove()

    def _publish(self, args, state):
        n = torch.as_tensor(0 if self.count is None else self.count, device=args.device) - self.padding
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n)  # every process publishes at the same steps
        state.num_input_tokens_seen = self.base + int(n.item())


def _sync() -> None:
    if torch.cuda.is_available():  # the step is done when the GPU is, not when its kernels are queued
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Times the Trainer from ``train()`` to the end of the first optimizer step and the mean of the steps after
    it. The GPU is synchronised twice in the whole run (after the first step and at the end), so no other step
    waits for it. ``begin`` is set by the caller just before ``trainer.train()``: the Trainer's own setup (data
    loader, optimizer) counts in the first step."""

    def __init__(self):
        self.begin = self.first = self.end = None
        self.first_step = self.last_step = 0
        self.compile_before: Optional[dict] = None
        self.compile_first: Optional[dict] = None

    def start(self) -> None:
        self.begin, self.compile_before = time.perf_counter(), compile_stats()

    def on_step_end(self, args, state, control, **kw):
        if self.first is None:
            _sync()
            self.first, self.first_step = time.perf_counter(), state.global_step
            self.compile_first = compile_delta(self.compile_before) if self.compile_before else None

    def on_train_end(self, args, state, control, **kw):
        _sync()
        self.end, self.last_step = time.perf_counter(), state.global_step

    def summary(self) -> dict:
        if self.begin is None or self.first is None:
            return {}
        later = self.last_step - self.first_step
        out = {"first_step_s": round(self.first - self.begin, 3),
               "later_step_s": round((self.end - self.first) / later, 4) if later > 0 and self.end else None,
               "later_steps": later}
        if self.compile_first is not None:
            out["first_step_compile"] = self.compile_first
        return out


class TrainingDiverged(ValueError):
    """The loss or the gradient norm stopped being a number: every step after it trains on NaN weights."""


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return True  # not a number at all: not this callback's business


class FiniteLoss(TrainerCallback):
    """Stops the run at the first logged non-finite loss or gradient norm, naming the step and the last good
    checkpoint. The Trainer would go on: one NaN gradient, clipped, makes every weight NaN, and the remaining
    steps and the evaluation after them are spent on a broken model (a seq_cls run on an H200 trained 270 such
    steps before its eval failed).

    ``skip`` > 0 (``train.skip_nonfinite_steps``): before each optimizer step the trainable gradients are checked
    (one wait for the GPU per step); a step with a non-finite one loses its update (every gradient dropped, so
    AdamW leaves every weight and its moments as they were, as a loss scaler does for fp16 overflows), is named
    in a warning and in ``skipped``, and the run stops only past ``skip`` such steps."""

    def __init__(self, checkpoints: Optional[Path] = None, skip: int = 0):
        self.checkpoints, self.last_good, self.skip = checkpoints, None, skip
        self.skipped: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        if not self.skip:
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        ok = torch.stack([n.float() for n in torch._foreach_norm([p.grad for p in params])]).isfinite().all()
        if torch.distributed.is_initialized() and dist.world_size() > 1:  # FSDP: shards differ; all must agree
            ok = torch.tensor(int(ok), device=ok.device)
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        if bool(ok):
            return
        step = state.global_step + 1  # the step being taken
        self.skipped.append(step)
        for p in params:
            p.grad = None  # AdamW passes over a parameter without a gradient: no update, moments unchanged
        if len(self.skipped) > self.skip:
            raise TrainingDiverged(f"training diverged: {len(self.skipped)} steps with non-finite gradients "
                                   f"(steps {', '.join(map(str, self.skipped))}), more than "
                                   f"train.skip_nonfinite_steps={self.skip}. Lower train.lr, set lora.dtype "
                                   "float32, or report the run's config with --debug")
        log.warning("step %d: non-finite gradients, update skipped (%d of at most %d)", step, len(self.skipped),
                    self.skip)

    def on_log(self, args, state, control, logs=None, **kw):
        bad = {k: v for k, v in (logs or {}).items() if k in ("loss", "grad_norm") and not _finite(v)}
        if bad.keys() == {"grad_norm"} and state.global_step in self.skipped:
            bad = {}  # the logged norm is the skipped step's own
        if not bad:
            if "loss" in (logs or {}):
                self.last_good = state.global_step
            return
        saved = sorted(int(c.name.split("-")[1]) for c in self.checkpoints.glob("checkpoint-*")
                       if c.name.split("-")[1].isdigit()) if self.checkpoints and self.checkpoints.is_dir() else []
        good = [c for c in saved if self.last_good is not None and c <= self.last_good]
        raise TrainingDiverged(
            f"training diverged at step {state.global_step}: "
            + ", ".join(f"{k} {v}" for k, v in bad.items())
            + (f" (last finite log at step {self.last_good})" if self.last_good is not None else "")
            + (f"; the checkpoint of step {good[-1]} predates it" if good else "; no checkpoint predates it")
            + ". Lower train.lr, set lora.dtype float32, set train.skip_nonfinite_steps, or report the run's "
              "config with --debug")


class PackedAttention(TrainerCallback):
    """Packed batches attend within each row (``model.packed_rows``) for the length of the training, and the model
    attends as before after it. Chosen together with the collator in :func:`build_trainer`: a packed batch under
    plain sdpa would let every row attend to the rows before it, with no error."""

    def __init__(self, model):
        self.model, self.stack = model, contextlib.ExitStack()

    def on_train_begin(self, args, state, control, **kw):
        self.stack.enter_context(packed_rows(self.model))

    def on_train_end(self, args, state, control, **kw):
        self.stack.close()


class WeightedTrainer(Trainer):
    """The HF Trainer and two things more: a batch's ``answer_weights`` (``train.class_weights``) go to the loss
    (:class:`llmcls.collate.AnswerLoss`) instead of the model, whose forward would refuse them; and a
    ``batch_sampler`` (``train.batch_tokens``: :class:`llmcls.batching.TokenBudgetSampler`) forms the training
    micro-batches instead of ``per_device_train_batch_size`` rows (the Trainer's own loader takes a batch sampler
    only from its ``batch_rebalance`` strategy)."""

    batch_sampler = None
    token_counter: Optional[TokenCounter] = None

    def get_train_dataloader(self):
        if self.batch_sampler is None:
            return super().get_train_dataloader()
        from functools import partial

        from torch.utils.data import DataLoader
        from transformers.trainer_utils import seed_worker

        a = self.args
        loader = DataLoader(self.train_dataset, batch_sampler=self.batch_sampler, collate_fn=self.data_collator,
                            num_workers=a.dataloader_num_workers, pin_memory=a.dataloader_pin_memory,
                            worker_init_fn=partial(seed_worker, num_workers=a.dataloader_num_workers,
                                                   rank=a.process_index))
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.compute_loss_func.weights = inputs.pop("answer_weights", None)
        padding = inputs.pop("padding_tokens", 0)
        if padding and self.token_counter is not None and not self.token_counter.off:
            self.token_counter.padding += padding
        return super().compute_loss(model, inputs, *args, **kwargs)


def class_weights(spec: str, labels: list[str]) -> Optional[dict[str, float]]:
    """``train.class_weights``: none; ``balanced``, scikit-learn's n_rows / (n_labels x rows of the label), which
    averages 1 over the rows; or a JSON file of {label: weight} naming every training label."""
    if spec == "none":
        return None
    if spec == "balanced":
        import numpy as np
        from sklearn.utils.class_weight import compute_class_weight

        classes = np.array(sorted(set(labels)))
        return dict(zip(classes.tolist(), map(float, compute_class_weight("balanced", classes=classes, y=labels))))
    import json

    from llmcls.config import ConfigError

    import math

    try:
        given = json.loads(Path(spec).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.class_weights: {spec}: not a readable JSON file of label weights ({e})") from None
    if not isinstance(given, dict):
        raise ConfigError(f"train.class_weights: {spec} must hold an object {{label: weight}}, not "
                          f"{type(given).__name__}")
    missing = sorted(set(labels) - set(given))
    bad = [k for k, v in given.items() if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v) or v < 0]
    if missing or bad:
        raise ConfigError(f"train.class_weights: {spec} must give a weight >= 0 to every training label"
                          + (f"; missing: {', '.join(missing[:10])}" if missing else "")
                          + (f"; not a weight >= 0: {', '.join(bad[:10])}" if bad else ""))
    return {k: float(v) for k, v in given.items()}


# train.cuda_graphs: packed steps padded up to a multiple of this many tokens. A step of 16 Fudan rows is 1-6k
# tokens: ~12 shapes to record, and ~256 tokens (~4%) of padding on average, on a GPU the host leaves idle anyway.
GRAPH_PAD = 512


def graph_padding(cfg: Config) -> int:
    """:class:`PackedCollator`'s ``pad_multiple`` for this config (0: no padding)."""
    return GRAPH_PAD if cfg.train.cuda_graphs else 0


def build_trainer(model, tokenizer, dataset, args: TrainingArguments, callbacks: list | None = None,
                  packing: bool = False, dev=None, collator=None, loss=None, batch_sampler=None,
                  skip_nonfinite: int = 0, pad_multiple: int = 0):
    """The HF Trainer with llmcls's collator (left padding, or rows packed end to end with attention kept within
    each row; answer-position logits) and loss. ``dev``: a :class:`llmcls.selection.DevEvaluator`, wired to the
    token counter (its forwards are not training) and to the Trainer's log. ``collator`` and ``loss`` replace the
    answer-token pair (``lora.task: seq_cls``: :class:`llmcls.seqcls.LabelCollator`, :class:`~llmcls.seqcls.LabelLoss`).
    ``batch_sampler``: the training micro-batches (:func:`token_budget_sampler`), instead of fixed row counts.
    ``skip_nonfinite``: :class:`FiniteLoss`'s ``skip``. ``pad_multiple``: :class:`PackedCollator`'s
    (:data:`GRAPH_PAD` for ``train.cuda_graphs``)."""
    collator = collator or (PackedCollator(pad_multiple, tokenizer.pad_token_id or 0) if packing
                            else AnswerCollator(pad_id=tokenizer.pad_token_id))
    counter = TokenCounter(model)
    extra = [FiniteLoss(Path(args.output_dir), skip_nonfinite), *([PackedAttention(model)] if packing else [])]
    if dev is not None:
        dev.paused = counter.paused
        dev.attn = dev.attn or unwrap(model).config._attn_implementation  # what scoring expects, not packed
        extra.append(dev)
    trainer = WeightedTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                              compute_loss_func=loss or AnswerLoss(), callbacks=[counter, *extra, *(callbacks or [])])
    trainer.batch_sampler, trainer.token_counter = batch_sampler, counter
    if dev is not None:
        dev.trainer = trainer
    return trainer


def token_budget_sampler(cfg: Config, lengths):
    """``train.batch_tokens``' batch sampler over rows of these token ``lengths`` (None when it is unset)."""
    if cfg.train.batch_tokens is None:
        return None
    from llmcls.batching import TokenBudgetSampler

    t = cfg.train
    return TokenBudgetSampler(lengths, t.batch_tokens, t.seed, t.group_by_length, t.epochs, t.max_steps, t.grad_accum)



def reuse_refused(cfg: Config) -> Optional[str]:
    """Why ``llmcls run`` cannot evaluate with the model it trained and loads the base again for each evaluation
    (None: it can). Reuse is kept to what is both safe and tested: a LoRA adapter on an unquantised base in one
    process. Elsewhere the separate loads stand:
    - ``lora.method: full``: training replaced the base's weights, so the zero-shot base and another step's weights
      need a fresh load anyway;
    - several processes (DDP, ``train.fsdp``): the model is wrapped (FSDP: sharded, its shards placed by
      accelerate) for training; unwrapping it for scoring is not tested here;
    - ``model.quantize`` nf4 / fp8: the quantised base (bitsandbytes, torchao's Float8Linear under compiled layers)
      is not tested on this path (no GPU in the tests);
    - ``model.device_map``: accelerate's dispatch hooks on the layers, not tested on this path."""
    if cfg.lora.method == "full":
        return "lora.method=full (the base's own weights were trained)"
    if dist.world_size() > 1 or cfg.train.fsdp != "off":
        return "a launch of several processes (DDP / FSDP wraps the model for training)"
    if cfg.model.quantize != "none":
        return f"model.quantize={cfg.model.quantize}"
    if cfg.model.device_map:
        return f"model.device_map={cfg.model.device_map}"
    if cfg.train.compile and not cfg.eval.compile:
        # torch has no public way to undo nn.Module.compile: the trained layers would score compiled
        return "train.compile without eval.compile (the trained layers stay compiled; eval asks for plain ones)"
    return None


def for_scoring(model, use_cache: Optional[bool] = None):
    """The model a finished training leaves, put in the state a fresh load for scoring is in, so that nothing of
    training leaks into the evaluations ``llmcls run`` does with it: eval mode (LoRA and attention dropout off),
    every weight frozen and its gradient dropped, no recomputation, the input-embedding hook that
    :func:`one_graph_for_all_layers` and gradient checkpointing add removed, ``use_cache`` as loaded. Decoder layers
    compiled for training stay compiled (:func:`reuse_refused` loads again when ``eval.compile`` is off);
    ``model_for_run`` compiles them afresh for scoring, as it does for a loaded model. Packed attention was switched off when training ended
    (:class:`PackedAttention`)."""
    from llmcls.model.attention import PACKED_ATTENTION

    base = unwrap(model)
    if base.config._attn_implementation == PACKED_ATTENTION:  # PackedAttention.on_train_end did not run
        raise RuntimeError("the trained model still attends in packed rows; it cannot score")
    uncompile_stack(model)  # train.cuda_graphs' recorded graphs are for training steps
    model.eval()
    model.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    if getattr(base, f"is_{_CHECKPOINTING}", False):
        getattr(base, f"{_CHECKPOINTING}_disable")()
    base.disable_input_require_grads()
    if use_cache is not None:
        base.config.use_cache = use_cache
    return model
