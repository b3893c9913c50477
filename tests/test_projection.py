"""The 72B shape file, the multi-GPU projection (CPU arithmetic) and the NCCL bandwidth script's gloo path."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED

sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPE_72B = ROOT / "benchmarks" / "shapes" / "qwen2.5-72b-instruct.json"


def test_72b_shape_loads_through_multi_gpu_and_counts_72_7b_parameters():
    import torch
    from multi_gpu import shape_config
    from transformers import Qwen2ForCausalLM

    cfg = shape_config(SHAPE_72B)  # what multi_gpu.py --shape builds from
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (8192, 29568, 80)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (64, 8, 152064)
    assert cfg.tie_word_embeddings is False and cfg.use_sliding_window is False
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 72.7e9) / 72.7e9 < 0.01


@pytest.mark.skipif(not (SHARED / "model-shapes" / "qwen1.5-7b-chat.json").is_file()
                    or not (SHARED / "data" / "fudan-news" / "train.jsonl").is_file(),
                    reason="../shared (model shapes, Fudan rows) is absent")
def test_projection_is_labelled_and_reproduces_the_measured_2_gpu_rows(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_gpu_projection.py"), "--out", str(tmp_path),
                          "--calib-shape", str(SHARED / "model-shapes" / "qwen1.5-7b-chat.json"),
                          "--train-file", str(SHARED / "data" / "fudan-news" / "train.jsonl")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "multi_gpu_projection.json").read_text())
    measured = json.loads((ROOT / "docs" / "bench" / "multi_gpu-fast-run2.json").read_text())["phases"]
    assert "nccl_busbw_gbs" in res["inputs"]["assumed"]
    rows = res["fsdp_speed"] + res["ddp"]
    assert rows and all(r["label"].startswith("PROJECTION") for r in rows)
    table = [line for line in (tmp_path / "multi_gpu_projection.md").read_text().splitlines()
             if line.startswith("| ") and not line.startswith("| ---")]
    assert all("PROJECTION" in line for line in table if not line.startswith(("| shape", "| GPUs")))
    # the calibrated pieces give back what they were calibrated on
    seven = [r for r in res["fsdp_speed"] if r["shape"] == "qwen1.5-7b-chat" and r["gpus"] == 2
             and not r["checkpointing"]][0]
    assert seven["peak_gib"] == pytest.approx(max(measured["fsdp"]["peak_mem_gib_per_process"]), abs=0.1)
    assert seven["tokens_per_s"]["as_on_2_gpus"] == pytest.approx(measured["fsdp"]["tokens_per_s"], rel=1e-3)
    ddp2 = [r for r in res["ddp"] if r["gpus"] == 2][0]
    assert ddp2["tokens_per_s"]["amdahl"] == pytest.approx(measured["ddp"]["tokens_per_s"], rel=1e-3)
    # 72B: no single card; weights / N shrink with N
    fit = {r["gpus"]: r for r in res["fsdp_fit"] if r["shape"] == "qwen2.5-72b-instruct"}
    assert fit[1]["ckpt"]["max_micro_batch"] == 0
    assert fit[2]["static_gib"] > fit[4]["static_gib"] > fit[8]["static_gib"]


def test_nccl_bandwidth_runs_on_gloo_under_torchrun(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "benchmarks" / "nccl_bandwidth.py"), "--sizes-mb", "0.5", "--iters", "1",
                          "--warmup", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "nccl_bandwidth.json").read_text())
    assert res["backend"] == "gloo" and res["world_size"] == 2
    assert {r["op"] for r in res["rows"]} == {"all_reduce", "all_gather", "reduce_scatter"}
    assert all(r["busbw_gbs"] > 0 for r in res["rows"])
