"""Issue 14 on a tiny model: the dev split, scoring the dev set during training, keeping the best weights,
early stopping, resuming, calibration through eval / predict / the HTTP API / an export loaded by plain
transformers, zero-shot."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from conftest import ROOT, learnable_rows, tiny_args, write_jsonl


def test_dev_split_is_stratified_seeded_and_disjoint():
    from llmcls.data import Row, split_dev

    rows = [Row(f"t{i}", ["A", "B", "C", "D"], lab, i + 1)
            for i, lab in enumerate(["A"] * 100 + ["B"] * 40 + ["C"] * 9 + ["D"] * 1)]
    train, dev = split_dev(rows, 0.2, seed=3)
    assert {r.line for r in train}.isdisjoint({r.line for r in dev})
    assert len(train) + len(dev) == len(rows)
    assert Counter(r.label for r in dev) == {"A": 20, "B": 8, "C": 2}  # each label's share; a singleton stays
    assert Counter(r.label for r in train)["D"] == 1
    again, _ = split_dev(rows, 0.2, seed=3)
    other, _ = split_dev(rows, 0.2, seed=4)
    assert [r.line for r in again] == [r.line for r in train]
    assert [r.line for r in other] != [r.line for r in train]


class Scramble(TrainerCallback):
    """Planted: at step ``at`` (after that step's dev evaluation) the weights are replaced by noise, so the last
    step's model is worse than an earlier one."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.at:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _cfg(data, out, **extra):
    from llmcls.cli import config_from_args, build_parser

    args = build_parser().parse_args(["train", *tiny_args(data["train"], data["test"], out, **{
        "data.dev_fraction": 0.25, "eval.every_steps": 4, "train.select_best": "macro_f1", "train.epochs": 10,
        **extra})])
    return config_from_args(args)


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory, tokenizer_dir, learnable_data):
    from llmcls.recipes.train import train

    out = tmp_path_factory.mktemp("sel") / "run"
    # the dev set scored every 8 steps (15 evaluations of its 60 rows, not 30): the same training, the planted drop
    # at step 100 between two of them
    cfg = _cfg(learnable_data, out, **{"train.keep_last": "true", "calibration.target_precision": 0.9,
                                       "train.save_steps": 20, "eval.every_steps": 8})
    summary = train(cfg, progress=False, callbacks=[Scramble(at=100)])
    return out, summary


def _dev_logs(run: Path) -> list[dict]:
    logs = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
    return [l for l in logs if "dev_macro_f1" in l]


def test_the_selected_weights_are_those_of_the_best_logged_dev_evaluation(selected_run):
    from llmcls.recipes.evaluate import evaluate
    from llmcls.rundir import RunDir

    run, summary = selected_run
    prep = json.loads((run / "data" / "prepare.json").read_text())
    dev_lines = set(prep["dev"]["lines"])
    assert len(dev_lines) == prep["dev"]["rows"] and prep["rows"] + prep["dev"]["rows"] == 240  # out of training
    assert abs(prep["dev"]["rows"] - 60) <= 4  # a quarter of each label, rounded per label
    dev = _dev_logs(run)
    assert [d["step"] for d in dev] == list(range(8, 120 + 1, 8))  # every 8 steps, the last one included
    assert dev[-1]["dev_macro_f1"] < 0.6 < max(d["dev_macro_f1"] for d in dev)  # the planted drop
    best = max(dev, key=lambda d: (d["dev_macro_f1"], -d["step"]))  # ties: the earlier evaluation
    sel = summary["selection"]
    assert sel["source"] == "best" and sel["step"] == best["step"] and sel["value"] == best["dev_macro_f1"]
    # the run's weights score on the dev set exactly what was logged for that step, and RUN/last what the last did
    rd = RunDir(run)
    cfg = rd.load_config({"data.test_file": str(rd.data.dev), "data.max_eval_rows": None})
    for weights, want in (("selected", best), ("last", dev[-1])):
        m = evaluate(run, cfg, weights=weights, progress=False)
        assert m["macro_f1"] == pytest.approx(want["dev_macro_f1"], abs=1e-12), weights
    evaluate(run, progress=False)  # RUN/eval back on the test file, as the other tests read it
    assert json.loads((run / "train_summary.json").read_text())["selection"]["step"] == best["step"]


def test_calibration_is_fitted_on_the_selected_weights_dev_scores(selected_run):
    run, summary = selected_run
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["method"] == "temperature" and cal["fitted_on_rows"] == cal["report"]["dev_rows"] > 50
    assert cal["report"]["after"]["nll"] <= cal["report"]["before"]["nll"] + 1e-9
    assert cal["threshold"] is not None and cal["precision"] >= 0.9 and 0 < cal["coverage"] <= 1


@pytest.mark.slow  # a training run of its own: the second tier keeps the default one under 8 minutes on 2 cores
def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path, tokenizer_dir,
                                                                             learnable_data):
    from llmcls.recipes.train import train

    at = 12  # the third evaluation (every 4 steps); the stop comes two evaluations after the best, by step 20
    cfg = _cfg(learnable_data, tmp_path / "run", **{"train.early_stopping_patience": 2, "train.select_best": "nll"})
    summary = train(cfg, progress=False, callbacks=[Scramble(at=at)])
    dev = _dev_logs(tmp_path / "run")
    steps = [d["step"] for d in dev]
    assert summary["global_step"] < 120  # stopped early
    best = min(dev, key=lambda d: d["dev_nll"])
    assert best["step"] <= at and steps[-1] == summary["global_step"]
    # after the best, exactly `patience` evaluations without improvement, then the stop
    assert len([s for s in steps if s > best["step"]]) == 2
    assert summary["selection"]["step"] == best["step"]


def test_resume_restores_the_best_and_the_patience_count(tmp_path):
    """What a resumed run knows: the best kept on disk and the evaluations since, from the checkpoint's log."""
    from types import SimpleNamespace

    from llmcls.config import load_config
    from llmcls.rundir import RunDir
    from llmcls.selection import DevEvaluator

    run = RunDir(tmp_path)
    run.best.mkdir()
    run.best_record.write_text(json.dumps({"step": 8, "macro_f1": 0.9, "accuracy": 0.9, "nll": 0.3,
                                           "metric": "macro_f1"}))
    cfg = load_config(None, {"train.select_best": "macro_f1", "train.early_stopping_patience": 3})
    ev = DevEvaluator.__new__(DevEvaluator)
    ev.cfg, ev.run, ev.metric = cfg, run, "macro_f1"
    history = [{"step": s, "dev_accuracy": a, "dev_macro_f1": a, "dev_nll": 1 - a} for s, a in
               [(4, 0.5), (8, 0.9), (12, 0.8), (16, 0.85)]] + [{"step": 16, "loss": 0.1}]
    ev.on_train_begin(None, SimpleNamespace(log_history=history, global_step=16), None)
    assert ev.best["step"] == 8 and ev.since_best == 2 and [h["step"] for h in ev.history] == [4, 8, 12, 16]


def test_selection_without_a_dev_set_is_refused():
    from llmcls.config import ConfigError, check_training, load_config

    with pytest.raises(ConfigError, match="dev set"):
        check_training(load_config(None, {"train.select_best": "macro_f1"}))
    with pytest.raises(ConfigError, match="choose one"):
        check_training(load_config(None, {"data.dev_fraction": 0.1, "data.dev_file": "x.jsonl"}))


# ---------------------------------------------------------------------------------- calibrated outputs
def test_eval_reports_probability_quality_before_and_after(selected_run):
    from llmcls.calibration import brier, ece

    run, _ = selected_run
    from llmcls.recipes.evaluate import evaluate

    m = evaluate(run, progress=False)
    cal = json.loads((run / "calibration.json").read_text())
    preds = [json.loads(l) for l in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    q = m["calibration"]
    assert q["method"] == "temperature" and q["temperature"] == cal["temperature"]
    conf = [p["confidence"] for p in preds]
    correct = [p["correct"] for p in preds]
    assert q["after"]["ece"] == pytest.approx(ece(conf, correct), abs=1e-5)
    raw_conf = [max(p["raw_probs"].values()) for p in preds]
    assert q["before"]["ece"] == pytest.approx(ece(raw_conf, correct), abs=1e-5)
    cands = [list(p["probs"]) for p in preds]
    assert q["after"]["brier"] == pytest.approx(
        brier([list(p["probs"].values()) for p in preds], cands, [p["truth"] for p in preds]), abs=1e-5)
    ab = q["abstention"]
    answered = [p for p in preds if not p["abstain"]]
    assert ab["answered"] == len(answered) and all(p["confidence"] >= cal["threshold"] for p in answered)
    assert all(p["confidence"] < cal["threshold"] for p in preds if p["abstain"])


def test_predict_gives_calibrated_probabilities_top_k_and_abstain(selected_run, learnable_data, tmp_path):
    from llmcls.calibration import Calibration
    from llmcls.cli import main

    run, _ = selected_run
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(run), "-i", str(learnable_data["test"]), "-o", str(out),
                 "--predict.top_k", "2"]) == 0
    preds = [json.loads(l) for l in out.read_text().splitlines()]
    cal = Calibration.from_dict({k: v for k, v in json.loads((run / "calibration.json").read_text()).items()
                                 if k != "report"})
    evals = [json.loads(l) for l in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    for p, e in zip(preds, evals):
        want = cal.probs([e["logliks"]], [list(e["probs"])])[0]
        assert list(p["probs"].values()) == pytest.approx(want, abs=1e-3)  # logliks are stored to 5 decimals
        top = sorted(p["probs"].values(), reverse=True)[:2]  # the k largest (labels may tie)
        assert [v for _, v in p["top_k"]] == pytest.approx(top, abs=1e-6) and p["top_k"][0][0] == p["label"]
        assert all(p["probs"][c] == pytest.approx(v, abs=1e-6) for c, v in p["top_k"])
        assert p["abstain"] == (p["confidence"] < cal.threshold)
    # an explicit threshold overrides the calibrated one
    assert main(["predict", str(run), "-i", str(learnable_data["test"]), "-o", str(out), "--overwrite",
                 "--predict.abstain_below", "1.0"]) == 0  # only a certain row (p = 1) answers
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert all(l["abstain"] for l in lines if l["confidence"] < 1.0) and sum(l["abstain"] for l in lines) > 0


def test_http_api_returns_calibrated_fields_and_old_clients_still_work(selected_run):
    import httpx

    from llmcls.serving.app import create_app, running
    from llmcls.serving.classifier import load_classifier

    run, _ = selected_run
    clf = load_classifier(run, device="cpu")
    assert clf.calibration is not None and clf.calibration.threshold is not None
    with running(create_app(clf, max_wait_ms=1)) as url:
        old = httpx.post(f"{url}/classify", json={"text": "football the of"}, timeout=30).json()["results"][0]
        assert {"label", "probs"} <= set(old) and abs(sum(old["probs"].values()) - 1) < 1e-6
        assert old["confidence"] == max(old["probs"].values()) and "top_k" not in old
        assert old["abstain"] == (old["confidence"] < clf.calibration.threshold)
        r = httpx.post(f"{url}/classify", json={"inputs": [{"text": "pollution"}, {"text": "software"}],
                                                "top_k": 3}, timeout=30).json()["results"]
        assert all(len(x["top_k"]) == 3 and x["top_k"][0][0] == x["label"] for x in r)
        assert httpx.post(f"{url}/classify", json={"text": "x", "top_k": -1}).status_code == 422
        schema = httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]
        assert {"confidence", "abstain", "top_k"} <= set(schema["Result"]["properties"])
        assert "top_k" in schema["OneText"]["properties"]


def test_calibration_survives_export_and_plain_transformers(selected_run, learnable_data, tmp_path):
    from llmcls.cli import main

    run, _ = selected_run
    exp = tmp_path / "export"
    assert main(["export", str(run), str(exp)]) == 0
    meta = json.loads((exp / "llmcls.json").read_text())
    cal = json.loads((run / "calibration.json").read_text())
    assert meta["calibration"]["temperature"] == cal["temperature"]
    assert meta["calibration"]["threshold"] == cal["threshold"]
    rows = learnable_data["test"].read_text().splitlines()[:6]
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "classify_with_transformers.py"), str(exp)],
                         input="\n".join(rows) + "\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    theirs = [json.loads(l) for l in out.stdout.splitlines()]
    ours = [json.loads(l) for l in (run / "eval" / "predictions.jsonl").read_text().splitlines()[:6]]
    for t, o in zip(theirs, ours):
        assert t["label"] == o["pred"]
        assert list(t["probs"].values()) == pytest.approx(list(o["probs"].values()), abs=1e-4)
        assert t["abstain"] == o["abstain"]


def test_zero_shot_scores_the_base_model_with_the_same_prompt(selected_run, capsys):
    from llmcls.cli import main

    run, _ = selected_run
    assert main(["eval", str(run), "--zero-shot", "--json"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["weights"] == "base" and (run / "zero-shot" / "metrics.json").is_file()
    fine = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["rows"] == fine["rows"] and m["accuracy"] < fine["accuracy"]  # a random-init base knows nothing


class Crash(TrainerCallback):
    """Planted: the process dies at step ``at`` (after the checkpoint before it was written)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt("planted crash")


@pytest.mark.slow  # two trainings: the second test tier
def test_a_resumed_run_selects_what_an_uninterrupted_one_does(tmp_path, tokenizer_dir, learnable_data):
    """Crash after the checkpoint at step 8, resume: the dev history, the kept step and its weights are those of
    the run that never stopped (training here is deterministic)."""
    from llmcls.recipes.train import train

    extra = {"train.max_steps": 20, "train.save_steps": 8, "eval.every_steps": 4, "train.select_best": "nll",
             "train.early_stopping_patience": 3}
    whole = train(_cfg(learnable_data, tmp_path / "whole", **extra), progress=False, callbacks=[Scramble(at=12)])
    cfg = _cfg(learnable_data, tmp_path / "crashed", **extra)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, callbacks=[Scramble(at=12), Crash(at=10)])
    resumed = train(cfg, resume=True, progress=False, callbacks=[Scramble(at=12)])
    assert resumed["resumed_from"].endswith("checkpoint-8")
    hist = lambda s: [(h["step"], round(h["nll"], 6)) for h in s["selection"]["history"]]  # noqa: E731
    assert hist(resumed) == hist(whole)
    assert resumed["selection"]["step"] == whole["selection"]["step"] <= 12
    assert resumed["global_step"] == whole["global_step"]  # early stopping counted the same evaluations
    a = (tmp_path / "whole" / "model" / "model.safetensors").read_bytes()
    b = (tmp_path / "crashed" / "model" / "model.safetensors").read_bytes()
    assert a == b


def test_what_the_review_found_stays_fixed(selected_run, tmp_path, capsys):
    """A report of a run evaluated only zero-shot; calibrate refuses a bad target before loading anything; eval
    does not offer keys it does not read; a class-weights file that is not an object is refused with a message."""
    import shutil

    from llmcls.cli import build_parser, main
    from llmcls.config import ConfigError
    from llmcls.reporting.report import write_report
    from llmcls.trainer import class_weights

    run, _ = selected_run
    copy = tmp_path / "run"
    # the copy's zero-shot scored here: the fixture's run holds one only after another test (its own module's
    # zero-shot test) has run in the same worker, which a test run alone or another xdist split does not give
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "zero-shot", "report.html", "baseline"))
    assert main(["eval", str(copy), "--zero-shot"]) == 0
    capsys.readouterr()
    html = write_report([copy]).read_text()
    assert "No evaluation of the run" in html and "zero-shot (base model)" in html
    assert main(["calibrate", str(run), "--target-precision", "1.5"]) == 2
    assert "target_precision" in capsys.readouterr().err
    eval_help = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    assert "--eval.zero_shot" not in eval_help and "--eval.every_steps" not in eval_help
    f = tmp_path / "w.json"
    f.write_text('["Sport", "Politics"]')
    with pytest.raises(ConfigError, match="an object"):
        class_weights(str(f), ["Sport"])


def test_bootstrap_wins_counts_resamples_where_macro_f1_is_higher_as_sklearn_computes_it():
    """The paired bootstrap's macro-F1 per resample is scikit-learn's, with the resample's row counts as weights."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    from llmcls.selection import bootstrap_wins

    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "d"]
    truth = list(rng.choice(labels, 60))
    pa = [t if rng.random() < 0.8 else rng.choice(labels) for t in truth]
    pb = [t if rng.random() < 0.7 else rng.choice(labels) for t in truth]
    na, nb = list(rng.random(60)), list(rng.random(60))
    counts = np.random.default_rng(0).multinomial(60, np.full(60, 1 / 60), size=300)
    for metric in ("macro_f1", "accuracy", "nll"):
        if metric == "macro_f1":
            f = lambda p, w: f1_score(truth, p, labels=sorted(set(truth)), average="macro",  # noqa: E731
                                      sample_weight=w, zero_division=0)
            sa, sb = ([f(p, w) for w in counts] for p in (pa, pb))
        elif metric == "accuracy":
            sa, sb = ([accuracy_score(truth, p, sample_weight=w) for w in counts] for p in (pa, pb))
        else:
            sa, sb = ([-(w @ np.array(n)) / 60 for w in counts] for n in (na, nb))
        want = float(np.mean(np.array(sa) > np.array(sb) + 1e-12))
        got = bootstrap_wins(metric, truth, {"pred": pa, "nll": na}, {"pred": pb, "nll": nb}, resamples=300)
        assert got == pytest.approx(want, abs=1e-9), metric


def test_the_last_step_is_kept_unless_an_earlier_one_is_better_beyond_dev_noise(tmp_path):
    """One dev row of difference is noise (the earlier step wins in ~63% of resamples: 1 - e^-1); twenty rows
    are not. The decision and its evidence are in the selection record."""
    from llmcls.config import load_config
    from llmcls.data import Row
    from llmcls.rundir import RunDir
    from llmcls.selection import DevEvaluator

    rows = [Row(f"t{i}", ["x", "y"], "x" if i % 2 else "y", i + 1) for i in range(200)]
    truth = [r.label for r in rows]
    flip = {"x": "y", "y": "x"}
    ev = DevEvaluator.__new__(DevEvaluator)
    ev.cfg = load_config(None, {"train.select_best": "accuracy"})
    ev.run, ev.metric, ev.rows = RunDir(tmp_path), "accuracy", rows
    ev.history = [{"step": 10, "accuracy": 0.995}, {"step": 20, "accuracy": 0.99}]
    ev.best = ev.history[0]
    ev.best_rows = {"pred": truth[:199] + [flip[truth[199]]], "nll": [0.0] * 200}
    for wrong, source, step in ((2, "last", 20), (21, "best", 10)):
        ev.last_rows = {"pred": [flip[t] for t in truth[:wrong]] + truth[wrong:], "nll": [0.0] * 200}
        sel = ev.selection(20)
        assert (sel["source"], sel["step"]) == (source, step)
        assert 0.55 < sel["bootstrap"]["wins"] < 0.7 if wrong == 2 else sel["bootstrap"]["wins"] > 0.99
    ev.cfg = load_config(None, {"train.select_best": "accuracy", "train.select_confidence": 0.0})
    ev.last_rows = {"pred": [flip[t] for t in truth[:2]] + truth[2:], "nll": [0.0] * 200}
    assert ev.selection(20)["source"] == "best"  # 0: plain best-of
