"""Config: typed, validated before any model loads, overridable, documented in --help."""

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from llmcls.config import ALL_PROJ, Config, ConfigError, iter_fields, load_config

TUTORIAL = ROOT / "configs" / "qwen1.5-7b-chat-fudan.yaml"


def test_tutorial_config_is_the_tutorial():
    c = load_config(TUTORIAL)
    assert (c.model.name_or_path, c.model.source) == ("qwen/Qwen1.5-7B-Chat", "modelscope")
    assert c.model.trust_remote_code is False
    assert c.prompt.system.startswith("You are an expert in text classification.")
    assert c.prompt.user_template == "Text: {text}, Type Options: {category}"
    assert c.data.max_length == 384
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.target_modules) == (8, 32, 0.1, ALL_PROJ)
    t = c.train
    assert (t.batch_size, t.grad_accum, t.epochs, t.lr, t.logging_steps, t.save_steps) == (4, 4, 2, 1e-4, 10, 100)
    assert t.gradient_checkpointing is True
    assert (c.track.project, c.track.experiment) == ("Qwen-fintune", "Qwen1.5-7B-Chat")


def test_unknown_and_bad_keys_are_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"lr": 1e-4, "epoch": 3}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch' \(did you mean 'epochs'\?\)"):
        load_config(p)
    p.write_text(yaml.safe_dump({"lora": {"r": "eight"}}))
    with pytest.raises(ConfigError, match="lora.r: expected an integer"):
        load_config(p)
    p.write_text(yaml.safe_dump({"eval": {"method": "vote"}}))
    with pytest.raises(ConfigError, match="eval.method: 'vote' is not one of score, generate"):
        load_config(p)
    p.write_text(yaml.safe_dump({"modle": {}}))
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(p)


def test_overrides_are_typed():
    c = load_config(TUTORIAL, {"train.lr": "2e-4", "train.gradient_checkpointing": "false",
                               "lora.target_modules": "q_proj,v_proj", "data.max_eval_rows": "none"})
    assert c.train.lr == 2e-4 and c.train.gradient_checkpointing is False
    assert c.lora.target_modules == ["q_proj", "v_proj"] and c.data.max_eval_rows is None


def test_help_documents_every_option():
    from llmcls.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name in ("prepare", "train", "eval", "predict", "run"):
        for action in sub[name]._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    train_help = sub["train"].format_help()
    for key, *_ in iter_fields(Config):
        assert f"--{key}" in train_help


def test_dry_run_loads_and_downloads_nothing(tmp_path):
    """An unreachable hub id and the offline switch: a dry run must still print the plan."""
    out = subprocess.run([sys.executable, "-m", "llmcls.cli", "train", "-c", str(TUTORIAL), "--dry-run",
                          "--model.name_or_path", "nobody/does-not-exist", "--model.offline", "true",
                          "--train.output_dir", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name_or_path: nobody/does-not-exist" in out.stdout
    assert "rows_per_optimizer_step: 16" in out.stdout
    assert not (tmp_path / "run").exists()
    if (ROOT.parent / "shared" / "data" / "fudan-news" / "train.jsonl").is_file():
        assert "total_steps: 836" in out.stdout  # 6,675 rows / 16 per step, 2 epochs


def test_saved_config_round_trips(tmp_path):
    from llmcls.config import save_config, to_dict

    c = load_config(TUTORIAL, {"train.seed": "7"})
    save_config(c, tmp_path / "c.yaml")
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(c)


def test_readme_documents_every_key():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.table() in (ROOT / "README.md").read_text(encoding="utf-8"), \
        "README's configuration reference is stale: python scripts/config_reference.py"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """A misspelt key or a wrong value in a shipped config fails here, not in a user's first run."""
    cfg = load_config(path)
    assert cfg.lora.r > 0 and cfg.train.batch_size * cfg.train.grad_accum > 0
    if "fast" in path.name or "qlora" in path.name:
        assert cfg.train.packing and cfg.train.compile  # what docs/BENCHMARKS.md measured
    if "qlora" in path.name:
        assert cfg.model.quantize == "nf4" and cfg.train.gradient_checkpointing


def test_every_command_documents_its_config_keys_and_old_flags():
    """One mechanism for settings: each command offers --section.key for the keys it reads (in --help), the earlier
    spellings as aliases of the same option."""
    from llmcls.cli import ALIASES, build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    for cmd, key, alias in [("eval", "eval.batch_size", "--batch-size"), ("eval", "data.test_file", "--test"),
                            ("predict", "eval.method", "--method"), ("serve", "serve.max_batch", "--max-batch"),
                            ("export", "export.dtype", "--dtype"), ("baseline", "baseline.svm_c", "--C")]:
        text = sub[cmd].format_help()
        assert f"--{key}" in text and alias in text, (cmd, key)
        assert ALIASES[cmd][key] == alias
        rest = {"export": ["RUN", "OUT"], "baseline": ["--train", "T", "--test", "T"]}.get(cmd, ["RUN"])
        a = sub[cmd].parse_args([*rest, alias, "1"])
        b = sub[cmd].parse_args([*rest, f"--{key}", "1"])
        assert getattr(a, f"cfg:{key}") == getattr(b, f"cfg:{key}") == "1"
    assert "--train.lr" not in sub["serve"].format_help()  # serve does not read it: not offered


@pytest.mark.parametrize("key, value, words", [
    ("train.batch_size", "0", "1 or more"), ("train.batch_size", "-4", "1 or more"),
    ("train.grad_accum", 0, "1 or more"), ("train.lr", "-1e-3", "more than 0"), ("lora.r", 0, "1 or more"),
    ("eval.batch_size", -1, "1 or more"), ("serve.max_batch", 0, "1 or more"), ("data.max_eval_rows", 0, "1 or more"),
    ("train.warmup_ratio", 1.0, "[0, 1)"), ("train.lr", "nan", "more than 0"),
    ("train.lr_scheduler", "cosin", "one of linear, cosine"),
    ("prompt.user_template", "Text: {txt} {category}", "names {txt}"),
    ("prompt.user_template", "Text: {text", "not a valid template"),
])
def test_values_out_of_range_are_refused_naming_the_key(key, value, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, {key: value})
    assert str(e.value).startswith(f"{key}=") and words in str(e.value)


def test_value_checks_apply_to_yaml_files_and_leave_valid_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  grad_accum: 0\n")
    with pytest.raises(ConfigError, match="train.grad_accum=0: must be 1 or more"):
        load_config(p)
    c = load_config(None, {"train.max_steps": -1, "data.max_eval_rows": None, "prompt.user_template": "{{x}} {text}"})
    assert c.train.max_steps == -1 and c.data.max_eval_rows is None


def test_scheduler_choices_are_transformers_names():
    from transformers import SchedulerType

    from llmcls.config import SCHEDULERS

    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}


def test_nothing_to_train_is_refused():
    from llmcls.config import check_training

    with pytest.raises(ConfigError, match="nothing to train"):
        check_training(load_config(None, {"train.epochs": 0}))
    check_training(load_config(None, {"train.epochs": 0, "train.max_steps": 3}))


def test_help_shows_the_allowed_range():
    keys = dict((k, doc) for k, _, _, doc in iter_fields(Config))
    assert keys["train.batch_size"].endswith("Allowed: 1 or more.")
    assert "Allowed:" not in keys["train.seed"]
