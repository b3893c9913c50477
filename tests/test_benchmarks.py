"""The GPU benchmark scripts, run on the CPU with a tiny model: they must keep working between GPU sessions."""

import json
import os
import subprocess
import sys

import pytest

from conftest import FUDAN, ROOT, SHARED


@pytest.mark.skipif(not (FUDAN / "train.jsonl").is_file() or not (SHARED / "qwen-tokenizer").is_dir(),
                    reason="../shared (Fudan rows, Qwen tokenizer) is absent")
def test_gpu_speed_runs_every_part_and_compares_like_with_like(tmp_path):
    env = {**os.environ, "LLMCLS_SHARED": str(SHARED), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--shape", "tiny", "--device",
                          "cpu", "--steps", "1", "--rows", "4", "--eval-batch", "2", "--single-rows", "2", "--only",
                          "check,eval,tutorial,llmcls-eager,llmcls-padded,llmcls-16gb,llmcls-qlora-ckpt", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_speed.json").read_text())
    train = res["train"]
    assert set(train) == {"tutorial", "llmcls-eager", "llmcls-padded", "llmcls-16gb", "llmcls-qlora-ckpt"}
    assert train["llmcls-padded"]["packing"] is False and train["llmcls-eager"]["packing"] is True
    assert train["llmcls-qlora-ckpt"]["quantize"] == "nf4"  # a 4-bit base, loaded from the saved random weights
    # every variant timed the same rows: the same real tokens per optimizer step (the tutorial's pad-token end
    # and llmcls's end token are one token each)
    assert len({round(v["tokens_per_step"]) for v in train.values()}) == 1
    assert train["llmcls-16gb"]["offload_embeddings"] is True
    # recomputation as each variant asks, measured on the model after its run: the tutorial's Trainer switched it
    # on for the shared model, and the variants after it must not inherit it
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_speed import VARIANTS

    assert train["tutorial"]["checkpointing"] is True
    assert all(train[k]["checkpointing"] is VARIANTS[k]["checkpointing"]
               for k in ("llmcls-eager", "llmcls-padded", "llmcls-16gb", "llmcls-qlora-ckpt"))
    assert VARIANTS["llmcls-eager"]["checkpointing"] is False
    same = res["same_results"]  # float32 on the CPU: the same loss, padded or packed
    assert same["same_dtype"]["loss_rel_diff"] < 1e-5 and same["llmcls_packed"]["loss_rel_diff"] < 1e-5
    assert same["llmcls_packed"]["grad_min_cosine"] > 0.9999
    assert {"tutorial_generate", "llmcls_score", "llmcls_generate"} <= set(res["eval"])
    md = (tmp_path / "gpu_speed.md").read_text()
    assert all(f"| {name} (micro" in md for name in train) and "| tutorial_generate |" in md


def test_gpu_gaps_counts_idle_time_between_kernels(tmp_path):
    """score_profile's reading of a profiler trace: busy time is the union of kernel intervals (overlaps counted
    once), idle time the rest of their span, the longest gap named with the host operators running when it began."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from score_profile import gpu_gaps

    trace = {"traceEvents": [
        {"cat": "kernel", "ts": 0, "dur": 100}, {"cat": "kernel", "ts": 50, "dur": 100},      # overlap: busy 0-150
        {"cat": "gpu_memcpy", "ts": 400, "dur": 50},                                         # gap of 250
        {"cat": "kernel", "ts": 500, "dur": 500},                                            # gap of 50
        {"cat": "cpu_op", "name": "aten::item", "ts": 140, "dur": 300},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 20}]}
    (tmp_path / "t.json").write_text(json.dumps(trace))
    g = gpu_gaps(tmp_path / "t.json")
    assert g["span_ms"] == 1.0 and g["gpu_busy_ms"] == 0.7 and g["idle_ms"] == 0.3
    assert g["gaps_over_100us"] == 1 and g["idle_in_gaps_over_100us_ms"] == 0.25
    assert g["longest"][0] == {"gap_us": 250, "host_ops": ["aten::item"]}
    assert [x["gap_us"] for x in g["longest"]] == [250, 50]


@pytest.mark.skipif(not (FUDAN / "test.jsonl").is_file() or not (SHARED / "qwen-tokenizer").is_dir(),
                    reason="../shared (Fudan rows, Qwen tokenizer) is absent")
def test_score_shapes_runs_on_a_cpu(tmp_path):
    env = {**os.environ, "LLMCLS_SHARED": str(SHARED), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "score_shapes.py"), "--shape", "tiny", "--device",
                          "cpu", "--rows", "12", "--batch", "4", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "score_shapes.json").read_text())
    assert set(res) >= {"padded", "environment"} and "flat" not in res  # flat needs a GPU
    assert res["padded"]["distinct_shapes"] >= 1 and res["padded"]["pass2_rows_per_s"] > 0
