"""Issue 16 (items 2 and 7): ``llmcls run`` loads the base model once and evaluates with the model it trained (its
adapter weights swapped from the run directory, the adapter disabled for zero-shot), with the same metrics and
predictions as ``llmcls eval RUN`` after a fresh load."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from conftest import tiny_args
from test_selection import Scramble


class ScrambleFrom(Scramble):
    """Planted: the trainable weights are replaced by noise after every step from ``at`` on (after that step's dev
    evaluation), so no later step can learn its way back above the earlier ones."""

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step >= self.at:
            self.at = state.global_step
            super().on_step_end(args, state, control, model=model, **kw)

@pytest.fixture(autouse=True)
def _no_report_html(monkeypatch):
    """These tests compare metrics and predictions, never RUN/report.html (test_report.py and the browser test
    check it): the report each evaluation ends with (~1 s of matplotlib each, 14 here) is not drawn. Nothing
    here could fail on it anyway: a report that cannot be written is a logged warning, never a failed command."""
    import llmcls.reporting.report as report

    monkeypatch.setattr(report, "write_report", lambda runs, *a, **k: "(not drawn in test_oneload.py)")


# what depends on the machine or the moment, not on the weights
VOLATILE = {"wall_s", "rows_per_s", "peak_mem_gib", "environment", "warmup"}


def _count_loads(monkeypatch) -> list:
    """Every load of a base model (train.py binds load_model at import; load_trained and seqcls.load import it
    when called)."""
    import llmcls.model.load as load
    import llmcls.recipes.train as train

    calls, real = [], load.load_model

    def counted(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("path"))
        return real(*args, **kwargs)

    monkeypatch.setattr(load, "load_model", counted)
    monkeypatch.setattr(train, "load_model", counted)
    return calls


def _config(data, out, **extra):
    from llmcls.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", *tiny_args(data["train"], data["test"], out, **{
        "lora.method": "lora", "lora.dropout": 0.1, "train.lr": 5e-3, "train.max_steps": 24, "train.save_steps": 1000,
        "train.packing": "true", "data.dev_fraction": 0.25, "eval.every_steps": 4, "train.select_best": "macro_f1",
        "train.select_confidence": 0.0, "train.keep_last": "true", "calibration.method": "temperature",
        "eval.zero_shot": "true", **extra})])
    return config_from_args(args)


def _same(a: dict, b: dict, path: str = "") -> None:
    """Equal, floats to 1e-6."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-6, nan_ok=True), path
    else:
        assert a == b, path


def _results(folder) -> tuple[dict, list[dict]]:
    m = json.loads((folder / "metrics.json").read_text())
    preds = [json.loads(l) for l in (folder / "predictions.jsonl").read_text().splitlines()]
    return {k: v for k, v in m.items() if k not in VOLATILE}, preds


@pytest.mark.parametrize("task", [
    {},  # the generative recipe, rows packed in training (packed attention must not outlive it)
    # a head in modules_to_save; zero-shot: the initial head. 24 steps do not teach it the task, so a scrambled
    # model can win on dev macro-F1 by chance; its NLL cannot
    {"lora.task": "seq_cls", "train.packing": "false", "train.select_best": "nll"},
], ids=["generate", "seq_cls"])
def test_run_loads_the_base_once_and_scores_as_a_fresh_load(task, tmp_path, tokenizer_dir, learnable_data,
                                                            monkeypatch, caplog):
    from llmcls.cli import main
    from llmcls.recipes.pipeline import run

    out = tmp_path / "run"
    cfg = _config(learnable_data, out, **task)
    loads = _count_loads(monkeypatch)
    with caplog.at_level(logging.INFO, logger="llmcls"):
        run(cfg, with_baseline=False, echo=lambda _: None, callbacks=[ScrambleFrom(at=20)])
    assert len(loads) == 1  # training's; the three evaluations reused it
    assert "evaluating with the trained model in memory (no reload)" in caplog.messages
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["selection"]["source"] == "best" and summary["selection"]["step"] < 24  # the planted drop
    assert (out / "last" / "adapter_model.safetensors").is_file() and (out / "calibration.json").is_file()

    one_load = {}
    for name in ("eval", "eval-last", "zero-shot"):
        one_load[name] = _results(out / name)
        shutil.rmtree(out / name)
    # the old path: a fresh load of the base (and of the adapter) for each, as 'llmcls eval RUN' does
    for args, name in (([], "eval"), (["--weights", "last"], "eval-last"), (["--zero-shot"], "zero-shot")):
        assert main(["eval", str(out), "--json", *args]) == 0
        m, preds = _results(out / name)
        _same(one_load[name][0], m, name)
        _same(one_load[name][1], preds, name)
    assert len(loads) == 4
    # three different models were scored: the selected step, the scrambled last one and the base
    probs = {n: [p["probs"] for p in one_load[n][1]] for n in one_load}
    assert probs["eval"] != probs["eval-last"] and probs["eval"] != probs["zero-shot"]
    assert one_load["eval"][0]["calibration"]["method"] == "temperature"


def test_full_fine_tunes_load_again(tmp_path, tokenizer_dir, small_data, monkeypatch, caplog):
    """lora.method full trained the base's own weights: the zero-shot base needs its own load (the old path)."""
    from llmcls.recipes.pipeline import run

    out = tmp_path / "run"
    cfg = _config(small_data, out, **{"lora.method": "full", "train.max_steps": 2, "train.packing": "false",
                                      "data.dev_fraction": 0, "train.select_best": "last", "eval.every_steps": 0})
    loads = _count_loads(monkeypatch)
    with caplog.at_level(logging.INFO, logger="llmcls"):
        run(cfg, with_baseline=False, echo=lambda _: None)
    assert len(loads) == 3  # training, the fine-tuned weights, the zero-shot base
    assert any("load the model again: lora.method=full" in m for m in caplog.messages)


def test_for_scoring_leaves_nothing_of_training(model_factory):
    """Eval mode, frozen, no gradients, no recomputation, no input hook, use_cache as loaded; compiled layers are
    left compiled, and reuse is refused where eval would want them plain (train.compile without eval.compile)."""
    from llmcls.config import load_config
    from llmcls.model.compiling import compile_layers
    from llmcls.trainer import _CHECKPOINTING, for_scoring, prepare_for_training, reuse_refused

    model = model_factory()
    cfg = load_config(None, {"lora.method": "lora", "train.gradient_checkpointing": "true"})
    peft = prepare_for_training(model, cfg)
    model.enable_input_require_grads()
    getattr(model, f"{_CHECKPOINTING}_enable")()
    compile_layers(peft, backend="eager")
    peft.train()
    peft(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    for_scoring(peft, use_cache=True)
    assert not any(m.training for m in peft.modules())
    assert not any(p.requires_grad or p.grad is not None for p in peft.parameters())
    assert not getattr(model, f"is_{_CHECKPOINTING}") and not getattr(model, "_require_grads_hooks", [])
    assert model.config.use_cache is True
    assert reuse_refused(load_config(None, {"train.compile": "true", "eval.compile": "false"})).startswith(
        "train.compile without eval.compile")
    assert reuse_refused(load_config(None, {"train.compile": "true", "eval.compile": "true"})) is None


def test_merged_scoring_is_last_in_run_and_agrees_with_the_attached_adapter(tmp_path, tokenizer_dir, learnable_data,
                                                                            monkeypatch):
    """eval.merge_lora: ``llmcls run`` scores the zero-shot base and the last step first, with the adapter attached,
    and merges the selected adapter for the last evaluation (a merge is never undone), so those two equal fresh
    loads exactly; the merged scores equal the attached adapter's to float32 rounding, and the fresh load of
    ``llmcls eval`` merges too (no LoRA modules left)."""
    from peft.tuners.tuners_utils import BaseTuner

    from llmcls.cli import main
    from llmcls.recipes.pipeline import run
    from llmcls.rundir import RunDir, load_trained

    out = tmp_path / "run"
    # 12 steps, the selection among steps 4 and 8, the weights scrambled from step 8 on: the last step differs
    cfg = _config(learnable_data, out, **{"eval.merge_lora": "true", "train.max_steps": 12})
    loads, merges = _count_loads(monkeypatch), []
    real_merge = BaseTuner.merge_adapter
    monkeypatch.setattr(BaseTuner, "merge_adapter",
                        lambda self, *a, **k: (merges.append(self.active_adapter), real_merge(self, *a, **k))[1])
    run(cfg, with_baseline=False, echo=lambda _: None, callbacks=[ScrambleFrom(at=8)])
    assert len(loads) == 1 and merges == ["llmcls_selected"]
    assert json.loads((out / "train_summary.json").read_text())["selection"]["step"] < 12
    in_run = {name: _results(out / name) for name in ("eval", "eval-last", "zero-shot")}
    # a fresh load follows the run's config and merges; the last step's weights were scored attached in the run
    for args, name in ((["--eval.merge_lora", "false"], "eval"), (["--weights", "last", "--eval.merge_lora", "false"],
                                                                  "eval-last"), (["--zero-shot"], "zero-shot")):
        shutil.rmtree(out / name)
        assert main(["eval", str(out), "--json", *args]) == 0
        m, preds = _results(out / name)
        if name != "eval":  # scored before the merge, with the adapter attached: bit for bit a fresh load's
            _same(in_run[name][0], m, name)
            _same(in_run[name][1], preds, name)
            continue
        assert [p["pred"] for p in preds] == [p["pred"] for p in in_run[name][1]]
        merged = torch.tensor([v for p in in_run[name][1] for v in p["probs"].values()])
        attached = torch.tensor([v for p in preds for v in p["probs"].values()])
        assert (merged - attached).abs().max() <= 1e-4  # the same model, to the 4 digits predictions keep
    model, _, _ = load_trained(out)  # the run's config merges
    assert not any("lora_" in n for n, _ in model.named_parameters())
    model, _, _ = load_trained(out, RunDir(out).load_config({"eval.merge_lora": False}))
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_scoring_keeps_the_adapter_in_the_dtype_it_trained_in(tmp_path, tokenizer_dir, small_data):
    """PEFT's loader casts a bf16 adapter to float32 unless told not to: scoring would then run arithmetic training
    never ran, and copy each adapter's input to float32. The adapter stays in the base's dtype unless lora.dtype
    is float32, for a fresh load and for the model ``llmcls run`` keeps in memory; merging refuses a quantised
    base."""
    from llmcls.config import ConfigError
    from llmcls.recipes.pipeline import run
    from llmcls.rundir import RunDir, TrainedInMemory, load_trained

    out = tmp_path / "run"
    cfg = _config(small_data, out, **{"train.max_steps": 2, "data.dev_fraction": 0, "train.select_best": "last",
                                      "eval.every_steps": 0, "eval.zero_shot": "false", "train.keep_last": "false"})
    run(cfg, with_baseline=False, echo=lambda _: None)
    for lora_dtype, want in (("auto", torch.bfloat16), ("float32", torch.float32)):
        over = RunDir(out).load_config({"model.dtype": "bfloat16", "lora.dtype": lora_dtype})
        model, tok, _ = load_trained(out, over)
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {want}
        # the name the model in memory gives it: the parameters' paths, and so the compile cache's keys, match
        assert list(model.peft_config) == ["llmcls_selected"]
        memory = TrainedInMemory(model, tok, out, over)
        with memory.weights("selected") as (scored, _):
            assert {p.dtype for n, p in scored.named_parameters() if "lora_" in n} == {want}
    with pytest.raises(ConfigError, match="eval.merge_lora with model.quantize=nf4"):
        load_trained(out, RunDir(out).load_config({"eval.merge_lora": True, "model.quantize": "nf4"}))
