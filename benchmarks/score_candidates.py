"""What scoring more candidates per row costs: the prefix trie against the flat layout.

    python benchmarks/score_candidates.py --out bench-out/score_candidates
    python benchmarks/score_candidates.py --shape tiny --device cpu --rows 4 --batch 2 --counts 4,20   # smoke test

On a random-init model of a real shape (``--layers N`` keeps its first N decoder layers for a quick run; the
output says so), eager, in the layout ``llmcls.layouts.layout_for`` picks (``packed`` on a GPU in bf16, ``padded``
on a CPU): Fudan test rows' prompts cut at 384 tokens as an evaluation cuts them (synthetic Chinese text where
../shared has no Fudan rows), each scored against one label set of each size in ``--counts``, labels of 1-4
tokens. A row's prompt stays its own (listing its own few candidates) whatever is scored, so the figures isolate
what scoring more candidates costs: a task that lists 500 candidates in its prompt pays for a longer prompt too.

Label sets: a ``--shared-fraction`` of each set are "Category/Sub" names (about sqrt(n) categories, so a few
candidates share each category's tokens), the rest random vocabulary pieces (rarely sharing anything). The output
gives the fraction of candidates whose first token another candidate of the set shares, and the candidate
positions each layout lays out per row.

Each set is scored twice: ``trie`` (each distinct prefix once, what llmcls scores with) and ``flat``
(``share=False``: each candidate its own chain of positions, which is what the layout before the trie laid out;
both run the same attention code). Batches hold ``--batch`` rows, fewer where they would lay out more than
``--max-positions`` candidate positions (the kept logits, [positions, vocabulary] in float32, are what grows);
the rows per batch used are reported. Batches are made before the clock starts (the host's share is reported
apart, as ``prepare_ms_per_row``: ``classify`` makes them on a helper thread while the model runs). Output:
JSON with rows/s, seconds per row, positions, rows per batch and peak memory per (count, layout), each layout's
cost(n)/cost(smallest count) and what it would be if time went as the matmul FLOPs, the largest difference
between trie and flat scores, the environment.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from pathlib import Path

# A sibling module: ``python benchmarks/score_candidates.py`` puts this folder on sys.path, as it does any script's.
from gpu_speed import MAX_LEN, SHARED, build_model, parser, peak_gib, reset_peak, sync
from llmcls.config import DataConfig, PromptConfig
from llmcls.data import Row, read_rows
from llmcls.encode import PromptBuilder
from llmcls.env import environment
from llmcls.files import atomic_write_json
from llmcls.infer import prompts_for
from llmcls.layouts import _TensorLayout, layout_for, pack_batch, pad_batch, queue_packed, queue_padded

CATEGORIES = ["Sports", "Economy", "Politics", "Culture", "Science", "Health", "Travel", "Education", "Military",
              "History", "Law", "Weather", "Energy", "Music", "Film", "Food", "Fashion", "Auto", "体育", "经济",
              "政治", "文化", "科技", "健康", "旅游", "教育", "军事", "历史", "法律", "环境"]
SUBS = ["Football", "Tennis", "Golf", "Banks", "Stocks", "Trade", "Tax", "Elections", "Courts", "Art", "Books",
        "Games", "Space", "Physics", "Biology", "Drugs", "Hotels", "Flights", "Schools", "Army", "Navy", "War",
        "Oil", "Solar", "Jazz", "Rock", "Movies", "TV", "Wine", "Cars", "Trucks", "Rain", "Snow", "Crime", "Jobs",
        "Housing", "足球", "篮球", "股票", "银行", "选举", "法院", "电影", "音乐", "学校", "医院", "汽车", "能源",
        "石油", "天气", "犯罪", "房地产", "外交", "农业", "互联网", "航天", "考古", "戏剧", "美食", "服装"]
FILLER = "国家经济发展政府工作报告指出今年以来我国国民经济运行总体平稳市场需求逐步恢复就业形势保持稳定"


def label_set(tok, n: int, shared: float, rng: random.Random) -> list[str]:
    """n distinct labels of 1-4 tokens: round(n * shared) "Category/Sub" names over about sqrt of that many
    categories, the rest random vocabulary pieces."""
    fits = lambda s: 1 <= len(tok(s, add_special_tokens=False)["input_ids"]) <= 4  # noqa: E731
    out: list[str] = []
    n_shared = round(n * shared)
    if n_shared:
        cats = rng.sample(CATEGORIES, min(len(CATEGORIES), max(1, round(math.sqrt(n_shared)))))
        names = [f"{c}/{s}" for c in cats for s in SUBS if fits(f"{c}/{s}")]
        out = rng.sample(names, min(n_shared, len(names)))
    seen = set(out)
    while len(out) < n:
        ids = [rng.randrange(1000, 150000) for _ in range(rng.randint(1, 2))]
        s = tok.decode(ids).strip()
        if s and s.isprintable() and "/" not in s and s not in seen and fits(s):
            out.append(s)
            seen.add(s)
    rng.shuffle(out)
    return out


def sharing(b: PromptBuilder, labels: list[str]) -> dict:
    """How much the set shares: the fraction of candidates whose first token another candidate has, and its
    tokens per label."""
    firsts = [b.label_ids(x)[0] for x in labels]
    lengths = [len(b.label_ids(x)) for x in labels]
    return {"first_token_shared_fraction": round(sum(firsts.count(f) > 1 for f in firsts) / len(labels), 3),
            "label_tokens_mean": round(sum(lengths) / len(lengths), 2),
            "label_tokens_min_max": [min(lengths), max(lengths)]}


def load_texts(n: int, rng: random.Random) -> tuple[list[Row], str]:
    path = SHARED / "data/fudan-news/test.jsonl"
    if path.is_file():
        rows, _ = read_rows(path, DataConfig())
        return (rows * (n // len(rows) + 1))[:n], "fudan-news test rows"
    text = lambda: "".join(rng.choice(FILLER) for _ in range(700))  # noqa: E731
    return [Row(text(), ["Economy", "Politics", "Sports"], None) for _ in range(n)], "synthetic Chinese text"


def layouts(model) -> dict:
    """The layout llmcls picks for the model, with and without the trie."""
    base = layout_for(model).name
    if base not in ("packed", "padded"):
        raise SystemExit(f"this model scores with the '{base}' layout, which has no trie to compare")
    make, run = (pack_batch, queue_packed) if base == "packed" else (pad_batch, queue_padded)
    return {"trie": _TensorLayout(base, make, run),
            "flat": _TensorLayout(base, functools.partial(make, share=False), run)}


def positions_per_row(b: PromptBuilder, labels: list[str], share: bool) -> int:
    answers = [b.answer_ids(x) for x in labels]
    return len({tuple(a[:t]) if share else (c, t) for c, a in enumerate(answers) for t in range(1, len(a))})


def timed(model, layout, b, rows, prompts, per_batch: int, device: str, pin: bool) -> tuple[dict, list]:
    groups = [range(i, min(i + per_batch, len(rows))) for i in range(0, len(rows), per_batch)]
    t = time.perf_counter()
    batches = [layout.prepare(b, [rows[i] for i in g], [prompts[i] for i in g], pin) for g in groups]
    prepare_s = time.perf_counter() - t
    layout.queue(model, batches[0]).result()  # warm-up: kernels chosen, memory pools grown
    reset_peak(device)
    sync(device)
    t = time.perf_counter()
    queued = [layout.queue(model, batch) for batch in batches]  # read back after, as classify keeps the GPU busy
    scores = [s for q in queued for s in q.result()]
    sync(device)
    dt = time.perf_counter() - t
    return {"rows_per_s": round(len(rows) / dt, 2), "s_per_row": dt / len(rows), "rows_per_batch": per_batch,
            "prepare_ms_per_row": round(1e3 * prepare_s / len(rows), 3), "peak_gib": peak_gib(device)}, scores


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (quick runs)")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="rows per batch (fewer for large label sets)")
    ap.add_argument("--max-positions", type=int, default=16384,
                    help="candidate positions per batch at most: large label sets get fewer rows per batch")
    ap.add_argument("--counts", default="4,20,100,500", help="candidates per row, comma-separated")
    ap.add_argument("--shared-fraction", type=float, default=0.5, help="of each label set: 'Category/Sub' names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/score_candidates")
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    rng = random.Random(a.seed)
    tok = AutoTokenizer.from_pretrained(str(SHARED / "qwen-tokenizer"))
    shape = a.shape
    if a.layers is not None and shape != "tiny":  # build_model reads a config.json: write the cut one
        cfg = json.loads(Path(shape).read_text())
        cfg["num_hidden_layers"] = a.layers
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        shape = str(out / "shape.json")
        Path(shape).write_text(json.dumps(cfg))
    model, cfg = build_model(shape, a.device)
    b = PromptBuilder(tok, PromptConfig())
    rows, source = load_texts(a.rows, rng)
    prompts = prompts_for(b, rows, MAX_LEN)
    pin = a.device.startswith("cuda")
    res = {"shape": a.shape, "layers": cfg.num_hidden_layers,
           "layers_cut": a.layers is not None and a.shape != "tiny", "dtype": str(next(model.parameters()).dtype),
           "texts": source, "rows": len(rows), "prompt_tokens_mean": round(sum(map(len, prompts)) / len(rows), 1),
           "batch": a.batch, "max_positions": a.max_positions, "shared_fraction": a.shared_fraction,
           "environment": environment(), "counts": {}}
    ways = layouts(model)
    res["layout"] = ways["trie"].name
    for n in [int(x) for x in a.counts.split(",")]:
        labels = label_set(tok, n, a.shared_fraction, rng)
        scored = [Row(r.text, labels, None) for r in rows]
        entry = {"labels_sample": labels[:6], **sharing(b, labels)}
        scores = {}
        for way, layout in ways.items():
            per_row = positions_per_row(b, labels, way == "trie")
            per_batch = max(1, min(a.batch, a.max_positions // max(1, per_row)))
            entry[way], scores[way] = timed(model, layout, b, scored, prompts, per_batch, a.device, pin)
            entry[way]["positions_per_row"] = per_row
            print(n, way, json.dumps(entry[way]), flush=True)
        entry["trie_vs_flat_max_abs_diff"] = max(abs(x - y) for s, f in zip(scores["trie"], scores["flat"])
                                                 for x, y in zip(s, f))
        res["counts"][str(n)] = entry
    first = min(res["counts"], key=int)
    # what the ratio would be if time went as the matmul FLOPs: 2 x the decoder's weights per position, plus the
    # LM head (hidden x vocabulary) per kept position; attention left out
    head = model.get_output_embeddings().weight.numel()
    body = sum(w.numel() for w in model.parameters()) - head - model.get_input_embeddings().weight.numel()
    flops = lambda e, way: (res["prompt_tokens_mean"] + e[way]["positions_per_row"]) * body + (  # noqa: E731
        1 + e[way]["positions_per_row"]) * head
    for way in ways:
        res[f"{way}_cost_ratio"] = {n: round(e[way]["s_per_row"] / res["counts"][first][way]["s_per_row"], 3)
                                    for n, e in res["counts"].items()}
        res[f"{way}_flops_ratio"] = {n: round(flops(e, way) / flops(res["counts"][first], way), 3)
                                     for n, e in res["counts"].items()}
    print(json.dumps({k: res[k] for w in ways for k in (f"{w}_cost_ratio", f"{w}_flops_ratio")}), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "score_candidates.json", res)


if __name__ == "__main__":
    main()
