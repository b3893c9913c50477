"""Where ``score`` spends its time on a GPU, and what the serving path adds around it.

    python benchmarks/score_profile.py --out bench-out/score_profile
    python benchmarks/score_profile.py --shape tiny --device cpu --rows 32 --batches 8   # smoke test

On a random-init model of a real shape and the same prompts as ``gpu_speed.py`` (Fudan test rows cut to ~380
tokens), one process, one card:
  - the reference forward: the same prompts left-padded, a 2-D padding mask, the last position's logits only
    (what a classifier cannot go below without changing the model's arithmetic);
  - ``score_batch`` on prepared prompts (the model alone) and ``classify`` end to end (tokenisation included);
  - the same after regional ``torch.compile`` of the decoder layers;
  - a ``torch.profiler`` breakdown of one score batch: GPU-busy time against wall time, top kernels;
  - ``classify`` end to end under the profiler: GPU busy time against the span of its kernels, and the longest
    idle gaps with the host operators running when each began;
  - the serving path's pieces (``llmcls.serving.classifier.Classifier``): ``prepare`` per row, ``score`` of one
    row and of a full batch of prepared rows, at each ``--serve-lengths``.
Output: JSON with every number and the environment, and the profiler tables as text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# A sibling module: ``python benchmarks/score_profile.py`` puts this folder on sys.path, as it does any script's.
from gpu_speed import MAX_LEN, SHARED, build_model, load_rows, matmul_tflops, parser, sync
from llmcls.config import PromptConfig
from llmcls.encode import PromptBuilder, fit_row, left_pad, positions
from llmcls.env import environment
from llmcls.files import atomic_write_json, atomic_write_text
from llmcls.infer import classify, prompts_for, score_batch


def timed(fn, device, repeat=1) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeat


@torch.no_grad()
def reference_forward(model, prompts, bs, device):
    for i in range(0, len(prompts), bs):
        ids, mask = left_pad(prompts[i:i + bs], 0)
        model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions(mask).to(device),
              logits_to_keep=1, use_cache=False)


def measure(model, b, rows, prompts, batches, device) -> dict:
    out = {}
    for bs in batches:
        order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))
        groups = [order[i:i + bs] for i in range(0, len(order), bs)]

        def score_all():
            for g in groups:
                score_batch(model, b, [rows[i] for i in g], prompts=[prompts[i] for i in g])

        sorted_prompts = [prompts[i] for i in order]
        reference_forward(model, sorted_prompts[:bs], bs, device)  # warm-up (and compilation, if any)
        score_all() if len(groups) == 1 else score_batch(model, b, [rows[i] for i in groups[0]],
                                                         prompts=[prompts[i] for i in groups[0]])
        ref = timed(lambda: reference_forward(model, sorted_prompts, bs, device), device)
        sc = timed(score_all, device)
        e2e = timed(lambda: classify(model, b, rows, batch_size=bs, max_length=MAX_LEN, progress=False), device)
        out[str(bs)] = {"reference_rows_per_s": round(len(rows) / ref, 2), "score_rows_per_s": round(len(rows) / sc, 2),
                        "classify_rows_per_s": round(len(rows) / e2e, 2)}
        print(bs, json.dumps(out[str(bs)]), flush=True)
    return out


def profile_batch(model, b, rows, prompts, bs, device) -> tuple[dict, str]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    batch, bp = rows[:bs], prompts[:bs]
    score_batch(model, b, batch, prompts=bp)
    sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        score_batch(model, b, batch, prompts=bp)
        sync(device)
    wall = time.perf_counter() - t
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    # Kernels only: operator rows repeat their kernels' time.
    busy = sum(getattr(e, key, 0) for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")) / 1e6
    table = events.table(sort_by=key if device.startswith("cuda") else "self_cpu_time_total", row_limit=25)
    return {"batch": bs, "wall_s": round(wall, 4), "gpu_busy_s": round(busy, 4)}, table


def gpu_gaps(trace_file: Path, top: int = 12) -> dict:
    """From a profiler trace: the span from the first to the last GPU kernel, the time some kernel ran (the union
    of their intervals), and the longest idle gaps with the host operators running when each began."""
    events = json.loads(trace_file.read_text())["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") in ("kernel", "gpu_memcpy"))
    if not kernels:
        return {}
    busy, gaps, end = 0.0, [], kernels[0][0]
    for a, b in kernels:
        if a > end:
            gaps.append((a - end, end))
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    worst = []
    for length, at in sorted(gaps, reverse=True)[:top]:
        during = sorted((e for e in ops if e["ts"] <= at + length and e["ts"] + e["dur"] >= at),
                        key=lambda e: -e["dur"])
        worst.append({"gap_us": round(length, 1), "host_ops": [e["name"] for e in during[:4]]})
    span = end - kernels[0][0]
    return {"span_ms": round(span / 1e3, 2), "gpu_busy_ms": round(busy / 1e3, 2),
            "idle_ms": round((span - busy) / 1e3, 2), "gaps_over_100us": sum(g > 100 for g, _ in gaps),
            "idle_in_gaps_over_100us_ms": round(sum(g for g, _ in gaps if g > 100) / 1e3, 2), "longest": worst}


def profile_classify(model, b, rows, bs, device, trace_dir: Path) -> dict:
    """``classify`` end to end (tokenisation on its thread, packing, scoring, read-back) under the profiler: where
    the GPU waits for the host, which a single prepared batch cannot show."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    classify(model, b, rows[:bs], batch_size=bs, max_length=MAX_LEN, progress=False)
    sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        classify(model, b, rows, batch_size=bs, max_length=MAX_LEN, progress=False)
        sync(device)
    wall = time.perf_counter() - t
    trace = trace_dir / "classify_trace.json"
    prof.export_chrome_trace(str(trace))
    out = {"batch": bs, "rows": len(rows), "wall_s_profiled": round(wall, 3), **gpu_gaps(trace)}
    trace.unlink()
    return out


def serving_pieces(model, tok, rows, lengths, max_batch, device) -> dict:
    from llmcls.serving.classifier import Classifier

    labels = sorted({c for r in rows for c in r.candidates})
    out = {}
    for n in lengths:
        clf = Classifier(model, tok, PromptConfig(), labels, n, "profile", "benchmark")
        sample = rows[:max_batch]
        clf.prepare(sample[:2])
        t = time.perf_counter()
        prepared = clf.prepare(sample)
        prep = (time.perf_counter() - t) / len(sample)
        clf.score(prepared[:1])
        one = timed(lambda: clf.score(prepared[:1]), device, repeat=5)
        clf.score(prepared)
        full = timed(lambda: clf.score(prepared), device, repeat=3)
        out[str(n)] = {"prepare_ms_per_row": round(prep * 1000, 2), "score_1_ms": round(one * 1000, 1),
                       f"score_{len(prepared)}_ms": round(full * 1000, 1),
                       "score_1_rows_per_s": round(1 / one, 1),
                       "score_batch_rows_per_s": round(len(prepared) / full, 1)}
        print("serve", n, json.dumps(out[str(n)]), flush=True)
    return out


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--serve-lengths", default="384,128")
    ap.add_argument("--serve-batch", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--classify-rows", type=int, default=128,
                    help="rows of the end-to-end classify profile (GPU idle gaps); 0 skips it")
    ap.add_argument("--out", default="bench-out/score_profile")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    serve_lengths = [int(x) for x in a.serve_lengths.split(",") if x]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHARED / "qwen-tokenizer"))
    model, _ = build_model(a.shape, a.device)
    b = PromptBuilder(tok, PromptConfig())
    _, raw_rows = load_rows(a.rows, short=False)
    rows = [fit_row(b, r, MAX_LEN - 4)[0] for r in raw_rows[:a.rows]]
    prompts = prompts_for(b, rows, MAX_LEN)
    batches = [int(x) for x in a.batches.split(",")]
    res = {"shape": a.shape, "gpu": environment()["gpu"], "matmul_tflops": matmul_tflops(a.device),
           "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "environment": environment()}
    print(json.dumps({k: res[k] for k in ("gpu", "matmul_tflops", "prompt_tokens_mean")}), flush=True)
    res["serving"] = serving_pieces(model, tok, raw_rows, serve_lengths, a.serve_batch,
                                    a.device)
    res["eager"] = measure(model, b, rows, prompts, batches, a.device)
    res["profile_eager"], table = profile_batch(model, b, rows, prompts, batches[0], a.device)
    tables = f"## eager, batch {batches[0]}\n{json.dumps(res['profile_eager'])}\n{table}\n"
    print(tables, flush=True)
    if not a.no_compile:
        for layer in model.model.layers:
            layer.compile(dynamic=True)
        t = time.perf_counter()
        res["compiled"] = measure(model, b, rows, prompts, batches, a.device)
        res["compiled_wall_s"] = round(time.perf_counter() - t, 1)
        res["profile_compiled"], table = profile_batch(model, b, rows, prompts, batches[0], a.device)
        tables += f"## compiled, batch {batches[0]}\n{json.dumps(res['profile_compiled'])}\n{table}\n"
        print(tables.split("## compiled")[1], flush=True)
        res["serving_compiled"] = serving_pieces(model, tok, raw_rows, serve_lengths,
                                                 a.serve_batch, a.device)
    if a.classify_rows:  # the model as it now is: compiled unless --no-compile
        res["profile_classify"] = profile_classify(model, b, rows[:a.classify_rows], batches[0], a.device, out)
        res["profile_classify"]["compiled"] = not a.no_compile
        print("classify", json.dumps(res["profile_classify"]), flush=True)
    atomic_write_json(out / "score_profile.json", res)
    atomic_write_text(out / "score_profile.txt", tables)


if __name__ == "__main__":
    main()
