"""train.cuda_graphs: the decoder stack compiled whole and replayed from recorded CUDA graphs, steps padded to a few
lengths.

On a CPU: what the option needs is refused with the reason, and `llmcls train` refuses it before loading anything.
On a GPU: training with graphs computes what training without them computes (same losses step by step, dropout
off), and the graphs were really recorded and replayed (inductor did not skip them)."""

import json

import pytest
import torch
from conftest import LoggedLosses

from llmcls.config import ConfigError, check_launch, load_config

FAST = {"model.name_or_path": "tiny", "train.compile": "true", "train.packing": "true",
        "train.gradient_checkpointing": "false", "train.cuda_graphs": "true", "train.grad_accum": "1",
        "track.tracker": "none"}


@pytest.mark.parametrize("change, cuda, world, why", [
    ({"train.compile": "false"}, True, 1, "needs train.compile"),
    ({"train.packing": "false"}, True, 1, "needs train.packing"),
    ({}, False, 1, "needs a CUDA GPU"),
    ({}, True, 2, "one process"),
    ({"train.grad_accum": "2"}, True, 1, "grad_accum: 1"),
    ({"train.gradient_checkpointing": "true"}, True, 1, "gradient_checkpointing"),
    ({"model.quantize": "nf4"}, True, 1, "model.quantize=nf4"),
    ({"model.offload_embeddings": "true"}, True, 1, "offload_embeddings"),
])
def test_what_cuda_graphs_need_is_refused_with_the_reason(change, cuda, world, why):
    with pytest.raises(ConfigError, match=why):
        check_launch(load_config(None, {**FAST, **change}), world_size=world, cuda=cuda)
    check_launch(load_config(None, FAST), world_size=1, cuda=True)  # all it needs: accepted


def test_train_on_a_cpu_refuses_cuda_graphs_before_loading(tmp_path, monkeypatch):
    import llmcls.recipes.train as recipe

    monkeypatch.setattr(recipe.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    with pytest.raises(ConfigError, match="train.cuda_graphs needs a CUDA GPU"):
        recipe.train(load_config(None, {**FAST, "train.output_dir": str(tmp_path / "run")}), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
def test_training_with_cuda_graphs_gives_the_losses_of_training_without(tokenizer, model_factory, tmp_path):
    from llmcls.data import Row
    from llmcls.encode import PromptBuilder, encode_train
    from llmcls.config import PromptConfig
    from llmcls.model.attention import _varlen_attn
    from llmcls.trainer import build_trainer, for_scoring, graph_padding, prepare_for_training, training_arguments
    from llmcls.warmup import compile_stats

    assert _varlen_attn() is not None
    b = PromptBuilder(tokenizer, PromptConfig())
    rows = [Row("text number %d " % i * (1 + i % 7), ["Sport", "Art", "Politics"], ["Sport", "Art"][i % 2])
            for i in range(48)]
    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in (encode_train(b, r, 128) for r in rows)]

    runs = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cfg = load_config(None, {**FAST, "train.cuda_graphs": str(graphs).lower(), "train.batch_size": "8",
                                 "train.grad_accum": "1", "train.epochs": "2", "train.logging_steps": "1",
                                 "train.save_steps": "0", "train.lr": "1e-3", "lora.dropout": "0.0",
                                 "train.group_by_length": "true"})
        model = prepare_for_training(model_factory(seed=3).to("cuda", torch.bfloat16), cfg)
        log = LoggedLosses()
        trainer = build_trainer(model, tokenizer, feats, training_arguments(cfg, tmp_path / str(graphs),
                                                                            progress=False),
                                callbacks=[log], packing=True, pad_multiple=graph_padding(cfg))
        trainer.train()
        runs[graphs] = (log.seen, trainer.state.num_input_tokens_seen, compile_stats())
    (plain, n_plain, before), (graphed, n_graphed, after) = runs[False], runs[True]
    assert len(graphed) == len(plain) == 12 and graphed[-1] < graphed[0]
    assert n_graphed == n_plain == 2 * sum(len(f["input_ids"]) for f in feats)
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(plain), rtol=2e-2, atol=2e-2)
    # recorded, not skipped: the stack's forward and backward, once for each padded length met (at least one)
    assert before["cuda_graphs"] == 0 and after["cuda_graph_skips"] == 0, after
    assert after["cuda_graphs"] >= 2 and after["cuda_graphs"] % 2 == 0, after
    assert model.get_base_model().model._compiled_call_impl is not None
    for_scoring(model)  # scoring after training must not run inside the training's graphs
    assert model.get_base_model().model._compiled_call_impl is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
def test_llmcls_run_with_cuda_graphs_selects_on_dev_and_scores(learnable_data, tmp_path):
    """The whole `llmcls run` with graphs and dev evaluations during training (which score outside the graphs):
    it trains, evaluates the dev set at every evaluation step, selects, and scores the test file."""
    from llmcls.recipes.pipeline import run as run_all
    from llmcls.rundir import RunDir
    from llmcls.warmup import compile_stats

    opts = {**FAST, "data.train_file": str(learnable_data["train"]), "data.test_file": str(learnable_data["test"]),
            "data.max_length": "128", "data.dev_fraction": "0.2", "train.output_dir": str(tmp_path / "run"),
            "train.epochs": "3", "train.batch_size": "16", "train.lr": "3e-3", "train.save_steps": "0",
            "eval.every_steps": "4", "train.select_best": "macro_f1", "train.select_confidence": "0",
            "eval.compile": "true", "eval.batch_size": "32"}
    before = compile_stats()["cuda_graphs"]
    metrics = run_all(load_config(None, opts), echo=lambda line: None)
    summary = json.loads(RunDir(tmp_path / "run").train_summary.read_text())
    history = summary["selection"]["history"]
    assert len(history) >= 6 and all(0 <= h["accuracy"] <= 1 for h in history)
    # the first step of a shape runs un-recorded (torch's warm-up run); the later ones record, then replay
    assert summary["warmup"]["first_step_compile"]["cuda_graphs"] == 0
    assert summary["cuda_graphs_recorded"] >= 2 and compile_stats()["cuda_graphs"] - before >= 2
    assert metrics["rows"] == 60 and 0 <= metrics["accuracy"] <= 1
