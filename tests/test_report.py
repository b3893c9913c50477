"""`llmcls report`: what the page holds, read back from the HTML (numbers, plots, mistakes with their text),
written by `llmcls run` on its own, comparisons, missing inputs and the no-overwrite rule."""

import base64
import json
import re
import shutil
import struct
from html.parser import HTMLParser

import pytest

PLOTS_ONE_RUN = ["loss", "lr", "f1", "confusion"]


class Page(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.imgs, self.tags, self.urls, self.sections = [], [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a)
        if tag == "section":
            self.sections.append(a.get("id"))
        for k in ("src", "href"):
            if a.get(k):
                self.urls.append(a[k])


def png_size(data_url: str) -> tuple[int, int]:
    assert data_url.startswith("data:image/png;base64,")
    raw = base64.b64decode(data_url.split(",", 1)[1], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


def check_self_contained(page: Page):
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert all(u.startswith("data:") for u in page.urls), [u[:60] for u in page.urls if not u.startswith("data:")]


def test_run_writes_baseline_and_report(trained_run):
    """`llmcls run` (the conftest fixture) leaves RUN/baseline and RUN/report.html behind."""
    m = json.loads((trained_run / "eval" / "metrics.json").read_text())
    b = json.loads((trained_run / "baseline" / "metrics.json").read_text())
    assert b["test_rows"] == m["rows"] == 60 and b["train_rows"] == 240
    text = (trained_run / "report.html").read_text()
    page = Page(text)
    check_self_contained(page)
    assert [i["data-plot"] for i in page.imgs] == PLOTS_ONE_RUN
    for img in page.imgs:
        w, h = png_size(img["src"])
        assert w > 300 and h > 150, (img["data-plot"], w, h)
    assert page.sections == ["summary", "training", "evaluation", "confusion", "mistakes", "data", "throughput",
                             "config", "environment"]
    # The numbers on the page are the run's numbers, the LLM's beside the baseline's.
    assert f"{100 * m['accuracy']:.2f}%" in text and f"{m['macro_f1']:.4f}" in text
    assert f"{100 * b['candidates']['accuracy']:.2f}%" in text and f"{100 * b['all_labels']['accuracy']:.2f}%" in text
    diff = 100 * (m["accuracy"] - b["candidates"]["accuracy"])
    assert (">beats<" if diff > 0 else (">trails<" if diff < 0 else ">ties with<")) in text
    prep = json.loads((trained_run / "data" / "prepare.json").read_text())
    assert f"{prep['token_lengths']['p90']}" in text and f"{prep['trained_tokens']:,}" in text
    summary = json.loads((trained_run / "train_summary.json").read_text())
    assert summary["environment"]["git_commit"] is None or summary["environment"]["git_commit"] in text
    assert "transformers" in text and summary["environment"]["versions"]["transformers"] in text


def test_mistakes_are_the_most_confident_with_their_text(trained_run, learnable_data, tmp_path):
    """The tiny run usually makes no mistake on its test rows, so a copy of it gets some: every third prediction
    is turned into a wrong one (the runner-up candidate, its confidence kept), and its report drawn again."""
    from llmcls.cli import main
    from llmcls.reporting.report import confident_mistakes

    run = tmp_path / "with-mistakes"
    _copy_run_files(trained_run, run)
    preds = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    for p in preds[::3]:
        if p["correct"]:
            p["pred"] = next(c for c in sorted(p["probs"], key=p["probs"].get, reverse=True) if c != p["truth"])
            p["correct"] = False
    (run / "eval" / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    wrong = [p for p in preds if p["correct"] is False]
    assert len(wrong) >= 20
    top = confident_mistakes(preds, 10)
    assert len(top) == 10 and all(p["correct"] is False for p in top)
    assert [p["confidence"] for p in top] == sorted((p["confidence"] for p in wrong), reverse=True)[:10]
    assert main(["report", str(run)]) == 0
    text = (run / "report.html").read_text()
    rows = learnable_data["test"].read_text().splitlines()
    section = text[text.index('id="mistakes"'):text.index('id="data"')]
    assert f"{len(top)} most confident of {len(wrong)} wrong predictions" in section
    positions = [section.index(json.loads(rows[p["line"] - 1])["text"][:60]) for p in top]
    assert positions == sorted(positions)  # listed in confidence order, each with its own text


def _copy_run_files(src, dst):
    """The files the report reads (not the weights), so a second 'run' costs nothing."""
    for rel in ("config.yaml", "train_log.jsonl", "train_summary.json", "data/prepare.json", "eval/metrics.json",
                "eval/predictions.jsonl"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, dst / rel)


def test_comparison_of_two_runs(trained_run, tmp_path):
    from llmcls.cli import main

    other = tmp_path / "lr-variant"
    _copy_run_files(trained_run, other)
    cfg = (other / "config.yaml").read_text()
    (other / "config.yaml").write_text(re.sub(r"(\n  lr: ).*", r"\g<1>0.0005", cfg))
    m = json.loads((other / "eval" / "metrics.json").read_text())
    m["accuracy"] = 0.123456
    (other / "eval" / "metrics.json").write_text(json.dumps(m))

    out = tmp_path / "cmp.html"
    assert main(["report", str(trained_run), str(other), "--out", str(out)]) == 0
    text = out.read_text()
    page = Page(text)
    check_self_contained(page)
    # Shared loss, lr and F1 plots (one series per run), one confusion matrix per run.
    assert [i["data-plot"] for i in page.imgs] == ["loss", "lr", "f1", "confusion", "confusion"]
    assert "12.35%" in text and "lr-variant" in text and trained_run.name in text
    diff = text[text.index("Settings that differ"):]
    assert "train.lr" in diff[:2000] and "0.0005" in diff[:2000]
    assert "train.output_dir" not in diff[:2000]

    # An existing file is never replaced without --overwrite; RUN/report.html belongs to the run and is refreshed.
    assert main(["report", str(trained_run), str(other), "--out", str(out)]) == 2
    assert out.read_text() == text
    assert main(["report", str(trained_run), str(other), "--out", str(out), "--overwrite"]) == 0


def test_partial_and_invalid_runs(trained_run, tmp_path):
    from llmcls.cli import main

    partial = tmp_path / "trained-only"
    _copy_run_files(trained_run, partial)
    shutil.rmtree(partial / "eval")
    assert main(["report", str(partial)]) == 0
    text = (partial / "report.html").read_text()
    page = Page(text)
    assert [i["data-plot"] for i in page.imgs] == ["loss", "lr"]
    assert "Not evaluated yet" in text

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert not (empty / "report.html").exists()


def test_data_table_says_when_token_lengths_are_sampled(tmp_path):
    """prepare measures the lengths before the cut on a sample past 500 rows: the table says so, and says nothing
    for a summary that measured every row (or one written before the sample existed)."""
    from llmcls.reporting.report import RunData, _data

    tl = {"min": 117, "median": 1837, "p90": 2140, "p99": 2463, "max": 2667, "mean": 1581.9}
    base = {"rows": 6675, "invalid": 0, "num_labels": 14, "shortened": 6000, "answer_kept": 6675,
            "tutorial_answer_kept": 680, "trained_tokens": 2485627, "labels": {}}
    sampled = _data([RunData(tmp_path, "r", prepare={**base, "token_lengths": {**tl, "sampled_rows": 477,
                                                                                "of": 6675}})])
    assert "1,837 / 2,140 / 2,463 / 2,667 (sampled: 477 of 6,675 rows)" in sampled and ">680 " in sampled
    for whole in ({**tl, "sampled_rows": 6675, "of": 6675}, tl):
        assert "sampled" not in _data([RunData(tmp_path, "r", prepare={**base, "token_lengths": whole})])
