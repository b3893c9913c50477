"""What a batch shape seen for the first time costs ``score``, in each scoring layout.

    python benchmarks/score_shapes.py --out bench-out/score_shapes
    python benchmarks/score_shapes.py --shape tiny --device cpu --rows 16   # smoke test

On a random-init model of a real shape, eager (no compilation): ``classify`` over Fudan test rows of their natural
lengths (cut at 384 tokens as an evaluation cuts them), twice in a row, once with each layout that
``llmcls.layouts.layout_for`` can pick: ``padded`` (rows left-padded, a 4-D mask; sdpa runs cuDNN's attention on a
Hopper GPU, which builds an execution plan for each new batch shape) and ``packed`` (one sequence without padding,
variable-length FlashAttention; a GPU only). The first pass pays for every shape it meets, the second for none: a
real evaluation meets most of its shapes once. Output: JSON with rows/s per layout and pass, the distinct batch
shapes of the padded layout, the environment.

The ``packed`` layout was called ``flat`` before the scoring layouts moved to ``llmcls.layouts`` (it was
``llmcls.infer.pack_flat``): stored runs up to 23 (``docs/bench/score_shapes-run2*.json``) hold its figures under
the key ``flat``; this script writes ``packed``.
"""

from __future__ import annotations

import time
from pathlib import Path

# A sibling module: ``python benchmarks/score_shapes.py`` puts this folder on sys.path, as it does any script's.
from gpu_speed import MAX_LEN, SHARED, build_model, load_rows, parser, sync
import llmcls.infer as infer
from llmcls.config import PromptConfig
from llmcls.encode import PromptBuilder
from llmcls.env import environment
from llmcls.files import atomic_write_json
from llmcls.layouts import LAYOUTS


class _Recording:
    """A layout that records the [B, L] shape of every batch it prepares, and otherwise is ``layout``."""

    def __init__(self, layout, shapes: set):
        self.layout, self.name, self.shapes = layout, layout.name, shapes

    def prepare(self, builder, rows, prompts, pin=False):
        batch = self.layout.prepare(builder, rows, prompts, pin)
        self.shapes.add(tuple(batch.ids.shape))
        return batch

    def queue(self, model, batch):
        return self.layout.queue(model, batch)


def passes(model, b, rows, layout: str, batch: int, device: str) -> dict:
    """Two classify passes with ``layout`` forced (``classify`` asks ``llmcls.infer.layout_for`` for its layout);
    the distinct [B, L] shapes of the padded layout's batches."""
    shapes: set = set()
    forced = _Recording(LAYOUTS[layout], shapes)
    real_layout_for = infer.layout_for
    infer.layout_for = lambda model: forced
    try:
        out = {}
        for k in (1, 2):
            sync(device)
            t = time.perf_counter()
            infer.classify(model, b, rows, batch_size=batch, max_length=MAX_LEN, progress=False)
            sync(device)
            out[f"pass{k}_rows_per_s"] = round(len(rows) / (time.perf_counter() - t), 2)
            print(layout, k, out[f"pass{k}_rows_per_s"], flush=True)
    finally:
        infer.layout_for = real_layout_for
    if layout == "padded":
        out["distinct_shapes"] = len(shapes)
    return out


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="bench-out/score_shapes")
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHARED / "qwen-tokenizer"))
    model, _ = build_model(a.shape, a.device)
    b = PromptBuilder(tok, PromptConfig())
    _, rows = load_rows(a.rows, short=False)
    layouts = ["padded"] + (["packed"] if infer.layout_for(model).name == "packed" else [])
    res = {"shape": a.shape, "rows": len(rows), "batch": a.batch, "environment": environment()}
    for layout in layouts:
        res[layout] = passes(model, b, rows, layout, a.batch, a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "score_shapes.json", res)


if __name__ == "__main__":
    main()
