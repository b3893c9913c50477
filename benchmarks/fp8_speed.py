"""FP8 frozen base (``model.quantize: fp8``) against the bf16 fast path, timed in one process on one card.

One random-init model of a real shape (default: Qwen1.5-7B-Chat's, from ``$LLMCLS_SHARED/model-shapes``) is
loaded once and measured in this order, so the bf16 and FP8 figures come from the same card in the same minutes:

  1. training, bf16 — ``configs/qwen1.5-7b-chat-fudan-fast.yaml`` as ``gpu_speed.py``'s ``llmcls`` variant runs
     it (rows packed end to end, micro-batch 16, no recomputation, bf16 LoRA r=8 on the 7 projections, compiled
     decoder layers), 384-token rows: one untimed epoch (compilation), then one timed epoch of ``--steps`` steps;
  2. scoring, bf16 — ``classify(method="score")`` with compiled decoder layers, batch 32, ``--rows`` long Fudan
     test rows (prompts of ~374 tokens), after two warm-up batches; end to end, tokenisation included;
  3. the model's decoder-layer linears converted in place to torchao's ``Float8Linear``
     (``llmcls.model.fp8.convert``, what ``model.quantize: fp8`` does at load), then 1 and 2 again with the same
     config plus ``model.quantize: fp8`` (``--scaling`` names the scales; ``rowwise,tensorwise`` measures both,
     converting back to plain linears between them);
  4. with ``--weights ...,stored``: the linears replaced by ``StoredFP8Linear`` (``model.fp8_weights: stored``:
     e4m3 weights cast once, rowwise, two layouts when training), then 1 and 2 again. Last, because it frees the
     bf16 weights (its peak memory is then its own).

Also measured at the start: the card's bf16 matmul rate (8192^3, as in ``gpu_speed.py``) and its FP8 rate
(``torch._scaled_mm`` on e4m3 operands with per-row scales, the kind of product torchao's rowwise recipe issues),
so that each path's fraction of its own peak can be read. MFU counts 4 FLOPs per non-embedding weight per trained
token (forward + input gradient; the frozen base needs no weight gradient) against the bf16 rate.

Output: OUT/fp8_speed.json (every number, versions, git commit, card) and OUT/fp8_speed.md.

    python benchmarks/fp8_speed.py --out bench-out/fp8                   # one H200: ~5 minutes
    python benchmarks/fp8_speed.py --only train --scaling rowwise,tensorwise --out bench-out/fp8-train
    python benchmarks/fp8_speed.py --weights cast,stored --out bench-out/fp8-stored   # torchao's casts vs stored
    python benchmarks/fp8_speed.py --shape tiny --device cpu --steps 2 --rows 8   # smoke test (FP8 emulated)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# A sibling module: ``python benchmarks/fp8_speed.py`` puts this folder on sys.path, as it does any script's.
from gpu_speed import (BENCH_OVERRIDES, CONFIGS, FAST, MAX_LEN, build_model, load_rows, matmul_tflops, parser,
                       peak_gib, reset_peak, run_llmcls, sync, uncompile)
from llmcls.config import PromptConfig, load_config
from llmcls.encode import PromptBuilder, fit_row
from llmcls.env import environment
from llmcls.files import atomic_write_json, atomic_write_text
from llmcls.infer import classify
from llmcls.model.fp8 import FAST_ACCUM
from llmcls.model.compiling import compile_layers


def fp8_matmul_tflops(device, n: int = 8192, fast_accum: bool = False) -> float | None:
    """The card's e4m3 x e4m3 -> bf16 rate with per-row / per-column float32 scales (``torch._scaled_mm``),
    accumulating precisely or (``fast_accum``) in Hopper's fast mode."""
    if not device.startswith("cuda"):
        return None
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    sa = torch.ones(n, 1, device=device)
    sb = torch.ones(1, n, device=device)

    def mm():
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)

    for _ in range(3):
        mm()
    sync(device)
    t = time.perf_counter()
    for _ in range(20):
        mm()
    sync(device)
    return 20 * 2 * n**3 / (time.perf_counter() - t) / 1e12


def to_fp8(model, mcfg, device: str, training: bool) -> int:
    """What ``model.quantize: fp8`` does at load (``mcfg``: the config's model section): e4m3 weights stored once
    (``fp8_weights: stored``), or torchao's linears, whose FP8 products torchao emulates on a CPU (the smoke
    test). Returns how many linears were converted."""
    from llmcls.model import fp8

    if mcfg.fp8_weights == "stored":
        stored = [m for m in model.modules() if isinstance(m, fp8.StoredFP8Linear)]
        if stored:  # an earlier stored path converted them and freed the bf16 weights: only the sums differ
            for m in stored:
                m.fast_accum = fp8.fast_accum_flags(mcfg.fp8_fast_accum)
            return len(stored)
        return len(fp8.store(model, training, mcfg.fp8_fast_accum))
    return len(fp8.convert(model, mcfg.fp8_scaling, emulate=not device.startswith("cuda"),
                           fast_accum=mcfg.fp8_fast_accum))


def to_bf16(model) -> int:
    """Undo :func:`to_fp8` (torchao has no inverse): each ``Float8Linear`` back to a plain ``nn.Linear`` holding
    the same weight, so that the next scaling is converted from the model's own weights."""
    from torchao.float8.float8_linear import Float8Linear

    swapped = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is not Float8Linear:
            continue
        with torch.device("meta"):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
        lin.weight, lin.bias = mod.weight, mod.bias
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin)
        swapped += 1
    return swapped


def score_rate(model, tok, rows, device, batch: int) -> tuple[dict, list]:
    """Compiled ``score`` over ``rows`` (prompts already cut to ~380 tokens): rows/s end to end, and the predicted
    labels (to count how often FP8 picks what bf16 picks, on the same random weights)."""
    b = PromptBuilder(tok, PromptConfig())
    compile_layers(model)
    for _ in range(2):  # compilation, then every shape's second call
        classify(model, b, rows[:batch], max_length=MAX_LEN, progress=False, method="score", batch_size=batch)
    reset_peak(device)
    sync(device)
    t = time.perf_counter()
    preds = classify(model, b, rows, max_length=MAX_LEN, progress=False, method="score", batch_size=batch)
    sync(device)
    dt = time.perf_counter() - t
    uncompile(model)
    return ({"rows_per_s": round(len(rows) / dt, 2), "batch": batch, "rows": len(rows),
             "peak_gib": peak_gib(device)}, [p.pred for p in preds])


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps (16 rows each) per training path")
    ap.add_argument("--rows", type=int, default=256, help="scoring rows")
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--scaling", default="rowwise", help="FP8 scalings to measure, comma-separated: rowwise, "
                    "tensorwise")
    ap.add_argument("--weights", default="cast", help="FP8 weight handling, comma-separated: cast (torchao, "
                    "per --scaling), stored (e4m3 weights kept from the load, rowwise; measured last: it frees "
                    "the bf16 weights)")
    ap.add_argument("--fast-accum", default="auto", help="model.fp8_fast_accum values for the stored path, "
                    "comma-separated (auto, none, forward, all); each after the first is named fp8-stored-VALUE")
    ap.add_argument("--only", default="train,score", help="train, score, or both (comma-separated)")
    ap.add_argument("--profile", default="", help="training paths to profile (comma-separated: bf16, fp8-stored, "
                    "fp8-rowwise, ...): two steps under torch.profiler after the timing, tables in "
                    "OUT/profile-PATH.txt")
    ap.add_argument("--out", default="bench-out/fp8")
    a = ap.parse_args(argv)
    only = set(filter(None, a.only.split(",")))
    scalings = [s for s in a.scaling.split(",") if s]
    weights = [w for w in a.weights.split(",") if w]
    profiled = set(filter(None, a.profile.split(",")))
    accums = [v for v in a.fast_accum.split(",") if v]
    if (only - {"train", "score"} or set(scalings) - {"rowwise", "tensorwise"} or set(weights) - {"cast", "stored"}
            or not accums or set(accums) - set(FAST_ACCUM)):
        ap.error("--only takes train,score; --scaling takes rowwise,tensorwise; --weights takes cast,stored; "
                 "--fast-accum takes " + ",".join(FAST_ACCUM))
    out_dir = Path(a.out)
    cfg_over = {**BENCH_OVERRIDES, "train.output_dir": str(out_dir / "run")}
    cfgs = {"bf16": load_config(CONFIGS / FAST, cfg_over)}
    for s in scalings if "cast" in weights else ():
        cfgs[f"fp8-{s}"] = load_config(CONFIGS / FAST, {**cfg_over, "model.quantize": "fp8",
                                                        "model.fp8_weights": "cast", "model.fp8_scaling": s})
    for i, acc in enumerate(accums if "stored" in weights else ()):  # last: converting frees the bf16 weights
        cfgs["fp8-stored" + (f"-{acc}" if i else "")] = load_config(
            CONFIGS / FAST, {**cfg_over, "model.quantize": "fp8", "model.fp8_weights": "stored",
                             "model.fp8_fast_accum": acc})
    if a.device.startswith("cuda"):  # the refusals a user would meet, before 15 GB are built
        from llmcls.model import fp8

        fp8.check_device(a.device)
        fp8.require_torchao()
    from transformers import AutoTokenizer

    from gpu_speed import SHARED

    tok = AutoTokenizer.from_pretrained(str(SHARED / "qwen-tokenizer"))
    t_load = time.perf_counter()
    model, _ = build_model(a.shape, a.device)
    t_load = time.perf_counter() - t_load
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    bf16_peak, fp8_peak = matmul_tflops(a.device), fp8_matmul_tflops(a.device)
    fp8_fast_peak = fp8_matmul_tflops(a.device, fast_accum=True)
    train_rows, eval_rows = load_rows(16 * a.steps, short=False)
    b = PromptBuilder(tok, PromptConfig())
    eval_rows = [fit_row(b, r, MAX_LEN - 4)[0] for r in eval_rows[:a.rows]]
    import torchao

    env = environment()
    res = {"shape": a.shape, "device": a.device, "gpu": env["gpu"], "params": n_params, "build_s": round(t_load, 1),
           "matmul_tflops": round(bf16_peak, 1) if bf16_peak else None,
           "fp8_matmul_tflops": round(fp8_peak, 1) if fp8_peak else None,
           "fp8_fast_accum_matmul_tflops": round(fp8_fast_peak, 1) if fp8_fast_peak else None,
           "torchao": torchao.__version__,
           "environment": env, "train": {}, "score": {}}
    print(json.dumps({k: res[k] for k in ("gpu", "params", "matmul_tflops", "fp8_matmul_tflops",
                                          "fp8_fast_accum_matmul_tflops", "torchao")}),
          flush=True)

    preds: dict[str, list] = {}
    for name, cfg in cfgs.items():
        t0 = time.perf_counter()
        if name != "bf16":
            res.setdefault("converted_linears", {})[name] = to_fp8(model, cfg.model, a.device, "train" in only)
        try:
            if "train" in only:
                model, r = run_llmcls(model, tok, train_rows, a.device, cfg, name, warmup_epochs=1,
                                      profile_to=out_dir / f"profile-{name}.txt" if name in profiled else None)
                res["train"][name] = r
                print("train", name, json.dumps(r), flush=True)
                save(res, n_embed, out_dir)
            if "score" in only:
                res["score"][name], preds[name] = score_rate(model, tok, eval_rows, a.device, a.eval_batch)
                if name != "bf16" and "bf16" in preds:
                    res["score"][name]["same_label_as_bf16"] = round(
                        sum(x == y for x, y in zip(preds[name], preds["bf16"])) / len(eval_rows), 4)
                print("score", name, json.dumps(res["score"][name]), flush=True)
        except Exception as e:  # one path failing must not lose the other's figures
            import traceback

            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:500]
            print(name, "failed", traceback.format_exc()[-3000:], flush=True)
            uncompile(model)
            reset_peak(a.device)
        if name != "bf16" and not name.startswith("fp8-stored"):
            to_bf16(model)
        res.setdefault("wall_s", {})[name] = round(time.perf_counter() - t0, 1)
        save(res, n_embed, out_dir)
    print(save(res, n_embed, out_dir))


def add_ratios(res: dict, n_embed: int) -> None:
    body = res["params"] - n_embed
    bf, f8 = res["matmul_tflops"], res["fp8_matmul_tflops"]
    ref_t = res["train"].get("bf16", {}).get("tokens_per_s")
    for k, v in res["train"].items():
        if "tokens_per_s" in v:
            v["mfu_vs_bf16_peak"] = round(v["tokens_per_s"] * 4 * body / (bf * 1e12), 3) if bf else None
            v["vs_bf16"] = round(v["tokens_per_s"] / ref_t, 3) if ref_t else None
    ref_s = res["score"].get("bf16", {}).get("rows_per_s")
    for k, v in res["score"].items():
        v["vs_bf16"] = round(v["rows_per_s"] / ref_s, 3) if ref_s else None
    res["fp8_over_bf16_matmul"] = round(f8 / bf, 2) if bf and f8 else None


def markdown(res: dict) -> str:
    gpu = (res["gpu"] or {}).get("name", "CPU")
    lines = [f"Card: {gpu}; shape {Path(res['shape']).name}; measured matmul: bf16 {res['matmul_tflops']} TFLOP/s, "
             f"FP8 (e4m3, row scales) {res['fp8_matmul_tflops']} TFLOP/s ({res['fp8_over_bf16_matmul']}x), "
             f"with fast accumulation {res.get('fp8_fast_accum_matmul_tflops')} TFLOP/s; "
             f"torchao {res['torchao']}", "",
             "| training (fast config, packed, compiled, micro 16) | tokens/s | step s | peak GiB | MFU (bf16 peak) | "
             "vs bf16 |", "|---|---|---|---|---|---|"]
    for k, v in res["train"].items():
        lines.append(f"| {k} | {v['tokens_per_s']:,.0f} | {v['step_s']} | {v['peak_gib']} | "
                     f"{v['mfu_vs_bf16_peak']} | {v['vs_bf16']}x |")
    lines += ["", "| scoring (compiled `score`, base model) | rows/s | batch | peak GiB | vs bf16 |",
              "|---|---|---|---|---|"]
    for k, v in res["score"].items():
        same = v.get("same_label_as_bf16")
        lines.append(f"| {k} | {v['rows_per_s']} | {v['batch']} | {v['peak_gib']} | {v['vs_bf16']}x"
                     f"{f' (same label as bf16: {same:.1%})' if same is not None else ''} |")
    for k, e in res.get("errors", {}).items():
        lines.append(f"\n{k} failed: {e}")
    return "\n".join(lines)


def save(res: dict, n_embed: int, out_dir: Path) -> str:
    add_ratios(res, n_embed)
    table = markdown(res)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "fp8_speed.json", res)
    atomic_write_text(out_dir / "fp8_speed.md", table + "\n")
    return table


if __name__ == "__main__":
    main()
