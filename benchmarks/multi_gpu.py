"""Multi-GPU scaling of ``llmcls`` on one 2-GPU machine, through the real commands users run.

Phases (each a separate launch, so each measures what a user would get):

1. ``build``  a random-init model of the chosen shape (default: Qwen1.5-7B-Chat, bf16) saved as a local folder
   (cost depends on shapes, not on weight values), with the Qwen tokenizer;
2. ``single`` ``torchrun --nproc_per_node 1 -m llmcls.cli run`` on GPU 0: LoRA training at global batch G
   (per-process micro-batch B, accumulation G/B), then scoring of the test rows;
3. ``ddp``    the same on 2 GPUs: ``torchrun --nproc_per_node 2``, micro-batch B, accumulation G/(2B), so the
   global batch and the rows seen are the same; scoring is sharded over both processes;
4. ``fsdp``   ``torchrun --nproc_per_node 2 -m llmcls.cli train --train.fsdp full_shard`` at the same batch:
   per-GPU peak memory and tokens/s (training only).

Training rows are real Fudan news rows encoded by ``llmcls prepare`` (texts shortened so prompt + answer fit
384 tokens: realistic lengths). Training tokens/s counts real (non-padding) tokens of all processes between the
end of the warm-up steps and the last step; scoring rows/s is the eval's own figure (all processes, merged).

Run on the GPU machine (one command, well under 8 minutes on 2 x H100)::

    python benchmarks/multi_gpu.py --out bench-out/multi_gpu

CPU smoke test (gloo, the tiny shape, FSDP skipped: it needs CUDA)::

    python benchmarks/multi_gpu.py --shape tiny --out /tmp/bench-smoke

Writes ``OUT/multi_gpu.json`` and ``OUT/multi_gpu.md`` (the table for docs/BENCHMARKS.md, card named), and
each phase's log and result files under ``OUT/phases/``. Models and run directories go to ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"ddp_train_speedup": 1.85, "ddp_score_speedup": 1.9}


def _shared() -> Path | None:
    env = os.environ.get("LLMCLS_SHARED")  # as benchmarks/gpu_speed.py
    for p in (*([Path(env).resolve()] if env else []), ROOT / "shared", ROOT.parent / "shared"):
        if (p / "qwen-tokenizer").is_dir():
            return p
    return None


# ----------------------------------------------------------------------------------------------- build
def build(shape: str, tokenizer: str, out: Path) -> dict:
    """Runs in its own process (``_build``) so the parent never holds a GPU context."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    t0 = time.perf_counter()
    if shape == "tiny":
        from llmcls.config import TinyConfig
        from llmcls.model import build_tiny

        build_tiny(TinyConfig(), tok, out, seed=0)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(**json.loads(Path(shape).read_text()))
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_default_dtype(torch.bfloat16)  # initialise straight in bf16: no fp32 copy of 7B weights
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.replace(out)
    return {"seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------------- phases
def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _launch(cmd: list[str], log: Path, timeout: float, env: dict) -> dict:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                                cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    out = {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
    if rc != 0:
        out["log_tail"] = log.read_text(errors="replace")[-3000:]
    return out


def train_rate(run: Path, warmup: int) -> dict:
    """Real tokens/s of all processes from the end of step ``warmup`` to the last step, from the Trainer's
    cumulative counters in train_log.jsonl (one line per step)."""
    recs = [r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    first = next(r for r in recs if r["step"] >= warmup)
    last = recs[-1]
    dt = last["train_runtime"] - first["train_runtime"]
    tokens = last["num_input_tokens_seen"] - first["num_input_tokens_seen"]
    return {"tokens_per_s": round(tokens / dt, 1), "measured_steps": last["step"] - first["step"],
            "measured_s": round(dt, 2), "final_loss": last["loss"]}


def collect(run: Path, phase_dir: Path, warmup: int, scored: bool) -> dict:
    phase_dir.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    summary = json.loads((run / "train_summary.json").read_text())
    for f in ("train_summary.json", "train_log.jsonl", "eval/metrics.json"):
        if (run / f).is_file():
            shutil.copy(run / f, phase_dir / Path(f).name)
    out.update(train_rate(run, warmup))
    out["peak_mem_gib"] = summary.get("peak_mem_gib")
    out["peak_mem_gib_per_process"] = summary.get("peak_mem_gib_per_process", [summary.get("peak_mem_gib")])
    out["world_size"] = summary.get("world_size", 1)
    out["environment"] = summary.get("environment")
    if scored:
        m = json.loads((run / "eval" / "metrics.json").read_text())
        out.update(score_rows=m["rows"], score_rows_per_s=m["rows_per_s"], score_wall_s=m["wall_s"])
    return out


# ------------------------------------------------------------------------------------------------ report
def markdown(res: dict) -> str:
    p, a = res["phases"], res["settings"]
    card = res.get("card") or "CPU (gloo)"
    lines = [f"### Multi-GPU scaling — {res['shape_name']}, {card} × {res['devices']}",
             "",
             f"LoRA r={a['lora_r']} on all projections, bf16 weights on GPUs, global batch {a['global_batch']} "
             f"rows, per-process micro-batch {a['batch_size']}, {a['max_steps']} steps "
             f"(tokens/s measured after step {a['warmup_steps']}), Fudan news rows at max_length "
             f"{a['max_length']} (mean {res.get('tokens_per_row', '?')} real tokens per row), gradient "
             f"checkpointing {'on' if a['gradient_checkpointing'] else 'off'}; scoring {a['eval_rows']} test "
             f"rows{' (' + a['eval_rows_note'] + ')' if a.get('eval_rows_note') else ''}, eval batch "
             f"{a['eval_batch_size']}.",
             "",
             "| run | processes | micro-batch × accumulation | train tokens/s | vs 1 GPU | peak GiB per GPU "
             "| score rows/s | vs 1 GPU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = p.get("single", {})
    one = "1 GPU" if res.get("card") else "1 process"
    lines[-2] = lines[-2].replace("vs 1 GPU", f"vs {one}")
    for name, label in (("single", one), ("ddp", "DDP"), ("fsdp", "FSDP full_shard")):
        r = p.get(name)
        if not r or r.get("rc") != 0 or "tokens_per_s" not in r:
            why = (r or {}).get("skipped") or (f"failed (rc {r.get('rc')})" if r else "not run")
            lines.append(f"| {label} | | | {why} | | | | |")
            continue
        speed = (f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×" if base.get("tokens_per_s") else "")
        score = f"{r['score_rows_per_s']:.1f}" if "score_rows_per_s" in r else "—"
        sspeed = (f"{r['score_rows_per_s'] / base['score_rows_per_s']:.2f}×"
                  if "score_rows_per_s" in r and base.get("score_rows_per_s") else "—")
        mem = ", ".join(f"{m:.1f}" for m in r["peak_mem_gib_per_process"] if m is not None) or "—"
        lines.append(f"| {label} | {r['world_size']} | {a['batch_size']} × {r['grad_accum']} | "
                     f"{r['tokens_per_s']:,.0f} | {speed} | {mem} | {score} | {sspeed} |")
    lines.append("")
    for k, v in res["checks"].items():
        lines.append(f"- {k}: {v}")
    env = (base.get("environment") or {}).get("versions", {})
    lines.append(f"- versions: torch {env.get('torch')}, transformers {env.get('transformers')}, peft "
                 f"{env.get('peft')}, accelerate {env.get('accelerate')}; wall time of the whole benchmark "
                 f"{res['wall_s']:.0f} s")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shared = _shared()
    ap.add_argument("--shape", default=str(shared / "model-shapes" / "qwen1.5-7b-chat.json") if shared else None,
                    help="Model config JSON, or 'tiny' (CPU smoke test).")
    ap.add_argument("--tokenizer", default=str(shared / "qwen-tokenizer") if shared else None)
    ap.add_argument("--data", default=str(shared / "data" / "fudan-news") if shared else None,
                    help="Folder with train.jsonl and test.jsonl.")
    ap.add_argument("--out", default="bench-out/multi_gpu", help="Results folder (small files only).")
    ap.add_argument("--workdir", default="/tmp/llmcls-bench", help="Model folder and run directories (large).")
    ap.add_argument("--global-batch", type=int, default=16, help="Rows per optimizer step, all processes.")
    ap.add_argument("--batch-size", type=int, default=8, help="Rows per process per micro-batch.")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=4, help="Steps left out of the tokens/s figure.")
    ap.add_argument("--train-rows", type=int, default=512)
    ap.add_argument("--eval-rows", type=int, default=1024, help="A multiple of 2 x eval batch keeps shards even.")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--gradient-checkpointing", choices=["true", "false"], default="false")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--phases", default="single,ddp,fsdp")
    ap.add_argument("--budget-s", type=float, default=450, help="Skip phases that would start past this.")
    ap.add_argument("--extra", default="", help="More llmcls options for every run, e.g. '--train.lr 2e-4'.")
    ap.add_argument("--_build", nargs=2, metavar=("SHAPE", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a._build:
        print(json.dumps(build(a._build[0], a.tokenizer, Path(a._build[1]))))
        return 0
    if not (a.shape and a.tokenizer and a.data):
        ap.error("shared/ not found: pass --shape, --tokenizer and --data")
    for mod in ("torch", "transformers", "peft", "accelerate", "datasets", "sklearn"):  # fail in seconds
        __import__(mod)

    t_start = time.perf_counter()
    deadline = t_start + a.budget_s
    out, work = Path(a.out), Path(a.workdir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    tiny = a.shape == "tiny"
    shape_name = "tiny" if tiny else Path(a.shape).stem
    env = _env()
    if tiny:  # one thread per process, as torchrun gives each of several: the 1-process run is then comparable
        env.update(LLMCLS_TOKENIZER=a.tokenizer, OMP_NUM_THREADS="1")
    res: dict = {"shape": a.shape, "shape_name": shape_name, "phases": {}, "checks": {},
                 "settings": {"global_batch": a.global_batch, "batch_size": a.batch_size, "max_steps": a.max_steps,
                              "warmup_steps": a.warmup_steps, "train_rows": a.train_rows,
                              "eval_rows": a.eval_rows, "eval_batch_size": a.eval_batch_size,
                              "max_length": a.max_length, "lora_r": 8,
                              "gradient_checkpointing": a.gradient_checkpointing == "true", "extra": a.extra}}

    # 1. the model folder (reused when it exists)
    model_dir = work / f"model-{shape_name}"
    if not (model_dir / "config.json").is_file():
        r = _launch([sys.executable, __file__, "--tokenizer", a.tokenizer, "--_build", a.shape, str(model_dir)],
                    out / "phases" / "build.log", deadline - time.perf_counter(), env)
        res["phases"]["build"] = r
        if r["rc"] != 0:
            print(f"building the model failed:\n{r.get('log_tail')}", file=sys.stderr)
            return 1
    else:
        res["phases"]["build"] = {"rc": 0, "reused": str(model_dir)}

    # A carried subset of the test file may hold fewer rows than asked for: repeat it (rows/s depends on the
    # rows' lengths, which repeating keeps, not on which rows they are).
    test_file = Path(a.data) / "test.jsonl"
    test_rows = test_file.read_text(encoding="utf-8").splitlines()
    if len(test_rows) < a.eval_rows:
        test_file = work / "test-repeated.jsonl"
        test_file.write_text("".join(test_rows[i % len(test_rows)] + "\n" for i in range(a.eval_rows)),
                             encoding="utf-8")
        res["settings"]["eval_rows_note"] = f"the {len(test_rows)} test rows repeated to {a.eval_rows}"
    common = ["--model.name_or_path", str(model_dir), "--model.source", "local",
              "--data.train_file", str(Path(a.data) / "train.jsonl"),
              "--data.test_file", str(test_file),
              "--data.max_length", str(a.max_length), "--data.max_train_rows", str(a.train_rows),
              "--data.max_eval_rows", str(a.eval_rows), "--lora.method", "lora",
              "--train.max_steps", str(a.max_steps), "--train.batch_size", str(a.batch_size),
              "--train.logging_steps", "1", "--train.save_steps", "1000000",
              "--train.gradient_checkpointing", a.gradient_checkpointing,
              "--eval.batch_size", str(a.eval_batch_size), "--track.tracker", "none", "--overwrite",
              *a.extra.split()]
    if tiny:  # the folder holds the tiny model; the tokenizer is the shared Qwen one
        common += ["--model.tokenizer", a.tokenizer]

    world = a.processes
    plans = {  # --no-baseline: the TF-IDF baseline is not what is measured here
        "single": (1, "run", ["--no-baseline"], {"CUDA_VISIBLE_DEVICES": "0"}),
        "ddp": (world, "run", ["--no-baseline"], {}),
        "fsdp": (world, "train", ["--train.fsdp", "full_shard"], {}),
    }
    prepared: Path | None = None
    for name in [p for p in a.phases.split(",") if p]:
        nproc, command, more, env_more = plans[name]
        if a.global_batch % (a.batch_size * nproc):
            ap.error(f"--global-batch {a.global_batch} is not a multiple of batch {a.batch_size} x {nproc}")
        accum = a.global_batch // (a.batch_size * nproc)
        if name == "fsdp" and tiny:
            res["phases"][name] = {"skipped": "FSDP needs CUDA GPUs (accelerate runs DDP on CPUs)"}
            continue
        left = deadline - time.perf_counter()
        if left < 30:
            res["phases"][name] = {"skipped": f"time budget ({a.budget_s:.0f} s) spent"}
            continue
        run = work / "runs" / name
        if prepared is not None and not (run / "data").exists():  # same rows, same encoding: reuse, don't redo
            shutil.copytree(prepared, run / "data")
        phase_env = dict(env, **({} if tiny else env_more))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "llmcls.cli", command, *common, "--train.output_dir", str(run), "--train.grad_accum",
               str(accum), *more]
        print(f"[{time.perf_counter() - t_start:5.0f} s] {name}: {nproc} process(es), micro-batch {a.batch_size} "
              f"x accumulation {accum}", flush=True)
        r = _launch(cmd, out / "phases" / f"{name}.log", left, phase_env)
        r["grad_accum"] = accum
        if r["rc"] == 0:
            r.update(collect(run, out / "phases" / name, a.warmup_steps, scored=command == "run"))
            prepared = prepared or run / "data"
        else:
            print(f"{name} failed (rc {r['rc']}); log: {out / 'phases' / f'{name}.log'}", flush=True)
        res["phases"][name] = r

    # results
    p = res["phases"]
    gpu = next(((r.get("environment") or {}).get("gpu") for r in p.values() if (r.get("environment") or {}).get("gpu")),
               None)
    res["card"] = gpu["name"] if gpu else None
    res["devices"] = world if gpu else f"{world} processes"
    prep = work / "runs" / "single" / "data" / "prepare.json"
    if prep.is_file():
        s = json.loads(prep.read_text())
        res["tokens_per_row"] = round(s["trained_tokens"] / s["rows"], 1)
    single, ddp = p.get("single", {}), p.get("ddp", {})
    if single.get("tokens_per_s") and ddp.get("tokens_per_s"):
        x = ddp["tokens_per_s"] / single["tokens_per_s"]
        res["ddp_train_speedup"] = round(x, 3)
        res["checks"]["DDP training speed-up"] = (f"{x:.2f}× (target ≥ {TARGETS['ddp_train_speedup']}×: "
                                                  f"{'met' if x >= TARGETS['ddp_train_speedup'] else 'NOT met'})")
        res["checks"]["final loss, 1 GPU vs DDP (same rows per step)"] = (
            f"{single['final_loss']:.4f} vs {ddp['final_loss']:.4f}")
    if single.get("score_rows_per_s") and ddp.get("score_rows_per_s"):
        x = ddp["score_rows_per_s"] / single["score_rows_per_s"]
        res["ddp_score_speedup"] = round(x, 3)
        res["checks"]["sharded scoring speed-up"] = (f"{x:.2f}× (target ≥ {TARGETS['ddp_score_speedup']}×: "
                                                     f"{'met' if x >= TARGETS['ddp_score_speedup'] else 'NOT met'})")
    if p.get("fsdp", {}).get("peak_mem_gib_per_process") and ddp.get("peak_mem_gib_per_process"):
        f_mem, d_mem = max(p["fsdp"]["peak_mem_gib_per_process"]), max(ddp["peak_mem_gib_per_process"])
        res["checks"]["FSDP peak memory per GPU vs DDP"] = f"{f_mem:.1f} vs {d_mem:.1f} GiB"
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "multi_gpu.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    md = markdown(res)
    (out / "multi_gpu.md").write_text(md)
    print(md)
    return 0 if all(r.get("rc") == 0 or "skipped" in r for r in p.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
