"""The GPU benchmark scripts, run on the CPU with a tiny model: they must keep working between GPU sessions.
They import the installed llmcls (nothing on sys.path but their own folder, as for any script)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import FUDAN, ROOT, SHARED


@pytest.mark.slow  # a CPU run of a GPU benchmark: the second test tier (scripts/test.sh -m slow)
@pytest.mark.skipif(not (FUDAN / "train.jsonl").is_file() or not (SHARED / "qwen-tokenizer").is_dir(),
                    reason="../shared (Fudan rows, Qwen tokenizer) is absent")
def test_gpu_speed_runs_every_part_and_compares_like_with_like(tmp_path):
    env = {**os.environ, "LLMCLS_SHARED": str(SHARED), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--shape", "tiny", "--device",
                          "cpu", "--steps", "1", "--warmup", "0", "--rows", "4", "--eval-batch", "2", "--single-rows", "2",
                          "--no-eval-compile", "--only",
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
    from gpu_speed import variant_config

    assert train["tutorial"]["checkpointing"] is True
    assert all(train[k]["checkpointing"] is variant_config(k).train.gradient_checkpointing
               for k in ("llmcls-eager", "llmcls-padded", "llmcls-16gb", "llmcls-qlora-ckpt"))
    assert variant_config("llmcls-eager").train.gradient_checkpointing is False
    # each result names the shipped config it ran and the lever changed against it
    assert train["llmcls-padded"]["config"] == "configs/qwen1.5-7b-chat-fudan-fast.yaml"
    assert train["llmcls-padded"]["changes"] == {"train.packing": False}
    assert train["llmcls-qlora-ckpt"]["changes"] == {} and res["tutorial_config_drift"] == {}
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


@pytest.mark.slow  # a CPU run of a GPU benchmark: the second test tier (scripts/test.sh -m slow)
@pytest.mark.skipif(not (FUDAN / "test.jsonl").is_file() or not (SHARED / "qwen-tokenizer").is_dir(),
                    reason="../shared (Fudan rows, Qwen tokenizer) is absent")
def test_score_shapes_runs_on_a_cpu(tmp_path):
    env = {**os.environ, "LLMCLS_SHARED": str(SHARED), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "score_shapes.py"), "--shape", "tiny", "--device",
                          "cpu", "--rows", "12", "--batch", "4", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "score_shapes.json").read_text())
    assert set(res) >= {"padded", "environment"} and "packed" not in res  # packed needs a GPU
    assert res["padded"]["distinct_shapes"] >= 1 and res["padded"]["pass2_rows_per_s"] > 0


@pytest.mark.slow  # ~3 s of run, but ~8 s importing what gpu_speed.py imports (the Trainer, peft)
@pytest.mark.skipif(not (SHARED / "qwen-tokenizer").is_dir(), reason="../shared (Qwen tokenizer) is absent")
def test_score_candidates_runs_on_a_cpu(tmp_path):
    """The candidate-count benchmark on a 1-layer cut of a tiny shape (float32, the padded layout): trie and flat
    give the same scores, the trie lays out fewer positions where labels share prefixes, and the output says the
    layers were cut."""
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    env = {**os.environ, "LLMCLS_SHARED": str(SHARED), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "score_candidates.py"), "--shape", str(shape),
                          "--layers", "1", "--device", "cpu", "--rows", "2", "--batch", "2", "--counts", "4,20",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "score_candidates.json").read_text())
    assert res["layers"] == 1 and res["layers_cut"] is True and res["layout"] == "padded"
    assert set(res["counts"]) == {"4", "20"} and res["trie_cost_ratio"]["4"] == res["flat_cost_ratio"]["4"] == 1
    for e in res["counts"].values():
        assert e["trie_vs_flat_max_abs_diff"] < 1e-4
        assert 1 <= e["label_tokens_min_max"][0] <= e["label_tokens_min_max"][1] <= 4
        assert e["trie"]["rows_per_s"] > 0 and e["flat"]["rows_per_s"] > 0
    big = res["counts"]["20"]  # 10 "Category/Sub" names over 3 categories: their category tokens laid out once
    assert big["first_token_shared_fraction"] >= 0.5
    assert big["trie"]["positions_per_row"] < big["flat"]["positions_per_row"]
    assert 1 < res["trie_flops_ratio"]["20"] < res["flat_flops_ratio"]["20"]


@pytest.mark.slow  # a CPU run of a GPU benchmark: the second test tier (scripts/test.sh -m slow)
def test_seqcls_vs_generative_runs_on_a_cpu(tmp_path, tokenizer_dir):
    """Both recipes trained one after the other on the tiny model with 16 rows: every figure is there and sane."""
    from conftest import learnable_rows, write_jsonl

    write_jsonl(tmp_path / "data" / "train.jsonl", learnable_rows(16, 1))
    write_jsonl(tmp_path / "data" / "test.jsonl", learnable_rows(16, 2))
    env = {**os.environ, "LLMCLS_TOKENIZER": str(tokenizer_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seqcls_vs_generative.py"), "--model", "tiny",
                          "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--workdir",
                          str(tmp_path / "work"), "--max-steps", "4", "--set", "train.batch_size=4",
                          "eval.batch_size=8"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "seqcls_vs_generative.json").read_text())
    assert set(res["modes"]) == {"generate", "seq_cls"} and res["device"] == "cpu"
    assert res["seq_cls_changes"] == {"lora.task": "seq_cls", "train.packing": False}
    for mode, m in res["modes"].items():
        assert m["task"] == mode and m["global_step"] == 4 and m["test_rows"] == 16
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
        assert m["train_tokens_per_s_steady"] > 0 and m["train_rows_per_s_steady"] > 0 and m["steady_steps"] == 2  # steps 2 to 4
        assert m["train_wall_s"] > 0 and m["eval_rows_per_s"] > 0 and m["packing"] is False
    # the head is fed the prompt only; the generative recipe also its answer and end token
    g, s = res["modes"]["generate"], res["modes"]["seq_cls"]
    assert s["tokens_seen"] < g["tokens_seen"] and s["trainable"] > g["trainable"]  # + the head
    assert res["ratio"]["accuracy"] == pytest.approx(s["accuracy"] / g["accuracy"], rel=1e-2) or not g["accuracy"]
    assert {"versions", "git_commit"} <= set(res["environment"])
    assert "| train tokens/s (steady) |" in (tmp_path / "out" / "seqcls_vs_generative.md").read_text()


# The scripts built on gpu_speed's imports take ~7 s each to start: one of them in the default tier, the rest slow.
# The slow ones share one interpreter (_HELP_ALL), which pays those imports once: each script still runs by its
# path as __main__, its own folder first on sys.path and nothing else added, as `python SCRIPT.py --help` does.
_HEAVY_SCRIPTS = ("score_profile", "score_shapes", "score_candidates", "fp8_speed", "seqcls_vs_generative",
                  "cuda_graphs_real")
_HEAVY = pytest.mark.slow
_HELP_ALL = r"""
import contextlib, io, json, runpy, sys, traceback
out = {}
for path in sys.argv[1:]:
    stdout, stderr, rc = io.StringIO(), io.StringIO(), 0
    sys.argv, sys.path[0] = [path, "--help"], path.rsplit("/", 1)[0]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            rc, _ = 1, traceback.print_exc()
    out[path] = {"returncode": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
print(json.dumps(out))
"""
_help_cache: dict = {}


def _help(script: str) -> subprocess.CompletedProcess:
    """``SCRIPT.py --help``: in a fresh interpreter of its own, or (the heavy scripts) in one shared by all of them."""
    path = str(ROOT / "benchmarks" / f"{script}.py")
    if script not in _HEAVY_SCRIPTS:
        return subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, timeout=300)
    if script not in _help_cache:
        # "-c" puts "" first on sys.path; the driver sets it to the script's folder, as running the script would
        p = subprocess.run([sys.executable, "-c", _HELP_ALL,
                            *(str(ROOT / "benchmarks" / f"{s}.py") for s in _HEAVY_SCRIPTS)],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        for s in _HEAVY_SCRIPTS:
            r = json.loads(p.stdout.splitlines()[-1])[str(ROOT / "benchmarks" / f"{s}.py")]
            _help_cache[s] = subprocess.CompletedProcess(p.args, r["returncode"], r["stdout"], r["stderr"])
    return _help_cache[script]


@pytest.mark.parametrize("script", ["gpu_speed", "multi_gpu", pytest.param("score_profile", marks=_HEAVY),
                                    pytest.param("score_shapes", marks=_HEAVY), "serve_load", "real_accuracy",
                                    "hybrid_offline", pytest.param("score_candidates", marks=_HEAVY),
                                    "multilabel_offline", "warmup", "prepare_speed", "onnx_speed", "end_to_end",
                                    "load_speed",
                                    pytest.param("fp8_speed", marks=_HEAVY),
                                    pytest.param("seqcls_vs_generative", marks=_HEAVY),
                                    pytest.param("cuda_graphs_real", marks=_HEAVY)])
def test_every_benchmark_imports_the_installed_package(script):
    out = _help(script)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage:" in out.stdout
    assert "sys.path.insert" not in (ROOT / "benchmarks" / f"{script}.py").read_text()


def test_gpu_speed_variants_are_the_shipped_configs():
    """Each llmcls variant is a shipped config with at most its one lever and the benchmark's own settings
    changed: editing a config changes what is benchmarked. The tutorial's recipe, the reference, matches the
    shipped tutorial config."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_speed import BENCH_OVERRIDES, VARIANTS, tutorial_config_drift, variant_config

    from llmcls.config import load_config

    assert tutorial_config_drift() == {}
    for name, v in VARIANTS.items():
        cfg = variant_config(name)
        shipped = yaml.safe_load((ROOT / "configs" / v.config).read_text())
        assert load_config(ROOT / "configs" / v.config, {**v.changes, **BENCH_OVERRIDES}) == cfg
        for section in ("model", "lora", "prompt"):  # never touched by the benchmark
            assert all(getattr(getattr(cfg, section), k) == val for k, val in shipped[section].items()), name
        for k, val in shipped["train"].items():
            key = f"train.{k}"
            if key not in v.changes and key not in BENCH_OVERRIDES and k != "output_dir":
                assert getattr(cfg.train, k) == val, (name, key)
    assert variant_config("llmcls").train.packing is True and variant_config("llmcls").train.compile is True
    assert variant_config("llmcls-16gb-compiled").model.offload_embeddings is True
    assert variant_config("llmcls-qlora-ckpt").model.quantize == "nf4"
    assert variant_config("llmcls-tutorial").lora.dtype == "float32"
    # the levers change what their names say, and nothing else
    assert VARIANTS["llmcls-padded"].changes == {"train.packing": False}
    assert VARIANTS["llmcls-16gb"].changes == {"train.compile": False}


@pytest.mark.skipif(not (FUDAN / "test.jsonl").is_file(), reason="../shared (Fudan rows) is absent")
def test_multi_gpu_dry_run_prints_the_fast_config_commands(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--dry-run", "--shape",
                          str(tmp_path / "shape.json"), "--tokenizer", str(tmp_path), "--data", str(FUDAN),
                          "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    cmds = [line for line in out.stdout.splitlines() if "torch.distributed.run" in line]
    assert len(cmds) == 3
    fast = str(ROOT / "configs" / "qwen1.5-7b-chat-fudan-fast.yaml")
    assert all(f"-c {fast} " in c and "--train.max_steps 16 --train.logging_steps 8" in c for c in cmds)
    # the fast config's micro-batch of 16; the same 32 rows per optimizer step in every phase
    assert "--nproc_per_node=1" in cmds[0] and "--train.grad_accum 2" in cmds[0]
    assert all("--train.grad_accum 1" in c for c in cmds[1:]) and cmds[2].endswith("--train.fsdp full_shard")
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # nothing built, nothing run


@pytest.mark.slow  # a CPU run of a GPU benchmark: the second test tier (scripts/test.sh -m slow)
@pytest.mark.skipif(not (FUDAN / "train.jsonl").is_file() or not (SHARED / "qwen-tokenizer").is_dir(),
                    reason="../shared (Fudan rows, Qwen tokenizer) is absent")
def test_multi_gpu_runs_one_process_and_ddp_on_a_cpu(tmp_path):
    """The CPU path of multi_gpu.py (gloo, the tiny model): the fast config through 'llmcls run' in one process and
    in two, its figures read from each run's train_summary.json, train_log.jsonl and eval/metrics.json."""
    out_dir = tmp_path / "out"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--shape", "tiny",
                          "--tokenizer", str(SHARED / "qwen-tokenizer"), "--data", str(FUDAN),
                          "--out", str(out_dir), "--workdir", str(tmp_path / "work"), "--max-steps", "4",
                          "--warmup-steps", "2", "--train-rows", "64", "--eval-rows", "16", "--batch-size", "2",
                          "--eval-batch-size", "4", "--max-length", "128"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((out_dir / "multi_gpu.json").read_text())
    p = res["phases"]
    assert p["fsdp"] == {"skipped": "FSDP needs CUDA GPUs (accelerate runs DDP on CPUs)"}
    assert res["settings"]["config"] == "configs/qwen1.5-7b-chat-fudan-fast.yaml"
    assert res["settings"]["global_batch"] == 4 and res["settings"]["train_settings"]["packing"] is True
    for name, world, accum in (("single", 1, 2), ("ddp", 2, 1)):
        r = p[name]
        assert r["rc"] == 0 and r["world_size"] == world and r["grad_accum"] == accum
        assert r["global_step"] == 4 and r["measured_steps"] == 2 and "measured_note" not in r
        assert r["tokens_per_s"] > 0 and r["whole_run_tokens_per_s"] > 0 and r["tokens_seen"] > 0
        assert r["score_rows"] == 16 and r["score_rows_per_s"] > 0
        saved = yaml.safe_load((out_dir / "phases" / name / "config.yaml").read_text())
        assert saved["train"]["packing"] is True and saved["train"]["compile"] is False  # no compiling on a CPU
        assert saved["train"]["logging_steps"] == 2 and saved["train"]["grad_accum"] == accum
    # the same rows per optimizer step: the same training, one process or two
    assert abs(p["single"]["final_loss"] - p["ddp"]["final_loss"]) < 1e-2
    assert abs(p["single"]["tokens_seen"] - p["ddp"]["tokens_seen"]) <= 0.05 * p["single"]["tokens_seen"]
    assert "DDP training speed-up" in res["checks"] and "sharded scoring speed-up" in res["checks"]
    md = (out_dir / "multi_gpu.md").read_text()
    assert "| 1 process | 1 | 2 × 2 |" in md and "| DDP | 2 | 2 × 1 |" in md


@pytest.mark.slow  # trains the TF-IDF model on 6,000 rows
@pytest.mark.skipif(not (FUDAN / "train.jsonl").is_file(), reason="../shared (Fudan rows) is absent")
def test_real_accuracy_table_and_hybrid_read_the_stored_runs(tmp_path):
    """The stored real-model results regenerate their docs table, and the offline hybrid reproduces its JSON."""
    files = ROOT / "docs" / "bench" / "real_accuracy-run1-seed42-files.tar.gz"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_accuracy.py"), "table",
                          str(ROOT / "docs" / "bench" / "real_accuracy-run1-seed42.json"), "--files", str(files)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    table = (ROOT / "docs" / "ACCURACY.md").read_text()
    for line in out.stdout.splitlines():
        if line.startswith("| last step") or line.startswith("| zero-shot"):
            assert line in table, line
    got = tmp_path / "h.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hybrid_offline.py"), "--files", str(files),
                          "--data", str(FUDAN), "--chars", "500", "--out", str(got)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    want = json.loads((ROOT / "docs" / "bench" / "hybrid-offline-run1-seed42-chars500.json").read_text())
    have = json.loads(got.read_text())
    for k in ("llm", "svm", "hybrid"):
        assert have[k]["errors"] == want[k]["errors"], k


@pytest.mark.slow  # pairs the Fudan rows, trains two TF-IDF logistic regressions: ~4 minutes on 2 cores
@pytest.mark.skipif(not (FUDAN / "train.jsonl").is_file(), reason="../shared (Fudan rows) is absent")
def test_multilabel_offline_reproduces_its_json(tmp_path):
    got = tmp_path / "m.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multilabel_offline.py"), "--data", str(FUDAN),
                          "--out", str(got)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    want = json.loads((ROOT / "docs" / "bench" / "multilabel_offline.json").read_text())
    have = json.loads(got.read_text())
    assert have["data"]["train"] == want["data"]["train"] and have["results"] == want["results"]


@pytest.mark.slow  # two fresh `llmcls run` processes, one compiling a tiny model with Inductor on the CPU: ~70 s
@pytest.mark.skipif(not (FUDAN / "train.jsonl").is_file() or not (SHARED / "qwen-tokenizer").is_dir(),
                    reason="../shared (Fudan rows, Qwen tokenizer) is absent")
def test_warmup_runs_cold_then_warm_on_a_cpu(tmp_path):
    """benchmarks/warmup.py with the tiny preset: a cold `llmcls run` (empty compile cache) and a warm one, each
    in a fresh process; the warm one finds the cold one's compiled code in the benchmark's own cache folder."""
    env = {**os.environ, "LLMCLS_SHARED": str(SHARED)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "warmup.py"), "--model", "tiny", "--out",
                          str(tmp_path / "out"), "--workdir", str(tmp_path / "work"), "--train-rows", "32",
                          "--max-steps", "2", "--eval-rows", "8"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    res = json.loads((tmp_path / "out" / "warmup.json").read_text())
    cold, warm = res["runs"]["cold"]["train"], res["runs"]["warm"]["train"]
    for w in (cold, warm):
        parts = w["start_s"] + w["load_s"] + w["encode_s"] + w["setup_s"] + w["first_step_s"]
        assert abs(parts - w["to_first_step_s"]) < 0.01 and min(parts, w["first_step_s"]) > 0
        # the benchmark's folder, not torch's default in /tmp nor ~/.cache: cold really was cold
        assert w["compile_cache"] == str((tmp_path / "work" / "compile-cache").resolve())
        assert w["first_step_compile"]["graphs"] == 1 and w["first_step_compile"]["recompiles"] == 0
    assert cold["first_step_compile"]["fx_graph_cache_hits"] == 0 and cold["first_step_compile"]["compile_s"] > 0
    assert warm["first_step_compile"]["fx_graph_cache_hits"] >= 1  # the forward and backward graphs' code
    assert warm["first_step_compile"]["compile_s"] < cold["first_step_compile"]["compile_s"]
    for name in ("cold", "warm"):
        e = res["runs"][name]["eval"]
        assert e["load_s"] > 0 and e["first_batch_s"] > 0 and e["rest_s"] >= 0
    assert res["runs"]["cold"]["global_step"] == 2 and set(res["checks"]) >= {"cold to first step <= 60 s"}
    assert "| cold |" in (tmp_path / "out" / "warmup.md").read_text()


@pytest.mark.skipif(not (FUDAN / "train.jsonl").is_file() or not (SHARED / "qwen-tokenizer").is_dir(),
                    reason="../shared (Fudan rows, Qwen tokenizer) is absent")
def test_prepare_speed_times_both_paths_and_checks_they_agree(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prepare_speed.py"), "--repeat", "120",
                          "--num-proc", "1,2,64", "--out", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["settings"]["rows"] == 120 and res["checks"]["all_same_as_one_by_one"] is True
    assert "num_proc_64" not in res["runs"] or res["environment"]["cpu"]["available"] >= 64
    assert all(r["rows_per_s"] > 0 and r["cpu_ms_per_row"] > 0 for r in res["runs"].values())
    assert res["environment"]["cpu"]["count"] >= 1 and res["environment"]["versions"]["tokenizers"]


@pytest.mark.slow  # a CPU run of a GPU benchmark: the second test tier (scripts/test.sh -m slow)
@pytest.mark.skipif(not (FUDAN / "train.jsonl").is_file() or not (SHARED / "qwen-tokenizer").is_dir(),
                    reason="../shared (Fudan rows, Qwen tokenizer) is absent")
def test_end_to_end_times_both_sides_on_a_cpu(tmp_path):
    """The tutorial's script and `llmcls run` on the tiny model, 16 rows, one epoch: both phases timed, each side's
    rows as asked, the ratio and the subset stated."""
    out_dir = tmp_path / "out"
    env = {**os.environ, "LLMCLS_SHARED": str(SHARED)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "end_to_end.py"), "--shape", "tiny",
                          "--train-rows", "16", "--test-rows", "8", "--epochs", "1", "--generate-tokens", "4",
                          "--workdir", str(tmp_path / "work"), "--out", str(out_dir)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((out_dir / "end_to_end.json").read_text())
    t, m = res["phases"]["tutorial"], res["phases"]["llmcls"]
    assert t["rc"] == 0 and m["rc"] == 0 and t["seconds"] > 0 and m["seconds"] > 0
    assert all(t["split"][k] > 0 for k in ("load_s", "encode_s", "train_s", "generate_s"))
    assert t["seconds"] > sum(t["split"].values())  # the parent's clock holds the child's own split
    assert t["train_rows"] == m["train_rows"] == 16 and t["global_step"] == m["global_step"] == 1
    # the tutorial: 10 generates of up to 4 new tokens, no metric; llmcls: the asked test rows scored, a metric
    assert t["generate"]["rows"] == 10 and t["generate"]["max_new_tokens"] == 4 and t["metric"] is None
    assert all(0 < n <= 4 for n in t["generate"]["new_tokens"])
    assert m["classified_rows"] == 8 and 0 <= m["metric"]["accuracy"] <= 1 and m["baseline"]["rows"] == 8
    assert m["report"] is True and m["train_s"] > 0 and m["eval_s"] > 0
    assert res["ratio"]["wall"] == pytest.approx(t["seconds"] / m["seconds"], rel=1e-2)
    assert res["settings"]["order"] == ["llmcls", "tutorial"] and res["prewarm"]["gib"] > 0
    saved = yaml.safe_load((out_dir / "phases" / "llmcls" / "config.yaml").read_text())
    assert saved["train"]["compile"] is False and saved["train"]["packing"] is False  # GPU-only, off on a CPU
    assert saved["data"]["max_train_rows"] == 16 and saved["track"]["tracker"] == "none"
    md = (out_dir / "end_to_end.md").read_text()
    assert "the first 16 of the 6,675 training rows" in md and "| the tutorial's script |" in md
    assert "| `llmcls run` (fast config) |" in md


def test_end_to_end_projects_a_subset_to_all_rows_step_by_step():
    """A subset's wall clocks carried to all rows: encoding per row, training per optimizer step (llmcls's compiling
    first step once), everything else as measured; nothing projected for a run on all rows or cut by max_steps."""
    import math

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from end_to_end import project

    res = {"settings": {"train_rows": 160, "max_steps": None}, "all_train_rows": 1000,
           "phases": {"tutorial": {"seconds": 300.0, "split": {"load_s": 5, "encode_s": 4, "train_s": 200,
                                                                "generate_s": 50}},
                      "llmcls": {"seconds": 100.0, "global_step": 20, "train_s": 43.0,
                                 "train_split": {"encode_s": 1.0, "first_step_s": 5.0}}}}
    got = project(res)
    steps_full = math.ceil(1000 / 16) * 2  # 2 epochs of 63 steps; the subset's 20 steps were 2 epochs of 10
    k_steps = steps_full / 20
    tutorial = 5 + 4 * 1000 / 160 + 200 * k_steps + 50 + (300 - 5 - 4 - 200 - 50)
    later = (43 - 5) / 19
    llmcls = (100 - 43 - 1) + 1 * 1000 / 160 + 5 + later * (steps_full - 1)
    assert got["tutorial_s"] == pytest.approx(tutorial, abs=0.1)
    assert got["llmcls_s"] == pytest.approx(llmcls, abs=0.1)
    assert got["wall"] == pytest.approx(tutorial / llmcls, abs=1e-3)
    assert got["wall_without_generate"] == pytest.approx((tutorial - 50) / llmcls, abs=1e-3)
    assert project({**res, "settings": {"train_rows": 1000, "max_steps": None}}) is None
    assert project({**res, "settings": {"train_rows": 160, "max_steps": 10}}) is None


def test_real_accuracy_compare_pairs_the_stored_fp8_runs_by_seed(tmp_path, monkeypatch):
    """``real_accuracy.py compare`` on the stored bf16 and FP8 runs (three seeds a side): each seed's row is that
    seed's two files, the means and paired differences equal those computed here from the JSONs; a side whose
    runs share a seed, or two sides with no seed in common, are refused."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import real_accuracy

    bench = ROOT / "docs" / "bench"
    load = lambda side: [json.loads((bench / f"real_accuracy-run4-{side}-seed{s}.json").read_text())  # noqa: E731
                         for s in (42, 7, 1)]
    bf16, fp8 = load("bf16"), load("fp8")
    res = real_accuracy.paired(bf16, fp8, "last")
    assert res["seeds"] == ["1", "7", "42"]
    by_seed = {r["overrides"]["train.seed"]: (r["test"]["last"] or r["test"]["selected"]) for r in bf16}
    for row in res["rows"]:
        assert row["a_accuracy"] == pytest.approx(100 * by_seed[row["seed"]]["accuracy"])
    acc = lambda rs: sum((r["test"]["last"] or r["test"]["selected"])["accuracy"] for r in rs) / 3 * 100  # noqa: E731
    assert res["diff_accuracy"] == pytest.approx(acc(fp8) - acc(bf16))
    assert res["worst_diff_macro_f1"] <= res["diff_macro_f1"]
    with pytest.raises(SystemExit, match="share a seed"):
        real_accuracy.paired(bf16 + bf16[:1], fp8)
    with pytest.raises(SystemExit, match="no seed on both sides"):
        real_accuracy.paired(bf16[:1], fp8[1:])
    # the stored comparison is what the command prints and writes today
    stored = json.loads((bench / "real_accuracy-run4-stored-vs-bf16.json").read_text())
    assert stored["last"] == json.loads(json.dumps(res))


@pytest.mark.slow  # four fresh processes, two of them compiling with Inductor on the CPU (~50 s)
def test_aot_layer_benchmark_loads_an_artifact_that_computes_the_eager_logits(tmp_path):
    """benchmarks/aot_layer.py on the tiny shape: torch's experimental aot_compile of one LoRA decoder layer, saved,
    then loaded in a fresh process and called for every layer, gives the eager model's logits (on this shape and
    on another batch shape, through the saved guards), as the warm-cache compile does."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot_layer.py"), "--model", "tiny", "--device",
                          "cpu", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "aot_layer.json").read_text())["phases"]
    assert list(res) == ["save", "jit_first", "jit_warm", "load"]
    assert res["save"]["artifact_bytes"] > 0
    for ph in ("jit_warm", "load"):
        assert res[ph]["max_abs_diff"] < 1e-5
    assert res["load"]["other_shape_max_abs_diff"] < 1e-5
