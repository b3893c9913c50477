"""The whole pipeline through the real CLI on a 2-layer model: train -> eval -> predict."""

import json

from conftest import LABELS


def test_train_eval_predict_cli(trained_run, learnable_data, tmp_path, capsys):
    from llmcls.cli import main

    log = [json.loads(l) for l in (trained_run / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.25 * losses[0], losses  # the loss falls

    metrics = json.loads((trained_run / "eval" / "metrics.json").read_text())
    assert metrics["rows"] == 60 and metrics["accuracy"] >= 0.95, metrics["accuracy"]
    for f in ("config.yaml", "model/model.safetensors", "tokenizer/tokenizer_config.json"):
        assert (trained_run / f).exists(), f

    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(trained_run), "--input", str(learnable_data["test"]), "--output", str(out)]) == 0
    preds = [json.loads(l) for l in out.read_text().splitlines()]
    rows = [json.loads(l) for l in learnable_data["test"].read_text().splitlines()]
    assert len(preds) == len(rows)
    acc = sum(p["label"] == r["output"] for p, r in zip(preds, rows)) / len(rows)
    assert acc == metrics["accuracy"]
    for p, r in zip(preds, rows):
        assert set(p["probs"]) == set(r["category"])
        assert abs(sum(p["probs"].values()) - 1) < 1e-4
