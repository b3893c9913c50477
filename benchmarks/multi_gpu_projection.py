"""PROJECTION (not a measurement) of multi-GPU LoRA training on 1, 2, 4 and 8 GPUs, computed on a CPU.

The multi-GPU issue asks for FSDP full_shard runs of the Qwen2.5-72B shape on 4 and 8 GPUs and DDP scaling on
1-8 GPUs; only a 2-GPU machine has been lent (``docs/bench/multi_gpu-fast-run2.json``). This script turns what
was measured there (and on one GPU) into a projection, with every input labelled measured or assumed:

- **Parameter counts** from transformers' ``Qwen2ForCausalLM`` built on the meta device from the shape files
  (``--shapes``; ``benchmarks/shapes/qwen2.5-72b-instruct.json`` is the published Qwen2.5-72B-Instruct config);
  LoRA parameters counted on the same model: r x (in + out) for every Linear named in the fast config's
  ``lora.target_modules`` (``configs/qwen1.5-7b-chat-fudan-fast.yaml``, read with ``load_config``).
- **Memory per GPU under FSDP full_shard** (GiB, as ``torch.cuda.max_memory_allocated``): bf16 weights / N; the
  FSDP2 root unit (input embedding, final norm, LM head: not in a decoder layer) held gathered from forward to
  backward; ``--gathered-layers`` decoder layers gathered at once (ASSUMED 2: the one computing and the one
  prefetched); LoRA weights + gradients + two Adam moments / N (bf16 adapters: ``lora.dtype: auto`` on a GPU,
  2 bytes each; fp32: 4 bytes each); activations. The activation term is **calibrated, not modelled**: the
  measured 2-GPU FSDP peak of the Qwen1.5-7B shape (46.9 GiB, micro-batch 16 packed rows of 373.2 tokens, no
  recomputation) minus the terms above, per token and decoder layer. Another shape's activations per token and
  layer are ASSUMED to scale with hidden_size + intermediate_size (range: hidden_size alone to
  intermediate_size alone, in the JSON). With gradient checkpointing (ASSUMED, HF's unit: one decoder layer):
  each layer's input (hidden_size bf16 values per token) is kept, and one layer's activations are rebuilt at a
  time. The measured DDP peak (51.8 GiB, full bf16 weights) is predicted from the same calibration as a check.
- **Communication per micro-batch under FSDP**: all-gather of the bf16 weights in forward and again in backward,
  reduce-scatter of the LoRA gradients; time = bytes x (N-1)/N / bus bandwidth (NCCL's busbw convention). Per
  step under DDP: all-reduce of the LoRA gradients, 2 (N-1)/N x bytes / busbw. The bus bandwidth is an INPUT
  (``--nccl-busbw-gbs``; the default 360 GB/s is ASSUMED for H200 NVLink within one node, not measured here:
  ``benchmarks/nccl_bandwidth.py`` measures it).
- **Compute**: FLOP/s per GPU as measured on one H200 (the 1-GPU row of the 2-GPU run: 17,819 tokens/s x
  4 x non-embedding parameters of the 7B shape, llmcls's MFU convention), ASSUMED the same for other shapes and
  micro-batches; FLOPs per trained token 4 x non-embedding parameters, 6 x with checkpointing (one more forward).
- **Step time**, three bounds: *overlapped* max(compute, comm) (FSDP2 prefetches the next layer's all-gather
  during this layer's compute), *exposed* compute + comm at the input bandwidth, and *as on 2 GPUs*: compute +
  comm at the effective bandwidth that makes the model reproduce the measured 2-GPU FSDP 7B rate (every FSDP
  overhead folded into one exposed bandwidth).
- **DDP**: the measured 2-GPU speed-up (1.86x training, 1.75x scoring) extended two ways: Amdahl (a fixed
  serial fraction: the overhead grows like the ring all-reduce's 2 (N-1)/N) and a constant per-step overhead;
  the LoRA all-reduce's own time at the input bandwidth beside them. Same global batch (32 rows): micro-batch
  16/N on 4 and 8 GPUs, ASSUMED as fast per token as 16. The 2-epoch wall clock is training only (the Fudan
  train rows x 2 x 373.2 tokens / tokens/s; no warm-up, no scoring).

Run (CPU, seconds)::

    python benchmarks/multi_gpu_projection.py --out bench-out/projection

Writes ``OUT/multi_gpu_projection.json`` and ``OUT/multi_gpu_projection.md``; every row says PROJECTION.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from multi_gpu import FAST_CONFIG, ROOT, _shared, shape_config

from llmcls.config import load_config
from llmcls.files import atomic_write_json, atomic_write_text

GIB = 2**30
BENCH = ROOT / "docs" / "bench"
SHAPE_72B = ROOT / "benchmarks" / "shapes" / "qwen2.5-72b-instruct.json"


def count(shape: str | Path, r: int, targets: list[str]) -> dict:
    """Parameter counts of the shape, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import Qwen2ForCausalLM

    cfg = shape_config(shape)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    lora = sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    return {"name": Path(shape).stem, "params": total, "embed": embed, "body": total - embed,
            "root": total - layer * cfg.num_hidden_layers,  # embedding, final norm, LM head: FSDP2's root unit
            "layer": layer, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size, "lora": lora}


def static_gib(s: dict, n: int, gathered_layers: int, lora_bytes: int, fsdp: bool = True) -> float:
    """Everything but activations, per GPU: bf16 weights (sharded under FSDP, with the gathered units), LoRA
    weights + gradients + two Adam moments (sharded under FSDP)."""
    if not fsdp:
        return (2 * s["params"] + 4 * lora_bytes * s["lora"]) / GIB
    unsharded = 1 - 1 / n
    return (2 * s["params"] / n + 2 * (s["root"] + gathered_layers * s["layer"]) * unsharded
            + 4 * lora_bytes * s["lora"] / n) / GIB


def act_per_row_gib(s: dict, per_token_layer: float, tokens_per_row: float, ckpt: bool) -> float:
    """Activations of one packed row: every layer's (no recomputation), or every layer's input plus one layer's."""
    if ckpt:
        return tokens_per_row * (s["layers"] * 2 * s["hidden"] + per_token_layer) / GIB
    return tokens_per_row * s["layers"] * per_token_layer / GIB


def fsdp_comm_bytes(s: dict, n: int, lora_bytes: int) -> float:
    """Bytes each GPU moves per micro-batch (busbw convention): all-gather forward + backward, reduce-scatter."""
    return (2 * 2 * s["params"] + lora_bytes * s["lora"]) * (n - 1) / n


def main(argv: list[str] | None = None) -> int:
    shared = _shared()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-shape", default=str(shared / "model-shapes" / "qwen1.5-7b-chat.json") if shared else None,
                    help="The shape the 2-GPU run measured (Qwen1.5-7B-Chat).")
    ap.add_argument("--shapes", default=str(SHAPE_72B), help="More shapes to project, comma-separated JSON paths.")
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--measured", default=str(BENCH / "multi_gpu-fast-run2.json"), help="The 2-GPU run (measured).")
    ap.add_argument("--one-gpu", default=str(BENCH / "gpu_speed-run16-train-long.json"),
                    help="One-GPU run: matmul peak and card memory (measured).")
    ap.add_argument("--train-file", default=str(shared / "data" / "fudan-news" / "train.jsonl") if shared else None)
    ap.add_argument("--nccl-busbw-gbs", type=float, default=360.0,
                    help="NCCL bus bandwidth, GB/s (default 360: ASSUMED for H200 NVLink in one node, not measured).")
    ap.add_argument("--headroom-gib", type=float, default=6.0,
                    help="Card memory not available to tensors: CUDA context, NCCL buffers, fragmentation (ASSUMED).")
    ap.add_argument("--gathered-layers", type=int, default=2, help="Decoder layers gathered at once (ASSUMED).")
    ap.add_argument("--global-batch", type=int, help="Rows per optimizer step (default: the measured run's, 32).")
    ap.add_argument("--out", default="bench-out/projection")
    a = ap.parse_args(argv)
    if not (a.calib_shape and a.train_file):
        ap.error("shared/ not found: pass --calib-shape and --train-file")

    cfg = load_config(FAST_CONFIG)
    meas = json.loads(Path(a.measured).read_text())
    one = json.loads(Path(a.one_gpu).read_text())
    ph = meas["phases"]
    micro = meas["settings"]["batch_size"]
    global_batch = a.global_batch or meas["settings"]["global_batch"]
    tpr = meas["tokens_per_row"]
    if cfg.lora.dtype not in ("auto", "float32"):
        raise SystemExit(f"unexpected lora.dtype {cfg.lora.dtype}")
    lora_bytes = 4 if cfg.lora.dtype == "float32" else 2  # auto: the base's dtype, bf16 on a GPU
    busbw = a.nccl_busbw_gbs * 1e9
    card_gib = one["gpu"]["memory_gib"]
    usable = card_gib - a.headroom_gib
    peak_tflops = one["matmul_tflops"]
    gpus = [int(x) for x in a.gpus.split(",")]
    train_rows = sum(1 for line in open(a.train_file, encoding="utf-8") if line.strip())

    c7 = count(a.calib_shape, cfg.lora.r, cfg.lora.target_modules)
    shapes = [c7] + [count(p, cfg.lora.r, cfg.lora.target_modules) for p in a.shapes.split(",") if p]

    # calibration: activations per token and decoder layer, from the measured 2-GPU FSDP peak
    f2 = ph["fsdp"]
    n_cal = f2["world_size"]
    fsdp_peak = max(f2["peak_mem_gib_per_process"])
    act_gib = fsdp_peak - static_gib(c7, n_cal, a.gathered_layers, lora_bytes)
    per_tl = act_gib * GIB / (micro * tpr * c7["layers"])
    ddp_pred = static_gib(c7, 1, 0, lora_bytes, fsdp=False) + act_gib
    ddp_meas = max(ph["ddp"]["peak_mem_gib_per_process"])

    # compute: FLOP/s per GPU achieved on one GPU
    t1 = ph["single"]["tokens_per_s"]
    flops_gpu = t1 * 4 * c7["body"]
    # effective exposed bandwidth that reproduces the measured 2-GPU FSDP rate
    micro_s_meas = micro * tpr / (f2["tokens_per_s"] / n_cal)
    micro_s_comp = micro * tpr * 4 * c7["body"] / flops_gpu
    extra = micro_s_meas - micro_s_comp
    eff_bw = fsdp_comm_bytes(c7, n_cal, lora_bytes) / extra if extra > 0 else math.inf

    inputs = {
        "measured": {
            "one_gpu_tokens_per_s (7B shape, micro-batch 16, the 2-GPU run's 1-GPU row)": t1,
            "ddp_2gpu_tokens_per_s": ph["ddp"]["tokens_per_s"],
            "fsdp_2gpu_tokens_per_s": f2["tokens_per_s"],
            "fsdp_2gpu_peak_gib": fsdp_peak, "ddp_2gpu_peak_gib": ddp_meas,
            "score_rows_per_s 1 / 2 GPUs": [ph["single"]["score_rows_per_s"], ph["ddp"]["score_rows_per_s"]],
            "tokens_per_row": tpr, "matmul_tflops (bf16, one H200)": peak_tflops, "card_memory_gib": card_gib,
            "source": [str(Path(a.measured).relative_to(ROOT)) if Path(a.measured).is_relative_to(ROOT)
                       else a.measured, str(Path(a.one_gpu).name)],
        },
        "assumed": {
            "nccl_busbw_gbs": a.nccl_busbw_gbs, "headroom_gib": a.headroom_gib,
            "gathered_layers": a.gathered_layers,
            "activation scaling": "per token and layer proportional to hidden_size + intermediate_size",
            "checkpointing": "keeps each decoder layer's input; rebuilds one layer at a time; 6 x params FLOPs",
            "compute": "FLOP/s per GPU as the 7B shape on one GPU at micro-batch 16, for any shape and micro-batch",
            "ddp": "micro-batch 16/N at the same global batch runs as fast per token as 16",
        },
        "config": {"file": str(FAST_CONFIG.relative_to(ROOT)), "lora_r": cfg.lora.r,
                   "target_modules": cfg.lora.target_modules, "lora_bytes": lora_bytes, "micro_batch": micro,
                   "gradient_checkpointing": cfg.train.gradient_checkpointing, "global_batch": global_batch},
        "derived": {
            "activation_bytes_per_token_layer (7B, calibrated)": round(per_tl),
            "activations_gib (7B, micro-batch 16)": round(act_gib, 2),
            "ddp_2gpu_peak_predicted_gib (check)": round(ddp_pred, 2), "ddp_2gpu_peak_measured_gib": ddp_meas,
            "achieved_tflops_per_gpu": round(flops_gpu / 1e12, 1),
            "achieved_fraction_of_matmul_peak": round(flops_gpu / 1e12 / peak_tflops, 3),
            "fsdp_2gpu_extra_s_per_micro_batch (measured - compute)": round(extra, 4),
            "fsdp_effective_exposed_busbw_gbs (as on 2 GPUs)": round(eff_bw / 1e9, 1),
            "fudan_train_rows": train_rows,
        },
    }

    # 1. FSDP: memory, what fits, speed
    fit, speed = [], []
    for s in shapes:
        scale = (s["hidden"] + s["intermediate"]) / (c7["hidden"] + c7["intermediate"])
        ptl = per_tl * scale
        for n in gpus:
            st = static_gib(s, n, a.gathered_layers, lora_bytes)
            row = {"shape": s["name"], "gpus": n, "static_gib": round(st, 1), "params": s["params"],
                   "lora_params": s["lora"]}
            for ckpt in (False, True):
                per_row = act_per_row_gib(s, ptl, tpr, ckpt)
                lo = act_per_row_gib(s, per_tl * s["hidden"] / c7["hidden"], tpr, ckpt)
                hi = act_per_row_gib(s, per_tl * s["intermediate"] / c7["intermediate"], tpr, ckpt)
                key = "ckpt" if ckpt else "no_ckpt"
                rows_fit = max(0, math.floor((usable - st) / per_row))
                row[key] = {"act_gib_per_row": round(per_row, 2), "act_gib_per_row_range": [round(lo, 2), round(hi, 2)],
                            "peak_gib_micro16": round(st + micro * per_row, 1), "max_micro_batch": rows_fit}
                # the largest micro-batch that fits, at most the config's, with a whole accumulation
                m = max((k for k in range(1, min(micro, rows_fit) + 1) if global_batch % (k * n) == 0), default=0)
                if m < 1:
                    continue
                accum = global_batch // (m * n)
                comp = m * tpr * (6 if ckpt else 4) * s["body"] / flops_gpu
                comm_b = fsdp_comm_bytes(s, n, lora_bytes) if n > 1 else 0.0
                comm, comm_eff = comm_b / busbw, comm_b / eff_bw
                tok = global_batch * tpr
                rates = {"overlapped": tok / (accum * max(comp, comm)), "exposed": tok / (accum * (comp + comm)),
                         "as_on_2_gpus": tok / (accum * (comp + comm_eff))}
                speed.append({"shape": s["name"], "gpus": n, "checkpointing": ckpt, "micro_batch": m, "accum": accum,
                              "peak_gib": round(st + m * per_row, 1), "compute_s": round(comp, 3),
                              "comm_gb": round(comm_b / 1e9, 1), "comm_s": round(comm, 3),
                              "tokens_per_s": {k: round(v) for k, v in rates.items()},
                              "fraction_of_matmul_peak": {
                                  k: round(v * 4 * s["body"] / (n * peak_tflops * 1e12), 3) for k, v in rates.items()},
                              "label": "PROJECTION" if n > 1 else "PROJECTION (1 GPU: no sharding)"})
            fit.append(row)

    # 2. DDP of the 7B shape at the same global batch
    s2, r2 = ph["ddp"]["tokens_per_s"] / t1, ph["ddp"]["score_rows_per_s"] / ph["single"]["score_rows_per_s"]
    serial, const = 2 / s2 - 1, 1 / s2 - 0.5
    sserial, sconst = 2 / r2 - 1, 1 / r2 - 0.5
    grad_bytes = lora_bytes * c7["lora"]
    step_comp = global_batch * tpr / t1  # one GPU's step
    ddp = []
    for n in gpus:
        ar = 2 * (n - 1) / n * grad_bytes / busbw
        # the constant overhead is communication and synchronisation: none in one process
        amdahl, constant = 1 / (serial + (1 - serial) / n), 1 / (1 / n + (const if n > 1 else 0))
        bw_only = step_comp / (step_comp / n + ar)
        row = {"gpus": n, "micro_batch": global_batch // n if n > 1 else micro,
               "allreduce_mb": round(grad_bytes / 1e6, 1), "allreduce_ms": round(ar * 1e3, 3),
               "speedup": {"amdahl": round(amdahl, 2), "constant_overhead": round(constant, 2),
                           "bandwidth_only": round(bw_only, 2)},
               "tokens_per_s": {"amdahl": round(t1 * amdahl), "constant_overhead": round(t1 * constant)},
               "epoch2_train_min": {k: round(2 * train_rows * tpr / (t1 * x) / 60, 1)
                                    for k, x in (("amdahl", amdahl), ("constant_overhead", constant))},
               "score_rows_per_s": {
                   "amdahl": round(ph["single"]["score_rows_per_s"] / (sserial + (1 - sserial) / n), 1),
                   "constant_overhead": round(ph["single"]["score_rows_per_s"] / (1 / n + (sconst if n > 1 else 0)),
                                              1)},
               "label": "PROJECTION" if n > 2 else "PROJECTION (model reproduces the measured row)"}
        ddp.append(row)

    res = {"label": "PROJECTION, not a measurement", "inputs": inputs, "shapes": shapes, "fsdp_fit": fit,
           "fsdp_speed": speed, "ddp": ddp}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "multi_gpu_projection.json", res)
    md = markdown(res)
    atomic_write_text(out / "multi_gpu_projection.md", md)
    print(md)
    return 0


def markdown(res: dict) -> str:
    i = res["inputs"]
    m, d, asm = i["measured"], i["derived"], i["assumed"]
    lines = [
        "### PROJECTION, not a measurement: multi-GPU LoRA training on 1-8 H200s",
        "",
        f"Fast config (`{i['config']['file']}`): LoRA r={i['config']['lora_r']} on 7 projections, "
        f"{'bf16' if i['config']['lora_bytes'] == 2 else 'fp32'} adapters and Adam states, packed rows of "
        f"{m['tokens_per_row']} tokens, global batch {i['config']['global_batch']} rows.",
        "",
        f"- measured (`{m['source'][0]}`, `{m['source'][1]}`): 1 GPU {m[next(iter(m))]:,.0f} tokens/s on the 7B "
        f"shape = {d['achieved_tflops_per_gpu']} TFLOP/s = {d['achieved_fraction_of_matmul_peak']} of the measured "
        f"{m['matmul_tflops (bf16, one H200)']} TFLOP/s matmul peak; 2-GPU DDP {m['ddp_2gpu_tokens_per_s']:,.0f}, "
        f"FSDP {m['fsdp_2gpu_tokens_per_s']:,.0f} tokens/s; FSDP peak {m['fsdp_2gpu_peak_gib']} GiB per GPU; "
        f"card {m['card_memory_gib']} GiB.",
        f"- calibrated from those: activations {d['activations_gib (7B, micro-batch 16)']} GiB for 16 rows of the "
        f"7B shape ({d['activation_bytes_per_token_layer (7B, calibrated)']:,} bytes per token and layer); the same "
        f"calibration predicts the DDP peak at {d['ddp_2gpu_peak_predicted_gib (check)']} GiB (measured "
        f"{d['ddp_2gpu_peak_measured_gib']}). The measured 2-GPU FSDP rate needs "
        f"{d['fsdp_2gpu_extra_s_per_micro_batch (measured - compute)']} s per micro-batch over compute: an "
        f"effective exposed bandwidth of {d['fsdp_effective_exposed_busbw_gbs (as on 2 GPUs)']} GB/s (column "
        "'as on 2 GPUs').",
        f"- assumed, not measured here: NCCL bus bandwidth {asm['nccl_busbw_gbs']} GB/s; {asm['headroom_gib']} GiB "
        f"of each card not available to tensors; {asm['gathered_layers']} decoder layers gathered at once; "
        f"activations {asm['activation scaling']}; checkpointing {asm['checkpointing']}; compute: "
        f"{asm['compute']}; DDP: {asm['ddp']}.",
        "",
        "FSDP full_shard, memory per GPU (GiB):",
        "",
        "| shape | GPUs | weights + gathered + LoRA state | activations per row, no ckpt / ckpt | peak at "
        "micro-batch 16, no ckpt / ckpt | largest micro-batch that fits, no ckpt / ckpt | label |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["fsdp_fit"]:
        a, c = r["no_ckpt"], r["ckpt"]
        lines.append(f"| {r['shape']} | {r['gpus']} | {r['static_gib']} | {a['act_gib_per_row']} / "
                     f"{c['act_gib_per_row']} | {a['peak_gib_micro16']} / {c['peak_gib_micro16']} | "
                     f"{a['max_micro_batch']} / {c['max_micro_batch']} | PROJECTION |")
    lines += ["", "FSDP full_shard, speed (global batch held; micro-batch the largest of 16, global/GPUs and what "
              "fits):", "",
              "| shape | GPUs | ckpt | micro × accum | peak GiB | compute s / micro | comm GB / micro | comm s "
              "| tokens/s overlapped / exposed / as on 2 GPUs | fraction of matmul peak (same three) | label |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["fsdp_speed"]:
        t, f = r["tokens_per_s"], r["fraction_of_matmul_peak"]
        lines.append(f"| {r['shape']} | {r['gpus']} | {'on' if r['checkpointing'] else 'off'} | {r['micro_batch']} × "
                     f"{r['accum']} | {r['peak_gib']} | {r['compute_s']} | {r['comm_gb']} | {r['comm_s']} | "
                     f"{t['overlapped']:,} / {t['exposed']:,} / {t['as_on_2_gpus']:,} | {f['overlapped']} / "
                     f"{f['exposed']} / {f['as_on_2_gpus']} | {r['label']} |")
    lines += ["", "DDP, 7B shape, same global batch (speed-up from the measured 2-GPU 1.86× training, 1.75× scoring):",
              "", "| GPUs | micro-batch | LoRA all-reduce MB / ms per step | speed-up Amdahl / constant overhead / "
              "bandwidth only | tokens/s Amdahl / constant | 2-epoch Fudan training, min | score rows/s | label |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["ddp"]:
        s, t, e, sc = r["speedup"], r["tokens_per_s"], r["epoch2_train_min"], r["score_rows_per_s"]
        lines.append(f"| {r['gpus']} | {r['micro_batch']} | {r['allreduce_mb']} / {r['allreduce_ms']} | "
                     f"{s['amdahl']} / {s['constant_overhead']} / {s['bandwidth_only']} | {t['amdahl']:,} / "
                     f"{t['constant_overhead']:,} | {e['amdahl']} / {e['constant_overhead']} | {sc['amdahl']} / "
                     f"{sc['constant_overhead']} | {r['label']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
