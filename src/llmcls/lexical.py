"""The classical model beside the LLM: character 1–2-gram TF-IDF and one linear SVM per label (scikit-learn).

Three uses, one model: ``llmcls baseline`` (the score to beat), the hybrid (``eval.hybrid``: its per-candidate
decision values are added to the LLM's calibrated log-likelihoods with a weight fitted on the dev set, see
:mod:`llmcls.calibration`) and the shortlist (``eval.shortlist``: with many labels, only a row's K candidates it
ranks highest are scored by the LLM). For the last two it is fitted when a run trains, on the rows the LLM trains on
(the dev rows left out) and read the way ``baseline.text`` says, and kept in ``RUN/lexical/`` and in exports.

It is stored as plain arrays (vocabulary JSON, idf and SVM weights in an ``.npz`` read without pickle), not as a
pickled scikit-learn object: loading a run or an export never runs code from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from llmcls.data import Row
from llmcls.files import atomic_dir

# A candidate the model never saw in training gets the SVM's "not this label" margin: not favoured, not ruled out.
UNSEEN = -1.0
VOCAB, ARRAYS, META = "vocabulary.json", "weights.npz", "lexical.json"


def _vectorizer(**kw):
    from sklearn.feature_extraction.text import TfidfVectorizer

    # sublinear tf: long news articles would otherwise drown the short ones in raw character counts.
    return TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True, **kw)


def cut_texts(rows: Sequence[Row], text: str, view: Optional[Callable[[list[Row]], list[Row]]] = None) -> list[Row]:
    """The rows as the model reads them (``baseline.text``): ``whole``, the first N characters, or ``same``, what the
    LLM reads (``view``: the run's prompt fitting)."""
    if text == "whole":
        return list(rows)
    if text == "same":
        if view is None:
            raise ValueError("text='same' needs the LLM's view of the rows")
        return view(list(rows))
    n = int(text)
    return [replace(r, text=r.text[:n]) for r in rows]


@dataclass
class LexicalModel:
    vectorizer: object          # a fitted TfidfVectorizer
    labels: list[str]
    coef: np.ndarray            # [labels, features] float32: one linear SVM per label
    intercept: np.ndarray       # [labels]
    C: float
    text: str                   # what of each text it reads (baseline.text)

    @classmethod
    def fit(cls, rows: Sequence[Row], C: float = 2.0, text: str = "whole", progress: bool = False,
            desc: str = "tf-idf") -> "LexicalModel":
        """Fit on ``rows`` (already cut as ``text`` says). One binary LinearSVC per label, one at a time, so that
        the progress bar has an honest ETA (what ``LinearSVC`` does internally for several classes)."""
        from sklearn.svm import LinearSVC
        from tqdm.auto import tqdm

        y = np.array([r.label for r in rows])
        labels = sorted(set(y))
        if len(labels) < 2:
            raise ValueError(f"the TF-IDF model needs at least two labels, found {labels}")
        vec = _vectorizer()
        # The vectorizer consumes an iterable once, so wrapping it in tqdm shows real progress.
        x = vec.fit_transform(tqdm((r.text for r in rows), total=len(rows), desc=f"{desc}: tf-idf train", unit="row",
                                   disable=not progress, mininterval=0.5))
        coef = np.zeros((len(labels), x.shape[1]), dtype=np.float32)
        intercept = np.zeros(len(labels))
        for j, c in enumerate(tqdm(labels, desc=f"{desc}: svm", unit="label", disable=not progress)):
            svm = LinearSVC(C=C, random_state=0).fit(x, y == c)
            coef[j], intercept[j] = svm.coef_[0], svm.intercept_[0]
        return cls(vec, labels, coef, intercept, C, text)

    @property
    def features(self) -> int:
        return self.coef.shape[1]

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """[rows, labels] SVM decision values (> 0: "is this label")."""
        x = self.vectorizer.transform(list(texts))
        return np.asarray(x @ self.coef.T.astype(np.float64)) + self.intercept

    def candidate_scores(self, rows: Sequence[Row]) -> list[list[float]]:
        """Per row, the decision value of each of its candidates (``UNSEEN`` for a label never trained on)."""
        col = {c: j for j, c in enumerate(self.labels)}
        s = self.scores([r.text for r in rows])
        return [[float(s[i, col[c]]) if c in col else UNSEEN for c in r.candidates] for i, r in enumerate(rows)]

    # ---- storage: arrays and JSON, no pickle
    def save(self, folder: str | Path, exists: str = "replace") -> None:
        vocab = {k: int(v) for k, v in self.vectorizer.vocabulary_.items()}
        with atomic_dir(Path(folder), exists=exists) as tmp:
            (tmp / VOCAB).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            np.savez(tmp / ARRAYS, idf=self.vectorizer.idf_, coef=self.coef, intercept=self.intercept)
            (tmp / META).write_text(json.dumps({"labels": self.labels, "C": self.C, "text": self.text,
                                                "features": self.features}, ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "LexicalModel":
        folder = Path(folder)
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        vocab = json.loads((folder / VOCAB).read_text(encoding="utf-8"))
        with np.load(folder / ARRAYS, allow_pickle=False) as z:
            idf, coef, intercept = z["idf"], z["coef"], z["intercept"]
        vec = _vectorizer(vocabulary=vocab)
        vec.idf_ = idf  # with a fixed vocabulary this makes the vectorizer fitted, exactly as it was
        return cls(vec, list(meta["labels"]), coef, intercept, float(meta["C"]), str(meta["text"]))


def shortlist_rows(rows: Sequence[Row], scores: Sequence[Sequence[float]], k: int
                   ) -> tuple[list[Row], list[list[float]]]:
    """Each row with only its ``k`` candidates of highest TF-IDF score (``k`` = 0: all), kept in their original order
    (the prompt lists them as the row did), and their scores."""
    out_rows, out_scores = [], []
    for row, s in zip(rows, scores):
        if 0 < k < len(row.candidates):
            top = sorted(np.argsort(-np.asarray(s), kind="stable")[:k].tolist())
            row, s = replace(row, candidates=[row.candidates[j] for j in top]), [s[j] for j in top]
        out_rows.append(row)
        out_scores.append(list(s))
    return out_rows, out_scores
