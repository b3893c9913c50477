"""train.batch_tokens: micro-batches filled up to a token budget (llmcls.batching), wired into the Trainer."""

import json
import random

import pytest
from transformers import TrainerCallback

from llmcls.batching import TokenBudgetSampler
from llmcls.config import ConfigError, check_launch, check_training, load_config
from llmcls.recipes.prepare import load_encoded
from llmcls.recipes.train import plan, train


def _lengths(n=200, seed=0):
    r = random.Random(seed)
    return [r.randint(5, 120) for _ in range(n)] + [300, 450]  # two rows longer than the budget


@pytest.mark.parametrize("grouped", [False, True])
def test_every_row_once_within_budget_and_seeded(grouped):
    lengths = _lengths()
    s = TokenBudgetSampler(lengths, 256, seed=3, group_by_length=grouped, epochs=3, grad_accum=2)
    orders = []
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)  # the same count every epoch: the Trainer sizes an epoch once
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert sum(lengths[i] for i in b) <= 256 or len(b) == 1
        orders.append(batches)
    assert orders[0] != orders[1]  # a new order each epoch
    again = TokenBudgetSampler(lengths, 256, seed=3, group_by_length=grouped, epochs=3, grad_accum=2)
    again.set_epoch(1)
    assert list(again) == orders[1]  # deterministic under the seed
    other = TokenBudgetSampler(lengths, 256, seed=4, group_by_length=grouped, epochs=3, grad_accum=2)
    assert list(other) != orders[0]
    # a bigger budget: fewer, larger micro-batches
    assert len(TokenBudgetSampler(lengths, 1024, seed=3, epochs=3)) < len(s)


def _cfg(data, out, **extra):
    opts = {"model.name_or_path": "tiny", "data.train_file": str(data["train"]),
            "data.test_file": str(data["test"]), "data.max_length": 128, "lora.method": "lora", "lora.r": "4",
            "train.output_dir": str(out), "train.epochs": "2", "train.batch_tokens": "400",
            "train.packing": "true", "train.grad_accum": "2", "train.logging_steps": "1", "train.save_steps": "0",
            "train.gradient_checkpointing": "false", "train.seed": "0", "track.tracker": "none"}
    opts.update(extra)
    return load_config(None, opts)


def test_refusals(learnable_data, tmp_path):
    with pytest.raises(ConfigError, match="batch_tokens=400 needs train.packing"):
        check_training(_cfg(learnable_data, tmp_path, **{"train.packing": "false"}))
    with pytest.raises(ConfigError, match="batch_tokens with 2 processes"):
        check_launch(_cfg(learnable_data, tmp_path), world_size=2)
    with pytest.raises(ConfigError, match="batch_tokens"):
        _cfg(learnable_data, tmp_path, **{"train.batch_tokens": "0"})


def test_dry_run_plan_without_lengths(learnable_data, tmp_path):
    p = plan(_cfg(learnable_data, tmp_path), rows=100)
    assert "total_steps" not in p and "token lengths" in p["note"]


def test_tiny_run_steps_equal_plan(tokenizer_dir, learnable_data, tmp_path, caplog, monkeypatch):
    cfg = _cfg(learnable_data, tmp_path / "run", **{"train.group_by_length": "true", "data.max_train_rows": "120"})
    epochs, iters = [], []
    monkeypatch.setattr(TokenBudgetSampler, "set_epoch", lambda self, e: (epochs.append(e), setattr(self, "epoch", e)))
    real_iter = TokenBudgetSampler.__iter__
    monkeypatch.setattr(TokenBudgetSampler, "__iter__", lambda self: (iters.append(self.epoch), real_iter(self))[1])
    caplog.set_level("INFO", logger="llmcls.recipes.train")
    out = train(cfg, progress=False)
    lengths = load_encoded(tmp_path / "run" / "data")["length"]
    assert any("replaces train.batch_size" in r.getMessage() for r in caplog.records)
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = max(h.get("step", 0) for h in logged)
    p = next(r for r in caplog.records if "replaces train.batch_size" in r.getMessage()).args[2]
    assert out["global_step"] == steps == p["total_steps"] == 2 * p["steps_per_epoch"]
    assert iters == [0, 1] and 1 in epochs  # the Trainer reaches the sampler's epoch: a new order each epoch
    assert p["mean_rows_per_micro_batch"] > 4  # more rows than the default batch_size of a tiny budget
    if lengths is not None:
        from llmcls.trainer import token_budget_sampler

        assert plan(cfg, sampler=token_budget_sampler(cfg, lengths))["total_steps"] == steps


class _Crash(TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated crash")


def test_resume_mid_epoch_matches_uninterrupted(tokenizer_dir, learnable_data, tmp_path):
    """A resumed run skips the micro-batches already trained in its epoch, in the same token-budget order."""
    half = {"data.max_train_rows": "120"}  # half the rows: still several steps an epoch, a third of the time
    a = train(_cfg(learnable_data, tmp_path / "a", **half), progress=False)
    steps = a["global_step"]
    per_epoch = steps // 2
    assert per_epoch >= 3
    save = per_epoch + 1  # a checkpoint inside the second epoch
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(learnable_data, tmp_path / "b", **{"train.save_steps": str(save), **half}), progress=False,
              callbacks=[_Crash(save + 1)])
    b = train(_cfg(learnable_data, tmp_path / "b", **{"train.save_steps": str(save), **half}), resume=True,
              progress=False)
    assert b["resumed_from"].endswith(f"checkpoint-{save}")
    assert b["global_step"] == steps and b["tokens_seen"] == a["tokens_seen"]
    assert abs(b["final_logged_loss"] - a["final_logged_loss"]) < 1e-5
