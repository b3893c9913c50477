"""Shared fixtures: the real Qwen tokenizer, tiny random models built from a config, tiny learnable datasets.

The tokenizer comes from ``../shared/qwen-tokenizer`` (``$LLMCLS_SHARED/qwen-tokenizer`` where that is set) when
present; otherwise it is rebuilt from Qwen's BPE ranks in the ``dashscope`` wheel on PyPI (see
``llmcls.model.tiny.build_qwen_tokenizer``), so a fresh clone tests the same tokenizer. Tests that need the shared
*data* skip with a reason when it is absent.
"""

from __future__ import annotations

import gc
import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout, or wherever $LLMCLS_SHARED says (as the benchmarks read it): a clone elsewhere
# (a CI folder under /tmp) tests the same data and tokenizer
SHARED = Path(os.environ.get("LLMCLS_SHARED") or ROOT.parent / "shared")
SHARED_TOKENIZER = SHARED / "qwen-tokenizer"
FUDAN = SHARED / "data" / "fudan-news"


@pytest.fixture(scope="module", autouse=True)
def _gc_skips_what_lives_on():
    """Speed only: what is alive when a test module starts (the imported torch, transformers, peft, ...: ~500k
    objects, whatever the previous modules left alive) is moved out of the garbage collector's reach, after a
    collection has freed the previous modules' garbage. Each full collection (llmcls calls ``gc.collect()`` after
    every evaluation; Python runs its own) then walks only what this module made: ~0.35 s less each time. Objects
    still die by reference counting as before (only reference cycles among frozen objects are never freed);
    nothing a test checks depends on it."""
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    if (SHARED_TOKENIZER / "vocab.json").is_file():
        path = SHARED_TOKENIZER
    else:
        from llmcls.model.tiny import qwen_tokenizer_dir

        path = qwen_tokenizer_dir()
    os.environ["LLMCLS_TOKENIZER"] = str(path)  # the tiny preset in CLI runs picks it up
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def tiny_model(seed: int = 0, layers: int = 2, hidden: int = 64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, eos_token_id=151645, pad_token_id=151643, bos_token_id=151643)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture
def model_factory():
    return tiny_model


LABELS = ["Sport", "Politics", "Enviornment", "Technology"]
KEYWORDS = {"Sport": "football", "Politics": "election", "Enviornment": "pollution", "Technology": "software"}
FILLER = "the of and a to in is was it for on with as by at from this that".split()


def learnable_rows(n: int, seed: int) -> list[dict]:
    """A task a tiny model can learn: the label is signalled by a keyword among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = [rng.choice(FILLER) for _ in range(rng.randint(6, 14))]
        words.insert(rng.randrange(len(words)), KEYWORDS[label])
        cands = rng.sample([x for x in LABELS if x != label], rng.randint(1, 3)) + [label]
        rng.shuffle(cands)
        rows.append({"text": " ".join(words), "category": cands, "output": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def learnable_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("learnable")
    return {"train": write_jsonl(d / "train.jsonl", learnable_rows(240, 1)),
            "test": write_jsonl(d / "test.jsonl", learnable_rows(60, 2)), "dir": d}


def tiny_args(train: Path, test: Path, out: Path, **extra) -> list[str]:
    """CLI options for a fast tiny run on the learnable task (full fine-tuning of a 2-layer model)."""
    opts = {"model.name_or_path": "tiny", "data.train_file": str(train), "data.test_file": str(test),
            "data.max_length": 128, "lora.method": "full", "train.output_dir": str(out), "train.epochs": 12,
            "train.batch_size": 16, "train.grad_accum": 1, "train.lr": 3e-3, "train.logging_steps": 5,
            "train.save_steps": 30, "train.gradient_checkpointing": "false", "train.seed": 0,
            "track.tracker": "none", "eval.batch_size": 32}
    opts.update(extra)
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tokenizer_dir, learnable_data) -> Path:
    """A tiny run trained and evaluated once through the real CLI, shared by tests that only read it."""
    from llmcls.cli import main

    out = tmp_path_factory.mktemp("runs") / "learnable"
    # SwanLab as in the tutorial; with no API key it must run offline (no prompt, no network).
    os.environ.pop("SWANLAB_API_KEY", None)
    # 8 epochs (120 steps): accuracy 1.0 on the 60 test rows and the loss at 1.2% of its start (12 epochs: ~15 s
    # more on 2 cores for the same figures; 6 epochs: 0.87)
    args = tiny_args(learnable_data["train"], learnable_data["test"], out, **{"track.tracker": "swanlab",
                                                                          "track.project": "llmcls-tests",
                                                                          "train.epochs": 8})
    assert main(["run", *args]) == 0
    return out


# ----------------------------------------------------------------------------- export and serve (issue 6)
def short_run_args(train: Path, test: Path, out: Path, method: str, steps: int) -> list[str]:
    """A few optimizer steps: enough to move the weights away from the base, which is all that export and serve
    tests need (they check the export reproduces the run, not that the run learned the task)."""
    return tiny_args(train, test, out, **{"lora.method": method, "lora.dropout": 0, "train.max_steps": steps,
                                          "train.lr": 5e-3, "train.save_steps": 1000})


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("small")
    return {"train": write_jsonl(d / "train.jsonl", learnable_rows(48, 3)),
            "test": write_jsonl(d / "test.jsonl", learnable_rows(12, 4)), "dir": d}


def _cli_run(tmp_path_factory, data, method: str, steps: int, artefact: str) -> Path:
    from llmcls.cli import main

    out = tmp_path_factory.mktemp("runs") / method
    assert main(["train", *short_run_args(data["train"], data["test"], out, method, steps)]) == 0
    assert (out / artefact).is_file()
    return out


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tokenizer_dir, small_data) -> Path:
    """A tiny LoRA run (adapter on a random-init base) trained through the CLI."""
    return _cli_run(tmp_path_factory, small_data, "lora", 4, "adapter/adapter_model.safetensors")


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, tokenizer_dir, small_data) -> Path:
    """A tiny full fine-tune through the CLI (two steps: its weights differ from the base)."""
    return _cli_run(tmp_path_factory, small_data, "full", 2, "model/model.safetensors")


@pytest.fixture(scope="session")
def lora_export(tmp_path_factory, lora_run) -> Path:
    from llmcls.cli import main

    out = tmp_path_factory.mktemp("exports") / "lora-merged"
    assert main(["export", str(lora_run), str(out)]) == 0
    return out



class LoggedLosses(TrainerCallback):
    """Keeps every training loss the Trainer logs (``seen``), in order."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kw):
        if "loss" in logs:
            self.seen.append(logs["loss"])
