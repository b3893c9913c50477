"""Multi-GPU scaling of ``llmcls`` on one 2-GPU machine, through the real commands users run.

Every run trains with a shipped config (default ``configs/qwen1.5-7b-chat-fudan-fast.yaml``: packed rows,
compiled decoder layers, micro-batch 16, bf16 adapters), read with ``llmcls.config.load_config``, with the
overrides a benchmark must control (``run_overrides``; each is explained there). Phases (each a separate launch,
so each measures what a user would get):

1. ``build``  a random-init model of the chosen shape (default: Qwen1.5-7B-Chat, bf16) saved as a local folder
   (cost depends on shapes, not on weight values), with the Qwen tokenizer;
2. ``single`` ``torchrun --nproc_per_node 1 -m llmcls.cli run -c CONFIG ...`` on GPU 0: LoRA training at global
   batch G (per-process micro-batch B, accumulation G/B), then scoring of the test rows;
3. ``ddp``    the same on 2 GPUs: ``torchrun --nproc_per_node 2``, micro-batch B, accumulation G/(2B), so the
   global batch and the rows seen are the same; scoring is sharded over both processes;
4. ``fsdp``   ``torchrun --nproc_per_node 2 -m llmcls.cli train -c CONFIG ... --train.fsdp full_shard`` at the
   same batch: per-GPU peak memory and tokens/s (training only).

Training rows are real Fudan news rows encoded by ``llmcls prepare`` (texts shortened so prompt + answer fit the
config's max length: realistic lengths). The figures come from each run's own files (``llmcls.rundir.RunDir``):
``train_summary.json`` (wall time, real tokens of all processes, peak memory, world size, steps),
``eval/metrics.json`` (scoring rows/s, all processes, merged) and ``data/prepare.json``. Training tokens/s is
measured after the warm-up steps, where compilation happens: the run logs every ``max_steps - warmup_steps``
steps, so the last line of ``train_log.jsonl`` holds the real tokens/s of exactly the steps after the warm-up;
``train_summary.json``'s whole-run figure (warm-up and compilation included) is kept beside it.

Run on the GPU machine (one command; 393 s on 2 x H200 with the 7B shape, the model's build included: each launch
spends about a minute loading and compiling before its first step)::

    python benchmarks/multi_gpu.py --out bench-out/multi_gpu

CPU smoke test (gloo, the tiny shape, no compilation, FSDP skipped: it needs CUDA)::

    python benchmarks/multi_gpu.py --shape tiny --out /tmp/bench-smoke

``--dry-run`` prints the resolved config and every phase's command, and runs nothing.

The Qwen2.5-72B shape on 4 or 8 GPUs (FSDP only: one card cannot hold it; not run yet, see the projection in
docs/distributed.md). Micro-batch 16 without recomputation does not fit (``benchmarks/multi_gpu_projection.py``
projects ~260 GiB per GPU); at the fast config's global batch 32, on 8 GPUs::

    python benchmarks/multi_gpu.py --shape benchmarks/shapes/qwen2.5-72b-instruct.json --processes 8 \
        --phases fsdp --batch-size 4 --global-batch 32 --gradient-checkpointing true --budget-s 3000 \
        --out bench-out/multi_gpu-72b

(4 GPUs: ``--processes 4 --batch-size 8``; without recomputation try ``--batch-size 4``, projected to fit.) The
model is built in host memory (145 GB of bf16, more than one card) and saved once (~145 GB of disk), and FSDP's
loading briefly holds one model-sized buffer per process in host memory (docs/distributed.md): ~580 GB for 4
processes and ~1.2 TB for 8, more than the lent 4- and 8-GPU hosts have (512 / 560 GiB); untested. Measure the interconnect first: ``torchrun --standalone --nproc_per_node N
benchmarks/nccl_bandwidth.py``.

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

from llmcls.config import Config, load_config, to_dict
from llmcls.files import atomic_write_json, atomic_write_text
from llmcls.rundir import RunDir, read_json

ROOT = Path(__file__).resolve().parents[1]
FAST_CONFIG = ROOT / "configs" / "qwen1.5-7b-chat-fudan-fast.yaml"
TARGETS = {"ddp_train_speedup": 1.85, "ddp_score_speedup": 1.9}


def _shared() -> Path | None:
    env = os.environ.get("LLMCLS_SHARED")  # as benchmarks/gpu_speed.py
    for p in (*([Path(env).resolve()] if env else []), ROOT / "shared", ROOT.parent / "shared"):
        if (p / "qwen-tokenizer").is_dir():
            return p
    return None


# ----------------------------------------------------------------------------------------------- build
def shape_config(shape: str | Path):
    """``--shape``'s JSON (a published ``config.json``'s fields: ``../shared/model-shapes/*.json``,
    ``benchmarks/shapes/*.json``) as a transformers ``Qwen2Config``."""
    from transformers import Qwen2Config

    return Qwen2Config(**json.loads(Path(shape).read_text()))


def build(shape: str, tokenizer: str, out: Path) -> dict:
    """Runs in its own process (``_build``) so the parent never holds a GPU context."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    t0 = time.perf_counter()
    if shape == "tiny":
        from llmcls.config import TinyConfig
        from llmcls.model.tiny import build_tiny

        build_tiny(TinyConfig(), tok, out, seed=0)
    else:
        from transformers import Qwen2ForCausalLM

        cfg = shape_config(shape)
        torch.manual_seed(0)
        with torch.device("meta"):  # the size first: a model larger than the card is built in host memory
            size = 2 * sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())
        fits = torch.cuda.is_available() and size < 0.8 * torch.cuda.mem_get_info()[0]
        device = "cuda" if fits else "cpu"
        torch.set_default_dtype(torch.bfloat16)  # initialise straight in bf16: no fp32 copy of 7B weights
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.replace(out)
    return {"seconds": round(time.perf_counter() - t0, 1)}


def ensure_model(shape: str, tokenizer: str, model_dir: Path, log: Path, timeout: float, env: dict) -> dict:
    """The model folder of ``shape`` (reused when it exists): the tiny preset built here, any other shape in its own
    process (``--_build``), so that the caller never holds a GPU context. Returns the phase's record (``rc``); says
    how long the build took, or why it failed."""
    if (model_dir / "config.json").is_file():
        return {"rc": 0, "reused": str(model_dir)}
    if shape == "tiny":
        r = {"rc": 0, **build("tiny", tokenizer, model_dir)}
    else:
        r = _launch([sys.executable, str(Path(__file__).resolve()), "--tokenizer", tokenizer, "--_build", shape,
                     str(model_dir)], log, timeout, env)
    if r["rc"] != 0:
        print(f"building the model failed:\n{r.get('log_tail')}", file=sys.stderr)
    else:
        print(f"model folder {model_dir} built in {r['seconds']:.0f} s", flush=True)
    return r


# ----------------------------------------------------------------------------------------- the run config
def run_overrides(a: argparse.Namespace, model_dir: Path, test_file: Path, tiny: bool) -> dict:
    """What the benchmark sets over the shipped config, for every phase (the phase adds its output folder, its
    accumulation and, for FSDP, ``train.fsdp``). Anything not named here is the config's own setting."""
    measured = a.max_steps - a.warmup_steps
    over = {
        # the random-init model of --shape, built by the first phase (a real download is not what is measured)
        "model.name_or_path": str(model_dir), "model.source": "local",
        # the shared Fudan rows, wherever the benchmark runs from (the config's paths are relative to the repo)
        "data.train_file": str(Path(a.data) / "train.jsonl"), "data.test_file": str(test_file),
        # a bounded run: a few hundred rows prepared, a fixed number of steps, a fixed number of scored rows
        "data.max_train_rows": a.train_rows, "data.max_eval_rows": a.eval_rows, "train.max_steps": a.max_steps,
        # a log line after the warm-up and one at the end, nothing between: the last line's tokens/s is the
        # measured steps' own (see train_rate); no checkpoint inside the timing
        "train.logging_steps": measured, "train.save_steps": 10**6,
        # no tracker: nothing uploaded or written beside the run's own files
        "track.tracker": "none",
        # scoring ~1,000 rows: compilation (~30 s per process) would outweigh it, as the config's own eval.compile
        # note says (it pays from a few thousand rows); --eval-compile keeps the config's setting
        **({} if a.eval_compile else {"eval.compile": False}),
    }
    # the benchmark's options override the config only when given
    for key, value in (("train.batch_size", a.batch_size), ("data.max_length", a.max_length),
                       ("eval.batch_size", a.eval_batch_size),
                       ("train.gradient_checkpointing", a.gradient_checkpointing)):
        if value is not None:
            over[key] = value
    if tiny:
        # the folder holds the tiny model; the tokenizer is the shared Qwen one. Compiling takes minutes on a
        # CPU, and the smoke run checks the plumbing, not the speed.
        over.update({"model.tokenizer": a.tokenizer, "train.compile": False, "eval.compile": False})
    return over


def cli_options(overrides: dict) -> list[str]:
    """``{"train.lr": 2e-4}`` as the command line's ``--train.lr 0.0002``."""
    out = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list):
            value = ",".join(map(str, value))
        out += [f"--{key}", str(value)]
    return out


def _shown(path: str) -> str:
    """A path inside the repository relative to it (``configs/...yaml``), any other as given."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


# --------------------------------------------------------------------------------------------- phases
def _env() -> dict:
    # the installed llmcls, as users run it: nothing is put on the path
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


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


def train_rate(run: RunDir, warmup: int, max_steps: int) -> dict:
    """Real tokens/s of all processes over the steps after ``warmup``, and the whole run's, from the run's files.

    ``train_summary.json`` counts the whole run: the warm-up steps, where the decoder layers compile, included. The
    run logs every ``max_steps - warmup`` steps (``run_overrides``), so the last line of ``train_log.jsonl`` that
    carries a tokens/s is the rate over exactly steps ``warmup + 1 .. max_steps``, read after the GPU finished
    them (the token count is read back at each log)."""
    summary = read_json(run.train_summary)
    if summary is None:
        raise FileNotFoundError(f"{run.train_summary} is missing or unreadable")
    out = {"global_step": summary["global_step"], "wall_s": summary["wall_s"],
           "tokens_seen": summary["tokens_seen"], "whole_run_tokens_per_s": summary["tokens_per_s"],
           "final_loss": summary.get("final_logged_loss"), "peak_mem_gib": summary.get("peak_mem_gib"),
           "peak_mem_gib_per_process": summary.get("peak_mem_gib_per_process", [summary.get("peak_mem_gib")]),
           "world_size": summary.get("world_size", 1), "environment": summary.get("environment")}
    rated = []
    if run.train_log.is_file():
        rated = [r for r in map(json.loads, run.train_log.read_text().splitlines()) if "tokens_per_s" in r]
    # the measured interval: a log line at the warm-up's last step, the next one at the last step
    if (warmup > 0 and len(rated) >= 2 and rated[-1]["step"] == max_steps == summary["global_step"]
            and rated[-2]["step"] == warmup):
        out.update(tokens_per_s=rated[-1]["tokens_per_s"], measured_steps=max_steps - warmup)
    else:  # no warm-up asked for, or the log does not bracket it: the whole run's rate
        out.update(tokens_per_s=summary["tokens_per_s"], measured_steps=summary["global_step"],
                   measured_note="whole run (warm-up included)")
    return out


def collect(run: RunDir, phase_dir: Path, warmup: int, max_steps: int, scored: bool) -> dict:
    phase_dir.mkdir(parents=True, exist_ok=True)
    for f in (run.train_summary, run.train_log, run.eval.metrics, run.config_file):
        if f.is_file():
            shutil.copy(f, phase_dir / f.name)
    out = train_rate(run, warmup, max_steps)
    if scored:
        m = read_json(run.eval.metrics)
        if m is None:
            raise FileNotFoundError(f"{run.eval.metrics} is missing or unreadable")
        out.update(score_rows=m["rows"], score_rows_per_s=m["rows_per_s"], score_wall_s=m["wall_s"])
    return out


# ------------------------------------------------------------------------------------------------ report
def markdown(res: dict) -> str:
    p, a = res["phases"], res["settings"]
    card = res.get("card") or "CPU (gloo)"
    knobs = a.get("train_settings", {})
    extra = ", ".join(k for k, on in (("packed rows", knobs.get("packing")), ("compiled layers", knobs.get("compile")))
                      if on)
    # runs stored before the benchmark started from a shipped config name none
    config = f"`{a['config']}`{' (' + extra + ')' if extra else ''}: " if a.get("config") else ""
    lines = [f"### Multi-GPU scaling — {res['shape_name']}, {card} × {res['devices']}",
             "",
             f"{config}LoRA r={a['lora_r']} on all projections, bf16 "
             f"weights on GPUs, global batch {a['global_batch']} rows, per-process micro-batch {a['batch_size']}, "
             f"{a['max_steps']} steps (tokens/s measured after step {a['warmup_steps']}), Fudan news rows at "
             f"max_length {a['max_length']} (mean {res.get('tokens_per_row', '?')} real tokens per row), gradient "
             f"checkpointing {'on' if a['gradient_checkpointing'] else 'off'}; scoring {a['eval_rows']} test "
             f"rows{' (' + a['eval_rows_note'] + ')' if a.get('eval_rows_note') else ''}, eval batch "
             f"{a['eval_batch_size']}{', compiled' if a.get('eval_compile') else ''}.",
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = _shared()
    ap.add_argument("--config", default=str(FAST_CONFIG),
                    help="Shipped config every run starts from (default: configs/qwen1.5-7b-chat-fudan-fast.yaml).")
    ap.add_argument("--shape", default=str(shared / "model-shapes" / "qwen1.5-7b-chat.json") if shared else None,
                    help="Model config JSON, or 'tiny' (CPU smoke test).")
    ap.add_argument("--tokenizer", default=str(shared / "qwen-tokenizer") if shared else None)
    ap.add_argument("--data", default=str(shared / "data" / "fudan-news") if shared else None,
                    help="Folder with train.jsonl and test.jsonl.")
    ap.add_argument("--out", default="bench-out/multi_gpu", help="Results folder (small files only).")
    ap.add_argument("--workdir", default="/tmp/llmcls-bench", help="Model folder and run directories (large).")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, help="Rows per process per micro-batch (default: the config's).")
    ap.add_argument("--global-batch", type=int,
                    help="Rows per optimizer step, all processes (default: batch size x processes, so that the "
                         "multi-process runs keep the config's accumulation and one process accumulates more).")
    ap.add_argument("--max-steps", type=int, default=16)
    ap.add_argument("--warmup-steps", type=int, default=8,
                    help="Steps left out of the tokens/s figure (compilation happens there); a multiple of "
                         "max-steps - warmup-steps (the run logs at that interval).")
    ap.add_argument("--train-rows", type=int, default=1024)
    ap.add_argument("--eval-rows", type=int, default=1024, help="A multiple of 2 x eval batch keeps shards even.")
    ap.add_argument("--eval-batch-size", type=int, help="Scoring batch (default: the config's).")
    ap.add_argument("--eval-compile", action="store_true",
                    help="Keep the config's eval.compile (default: off, see run_overrides).")
    ap.add_argument("--max-length", type=int, help="Tokens per training row (default: the config's).")
    ap.add_argument("--gradient-checkpointing", choices=["true", "false"],
                    help="Recompute activations (default: the config's).")
    ap.add_argument("--phases", default="single,ddp,fsdp")
    ap.add_argument("--budget-s", type=float, default=540, help="Skip phases that would start past this.")
    ap.add_argument("--extra", default="", help="More llmcls options for every run, e.g. '--train.lr 2e-4'.")
    ap.add_argument("--dry-run", action="store_true", help="Print the resolved config and the phases' commands; "
                                                          "build and run nothing.")
    ap.add_argument("--_build", nargs=2, metavar=("SHAPE", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a._build:
        print(json.dumps(build(a._build[0], a.tokenizer, Path(a._build[1]))))
        return 0
    if not (a.shape and a.tokenizer and a.data):
        ap.error("shared/ not found: pass --shape, --tokenizer and --data")
    measured = a.max_steps - a.warmup_steps
    if measured < 1 or a.warmup_steps < 0 or (a.warmup_steps and a.warmup_steps % measured):
        ap.error(f"--warmup-steps {a.warmup_steps} must be a multiple of --max-steps - --warmup-steps ({measured}), "
                 "which must be at least 1: the run logs at that interval, and the last interval is measured")
    phases = [p for p in a.phases.split(",") if p]
    unknown = set(phases) - {"single", "ddp", "fsdp"}
    if unknown:
        ap.error(f"--phases: unknown {', '.join(sorted(unknown))}")

    t_start = time.perf_counter()
    deadline = t_start + a.budget_s
    out, work = Path(a.out), Path(a.workdir)
    tiny = a.shape == "tiny"
    shape_name = "tiny" if tiny else Path(a.shape).stem
    model_dir = work / f"model-{shape_name}"
    test_file = Path(a.data) / "test.jsonl"

    # A carried subset of the test file may hold fewer rows than asked for: repeat it (rows/s depends on the
    # rows' lengths, which repeating keeps, not on which rows they are).
    test_rows = test_file.read_text(encoding="utf-8").splitlines()
    eval_rows_note = None
    if len(test_rows) < a.eval_rows:
        test_file = work / "test-repeated.jsonl"
        eval_rows_note = f"the {len(test_rows)} test rows repeated to {a.eval_rows}"
    over = run_overrides(a, model_dir, test_file, tiny)
    cfg: Config = load_config(a.config, over)  # the config every run resolves to (but per-phase keys), checked now
    batch = cfg.train.batch_size
    global_batch = a.global_batch or batch * a.processes
    world = a.processes
    plans = {  # --no-baseline: the TF-IDF baseline is not what is measured here
        "single": (1, "run", ["--no-baseline"], {"CUDA_VISIBLE_DEVICES": "0"}),
        "ddp": (world, "run", ["--no-baseline"], {}),
        "fsdp": (world, "train", ["--train.fsdp", "full_shard"], {}),
    }
    for name in phases:
        nproc = plans[name][0]
        if global_batch % (batch * nproc):
            ap.error(f"global batch {global_batch} is not a multiple of micro-batch {batch} x {nproc} processes")

    def command(name: str) -> list[str]:
        nproc, cmd, more, _ = plans[name]
        run = work / "runs" / name
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "llmcls.cli", cmd, "-c", str(a.config), *cli_options(over), *a.extra.split(),
                "--train.output_dir", str(run), "--train.grad_accum", str(global_batch // (batch * nproc)),
                "--overwrite", *more]

    if a.dry_run:
        import yaml

        print("# the config every phase runs (each sets its own train.output_dir and train.grad_accum)")
        shown = {k: v for k, v in to_dict(cfg).items() if k in ("model", "data", "prompt", "lora", "train", "eval",
                                                                 "track")}
        print(yaml.safe_dump(shown, sort_keys=False, allow_unicode=True))
        for name in phases:
            print(f"# {name}\n{' '.join(command(name))}\n")
        return 0
    import importlib.util

    missing = [m for m in ("torch", "transformers", "peft", "accelerate", "datasets", "sklearn")
               if importlib.util.find_spec(m) is None]
    if missing:  # fail in seconds, not after building a model
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 1

    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = _env()
    if tiny:  # one thread per process, as torchrun gives each of several: the 1-process run is then comparable
        env.update(LLMCLS_TOKENIZER=a.tokenizer, OMP_NUM_THREADS="1")
    res: dict = {"shape": a.shape, "shape_name": shape_name, "phases": {}, "checks": {},
                 "settings": {"config": _shown(a.config), "overrides": over,
                              "global_batch": global_batch, "batch_size": batch, "max_steps": a.max_steps,
                              "warmup_steps": a.warmup_steps, "train_rows": a.train_rows,
                              "eval_rows": a.eval_rows, "eval_batch_size": cfg.eval.batch_size,
                              "eval_compile": cfg.eval.compile, "max_length": cfg.data.max_length,
                              "lora_r": cfg.lora.r, "gradient_checkpointing": cfg.train.gradient_checkpointing,
                              "train_settings": {"packing": cfg.train.packing, "compile": cfg.train.compile,
                                                 "group_by_length": cfg.train.group_by_length,
                                                 "lora_dtype": cfg.lora.dtype},
                              "extra": a.extra}}
    if eval_rows_note:
        res["settings"]["eval_rows_note"] = eval_rows_note
        test_file.write_text("".join(test_rows[i % len(test_rows)] + "\n" for i in range(a.eval_rows)),
                             encoding="utf-8")

    # 1. the model folder (reused when it exists)
    if not (model_dir / "config.json").is_file():
        r = _launch([sys.executable, __file__, "--tokenizer", a.tokenizer, "--_build", a.shape, str(model_dir)],
                    out / "phases" / "build.log", deadline - time.perf_counter(), env)
        res["phases"]["build"] = r
        if r["rc"] != 0:
            print(f"building the model failed:\n{r.get('log_tail')}", file=sys.stderr)
            return 1
    else:
        res["phases"]["build"] = {"rc": 0, "reused": str(model_dir)}

    prepared: Path | None = None
    for name in phases:
        nproc, cmd, _, env_more = plans[name]
        accum = global_batch // (batch * nproc)
        if name == "fsdp" and tiny:
            res["phases"][name] = {"skipped": "FSDP needs CUDA GPUs (accelerate runs DDP on CPUs)"}
            continue
        left = deadline - time.perf_counter()
        if left < 30:
            res["phases"][name] = {"skipped": f"time budget ({a.budget_s:.0f} s) spent"}
            continue
        run = RunDir(work / "runs" / name)
        if prepared is not None and not run.data.path.exists():  # same rows, same encoding: reuse, don't redo
            shutil.copytree(prepared, run.data.path)
        phase_env = dict(env, **({} if tiny else env_more))
        print(f"[{time.perf_counter() - t_start:5.0f} s] {name}: {nproc} process(es), micro-batch {batch} "
              f"x accumulation {accum}", flush=True)
        r = _launch(command(name), out / "phases" / f"{name}.log", left, phase_env)
        r["grad_accum"] = accum
        if r["rc"] == 0:
            try:
                r.update(collect(run, out / "phases" / name, a.warmup_steps, a.max_steps, scored=cmd == "run"))
            except (OSError, KeyError, ValueError) as e:  # the run finished but its files are not as expected
                r.update(rc="unreadable", error=f"{type(e).__name__}: {e}")
            prepared = prepared or run.data.path
        else:
            print(f"{name} failed (rc {r['rc']}); log: {out / 'phases' / f'{name}.log'}", flush=True)
        res["phases"][name] = r

    # results
    p = res["phases"]
    gpu = next(((r.get("environment") or {}).get("gpu") for r in p.values() if (r.get("environment") or {}).get("gpu")),
               None)
    res["card"] = gpu["name"] if gpu else None
    res["devices"] = world if gpu else f"{world} processes"
    prep = read_json(RunDir(work / "runs" / "single").data.summary)
    if prep and prep.get("rows"):
        res["tokens_per_row"] = round(prep["trained_tokens"] / prep["rows"], 1)
    single, ddp = p.get("single", {}), p.get("ddp", {})
    if single.get("tokens_per_s") and ddp.get("tokens_per_s"):
        x = ddp["tokens_per_s"] / single["tokens_per_s"]
        res["ddp_train_speedup"] = round(x, 3)
        res["checks"]["DDP training speed-up"] = (f"{x:.2f}× (target ≥ {TARGETS['ddp_train_speedup']}×: "
                                                  f"{'met' if x >= TARGETS['ddp_train_speedup'] else 'NOT met'})")
        if single.get("final_loss") is not None and ddp.get("final_loss") is not None:
            res["checks"]["final loss, 1 GPU vs DDP (same rows per step)"] = (
                f"{single['final_loss']:.4f} vs {ddp['final_loss']:.4f}")
    whole = [f"{name} {r['whole_run_tokens_per_s']:,.0f} in {r['wall_s']:.1f} s"
             for name, r in ((n, p.get(n, {})) for n in ("single", "ddp", "fsdp"))
             if r.get("whole_run_tokens_per_s") and "measured_note" not in r]
    if whole:
        res["checks"]["whole-run training tokens/s (warm-up and compilation included)"] = ", ".join(whole)
    if single.get("score_rows_per_s") and ddp.get("score_rows_per_s"):
        x = ddp["score_rows_per_s"] / single["score_rows_per_s"]
        res["ddp_score_speedup"] = round(x, 3)
        res["checks"]["sharded scoring speed-up"] = (f"{x:.2f}× (target ≥ {TARGETS['ddp_score_speedup']}×: "
                                                     f"{'met' if x >= TARGETS['ddp_score_speedup'] else 'NOT met'})")
    if p.get("fsdp", {}).get("peak_mem_gib_per_process") and ddp.get("peak_mem_gib_per_process"):
        f_mem, d_mem = p["fsdp"]["peak_mem_gib_per_process"], ddp["peak_mem_gib_per_process"]
        if None not in f_mem and None not in d_mem:
            res["checks"]["FSDP peak memory per GPU vs DDP"] = f"{max(f_mem):.1f} vs {max(d_mem):.1f} GiB"
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    atomic_write_json(out / "multi_gpu.json", res)
    md = markdown(res)
    atomic_write_text(out / "multi_gpu.md", md)
    print(md)
    return 0 if all(r.get("rc") == 0 or "skipped" in r for r in p.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
