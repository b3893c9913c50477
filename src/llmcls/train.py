"""Stage 4 recipe — ``llmcls train``: prepare the data, load the model, attach LoRA, run the HF Trainer, save.

Reads top to bottom like the tutorial. What differs from it, and why:
- rows keep their whole answer (the text is shortened instead, see ``encode.py``);
- batches are left-padded, or packed end to end (`train.packing`), and the LM head runs only on the answer
  positions (same loss, far less work);
- the run directory never gets silently overwritten, and ``resume=True`` continues from the last checkpoint.

Run directory layout::

    RUN/config.yaml          resolved configuration (what was actually run)
    RUN/data/                prepare outputs: train.instruct.jsonl, encoded/, prepare.json
    RUN/base-model/          the tiny preset's random-init base (tiny runs only)
    RUN/checkpoints/         Trainer checkpoints (resume from the last one)
    RUN/adapter/             LoRA adapter, PEFT format, safetensors      (method: lora)
    RUN/model/               fine-tuned weights, safetensors              (method: full)
    RUN/tokenizer/           tokenizer used for training
    RUN/train_log.jsonl      one line per logging step
    RUN/train_summary.json   steps, loss, throughput, memory, versions
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from llmcls import dist
from llmcls.config import Config, save_config, to_dict
from llmcls.encode import AnswerCollator, PackedCollator, answer_loss
from llmcls.env import environment
from llmcls.io import atomic_write_json
from llmcls.model import (TINY, add_lora, build_tiny, compile_layers, load_model, load_tokenizer, packed_rows,
                          resolve_dtype, resolve_model_path, trainable_summary)
from llmcls.prepare import load_encoded, prepare
from llmcls.track import JsonlLogCallback, Tracker

log = logging.getLogger(__name__)


class RunExists(FileExistsError):
    pass


def plan(cfg: Config, rows: int | None = None) -> dict:
    """Optimizer steps the run will take (for --dry-run), from the row count when known."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    out = {"rows_per_optimizer_step": per_step, "world_size": world}
    if rows is not None:
        steps_per_epoch = math.ceil(math.ceil(rows / (cfg.train.batch_size * world)) / cfg.train.grad_accum)
        total = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(steps_per_epoch * cfg.train.epochs)
        out.update(rows=rows, steps_per_epoch=steps_per_epoch, total_steps=total,
                   checkpoints=total // cfg.train.save_steps if cfg.train.save_steps > 0 else 0)
    return out


def _last_checkpoint(ckpt_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None


def _save_dir_atomically(save, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)


class _Arguments(TrainingArguments):
    """llmcls places the model itself (``model.load_model``), so the Trainer must not move it: with
    ``model.offload_embeddings`` part of it stays on the CPU on purpose. This property is the documented hook."""

    @property
    def place_model_on_device(self) -> bool:
        return False


def training_arguments(cfg: Config, run: Path, progress: bool = True) -> TrainingArguments:
    return _Arguments(
        output_dir=str(run / "checkpoints"),
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
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.train.gradient_checkpointing else None,
        seed=cfg.train.seed,
        dataloader_num_workers=cfg.train.dataloader_workers,
        train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
        # Nothing in a step may wait for the GPU: the Trainer's own token count and NaN filter read a GPU value
        # after every micro-batch, and a blocking copy of the batch waits for the queue to drain; each leaves the
        # GPU idle while the CPU prepares the next step (15% of a 7B step; docs/BENCHMARKS.md). Tokens are counted
        # by TokenCounter instead; a NaN loss shows up in the log as NaN rather than being averaged away.
        include_num_input_tokens_seen="no",
        logging_nan_inf_filter=False,
        accelerator_config={"non_blocking": True},
        remove_unused_columns=False,  # the collator needs 'labels'; 'length' is dropped there
        report_to="none",             # trackers are attached explicitly (see track.py)
        disable_tqdm=not progress,
        **dist.trainer_arguments(cfg),  # several processes: DDP / FSDP settings (dist.py)
    )


def prepare_for_training(model, cfg: Config):
    """Attach adapters (or unfreeze everything) and switch off what training doesn't need."""
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    # The Trainer switches recomputation on when asked, never off: a model reused in one process (a notebook, a
    # benchmark running the tutorial's recipe first) would otherwise keep recomputing every layer, unasked.
    if not cfg.train.gradient_checkpointing and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    model = add_lora(model, cfg.lora)
    if cfg.train.compile:
        compile_layers(model)
    return model


class TokenCounter(TrainerCallback):
    """Counts the real (non-padding) tokens the model is fed into ``state.num_input_tokens_seen``, summed over
    processes. The count stays on the GPU and is read only when the Trainer is about to log, save or stop, so no
    step waits for it; a resumed run starts from the checkpoint's count."""

    def __init__(self, model):
        self.model, self.count, self.base, self.hook = model, None, 0, None

    def _add(self, module, args, kwargs):
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        n = mask.sum() if mask is not None and mask.dim() == 2 else (ids.numel() if ids is not None else 0)
        self.count = n if self.count is None else self.count + n

    def on_train_begin(self, args, state, control, **kw):
        self.base, self.count = state.num_input_tokens_seen, None
        self.hook = self.model.register_forward_pre_hook(self._add, with_kwargs=True)

    def on_step_end(self, args, state, control, **kw):
        if control.should_log or control.should_save or control.should_training_stop:
            self._publish(args, state)

    def on_train_end(self, args, state, control, **kw):
        self._publish(args, state)
        self.hook.remove()

    def _publish(self, args, state):
        n = torch.as_tensor(0 if self.count is None else self.count, device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n)  # every process publishes at the same steps
        state.num_input_tokens_seen = self.base + int(n.item())


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


def build_trainer(model, tokenizer, dataset, args: TrainingArguments, callbacks: list | None = None,
                  packing: bool = False):
    """The HF Trainer with llmcls's collator (left padding, or rows packed end to end with attention kept within
    each row; answer-position logits) and loss."""
    from transformers import Trainer

    collator = PackedCollator() if packing else AnswerCollator(pad_id=tokenizer.pad_token_id)
    extra = [PackedAttention(model)] if packing else []
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                   compute_loss_func=answer_loss, callbacks=[TokenCounter(model), *extra, *(callbacks or [])])


def train(cfg: Config, resume: bool = False, overwrite: bool = False, progress: bool = True,
          callbacks: list | None = None) -> dict:
    """Fine-tune as configured; returns the training summary. ``callbacks`` are extra TrainerCallbacks."""
    from transformers import set_seed

    dist.check_launch(cfg)
    run = Path(cfg.train.output_dir)
    finished = (run / "adapter").is_dir() or (run / "model").is_dir()
    started = (run / "checkpoints").is_dir() or finished
    if started and not resume and not overwrite:
        raise RunExists(f"{run} already holds a run; pass --resume to continue it, --overwrite to start over, "
                        "or choose another train.output_dir")
    # Under a launcher, rank 0 alone writes the run directory; the others wait for it, then read (dist.py).
    if dist.is_main():
        if overwrite and not resume and run.exists():
            for sub in ("checkpoints", "adapter", "model", "train_log.jsonl", "train_summary.json", "eval"):
                p = run / sub
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        run.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.train.seed)

    # 1. Tokenizer and data ------------------------------------------------------------------------------
    is_tiny = cfg.model.name_or_path == TINY
    with dist.local_main_first():  # downloads and tokenizer builds land in per-node caches
        model_path = None if is_tiny else resolve_model_path(cfg.model)
        tokenizer = load_tokenizer(cfg.model, model_path)
    summary = dist.on_main(lambda: prepare(cfg, tokenizer, run / "data", progress=progress))
    dataset = load_encoded(run / "data")
    log.info("data: %d rows, %d shortened, answer kept in %d", summary["rows"], summary["shortened"],
             summary["answer_kept"])

    # 2. Model --------------------------------------------------------------------------------------------
    if is_tiny:  # materialise the random-init base once, so eval/export load it like any local model
        dist.on_main(lambda: (run / "base-model").is_dir()
                     or build_tiny(cfg.model.tiny, tokenizer, run / "base-model", cfg.train.seed))
        model_path = str((run / "base-model").resolve())
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=model_path,
                                                                 source="local"))
    if dist.is_main():
        save_config(cfg, run / "config.yaml")

    args = training_arguments(cfg, run, progress)
    device = str(args.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    dist.fsdp_loading(cfg, True)
    # Under FSDP the model stays in host memory: accelerate moves only each process's shard to its GPU.
    device = "cpu" if cfg.train.fsdp != "off" else device
    model = prepare_for_training(load_model(cfg.model, model_path, device=device, dtype=dtype), cfg)
    if cfg.train.packing and args.device.type != "cuda":
        log.warning("train.packing without a GPU: attention falls back to a dense block-diagonal mask, slower "
                    "than padded batches on a CPU (the bbc-tiny demo on 2 CPU cores: 231 s against 90 s)")
    params = trainable_summary(model)
    log.info("trainable parameters: %s", params)

    # 3. Train --------------------------------------------------------------------------------------------
    tracker = Tracker(cfg.track, run, {**to_dict(cfg), "data_summary": {k: v for k, v in summary.items()
                                                                         if k != "invalid_examples"}},
                      is_main=dist.is_main())
    trainer = build_trainer(model, tokenizer, dataset, args, callbacks=[
        JsonlLogCallback(run / "train_log.jsonl", echo=dist.is_main()), *tracker.callbacks,
        *(callbacks or [])], packing=cfg.train.packing)
    checkpoint = _last_checkpoint(run / "checkpoints") if resume else None
    if resume and checkpoint is None:
        log.warning("no checkpoint in %s; starting from the beginning", run / "checkpoints")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - t0
    dist.fsdp_loading(cfg, False)

    # 4. Save (rank 0 only) ---------------------------------------------------------------------------------
    out = {
        "global_step": trainer.state.global_step, "train_loss": result.training_loss,
        "final_logged_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "wall_s": round(wall, 2), "resumed_from": checkpoint, **params,
        "rows": summary["rows"], "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_s": round(trainer.state.num_input_tokens_seen / wall, 1) if wall > 0 else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        "world_size": args.world_size, "fsdp": cfg.train.fsdp,
        "environment": environment(),
    }
    if args.world_size > 1:
        out["peak_mem_gib_per_process"] = dist.all_gather(out["peak_mem_gib"])
    # Under FSDP each process holds a shard of every weight: all of them take part in gathering the weights.
    state_dict = (dist.full_state_dict(trainer.model, trainable_only=cfg.lora.method != "full")
                  if trainer.is_fsdp_enabled else None)
    if trainer.is_world_process_zero():
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        target = run / ("model" if cfg.lora.method == "full" else "adapter")
        _save_dir_atomically(lambda p: unwrapped.save_pretrained(p, state_dict=state_dict, safe_serialization=True),
                             target)
        _save_dir_atomically(tokenizer.save_pretrained, run / "tokenizer")
        atomic_write_json(run / "train_summary.json", out)
        tracker.log({"train/final_loss": out["train_loss"]}, step=trainer.state.global_step)
    tracker.finish()
    dist.barrier()  # nobody goes on (llmcls run evaluates next) before rank 0 has written the model
    return out
