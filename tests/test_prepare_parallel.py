"""prepare's batched, multi-process encoding gives exactly the rows the one-row-at-a-time path gives (issue 16):
real Fudan rows on the real Qwen tokenizer, cut and whole, windows, multi-label, right truncation, texts whose
characters per token are extreme, and a row that cannot fit."""

import dataclasses

import pytest

from conftest import FUDAN, write_jsonl
from llmcls.config import DataConfig, PromptConfig, load_config
from llmcls.data import Row, read_rows
from llmcls.encode import PromptBuilder
from llmcls.recipes import prepare as prep
from llmcls.windows import WindowSettings

pytestmark = pytest.mark.skipif(not (FUDAN / "train.jsonl").is_file(),
                                reason="needs ../shared/data/fudan-news (real rows of long Chinese text)")

CANDS = ["Economy", "Sport", "Politics"]


def adversarial() -> list[Row]:
    """Texts far from Chinese news's ~1.6 characters a token, each past the 384-token limit."""
    return [Row("1" * 5000, CANDS, "Economy"),            # one token per digit
            Row("a" * 6000, CANDS, "Sport"),              # one pre-token thousands of letters long
            Row(" " * 3000 + "end", CANDS, "Sport"),      # whitespace runs merge into long tokens
            Row("=" * 4000, CANDS, "Politics"),
            Row("😀" * 700, CANDS, "Economy"),            # every character split over two byte-level tokens
            Row("国" + "😀" * 300 + "经济" * 800, CANDS, "Economy"),
            Row("短", CANDS, "Sport"), Row("", CANDS, "Sport"),
            Row("双标签" * 400, CANDS, None, labels=["Economy", "Politics"]),  # multi-label, cut
            Row("too many candidates", ["x" * 3000, "Sport"], "Sport")]      # no room for any text: an error


@pytest.fixture(scope="module")
def rows():
    fudan, _ = read_rows(FUDAN / "train.jsonl", DataConfig(), limit=240)
    return fudan + adversarial()


def _check(builder, rows, p, errors=1):
    want = prep.encode_one_by_one(builder, rows, p)
    assert sum(r.error is not None for r in want) == errors and (not errors or want[-1].error)  # the last row
    assert sum(any(e.shortened for _, e, _ in r.examples) for r in want) >= 0.7 * len(rows)  # most are cut
    assert sum(not r.examples[0][1].shortened for r in want if r.examples) >= 3  # and some fit whole
    for procs in (1, 2):
        got = list(prep.encode_rows(PromptBuilder(builder.tok, builder.prompt), rows, p, procs))
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g == w, f"row {i} ({rows[i].text[:20]!r}) differs with {procs} process(es)"
    return want


def test_fast_path_equals_one_by_one_cut(tokenizer, rows):
    p = prep.EncodeParams(384, "text", False, WindowSettings(), 384 * prep.CHARS_PER_TOKEN)
    want = _check(PromptBuilder(tokenizer, PromptConfig()), rows, p)
    assert all(len(e.input_ids) <= 384 for r in want for _, _, es in r.examples for e in es)
    assert [len(r.examples) for r in want][-2] == 2  # the multi-label row: one example per true label


def test_fast_path_equals_one_by_one_windows_and_right_cut(tokenizer, rows):
    builder = PromptBuilder(tokenizer, PromptConfig())
    some = rows[:60] + rows[-10:]
    p = prep.EncodeParams(384, "text", True, WindowSettings("windows", 64, 16), None)
    want = _check(builder, some, p)
    assert sum(len(es) > 1 for r in want for _, _, es in r.examples) >= 40  # long texts became several windows
    # the tutorial's right cut never shortens the text: the row without room for one is cut like any other
    _check(builder, some, dataclasses.replace(p, truncation="right", every_window=False), errors=0)


def test_prepare_summary_and_dataset_equal_the_reference(tokenizer, rows, tmp_path, monkeypatch):
    from datasets import load_from_disk

    train = write_jsonl(tmp_path / "train.jsonl", [
        {"text": r.text, "category": r.candidates, "output": r.labels or r.label} for r in rows[:80] + rows[-10:]])
    cfg = load_config(None, {"data.train_file": str(train), "data.on_invalid": "skip", "data.num_proc": 2,
                             "data.dev_fraction": 0.1})
    fast = prep.prepare(cfg, tokenizer, tmp_path / "fast", progress=False)
    monkeypatch.setattr(prep, "encode_rows", lambda b, rs, p, n, progress: iter(prep.encode_one_by_one(b, rs, p)))
    ref = prep.prepare(cfg, tokenizer, tmp_path / "ref", progress=False)
    fast.pop("dev")
    ref.pop("dev")
    assert fast == ref and fast["shortened"] >= 60
    assert fast["invalid"] == 2  # the empty text (read) and the row without room for a text (encoding)
    a, b = (load_from_disk(str(tmp_path / d / "encoded")) for d in ("fast", "ref"))
    assert a.to_dict() == b.to_dict()


def test_num_proc_changes_no_cache_key(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "短新闻", "category": CANDS, "output": "Sport"}] * 3)
    one = prep.prepare(load_config(None, {"data.train_file": str(train), "data.num_proc": 1}), tokenizer,
                       tmp_path / "out", progress=False)
    again = prep.prepare(load_config(None, {"data.train_file": str(train), "data.num_proc": 4}), tokenizer,
                         tmp_path / "out", progress=False)
    assert again["cached"] and again["cache_key"] == one["cache_key"]
