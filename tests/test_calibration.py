"""Calibration: fits recover planted parameters; metrics and thresholds equal brute-force loops."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llmcls.calibration import (Calibration, UnreachablePrecision, brier, confidences, ece, fit_temperature,
                                fit_vector_scaling, nll, reliability_bins, risk_coverage, summary,
                                threshold_for_precision)

LABELS = [f"label{i}" for i in range(8)]
# Sampling noise: the fitted T's standard error is ~2.5% at 4000 rows (a 5% check would be a 2-sigma coin toss
# across seeds) and ~1.2% at 20000, where 5% is about 4 sigma; synth is vectorised, so this stays fast.
ROWS = 20000


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def synth(n, seed, temperature=1.0, bias=None, labels=LABELS, weights=None, scale=3.0):
    """Rows of 2-5 candidates; z plays the log-likelihoods, truth ~ softmax((z + bias[label]) / temperature).
    Vectorised with Gumbel tricks: top-k of log(weight) + Gumbel draws k labels without replacement, the argmax of
    scores + Gumbel samples from their softmax."""
    rng = np.random.default_rng(seed)
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, float)
    b = np.array([(bias or {}).get(lb, 0.0) for lb in labels])
    k = rng.integers(2, 6, size=n)
    picks = np.argsort(-(np.log(w) + rng.gumbel(size=(n, len(labels)))), axis=1)
    z = rng.normal(0.0, scale, size=(n, 5)) - 5.0           # log-likelihoods are negative; the shift is irrelevant
    s = (z + b[picks[:, :5]]) / temperature + rng.gumbel(size=(n, 5))
    s[np.arange(5)[None, :] >= k[:, None]] = -np.inf
    true = s.argmax(axis=1)
    cands = [[labels[j] for j in row[:m]] for row, m in zip(picks.tolist(), k)]
    logliks = [row[:m] for row, m in zip(z.tolist(), k)]
    return logliks, cands, [c[t] for c, t in zip(cands, true)]


@pytest.mark.parametrize("t_true", [2.5, 0.6])
def test_temperature_recovers_planted_temperature(t_true):
    logliks, cands, truth = synth(ROWS, seed=int(t_true * 10), temperature=t_true)
    cal = fit_temperature(logliks, cands, truth)
    assert cal.method == "temperature" and cal.bias == {} and cal.fitted_on_rows == ROWS and cal.dropped_rows == 0
    assert abs(cal.temperature / t_true - 1) < 0.05, cal.temperature
    assert cal.nll_after <= cal.nll_before
    # The torch objective and the numpy probabilities agree.
    assert nll(cal.probs(logliks, cands), cands, truth) == pytest.approx(cal.nll_after, rel=1e-9)
    assert nll(Calibration().probs(logliks, cands), cands, truth) == pytest.approx(cal.nll_before, rel=1e-9)
    # It is the minimum: nudging T either way is worse.
    for f in (0.97, 1.03):
        other = Calibration(temperature=cal.temperature * f)
        assert nll(other.probs(logliks, cands), cands, truth) > cal.nll_after


def test_rows_without_their_truth_are_dropped():
    logliks, cands, truth = synth(500, seed=1, temperature=2.0)
    truth[:7] = ["not-a-candidate"] * 7
    cal = fit_temperature(logliks, cands, truth)
    assert cal.dropped_rows == 7 and cal.fitted_on_rows == 493
    assert cal.temperature == pytest.approx(fit_temperature(logliks[7:], cands[7:], truth[7:]).temperature, rel=1e-6)
    with pytest.raises(ValueError, match="no fitting row"):
        fit_temperature(logliks[:7], cands[:7], truth[:7])


def test_vector_scaling_recovers_planted_bias():
    b_true = dict(zip(LABELS, [1.2, -0.8, 0.5, 0.0, -1.0, 0.7, -0.3, -0.3]))
    labels = LABELS + ["rare"]           # offered in few rows: too few true rows for a bias
    logliks, cands, truth = synth(ROWS, seed=7, bias=b_true, labels=labels, weights=[1.0] * 8 + [0.002])
    assert sum("rare" in c for c in cands) > 0 and truth.count("rare") < 50
    cal = fit_vector_scaling(logliks, cands, truth, labels, min_rows_per_label=50)
    assert cal.method == "vector" and set(cal.bias) == set(LABELS)       # "rare" keeps bias 0
    assert Calibration.from_dict(cal.to_dict()).probs([[0.0, 0.0]], [["rare", "rare2"]]) == [[0.5, 0.5]]
    assert abs(cal.temperature - 1) < 0.05
    # Biases are defined up to one constant: compare both centred.
    fit_mean, true_mean = np.mean(list(cal.bias.values())), np.mean(list(b_true.values()))
    for lb in LABELS:
        assert abs((cal.bias[lb] - fit_mean) - (b_true[lb] - true_mean)) < 0.15, (lb, cal.bias)
    assert cal.nll_after < fit_temperature(logliks, cands, truth).nll_after
    # A threshold above every label's true count: temperature only.
    assert fit_vector_scaling(logliks, cands, truth, labels, min_rows_per_label=10**6).bias == {}


def brute_bins(conf, correct, bins):
    members = [[] for _ in range(bins)]
    for c, ok in zip(conf, correct):
        k = 0 if c == 0 else next(k for k in range(bins) if k / bins < c <= (k + 1) / bins)
        members[k].append((c, ok))
    return members


def test_ece_and_reliability_bins_equal_brute_force():
    rng = np.random.default_rng(0)
    edges = [k / 15 for k in range(16)]
    conf = rng.uniform(0, 1, 3000).tolist() + edges * 3 + [0.0, 1.0, 1.0]
    correct = (rng.uniform(0, 1, len(conf)) < np.asarray(conf) ** 1.5).tolist()
    members = brute_bins(conf, correct, 15)
    r = reliability_bins(conf, correct, 15)
    assert r["edges"].tolist() == edges
    assert r["count"].tolist() == [len(m) for m in members]
    for k, m in enumerate(members):
        assert r["confidence"][k] == pytest.approx(sum(c for c, _ in m) / len(m), rel=1e-12)
        assert r["accuracy"][k] == pytest.approx(sum(ok for _, ok in m) / len(m), rel=1e-12)
    expected = sum(len(m) / len(conf) * abs(sum(ok for _, ok in m) / len(m) - sum(c for c, _ in m) / len(m))
                   for m in members if m)
    assert ece(conf, correct) == pytest.approx(expected, rel=1e-12)
    # Edges: k/15 goes to bin k-1 (right-closed), 0 to bin 0; an empty bin is NaN and not counted.
    one = reliability_bins([0.0, 1 / 15, 2 / 15, 1.0], [True] * 4, 15)
    assert one["count"].tolist() == [2, 1] + [0] * 12 + [1] and np.isnan(one["accuracy"][5])
    assert ece([1.0, 1.0], [True, False]) == 0.5 and ece([0.0], [False]) == 0.0
    with pytest.raises(ValueError):
        ece([1.2], [True])


def test_brier_nll_and_summary_equal_brute_force():
    logliks, cands, truth = synth(300, seed=3, temperature=1.5)
    probs = Calibration(temperature=1.7).probs(logliks, cands)
    b = [sum((p - (c == t)) ** 2 for p, c in zip(ps, cs)) for ps, cs, t in zip(probs, cands, truth)]
    n = [-math.log(ps[cs.index(t)]) for ps, cs, t in zip(probs, cands, truth)]
    assert brier(probs, cands, truth) == pytest.approx(sum(b) / len(b), rel=1e-12)
    assert nll(probs, cands, truth) == pytest.approx(sum(n) / len(n), rel=1e-12)
    conf, ok = confidences(probs, cands, truth)
    assert conf.tolist() == [max(ps) for ps in probs]
    assert ok.tolist() == [cs[ps.index(max(ps))] == t for ps, cs, t in zip(probs, cands, truth)]
    s = summary(probs, cands, truth)
    assert s["accuracy"] == pytest.approx(ok.mean()) and s["ece"] == ece(conf, ok, 15) and s["rows"] == 300
    # A truth missing from its candidates: probability 0, its own Brier term 1.
    assert brier([[0.25, 0.75]], [["a", "b"]], ["z"]) == 0.25 ** 2 + 0.75 ** 2 + 1
    assert brier([[0.25, 0.75]], [["a", "b"]], ["b"]) == 0.25 ** 2 * 2
    assert nll([[0.25, 0.75]], [["a", "b"]], ["z"]) == math.inf


def random_conf(seed, n=400):
    rng = np.random.default_rng(seed)
    conf = np.round(rng.uniform(0.2, 1.0, n), 2).tolist()        # rounding makes many ties
    correct = (rng.uniform(0, 1, n) < np.asarray(conf)).tolist()
    return conf, correct


def test_risk_coverage_equals_brute_force():
    conf, correct = random_conf(5)
    order = sorted(range(len(conf)), key=lambda i: (-conf[i], i))
    acc = [sum(correct[i] for i in order[:k]) / k for k in range(1, len(conf) + 1)]
    rc = risk_coverage(conf, correct)
    assert rc.coverage.tolist() == [k / len(conf) for k in range(1, len(conf) + 1)]
    assert rc.accuracy.tolist() == pytest.approx(acc, rel=1e-12)
    assert rc.aurc == pytest.approx(sum(1 - a for a in acc) / len(acc), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_threshold_for_precision_equals_brute_force(seed):
    conf, correct = random_conf(seed)
    for target in (0.6, 0.7, 0.8, 0.9, 0.95):
        best = None
        for t in sorted(set(conf)):
            answered = [ok for c, ok in zip(conf, correct) if c >= t]
            if sum(answered) / len(answered) >= target:
                best = (t, len(answered) / len(conf), sum(answered) / len(answered))
                break
        if best is None:
            with pytest.raises(UnreachablePrecision):
                threshold_for_precision(conf, correct, target)
        else:
            assert threshold_for_precision(conf, correct, target) == best


def test_threshold_answers_or_abstains_whole_ties():
    # Taking 2 of the three rows would give precision 1 at coverage 2/3, but rows at 0.8 go together.
    assert threshold_for_precision([0.9, 0.8, 0.8], [True, True, False], 0.9) == (0.9, 1 / 3, 1.0)
    assert threshold_for_precision([0.8, 0.8, 0.9], [False, True, True], 2 / 3) == (0.8, 1.0, 2 / 3)
    assert threshold_for_precision([0.5, 0.5], [True, True], 1.0) == (0.5, 1.0, 1.0)


def test_threshold_unreachable_target():
    with pytest.raises(UnreachablePrecision, match="best is 0.5") as e:
        threshold_for_precision([0.9, 0.9, 0.3], [True, False, False], 0.6)
    assert isinstance(e.value, ValueError) and e.value.best_precision == 0.5


def test_calibration_probs_roundtrip_and_threshold():
    logliks, cands, _ = synth(200, seed=11)
    ident = Calibration()
    assert ident.is_identity
    plain = ident.probs(logliks, cands)
    for ps, ls in zip(plain, logliks):
        assert ps == pytest.approx(softmax(ls), rel=1e-12) and sum(ps) == pytest.approx(1, abs=1e-12)
    cal = Calibration(temperature=0.7, bias={"label0": 0.5, "label3": -1.25})
    assert not cal.is_identity and not Calibration(threshold=0.5).is_identity
    got = cal.probs(logliks, cands)
    shifted = cal.probs([[x + 1000.0 * (i + 1) for x in ls] for i, ls in enumerate(logliks)], cands)
    for ps, qs, ls, cs in zip(got, shifted, logliks, cands):
        assert len(ps) == len(cs) and sum(ps) == pytest.approx(1, abs=1e-12)
        assert qs == pytest.approx(ps, rel=1e-9, abs=1e-15)
        assert ps == pytest.approx(softmax([(x + cal.bias.get(c, 0.0)) / 0.7 for x, c in zip(ls, cs)]), rel=1e-12)
    assert cal.probs([[-1e6, 0.0]], [["a", "b"]]) == [[0.0, 1.0]]      # no overflow, no NaN

    conf, correct = random_conf(2)
    cal = cal.with_threshold(conf, correct, 0.8)
    assert (cal.threshold, cal.coverage, cal.precision) == threshold_for_precision(conf, correct, 0.8)
    assert cal.abstains(conf).tolist() == [c < cal.threshold for c in conf]
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back == cal and back.to_dict()["version"] == 1
    assert Calibration.from_dict({"temperature": 2.0}) == Calibration(temperature=2.0)
    with pytest.raises(ValueError, match="version 2"):
        Calibration.from_dict({**cal.to_dict(), "version": 2})
    with pytest.raises(ValueError, match="unknown calibration keys"):
        Calibration.from_dict({"temperatur": 2.0})
    with pytest.raises(ValueError, match="temperature"):
        Calibration(temperature=0.0)
