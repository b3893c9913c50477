"""Loading a model folder onto the GPU (issue 16, item 2: a warm start is imports, then reading the weights):
``from_pretrained`` into host memory and then ``.to(cuda)`` (what ``llmcls.model.load.load_model`` does), against
``from_pretrained`` with ``device_map={"": "cuda:N"}`` straight into GPU memory, and ``load_model`` itself.

Each load is a fresh process (no CUDA context, allocator or transformers state carried over), timed inside it from
before ``from_pretrained`` to the weights on the GPU (synchronised); the variants alternate, ``--repeats`` rounds,
after one untimed read of every file into the page cache, so that no variant pays the disk alone.

    python benchmarks/load_speed.py --model /tmp/e2e/model-qwen1.5-7b-chat --out bench-out/load_speed.json

Writes a JSON with each load's seconds and GB/s, the median per variant, and the environment. Measured on an H200
(``docs/bench/load_speed-7b-run1.json``, Qwen1.5-7B shape, 15.4 GB, page cache warm): 2.95 s through host memory,
2.93 s straight to the GPU (``load_model`` of that run, commit 26c3edf, which loaded with the device map;
5.2-5.4 GB/s either way), so llmcls keeps the plain path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("host-then-to", "device-map", "load_model")


def child(variant: str, model: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from llmcls.config import ModelConfig
    from llmcls.model.load import load_model

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    torch.empty(1, device=device)  # the CUDA context is not what is timed
    t = time.perf_counter()
    if variant == "host-then-to":
        m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
    elif variant == "device-map":
        m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device_map={"": device})
    else:
        m = load_model(ModelConfig(name_or_path=model, source="local"), model, device=device, dtype=dtype)
    if device != "cpu":
        torch.cuda.synchronize()
    s = time.perf_counter() - t
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    return {"variant": variant, "seconds": round(s, 3), "gb": round(size / 1e9, 3),
            "gb_per_s": round(size / 1e9 / s, 2), "device": str(next(m.parameters()).device),
            "hf_device_map": getattr(m, "hf_device_map", None)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="A Hugging Face model folder.")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="load_speed.json")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        print("RESULT " + json.dumps(child(a._child, a.model)), flush=True)
        return 0
    from llmcls.env import environment
    from llmcls.files import atomic_write_json

    t = time.perf_counter()
    for f in sorted(Path(a.model).glob("*.safetensors")):  # into the page cache, untimed
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    prewarm_s = round(time.perf_counter() - t, 1)
    loads = []
    for r in range(a.repeats):
        for v in a.variants.split(","):
            p = subprocess.run([sys.executable, __file__, "--model", a.model, "--_child", v], capture_output=True,
                               text=True)
            got = [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
            if p.returncode != 0 or not got:
                print(p.stdout[-2000:], p.stderr[-3000:], file=sys.stderr)
                return 1
            loads.append({"round": r, **got[0]})
            print(loads[-1], flush=True)
    median = {v: statistics.median(x["seconds"] for x in loads if x["variant"] == v) for v in a.variants.split(",")}
    res = {"model": a.model, "prewarm_s": prewarm_s, "loads": loads, "median_s": median,
           "environment": environment()}
    atomic_write_json(Path(a.out), res)
    print(json.dumps(median))
    return 0


if __name__ == "__main__":
    sys.exit(main())
