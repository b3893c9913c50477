"""Training: LoRA weights change while the base stays frozen; a resumed run ends where an uninterrupted one does."""

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from llmcls.config import load_config
from llmcls.recipes.train import RunExists, train


def lora_cfg(data, out, **extra):
    opts = {"model.name_or_path": "tiny", "data.train_file": str(data["train"]), "data.test_file": str(data["test"]),
            "data.max_length": 128, "lora.method": "lora", "lora.r": "4", "train.output_dir": str(out),
            "train.max_steps": "8", "train.batch_size": "8", "train.grad_accum": "2", "train.lr": "1e-2",
            "train.logging_steps": "1", "train.save_steps": "4", "train.gradient_checkpointing": "true",
            "train.seed": "0", "track.tracker": "none"}
    opts.update(extra)
    return load_config(None, opts)


class Snapshot(TrainerCallback):
    def __init__(self):
        self.before, self.after, self.grad = {}, {}, {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.grad = {n: p.requires_grad for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kw):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lora_changes_adapters_and_freezes_base(tokenizer_dir, learnable_data, tmp_path):
    snap = Snapshot()
    out = train(lora_cfg(learnable_data, tmp_path / "run"), progress=False, callbacks=[snap])
    lora = [n for n in snap.before if "lora_" in n]
    base = [n for n in snap.before if "lora_" not in n]
    assert len(lora) == 2 * 7 * 2  # A and B on 7 projections in 2 layers
    assert all(snap.grad[n] for n in lora) and not any(snap.grad[n] for n in base)
    for n in lora:
        if "lora_B" in n:  # B starts at zero; any change means it trained
            assert snap.before[n].abs().max() == 0 and snap.after[n].abs().max() > 0, n
        else:
            assert not torch.equal(snap.before[n], snap.after[n]), n
    for n in base:
        assert torch.equal(snap.before[n], snap.after[n]), n
    assert out["trainable"] < 0.05 * out["parameters"]
    run = tmp_path / "run"
    from safetensors.torch import load_file

    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "tokenizer").is_dir()
    with pytest.raises(RunExists):  # never silently overwrite a finished run
        train(lora_cfg(learnable_data, run), progress=False)


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 6:
            raise KeyboardInterrupt("simulated crash")


def test_resume_matches_uninterrupted(tokenizer_dir, learnable_data, tmp_path):
    full = train(lora_cfg(learnable_data, tmp_path / "a"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(lora_cfg(learnable_data, tmp_path / "b"), progress=False, callbacks=[Crash()])
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-4").is_dir()
    assert not (tmp_path / "b" / "adapter").exists()
    resumed = train(lora_cfg(learnable_data, tmp_path / "b"), resume=True, progress=False)
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert resumed["global_step"] == full["global_step"] == 8
    assert abs(resumed["final_logged_loss"] - full["final_logged_loss"]) < 1e-5
    assert resumed["tokens_seen"] == full["tokens_seen"] > 0  # the count carries over from the checkpoint
    # the log holds each step once (step 5 was logged before the crash and again after the resume), and the
    # summary's loss is the whole run's, not only the resumed part's
    import json

    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 9))
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-4)
    assert resumed["train_loss_resumed_part"] != pytest.approx(full["train_loss"], rel=1e-4)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_prepare_switches_off_recomputation_left_on_by_an_earlier_run(model_factory):
    """The Trainer only ever switches gradient checkpointing on; a model trained before with it (the tutorial's
    recipe in the same process) must not keep recomputing when this run's config says no."""
    from llmcls.trainer import _CHECKPOINTING, prepare_for_training

    model = model_factory()
    getattr(model, f"{_CHECKPOINTING}_enable")(**{f"{_CHECKPOINTING}_kwargs": {"use_reentrant": False}})
    layers = model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    off = load_config(None, {"model.name_or_path": "tiny", "train.gradient_checkpointing": "false"})
    peft_model = prepare_for_training(model, off)
    assert not any(layer.gradient_checkpointing for layer in layers)
    assert not getattr(peft_model.get_base_model(), f"is_{_CHECKPOINTING}")
    # and the reverse is the Trainer's job: prepare leaves a model that should recompute as it is
    getattr(model, f"{_CHECKPOINTING}_enable")(**{f"{_CHECKPOINTING}_kwargs": {"use_reentrant": False}})
    on = load_config(None, {"model.name_or_path": "tiny", "train.gradient_checkpointing": "true"})
    prepare_for_training(peft_model.unload(), on)
    assert all(layer.gradient_checkpointing for layer in layers)


def test_token_count_is_the_real_tokens_fed_and_is_published_at_log_steps(tokenizer, model_factory, tmp_path):
    """TokenCounter (no per-step GPU read) counts what the Trainer's own non-padding count would: every token of
    every row, padding excluded, once per epoch; in the log at every logging step."""
    from llmcls.config import LoraConfig
    from llmcls.model.load import add_lora
    from llmcls.trainer import build_trainer, training_arguments

    torch.manual_seed(0)
    lengths = [5, 17, 9, 30, 12, 7, 21]  # 7 rows, batch 2: 4 micro-batches per epoch, padded differently
    rows = [{"input_ids": torch.randint(10, 1000, (n,)).tolist(), "labels": [-100] * (n - 2) + [11, 12]}
            for n in lengths]
    cfg = load_config(None, {"model.name_or_path": "tiny", "train.batch_size": "2", "train.grad_accum": "1",
                             "train.epochs": "2", "train.logging_steps": "1", "train.save_steps": "0",
                             "track.tracker": "none"})
    model = add_lora(model_factory(), LoraConfig(dropout=0.0))
    logged = []

    class AtLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logged.append(state.num_input_tokens_seen)

    trainer = build_trainer(model, tokenizer, rows, training_arguments(cfg, tmp_path, progress=False),
                            callbacks=[AtLog()])
    trainer.train()
    assert trainer.state.num_input_tokens_seen == 2 * sum(lengths)
    # published before every log (one per step here): the count rises at each of the 8 steps, to the total
    steps = logged[:-1]  # the last log is the Trainer's closing summary
    assert len(steps) == 8 and all(a < b for a, b in zip(steps, steps[1:])) and steps[-1] == 2 * sum(lengths)
    assert steps[3] == sum(lengths)  # one epoch: every row once
    assert not model._forward_pre_hooks  # the counting hook is gone after training


@pytest.mark.slow  # a 4-bit training run and an export: the second tier keeps the default one under 8 minutes on 2 cores
def test_qlora_trains_adapters_on_a_frozen_4bit_base_and_exports_unquantised(tokenizer_dir, learnable_data,
                                                                             tmp_path):
    """model.quantize=nf4: the base's projections are bitsandbytes 4-bit and stay bit-identical, the adapters
    learn, the run evaluates through the same quantised base, and export merges into the full-precision base."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from llmcls.recipes.evaluate import evaluate
    from llmcls.recipes.export import export
    from llmcls.model.load import trainable_summary

    seen = {}

    class Inspect(Snapshot):
        def on_train_begin(self, args, state, control, model=None, **kw):
            super().on_train_begin(args, state, control, model=model, **kw)
            seen["q_proj"] = type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer)
            seen["summary"] = trainable_summary(model)

    snap = Inspect()
    run = tmp_path / "run"
    one = {"train.grad_accum": "1"}  # 8 rows a step: half the 4-bit forwards and backwards of the default 2
    out = train(lora_cfg(learnable_data, run, **{"model.quantize": "nf4", **one}), progress=False, callbacks=[snap])
    assert seen["q_proj"] is bnb.nn.Linear4bit
    packed = [n for n in snap.before if "base_layer.weight" in n and "proj" in n]
    assert len(packed) == 2 * 7 and all(snap.before[n].dtype == torch.uint8 for n in packed)
    for n in packed:  # the 4-bit base is frozen: its packed bytes do not change
        assert torch.equal(snap.before[n], snap.after[n]), n
    lora_b = [n for n in snap.before if "lora_B" in n]
    assert len(lora_b) == 2 * 7 and all(snap.after[n].abs().max() > 0 for n in lora_b)
    # the unpacked size is reported, not the bytes: the same count as the unquantised tiny model
    plain = train(lora_cfg(learnable_data, tmp_path / "plain", **{"train.max_steps": "1", **one}), progress=False)
    assert out["parameters"] == plain["parameters"] == seen["summary"]["parameters"]
    assert out["train_loss"] < plain["train_loss"]  # 8 steps of learning against 1

    metrics = evaluate(run, progress=False)  # loads the base in 4-bit again, applies the adapter
    assert metrics["rows"] > 0 and 0 <= metrics["accuracy"] <= 1
    meta = export(run, tmp_path / "export")
    assert meta["source"]["base_quantized_in_training"] == "nf4"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not getattr(merged, "is_quantized", False)


def test_quantize_without_bitsandbytes_says_what_to_install(monkeypatch):
    import sys

    from llmcls.config import ConfigError
    from llmcls.model.load import quantization_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'llmcls\[qlora\]'"):
        quantization_config("nf4", torch.bfloat16)
    assert quantization_config("none", torch.bfloat16) is None


class FailAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        raise ValueError("simulated bad setting")


def test_a_failed_start_does_not_block_the_retry(tokenizer_dir, learnable_data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="simulated"):
        train(lora_cfg(learnable_data, run), progress=False, callbacks=[FailAtStart()])
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True, exist_ok=True)  # half saved: no trainer state
    (run / ".adapter.999999999.abcdefgh.tmp").mkdir()  # a killed writer's temporary folder
    short = {"train.max_steps": "2", "train.save_steps": "2"}
    out = train(lora_cfg(learnable_data, run, **short), progress=False)  # no RunExists: that was no run
    assert out["global_step"] == 2 and out["resumed_from"] is None
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(RunExists):  # a finished run is still refused
        train(lora_cfg(learnable_data, run, **short), progress=False)


def test_a_non_finite_loss_stops_training_naming_the_step_and_the_checkpoint(tmp_path):
    """The Trainer would train on after a NaN (every weight NaN after the next clipped step); llmcls stops at the
    first logged non-finite loss or gradient norm and names the last checkpoint saved before it."""
    from transformers import TrainerControl, TrainerState

    from llmcls.trainer import FiniteLoss, TrainingDiverged

    for step in (100, 200, 300):
        (tmp_path / f"checkpoint-{step}").mkdir()
    cb, state, control = FiniteLoss(tmp_path), TrainerState(), TrainerControl()
    for step, logs in ((250, {"loss": 0.02, "grad_norm": 0.5}), (260, {"loss": "0.01", "grad_norm": "3.1"}),
                       (265, {"eval_accuracy": 0.9})):
        state.global_step = step
        cb.on_log(None, state, control, logs=logs)  # finite (also as the strings some releases log): no error
    state.global_step = 270
    with pytest.raises(TrainingDiverged, match=r"step 270: loss nan.*step 260.*checkpoint of step 200"):
        cb.on_log(None, state, control, logs={"loss": float("nan"), "grad_norm": 1.0})
    state.global_step = 10
    with pytest.raises(TrainingDiverged, match="grad_norm inf.*no checkpoint predates it"):
        FiniteLoss(tmp_path).on_log(None, state, control, logs={"loss": 1.0, "grad_norm": float("inf")})


class NanAtStep(TrainerCallback):
    """Makes one LoRA weight's gradient NaN in every backward of optimizer step ``step`` (a hook on the weight:
    it runs before any callback sees the step) and snapshots the trainable weights at each step's end."""

    def __init__(self, step: int):
        self.step, self.calls, self.at = step, 0, {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        p = next(p for n, p in model.named_parameters() if "lora_A" in n)

        def hook(grad):
            self.calls += 1
            in_step = (self.calls - 1) // args.gradient_accumulation_steps + 1
            return grad * float("nan") if in_step == self.step else grad
        p.register_hook(hook)
        self.at[0] = self._weights(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        self.at[state.global_step] = self._weights(model)

    @staticmethod
    def _weights(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_skip_nonfinite_steps_drops_that_steps_update_and_trains_on(tokenizer_dir, learnable_data, tmp_path):
    nan = NanAtStep(3)
    out = train(lora_cfg(learnable_data, tmp_path / "run", **{"train.skip_nonfinite_steps": "1"}), progress=False,
                callbacks=[nan])
    assert out["skipped_steps"] == [3] and out["global_step"] == 8
    before, at3, at4 = nan.at[2], nan.at[3], nan.at[4]
    assert all(torch.equal(before[n], at3[n]) for n in before)  # step 3 changed nothing
    assert any(not torch.equal(at3[n], at4[n]) for n in at3)    # step 4 trained again
    assert all(torch.isfinite(w).all() for w in nan.at[8].values())
    logged = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(float(x)) for x in losses)  # the NaN loss left out of the mean


def test_without_skip_a_nonfinite_gradient_stops_the_run_and_too_many_skips_stop_it_too(tokenizer_dir, learnable_data,
                                                                                       tmp_path):
    from llmcls.trainer import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="step 3: grad_norm nan"):  # the loss itself was finite
        train(lora_cfg(learnable_data, tmp_path / "a"), progress=False, callbacks=[NanAtStep(3)])

    class NanFrom(NanAtStep):  # steps 2 and on: more than one skip allowed
        def on_train_begin(self, args, state, control, model=None, **kw):
            p = next(p for n, p in model.named_parameters() if "lora_A" in n)
            p.register_hook(lambda g: g * float("nan") if state.global_step >= 1 else g)

    with pytest.raises(TrainingDiverged, match=r"2 steps with non-finite gradients \(steps 2, 3\)"):
        train(lora_cfg(learnable_data, tmp_path / "b", **{"train.skip_nonfinite_steps": "1"}), progress=False,
              callbacks=[NanFrom(0)])
