"""train.class_weights (issue 15, imbalanced classes): the weights, the weighted answer loss against a hand
computation, both collators alike, and a run through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import learnable_rows, tiny_args, write_jsonl
from llmcls.collate import AnswerCollator, PackedCollator, answer_loss
from llmcls.encode import IGNORE
from llmcls.model.attention import packed_rows
from test_packing import ROWS, features


def test_balanced_weights_are_rows_over_labels_times_label_rows(tmp_path):
    from llmcls.config import ConfigError
    from llmcls.trainer import class_weights

    labels = ["A"] * 6 + ["B"] * 3 + ["C"]
    w = class_weights("balanced", labels)
    assert w == pytest.approx({"A": 10 / (3 * 6), "B": 10 / (3 * 3), "C": 10 / (3 * 1)})
    assert sum(w[x] for x in labels) / len(labels) == pytest.approx(1.0)  # they average 1 over the rows
    assert class_weights("none", labels) is None
    f = tmp_path / "w.json"
    f.write_text(json.dumps({"A": 1, "B": 2, "C": 0.5}))
    assert class_weights(str(f), labels) == {"A": 1.0, "B": 2.0, "C": 0.5}
    f.write_text(json.dumps({"A": 1, "B": -2}))
    with pytest.raises(ConfigError, match="missing: C.*not a weight >= 0: B"):
        class_weights(str(f), labels)


def test_weighted_loss_equals_a_hand_computation_in_both_layouts(tokenizer, model_factory):
    model = model_factory(seed=3)
    feats = [{**f, "weight": w} for f, w in zip(features(tokenizer), [0.5, 2.0, 1.0, 3.0])]
    # by hand: every answer token's cross-entropy from a plain forward of its own row, times its row's weight,
    # summed, over the number of answer tokens
    total, tokens = 0.0, 0
    with torch.no_grad():
        for f in feats:
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1].float()
            target = torch.tensor(f["labels"][1:])
            ce = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
            total += f["weight"] * ce[target != IGNORE].sum().item()
            tokens += int((target != IGNORE).sum())
    want = total / tokens
    for collator in (AnswerCollator(pad_id=tokenizer.pad_token_id), PackedCollator()):
        batch = collator(feats)
        labels, weights = batch.pop("labels"), batch.pop("answer_weights")
        assert weights.shape == labels[:, 1:].shape
        with torch.no_grad(), packed_rows(model, isinstance(collator, PackedCollator)):
            got = answer_loss(model(**batch), labels, weights=weights).item()
            plain = answer_loss(model(**batch), labels).item()
        assert got == pytest.approx(want, rel=1e-5), type(collator).__name__
        assert plain != pytest.approx(want, rel=1e-3)  # the weights do change it


def test_a_run_with_balanced_class_weights_records_them(tmp_path, tokenizer_dir):
    from llmcls.cli import main

    rows = learnable_rows(60, 9)
    rows = [r for r in rows if r["output"] != "Sport"] + [r for r in rows if r["output"] == "Sport"][:3]  # rare
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    args = tiny_args(train, train, tmp_path / "run", **{"train.class_weights": "balanced", "train.epochs": 1})
    assert main(["train", *args]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    w = summary["class_weights"]
    assert w["Sport"] == pytest.approx(len(rows) / (4 * 3)) and w["Sport"] == max(w.values())
    assert main(["train", *args, "--overwrite", "--train.class_weights", "nope.json"]) == 2
