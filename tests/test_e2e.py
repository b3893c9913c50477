"""The whole pipeline through the real CLI on a 2-layer model: train -> eval -> predict."""

import json


def test_train_eval_predict_cli(trained_run, learnable_data, tmp_path, capsys):
    from llmcls.cli import main

    log = [json.loads(l) for l in (trained_run / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.25 * losses[0], losses  # the loss falls

    metrics = json.loads((trained_run / "eval" / "metrics.json").read_text())
    assert metrics["rows"] == 60 and metrics["accuracy"] >= 0.95, metrics["accuracy"]
    for f in ("config.yaml", "model/model.safetensors", "tokenizer/tokenizer_config.json"):
        assert (trained_run / f).exists(), f

    swanlog = trained_run / "swanlog"
    assert swanlog.is_dir() and any(p.is_file() for p in swanlog.rglob("*")), "no offline SwanLab logs"

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


def test_predict_from_stdin_with_fixed_labels(trained_run, capsys, monkeypatch):
    import io

    from llmcls.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "the football was of a"}\n{"text": "pollution and"}\n'))
    assert main(["predict", str(trained_run), "--labels", "Sport,Enviornment"]) == 0
    out = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert [o["label"] for o in out] == ["Sport", "Enviornment"]
    assert all(set(o["probs"]) == {"Sport", "Enviornment"} for o in out)


def test_predict_never_overwrites(trained_run, learnable_data, tmp_path, capsys):
    from llmcls.cli import main

    out = tmp_path / "mine.jsonl"
    out.write_text("precious\n")
    assert main(["predict", str(trained_run), "-i", str(learnable_data["test"]), "-o", str(out)]) == 2
    assert out.read_text() == "precious\n"
    assert "--overwrite" in capsys.readouterr().err


def test_eval_takes_config_overrides_like_every_command(trained_run, capsys):
    """`llmcls eval RUN --section.key VALUE` overrides the run's config for this evaluation only; the earlier
    short flag is an alias of the same option; a key eval does not read is refused, not ignored."""
    import pytest

    from llmcls.cli import main

    before = (trained_run / "config.yaml").read_text()
    assert main(["eval", str(trained_run), "--data.max_eval_rows", "7", "--eval.batch_size", "3", "--json"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["rows"] == 7
    assert main(["eval", str(trained_run), "--max-rows", "5", "--batch-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 5
    assert (trained_run / "config.yaml").read_text() == before  # the run's own config is not rewritten
    with pytest.raises(SystemExit):  # lora.r means nothing to an evaluation of a finished run
        main(["eval", str(trained_run), "--lora.r", "4"])
    assert "--lora.r" in capsys.readouterr().err
    # leave the run as the other tests expect it: evaluated on all its rows
    assert main(["eval", str(trained_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 60
