"""Issue 15, items 3 and 5: the TF-IDF model that travels with a run (llmcls.lexical), the LLM + TF-IDF hybrid
(its weight fitted with the calibration on the dev set) and the shortlist, through eval, predict, serve and export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import learnable_rows, tiny_args, write_jsonl
from llmcls.data import Row


def _rows(data):
    return [Row(d["text"], d["category"], d["output"], i + 1) for i, d in enumerate(data)]


def test_lexical_model_round_trips_through_plain_arrays(tmp_path):
    from llmcls.lexical import UNSEEN, LexicalModel

    train, test = _rows(learnable_rows(120, 1)), _rows(learnable_rows(30, 2))
    m = LexicalModel.fit(train, C=1.5, text="whole")
    m.save(tmp_path / "lex")
    assert sorted(p.name for p in (tmp_path / "lex").iterdir()) == ["lexical.json", "vocabulary.json", "weights.npz"]
    back = LexicalModel.load(tmp_path / "lex")
    np.testing.assert_array_equal(back.scores([r.text for r in test]), m.scores([r.text for r in test]))
    assert (back.labels, back.C, back.text) == (m.labels, 1.5, "whole")
    # the decision values are the SVMs' own
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True)
    x = vec.fit_transform([r.text for r in train])
    y = np.array([r.label for r in train])
    label = m.labels[0]
    want = LinearSVC(C=1.5, random_state=0).fit(x, y == label).decision_function(vec.transform([r.text for r in test]))
    np.testing.assert_allclose(m.scores([r.text for r in test])[:, 0], want, atol=1e-5)
    odd = Row("x", [label, "never-seen"], None)
    assert m.candidate_scores([odd])[0][1] == UNSEEN


def test_hybrid_fit_recovers_a_known_temperature_and_tf_idf_weight():
    """Truths drawn from softmax(loglik / T + w * tfidf) with T = 2, w = 1.5: the joint L-BFGS fit finds both."""
    from llmcls.calibration import fit_temperature

    rng = np.random.default_rng(0)
    n, k = 20000, 4
    ll, lex = rng.normal(0, 3, (n, k)), rng.normal(0, 1, (n, k))
    z = ll / 2.0 + 1.5 * lex
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    cands = [["a", "b", "c", "d"]] * n
    truth = [cands[0][rng.choice(k, p=row)] for row in p]
    cal = fit_temperature(ll.tolist(), cands, truth, lexical=lex.tolist())
    assert cal.temperature == pytest.approx(2.0, rel=0.05) and cal.lexical == pytest.approx(1.5, rel=0.05)
    # the calibrated probabilities are that softmax, and need the TF-IDF scores
    got = np.array(cal.probs(ll[:5].tolist(), cands[:5], lex[:5].tolist()))
    zz = ll[:5] / cal.temperature + cal.lexical * lex[:5]
    np.testing.assert_allclose(got, np.exp(zz) / np.exp(zz).sum(1, keepdims=True), atol=1e-12)
    with pytest.raises(ValueError, match="TF-IDF"):
        cal.probs(ll[:5].tolist(), cands[:5])


def test_shortlist_keeps_the_top_k_in_the_rows_order_and_the_truth_when_ranked_in_it():
    from llmcls.lexical import shortlist_rows

    rows = [Row("t", ["a", "b", "c", "d", "e"], "d"), Row("u", ["x", "y"], "y")]
    scores = [[0.1, 0.9, -1.0, 0.5, 0.2], [0.0, 1.0]]
    out, s = shortlist_rows(rows, scores, 2)
    assert out[0].candidates == ["b", "d"] and s[0] == [0.9, 0.5] and out[0].label in out[0].candidates
    assert out[1] is rows[1] and s[1] == [0.0, 1.0]  # fewer candidates than K: unchanged
    out, _ = shortlist_rows(rows, scores, 1)
    assert out[0].candidates == ["b"]  # the truth ranked 2nd falls out at K = 1
    assert shortlist_rows(rows, scores, 0)[0] == rows


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory, tokenizer_dir):
    """A tiny run, trained briefly (the LLM alone is weak), with the hybrid on."""
    from llmcls.cli import main

    d = tmp_path_factory.mktemp("hybrid")
    train, test = write_jsonl(d / "train.jsonl", learnable_rows(200, 1)), write_jsonl(d / "test.jsonl",
                                                                                       learnable_rows(40, 2))
    out = d / "run"
    assert main(["run", *tiny_args(train, test, out, **{"train.epochs": 1, "data.dev_fraction": 0.25,
                                                         "eval.hybrid": "true", "baseline.text": "whole"})]) == 0
    return out, test


def test_a_hybrid_run_fits_the_tf_idf_weight_on_dev_and_eval_applies_it(hybrid_run):
    run, _ = hybrid_run
    cal = json.loads((run / "calibration.json").read_text())
    assert (run / "lexical" / "weights.npz").is_file() and cal["lexical"] > 0.1  # the keyword model helps
    assert cal["nll_after"] < cal["nll_before"]
    recs = [json.loads(l) for l in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    for r in recs:  # probabilities = softmax(loglik / T + w * tfidf), from the record's own numbers
        z = np.array(r["logliks"]) / cal["temperature"] + cal["lexical"] * np.array(r["lexical"])
        want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(list(r["probs"].values()), want, atol=2e-6)
    m = json.loads((run / "eval" / "metrics.json").read_text())
    llm_only = np.mean([max(zip(r["logliks"], r["probs"]))[1] == r["truth"] for r in recs])
    assert m["accuracy"] >= llm_only


def test_hybrid_runs_through_predict_serve_and_export(hybrid_run, tmp_path):
    from llmcls.recipes.export import export
    from llmcls.serving.classifier import load_classifier

    run, test = hybrid_run
    rows = [Row(d["text"], d["category"], None, i + 1) for i, d in enumerate(learnable_rows(6, 5))]
    ref = load_classifier(run, device="cpu")
    assert ref.lexical is not None
    want = ref.classify(rows)
    served = ref.score(ref.prepare(rows))  # the server's path
    export(run, tmp_path / "exp")
    exp = load_classifier(tmp_path / "exp", device="cpu")
    got = exp.score(exp.prepare(rows))
    for a, b, c in zip(want, served, got):
        assert a.pred == b.pred == c.pred and a.lexical == pytest.approx(c.lexical, abs=1e-9)
        for k in a.probs:
            assert b.probs[k] == pytest.approx(a.probs[k], abs=1e-5) and c.probs[k] == pytest.approx(a.probs[k],
                                                                                                      abs=1e-4)
    from llmcls.recipes.predict import predict

    out = tmp_path / "p.jsonl"
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": r.text, "category": r.candidates} for r in rows])
    assert predict(run, str(src), str(out), progress=False) == len(rows)
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["label"] for l in lines] == [p.pred for p in want]


def test_eval_shortlist_offers_the_llm_only_the_top_k_tf_idf_candidates(hybrid_run, tmp_path):
    from llmcls.cli import main

    run, _ = hybrid_run
    assert main(["eval", str(run), "--eval.shortlist", "1", "--tracker", "none"]) == 0
    recs = [json.loads(l) for l in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    multi = [r for r in recs if len(r["probs"]) > 1 or "shortlist" in r]
    assert multi and all(len(r["shortlist"]) == 1 and r["pred"] == r["shortlist"][0] for r in multi)
    assert all(math.isclose(sum(r["probs"].values()), 1.0, abs_tol=1e-6) for r in recs)


def test_hybrid_and_shortlist_settings_are_checked():
    from llmcls.config import ConfigError, check_training, load_config

    with pytest.raises(ConfigError, match="dev set"):
        check_training(load_config(None, {"eval.hybrid": True}))
    with pytest.raises(ConfigError, match="calibration"):
        check_training(load_config(None, {"eval.hybrid": True, "data.dev_fraction": 0.1,
                                          "calibration.method": "none"}))
    with pytest.raises(ConfigError, match="shortlist"):
        check_training(load_config(None, {"eval.shortlist": -1}))
