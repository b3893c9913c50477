"""llmcls export: the merged folder loads with plain transformers and reproduces the run it came from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import LABELS, ROOT

EXAMPLE = ROOT / "examples" / "classify_with_transformers.py"

# Runs in a fresh interpreter: only transformers and torch may be imported on the way to the predictions.
PLAIN_SCRIPT = r"""
import json, runpy, sys
ns = runpy.run_path(sys.argv[1])
clf = ns["ExportedClassifier"](sys.argv[2])
rows = [json.loads(l) for l in open(sys.argv[3], encoding="utf-8") if l.strip()]
preds = [clf.classify(r["text"], r.get("category")) for r in rows]
leaked = sorted({m.split(".")[0] for m in sys.modules} & {"peft", "llmcls"})
print(json.dumps({"preds": preds, "leaked": leaked}))
"""


def _prompt_batch(tokenizer, prompt_cfg, texts):
    from llmcls.data import Row
    from llmcls.encode import PromptBuilder, left_pad, positions

    b = PromptBuilder(tokenizer, prompt_cfg)
    ids, mask = left_pad([b.prompt_ids(Row(t, LABELS, None)) + b.answer_ids("Sport") for t in texts],
                         tokenizer.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}


@torch.no_grad()
def test_lora_export_merges_the_adapter(lora_run, lora_export):
    from transformers import AutoModelForCausalLM

    from llmcls.rundir import load_trained

    files = {p.name for p in lora_export.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "llmcls.json"} <= files
    assert "adapter_config.json" not in files and not any(n.startswith(".") for n in files)
    assert not [p for p in lora_export.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"

    meta = json.loads((lora_export / "llmcls.json").read_text())
    assert meta["labels"] == sorted(LABELS) and meta["source"]["method"] == "lora"
    assert meta["max_length"] == 128 and meta["prompt"]["user_template"] == "Text: {text}, Type Options: {category}"
    gen = json.loads((lora_export / "generation_config.json").read_text())
    assert gen["do_sample"] is False and 151645 in gen["eos_token_id"]

    adapter_model, tok, cfg = load_trained(lora_run, device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(lora_export, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(lora_run / "base-model", dtype=torch.float32).eval()
    batch = _prompt_batch(tok, cfg.prompt, ["football the of a", "election and to", "the software was it"])
    adapter_logits = adapter_model(**batch).logits
    merged_logits = merged(**batch).logits
    base_logits = base(**batch).logits
    # The adapter moved the model (else this test would pass for an export that ignored it) ...
    assert (adapter_logits - base_logits).abs().max().item() > 1e-2
    # ... and the merged weights reproduce it.
    assert (merged_logits - adapter_logits).abs().max().item() < 1e-4


def test_plain_transformers_gets_the_adapters_predictions(lora_run, lora_export, small_data, tmp_path):
    from llmcls.data import read_rows
    from llmcls.serving.classifier import load_classifier

    rows = [json.loads(l) for l in small_data["test"].read_text().splitlines()]
    rows.append({"text": "pollution " * 300})            # no candidates: the label set; too long: shortened
    rows.append({"text": "software " + "the of " * 200, "category": ["Technology", "Sport"]})
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", PLAIN_SCRIPT, str(EXAMPLE), str(lora_export), str(path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    plain = json.loads(out.stdout.strip().splitlines()[-1])
    assert plain["leaked"] == [], f"the plain-transformers path imported {plain['leaked']}"

    clf = load_classifier(lora_run, device="cpu")           # the run: base + PEFT adapter, llmcls scoring
    assert clf.kind == "run"
    parsed, _ = read_rows(path, clf_cfg(lora_run).data, need_label=False, labels=clf.labels)
    ours = clf.classify(parsed)
    assert len(ours) == len(plain["preds"]) == len(rows)
    for mine, theirs in zip(ours, plain["preds"]):
        assert mine.pred == theirs["label"]
        assert list(mine.probs) == list(theirs["probs"])
        for c in mine.probs:
            assert mine.probs[c] == pytest.approx(theirs["probs"][c], abs=1e-5)
    assert any(max(p.probs.values()) < 0.99 for p in ours)  # probabilities, not all one-hot: a real comparison


def clf_cfg(run):
    from llmcls.config import load_config

    return load_config(Path(run) / "config.yaml")


@torch.no_grad()
def test_full_finetune_export_reproduces_the_run(full_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmcls.cli import main
    from llmcls.rundir import load_trained

    out = tmp_path / "full-export"
    assert main(["export", str(full_run), str(out)]) == 0
    meta = json.loads((out / "llmcls.json").read_text())
    assert meta["source"]["method"] == "full" and meta["dtype"] == "float32"
    assert json.loads((out / "config.json").read_text())["use_cache"] is True  # training had turned it off

    model, tok, cfg = load_trained(full_run, device="cpu")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    batch = _prompt_batch(tok, cfg.prompt, ["football the of a", "pollution in the"])
    assert torch.equal(model(**batch).logits, exported(**batch).logits)


def test_export_never_overwrites_unasked_and_swaps_atomically(full_run, tmp_path, monkeypatch, capsys):
    import llmcls.recipes.export as ex
    from llmcls.cli import main

    out = tmp_path / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["export", str(full_run), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    # A failure half-way leaves the old folder as it was and no temporary folder behind.
    def boom(meta):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "_model_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ex.export(full_run, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    monkeypatch.undo()

    assert main(["export", str(full_run), str(out), "--overwrite"]) == 0
    assert (out / "llmcls.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]

    # The run itself is never a valid target, even with --overwrite.
    assert main(["export", str(full_run), str(full_run), "--overwrite"]) == 2
    assert main(["export", str(full_run), str(full_run.parent), "--overwrite"]) == 2
    assert (full_run / "model" / "model.safetensors").is_file()
