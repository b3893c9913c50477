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
    """The compile cache folder in use (set by :func:`llmcls.model.load.use_compile_cache`), if any."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def split_line(what: str, w: dict) -> str:
    """One line: where the time to the first step (or batch) went."""
    parts = [f"{k} {w[k + '_s']:.1f} s" for k in ("start", "load", "encode", "setup") if w.get(k + "_s") is not None]
    if w.get("prewarm") and "error" not in w["prewarm"] and len(parts) > 1:  # parts[1] is the load
        parts[1:2] = [f"{parts[1]} (compile set-up beside it {w['prewarm']['s']:.1f} s)"]
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


class CompilePrewarm:
    """torch.compile's one-time set-up in a process, done in a thread while the weights load instead of inside the
    first step or batch: importing Inductor and Triton, starting Inductor's compile workers, dynamo's first trace,
    Triton's first kernel on the GPU. A fresh ``llmcls eval`` whose layers hit the compile cache spent 3.9 s
    compiling in its first batch against 1.7 s where training had already paid this (docs/BENCHMARKS.md,
    warm-up run 3); the weights take ~6 s to load on a 7B model, so the set-up fits inside the load.

    It compiles a small function of its own (one graph of two kernels, kept in the same compile cache), never the
    model's layers, and it only warms: a failure is logged and changes nothing else. Call :meth:`join` before
    the first step or batch, so that the figures of that step count its compilation and nothing of this."""

    def __init__(self, device: str, backend: str = "inductor"):
        import threading

        self.device, self.backend = device, backend
        self.seconds: Optional[float] = None
        self.error: Optional[str] = None
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="llmcls-compile-prewarm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import torch

        try:
            # The CUDA device is per thread: a thread starts on GPU 0 whatever the process's rank set.
            if str(self.device).startswith("cuda"):
                torch.cuda.set_device(torch.device(self.device))
            def graph(x):  # a pointwise kernel and a reduction, the kinds of Triton kernel a layer's graph loads
                y = torch.nn.functional.silu(x) * x
                return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)

            x = torch.linspace(-2, 2, 64 * 32, device=self.device).reshape(64, 32)
            torch.compile(graph, dynamic=True, backend=self.backend)(x)
            if str(self.device).startswith("cuda"):
                torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - a warm-up must not stop the job it only speeds up
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.seconds = time.perf_counter() - self._t0

    def join(self) -> dict:
        """Wait for the warm-up: ``{"s": its seconds, "waited_s": how long the caller waited for it}`` (and
        ``error`` where it failed; the caller goes on, its first step compiles as it would have)."""
        import logging

        t = time.perf_counter()
        self._thread.join()
        out = {"s": round(self.seconds or 0.0, 3), "waited_s": round(time.perf_counter() - t, 3)}
        if self.error:
            logging.getLogger(__name__).warning("compile warm-up in the background failed (the first step compiles "
                                                "as usual): %s", self.error)
            out["error"] = self.error
        return out


def start_prewarm(compiles: bool, cache: Optional[str] = None, device: Optional[str] = None
                  ) -> Optional[CompilePrewarm]:
    """A :class:`CompilePrewarm` for a process about to load a model whose layers it compiles (``compiles``) on a
    GPU; None on a CPU (the tests' backend compiles nothing worth warming) or where nothing is compiled. Points
    torch.compile at the run's compile cache first (:func:`llmcls.model.load.use_compile_cache`), as the layers'
    compilation would, so that the paths torch fixes at its first compilation are that cache's."""
    import torch

    if not compiles or not torch.cuda.is_available():
        return None
    from llmcls.model.load import device_default, use_compile_cache

    use_compile_cache(cache)
    return CompilePrewarm(device or device_default())
