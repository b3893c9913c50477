"""Stage 4 recipe — ``llmcls train``: prepare the data, load the model, attach LoRA, run the HF Trainer, save.

Reads top to bottom like the tutorial. What differs from it, and why:
- rows keep their whole answer (the text is shortened instead, see ``encode.py``);
- batches are left-padded, or packed end to end (`train.packing`), and the LM head runs only on the answer
  positions (same loss, far less work; ``collate.py``, ``trainer.py``);
- the run directory (its layout: ``rundir.py``) never gets silently overwritten, and ``resume=True`` continues
  from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time

import torch

from llmcls import dist, seqcls
from llmcls.config import Config, ConfigError, check_launch, check_training, save_config, to_dict
from llmcls.data import read_rows
from llmcls.env import environment
from llmcls.files import atomic_dir, atomic_write_json, clean_leftovers
from llmcls.model.load import load_model, load_tokenizer, resolve_dtype, resolve_model_path, trainable_summary
from llmcls.model.tiny import TINY, build_tiny
from llmcls.recipes.calibrate import fit_and_save
from llmcls.recipes.plan import plan
from llmcls.recipes.prepare import load_encoded, prepare
from llmcls.reporting.track import JsonlLogCallback, Tracker, trim_log, whole_run_loss
from llmcls.rundir import RunDir
from llmcls.selection import DevEvaluator
from llmcls.warmup import cache_folder, cuda_graphs_recorded, process_age, split_line
from llmcls.trainer import (FiniteLoss, StepTimer, build_trainer, class_weights, for_scoring, fsdp_loading,
                            full_state_dict, graph_padding, prepare_for_training, reuse_refused, token_budget_sampler,
                            training_arguments)

log = logging.getLogger(__name__)


class RunExists(FileExistsError):
    pass


def fit_lexical(cfg: Config, run: RunDir, tokenizer, summary: dict, progress: bool) -> None:
    """The TF-IDF model of ``eval.hybrid`` / ``eval.shortlist``, fitted on the rows the LLM trains on (the dev rows
    left out), each read as ``baseline.text`` says, into ``RUN/lexical``."""
    from llmcls.encode import PromptBuilder
    from llmcls.infer import reader
    from llmcls.lexical import LexicalModel, cut_texts
    from llmcls.windows import settings

    rows, _ = read_rows(cfg.data.train_file, cfg.data, limit=cfg.data.max_train_rows)
    dev_lines = set((summary.get("dev") or {}).get("lines", ()))
    rows = [r for r in rows if r.line not in dev_lines]
    builder = PromptBuilder(tokenizer, cfg.prompt)
    rows = cut_texts(rows, cfg.baseline.text, reader(builder, cfg.data.max_length, settings(cfg)))
    model = LexicalModel.fit(rows, C=cfg.baseline.svm_c, text=cfg.baseline.text, progress=progress)
    model.save(run.lexical)
    log.info("TF-IDF model (%s): %d rows, %d features, %d labels, reading %s", "hybrid" if cfg.eval.hybrid
             else "shortlist", len(rows), model.features, len(model.labels), cfg.baseline.text)


def warmup_split(started: float, t_start: float, load_s: float, encode_s: float, t_train: float,
                 timer: StepTimer, compiled: bool) -> dict:
    """Seconds from the command's start to the first optimizer step done (``warmup`` in train_summary.json):
    ``start_s`` the interpreter and imports, ``load_s`` tokenizer + model (adapters attached; a tiny base built),
    ``encode_s`` prepare (read, validate, tokenise; a cache hit is quick), ``setup_s`` the rest before
    ``trainer.train()`` (tracker, dev set, TF-IDF model, Trainer), ``first_step_s`` from ``trainer.train()`` to the
    first optimizer step done (the Trainer's own setup and all compilation included; ``first_step_compile`` says
    how much was compiling and what the compile caches gave), and the mean of the later steps."""
    steps = timer.summary()
    if not steps:
        return {}
    setup_s = t_train - t_start - load_s - encode_s
    out = {"start_s": round(started, 3), "load_s": round(load_s, 3), "encode_s": round(encode_s, 3),
           "setup_s": round(setup_s, 3), **steps,
           "to_first_step_s": round(started + (t_train - t_start) + steps["first_step_s"], 3),
           "compile_cache": cache_folder() if compiled else None}
    return out


def _last_checkpoint(run: RunDir) -> str | None:
    """The last complete checkpoint (a half-saved one from a crash has no trainer state to resume from)."""
    steps = run.checkpoint_steps()
    return str(run.checkpoints / f"checkpoint-{steps[-1]}") if steps else None


def train(cfg: Config, resume: bool = False, overwrite: bool = False, progress: bool = True,
          callbacks: list | None = None, keep_model: bool = False):
    """Fine-tune as configured; returns the training summary. ``callbacks`` are extra TrainerCallbacks.

    ``keep_model`` (``llmcls run``): returns ``(summary, model, tokenizer)`` instead, ``model`` the trained model put
    in the state of a fresh load for scoring (:func:`llmcls.trainer.for_scoring`), for the evaluations that follow
    to use instead of loading the base again, None where :func:`llmcls.trainer.reuse_refused` says why they must
    load; ``tokenizer`` the one training used and saved to the run's ``tokenizer/``."""
    from transformers import set_seed

    started = process_age()  # the interpreter's start and the imports, before anything of the run
    t_start = time.perf_counter()
    check_launch(cfg, dist.world_size(), torch.cuda.is_available())
    check_training(cfg)
    run = RunDir(cfg.train.output_dir)
    if run.started and not resume and not overwrite:
        raise RunExists(f"{run.path} already holds a run; pass --resume to continue it, --overwrite to start over, "
                        "or choose another train.output_dir")
    # Under a launcher, rank 0 alone writes the run directory; the others wait for it, then read (dist.py).
    if dist.is_main():
        clean_leftovers(run.path)  # temporary files and folders of a writer that was killed
        if overwrite and not resume:
            stale = run.training_outputs()
        elif not run.started:  # what a failed start left is no run: the retry starts afresh
            stale = run.failed_start_outputs()
        else:
            stale = []
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        run.path.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.train.seed)

    # 1. Tokenizer and data ------------------------------------------------------------------------------
    is_tiny = cfg.model.name_or_path == TINY
    t = time.perf_counter()
    with dist.local_main_first():  # downloads and tokenizer builds land in per-node caches
        model_path = None if is_tiny else resolve_model_path(cfg.model)
        tokenizer = load_tokenizer(cfg.model, model_path)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    summary = dist.on_main(lambda: prepare(cfg, tokenizer, run.data.path, progress=progress))
    dataset = load_encoded(run.data.path)
    encode_s = time.perf_counter() - t
    weights = class_weights(cfg.train.class_weights, dataset["label"])
    seq_cls = cfg.lora.task == "seq_cls"
    labels = sorted(summary["labels"])  # seq_cls: the head's labels, in RunDir.labels' order
    if seq_cls:
        if summary.get("multi_label"):
            raise ConfigError(f"lora.task=seq_cls trains a single-label head (softmax over the labels), and "
                              f"{cfg.data.train_file} is multi-label; use lora.task=generate (docs/MULTILABEL.md)")
        dataset = seqcls.to_examples(dataset, labels)  # the prompt, cut as for the generative recipe; the label
    elif weights is not None:  # each row's answer tokens weigh what its label does (collate.answer_loss)
        dataset = dataset.add_column("weight", [weights[label] for label in dataset["label"]])
    if weights is not None:
        log.info("class weights (%s): %s", cfg.train.class_weights,
                 ", ".join(f"{k} {v:.3g}" for k, v in sorted(weights.items(), key=lambda kv: -kv[1])[:8]))
    log.info("data: %d rows, %d shortened, answer kept in %d%s", summary["rows"], summary["shortened"],
             summary["answer_kept"], f"; {len(dataset)} examples, one per window (train.long_text_windows=all)"
             if summary.get("windows") else "")

    # 2. Model --------------------------------------------------------------------------------------------
    t = time.perf_counter()
    if is_tiny:  # materialise the random-init base once, so eval/export load it like any local model
        dist.on_main(lambda: run.base_model.is_dir()
                     or build_tiny(cfg.model.tiny, tokenizer, run.base_model, cfg.train.seed))
        model_path = str(run.base_model.resolve())
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=model_path,
                                                                 source="local"))
    if dist.is_main():
        save_config(cfg, run.config_file)

    args = training_arguments(cfg, run.checkpoints, progress)
    device = str(args.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    fsdp_loading(cfg, True)
    # Under FSDP the model stays in host memory: accelerate moves only each process's shard to its GPU.
    device = "cpu" if cfg.train.fsdp != "off" else device
    model = load_model(cfg.model, model_path, device=device, dtype=dtype, training=True)
    if seq_cls:  # the same backbone with a label head, initialised from the LM head (llmcls.seqcls)
        model = seqcls.from_causal(model, tokenizer, labels)
    use_cache = model.config.use_cache  # as loaded: training turns it off, scoring the same model restores it
    model = prepare_for_training(model, cfg)
    if cfg.train.packing and args.device.type != "cuda":
        log.warning("train.packing without a GPU: attention falls back to a dense block-diagonal mask, slower "
                    "than padded batches on a CPU (the bbc-tiny demo on 2 CPU cores: 231 s against 90 s)")
    params = trainable_summary(model)
    log.info("trainable parameters: %s", params)
    load_s += time.perf_counter() - t

    # 3. Train, scoring the dev set as it goes (selection.py) ----------------------------------------------------
    tracker = Tracker(cfg.track, run.path, {**to_dict(cfg), "data_summary": {k: v for k, v in summary.items()
                                                                         if k not in ("invalid_examples", "dev")}},
                      is_main=dist.is_main())
    trainer = None

    def save_weights(folder):  # every process calls it: under FSDP each holds a shard of every weight
        state_dict = (full_state_dict(trainer.model, trainable_only=cfg.lora.method != "full")
                      if trainer.is_fsdp_enabled else None)
        if folder is not None:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(folder, state_dict=state_dict,
                                                                           safe_serialization=True)

    lexical = None
    if cfg.eval.hybrid or cfg.eval.shortlist:  # before the dev set is scored: the hybrid is fitted on its scores
        dist.on_main(lambda: fit_lexical(cfg, run, tokenizer, summary, progress))
        lexical = run.load_lexical()
    dev_file = run.dev_file(cfg)
    dev = None
    if dev_file is not None:
        dev_rows, _ = read_rows(dev_file, cfg.data)  # all of it: data.max_eval_rows limits the test file only
        dev = DevEvaluator(model, tokenizer, dev_rows, cfg, run, save_weights, lexical=lexical)
        log.info("dev set: %d rows from %s, selecting on %s", len(dev_rows), dev_file, cfg.train.select_best)
    sampler = token_budget_sampler(cfg, dataset["length"])
    if sampler is not None:
        log.info("train.batch_tokens=%d replaces train.batch_size (%d rows): %s", cfg.train.batch_tokens,
                 cfg.train.batch_size, plan(cfg, sampler=sampler))
    timer = StepTimer()
    trainer = build_trainer(model, tokenizer, dataset, args, callbacks=[
        timer, JsonlLogCallback(run.train_log, echo=dist.is_main()), *tracker.callbacks,
        *(callbacks or [])], packing=cfg.train.packing, dev=dev, batch_sampler=sampler,
        skip_nonfinite=cfg.train.skip_nonfinite_steps, pad_multiple=graph_padding(cfg),
        **({"collator": seqcls.LabelCollator(tokenizer.pad_token_id), "loss": seqcls.LabelLoss(
            None if weights is None else torch.tensor([weights[l] for l in labels]))} if seq_cls else {}))
    checkpoint = _last_checkpoint(run) if resume else None
    if resume and checkpoint is None:
        log.warning("no checkpoint in %s; starting from the beginning", run.checkpoints)
    resumed_step = run.checkpoint_steps()[-1] if checkpoint else 0
    if checkpoint and dist.is_main():
        trim_log(run.train_log, resumed_step)  # the steps after the checkpoint are logged again
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    timer.start()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - t0
    fsdp_loading(cfg, False)

    # 4. Save (rank 0 only) ---------------------------------------------------------------------------------
    out = {
        "global_step": trainer.state.global_step,
        # the Trainer's figure covers the steps this process trained; after --resume, the whole run's is joined
        # from the losses logged before the checkpoint (reporting.track.whole_run_loss)
        "train_loss": (whole_run_loss(trainer.state.log_history, resumed_step, result.training_loss,
                                      trainer.state.global_step) if checkpoint else result.training_loss),
        **({"train_loss_resumed_part": result.training_loss} if checkpoint else {}),
        "final_logged_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "wall_s": round(wall, 2), "resumed_from": checkpoint, **params,
        "rows": summary["rows"], **({"examples": len(dataset)} if summary.get("windows") else {}),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_s": round(trainer.state.num_input_tokens_seen / wall, 1) if wall > 0 else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        "world_size": args.world_size, "fsdp": cfg.train.fsdp,
        "skipped_steps": next(c.skipped for c in trainer.callback_handler.callbacks if isinstance(c, FiniteLoss)),
        "warmup": warmup_split(started, t_start, load_s, encode_s, t0, timer, cfg.train.compile),
        # train.cuda_graphs: graphs recorded in this process (a stack's forward and backward per padded length)
        **({"cuda_graphs_recorded": cuda_graphs_recorded()} if cfg.train.cuda_graphs else {}),
        "environment": environment(),
    }
    if args.world_size > 1:
        out["peak_mem_gib_per_process"] = dist.all_gather(out["peak_mem_gib"])
    selection = dev.selection(trainer.state.global_step) if dev is not None else None
    out["selection"] = selection
    out["class_weights"] = weights
    target = run.model if cfg.lora.method == "full" else run.adapter
    from_best = selection is not None and selection["source"] == "best"
    if dist.is_main():
        with atomic_dir(target, exists="replace") as tmp:
            if from_best:  # the run's weights are the best dev evaluation's
                shutil.copytree(run.best, tmp, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns(run.best_record.name))
            else:
                save_weights(tmp)
        if from_best and cfg.train.keep_last:
            with atomic_dir(run.last, exists="replace") as tmp:
                save_weights(tmp)
        with atomic_dir(run.tokenizer, exists="replace") as tmp:
            tokenizer.save_pretrained(tmp)
    elif not from_best or cfg.train.keep_last:
        save_weights(None)  # FSDP: the shards of the other processes take part in gathering the weights
    if dev is not None and dist.is_main():
        out["calibration"] = fit_and_save(run, cfg, dev.rows, dev.best_preds if from_best else dev.last_preds)
    if dist.is_main():
        atomic_write_json(run.train_summary, out)
        if out["warmup"]:
            log.info(split_line("training", out["warmup"]))
        tracker.log({"train/final_loss": out["train_loss"]}, step=trainer.state.global_step)
        if selection is not None:
            log.info("selected: step %d of %d (%s)", selection["step"], trainer.state.global_step,
                     selection["source"])
    tracker.finish()
    dist.barrier()  # nobody goes on (llmcls run evaluates next) before rank 0 has written the model
    if not keep_model:
        return out
    why = reuse_refused(cfg)
    if why is not None:
        log.info("the evaluations load the model again: %s", why)
        return out, None, tokenizer
    trainer.optimizer = trainer.lr_scheduler = None  # the optimizer and its states go (free_memory collects)
    trainer.accelerator.free_memory()
    trainer = dev = None
    return out, for_scoring(model, use_cache), tokenizer
