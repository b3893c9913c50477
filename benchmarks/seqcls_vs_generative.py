"""The two training recipes side by side on one model, one card, one process: ``lora.task: generate`` (the answer
tokens after the prompt, candidates scored by log-likelihood) against ``lora.task: seq_cls`` (a classification head
on the same prompt, peft SEQ_CLS), issue 17.

Both read the same config (default: the fast one, ``configs/qwen1.5-7b-chat-fudan-fast.yaml``), the same files, the
same stratified 10% dev split, steps, learning rate and LoRA; the only changes are ``lora.task`` and, for seq_cls,
``train.packing: false`` (the head pools each row's last token; packed rows are refused, so seq_cls trains on
left-padded, length-grouped batches). For each: accuracy and macro-F1 on the test file, train tokens/s in steady
state (the tokens the model is fed, counted by llmcls's TokenCounter as in every run; seq_cls is fed no answer
tokens, so rows/s is given too), train wall seconds, and eval rows/s on the test file (a second, warm pass: the
first pays for compilation).

On the GPU machine::

    PYTHONUNBUFFERED=1 python benchmarks/seqcls_vs_generative.py --model DIR --data DIR --out OUT
        [--max-steps N] [--rows N] [--config configs/...yaml] [--set KEY=VALUE ...]

writes ``OUT/seqcls_vs_generative.json`` and ``OUT/seqcls_vs_generative.md``. ``--model tiny`` runs the random-init
tiny preset on a CPU (GPU-only settings, compile and packing, are switched off there and recorded).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from llmcls.config import load_config
from llmcls.env import environment
from llmcls.files import atomic_write_json, atomic_write_text
from llmcls.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
FAST = ROOT / "configs" / "qwen1.5-7b-chat-fudan-fast.yaml"
MODES = ("generate", "seq_cls")


def say(msg: str) -> None:
    print(f"[seqcls_vs_generative {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def log_clock():
    """A TrainerCallback noting, at every logging step, the time (the GPU synchronised: a few syncs per run) and
    the tokens TokenCounter has published by then."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: list = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                sync()
                self.marks.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))

    return Clock()


def steady(marks: list, rows_per_step: int) -> dict:
    """Rates between the second logging step and the last: the first interval holds compilation and warm-up."""
    if len(marks) < 3:  # too few logging steps for a steady interval: the whole logged span
        marks = marks[:1] + marks[-1:] if len(marks) >= 2 else []
    else:
        marks = marks[1:]
    if len(marks) < 2 or marks[-1][1] <= marks[0][1]:
        return {"tokens_per_s": None, "rows_per_s": None, "steps": 0}
    (s0, t0, n0), (s1, t1, n1) = marks[0], marks[-1]
    return {"tokens_per_s": round((n1 - n0) / (t1 - t0), 1), "rows_per_s": round((s1 - s0) * rows_per_step /
                                                                               (t1 - t0), 2), "steps": s1 - s0}


def one_mode(mode: str, a, common: dict, seq_only: dict) -> dict:
    from llmcls.recipes.evaluate import evaluate
    from llmcls.recipes.train import train
    from llmcls.rundir import load_trained

    overrides = {**common, "lora.task": mode, "train.output_dir": str(Path(a.workdir) / mode)}
    if mode == "seq_cls":
        overrides["train.packing"] = False  # refused with a head: it pools each row's last token
        overrides.update(seq_only)
    cfg = load_config(a.config, overrides)
    say(f"{mode}: training ({cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs} "
        f"{'steps' if cfg.train.max_steps > 0 else 'epochs'}, packing {cfg.train.packing}, compile "
        f"{cfg.train.compile})")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clock = log_clock()
    summary = train(cfg, overwrite=True, progress=False, callbacks=[clock])
    rows_per_step = cfg.train.batch_size * cfg.train.grad_accum
    rates = steady(clock.marks, rows_per_step)
    say(f"{mode}: {summary['global_step']} steps in {summary['wall_s']} s; steady {rates['tokens_per_s']} tokens/s, "
        f"{rates['rows_per_s']} rows/s")
    run = RunDir(cfg.train.output_dir)
    saved = run.load_config()
    model, tok, saved = load_trained(run.path, saved)
    say(f"{mode}: evaluating {saved.data.test_file} (twice: the second pass is the warm one)")
    first = evaluate(run.path, saved, model=model, tokenizer=tok, progress=False)
    warm = evaluate(run.path, saved, model=model, tokenizer=tok, progress=False)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out = {
        "task": mode, "packing": cfg.train.packing, "compile": cfg.train.compile,
        "accuracy": warm["accuracy"], "macro_f1": warm["macro_f1"], "test_rows": warm["rows"],
        "train_tokens_per_s_steady": rates["tokens_per_s"], "train_rows_per_s_steady": rates["rows_per_s"],
        "steady_steps": rates["steps"], "train_wall_s": summary["wall_s"], "global_step": summary["global_step"],
        "train_tokens_per_s_whole_run": summary["tokens_per_s"], "tokens_seen": summary["tokens_seen"],
        "train_loss": summary["train_loss"], "trainable": summary["trainable"],
        "skipped_steps": summary.get("skipped_steps"),
        "peak_mem_gib": summary["peak_mem_gib"], "eval_rows_per_s": warm["rows_per_s"],
        "eval_rows_per_s_first_pass": first["rows_per_s"], "eval_peak_mem_gib": warm["peak_mem_gib"],
        "dev": {k: v for k, v in (summary.get("selection") or {}).get("history", [{}])[-1].items()},
        "warmup": summary.get("warmup"),
    }
    say(f"{mode}: accuracy {out['accuracy']:.4f} macro-F1 {out['macro_f1']:.4f}, eval {out['eval_rows_per_s']} rows/s")
    return out


def table(res: dict) -> str:
    keys = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("train_tokens_per_s_steady", "train tokens/s (steady)"),
            ("train_rows_per_s_steady", "train rows/s (steady)"), ("train_wall_s", "train wall s"),
            ("eval_rows_per_s", "eval rows/s (warm)"), ("peak_mem_gib", "train peak GiB"), ("packing", "packing")]
    lines = ["| | " + " | ".join(MODES) + " | seq_cls / generate |", "| --- |" + " --- |" * (len(MODES) + 1)]
    for k, name in keys:
        vals = [res["modes"][m].get(k) for m in MODES]
        ratio = res["ratio"].get(k)
        lines.append(f"| {name} | " + " | ".join("" if v is None else (f"{v:.4f}" if isinstance(v, float) and v < 1
                                                                            else str(v)) for v in vals)
                     + f" | {'' if ratio is None else f'{ratio:.2f}x'} |")
    return header(res) + "\n".join(lines) + "\n"


def header(res: dict) -> str:
    """The line above a result table: model, card, config, versions, commit."""
    env = res["environment"]
    return (f"{res['model']} on {res['device']}; {res['config']}; torch {env['versions'].get('torch')}, "
            f"transformers {env['versions'].get('transformers')}, peft {env['versions'].get('peft')}; "
            f"git {env.get('git_commit')}\n\n")


def run_overrides(model: str, data: Path, max_steps=None, rows=None) -> dict:
    """The settings every run of a real-model comparison shares over its config: the files, a stratified 10% dev
    split (seed 0), no tracker, no dev scoring during training, no zero-shot pass; GPU-only levers off on a CPU."""
    common = {"model.name_or_path": model, "data.train_file": str(data / "train.jsonl"),
              "data.test_file": str(data / "test.jsonl"), "data.dev_fraction": 0.1, "data.split_seed": 0,
              "track.tracker": "none", "eval.every_steps": 0, "eval.zero_shot": False}
    if model != "tiny":
        common.update({"model.source": "local", "model.offline": True})
    if not torch.cuda.is_available():  # compile is slow to start and packing falls back to a dense mask on a CPU
        common.update({"train.compile": False, "eval.compile": False, "train.packing": False})
    if max_steps:
        common["train.max_steps"] = max_steps
        if max_steps <= 30:  # enough logging steps for a steady interval in a short run
            common["train.logging_steps"] = 1
    if rows:
        common.update({"data.max_train_rows": rows, "data.max_eval_rows": rows})
    return common


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face folder of the pretrained chat model, or 'tiny'.")
    p.add_argument("--data", required=True, help="Folder with train.jsonl and test.jsonl.")
    p.add_argument("--out", required=True, help="Where seqcls_vs_generative.json and .md go.")
    p.add_argument("--config", default=str(FAST), help="Config both modes start from (default: the fast one).")
    p.add_argument("--workdir", default="/tmp/llmcls-seqcls-bench", help="Run directories (default: %(default)s).")
    p.add_argument("--max-steps", type=int, default=None, help="Stop each training after N optimizer steps.")
    p.add_argument("--rows", type=int, default=None, help="Only the first N training rows and N test rows.")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="More overrides, for both modes.")
    p.add_argument("--seq-cls-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="Overrides for the seq_cls side only (recorded in the result's seq_cls_changes).")
    a = p.parse_args(argv)
    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    common = run_overrides(a.model, data, a.max_steps, a.rows)
    common.update(dict(kv.split("=", 1) for kv in a.set))
    device = torch.cuda.get_device_name() if cuda else "cpu"
    say(f"{a.model} on {device}, config {a.config}")
    t0 = time.perf_counter()
    seq_only = dict(kv.split("=", 1) for kv in a.seq_cls_set)
    modes = {m: one_mode(m, a, common, seq_only) for m in MODES}
    gen, seq = modes["generate"], modes["seq_cls"]
    ratio = {k: round(seq[k] / gen[k], 3) for k in ("train_tokens_per_s_steady", "train_rows_per_s_steady",
                                                    "train_wall_s", "eval_rows_per_s", "accuracy", "macro_f1")
             if isinstance(seq.get(k), (int, float)) and isinstance(gen.get(k), (int, float)) and gen[k]}
    res = {"model": a.model, "data": str(data), "config": a.config, "overrides": common,
           "seq_cls_changes": {"lora.task": "seq_cls", "train.packing": False, **seq_only}, "device": device,
           "modes": modes, "ratio": ratio, "wall_s": round(time.perf_counter() - t0, 1), "environment": environment()}
    atomic_write_json(out / "seqcls_vs_generative.json", res)
    md = table(res)
    atomic_write_text(out / "seqcls_vs_generative.md", md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
