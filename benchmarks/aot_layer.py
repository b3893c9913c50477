"""Ahead-of-time compiled decoder layers against torch.compile's warm cache (issue 16, items 2 and 5: the lever
after ``eval.compile_background``).

A fresh process's first compiled call pays dynamo's trace of the layer and Inductor's set-up even when the compile
cache holds every kernel (7B shape, one H200: 2.8-4.5 s before the first scoring batch of a fresh ``llmcls eval``).
``torch.compile(fn, fullgraph=True).aot_compile(example_inputs)`` (experimental in torch 2.11-2.13) traces and
compiles ahead of time into an artifact that another process loads without tracing. This script measures both on
the same model and inputs, each phase a fresh process (a phase's figures are read from its own clock):

- ``save``: ``aot_compile`` one scoring call of the first decoder layer (LoRA attached, no grad, dynamic shapes)
  and save the artifact.
- ``jit``, twice: what ``eval.compile`` does today (:func:`llmcls.model.compiling.compile_layers`), then the first
  forward and a second one; its graph (the layer's own call) is another cache entry than ``save``'s, so the first
  run fills it and the second (``jit_warm``) is the warm-cache figure to compare.
- ``load``: load the artifact and run the same forwards through it, every layer (the layer is the function's first
  argument, so one artifact serves all of them, as one compiled graph does).

Each phase also checks its logits against the eager model's in the same process (``max_abs_diff``), and ``load``
calls the artifact on a second batch shape (the saved guards must admit it: dynamic shapes).

CPU (the tiny preset; measured on 2 cores, torch 2.13, docs/BENCHMARKS.md "Evaluation on real rows")::

    python benchmarks/aot_layer.py --model tiny --device cpu --out /tmp/aot

GPU (the 7B shape, scoring-sized batch; LLMCLS_SHARED holds model-shapes/)::

    python benchmarks/aot_layer.py --device cuda --batch 64 --length 381 --out bench-out/aot

Writes ``OUT/aot_layer.json`` (each phase's figures, versions, git commit).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_speed import build_model, sync  # this script's folder is on the path, as for any script run by its path
from llmcls.config import load_config
from llmcls.env import environment
from llmcls.files import atomic_write_json
from llmcls.model.load import add_lora, unwrap
from llmcls.warmup import process_age


def run_layer(layer, *args, **kwargs):
    """What is compiled ahead of time: one layer's call, the layer an argument. A module-level function, so the
    artifact refers to it by name (transformers' decorated ``forward`` is not the object its class attribute
    names, and pickling it fails)."""
    return layer(*args, **kwargs)


def _model(a):
    model, _ = build_model(a.model, a.device)
    cfg = load_config(overrides={"lora.method": "lora"})  # the tutorial's r=8 adapters on all seven projections
    return add_lora(model, cfg.lora).eval()


def _ids(a, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(batch * 7919 + length),
                         device="cpu").to(a.device)


def _first_layer_call(model, ids):
    """The arguments the model passes its first decoder layer for ``ids`` (an eager forward with a hook)."""
    got = {}
    layer = unwrap(model).model.layers[0]
    h = layer.register_forward_pre_hook(lambda m, args, kwargs: got.setdefault("call", (args, kwargs)),
                                        with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return got["call"]


def _timed_forward(model, ids, device) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    sync(device)
    return time.perf_counter() - t, logits


def _eager_logits(model, ids) -> torch.Tensor:
    layers = unwrap(model).model.layers
    kept = [layer._compiled_call_impl for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for layer, c in zip(layers, kept):
            layer._compiled_call_impl = c


def phase(a) -> dict:
    import torch._dynamo

    from llmcls.model.compiling import compile_layers, use_compile_cache

    started = process_age()
    use_compile_cache(str(Path(a.out) / "compile-cache"))
    torch._dynamo.config.specialize_float = True  # as compile_layers sets it, so that both trace alike
    t = time.perf_counter()
    model = _model(a)
    ids = _ids(a, a.batch, a.length)
    res = {"start_s": round(started, 2), "build_s": round(time.perf_counter() - t, 2)}
    artifact = Path(a.out) / "layer.aot"
    layers = unwrap(model).model.layers
    if a._phase == "save":
        args, kwargs = _first_layer_call(model, ids)
        # batch and length symbolic: a saved artifact's failed guard raises instead of recompiling
        torch._dynamo.mark_dynamic(args[0], 0)
        torch._dynamo.mark_dynamic(args[0], 1)
        t = time.perf_counter()
        with torch.no_grad():
            compiled = torch.compile(run_layer, fullgraph=True, dynamic=True).aot_compile(
                ((layers[0], *args), kwargs))
        res["aot_compile_s"] = round(time.perf_counter() - t, 2)
        compiled.save_compiled_function(str(artifact))
        res["artifact_bytes"] = artifact.stat().st_size
        return res
    t = time.perf_counter()
    if a._phase == "jit":
        compile_layers(model, str(Path(a.out) / "compile-cache"))
    else:  # load
        with open(artifact, "rb") as f:
            fn = torch.compiler.load_compiled_function(f)
        for layer in layers:
            layer._compiled_call_impl = functools.partial(fn, layer)
    res["prepare_s"] = round(time.perf_counter() - t, 3)
    first, logits = _timed_forward(model, ids, a.device)
    second, _ = _timed_forward(model, ids, a.device)
    res.update(first_forward_s=round(first, 3), second_forward_s=round(second, 3),
               to_first_output_s=round(res["prepare_s"] + first, 3),
               max_abs_diff=float((logits.float() - _eager_logits(model, ids).float()).abs().max()))
    if a._phase == "load":  # another batch shape through the saved guards
        other = _ids(a, max(2, a.batch // 2), max(8, a.length // 2 + 3))
        _, o = _timed_forward(model, other, a.device)
        res["other_shape_max_abs_diff"] = float((o.float() - _eager_logits(model, other).float()).abs().max())
    return res


def main(argv=None) -> int:
    shared = os.environ.get("LLMCLS_SHARED")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(Path(shared) / "model-shapes" / "qwen1.5-7b-chat.json") if shared
                    else "tiny", help="tiny, or a Qwen2 config JSON (random init, a real shape)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=61, help="tokens a row (not a size of the model's own: dynamo "
                    "would specialise a length equal to one)")
    ap.add_argument("--out", default="bench-out/aot")
    ap.add_argument("--_phase", choices=("save", "jit", "load"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._phase:
        print(json.dumps(phase(a)))
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    # jit twice: its own graph (the layer, not run_layer) is another cache entry, filled by the first
    for name, ph in (("save", "save"), ("jit_first", "jit"), ("jit_warm", "jit"), ("load", "load")):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--_phase", ph, *(argv or sys.argv[1:])],
                           capture_output=True, text=True)
        if p.returncode:
            print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
            results[name] = {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"}
            break
        results[name] = {**json.loads(p.stdout.strip().splitlines()[-1]),
                         "process_s": round(time.perf_counter() - t, 1)}
        print(name, results[name], flush=True)
    doc = {"model": a.model, "device": a.device, "batch": a.batch, "length": a.length, "phases": results,
           "environment": environment()}
    atomic_write_json(out / "aot_layer.json", doc)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
