"""Rows per second of ``llmcls prepare`` on the Fudan training file: the one-row-at-a-time encoding (the path
before issue 16's item 6, kept as ``llmcls.recipes.prepare.encode_one_by_one``) against the batched encoding
spread over ``data.num_proc`` processes, each run checked to write the same encoded rows and summary.

Each figure is one whole ``prepare`` call (read, validate, encode, write the instructions and the encoded dataset)
into a new folder, so nothing is cached; a small prepare first imports what prepare imports (datasets, pandas)
and compiles the chat template, so the figures are per-row throughput, not a process's start-up. Wall-clock
rows/s, and CPU milliseconds per row (this process and its workers).

    python benchmarks/prepare_speed.py --out docs/bench/prepare_speed.json
    python benchmarks/prepare_speed.py --repeat 20000 --num-proc 1,4,16 --out prepare_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from llmcls.config import load_config
from llmcls.env import cpu_model, environment
from llmcls.files import atomic_write_json
from llmcls.recipes import prepare as prep

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMCLS_SHARED", ROOT.parent / "shared"))


def _cpu_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def repeated(src: Path, rows: int | None, dest: Path) -> Path:
    """``src``'s lines repeated (the last copy cut) to ``rows`` lines; ``src`` itself when ``rows`` is None."""
    if rows is None:
        return src
    lines = [ln for ln in src.read_text(encoding="utf-8").splitlines(keepends=True) if ln.strip()]
    dest.write_text("".join(lines[i % len(lines)] for i in range(rows)), encoding="utf-8")
    return dest


def timed(cfg, tokenizer, out: Path, old: bool) -> tuple[dict, float, float]:
    """One prepare into ``out``: (summary, wall seconds, CPU seconds)."""
    real = prep.encode_rows
    if old:  # the rows encoded one at a time, in this process, as prepare did before
        prep.encode_rows = lambda b, rows, p, n=None, progress=False, measure=None: iter(
            prep.encode_one_by_one(b, rows, p))
    try:
        c0, t0 = _cpu_s(), time.perf_counter()
        summary = prep.prepare(cfg, tokenizer, out, progress=False)
        return summary, time.perf_counter() - t0, _cpu_s() - c0
    finally:
        prep.encode_rows = real


def encoded(out: Path) -> dict:
    from datasets import load_from_disk

    return load_from_disk(str(out / "encoded")).to_dict()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "qwen1.5-7b-chat-fudan.yaml"))
    ap.add_argument("--tokenizer", default=str(SHARED / "qwen-tokenizer"))
    ap.add_argument("--train", default=str(SHARED / "data" / "fudan-news" / "train.jsonl"))
    ap.add_argument("--repeat", type=int, default=None, metavar="N",
                    help="prepare N rows: the file's rows repeated (default: the file once)")
    ap.add_argument("--num-proc", default="1,2,4,8,16",
                    help="data.num_proc values to time, comma-separated (those above this machine's cores dropped)")
    ap.add_argument("--windows", action="store_true", help="train.long_text_windows=all (every window an example)")
    ap.add_argument("--no-old", action="store_true", help="skip the one-by-one path (and the check against it)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--out", default="prepare_speed.json")
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    cores = prep.available_cpus()
    procs = sorted({n for n in map(int, a.num_proc.split(",")) if 1 <= n <= cores})
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    overrides = {"data.train_file": a.train, **dict(kv.split("=", 1) for kv in a.set)}
    if a.windows:
        overrides["train.long_text_windows"] = "all"
    load_before = os.getloadavg()  # other work on the machine shares its cores: the figures say how much
    work = Path(tempfile.mkdtemp(prefix="prepare_speed."))
    try:
        train = repeated(Path(a.train), a.repeat, work / "train.jsonl")
        cfg = load_config(a.config, {**overrides, "data.train_file": str(train)})
        # imports and the template's compilation, outside every timing
        prep.prepare(load_config(a.config, {**overrides, "data.max_train_rows": 16}), tokenizer, work / "warm",
                     progress=False)
        runs: dict = {}
        reference = ref_rows = None
        if not a.no_old:
            reference, wall, cpu = timed(cfg, tokenizer, work / "old", old=True)
            ref_rows = encoded(work / "old")
            runs["one_by_one"] = {"wall_s": round(wall, 2), "rows_per_s": round(reference["rows"] / wall, 1),
                                  "cpu_ms_per_row": round(1000 * cpu / reference["rows"], 2)}
            print("one_by_one", json.dumps(runs["one_by_one"]), flush=True)
            shutil.rmtree(work / "old")
        for n in procs:
            cfg_n = load_config(a.config, {**overrides, "data.train_file": str(train), "data.num_proc": n})
            summary, wall, cpu = timed(cfg_n, tokenizer, work / f"new{n}", old=False)
            r = {"wall_s": round(wall, 2), "rows_per_s": round(summary["rows"] / wall, 1),
                 "cpu_ms_per_row": round(1000 * cpu / summary["rows"], 2)}
            if reference is not None:
                r["same_summary"] = {k: v for k, v in summary.items() if k != "dev"} == \
                    {k: v for k, v in reference.items() if k != "dev"}
                r["same_rows"] = encoded(work / f"new{n}") == ref_rows
                r["speedup"] = round(runs["one_by_one"]["wall_s"] / wall, 2)
            runs[f"num_proc_{n}"] = r
            print(f"num_proc_{n}", json.dumps(r), flush=True)
            shutil.rmtree(work / f"new{n}")
            rows = summary["rows"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import tokenizers

    env = environment()
    env["versions"]["tokenizers"] = tokenizers.__version__
    env["cpu"] = {"model": cpu_model(), "count": os.cpu_count(), "available": cores,
                  "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
    res = {"benchmark": "prepare_speed", "environment": env,
           "settings": {"config": os.path.relpath(a.config, ROOT), "train": a.train, "rows": rows,
                        "repeat": a.repeat, "max_length": cfg.data.max_length, "truncation": cfg.data.truncation,
                        "long_text_windows": cfg.train.long_text_windows, "overrides": a.set},
           "runs": runs,
           "checks": {"all_same_as_one_by_one": all(r.get("same_rows") and r.get("same_summary")
                                                    for k, r in runs.items() if k != "one_by_one")
                      if reference is not None else None}}
    atomic_write_json(a.out, res)
    print("| path | rows/s | CPU ms/row | same rows |\n| --- | --- | --- | --- |")
    for k, r in runs.items():
        print(f"| {k} | {r['rows_per_s']} | {r['cpu_ms_per_row']} | {r.get('same_rows', '-')} |")
    return res


if __name__ == "__main__":
    main()
