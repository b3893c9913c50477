"""all_reduce / all_gather / reduce_scatter bus bandwidth with torch.distributed, for
``benchmarks/multi_gpu_projection.py --nccl-busbw-gbs`` (which otherwise assumes a figure).

NCCL on GPUs (one process per GPU), gloo on CPUs (a smoke test of the script: its figures say nothing about GPUs).
Bus bandwidth as nccl-tests defines it: algbw = size / time; busbw = algbw x 2 (N-1)/N for all_reduce and
x (N-1)/N for all_gather and reduce_scatter (size: the whole gathered / reduced tensor).

    torchrun --standalone --nproc_per_node 2 benchmarks/nccl_bandwidth.py --out bench-out/nccl
    torchrun --standalone --nproc_per_node 2 benchmarks/nccl_bandwidth.py --sizes-mb 1,4 --iters 2   # CPU smoke

Rank 0 prints a table and writes ``OUT/nccl_bandwidth.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
          "reduce_scatter": lambda n: (n - 1) / n}


def run_op(op: str, size_bytes: int, world: int, device: torch.device, iters: int, warmup: int) -> float:
    """Seconds per call of ``op`` over a ``size_bytes`` tensor (bf16 on GPUs, fp32 on CPUs: gloo's types)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    numel = size_bytes // torch.tensor([], dtype=dtype).element_size() // world * world
    full = torch.ones(numel, dtype=dtype, device=device)
    shard = torch.ones(numel // world, dtype=dtype, device=device)
    # torch 2.11 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    calls = {"all_reduce": lambda: dist.all_reduce(full), "all_gather": lambda: gather(full, shard),
             "reduce_scatter": lambda: scatter(shard, full)}
    call = calls[op]
    for _ in range(warmup):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="64,256,1024", help="Tensor sizes, MB (1e6 bytes), comma-separated.")
    ap.add_argument("--ops", default="all_reduce,all_gather,reduce_scatter")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", help="Folder for nccl_bandwidth.json (rank 0).")
    a = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rows = []
    for op in a.ops.split(","):
        for mb in (float(x) for x in a.sizes_mb.split(",")):
            size = int(mb * 1e6)
            t = run_op(op, size, world, device, a.iters, a.warmup)
            algbw = size / t / 1e9
            rows.append({"op": op, "size_mb": mb, "seconds": t, "algbw_gbs": round(algbw, 2),
                         "busbw_gbs": round(algbw * FACTOR[op](world), 2)})
    if rank == 0:
        res = {"backend": dist.get_backend(), "world_size": world,
               "device": torch.cuda.get_device_name() if cuda else "cpu (gloo: a smoke test, not a GPU figure)",
               "rows": rows}
        print(f"backend {res['backend']}, {world} processes, {res['device']}")
        print("| op | MB | ms | algbw GB/s | busbw GB/s |\n| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['op']} | {r['size_mb']:g} | {r['seconds'] * 1e3:.2f} | {r['algbw_gbs']} | {r['busbw_gbs']} |")
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / "nccl_bandwidth.json").write_text(json.dumps(res, indent=1) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
