"""Does the multi-label scheme work: one training example per true label, a softmax over each row's candidates,
per-label thresholds chosen on the dev set? Measured on a CPU with a linear stand-in for the LLM (no GPU here).

The LLM's candidate scorer gives a softmax over a row's candidates; trained with one example per true label, it
learns to share each row's probability among its true labels. A multinomial logistic regression on TF-IDF
features, trained on the same expanded examples, is the linear analogue: its probabilities renormalised over
each row's candidates are scored exactly as ``llmcls.multilabel`` scores the LLM's (same thresholds code, same
metrics). Compared with:

- top-1 only (what a single-label classifier answers),
- one global threshold (``multilabel.default_threshold``, no dev set),
- one-vs-rest binary logistic regressions at 0.5 (the textbook multi-label reference), over the same candidates.

    python benchmarks/multilabel_offline.py --data ../shared/data/fudan-news --out docs/bench/multilabel_offline.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from llmcls.config import DataConfig
from llmcls.data import read_rows, split_dev
from llmcls.datasets_builtin import make_multilabel
from llmcls.metrics import multilabel_metrics
from llmcls.multilabel import Thresholds, fit_thresholds


def _row_probs(p_all: np.ndarray, classes: list[str], rows) -> list[list[float]]:
    """Each row's class probabilities renormalised over its candidates (the scorer's softmax over them)."""
    idx = {c: i for i, c in enumerate(classes)}
    out = []
    for p, r in zip(p_all, rows):
        v = np.array([p[idx[c]] if c in idx else 0.0 for c in r.candidates]) + 1e-12
        out.append((v / v.sum()).tolist())
    return out


def _figures(rows, sets) -> dict:
    m = multilabel_metrics([r.true_labels for r in rows], sets)
    return {k: round(m[k], 4) for k in ("micro_f1", "macro_f1", "subset_accuracy", "hamming_loss",
                                         "mean_predicted_labels")}


def main(argv=None) -> int:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import MultiLabelBinarizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Single-label folder (train.jsonl, test.jsonl) to pair")
    p.add_argument("--out", help="Write the results here (JSON)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dev-fraction", type=float, default=0.1)
    p.add_argument("--C", type=float, default=10.0, help="Inverse regularisation of the logistic regressions")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        built = make_multilabel(args.data, tmp, seed=args.seed)
        cfg = DataConfig()
        rows, _ = read_rows(Path(tmp) / "train.jsonl", cfg)
        test, _ = read_rows(Path(tmp) / "test.jsonl", cfg)
    train, dev = split_dev(rows, args.dev_fraction, args.seed)
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    x_train = vec.fit_transform([r.text for r in train])
    x_dev, x_test = vec.transform([r.text for r in dev]), vec.transform([r.text for r in test])

    # the reference below (one binary classifier per label) is fitted in a second thread meanwhile: the two fits
    # are independent, and scipy's optimizer and sparse products leave the GIL to the other (same numbers, ~30%
    # less wall time on 2 cores). Its classes are the sorted labels, as the softmax's classes_ are.
    labels = sorted({t for r in train for t in r.true_labels})
    mlb = MultiLabelBinarizer(classes=labels)
    with ThreadPoolExecutor(1) as pool:
        ovr_fit = pool.submit(OneVsRestClassifier(LogisticRegression(C=args.C, max_iter=2000)).fit,
                              x_train, mlb.fit_transform([r.true_labels for r in train]))
        # the scheme: one example per true label, a softmax over the classes
        ex_rows = [i for i, r in enumerate(train) for _ in r.true_labels]
        ex_labels = [t for r in train for t in r.true_labels]
        soft = LogisticRegression(C=args.C, max_iter=2000).fit(x_train[ex_rows], ex_labels)
        ovr = ovr_fit.result()
    classes = list(soft.classes_)
    assert classes == labels
    dev_p = _row_probs(soft.predict_proba(x_dev), classes, dev)
    test_p = _row_probs(soft.predict_proba(x_test), classes, test)
    results = {}
    for min_pos in (5, 20):
        th = fit_thresholds(dev_p, [r.candidates for r in dev], [r.true_labels for r in dev], min_positives=min_pos)
        sets = [th.select(r.candidates, ps) for r, ps in zip(test, test_p)]
        results[f"per-example softmax, dev thresholds (min_positives {min_pos})"] = {
            **_figures(test, sets), "own_thresholds": len(th.per_label), "global": round(th.default, 4)}
    for t in (0.2, 0.3, 0.4):
        fixed = Thresholds(default=t)
        results[f"per-example softmax, global threshold {t}"] = _figures(
            test, [fixed.select(r.candidates, ps) for r, ps in zip(test, test_p)])
    top = Thresholds(default=2.0)
    results["per-example softmax, top-1 only"] = _figures(test, [top.select(r.candidates, ps)
                                                                 for r, ps in zip(test, test_p)])

    # reference: one binary classifier per label, 0.5, over each row's candidates (and at least the top one)
    pt = ovr.predict_proba(x_test)
    idx = {c: i for i, c in enumerate(classes)}
    sets = []
    for p_row, r in zip(pt, test):
        ps = [p_row[idx[c]] for c in r.candidates]
        picked = [c for c, v in zip(r.candidates, ps) if v >= 0.5] or [r.candidates[int(np.argmax(ps))]]
        sets.append(picked)
    results["one-vs-rest binary LR at 0.5 (reference)"] = _figures(test, sets)

    out = {"data": {**{k: v for k, v in built.items() if k != "dir"}, "train_rows_used": len(train),
                    "dev_rows": len(dev), "test_rows": len(test), "source": str(args.data),
                    "built_by": f"llmcls.datasets_builtin.make_multilabel (seed {args.seed})"},
           "features": "TF-IDF character 1-2-grams of the whole (paired, 300+300-character) text", "C": args.C,
           "results": results, "wall_s": round(time.perf_counter() - t0, 1)}
    text = json.dumps(out, ensure_ascii=False, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
