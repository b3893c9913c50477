"""Whole documents (data.long_text: windows): windows tile the text and fit max_length, a short text is today's
row, the combined scores equal a hand computation from per-window scores, eval/predict/serve answer one row per
input row, and training with every window masks each window's prompt."""

from __future__ import annotations

import json
import math

import pytest

from conftest import FUDAN, write_jsonl
from llmcls.config import PromptConfig, load_config
from llmcls.data import Row, read_rows
from llmcls.encode import IGNORE, PromptBuilder
from llmcls.infer import classify, prompts_for
from llmcls.windows import WindowSettings, combine, pick, split

CANDS = ["Sport", "Politics", "Technology", "Enviornment"]
# Chinese, English, emoji and a rare CJK character that byte-level BPE splits over several tokens
PIECE = "中文新闻报道，天气晴朗。football election 𠀀𠀁 software 😀 pollution 数据。\n"


def _long_rows(n=3):
    return [Row(PIECE * (8 + 5 * i), CANDS, CANDS[i % 4], line=i + 1) for i in range(n)]


def _settings(overlap=16, max_windows=None, rule="mean"):
    return WindowSettings("windows", overlap, max_windows, rule)


@pytest.mark.parametrize("overlap", [0, 16, 40])
def test_windows_tile_the_text_and_fit(tokenizer, overlap):
    b = PromptBuilder(tokenizer, PromptConfig())
    L = 128
    rows = _long_rows()
    longest = max(len(b.answer_ids(c)) for c in CANDS)
    for row, ws in zip(rows, split(b, rows, L, _settings(overlap))):
        ids = tokenizer(row.text, add_special_tokens=False)["input_ids"]
        assert len(ws) > 2
        # the token slices, overlaps removed, are the text's tokens; the texts, overlaps removed, are the text
        assert ws[0].start == 0 and ws[-1].end == len(ids)
        joined, text = list(ids[ws[0].start:ws[0].end]), ws[0].row.text
        for prev, w in zip(ws, ws[1:]):
            assert w.start <= prev.end and w.start > prev.start
            assert prev.end - w.start >= min(overlap, (L - longest - b.empty_prompt_length(CANDS)) // 4)
            joined += ids[prev.end:w.end]
            k = len(tokenizer.decode(ids[w.start:prev.end]))  # the shared characters
            text += w.row.text[k:]
        assert joined == ids
        assert text == row.text
        for w in ws:
            piece = tokenizer.decode(ids[w.start:w.end])
            assert piece == w.row.text and "\ufffd" not in piece  # no character broken at a cut
            assert w.prompt == b.prompt_ids(w.row)  # the prompt the model reads for this text, as for any row
            assert len(w.prompt) + longest <= L
            assert w.row.candidates == row.candidates and w.row.label == row.label
            assert row.text[slice(*w.chars)] == w.row.text


def test_a_cut_never_splits_a_character(tokenizer):
    # every cut position lands after a rare character split over several tokens: cuts must move back
    b = PromptBuilder(tokenizer, PromptConfig())
    row = Row("𠀀" * 400, CANDS, None)
    for w in split(b, [row], 100, _settings(7))[0]:
        assert set(w.row.text) == {"𠀀"}


def test_narrow_windows_end_or_fail_clearly(tokenizer):
    from llmcls.encode import PromptTooLong
    from llmcls.windows import spans

    off = [(i, i + 1) for i in range(5)]
    assert spans(off, 1, 3) == [(i, i + 1) for i in range(5)] and spans(off, 0, 0) == spans(off, 1, 0)
    b = PromptBuilder(tokenizer, PromptConfig())
    room = b.empty_prompt_length(CANDS) + max(len(b.answer_ids(c)) for c in CANDS)
    with pytest.raises(PromptTooLong):  # two tokens of room: no window of this text fits
        split(b, [Row(PIECE * 3, CANDS, None)], room + 2, _settings())
    with pytest.raises(PromptTooLong, match="no room for the text"):
        split(b, [Row(PIECE, CANDS, None)], room, _settings())


def test_short_text_is_one_window_identical_to_today(tokenizer):
    b = PromptBuilder(tokenizer, PromptConfig())
    rows = [Row("football match report", CANDS, "Sport"), Row(PIECE * 2, CANDS, "Sport")]
    for row, ws, today in zip(rows, split(b, rows, 128, _settings()), prompts_for(b, rows, 128)):
        assert len(ws) == 1 and ws[0].row is row and ws[0].prompt == today


def test_max_windows_keeps_evenly_spaced_first_and_last(tokenizer):
    spans = [(i, i + 2) for i in range(10)]
    assert pick(spans, 4) == [spans[0], spans[3], spans[6], spans[9]]
    assert pick(spans, 10) == spans and pick(spans, None) == spans and pick(spans, 1) == [spans[0]]
    b = PromptBuilder(tokenizer, PromptConfig())
    row = _long_rows(1)[0]
    every = split(b, [row], 128, _settings())[0]
    capped = split(b, [row], 128, _settings(max_windows=3))[0]
    assert len(every) > 3 and [(w.start, w.end) for w in capped] == [
        (every[j].start, every[j].end) for j in (0, round((len(every) - 1) / 2), len(every) - 1)]


def test_baseline_reads_what_the_windows_read(tokenizer):
    from llmcls.windows import as_read

    b = PromptBuilder(tokenizer, PromptConfig())
    rows = _long_rows(2) + [Row("football", CANDS, None)]
    assert [r.text for r in as_read(b, rows, 128, _settings())] == [r.text for r in rows]
    capped = as_read(b, rows[:1], 128, _settings(max_windows=2))[0].text
    ws = split(b, rows[:1], 128, _settings(max_windows=2))[0]
    assert capped == rows[0].text[slice(*ws[0].chars)] + rows[0].text[slice(*ws[1].chars)]
    assert len(capped) < len(rows[0].text)


def test_bad_window_settings_name_the_key():
    from llmcls.config import ConfigError

    with pytest.raises(ConfigError, match="data.window_overlap"):
        WindowSettings("windows", -1)
    with pytest.raises(ConfigError, match="data.max_windows"):
        WindowSettings("windows", 8, 0)


def _log_softmax(xs):
    m = max(xs)
    z = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - z for x in xs]


@pytest.mark.parametrize("rule", ["mean", "max", "sum"])
def test_combined_scores_equal_a_hand_computation(tokenizer, model_factory, rule):
    model = model_factory(seed=3)
    b = PromptBuilder(tokenizer, PromptConfig())
    rows = _long_rows(2) + [Row("election results", CANDS, "Politics")]
    s = _settings(16, None, rule)
    got = classify(model, b, rows, batch_size=4, max_length=128, progress=False, windows=s)
    today = classify(model, b, rows, batch_size=4, max_length=128, progress=False)
    assert len(got) == len(rows)
    for i, (row, ws) in enumerate(zip(rows, split(b, rows, 128, s))):
        # each window scored on its own, as a row of its own
        per = [classify(model, b, [w.row], batch_size=1, max_length=128, progress=False)[0].logliks for w in ws]
        if len(ws) == 1:
            want = per[0]
            assert got[i].logliks == pytest.approx(today[i].logliks, abs=1e-4)
            assert got[i].probs == pytest.approx(today[i].probs, abs=1e-5)
        else:
            lps = [_log_softmax(p) for p in per]
            cols = list(zip(*lps))
            want = {"mean": [sum(c) / len(c) for c in cols], "max": [max(c) for c in cols],
                    "sum": [sum(c) for c in cols]}[rule]
        assert got[i].logliks == pytest.approx(want, abs=1e-4)
        probs = [math.exp(x) for x in _log_softmax(want)]
        assert [got[i].probs[c] for c in CANDS] == pytest.approx(probs, abs=1e-5)
        assert got[i].pred == CANDS[max(range(4), key=lambda j: want[j])]
    assert combine([[1.0, 2.0]], rule) == [1.0, 2.0]


def test_generate_with_windows_is_refused(tokenizer, model_factory):
    with pytest.raises(ValueError, match="data.long_text=windows.*eval.method=score"):
        classify(model_factory(), PromptBuilder(tokenizer, PromptConfig()), _long_rows(1), method="generate",
                 max_length=128, progress=False, windows=_settings())


def test_eval_writes_one_prediction_per_row(tokenizer, model_factory, tmp_path):
    from llmcls.recipes.evaluate import evaluate
    from llmcls.rundir import RunDir

    rows = [{"text": r.text, "category": CANDS, "output": r.label} for r in _long_rows(3)]
    rows.append({"text": "software release", "category": CANDS, "output": "Technology"})
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    cfg = load_config(None, {"data.test_file": str(test), "data.max_length": "128", "data.long_text": "windows",
                             "data.window_overlap": "16", "track.tracker": "none"})
    run = tmp_path / "run"
    run.mkdir()
    m = evaluate(run, cfg, model_factory(seed=1), tokenizer, progress=False)
    preds = [json.loads(x) for x in RunDir(run).eval.predictions.read_text(encoding="utf-8").splitlines()]
    assert len(preds) == len(rows) == sum(map(sum, m["confusion_matrix"]["matrix"]))
    assert [p["index"] for p in preds] == list(range(len(rows)))


def test_serve_scores_windows_like_the_library(tokenizer, model_factory):
    from llmcls.serving.classifier import Classifier

    model = model_factory(seed=2)
    clf = Classifier(model, tokenizer, PromptConfig(), CANDS, 128, "t", "run", windows=_settings(16, 5))
    rows = _long_rows(2) + [Row("football", CANDS, None)]
    served = clf.score(clf.prepare(rows))
    lib = clf.classify(rows)
    assert len(served) == len(rows)
    for a, b in zip(served, lib):
        assert a.logliks == pytest.approx(b.logliks, abs=1e-4) and a.pred == b.pred


def test_training_on_every_window_masks_each_prompt(tokenizer, tmp_path):
    from llmcls.recipes.prepare import load_encoded, prepare

    rows = [{"text": r.text, "category": CANDS, "output": r.label} for r in _long_rows(3)]
    rows.append({"text": "software release", "category": CANDS, "output": "Technology"})
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    over = {"data.train_file": str(train), "data.max_length": "128", "data.window_overlap": "16"}
    b = PromptBuilder(tokenizer, PromptConfig())
    parsed, _ = read_rows(train, load_config(None, over).data)
    windows = split(b, parsed, 128, _settings(16, 16))
    s = prepare(load_config(None, {**over, "train.long_text_windows": "all"}), tokenizer, tmp_path / "all",
                progress=False)
    ds = load_encoded(tmp_path / "all")
    assert len(ds) == s["windows"]["examples"] == sum(map(len, windows)) and s["rows"] == len(rows)
    k = 0
    for row, ws in zip(parsed, windows):
        answer = b.answer_ids(row.label)
        for w in ws:
            ex = ds[k]
            assert ex["input_ids"] == w.prompt + answer and ex["label"] == row.label
            assert ex["labels"] == [IGNORE] * len(w.prompt) + answer and len(ex["input_ids"]) <= 128
            k += 1
    first = prepare(load_config(None, over), tokenizer, tmp_path / "first", progress=False)
    assert len(load_encoded(tmp_path / "first")) == len(rows) and "windows" not in first


@pytest.mark.skipif(not (FUDAN / "test.jsonl").is_file(), reason="needs ../shared/data/fudan-news")
def test_fudan_windows_tile_and_fit(tokenizer):
    from llmcls.config import DataConfig

    rows, _ = read_rows(FUDAN / "test.jsonl", DataConfig(), limit=12)
    b = PromptBuilder(tokenizer, PromptConfig())
    for row, ws in zip(rows, split(b, rows, 384, _settings(64))):
        ids = tokenizer(row.text, add_special_tokens=False)["input_ids"]
        longest = max(len(b.answer_ids(c)) for c in row.candidates)
        joined = list(ids[:ws[0].end])
        for prev, w in zip(ws, ws[1:]):
            joined += ids[prev.end:w.end]
        assert joined == ids and all(len(w.prompt) + longest <= 384 for w in ws)


@pytest.mark.slow
def test_cli_train_eval_predict_with_windows(tokenizer_dir, tmp_path):
    """The whole path on a tiny run: training on every window, dev selection and calibration reading windows,
    eval and predict answering one line per input row."""
    from conftest import tiny_args
    from llmcls.cli import main
    from llmcls.rundir import RunDir

    rows = [{"text": r.text, "category": CANDS, "output": r.label} for r in _long_rows(4)] * 3
    rows += [{"text": w, "category": CANDS, "output": c} for w, c in
             (("football", "Sport"), ("election", "Politics"), ("software", "Technology"))] * 2
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", rows[::2])
    out = tmp_path / "run"
    args = tiny_args(train, test, out, **{"train.max_steps": 2, "train.epochs": 1, "data.dev_fraction": 0.25,
                                          "eval.every_steps": 1, "train.select_best": "accuracy",
                                          "data.long_text": "windows", "train.long_text_windows": "all",
                                          "data.window_overlap": 16, "data.max_windows": 4})
    assert main(["train", *args]) == 0
    run = RunDir(out)
    prep = json.loads(run.data.summary.read_text(encoding="utf-8"))
    assert prep["windows"]["examples"] > prep["rows"]
    assert main(["eval", str(out)]) == 0
    metrics = json.loads(run.eval.metrics.read_text(encoding="utf-8"))
    assert metrics["long_text"]["long_text"] == "windows"
    assert len(run.eval.predictions.read_text(encoding="utf-8").splitlines()) == len(rows[::2])
    pred_out = tmp_path / "pred.jsonl"
    assert main(["predict", str(out), "-i", str(test), "-o", str(pred_out), "--eval.window_combine", "max"]) == 0
    assert len(pred_out.read_text(encoding="utf-8").splitlines()) == len(rows[::2])
