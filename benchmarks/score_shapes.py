"""What a batch shape seen for the first time costs ``score``, in each scoring layout.

    python benchmarks/score_shapes.py --out bench-out/score_shapes
    python benchmarks/score_shapes.py --shape tiny --device cpu --rows 16   # smoke test

On a random-init model of a real shape, eager (no compilation): ``classify`` over Fudan test rows of their natural
lengths (cut at 384 tokens as an evaluation cuts them), twice in a row, once with each layout that
``llmcls.infer.layout_for`` can pick: ``padded`` (rows left-padded, a 4-D mask; sdpa runs cuDNN's attention on a
Hopper GPU, which builds an execution plan for each new batch shape) and ``flat`` (one sequence without padding,
variable-length FlashAttention; a GPU only). The first pass pays for every shape it meets, the second for none: a
real evaluation meets most of its shapes once. Output: JSON with rows/s per layout and pass, the distinct batch
shapes of the padded layout, the environment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from gpu_speed import MAX_LEN, SHARED, build_model, load_rows, parser, sync  # noqa: E402
import llmcls.infer as infer  # noqa: E402
from llmcls.config import PromptConfig  # noqa: E402
from llmcls.encode import PromptBuilder  # noqa: E402
from llmcls.env import environment  # noqa: E402
from llmcls.io import atomic_write_json  # noqa: E402


def passes(model, b, rows, layout: str, batch: int, device: str) -> dict:
    """Two classify passes with ``layout`` forced; the distinct [B, L] shapes of the padded layout's batches."""
    shapes = set()
    real_layout, real_pack = infer.layout_for, infer.pack

    def pack(*args):
        p = real_pack(*args)
        shapes.add(tuple(p.ids.shape))
        return p

    infer.layout_for, infer.pack = (lambda model: layout), pack
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
        infer.layout_for, infer.pack = real_layout, real_pack
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
    layouts = ["padded"] + (["flat"] if infer.layout_for(model) == "flat" else [])
    res = {"shape": a.shape, "rows": len(rows), "batch": a.batch, "environment": environment()}
    for layout in layouts:
        res[layout] = passes(model, b, rows, layout, a.batch, a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "score_shapes.json", res)


if __name__ == "__main__":
    main()
