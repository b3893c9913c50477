"""Classification metrics (scikit-learn does the counting), shared by ``llmcls eval``, the TF-IDF baseline and the
report, so that every number in a report is computed the same way."""

from __future__ import annotations

from typing import Optional, Sequence

INVALID = "<invalid>"  # the column of the confusion matrix for a reply that maps to no label (generate)


def compute_metrics(truth: Sequence[str], pred: Sequence[Optional[str]], labels: Optional[list[str]] = None) -> dict:
    """Accuracy, macro-F1, per-class P/R/F1 and the confusion matrix (scikit-learn), one definition for the LLM
    and the baseline: **macro-F1 (and weighted-F1) average over the labels present among the true labels**; the
    per-class figures and the confusion matrix cover every label given in ``labels``, seen in the truth or
    predicted, so that the matrix accounts for every row. An invalid prediction (None) counts as wrong and gets
    its own confusion-matrix column."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y_pred = [p if p is not None else INVALID for p in pred]
    present = sorted(set(truth))
    classes = sorted(set(labels or []) | set(truth) | {p for p in y_pred if p != INVALID})
    p, r, f, s = precision_recall_fscore_support(truth, y_pred, labels=classes, zero_division=0)
    cm_labels = classes + ([INVALID] if INVALID in y_pred else [])
    return {
        "rows": len(truth),
        "accuracy": float(accuracy_score(truth, y_pred)),
        "macro_f1": float(f1_score(truth, y_pred, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(truth, y_pred, labels=present, average="weighted", zero_division=0)),
        "f1_averaged_over": "labels present in the true labels",
        "invalid": sum(x == INVALID for x in y_pred),
        "invalid_rate": sum(x == INVALID for x in y_pred) / max(len(y_pred), 1),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": {"labels": cm_labels,
                             "matrix": confusion_matrix(truth, y_pred, labels=cm_labels).tolist()},
    }


def dev_metrics(rows, preds) -> dict:
    """What a dev evaluation logs and selects on: accuracy, macro-F1 and the mean negative log-probability of the
    true label (NLL, from the uncalibrated probabilities)."""
    from llmcls.calibration import nll

    import math

    truth = [r.label for r in rows]
    probs = [[(p.raw_probs or p.probs).get(c, 0.0) for c in r.candidates] for r, p in zip(rows, preds)]
    if not all(math.isfinite(x) for ps in probs for x in ps):  # a diverged model: say so, never select it
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "nll": float("nan")}
    m = compute_metrics(truth, [p.pred for p in preds], sorted(set(truth)))
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "nll": nll(probs, [r.candidates for r in rows], truth)}


def multilabel_metrics(truth: Sequence[Sequence[str]], pred: Sequence[Sequence[str]],
                       labels: Optional[list[str]] = None) -> dict:
    """Multi-label figures (scikit-learn on the rows' label sets, binarised over every label given, true or
    predicted): micro-F1, macro-F1 (averaged, as :func:`compute_metrics` does, over the labels present among the
    true labels), subset accuracy (the predicted set is exactly the true one), Hamming loss (the share of wrong
    label decisions over rows x labels) and per-label P/R/F1."""
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support
    from sklearn.preprocessing import MultiLabelBinarizer

    classes = sorted(set(labels or []) | {t for ts in truth for t in ts} | {p for ps in pred for p in ps})
    mlb = MultiLabelBinarizer(classes=classes)
    y_true, y_pred = mlb.fit_transform(truth), mlb.transform(pred)
    present = [i for i, c in enumerate(classes) if y_true[:, i].any()]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    return {
        "rows": len(truth),
        "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "subset_accuracy": float(accuracy_score(y_true, y_pred)),
        "hamming_loss": float(hamming_loss(y_true, y_pred)),
        "f1_averaged_over": "labels present in the true labels",
        "mean_true_labels": float(y_true.sum(1).mean()) if len(truth) else 0.0,
        "mean_predicted_labels": float(y_pred.sum(1).mean()) if len(truth) else 0.0,
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
    }
