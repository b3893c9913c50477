"""``--dry-run`` of ``llmcls train`` / ``run``: the resolved config and the optimizer steps the run will take, with
nothing loaded or downloaded. Apart from ``llmcls.recipes.train`` (which logs the same plan once the data is
tokenised) so that a dry run imports no model library: a fraction of a second instead of the seconds torch,
transformers and peft take to import."""

from __future__ import annotations

import math
from pathlib import Path

from llmcls import dist
from llmcls.config import Config, to_dict


def plan(cfg: Config, rows: int | None = None, sampler=None) -> dict:
    """Optimizer steps the run will take (for --dry-run), from the row count when known. With
    ``train.batch_tokens`` the micro-batches follow from the rows' token lengths: counted by the run's
    :class:`llmcls.batching.TokenBudgetSampler` (built once the data is tokenised; ``train`` logs this plan then),
    and without it the steps are left out."""
    world = dist.world_size()
    t = cfg.train
    if t.batch_tokens is not None:
        out = {"tokens_per_micro_batch": t.batch_tokens, "micro_batches_per_optimizer_step": t.grad_accum,
               "world_size": world}
        if sampler is None:
            if rows is not None:
                out.update(rows=rows, note="train.batch_tokens: the steps follow from the rows' token lengths, "
                                           "counted once the data is tokenised (the training log states them)")
            return out
        per_epoch, rows = len(sampler), len(sampler.lengths)
        out.update(micro_batches_per_epoch=per_epoch, mean_rows_per_micro_batch=round(rows / per_epoch, 2))
    else:
        out = {"rows_per_optimizer_step": t.batch_size * t.grad_accum * world, "world_size": world}
        per_epoch = math.ceil(rows / (t.batch_size * world)) if rows is not None else None
    if rows is not None:
        steps_per_epoch = math.ceil(per_epoch / t.grad_accum)
        total = t.max_steps if t.max_steps > 0 else math.ceil(steps_per_epoch * t.epochs)
        out.update(rows=rows, steps_per_epoch=steps_per_epoch, total_steps=total,
                   checkpoints=total // t.save_steps if t.save_steps > 0 else 0)
        if t.long_text_windows == "all" and sampler is None:  # the windows are counted only once tokenised
            out["note"] = ("train.long_text_windows=all: one example per window of a long text, so more steps than "
                           "planned from rows ('llmcls prepare' counts the examples)")
    return out


def dry_run(cfg: Config) -> str:
    """The resolved config and the plan (``--dry-run``): nothing is loaded or downloaded."""
    import yaml

    from llmcls.data import iter_rows, split_dev

    rows = None
    if cfg.data.train_file and Path(cfg.data.train_file).is_file():
        invalid: list = []
        read = list(iter_rows(cfg.data.train_file, cfg.data, on_invalid="skip", invalid=invalid))
        read = read[:cfg.data.max_train_rows] if cfg.data.max_train_rows else read
        if cfg.data.dev_fraction > 0:  # the rows the dev split takes out are not trained on
            read, _ = split_dev(read, cfg.data.dev_fraction, cfg.data.split_seed)
        rows = sum(len(r.true_labels) for r in read)  # training examples: one per true label (multi-label rows)
    return (yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
            + "# plan (nothing was loaded or downloaded)\n" + yaml.safe_dump({"plan": plan(cfg, rows)}, sort_keys=False))
