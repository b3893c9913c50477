"""Bounded load test of ``llmcls serve`` on loopback: dynamic batching against one request at a time.

    python benchmarks/serve_load.py                                  # CPU, tiny preset
    python benchmarks/serve_load.py --shape qwen1.5-7b --device cuda # GPU, Qwen1.5-7B shape, bf16

It imports the installed ``llmcls`` (``pip install -e '.[serve]'``).

The same server (``llmcls.serving.app.create_app`` on uvicorn, 127.0.0.1, a free port) runs twice on the same model
and the same offered load: ``--concurrency`` clients in a closed loop, each posting one row and sending the next when
the answer comes. Once with dynamic batching (``--max-batch``), once with ``max_batch=1`` (every row its own forward
pass, as a server without batching would do). The clients run in separate processes (``--client-procs``), so their
HTTP and JSON work does not share the server's interpreter lock, nor cap the rate they can offer. Each
mode warms up, then measures for ``--seconds``.

Rows are of realistic length: the Fudan news test rows (texts up to 3,000 characters, 2-4 candidates each),
shortened to ``--max-length`` tokens like in training (384, the tutorial's). Weights are random (a Qwen2 model
built from a config): the cost of a forward pass does not depend on the values of the weights.

Output: a JSON file and a markdown table (card, p50/p99 latency, rows/s, ratio) beside it, and the table on stdout.
The whole run is bounded by ``--time-limit-s`` (the measuring windows shrink to fit).
Without FastAPI/uvicorn installed it falls back to ``--transport inprocess``: the same batcher driven by asyncio
tasks in-process, without HTTP (the result says which transport ran).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE_FILES = {"qwen1.5-7b": "qwen1.5-7b-chat.json", "qwen2.5-7b": "qwen2.5-7b-instruct.json",
               "qwen2.5-0.5b": "qwen2.5-0.5b-instruct.json"}
PRESETS = {  # per device: what a bounded run can afford
    "cpu": {"seconds": 20, "warmup_s": 4, "concurrency": 16, "max_batch": 16, "max_length": "384",
            "client_procs": 1},
    "cuda": {"seconds": 30, "warmup_s": 6, "concurrency": 64, "max_batch": 32, "max_length": "384,128",
             "client_procs": 4},
}


# ------------------------------------------------------------------------------------------- load generator
async def drive(send, rows: list[dict], concurrency: int, warmup_s: float, seconds: float,
                start_at: float | None = None) -> dict:
    """``concurrency`` closed-loop clients; requests completed inside the measuring window are counted. The window
    opens ``warmup_s`` from now, or at wall-clock time ``start_at`` (so that several processes share it)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    start = t0 + (start_at - time.time() if start_at is not None else warmup_s)
    end = start + seconds
    latencies, errors, statuses = [], 0, {}
    counter = iter(range(10**9))

    async def client():
        nonlocal errors
        while loop.time() < end:
            row = rows[next(counter) % len(rows)]
            t = loop.time()
            try:
                status = await send(row)
            except Exception as e:  # a failed request is counted, not fatal: the test reports it
                status = type(e).__name__
            done = loop.time()
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status != 200:
                errors += 1
            elif t >= start and done <= end:
                latencies.append((done - t) * 1000)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"window_s": seconds, "completed": len(latencies), "errors": errors, "statuses": statuses,
            "latencies_ms": latencies}


def client_main(args) -> int:
    """The load generator as its own process (``--client URL``): prints one JSON object."""
    import httpx

    rows = [json.loads(l) for l in Path(args.rows_file).read_text(encoding="utf-8").splitlines()]

    async def run():
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
        async with httpx.AsyncClient(base_url=args.client, timeout=300, limits=limits, headers=headers) as c:
            async def send(row):
                r = await c.post("/classify", json={"text": row["text"], "candidates": row["candidates"]})
                return r.status_code

            return await drive(send, rows, args.concurrency, args.warmup_s, args.seconds, args.start_at)

    print(json.dumps(asyncio.run(run())))
    return 0


# ------------------------------------------------------------------------------------------------ set-up
def find_shared(explicit: str | None) -> Path | None:
    for p in (explicit, os.environ.get("LLMCLS_SHARED"), ROOT / "shared", ROOT.parent / "shared"):
        if p and Path(p).is_dir():
            return Path(p)
    return None


def load_rows(shared: Path | None, n: int, seed: int) -> tuple[list[dict], str]:
    path = shared / "data" / "fudan-news" / "test.jsonl" if shared else None
    if path and path.is_file():
        raw = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        random.Random(seed).shuffle(raw)
        return [{"text": r["text"], "candidates": r["category"]} for r in raw[:n]], str(path)
    # No shared data (a fresh clone): texts of about the same length, with the same label set size.
    rng = random.Random(seed)
    labels = [f"Label{i}" for i in range(20)]
    words = "the of and a to in is was it for on with as by at from this that news report market".split()
    rows = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(150, 600)))
        rows.append({"text": text, "candidates": rng.sample(labels, rng.randint(2, 4))})
    return rows, "synthetic (shared/data/fudan-news not found)"


def build_model(shape: str, device: str, shared: Path | None, tok, tmp: Path):
    import torch

    if shape == "tiny":
        from transformers import AutoModelForCausalLM

        from llmcls.config import TinyConfig
        from llmcls.model.tiny import build_tiny

        folder = build_tiny(TinyConfig(), tok, tmp / "tiny", seed=0)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval(), "float32"
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape_file = Path(shape) if shape.endswith(".json") else (shared / "model-shapes" / SHAPE_FILES[shape]
                                                              if shared else None)
    if shape_file is None or not shape_file.is_file():
        raise SystemExit(f"model shape file not found for {shape!r} (pass --shared DIR holding model-shapes/)")
    conf = json.loads(shape_file.read_text())
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:  # built in place on the device in its dtype: 7B parameters never exist as float32 on the host
        with torch.device(device):
            model = Qwen2ForCausalLM(Qwen2Config(**conf))
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), str(dtype).replace("torch.", "")


def card_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU, {cores} cores"


def summarise(name: str, max_batch: int, raw: dict, batcher: dict) -> dict:
    lat = sorted(raw["latencies_ms"])
    q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None)
    return {"mode": name, "max_batch": max_batch, "requests": raw["completed"], "errors": raw["errors"],
            "statuses": raw["statuses"], "window_s": round(raw["window_s"], 2),
            "rows_per_s": round(raw["completed"] / raw["window_s"], 2) if raw["window_s"] else None,
            "p50_ms": round(q(0.50), 1) if lat else None, "p99_ms": round(q(0.99), 1) if lat else None,
            "mean_ms": round(statistics.fmean(lat), 1) if lat else None,
            "server_mean_batch": batcher.get("mean_batch"), "server_largest_batch": batcher.get("largest_batch")}


def run_mode(clf, name: str, max_batch: int, args, rows_file: Path, rows: list[dict], seconds: float) -> dict:
    from llmcls.serving.batcher import Batcher

    if args.transport == "inprocess":
        async def go():
            b = Batcher(clf.score, max_batch, args.max_wait_ms if max_batch > 1 else 0.0,
                        prepare=clf.prepare)
            b.start()

            async def send(row):
                from llmcls.data import Row

                await b.submit([Row(row["text"], row["candidates"], None)])
                return 200

            raw = await drive(send, rows, args.concurrency, args.warmup_s, seconds)
            snap = b.snapshot()
            await b.stop()
            return raw, snap

        raw, snap = asyncio.run(go())
        return summarise(name, max_batch, raw, snap)

    import httpx

    from llmcls.serving.app import create_app, running

    app = create_app(clf, max_batch=max_batch, max_wait_ms=args.max_wait_ms if max_batch > 1 else 0.0,
                     max_queue_rows=100_000)
    with running(app) as url:
        # Several client processes: one Python process of httpx clients tops out at a few hundred requests/s
        # (measured: ~5 ms of client CPU per request), below what a batching server on a GPU answers.
        procs = max(1, min(args.client_procs, args.concurrency))
        start_at = time.time() + args.warmup_s + 3  # the processes' start-up fits in the extra seconds
        running_procs = []
        for k in range(procs):
            n = args.concurrency // procs + (k < args.concurrency % procs)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--client", url, "--rows-file", str(rows_file),
                   "--concurrency", str(n), "--seconds", str(seconds), "--start-at", str(start_at)]
            running_procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        parts = []
        for proc in running_procs:
            out, err = proc.communicate(timeout=args.warmup_s + seconds + 300)
            if proc.returncode != 0:
                raise SystemExit(f"load generator failed:\n{err[-3000:]}")
            parts.append(json.loads(out.strip().splitlines()[-1]))
        raw = {"window_s": seconds, "completed": sum(x["completed"] for x in parts),
               "errors": sum(x["errors"] for x in parts), "latencies_ms": [v for x in parts for v in x["latencies_ms"]],
               "statuses": dict(sum((collections.Counter(x["statuses"]) for x in parts), collections.Counter()))}
        snap = httpx.get(f"{url}/health", timeout=60).json()["batcher"]
    return summarise(name, max_batch, raw, snap)


def markdown(res: dict) -> str:
    lines = ["| card | model | transport | max_length | mode | max batch | clients | requests | rows/s | p50 ms | "
             "p99 ms | mean batch |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in res["runs"]:
        for m in run["modes"]:
            model = f"{res['shape']} ({res['dtype']}{', compiled' if res.get('compiled') else ''})"
            lines.append(f"| {res['card']} | {model} | {res['transport']} | "
                         f"{run['max_length']} | {m['mode']} | {m['max_batch']} | {res['concurrency']} | "
                         f"{m['requests']} | {m['rows_per_s']} | {m['p50_ms']} | {m['p99_ms']} | "
                         f"{m['server_mean_batch']} |")
    lines.append("")
    for run in res["runs"]:
        ratio = f"{run['ratio']}x" if run["ratio"] is not None else "n/a (no request finished one at a time)"
        lines.append(f"- max_length {run['max_length']}: dynamic batching / one at a time = **{ratio}** rows/s")
    lines.append("")
    lines.append(f"Rows: {res['rows_source']}; {res['wall_s']} s in all.")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny", help="tiny, qwen1.5-7b, qwen2.5-7b, qwen2.5-0.5b or a config .json")
    p.add_argument("--device", help="cpu or cuda (default: cuda for a named shape, cpu for tiny)")
    p.add_argument("--seconds", type=float, help="Measuring window per mode (default: cpu 20, cuda 30).")
    p.add_argument("--warmup-s", type=float, help="Unmeasured load before each window (default: cpu 4, cuda 6).")
    p.add_argument("--concurrency", type=int, help="Closed-loop clients (default: cpu 16, cuda 64).")
    p.add_argument("--max-batch", type=int, help="Dynamic mode's max batch (default: cpu 16, cuda 32).")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="Dynamic mode's batching window (default: 5).")
    p.add_argument("--max-length", help="Token budget per row; a comma-separated list runs each in turn "
                                        "(default: cpu 384; cuda 384,128: the tutorial's budget, then short rows).")
    p.add_argument("--rows", type=int, default=512, help="Distinct rows cycled through (default: 512).")
    p.add_argument("--transport", choices=["auto", "http", "inprocess"], default="auto")
    p.add_argument("--compile", action="store_true",
                   help="Compile the decoder layers first (llmcls serve --compile); both modes use them.")
    p.add_argument("--torch-threads", type=int,
                   help="torch intra-op threads (default on a CPU: 1; on a GPU: torch's own). Several OpenMP "
                        "threads on a small, shared CPU spin-wait on each other: 10x slower on 2 busy cores.")
    p.add_argument("--shared", help="Folder with qwen-tokenizer/, data/fudan-news/, model-shapes/ "
                                    "(default: $LLMCLS_SHARED, ./shared, ../shared).")
    p.add_argument("--tokenizer", help="Qwen tokenizer folder (default: SHARED/qwen-tokenizer).")
    p.add_argument("--card", help="Name of the machine in the table (default: the GPU's name, or 'CPU, N cores').")
    p.add_argument("--out", help="JSON result path (default: benchmarks/results/serve_load-SHAPE-DEVICE.json).")
    p.add_argument("--time-limit-s", type=float, default=230, help="Bound on the whole run (default: 230).")
    # internal: the load-generator process
    p.add_argument("--client-procs", type=int, help="Client processes sharing --concurrency (default: cpu 1, cuda 4).")
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    p.add_argument("--rows-file", help=argparse.SUPPRESS)
    p.add_argument("--token", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        return client_main(args)

    t_start = time.monotonic()
    import torch
    from transformers import AutoTokenizer

    from llmcls.config import PromptConfig
    from llmcls.env import environment
    from llmcls.serving.classifier import Classifier

    args.device = args.device or ("cpu" if args.shape == "tiny" else "cuda")
    if args.torch_threads is None and not args.device.startswith("cuda"):
        args.torch_threads = 1
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    preset = PRESETS["cuda" if args.device.startswith("cuda") else "cpu"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.max_length = [int(x) for x in str(args.max_length).split(",") if x.strip()]
    if args.transport == "auto":
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401

            args.transport = "http"
        except ImportError:
            print("fastapi/uvicorn not installed: driving the batcher in-process (no HTTP)", file=sys.stderr)
            args.transport = "inprocess"

    shared = find_shared(args.shared)
    tok_dir = args.tokenizer or (shared / "qwen-tokenizer" if shared else None) or os.environ.get("LLMCLS_TOKENIZER")
    if tok_dir is None or not Path(tok_dir).is_dir():
        raise SystemExit("Qwen tokenizer not found: pass --tokenizer or --shared (see the docstring)")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows, source = load_rows(shared, args.rows, seed=0)
    labels = sorted({c for r in rows for c in r["candidates"]})

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        model, dtype = build_model(args.shape, args.device, shared, tok, tmp)
        if args.compile:
            from llmcls.model.compiling import compile_layers

            compile_layers(model)
        rows_file = tmp / "rows.jsonl"
        rows_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        setup_s = time.monotonic() - t_start

        # Every window must fit the time limit with room for start-up, warm-up and draining the queue.
        n_modes = 2 * len(args.max_length)
        per_mode_overhead = args.warmup_s + 15
        remaining = args.time_limit_s - (time.monotonic() - t_start) - n_modes * per_mode_overhead
        seconds = max(3.0, min(args.seconds, remaining / n_modes))
        if seconds < args.seconds:
            print(f"measuring {seconds:.0f} s per mode to stay within {args.time_limit_s:.0f} s", file=sys.stderr)

        runs = []
        for max_length in args.max_length:
            clf = Classifier(model, tok, PromptConfig(), labels, max_length, args.shape, "benchmark")
            if args.compile:  # compilation happens here, outside the measuring windows
                from llmcls.data import Row

                for n in (args.max_batch, 1, 3, args.max_batch // 2):
                    clf.score(clf.prepare([Row(r["text"], r["candidates"], None) for r in rows[:n]]))
            modes = []
            for name, mb in (("dynamic batching", args.max_batch), ("one at a time", 1)):
                m = run_mode(clf, name, mb, args, rows_file, rows, seconds)
                print(f"max_length {max_length}, {name}: {m['rows_per_s']} rows/s, p50 {m['p50_ms']} ms, "
                      f"p99 {m['p99_ms']} ms, mean batch {m['server_mean_batch']}, errors {m['errors']}",
                      file=sys.stderr)
                modes.append(m)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            dyn, one = modes
            ratio = round(dyn["rows_per_s"] / one["rows_per_s"], 2) if one["rows_per_s"] else None
            runs.append({"max_length": max_length, "modes": modes, "ratio": ratio})

    env = environment()
    res = {"benchmark": "serve_load", "card": args.card or card_name(args.device), "shape": args.shape,
           "device": args.device, "dtype": dtype, "compiled": args.compile, "transport": args.transport,
           "concurrency": args.concurrency, "client_processes": args.client_procs,
           "max_wait_ms": args.max_wait_ms, "rows_source": source, "torch_threads": torch.get_num_threads(),
           "rows_distinct": len(rows), "labels": len(labels), "runs": runs,
           "target_ratio": 5.0 if args.device.startswith("cuda") else None,
           "setup_s": round(setup_s, 1), "wall_s": round(time.monotonic() - t_start, 1),
           "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
           "gpu_peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
           if args.device.startswith("cuda") else None,
           "environment": env}
    default_out = ROOT / "benchmarks" / "results" / f"serve_load-{args.shape}-{args.device}.json"
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp_out.replace(out)
    md = markdown(res)
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
    print(f"written to {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
