"""Where the time before the first optimizer step (``llmcls train`` / ``run``) and before the first scored batch
(``llmcls eval``) goes: loading, encoding, compiling, the first step itself. The recipes record it as ``warmup``
in ``RUN/train_summary.json`` and ``RUN/eval/metrics.json``; ``benchmarks/warmup.py`` reads it, cold and with a
filled compile cache.

Compile time is torch's own account (``torch._dynamo.utils.compilation_time_metrics``): the seconds spent in
dynamo's compilation of each frame, the backend (AOTAutograd, Inductor, their caches) included. Dynamo compiles
lazily, inside the first forward, so it is a part of the first step's time, not added to it.

The Trainer callback that times the steps lives in llmcls.trainer (:class:`llmcls.trainer.StepTimer`) so that this
module imports no model library: every evaluation imports it, and transformers' Trainer modules would bring in
peft (and bitsandbytes where installed) where no adapter is applied (``llmcls eval RUN --weights base``)."""

from __future__ import annotations

import os
import time
from typing import Optional

_IMPORTED = time.perf_counter()


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc, so the interpreter's start and every import count,
    as they do for someone who typed the command); elsewhere, since llmcls.warmup was imported."""
    try:
        with open("/proc/self/stat") as fh:
            # the command name (field 2) may hold spaces; the fields after its closing parenthesis are fixed
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def compile_stats() -> dict:
    """What torch.compile did in this process so far: seconds compiling, graphs compiled, recompilations, and the
    hits and misses of the on-disk caches (Inductor's FX-graph cache, AOTAutograd's cache)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    return {"compile_s": sum(compilation_time_metrics.get("_compile.compile_inner", ())),
            "graphs": counters["stats"].get("unique_graphs", 0),
            "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
            "fx_graph_cache_hits": counters["inductor"].get("fxgraph_cache_hit", 0),
            "fx_graph_cache_misses": counters["inductor"].get("fxgraph_cache_miss", 0),
            "autograd_cache_hits": counters["aot_autograd"].get("autograd_cache_hit", 0),
            "autograd_cache_misses": counters["aot_autograd"].get("autograd_cache_miss", 0),
            "cuda_graphs": cuda_graphs_recorded(), "cuda_graph_skips": counters["inductor"].get("cudagraph_skips", 0)}


def cuda_graphs_recorded() -> int:
    """CUDA graphs recorded so far by torch.compile's graph trees (``train.cuda_graphs``), over every GPU: one per
    compiled layer, forward and backward, and shape. Read from the trees themselves (torch keeps no count)."""
    import sys

    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None:  # nothing was compiled with mode='reduce-overhead' in this process
        return 0
    import torch

    n = 0
    for device in range(torch.cuda.device_count()):
        manager = trees.get_manager(device, create_if_none_exists=False)
        nodes = list(manager.get_roots()) if manager is not None else []
        while nodes:
            node = nodes.pop()
            n += 1
            nodes.extend(c for children in node.children.values() for c in children)
    return n


def compile_delta(before: dict, after: Optional[dict] = None) -> dict:
    """:func:`compile_stats` between two moments (the seconds rounded)."""
    after = after or compile_stats()
    out = {k: after[k] - before[k] for k in before}
    out["compile_s"] = round(out["compile_s"], 3)
    return out


def cache_folder() -> Optional[str]:
    """The compile cache folder in use (set by :func:`llmcls.model.compiling.use_compile_cache`), if any."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def split_line(what: str, w: dict) -> str:
    """One line: where the time to the first step (or batch) went."""
    parts = [f"{k} {w[k + '_s']:.1f} s" for k in ("start", "load", "encode", "setup") if w.get(k + "_s") is not None]
    first = "first_step" if "first_step_s" in w else "first_batch"
    if w.get(first + "_s") is not None:
        c = (w.get(first + "_compile") or w.get("compile") or {}).get("compile_s")
        parts.append(f"{first.replace('_', ' ')} {w[first + '_s']:.1f} s"
                     + (f" (compiling {c:.1f} s)" if c else ""))
    total = w.get("to_first_step_s", w.get("to_first_batch_s"))
    line = f"{what} warm-up: " + ", ".join(parts) + (f"; {total:.1f} s to the {first.replace('_', ' ')}"
                                                      if total is not None else "")
    later = w.get("later_step_s", w.get("rest_s"))
    if later is not None:
        line += (f"; later steps {later:.3f} s each" if "later_step_s" in w else f"; other batches {later:.1f} s")
    return line
