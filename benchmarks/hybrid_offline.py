"""Would an LLM + TF-IDF hybrid beat both? Measured without a GPU from what a real-model run stored (issue 15,
item 5, before the option exists in llmcls).

From ``benchmarks/real_accuracy.py``'s files (the dev rows' log-likelihoods with the selected weights, the test
predictions with their log-likelihoods, the dev split's lines) and the training file:

1. TF-IDF + linear SVM (``llmcls.recipes.baseline``'s model) trained on the training rows the LLM trained on (the
   dev rows left out), reading the first ``--chars`` characters;
2. per candidate: ``a * log p_LLM(candidate) + b * svm(candidate)``, softmax over the row's candidates; ``a, b`` fitted
   on the dev rows by minimising NLL (L-BFGS), nothing fitted on the test rows;
3. accuracy and macro-F1 of the LLM, the SVM and the hybrid on the test rows, the same candidates.

    python benchmarks/hybrid_offline.py --files docs/bench/real_accuracy-run1-seed42-files.tar.gz \\
        --data ../shared/data/fudan-news [--chars 500]
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from llmcls.config import DataConfig
from llmcls.data import read_rows
from llmcls.metrics import compute_metrics


def _jsonl(files: dict, name: str) -> list[dict]:
    return [json.loads(l) for l in files[name].splitlines() if l.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", required=True, help="run-files.tar.gz of benchmarks/real_accuracy.py")
    p.add_argument("--data", required=True, help="Folder with train.jsonl and test.jsonl")
    p.add_argument("--chars", type=int, default=500, help="Leading characters the SVM reads (default: 500)")
    p.add_argument("--out", help="Write the result as JSON here")
    a = p.parse_args(argv)
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    with tarfile.open(a.files) as tar:
        files = {m.name: tar.extractfile(m).read().decode("utf-8") for m in tar.getmembers() if m.isfile()}
    dev_order = json.loads(files["data/prepare.json"])["dev"]["lines"]  # training-file line of dev.jsonl's k-th row
    dev_lines = set(dev_order)
    dev, test = _jsonl(files, "dev-logliks.jsonl"), _jsonl(files, "eval/predictions.jsonl")
    rows, _ = read_rows(Path(a.data) / "train.jsonl", DataConfig())
    train = [r for r in rows if r.line not in dev_lines]
    test_rows, _ = read_rows(Path(a.data) / "test.jsonl", DataConfig())
    dev_text = {r.line: r.text for r in rows if r.line in dev_lines}
    cut = lambda t: t[:a.chars]  # noqa: E731

    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)
    x = vec.fit_transform([cut(r.text) for r in train])
    labels = sorted({r.label for r in train})
    y = np.array([r.label for r in train])
    svms = {c: LinearSVC(C=2.0, random_state=0).fit(x, y == c) for c in labels}

    def svm_scores(texts):
        xt = vec.transform([cut(t) for t in texts])
        return {c: s.decision_function(xt) for c, s in svms.items()}

    def features(recs, texts):
        s = svm_scores(texts)
        out = []
        for i, r in enumerate(recs):
            ll = torch.tensor(r["logliks"], dtype=torch.float64)
            out.append((torch.log_softmax(ll, 0), torch.tensor([s[c][i] if c in s else -10.0
                                                                for c in r["candidates"]], dtype=torch.float64)))
        return out

    for r in test:
        r["candidates"] = list(r["probs"])
    f_dev = features(dev, [dev_text[dev_order[d["line"] - 1]] for d in dev])
    f_test = features(test, [test_rows[r["index"]].text for r in test])
    truth_dev = [d["candidates"].index(d["truth"]) for d in dev]

    w = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)  # a (LLM), b (SVM)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def nll():
        opt.zero_grad()
        loss = -sum(torch.log_softmax(w[0] * ll + w[1] * s, 0)[t] for (ll, s), t in zip(f_dev, truth_dev)) / len(dev)
        loss.backward()
        return loss

    opt.step(nll)
    a_, b_ = w.detach().tolist()

    def predict(feats, recs, how):
        out = []
        for (ll, s), r in zip(feats, recs):
            z = {"llm": ll, "svm": s, "hybrid": a_ * ll + b_ * s}[how]
            out.append(r["candidates"][int(torch.argmax(z))])
        return out

    truth = [r["truth"] for r in test]
    result = {"chars": a.chars, "weights": {"llm": a_, "svm": b_}, "dev_rows": len(dev), "test_rows": len(test)}
    for how in ("llm", "svm", "hybrid"):
        m = compute_metrics(truth, predict(f_test, test, how))
        result[how] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                       "errors": sum(1 for t, p in zip(truth, predict(f_test, test, how)) if t != p)}
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
