"""llmcls export --as seq-cls: a standard sequence classifier (and ONNX) built from the LM head's label rows."""

import json

import pytest
import torch

from conftest import LABELS

SINGLE = ["Sport", "Politics", "Technology"]  # one Qwen token each; "Enviornment" is three


@pytest.fixture(scope="module")
def seq_export(tmp_path_factory, trained_run):
    from llmcls.cli import main

    out = tmp_path_factory.mktemp("exports") / "seq-cls"
    assert main(["export", str(trained_run), str(out), "--as", "seq-cls"]) == 0
    return out


@pytest.fixture(scope="module")
def causal(trained_run):
    from llmcls.rundir import load_trained

    model, tok, cfg = load_trained(trained_run, device="cpu", dtype=torch.float32)
    return model.eval(), tok, cfg


def test_export_is_a_plain_sequence_classifier(seq_export, trained_run):
    from transformers import AutoConfig, pipeline

    conf = AutoConfig.from_pretrained(seq_export)
    assert conf.architectures == ["Qwen2ForSequenceClassification"]
    assert conf.id2label == dict(enumerate(sorted(LABELS))) and conf.pad_token_id == 151643
    meta = json.loads((seq_export / "llmcls.json").read_text())
    agree = meta["seq_cls"]["agreement"]
    # the trained tiny model: the first token decides every test row as the exact scorer does
    assert agree["rows"] == 60 and agree["agreement"] == 1.0
    assert agree["accuracy_seq_cls"] == agree["accuracy_exact"] > 0.9

    s = meta["seq_cls"]
    rows = [json.loads(l) for l in open(meta_test(trained_run), encoding="utf-8")][:8]
    pipe = pipeline("text-classification", model=str(seq_export), device="cpu")
    got = pipe([s["prompt_prefix"] + r["text"] + s["prompt_suffix"] for r in rows])
    assert sum(g["label"] == r["output"] for g, r in zip(got, rows)) >= 7


def meta_test(run):
    from llmcls.rundir import RunDir

    return RunDir(run).load_config().data.test_file


@torch.no_grad()
def test_logits_are_the_first_token_logits_and_padding_does_not_matter(causal):
    from llmcls.data import Row
    from llmcls.encode import PromptBuilder
    from llmcls.infer import score_batch
    from llmcls.recipes.export_seqcls import build_seq_cls, first_tokens, seq_cls_logits

    model, tok, cfg = causal
    seq = build_seq_cls(model, SINGLE, first_tokens(tok, SINGLE), tok.pad_token_id)
    b = PromptBuilder(tok, cfg.prompt)
    rows = [Row(t, list(SINGLE), None) for t in ("football the of a", "election and to it was", "software")]
    prompts = [b.prompt_ids(r) for r in rows]
    left = seq_cls_logits(seq, prompts, tok.pad_token_id, padding_side="left")
    right = seq_cls_logits(seq, prompts, tok.pad_token_id, padding_side="right")
    alone = torch.cat([seq_cls_logits(seq, [p], tok.pad_token_id) for p in prompts])
    assert (left - alone).abs().max() < 1e-4 and (right - alone).abs().max() < 1e-4  # lengths differ: padded

    # Exactly the causal LM's logits of the labels' first tokens at the prompt's last position ...
    lm = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
    assert (alone - lm[:, first_tokens(tok, SINGLE)]).abs().max() < 1e-4
    # ... so with one-token labels, softmax(logits) = the exact scorer's softmax without its end-token term
    exact = torch.tensor(score_batch(model, b, rows))
    eos = torch.stack([torch.log_softmax(model(input_ids=torch.tensor([p + [t]])).logits[0, -1], -1)[tok.eos_token_id]
                       for p in prompts for t in first_tokens(tok, SINGLE)]).view(len(rows), -1)
    assert (torch.softmax(alone, -1) - torch.softmax(exact - eos, -1)).abs().max() < 1e-5
    assert eos.abs().max() > 1e-3  # the end-token term is real: without removing it the two differ


def test_labels_sharing_a_first_token_are_refused(tokenizer):
    from llmcls.recipes.export_seqcls import first_tokens

    assert len(set(first_tokens(tokenizer, SINGLE))) == 3
    with pytest.raises(ValueError, match="distinct first tokens: 'Sport' and 'Sport-news'"):
        first_tokens(tokenizer, ["Sport", "Politics", "Sport-news"])


def test_onnx_flag_needs_seq_cls(trained_run, tmp_path, capsys):
    from llmcls.cli import main

    assert main(["export", str(trained_run), str(tmp_path / "x"), "--onnx"]) == 2
    assert "--as seq-cls" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_onnx_runtime_matches_torch(lora_run, tmp_path):
    import time

    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmcls.cli import main

    out = tmp_path / "onnx"
    assert main(["export", str(lora_run), str(out), "--as", "seq-cls", "--onnx"]) == 0
    meta = json.loads((out / "llmcls.json").read_text())["seq_cls"]
    tok = AutoTokenizer.from_pretrained(out)
    tok.padding_side = "left"
    seq = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    rows = [json.loads(l) for l in open(meta_test(lora_run), encoding="utf-8")]
    texts = [meta["prompt_prefix"] + r["text"] + meta["prompt_suffix"] for r in rows]
    enc = tok(texts, padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": enc["input_ids"][:2], "attention_mask": enc["attention_mask"][:2]}
    sess.run(None, feed)  # warm-up of both, so that the rates below are steady-state
    with torch.no_grad():
        seq(**{k: torch.tensor(v) for k, v in feed.items()})
    t0 = time.perf_counter()
    onnx_logits = sess.run(None, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})[0]
    rate = len(rows) / (time.perf_counter() - t0)
    with torch.no_grad():
        t0 = time.perf_counter()
        torch_logits = seq(input_ids=torch.tensor(enc["input_ids"]),
                           attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
        torch_rate = len(rows) / (time.perf_counter() - t0)
    assert abs(onnx_logits - torch_logits).max() < 1e-3
    assert (onnx_logits.argmax(-1) == torch_logits.argmax(-1)).all()
    print(f"CPU, {len(rows)} rows in one batch of {enc['input_ids'].shape[1]} tokens: ONNX Runtime {rate:.0f} rows/s, "
          f"PyTorch {torch_rate:.0f} rows/s")
