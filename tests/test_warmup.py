"""Warm-up (issue 16): compiled layers compile one graph for all decoder layers and none again when the packed
length changes; the compile caches live in one persistent folder; train and eval record where the time before
their first step / batch went."""

import json
import os
import random

import pytest
import torch

from llmcls.collate import PackedCollator, answer_loss
from llmcls.config import load_config
from llmcls.model.attention import packed_rows
from llmcls.model.compiling import use_compile_cache


def packed_batch(rng: random.Random, rows: int) -> dict:
    feats = []
    for _ in range(rows):
        n = rng.randint(12, 90)
        ids = [rng.randrange(1000) for _ in range(n)]
        feats.append({"input_ids": ids, "labels": [-100] * (n - 3) + ids[-3:]})
    return PackedCollator()(feats)


def test_one_graph_for_all_layers_and_no_recompile_on_new_packed_lengths(model_factory, tmp_path, monkeypatch):
    """Dynamo's counters on a 4-layer tiny LoRA model trained on packed rows, made ready as train.compile does
    (prepare_for_training: one_graph_for_all_layers, then compile_layers) but with the ``eager`` backend: it counts
    dynamo's graphs and recompilations exactly as Inductor would get them, without generating code (Inductor on a
    CPU: ~30 s for this model). Four layers, one graph; six steps of packed sequences of six different lengths
    and row counts, no recompilation after the first step."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from llmcls.model.compiling import compile_layers
    from llmcls.trainer import one_graph_for_all_layers, prepare_for_training

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile"))  # nothing left in ~/.cache
    torch._dynamo.reset()
    counters.clear()
    cfg = load_config(overrides={"lora.method": "lora", "lora.r": 4, "train.gradient_checkpointing": False})
    model = prepare_for_training(model_factory(seed=3, layers=4), cfg)  # train.compile off: compiled below
    one_graph_for_all_layers(model)
    compile_layers(model, backend="eager")
    model.train()
    assert all(layer._compiled_call_impl is not None for layer in model.get_base_model().model.layers)
    rng = random.Random(0)
    lengths, graphs_after = [], []
    with packed_rows(model):
        for rows in (4, 3, 5, 2, 6, 3):
            batch = packed_batch(rng, rows)
            labels = batch.pop("labels")
            answer_loss(model(**batch), labels).backward()
            lengths.append(batch["input_ids"].shape[1])
            graphs_after.append(counters["stats"]["unique_graphs"])
    assert len(set(lengths)) == 6, lengths  # every step met a new packed length
    # one graph serves the 4 layers (the first layer's input made to require a gradient like the others'),
    # and no later step compiled anything
    assert graphs_after == [1] * 6, graphs_after
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])
    assert counters["frames"]["ok"] == 1
    torch._dynamo.reset()


def test_each_process_traces_the_layer_once_not_twice(model_factory, tmp_path, monkeypatch):
    """The layer's Python floats (norm eps, LoRA dropout p and scaling) traced as symbolic floats made dynamo restart
    the first compilation after AOTAutograd had traced it, in every process, so a warm compile cache still missed
    one AOTAutograd entry (H200: 48 s of the warm run's first step compiling). compile_layers specialises them:
    AOTAutograd runs once (``aot_eager``: AOTAutograd without Inductor's code generation)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from llmcls.model.compiling import compile_layers
    from llmcls.trainer import one_graph_for_all_layers, prepare_for_training

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile"))
    monkeypatch.setattr(torch._dynamo.config, "specialize_float", False)  # torch's default; compile_layers sets it
    torch._dynamo.reset()
    counters.clear()
    cfg = load_config(overrides={"lora.method": "lora", "lora.r": 4, "train.gradient_checkpointing": False})
    model = prepare_for_training(model_factory(seed=3, layers=2), cfg)
    one_graph_for_all_layers(model)
    compile_layers(model, backend="aot_eager")
    model.train()
    ids = torch.randint(0, 200, (2, 9))
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    assert counters["aot_autograd"]["total"] == 1, dict(counters["aot_autograd"])  # 2 when it restarts
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_without_the_input_gradient_the_first_layer_compiles_a_second_graph(model_factory, tmp_path, monkeypatch):
    """Why one_graph_for_all_layers exists: left alone, LoRA's frozen input table gives layer 0 an input without a
    gradient, and dynamo compiles a second graph for it (counted with the eager backend, as above)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from llmcls.config import LoraConfig
    from llmcls.model.compiling import compile_layers
    from llmcls.model.load import add_lora

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile"))
    torch._dynamo.reset()
    counters.clear()
    model = add_lora(model_factory(seed=3, layers=3), LoraConfig(method="lora", r=4, target_modules=["q_proj"]))
    model.config.use_cache = False
    model.train()
    compile_layers(model, backend="eager")
    batch = packed_batch(random.Random(1), rows=3)
    labels = batch.pop("labels")
    with packed_rows(model):
        answer_loss(model(**batch), labels).backward()
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_compile_cache_folder_precedence(tmp_path, monkeypatch):
    """An already-set TORCHINDUCTOR_CACHE_DIR wins; else model.compile_cache, else $LLMCLS_COMPILE_CACHE, else
    $LLMCLS_CACHE/compile (~/.cache/llmcls/compile); torch's local caches on, remote ones off."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("LLMCLS_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("LLMCLS_CACHE", str(tmp_path / "home-cache"))
    assert use_compile_cache() == tmp_path / "home-cache" / "compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "home-cache" / "compile")
    assert (tmp_path / "home-cache" / "compile").is_dir()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("LLMCLS_COMPILE_CACHE", str(tmp_path / "env"))
    assert use_compile_cache() == tmp_path / "env"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert use_compile_cache(str(tmp_path / "key")) == tmp_path / "key"
    # now set (by the call above, as a user would set it): it stays, whatever is asked
    assert use_compile_cache(str(tmp_path / "other")) == tmp_path / "key"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "key")
    assert inductor_config.fx_graph_cache is True and inductor_config.fx_graph_remote_cache is False
    assert inductor_config.autotune_local_cache is True and inductor_config.autotune_remote_cache is False
    assert functorch_config.enable_autograd_cache is True


def test_train_and_eval_record_the_warmup_split(tmp_path, tokenizer_dir, small_data, capsys):
    """A tiny LoRA run through the CLI (eager: compiling is a GPU lever): train_summary.json and eval/metrics.json
    carry the split, every part >= 0, the parts adding up to the time to the first step / batch, and the run
    prints one line for each."""
    from llmcls.cli import main

    from conftest import short_run_args

    out = tmp_path / "run"
    assert main(["run", *short_run_args(small_data["train"], small_data["test"], out, "lora", 4),
                 "--eval.batch_size", "4", "--no-baseline"]) == 0
    printed = capsys.readouterr().out
    w = json.loads((out / "train_summary.json").read_text())["warmup"]
    for k in ("start_s", "load_s", "encode_s", "setup_s", "first_step_s", "later_step_s", "to_first_step_s"):
        assert w[k] >= 0, (k, w)
    assert w["later_steps"] == 3  # 4 steps: the first, then 3 averaged
    parts = w["start_s"] + w["load_s"] + w["encode_s"] + w["setup_s"] + w["first_step_s"]
    assert abs(parts - w["to_first_step_s"]) < 0.01, w
    assert w["start_s"] > 0.5  # the interpreter's start and the imports of torch and transformers count
    assert w["first_step_compile"]["compile_s"] == 0 and w["compile_cache"] is None  # nothing compiled
    e = json.loads((out / "eval" / "metrics.json").read_text())
    ew = e["warmup"]
    for k in ("start_s", "load_s", "first_batch_s", "rest_s", "to_first_batch_s"):
        assert ew[k] >= 0, (k, ew)
    # 12 test rows in batches of 4: the first batch and two more; the classification's wall time is their sum
    assert abs(ew["first_batch_s"] + ew["rest_s"] - e["wall_s"]) < 0.01, (ew, e["wall_s"])
    # in `llmcls run` the evaluation starts after the training: its start is later than the first step
    assert ew["start_s"] > w["to_first_step_s"] and ew["to_first_batch_s"] >= ew["start_s"] + ew["load_s"]
    assert "training warm-up: start" in printed and "eval warm-up: start" in printed
    # `llmcls eval` in this process: the split of a separate evaluation, its load timed by the command
    assert main(["eval", str(out), "--eval.batch_size", "4"]) == 0
    assert "eval warm-up: start" in capsys.readouterr().out
    ew2 = json.loads((out / "eval" / "metrics.json").read_text())["warmup"]
    assert ew2["load_s"] > 0 and ew2["first_batch_s"] > 0 and ew2["compile"]["graphs"] == 0


def test_torch_s_own_default_in_the_variable_is_not_a_choice(tmp_path, monkeypatch):
    """Importing peft makes torch write its default (/tmp/torchinductor_USER) into TORCHINDUCTOR_CACHE_DIR; that
    must not keep llmcls's folder from being used."""
    from llmcls.model.compiling import _torch_default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", _torch_default_cache_dir())
    monkeypatch.setenv("LLMCLS_CACHE", str(tmp_path))
    monkeypatch.delenv("LLMCLS_COMPILE_CACHE", raising=False)
    assert use_compile_cache() == tmp_path / "compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile")


def _scored(model, builder, rows):
    from llmcls.infer import classify

    return classify(model, builder, rows, method="score", batch_size=4, progress=False)


def test_background_compile_scores_eagerly_then_switches_without_recompiling(model_factory, tokenizer, tmp_path,
                                                                               monkeypatch):
    """eval.compile_background on a 4-layer tiny LoRA model, dynamo's ``eager`` backend (its graphs and guards as
    Inductor would get them): the thread held back until the first batch has run eagerly, the next batch switches
    to the compiled layers, and the graph the thread compiled under the caller's modes serves every later call:
    one graph, no recompilation, no second frame. The scores, eager batch and compiled ones alike, equal the
    uncompiled model's (the eager backend generates no code)."""
    import sys
    import threading

    import torch._dynamo
    from torch._dynamo.utils import counters

    from conftest import learnable_rows
    from llmcls.data import Row
    from llmcls.encode import PromptBuilder
    from llmcls.model.compiling import compile_layers
    from llmcls.model.load import add_lora

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile"))
    torch._dynamo.reset()
    counters.clear()
    cfg = load_config(overrides={"lora.method": "lora", "lora.r": 4})
    model = add_lora(model_factory(seed=3, layers=4), cfg.lora).eval()
    builder = PromptBuilder(tokenizer, cfg.prompt)
    rows = [Row(r["text"], r["category"], r["output"]) for r in learnable_rows(16, seed=1)]
    plain = _scored(model, builder, rows)

    gate = threading.Event()
    handle = compile_layers(model, backend="eager", background=True)
    layers = model.get_base_model().model.layers
    compiled0 = handle.compiled[0]
    handle.compiled[0] = lambda *a, **k: (gate.wait(), compiled0(*a, **k))[1]  # the thread waits for the test
    interval = sys.getswitchinterval()
    first = _scored(model, builder, rows[:4])  # one batch: starts the thread, runs eagerly
    assert handle.thread is not None and handle.eager_calls == 1
    assert counters["stats"]["unique_graphs"] == 0
    assert sys.getswitchinterval() == pytest.approx(handle.SWITCH_INTERVAL_S)  # the caller gets the GIL back soon
    gate.set()
    handle.thread.join()
    assert sys.getswitchinterval() == interval
    assert handle.error is None, handle.error
    assert counters["stats"]["unique_graphs"] == 1
    background = _scored(model, builder, rows)  # the first layer call switches
    assert handle.switched and [layer._compiled_call_impl for layer in layers] == handle.compiled
    assert handle.eager_calls == 1
    assert counters["stats"]["unique_graphs"] == 1, "the caller's calls missed the thread's graph"
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])
    assert counters["frames"]["ok"] == 1
    for a, b in zip(first + background[4:], plain):
        assert a.pred == b.pred and a.logliks == pytest.approx(b.logliks, abs=1e-6)
    for a, b in zip(background, plain):
        assert a.logliks == pytest.approx(b.logliks, abs=1e-6)
    torch._dynamo.reset()


def test_a_background_compile_error_reaches_the_caller(model_factory, tokenizer, tmp_path, monkeypatch):
    """A compilation that fails on the thread fails the scoring at the switch, as a foreground one would."""
    from conftest import learnable_rows
    from llmcls.data import Row
    from llmcls.encode import PromptBuilder
    from llmcls.model.compiling import compile_layers

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile"))
    cfg = load_config()
    model = model_factory(seed=3, layers=2).eval()
    builder = PromptBuilder(tokenizer, cfg.prompt)
    rows = [Row(r["text"], r["category"], r["output"]) for r in learnable_rows(8, seed=1)]

    def broken(gm, example_inputs):
        raise RuntimeError("backend broke")

    handle = compile_layers(model, backend=broken, background=True)
    _scored(model, builder, rows[:4])
    handle.thread.join()
    with pytest.raises(Exception, match="backend broke"):
        _scored(model, builder, rows[4:])


def test_eval_compile_background_reaches_the_scoring_model(monkeypatch, tmp_path):
    """model_for_run (eval, predict, calibrate, and llmcls run's evaluations) compiles in the background exactly
    when eval.compile and eval.compile_background say so."""
    import llmcls.model.compiling as compiling
    from llmcls.rundir import model_for_run

    seen = []
    monkeypatch.setattr(compiling, "compile_layers",
                        lambda model, cache=None, background=False: seen.append(background))
    for compile_, background in ((True, True), (True, False), (False, True)):
        cfg = load_config(overrides={"eval.compile": compile_, "eval.compile_background": background})
        model_for_run(tmp_path, cfg, model=object(), tokenizer=object())
    assert seen == [True, False]
