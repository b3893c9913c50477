"""Multi-label rows: which runs are multi-label, per-label thresholds chosen on the dev set, the predicted label
sets, and what eval and predict write for them (docs/MULTILABEL.md).

Training teaches every true label with one example per true label (the prompt, then that label: ``prepare``), so
the candidate scorer's softmax over a row's candidates learns to give each of a row's k true labels about 1/k of
the probability. A candidate's score is that probability; a label is predicted when its score reaches the label's
threshold, and (``multilabel.at_least_one``) the most probable candidate always is, since every row has a label.

The threshold of a label maximises its F1 over the dev rows that offer it, under that same rule (so the dev F1
it was chosen for is the F1 the predictions get); labels true in fewer than ``multilabel.min_positives`` dev rows
share one global threshold, which maximises the micro-F1 of all labels' dev decisions pooled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from llmcls.data import DataError, Row

VERSION = 1


def is_multi_label(rows: Sequence[Row], setting: str) -> bool:
    """``data.multi_label``: 'true', 'false', or 'auto' (multi-label when any row has more than one true label)."""
    return setting == "true" or (setting == "auto" and any(r.labels is not None for r in rows))


def refuse_multi(rows: Sequence[Row], path, field: str,
                 why: str = "the run was trained single-label (data.multi_label)") -> None:
    """Rows with several true labels where only single-label ones can be used: name the first such row."""
    bad = next((r for r in rows if r.labels is not None), None)
    if bad is not None:
        raise DataError(path, bad.line, field, f"{len(bad.labels)} true labels {bad.labels}, but {why}")


@dataclass
class Thresholds:
    """Per-label probability thresholds (``RUN/thresholds.json``); labels absent from ``per_label`` use ``default``."""

    default: float
    per_label: dict[str, float] = field(default_factory=dict)
    at_least_one: bool = True
    fitted_on_rows: int = 0
    dev_f1: dict[str, float] = field(default_factory=dict)   # each own-threshold label's dev F1 at its threshold
    default_dev_micro_f1: Optional[float] = None             # the global threshold's pooled dev micro-F1

    def of(self, label: str) -> float:
        return self.per_label.get(label, self.default)

    def select(self, candidates: Sequence[str], probs: Sequence[float]) -> list[str]:
        """The predicted labels of one row, most probable first."""
        order = sorted(range(len(candidates)), key=lambda i: -probs[i])  # stable: ties keep candidate order
        picked = [candidates[i] for i in order if probs[i] >= self.of(candidates[i])]
        if self.at_least_one and order and candidates[order[0]] not in picked:
            picked.insert(0, candidates[order[0]])
        return picked

    def to_dict(self) -> dict:
        return {"version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Thresholds":
        d = {k: v for k, v in d.items() if k != "report"}
        if d.pop("version", VERSION) != VERSION:
            raise ValueError(f"thresholds format version is not {VERSION}")
        return cls(**d)


def best_threshold(scores: Sequence[float], positive: Sequence[bool], forced: Sequence[bool]
                   ) -> tuple[float, float]:
    """(threshold, F1) maximising the F1 of "predicted = score >= threshold, or forced" over these decisions.
    Every cut between two distinct scores is tried (and above the highest); the threshold is the midpoint of the
    chosen gap, so it decides the dev rows as chosen and sits as far as it can from both sides. Ties of F1 keep
    the highest threshold (fewer predicted labels)."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    frc = np.asarray(forced, dtype=bool)
    if not len(s):
        raise ValueError("no scores to choose a threshold on")
    order = np.argsort(-s, kind="stable")
    ss, p, fr = s[order], pos[order], frc[order]
    ends = np.r_[np.flatnonzero(ss[1:] != ss[:-1]) + 1, len(ss)]  # k: the first k sorted rows are predicted
    k = np.r_[0, ends]
    cum = lambda a: np.r_[0, np.cumsum(a)][k]  # noqa: E731  (count among the first k)
    tp = cum(p) + (p & fr).sum() - cum(p & fr)
    predicted = k + fr.sum() - cum(fr)
    denom = predicted + p.sum()
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    j = int(np.argmax(f1))
    kj = int(k[j])
    if kj == 0:
        t = float(np.nextafter(ss[0], np.inf))
    elif kj == len(ss):
        t = float(ss[-1] / 2)
    else:
        upper, lower = ss[kj - 1], ss[kj]
        t = float((upper + lower) / 2)
        t = t if lower < t <= upper else float(upper)
    return t, float(f1[j])


def fit_thresholds(probs: Sequence[Sequence[float]], candidates: Sequence[Sequence[str]],
                   truth: Sequence[Sequence[str]], min_positives: int = 5, at_least_one: bool = True) -> Thresholds:
    """Thresholds chosen on dev rows: their candidates' probabilities and true label sets."""
    if len(probs) != len(candidates) or len(truth) != len(candidates):
        raise ValueError("probs, candidates and truth need one entry per row")
    pairs: dict[str, tuple[list, list, list]] = {}
    for ps, cs, ts in zip(probs, candidates, truth):
        top = int(np.argmax(ps))
        for i, (c, p) in enumerate(zip(cs, ps)):
            s, pos, frc = pairs.setdefault(c, ([], [], []))
            s.append(float(p))
            pos.append(c in ts)
            frc.append(at_least_one and i == top)
    if not pairs:
        raise ValueError("no dev rows to choose thresholds on")
    pooled = [[x for v in pairs.values() for x in v[i]] for i in range(3)]
    default, micro = best_threshold(*pooled)
    per_label, dev_f1 = {}, {}
    for label in sorted(pairs):
        s, pos, frc = pairs[label]
        if sum(pos) >= min_positives:
            per_label[label], dev_f1[label] = best_threshold(s, pos, frc)
    return Thresholds(default=default, per_label=per_label, at_least_one=at_least_one, fitted_on_rows=len(probs),
                      dev_f1=dev_f1, default_dev_micro_f1=micro)


def probs_of(rows: Sequence[Row], preds) -> list[list[float]]:
    """Each row's candidate probabilities from :class:`llmcls.infer.Prediction` s (uncalibrated where both exist)."""
    return [[(p.raw_probs or p.probs)[c] for c in r.candidates] for r, p in zip(rows, preds)]


def fit_on(rows: Sequence[Row], preds, cfg) -> Thresholds:
    """Thresholds for ``cfg.multilabel`` from dev rows and their predictions."""
    return fit_thresholds(probs_of(rows, preds), [r.candidates for r in rows], [r.true_labels for r in rows],
                          cfg.multilabel.min_positives, cfg.multilabel.at_least_one)


def default_thresholds(cfg) -> Thresholds:
    """What a run without dev-chosen thresholds uses: ``multilabel.default_threshold`` for every label."""
    return Thresholds(default=cfg.multilabel.default_threshold, at_least_one=cfg.multilabel.at_least_one)


def predicted_sets(rows: Sequence[Row], preds, thresholds: Thresholds) -> list[list[str]]:
    return [thresholds.select(r.candidates, ps) for r, ps in zip(rows, probs_of(rows, preds))]


def record(row: Row, p, labels: list[str], with_truth: bool) -> dict:
    """One line of predictions.jsonl (eval: ``truth`` and ``labels`` lists, ``correct`` = the same set) or of
    ``llmcls predict`` (``labels``, and ``label``: the most probable one)."""
    rec: dict = {"index": p.index, "line": row.line}
    if with_truth:
        rec.update(truth=row.true_labels, labels=labels, pred=p.pred, correct=set(labels) == set(row.true_labels))
    else:
        rec.update(labels=labels, label=p.pred)
    rec["probs"] = {k: round(v, 6) for k, v in p.probs.items()}
    rec["confidence"] = round(p.confidence, 6)
    if p.logliks is not None and with_truth:
        rec["logliks"] = [round(x, 5) for x in p.logliks]
    return rec


def dev_metrics(rows: Sequence[Row], preds, threshold: float, at_least_one: bool = True) -> dict:
    """What a dev evaluation of a multi-label run logs and selects on, at one threshold for every label (the
    per-label ones are chosen only after training): ``accuracy`` is the subset accuracy, ``macro_f1`` the
    multi-label macro-F1, ``nll`` the mean -log p of each (row, true label) pair, the training loss's own terms."""
    from llmcls.metrics import multilabel_metrics

    probs = probs_of(rows, preds)
    if not all(math.isfinite(x) for ps in probs for x in ps):
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "nll": float("nan")}
    th = Thresholds(default=threshold, at_least_one=at_least_one)
    pred = [th.select(r.candidates, ps) for r, ps in zip(rows, probs)]
    m = multilabel_metrics([r.true_labels for r in rows], pred)
    terms = [-math.log(max(ps[r.candidates.index(t)], 1e-300)) for r, ps in zip(rows, probs) for t in r.true_labels]
    return {"accuracy": m["subset_accuracy"], "macro_f1": m["macro_f1"], "nll": float(np.mean(terms))}
