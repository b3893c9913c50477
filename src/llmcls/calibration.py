"""Calibrated probabilities and abstention for candidate scoring.

A fine-tuned LLM's candidate log-likelihoods rank well but their softmax is usually over-confident (more so after
several epochs), so "p = 0.97" is not a 97% chance of being right. Temperature scaling (Guo et al. 2017, "On
Calibration of Modern Neural Networks") divides the scores by one T > 0 fitted on held-out rows: it cannot change
the ranking (accuracy is unchanged) and, having one parameter, cannot overfit a dev set of a few hundred rows.
Vector scaling adds a per-label bias before dividing: it also corrects labels the model systematically over- or
under-scores (e.g. a label whose name is a frequent word), at the price of one parameter per label, so it needs
more rows. Rows here have their own candidate lists, so a label's bias enters only the rows that offer it.

Calibrated probabilities make abstention meaningful: :func:`threshold_for_precision` picks the lowest confidence
threshold whose answered rows reach a target precision, and :class:`Calibration` carries T, the biases, the
threshold and how they were obtained, as JSON.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal, NamedTuple, Sequence

import numpy as np

log = logging.getLogger(__name__)

VERSION = 1
Method = Literal["none", "temperature", "vector"]
# T is kept in [1/100, 100]: beyond it the fitting rows are (nearly) separable and the fit would run away to T -> 0.
LOG_T_BOUND = math.log(100.0)
# Per-label biases from fewer true rows have a standard error of roughly 1/sqrt(rows) nats or worse (about 0.15
# at 50) and mostly fit noise; rarer labels keep bias 0 and still get the temperature.
MIN_ROWS_PER_LABEL = 50


@dataclass
class Calibration:
    temperature: float = 1.0
    bias: dict[str, float] = field(default_factory=dict)   # label -> added to its log-likelihood; absent = 0
    lexical: float = 0.0                    # the hybrid: weight of the TF-IDF model's scores added after T (0: none)
    threshold: float | None = None          # abstain when the best calibrated probability is below it
    method: Method = "none"
    fitted_on_rows: int = 0
    dropped_rows: int = 0                   # fitting rows whose truth was not among their candidates
    nll_before: float | None = None         # mean NLL of the fitting rows, uncalibrated and calibrated
    nll_after: float | None = None
    target_precision: float | None = None   # what the threshold was chosen for, and what it gave on its rows
    coverage: float | None = None
    precision: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.lexical):
            raise ValueError(f"lexical weight must be finite, got {self.lexical!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.method not in ("none", "temperature", "vector"):
            raise ValueError(f"unknown calibration method {self.method!r}")
        self.bias = {str(k): float(v) for k, v in self.bias.items()}

    @property
    def is_identity(self) -> bool:
        """True when applying it changes nothing: T = 1, no non-zero bias, no TF-IDF term, no threshold."""
        return (self.temperature == 1.0 and not any(self.bias.values()) and self.threshold is None
                and self.lexical == 0.0)

    @property
    def needs_lexical(self) -> bool:
        """Whether probabilities need the TF-IDF model's scores (a hybrid)."""
        return self.lexical != 0.0

    def probs(self, logliks: Sequence[Sequence[float]], candidates: Sequence[Sequence[str]],
              lexical: Sequence[Sequence[float]] | None = None) -> list[list[float]]:
        """Softmax over each row's candidates of (loglik + bias[label]) / T + lexical weight x TF-IDF score, in
        float64. ``lexical``: the TF-IDF model's score of each candidate (needed by a hybrid only)."""
        lay = _Layout(logliks, candidates)
        if not len(lay.lengths):
            return []
        bias = np.array([self.bias.get(name, 0.0) for name in lay.names] + [0.0])
        z = (lay.values + bias[lay.ids]) / self.temperature
        if self.needs_lexical:
            if lexical is None:
                raise ValueError("this calibration is an LLM + TF-IDF hybrid: the TF-IDF scores are needed")
            z = z + self.lexical * _Layout(lexical, candidates).values
        z[~lay.mask] = -np.inf
        z -= z.max(axis=1, keepdims=True)    # the largest term is exp(0): no overflow, the sum is >= 1
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return [row[:n].tolist() for row, n in zip(p, lay.lengths)]

    def abstains(self, confidence: Sequence[float]) -> np.ndarray:
        """Per row: is the best calibrated probability below the threshold (same >= rule as threshold_for_precision)."""
        c = np.asarray(confidence, dtype=np.float64)
        return np.zeros(c.shape, bool) if self.threshold is None else c < self.threshold

    def with_threshold(self, confidence: Sequence[float], correct: Sequence[bool], target_precision: float
                       ) -> "Calibration":
        t, cov, prec = threshold_for_precision(confidence, correct, target_precision)
        return replace(self, threshold=t, target_precision=target_precision, coverage=cov, precision=prec)

    def to_dict(self) -> dict:
        return {"version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        d = dict(d)
        version = d.pop("version", VERSION)
        if version != VERSION:
            raise ValueError(f"calibration format version {version!r} is not supported (this code reads {VERSION})")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown calibration keys {sorted(unknown)}")
        return cls(**d)


class _Layout:
    """Ragged rows as a padded (rows, max candidates) float64 matrix, a mask, and label ids into ``names``;
    padding gets id len(names), which bias vectors map to 0."""

    def __init__(self, values: Sequence[Sequence[float]], candidates: Sequence[Sequence[str]]) -> None:
        if len(values) != len(candidates):
            raise ValueError(f"{len(values)} rows of scores but {len(candidates)} rows of candidates")
        self.lengths = np.array([len(c) for c in candidates], dtype=np.int64)
        if any(len(v) != n for v, n in zip(values, self.lengths)):
            raise ValueError("each row needs one score per candidate")
        if len(self.lengths) and self.lengths.min() == 0:
            raise ValueError(f"row {int(np.argmin(self.lengths))} has no candidates")
        width = int(self.lengths.max()) if len(self.lengths) else 0
        self.mask = np.arange(width)[None, :] < self.lengths[:, None]
        flat = [c for row in candidates for c in row]
        self.index = {name: i for i, name in enumerate(dict.fromkeys(flat))}
        self.names = list(self.index)
        self.values = np.zeros(self.mask.shape)
        self.values[self.mask] = np.fromiter((x for row in values for x in row), np.float64, len(flat))
        if not np.isfinite(self.values).all():
            raise ValueError("scores must be finite")
        self.ids = np.full(self.mask.shape, len(self.names), dtype=np.int64)
        self.ids[self.mask] = [self.index[c] for c in flat]

    def truth_hits(self, truth: Sequence[str]) -> np.ndarray:
        """(rows, width) bool: where the row's candidate is its truth."""
        if len(truth) != len(self.lengths):
            raise ValueError(f"{len(truth)} truths for {len(self.lengths)} rows")
        tid = np.array([self.index.get(t, -1) for t in truth], dtype=np.int64)
        return (self.ids == tid[:, None]) & self.mask


def _fit(logliks, candidates, truth, labels: Sequence[str] | None, min_rows: int, l2: float,
         lexical=None) -> Calibration:
    import torch  # only the fit needs it: `llmcls report` reads calibrations without importing torch

    lay = _Layout(logliks, candidates)
    lex = torch.from_numpy(_Layout(lexical, candidates).values) if lexical is not None else None
    hits = lay.truth_hits(truth)
    keep = hits.any(axis=1)
    dropped = int((~keep).sum())
    if dropped:
        log.warning("calibration: %d of %d rows dropped, their truth is not among their candidates", dropped, len(keep))
    if not keep.any():
        raise ValueError("no fitting row has its truth among its candidates")
    pos = torch.from_numpy(hits[keep].argmax(axis=1))[:, None]
    ll, mask, ids = (torch.from_numpy(a[keep]) for a in (lay.values, lay.mask, lay.ids))
    if lex is not None:
        lex = lex[torch.from_numpy(keep)]
    fitted: list[str] = []
    if labels is not None:
        counts = torch.bincount(ids.gather(1, pos).squeeze(1), minlength=len(lay.names) + 1)
        fitted = [lb for lb in dict.fromkeys(labels) if lb in lay.index and counts[lay.index[lb]] >= min_rows]
        skipped = [lb for lb in dict.fromkeys(labels) if lb not in fitted]
        if skipped:
            log.info("calibration: no bias for %d label(s) under %d true rows: %s", len(skipped), min_rows, skipped)
    # Label id -> bias slot; the last slot is a constant 0 for unbiased labels and padding.
    slot = torch.full((len(lay.names) + 1,), len(fitted), dtype=torch.int64)
    if fitted:
        slot[torch.tensor([lay.index[lb] for lb in fitted])] = torch.arange(len(fitted))
    bslot = slot[ids]

    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    raw = torch.zeros(len(fitted), dtype=torch.float64, requires_grad=True)
    w = torch.zeros((), dtype=torch.float64, requires_grad=True)  # the TF-IDF weight (hybrid)

    def centred() -> torch.Tensor:
        # Adding one constant to every bias changes no row's softmax: the biases are identifiable only up to it
        # (exactly so when no unbiased label shares rows with them). Fitting them mean-zero removes that flat
        # direction, along which LBFGS would otherwise creep for hundreds of iterations; an unbiased label thus
        # sits at the fitted labels' average. The L2 term is only shrinkage, not what fixes the constant.
        return raw - raw.mean() if len(fitted) else raw

    def mean_nll(log_t: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        full = torch.cat([b, b.new_zeros(1)])
        # Padding holds 0 (not -inf) until after the division, so d(z/T)/dT never meets inf * 0 = nan.
        z = (ll + full[bslot]) / log_t.clamp(-LOG_T_BOUND, LOG_T_BOUND).exp()
        if w is not None:
            z = z + w * lex
        z = z.masked_fill(~mask, -torch.inf)
        return (z.logsumexp(dim=1) - z.gather(1, pos).squeeze(1)).mean()

    params = [log_t] + ([raw] if fitted else []) + ([w] if lex is not None else [])
    hybrid = w if lex is not None else None
    # Changes below 1e-12 nats per row are noise next to any held-out set's sampling error.
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=500, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        b = centred()
        loss = mean_nll(log_t, b, hybrid) + l2 / len(pos) * (b * b).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        b = centred()
        before = float(mean_nll(torch.zeros((), dtype=torch.float64), torch.zeros_like(b)))
        after = float(mean_nll(log_t, b, hybrid))
        temperature = float(log_t.clamp(-LOG_T_BOUND, LOG_T_BOUND).exp())
    if not math.isfinite(after):
        raise FloatingPointError("calibration fit diverged")
    if abs(math.log(temperature)) >= LOG_T_BOUND - 1e-9:
        log.warning("calibration: temperature hit its bound (%g); the fitting rows are nearly separable", temperature)
    return Calibration(temperature=temperature, bias=dict(zip(fitted, b.tolist())),
                       lexical=float(w.detach()) if lex is not None else 0.0,
                       method="vector" if labels is not None else "temperature", fitted_on_rows=int(keep.sum()),
                       dropped_rows=dropped, nll_before=before, nll_after=after)


def fit_temperature(logliks: Sequence[Sequence[float]], candidates: Sequence[Sequence[str]],
                    truth: Sequence[str], lexical: Sequence[Sequence[float]] | None = None) -> Calibration:
    """One T > 0 minimising the mean NLL of the truth (over log T, with LBFGS). Fit it on held-out rows. With
    ``lexical`` (each candidate's TF-IDF score) the weight of that score is fitted jointly: the hybrid."""
    return _fit(logliks, candidates, truth, None, 0, 0.0, lexical)


def fit_vector_scaling(logliks: Sequence[Sequence[float]], candidates: Sequence[Sequence[str]],
                       truth: Sequence[str], labels: Sequence[str], min_rows_per_label: int = MIN_ROWS_PER_LABEL,
                       l2: float = 0.5, lexical: Sequence[Sequence[float]] | None = None) -> Calibration:
    """T and a bias per label of ``labels`` with at least ``min_rows_per_label`` true fitting rows (others keep 0),
    jointly, with LBFGS; the biases are mean-zero over the fitted labels. ``l2`` weighs sum(bias^2) against the
    summed NLL, i.e. a Gaussian prior of sd 1/sqrt(2 l2) nats (1 by default) on each bias, fading as rows grow.
    Use it when the held-out set is large (thousands of rows); otherwise fit_temperature."""
    return _fit(logliks, candidates, truth, labels, min_rows_per_label, l2, lexical)


# ---- metrics --------------------------------------------------------------------------------------------------

def _confidence_correct(confidence: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if c.ndim != 1 or c.shape != ok.shape or not len(c):
        raise ValueError("confidence and correct must be non-empty 1-D sequences of one length")
    if not ((c >= 0) & (c <= 1)).all():    # also rejects NaN
        raise ValueError("confidences must lie in [0, 1]")
    return c, ok


def confidences(probs: Sequence[Sequence[float]], candidates: Sequence[Sequence[str]], truth: Sequence[str]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the top probability and whether its candidate (the first on ties) is the truth."""
    lay = _Layout(probs, candidates)
    p = np.where(lay.mask, lay.values, -np.inf)
    top = p.argmax(axis=1)
    hits = lay.truth_hits(truth)
    # Clipping only absorbs float noise (float32 probabilities summing to 1 + 1e-7).
    return np.clip(p.max(axis=1), 0.0, 1.0), hits[np.arange(len(top)), top]


def nll(probs: Sequence[Sequence[float]], candidates: Sequence[Sequence[str]], truth: Sequence[str]) -> float:
    """Mean -log p(truth); a truth missing from its row's candidates has p = 0, so the result is inf."""
    lay = _Layout(probs, candidates)
    p_true = np.where(lay.truth_hits(truth), lay.values, 0.0).sum(axis=1)
    with np.errstate(divide="ignore"):
        return float(-np.log(p_true).mean())


def brier(probs: Sequence[Sequence[float]], candidates: Sequence[Sequence[str]], truth: Sequence[str]) -> float:
    """Mean over rows of sum over the row's candidates of (p_c - 1[c == truth])^2, in [0, 2]; a truth missing from
    its candidates adds its own term (0 - 1)^2 = 1, as if it were a candidate given probability 0."""
    lay = _Layout(probs, candidates)
    hits = lay.truth_hits(truth)
    sq = np.where(lay.mask, (lay.values - hits) ** 2, 0.0).sum(axis=1)
    return float((sq + ~hits.any(axis=1)).mean())


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool], bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width bins over [0, 1] with edges k / bins, right-closed: bin k holds k/bins < c <= (k+1)/bins, and
    c = 0 goes into bin 0. Returns edges, count, mean confidence and accuracy per bin (NaN where empty)."""
    c, ok = _confidence_correct(confidence, correct)
    edges = np.arange(bins + 1) / bins
    b = np.clip(np.searchsorted(edges, c, side="left") - 1, 0, bins - 1)
    count = np.bincount(b, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(b, weights=c, minlength=bins) / count
        acc = np.bincount(b, weights=ok.astype(np.float64), minlength=bins) / count
    return {"edges": edges, "count": count, "confidence": conf, "accuracy": acc}


def ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = 15) -> float:
    """Top-label expected calibration error: sum over bins of |B|/n * |acc(B) - conf(B)| (bins: reliability_bins)."""
    r = reliability_bins(confidence, correct, bins)
    full = r["count"] > 0
    return float((r["count"][full] / r["count"].sum() * np.abs(r["accuracy"][full] - r["confidence"][full])).sum())


class RiskCoverage(NamedTuple):
    coverage: np.ndarray    # [k-1] = k / n
    accuracy: np.ndarray    # [k-1] = accuracy of the k most confident rows
    aurc: float             # mean over k of the risk 1 - accuracy (area under the risk-coverage curve)


def risk_coverage(confidence: Sequence[float], correct: Sequence[bool]) -> RiskCoverage:
    """Answer the k most confident rows, k = 1..n; equal confidences keep input order (a stable sort), so the
    result is deterministic (their order only matters inside a tie)."""
    c, ok = _confidence_correct(confidence, correct)
    k = np.arange(1, len(c) + 1)
    acc = np.cumsum(ok[np.argsort(-c, kind="stable")]) / k
    return RiskCoverage(k / len(c), acc, float((1.0 - acc).mean()))


class UnreachablePrecision(ValueError):
    """No threshold reaches the target precision; ``best_precision`` is the highest any threshold gives."""

    def __init__(self, target: float, best: float) -> None:
        super().__init__(f"no confidence threshold reaches precision {target:g}; the best is {best:g} "
                         "(lower the target, or calibrate on more rows)")
        self.best_precision = best


def threshold_for_precision(confidence: Sequence[float], correct: Sequence[bool], target_precision: float
                            ) -> tuple[float, float, float]:
    """(t, coverage, precision): the smallest observed confidence t such that the rows with confidence >= t have
    accuracy >= target, i.e. the largest coverage meeting it. Rows of equal confidence are answered or abstained
    together. Raises UnreachablePrecision (a ValueError) if no t qualifies: always abstaining is a decision the
    caller should make knowingly."""
    if not 0.0 <= target_precision <= 1.0:
        raise ValueError(f"target_precision must lie in [0, 1], got {target_precision!r}")
    c, ok = _confidence_correct(confidence, correct)
    order = np.argsort(-c, kind="stable")
    cs, cum = c[order], np.cumsum(ok[order])
    last = np.r_[cs[1:] != cs[:-1], True]    # last row of each tie group: every threshold answers whole groups
    k = np.flatnonzero(last) + 1
    prec = cum[last] / k
    good = np.flatnonzero(prec >= target_precision)
    if not len(good):
        raise UnreachablePrecision(target_precision, float(prec.max()))
    j = good[-1]
    return float(cs[last][j]), float(k[j] / len(c)), float(prec[j])


def summary(probs: Sequence[Sequence[float]], candidates: Sequence[Sequence[str]], truth: Sequence[str]) -> dict:
    """Accuracy, NLL, Brier and 15-bin ECE of one set of probabilities (before/after reports)."""
    conf, ok = confidences(probs, candidates, truth)
    return {"rows": len(ok), "accuracy": float(ok.mean()), "nll": nll(probs, candidates, truth),
            "brier": brier(probs, candidates, truth), "ece": ece(conf, ok, 15)}
