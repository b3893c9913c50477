"""Issue 18: nothing a user types ends in a traceback. The probe (scripts/probe.py) runs bad input through the real
command; here its fast cases must each end with their exit status, one line on stderr, no traceback, nothing
touched outside the command's output and no ``*.tmp``. Below it, the fixes the probe cannot see from outside."""

import importlib.util
import logging
import os
import subprocess
import sys

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("probe", ROOT / "scripts" / "probe.py")
probe = importlib.util.module_from_spec(spec)
sys.modules["probe"] = probe  # dataclasses look their module up there
spec.loader.exec_module(probe)


def _params(fast: bool):
    return [pytest.param(c, id=c.name, marks=() if fast else pytest.mark.slow) for c in probe.CASES if c.fast == fast]


@pytest.mark.parametrize("case", _params(True) + _params(False))
def test_probe_case(case):
    reason = probe.skip_reason(case)
    if reason:
        pytest.skip(reason)
    rec = probe.run_case(case)
    if "skipped" in rec:
        pytest.skip(rec["skipped"])
    assert rec["ok"], rec


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how):
    case = probe.Case("debug", ["train", "--train.batch_size", "0"] + (["--debug"] if how == "flag" else []),
                      env={"LLMCLS_DEBUG": "1"} if how == "env" else {})
    rec = probe.run_case(case) if how == "flag" else _run_with_env(case)
    assert rec["rc"] != 0 and rec["traceback"] and "ConfigError" in rec["stderr"]


def _run_with_env(case):
    # run_case clears LLMCLS_DEBUG so that a developer's shell cannot change the other cases
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **case.env}
    p = subprocess.run([sys.executable, "-m", "llmcls.cli", *case.args], env=env, capture_output=True, text=True)
    err = p.stderr.strip().splitlines()
    return {"rc": p.returncode, "traceback": "Traceback (most recent call last)" in p.stderr, "stderr": err[-1]}


def test_a_config_error_imports_no_model_library():
    code = ("import sys; from llmcls.cli import main; rc = main(['train', '--train.lr', '-1e-3']); "
            "print(rc, sorted(m for m in ('torch', 'transformers', 'fastapi', 'sklearn') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                       capture_output=True, text=True)
    assert p.stdout.split() == ["2", "[]"], p.stderr
    assert p.stderr.strip() == "llmcls train: error: train.lr=-0.001: must be more than 0"


def test_unexpected_errors_are_one_line_with_status_1():
    from llmcls.errors import error_line

    assert error_line(KeyError("x")) == (1, "KeyError: 'x' (an unexpected error: run again with --debug or "
                                            "LLMCLS_DEBUG=1 for the traceback)")
    assert error_line(PermissionError(13, "Permission denied", "/a/b")) == (2, "/a/b: Permission denied")
    assert error_line(OSError(28, "No space left on device", "/a")) == (2, "/a: no space left on the device")


def test_negative_numbers_are_values_not_options():
    from llmcls.cli import _negative_values

    assert _negative_values(["train", "--train.lr", "-1e-3", "--train.max_steps", "-1", "--dry-run"]) == \
        ["train", "--train.lr=-1e-3", "--train.max_steps=-1", "--dry-run"]
    assert _negative_values(["train", "--train.lr=-2", "-q"]) == ["train", "--train.lr=-2", "-q"]


def test_predict_labels_take_a_json_list_for_commas():
    from llmcls.cli import parse_labels
    from llmcls.config import ConfigError

    assert parse_labels("A, B ,C") == ["A", "B", "C"]
    assert parse_labels('["Arts, Culture", "Sport"]') == ["Arts, Culture", "Sport"]
    for bad in ("A,,B", "A,A", '["A", 3]', "[oops"):
        with pytest.raises(ConfigError, match="--labels"):
            parse_labels(bad)


def test_token_env_matches_the_server():
    from llmcls.cli import TOKEN_ENV
    from llmcls.serving.app import TOKEN_ENV as served

    assert TOKEN_ENV == served


def test_duplicate_rows_are_counted():
    from llmcls.data import Row
    from llmcls.recipes.prepare import count_duplicates, summary_lines

    rows = [Row("a", ["x", "y"], "x"), Row("a", ["x", "y"], "x"), Row("a", ["x", "y"], "y"), Row("a", ["x"], "x")]
    assert count_duplicates(rows) == 1
    assert count_duplicates(rows + rows) == 5
    summary = {"rows": 4, "invalid": 0, "num_labels": 2, "labels": {}, "invalid_examples": [], "max_length": 8,
               "token_lengths": {"median": 1, "p90": 1, "max": 1}, "shortened": 0, "answer_kept": 4,
               "tutorial_answer_kept": 4, "duplicates": 1}
    assert any(line.startswith("duplicate rows") and line.endswith(": 1") for line in summary_lines(summary))


def test_eval_warns_naming_labels_never_trained(caplog):
    from llmcls.data import Row
    from llmcls.recipes.evaluate import warn_unseen_labels

    rows = [Row("a", ["x", "y"], "x"), Row("b", ["x", "z"], "z")]
    with caplog.at_level(logging.WARNING):
        assert warn_unseen_labels(rows, ["x", "y"], "test.jsonl") == ["z"]
    assert "never seen in training: 'z'" in caplog.text
    assert warn_unseen_labels(rows, None, "test.jsonl") == []  # a run without a summary: nothing to compare


def test_serve_refuses_whitespace_only_candidates():
    from pydantic import TypeAdapter, ValidationError

    from llmcls.serving.app import build_schemas

    s = build_schemas(None, max_texts=4, max_text_chars=100)
    ok = TypeAdapter(s.ClassifyRequest).validate_python({"text": "t", "candidates": ["A", "B"]})
    assert ok is not None
    with pytest.raises(ValidationError):
        TypeAdapter(s.ClassifyRequest).validate_python({"text": "t", "candidates": ["A", "  "]})
