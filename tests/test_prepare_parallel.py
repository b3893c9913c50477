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


def _same(g, w, p, builder):
    """``g`` (fast path) equals ``w`` (reference) in every id, label and flag; a ``full_length`` the fast path left
    unmeasured (None) must be one the reference found at least max_length, i.e. the tutorial's cut keeps no answer
    token of it and the text was shortened."""
    assert (g.was_cut, g.error, len(g.examples)) == (w.was_cut, w.error, len(w.examples))
    for (gl, ge, gs), (wl, we, ws) in zip(g.examples, w.examples):
        assert gl == wl and gs == ws or [dataclasses.replace(e, full_length=0) for e in gs] == \
            [dataclasses.replace(e, full_length=0) for e in ws]
        if ge.full_length is None:
            assert we.full_length - len(builder.answer_ids(wl)) >= p.max_length and we.shortened
            ge = dataclasses.replace(ge, full_length=we.full_length)
        assert ge == we
    return sum(e.full_length is None for _, e, _ in g.examples)


def _check(builder, rows, p, errors=1):
    want = prep.encode_one_by_one(builder, rows, p)
    assert sum(r.error is not None for r in want) == errors and (not errors or want[-1].error)  # the last row
    assert sum(any(e.shortened for _, e, _ in r.examples) for r in want) >= 0.7 * len(rows)  # most are cut
    assert sum(not r.examples[0][1].shortened for r in want if r.examples) >= 3  # and some fit whole
    # A chunk holding a row that cannot be encoded is encoded one row at a time (every length measured): the sample
    # is tried on the rows that can be.
    ok = [i for i, w in enumerate(want) if w.error is None]
    for procs in (1, 2):
        for measure in (None, [i % 7 == 0 for i in range(len(ok))]):  # every row measured, or a sample
            these = rows if measure is None else [rows[i] for i in ok]
            expect = want if measure is None else [want[i] for i in ok]
            got = list(prep.encode_rows(PromptBuilder(builder.tok, builder.prompt), these, p, procs, measure=measure))
            assert len(got) == len(expect)
            unmeasured = 0
            for i, (g, w) in enumerate(zip(got, expect)):
                try:
                    unmeasured += _same(g, w, p, builder)
                except AssertionError:
                    raise AssertionError(f"row {i} ({these[i].text[:20]!r}) differs with {procs} process(es), "
                                         f"measure {'all' if measure is None else 'sample'}") from None
                if measure is None or measure[i] or p.truncation == "right":
                    assert g == w  # a measured row: all of it, its whole length included
            # the sample leaves most long prompts untokenised (cut text only); measuring all, none
            assert unmeasured >= (0.5 * len(ok) if measure and p.truncation == "text" else 0), unmeasured
            assert measure or not unmeasured
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
    monkeypatch.setattr(prep, "encode_rows",
                        lambda b, rs, p, n, progress, measure=None: iter(prep.encode_one_by_one(b, rs, p)))
    ref = prep.prepare(cfg, tokenizer, tmp_path / "ref", progress=False)
    fast.pop("dev")
    ref.pop("dev")
    assert fast == ref and fast["shortened"] >= 60
    assert fast["token_lengths"]["sampled_rows"] == fast["token_lengths"]["of"] == fast["rows"]  # < 500: all
    assert fast["invalid"] == 2  # the empty text (read) and the row without room for a text (encoding)
    a, b = (load_from_disk(str(tmp_path / d / "encoded")) for d in ("fast", "ref"))
    assert a.to_dict() == b.to_dict()


def test_prepare_samples_the_uncut_lengths(tokenizer, rows, tmp_path, monkeypatch):
    """Past LENGTH_SAMPLE_ROWS rows the token lengths before the cut are measured on every stride-th row, said in
    the summary; the exact counts (shortened, answers kept, by the tutorial's cut too) still count every row."""
    from datasets import load_from_disk

    train = write_jsonl(tmp_path / "train.jsonl", [
        {"text": r.text, "category": r.candidates, "output": r.labels or r.label} for r in rows[:200]])
    cfg = load_config(None, {"data.train_file": str(train), "data.num_proc": 2})
    monkeypatch.setattr(prep, "LENGTH_SAMPLE_ROWS", 30)
    fast = prep.prepare(cfg, tokenizer, tmp_path / "fast", progress=False)
    monkeypatch.setattr(prep, "encode_rows",
                        lambda b, rs, p, n, progress, measure=None: iter(prep.encode_one_by_one(b, rs, p)))
    ref = prep.prepare(cfg, tokenizer, tmp_path / "ref", progress=False)
    assert fast == ref  # the reference's lengths on the same sampled rows
    stride = -(-200 // 30)  # 7: rows 0, 7, ..., 196
    assert fast["token_lengths"]["sampled_rows"] == len(range(0, 200, stride)) == 29
    assert fast["token_lengths"]["of"] == 200 and fast["rows"] == 200
    # the sampled figures are those of the sampled rows' whole prompts, from the reference's own encoding
    builder = PromptBuilder(tokenizer, cfg.prompt)
    p = prep.EncodeParams(cfg.data.max_length, "text", False, WindowSettings(), cfg.data.max_length * prep.CHARS_PER_TOKEN)
    sample = [r for i, r in enumerate(rows[:200]) if i % stride == 0]
    want = prep._percentiles([e.full_length for res in prep.encode_one_by_one(builder, sample, p)
                              for _, e, _ in res.examples])
    assert {k: v for k, v in fast["token_lengths"].items() if k not in ("sampled_rows", "of")} == want
    everything = prep._percentiles([e.full_length for res in prep.encode_one_by_one(builder, rows[:200], p)
                                    for _, e, _ in res.examples])
    assert want["max"] <= everything["max"] and fast["shortened"] > 100  # the exact counts: every row
    assert any("sampled: 29 of 200 rows" in ln for ln in prep.summary_lines(fast))
    a, b = (load_from_disk(str(tmp_path / d / "encoded")) for d in ("fast", "ref"))
    assert a.to_dict() == b.to_dict()


def test_num_proc_changes_no_cache_key(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "短新闻", "category": CANDS, "output": "Sport"}] * 3)
    one = prep.prepare(load_config(None, {"data.train_file": str(train), "data.num_proc": 1}), tokenizer,
                       tmp_path / "out", progress=False)
    again = prep.prepare(load_config(None, {"data.train_file": str(train), "data.num_proc": 4}), tokenizer,
                         tmp_path / "out", progress=False)
    assert again["cached"] and again["cache_key"] == one["cache_key"]
