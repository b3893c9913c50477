"""lora.task: seq_cls (issue 17): a classification head trained with LoRA on the generative recipe's prompt — the
loss against a hand computation, what training changes and what it leaves alone, the initial head as the
generative model's first-token classifier, eval's metrics, the export through pipeline("text-classification"),
serving, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import learnable_rows, tiny_model, write_jsonl

LABELS = sorted(["Sport", "Politics", "Enviornment", "Technology"])


def _rows(tokenizer, texts_and_cands):
    from llmcls.data import Row

    return [Row(t, list(c), None) for t, c in texts_and_cands]


@pytest.fixture(scope="module")
def tiny_seq(tokenizer):
    from llmcls import seqcls

    causal = tiny_model(seed=5)
    return causal, seqcls.from_causal(causal, tokenizer, LABELS).eval()


@torch.no_grad()
def test_initial_head_is_the_generative_first_token_classifier(tokenizer, tiny_seq):
    """Step 0: the head's logits are the LM's logits of each label's first token after the prompt, so the scores
    llmcls reads (log-softmax over a row's candidates) are the generative model's first-token log-probabilities
    restricted to those candidates, on the same prompt."""
    from llmcls.config import PromptConfig
    from llmcls.encode import PromptBuilder
    from llmcls.infer import score_batch
    from llmcls.seqcls import first_token_ids

    causal, seq = tiny_seq
    b = PromptBuilder(tokenizer, PromptConfig())
    rows = _rows(tokenizer, [("football the of a", LABELS), ("election and to it was", ["Politics", "Sport"]),
                             ("software", ["Technology", "Enviornment", "Sport"])])
    got = score_batch(seq, b, rows)  # through SeqClsLayout: padded batch, candidates masked
    first = first_token_ids(tokenizer, LABELS)
    for r, g in zip(rows, got):
        lm = torch.log_softmax(causal(input_ids=torch.tensor([b.prompt_ids(r)])).logits[0, -1].double(), -1)
        want = lm[[first[LABELS.index(c)] for c in r.candidates]]
        want = want - torch.logsumexp(want, 0)  # restricted to the row's candidates
        assert torch.tensor(g, dtype=torch.double) == pytest.approx(want, abs=1e-5)
    assert seq.score.weight.data_ptr() != causal.lm_head.weight.data_ptr()  # a copy: training it leaves the LM head


def test_loss_is_weighted_cross_entropy_over_label_logits(tokenizer, tiny_seq):
    from llmcls.config import PromptConfig
    from llmcls.encode import PromptBuilder
    from llmcls.seqcls import LabelCollator, LabelLoss

    _, seq = tiny_seq
    b = PromptBuilder(tokenizer, PromptConfig())
    rows = _rows(tokenizer, [("football the", LABELS), ("election and to it was a long", LABELS),
                             ("software", LABELS), ("pollution of the", LABELS)])
    classes = [3, 1, 2, 0]
    feats = [{"input_ids": b.prompt_ids(r), "class": c} for r, c in zip(rows, classes)]
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    with torch.no_grad():  # by hand: each row alone (no padding), cross-entropy of its label, times its weight
        per_row = [F.cross_entropy(seq(input_ids=torch.tensor([f["input_ids"]])).logits.float(),
                                   torch.tensor([c])).item() for f, c in zip(feats, classes)]
        batch = LabelCollator(tokenizer.pad_token_id)(feats)
        labels = batch.pop("labels")
        out = seq(**batch)
        plain = LabelLoss()(out, labels).item()
        weighted = LabelLoss(w)(out, labels).item()
        accumulated = LabelLoss(w)(out, labels, num_items_in_batch=torch.tensor(8)).item()
    assert plain == pytest.approx(sum(per_row) / 4, rel=1e-5)
    assert weighted == pytest.approx(sum(w[c].item() * x for c, x in zip(classes, per_row)) / 4, rel=1e-5)
    assert accumulated == pytest.approx(weighted / 2, rel=1e-6)  # the divisor is the accumulated batch's rows
    assert (labels[:, 0] == -100).all() and labels[:, 1].tolist() == classes
    # right-padded: every row starts with a real token, so no padded position is a query with nothing to attend to
    assert batch["attention_mask"][:, 0].all() and not batch["attention_mask"][:, -1].all()


# ------------------------------------------------------------------------------------------ a trained run
@pytest.fixture(scope="module")
def seq_run(tmp_path_factory, tokenizer_dir):
    """A tiny LoRA seq_cls run (4 steps, balanced class weights, a dev split scored at steps 2 and 4), trained
    through the Python API with a callback that keeps the weights training ended with, then evaluated."""
    from transformers import TrainerCallback

    from llmcls.config import load_config
    from llmcls.recipes.evaluate import evaluate
    from llmcls.recipes.train import train

    d = tmp_path_factory.mktemp("seqcls")
    train_file = write_jsonl(d / "train.jsonl", learnable_rows(48, 3))
    test_file = write_jsonl(d / "test.jsonl", learnable_rows(12, 4))
    out = d / "run"
    cfg = load_config(None, {
        "model.name_or_path": "tiny", "data.train_file": str(train_file), "data.test_file": str(test_file),
        "data.max_length": 128, "lora.task": "seq_cls", "lora.dropout": 0, "train.output_dir": str(out),
        "train.max_steps": 4, "train.batch_size": 8, "train.grad_accum": 1, "train.lr": 5e-3,
        "train.save_steps": 1000, "train.logging_steps": 1, "train.gradient_checkpointing": "false",
        "train.class_weights": "balanced", "data.dev_fraction": 0.2, "eval.every_steps": 2,
        "track.tracker": "none", "eval.batch_size": 8, "eval.zero_shot": "true"})
    kept: dict = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            kept.update({n: p.detach().clone() for n, p in model.named_parameters()})

    summary = train(cfg, progress=False, callbacks=[Keep()])
    metrics = evaluate(out, progress=False)
    zero = evaluate(out, weights="base", progress=False)
    return {"dir": out, "summary": summary, "metrics": metrics, "zero": zero, "weights": kept,
            "test": test_file}


def test_training_changes_the_adapters_and_the_head_only(seq_run):
    from safetensors.torch import load_file

    w = seq_run["weights"]
    base = load_file(str(seq_run["dir"] / "base-model" / "model.safetensors"))
    lora_b = [n for n in w if "lora_B" in n]
    assert lora_b and all(w[n].abs().max() > 0 for n in lora_b)  # peft starts B at zero
    head, init = w["base_model.model.score.modules_to_save.default.weight"], w[
        "base_model.model.score.original_module.weight"]
    assert not torch.equal(head, init)  # the head trained ...
    assert torch.equal(init, base["model.embed_tokens.weight"][_first(seq_run)])  # from the LM head's rows (tied)
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in w.items()
              if "lora_" not in n and "score." not in n}
    assert len(frozen) == len(base) - ("lm_head.weight" in base)
    for n, p in frozen.items():
        assert torch.equal(p, base[n]), n  # bitwise: every other weight is the base's
    assert seq_run["summary"]["trainable"] == sum(w[n].numel() for n in w if "lora_" in n) + head.numel()


def _first(run):
    from transformers import AutoTokenizer

    from llmcls.seqcls import first_token_ids

    return first_token_ids(AutoTokenizer.from_pretrained(run["dir"] / "tokenizer"), LABELS)


def test_eval_metrics_are_sklearns_on_the_predictions(seq_run):
    from sklearn.metrics import accuracy_score, f1_score

    m = seq_run["metrics"]
    recs = [json.loads(l) for l in (seq_run["dir"] / "eval" / "predictions.jsonl").read_text().splitlines()]
    truth, pred = [r["truth"] for r in recs], [r["pred"] for r in recs]
    assert m["rows"] == len(recs) == 12
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro", labels=sorted(set(truth)),
                                                   zero_division=0))
    for r in recs:  # probabilities over the row's own candidates only
        assert set(r["probs"]) <= set(LABELS) and sum(r["probs"].values()) == pytest.approx(1, abs=1e-4)
    s = seq_run["summary"]
    assert [h["step"] for h in s["selection"]["history"]] == [2, 4] and s["calibration"] is not None
    assert s["class_weights"]["Sport"] > 0 and seq_run["zero"]["rows"] == 12  # zero-shot: the initial head


def test_export_pipeline_gives_evals_labels_and_serving_agrees(seq_run, tmp_path):
    from transformers import AutoConfig, pipeline

    from llmcls.cli import main
    from llmcls.data import read_rows
    from llmcls.rundir import RunDir
    from llmcls.serving.classifier import load_classifier

    run = seq_run["dir"]
    out = tmp_path / "exp"
    assert main(["export", str(run), str(out)]) == 0  # a seq_cls run exports as a sequence classifier
    conf = AutoConfig.from_pretrained(out)
    assert conf.architectures == ["Qwen2ForSequenceClassification"] and conf.id2label == dict(enumerate(LABELS))
    meta = json.loads((out / "llmcls.json").read_text())
    assert meta["seq_cls"]["trained"] is True and meta["seq_cls"]["eval"]["rows"] == 12
    assert main(["export", str(run), str(tmp_path / "x"), "--as", "causal-lm"]) == 2

    recs = [json.loads(l) for l in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    clf = load_classifier(run, device="cpu")
    cfg = RunDir(run).load_config()
    rows, _ = read_rows(cfg.data.test_file, cfg.data)
    pipe = pipeline("text-classification", model=str(out), device="cpu")
    got = pipe([clf.builder.prompt_text(r) for r in rows], top_k=None)  # the prompt eval reads (short texts)
    picks = [max((g for g in o if g["label"] in r.candidates), key=lambda g: g["score"])["label"]
             for o, r in zip(got, rows)]
    assert picks == [r["pred"] for r in recs]
    served = clf.score(clf.prepare(rows))
    assert [p.pred for p in served] == picks


def test_a_candidate_outside_the_label_set_is_a_clear_error(seq_run, tmp_path, capsys):
    from llmcls.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "football the", "category": ["Sport", "Weather"],
                                                "output": "Sport"}])
    assert main(["eval", str(seq_run["dir"]), "--data.test_file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 1: candidate 'Weather' is not one of the labels the classification head was trained on" in err


def test_settings_that_do_not_apply_are_refused(tmp_path, tokenizer_dir, capsys):
    from llmcls.cli import main

    rows = learnable_rows(8, 1)
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    base = ["train", "--model.name_or_path", "tiny", "--data.train_file", str(train), "--lora.task", "seq_cls",
            "--train.output_dir", str(tmp_path / "r"), "--track.tracker", "none", "--train.max_steps", "1"]
    for extra, says in ((["--eval.method", "generate"], "eval.method=generate with lora.task=seq_cls"),
                        (["--train.packing", "true"], "train.packing=True with lora.task=seq_cls"),
                        (["--data.truncation", "right"], "data.truncation=right with lora.task=seq_cls")):
        assert main([*base, *extra]) == 2
        assert says in capsys.readouterr().err
    multi = write_jsonl(tmp_path / "m.jsonl", [{**r, "category": LABELS, "output": [r["output"], x]}
                                               for r, x in zip(rows, ["Sport", "Politics"] * 4) if r["output"] != x])
    assert main([*base, "--data.train_file", str(multi), "--overwrite"]) == 2
    assert "lora.task=seq_cls trains a single-label head" in capsys.readouterr().err
