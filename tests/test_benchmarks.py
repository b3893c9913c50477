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
