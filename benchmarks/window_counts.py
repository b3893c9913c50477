"""How many windows (``data.long_text: windows``) Fudan texts need, from the tokenizer alone (no model): the GPU
cost of reading whole documents is about this many forwards per row instead of one.

    python benchmarks/window_counts.py [--shared ../shared] [--out benchmarks/results/window_counts.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _q(s: list[int], p: float) -> int:
    return s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--lengths", default="384,1024")
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from llmcls.config import DataConfig, PromptConfig
    from llmcls.data import read_rows
    from llmcls.encode import PromptBuilder
    from llmcls.windows import WindowSettings, split

    shared = Path(a.shared)
    tok = AutoTokenizer.from_pretrained(str(shared / "qwen-tokenizer"))
    builder = PromptBuilder(tok, PromptConfig())
    out = {"overlap": a.overlap, "max_windows": None, "results": {}}
    for name in ("train", "test"):
        rows, _ = read_rows(shared / "data" / "fudan-news" / f"{name}.jsonl", DataConfig())
        for L in map(int, a.lengths.split(",")):
            t0 = time.perf_counter()
            counts = []
            for i in range(0, len(rows), 256):
                counts += [len(w) for w in split(builder, rows[i:i + 256], L,
                                                 WindowSettings("windows", a.overlap, None))]
            s = sorted(counts)
            r = {"rows": len(s), "windows": sum(s), "mean": round(sum(s) / len(s), 2),
                 "p50": statistics.median(s), "p90": _q(s, 0.9), "p99": _q(s, 0.99), "max": s[-1],
                 "one_window": sum(c == 1 for c in s), "over_16": sum(c > 16 for c in s),
                 "windows_if_capped_16": sum(min(c, 16) for c in s), "split_s": round(time.perf_counter() - t0, 1)}
            out["results"][f"{name}@{L}"] = r
            print(name, L, r, flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
