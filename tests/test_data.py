"""Every bad-input case gives an error naming file, line and field; --skip-invalid skips and counts them."""

import json

import pytest

from conftest import write_jsonl
from llmcls.config import DataConfig, load_config
from llmcls.data import DataError, parse_candidates, read_rows

GOOD = {"text": "国务院召开常务会议", "category": ["Politics", "Economy"], "output": "Politics"}


def bad_file(tmp_path, line: bytes):
    p = tmp_path / "raw.jsonl"
    p.write_bytes(json.dumps(GOOD, ensure_ascii=False).encode() + b"\n" + line + b"\n")
    return p


CASES = [
    (b'{"text": "abc", "category": ["A"], "output": "A"', None, "invalid JSON"),
    (b'["not", "an", "object"]', None, "expected a JSON object"),
    (b'{"category": ["A", "B"], "output": "A"}', "text", "missing"),
    (b'{"text": "  ", "category": ["A", "B"], "output": "A"}', "text", "empty"),
    (b'{"text": 5, "category": ["A", "B"], "output": "A"}', "text", "expected a string"),
    (b'{"text": "abc", "output": "A"}', "category", "missing"),
    (b'{"text": "abc", "category": [], "output": "A"}', "category", "empty"),
    (b'{"text": "abc", "category": ["A", "A"], "output": "A"}', "category", "duplicate"),
    (b'{"text": "abc", "category": [1, 2], "output": "A"}', "category", "list of strings"),
    (b'{"text": "abc", "category": ["A", "B"]}', "output", "missing"),
    (b'{"text": "abc", "category": ["A", "B"], "output": ""}', "output", "empty"),
    (b'{"text": "abc", "category": ["A", "B"], "output": "C"}', "output", "not among the candidates"),
    (b'{"text": "ab\xff\xfe", "category": ["A", "B"], "output": "A"}', "text", "undecodable bytes"),
]


@pytest.mark.parametrize("line,field,words", CASES, ids=[c[2] + (f"-{c[1]}" if c[1] else "") for c in CASES])
def test_bad_row_is_named(tmp_path, line, field, words):
    path = bad_file(tmp_path, line)
    with pytest.raises(DataError) as e:
        read_rows(path, DataConfig())
    err = e.value
    assert (err.path, err.line, err.field) == (str(path), 2, field)
    assert words in str(err) and f"{path}:2" in str(err)
    # skipping keeps the good row and counts the bad one
    rows, invalid = read_rows(path, DataConfig(), on_invalid="skip")
    assert len(rows) == 1 and rows[0].line == 1 and len(invalid) == 1 and invalid[0].line == 2


def test_cli_prepare_reports_and_skips(tmp_path, tokenizer_dir, capsys):
    from llmcls.cli import main

    path = bad_file(tmp_path, b'{"text": "abc", "category": ["A", "B"], "output": "C"}')
    args = ["prepare", "--model.name_or_path", "tiny", "--train", str(path), "--out", str(tmp_path / "p")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: field 'output'" in err and "not among the candidates" in err
    assert main([*args, "--skip-invalid", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 1 and summary["invalid"] == 1
    assert summary["answer_kept"] == 1 and summary["shortened"] == 0


@pytest.mark.parametrize("value,want", [
    (["Sport", " Art "], ["Sport", "Art"]),
    ("Sport,Art", ["Sport", "Art"]),
    ("体育、艺术、经济", ["体育", "艺术", "经济"]),
    ("Sport, Art，Enviornment", ["Sport", "Art", "Enviornment"]),
])
def test_candidate_formats(value, want):
    assert parse_candidates(value) == want


def test_cache_is_keyed_on_content_not_existence(tmp_path, tokenizer):
    from llmcls.recipes.prepare import prepare

    raw = write_jsonl(tmp_path / "raw.jsonl", [GOOD, {**GOOD, "output": "Economy"}])
    cfg = load_config(None, {"data.train_file": str(raw)})
    first = prepare(cfg, tokenizer, tmp_path / "out", progress=False)
    assert not first["cached"] and first["labels"] == {"Politics": 1, "Economy": 1}
    assert prepare(cfg, tokenizer, tmp_path / "out", progress=False)["cached"]
    write_jsonl(raw, [GOOD, GOOD, GOOD])  # same file name, new content: must be re-read
    third = prepare(cfg, tokenizer, tmp_path / "out", progress=False)
    assert not third["cached"] and third["labels"] == {"Politics": 3}
    other = load_config(None, {"data.train_file": str(raw), "data.max_length": 64})  # new settings: re-read
    assert not prepare(other, tokenizer, tmp_path / "out", progress=False)["cached"]
    lines = (tmp_path / "out" / "train.instruct.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    assert set(row) >= {"instruction", "input", "output"} and row["input"].startswith("Text: 国务院")


def test_rows_no_tokenizer_or_parser_can_take_are_invalid_rows(tmp_path):
    ok = {"text": "fine", "category": ["x", "y"], "output": "x"}
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join([
        '{"text": "a\\ud800b", "category": ["x", "y"], "output": "x"}',   # unpaired surrogate escape
        "[" * 100_000 + "]" * 100_000,                                    # nested past the recursion limit
        '{"text": "t", "n": ' + "9" * 5000 + ', "category": ["x"], "output": "x"}',  # int over 4300 digits
        json.dumps(ok), '{"text": "ok \\ud83d\\ude00", "category": ["x"], "output": "x"}']) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'text': an unpaired surrogate"):
        read_rows(p, DataConfig())
    rows, invalid = read_rows(p, DataConfig(), on_invalid="skip")
    assert [r.text for r in rows] == ["fine", "ok \U0001F600"]  # a proper surrogate pair is a character
    assert [e.line for e in invalid] == [1, 2, 3]
    assert "nested too deeply" in str(invalid[1]) and "4300 digits" in str(invalid[2])


def test_a_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a directory"):
        read_rows(tmp_path, DataConfig())
