"""``llmcls report``: one self-contained HTML page that shows how a run went (or compares several runs).

Everything is read from the run directory (layout in ``rundir.py``): ``train_log.jsonl`` (loss and learning-rate
curves), ``train_summary.json`` (throughput, memory, environment), ``data/prepare.json`` (truncation statistics),
``eval/metrics.json`` and ``eval/predictions.jsonl`` (metrics, per-class F1, confusion matrix, mistakes),
``config.yaml`` and, when present, ``baseline/metrics.json`` (the TF-IDF + SVM baseline of ``llmcls baseline``).

The page needs no network and no JavaScript: plots are matplotlib PNGs inlined as base64 ``data:`` URLs and the
styles are inline, so the file can be mailed, archived or opened from a CI artifact as is. A missing input (a run
that was trained but not evaluated, say) leaves a note in its section instead of failing the report.

Longer than most modules (~550 lines) on purpose: it is one page, its sections read top to bottom in the order
they appear on the page, and each is a small function; the plots are in ``reporting/plots.py``.
"""

from __future__ import annotations

import html
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from llmcls.files import atomic_write_text, refuse_overwrite
from llmcls.metrics import INVALID
from llmcls.reporting.plots import (BASELINE_COLOR, PALETTE, fig_to_data_url, plot_confusion, plot_curves,
                                    plot_dev_curve, plot_f1_bars, plot_reliability, plot_risk_coverage)
from llmcls.rundir import ResultsDir, RunDir

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ loading
def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("report: %s is not valid JSON (%s); section left out", path, e)
        return None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line; the rest is good
                log.warning("report: %s:%d is not valid JSON; line skipped", path, i)
    return out


@dataclass
class RunData:
    path: Path
    name: str
    config: Optional[dict] = None
    train_log: list[dict] = field(default_factory=list)
    train_summary: Optional[dict] = None
    prepare: Optional[dict] = None
    metrics: Optional[dict] = None
    predictions: list[dict] = field(default_factory=list)
    baseline: Optional[dict] = None
    baseline_dir: Optional[Path] = None
    texts: dict[int, str] = field(default_factory=dict)   # test-file line -> text, for the mistakes table
    notes: list[str] = field(default_factory=list)
    zero_shot: Optional[dict] = None                      # the base model's metrics (llmcls eval --zero-shot)
    last: Optional[dict] = None                           # the last step's (train.keep_last)
    calibration: Optional[dict] = None                    # RUN/calibration.json


def _find_file(name: str, run: Path) -> Optional[Path]:
    """A data path as the run recorded it: absolute, or relative to where the command ran (usually the project
    root, i.e. the run directory's ancestors), so the report can be built from another folder."""
    p = Path(name)
    if p.exists():  # a file, or a dataset folder
        return p
    if not p.is_absolute():
        for parent in run.resolve().parents:
            if (parent / p).exists():
                return parent / p
    return None


def _texts_for(lines: set[int], test_file: str, text_field: str, run: Path) -> dict[int, str]:
    from llmcls.data import HUB_PREFIXES, texts_at

    path = test_file if str(test_file).startswith(HUB_PREFIXES) else _find_file(test_file, run)
    if path is None or not lines:
        return {}
    try:
        return texts_at(path, text_field, lines)
    except (OSError, ValueError):  # a dataset that cannot be loaded now: mistakes are shown without text
        return {}


def load_run(run_dir: str | Path, baseline_dir: Optional[str | Path] = None, top_mistakes: int = 10) -> RunData:
    import yaml

    rd = RunDir(run_dir)
    run = rd.path
    if not run.is_dir():
        raise FileNotFoundError(f"run directory not found: {run}")
    d = RunData(path=run, name=run.resolve().name)
    if rd.config_file.is_file():
        d.config = yaml.safe_load(rd.config_file.read_text(encoding="utf-8"))
    d.train_log = _read_jsonl(rd.train_log)
    d.train_summary = _read_json(rd.train_summary)
    d.prepare = _read_json(rd.data.summary)
    d.metrics = _read_json(rd.eval.metrics)
    d.predictions = _read_jsonl(rd.eval.predictions)
    d.zero_shot, d.last = _read_json(rd.zero_shot.metrics), _read_json(rd.eval_last.metrics)
    d.calibration = _read_json(rd.calibration)
    bdir = Path(baseline_dir) if baseline_dir else rd.baseline.path
    d.baseline = _read_json(ResultsDir(bdir).metrics)
    if d.baseline is not None:
        d.baseline_dir = bdir
    elif baseline_dir:
        raise FileNotFoundError(f"no baseline metrics in {bdir} (run 'llmcls baseline --out {bdir}' first)")
    if not any((d.config, d.train_log, d.train_summary, d.metrics)):
        raise FileNotFoundError(f"{run} holds no run: no config.yaml, train_log.jsonl, train_summary.json "
                                "or eval/metrics.json")
    if d.metrics and d.baseline:
        a, b = Path(d.metrics.get("test_file", "")).name, Path(d.baseline.get("test_file", "")).name
        if a and b and a != b:
            d.notes.append(f"the baseline was scored on {d.baseline['test_file']}, the run on "
                           f"{d.metrics['test_file']}: the two are not directly comparable")
    if d.metrics and d.predictions:
        text_field = ((d.config or {}).get("data") or {}).get("text_field", "text")
        wanted = {m["line"] for m in confident_mistakes(d.predictions, top_mistakes)}
        d.texts = _texts_for(wanted, d.metrics.get("test_file", ""), text_field, run)
        if wanted and not d.texts:
            d.notes.append(f"test file {d.metrics.get('test_file')} not found: mistakes are shown without text")
    return d


def confident_mistakes(predictions: Sequence[dict], n: int) -> list[dict]:
    """Wrong predictions, most confident first (invalid generations, which have no confidence, last)."""
    wrong = [p for p in predictions if p.get("correct") is False]
    return sorted(wrong, key=lambda p: -(p.get("confidence") or 0.0))[:n]


# ------------------------------------------------------------------------------------------------ html bits
def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _sampled_rows(prep: dict) -> str:
    """" (sampled: N of M rows)" where prepare measured the lengths on a sample of the rows (it does past 500)."""
    n, of = _dig(prep, "token_lengths", "sampled_rows"), _dig(prep, "token_lengths", "of")
    return f" (sampled: {_fmt(n)} of {_fmt(of)} rows)" if n is not None and n != of else ""


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "–"
    if kind == "pct" and isinstance(v, (int, float)):
        return f"{100 * v:.2f}%"
    if kind == "f3" and isinstance(v, (int, float)):
        return f"{v:.4f}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return esc(v)


def _cell(c: Any) -> str:
    """A cell is HTML, or (HTML, css class)."""
    return f'<td class="{c[1]}">{c[0]}</td>' if isinstance(c, tuple) else f"<td>{c}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(url: str, plot: str, alt: str) -> str:
    return f'<img class="plot" data-plot="{esc(plot)}" alt="{esc(alt)}" src="{url}">'


def _missing(what: str) -> str:
    return f'<p class="missing">{esc(what)}</p>'


def _dig(d: Optional[dict], *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC",sans-serif;margin:0;color:#222;
background:#f6f7f9;font-size:14px}
header{background:#1d2733;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#b8c2cc;font-size:12px}
main{padding:12px 24px 40px;max-width:1500px}
section{background:#fff;border:1px solid #e2e5e9;border-radius:6px;padding:12px 16px;margin:12px 0}
h2{font-size:16px;margin:0 0 8px}h3{font-size:14px;margin:10px 0 6px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #e2e5e9;border-radius:6px;padding:8px 12px;min-width:150px;background:#fbfcfd}
.card .v{font-size:22px;font-weight:600}.card .k{color:#667;font-size:12px}
.up{color:#1a7f37}.down{color:#c62828}
.verdict{font-size:15px;margin:8px 0}
.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
img.plot{max-width:100%;height:auto;border:1px solid #eee;border-radius:4px;background:#fff}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{border:1px solid #e2e5e9;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5}td.num{text-align:right}
td.text{max-width:720px;font-size:12px;color:#333}
pre{background:#f6f8fa;border:1px solid #e2e5e9;padding:8px;overflow:auto;font-size:12px;max-height:420px}
.missing{color:#888;font-style:italic}.note{color:#8a5a00}
details summary{cursor:pointer;color:#245}
.diff td:first-child{font-family:monospace}
"""


# ------------------------------------------------------------------------------------------------ sections
def _series_name(d: RunData, runs: Sequence[RunData]) -> str:
    return d.name if len(runs) > 1 else "LLM"


def _summary(runs: Sequence[RunData]) -> str:
    out = []
    for d in runs:
        m, b = d.metrics, d.baseline
        cards = []
        if m:
            cards.append(("subset accuracy" if m.get("multi_label") else "accuracy", _fmt(m["accuracy"], "pct"),
                          m["accuracy"], "candidates", "accuracy"))
            cards.append(("macro-F1", _fmt(m["macro_f1"], "f3"), m["macro_f1"], "candidates", "macro_f1"))
        html_cards = []
        for label, shown, value, bkey, mkey in cards:
            delta = ""
            if b:
                bv = b[bkey][mkey]
                diff = value - bv
                cls = "up" if diff >= 0 else "down"
                unit = " pts" if mkey == "accuracy" else ""
                dv = 100 * diff if mkey == "accuracy" else diff
                delta = (f'<div class="k">baseline {_fmt(bv, "pct" if mkey == "accuracy" else "f3")} '
                         f'<span class="{cls}">({dv:+.2f}{unit})</span></div>')
            html_cards.append(f'<div class="card"><div class="k">LLM {label}</div><div class="v">{shown}</div>'
                              f'{delta}</div>')
        s = d.train_summary
        if m:
            html_cards.append(f'<div class="card"><div class="k">invalid answers</div>'
                              f'<div class="v">{_fmt(m.get("invalid_rate"), "pct")}</div>'
                              f'<div class="k">{_fmt(m.get("rows"))} test rows, {esc(m.get("method", ""))}</div></div>')
        if s:
            html_cards.append(f'<div class="card"><div class="k">training</div>'
                              f'<div class="v">{_fmt(s.get("global_step"))} steps</div>'
                              f'<div class="k">final loss {_fmt(s.get("final_logged_loss"))}, '
                              f'{_fmt(s.get("wall_s"))} s</div></div>')
        verdict = ""
        if m and b:
            diff = m["accuracy"] - b["candidates"]["accuracy"]
            word = "beats" if diff > 0 else ("ties with" if diff == 0 else "trails")
            verdict = (f'<p class="verdict">The fine-tuned LLM <b class="{"up" if diff >= 0 else "down"}">{word}'
                       f'</b> the TF-IDF + SVM baseline by {abs(100 * diff):.2f} accuracy points on the same '
                       f'candidates ({_fmt(m["accuracy"], "pct")} vs {_fmt(b["candidates"]["accuracy"], "pct")}; '
                       f'the baseline read {esc(_baseline_text(b))}).</p>')
        elif m:
            verdict = ('<p class="verdict">No baseline in this run directory: run <code>llmcls baseline '
                       f'--train TRAIN --test TEST --out {esc(RunDir(d.path).baseline.path)}</code> to compare.</p>')
        else:
            verdict = '<p class="verdict missing">Not evaluated yet: run <code>llmcls eval RUN_DIR</code>.</p>'
        notes = "".join(f'<p class="note">Note: {esc(n)}</p>' for n in d.notes)
        title = f"<h3>{esc(d.name)}</h3>" if len(runs) > 1 else ""
        out.append(f'{title}<div class="cards">{"".join(html_cards)}</div>{verdict}{notes}')
    return "".join(out)


def _baseline_text(b: dict) -> str:
    t = b.get("text", "whole")
    return {"whole": "whole texts", "same": "the text the LLM reads"}.get(t, f"the first {t} characters")


def _training(runs: Sequence[RunData]) -> tuple[str, list[str]]:
    plots = []
    loss = [(_series_name(d, runs), [r["step"] for r in d.train_log if "loss" in r],
             [r["loss"] for r in d.train_log if "loss" in r]) for d in runs]
    loss = [s for s in loss if s[1]]
    lr = [(_series_name(d, runs), [r["step"] for r in d.train_log if "learning_rate" in r],
           [r["learning_rate"] for r in d.train_log if "learning_rate" in r]) for d in runs]
    lr = [s for s in lr if s[1]]
    parts = []
    if loss:
        positive = all(v > 0 for s in loss for v in s[2])
        parts.append(_img(fig_to_data_url(plot_curves(loss, "loss", "Training loss (answer tokens)",
                                                      logy=positive)), "loss", "training loss curve"))
        plots.append("loss")
    else:
        parts.append(_missing("No training log (train_log.jsonl): loss curve not available."))
    if lr:
        parts.append(_img(fig_to_data_url(plot_curves(lr, "learning rate", "Learning rate")), "lr",
                          "learning-rate curve"))
        plots.append("lr")
    else:
        parts.append(_missing("No learning-rate values logged."))
    d0 = runs[0]
    dev = [r for r in d0.train_log if "dev_macro_f1" in r]
    if dev:  # the dev set as training went, and which step the run kept (train.select_best)
        sel = ((d0.train_summary or {}).get("selection") or {}).get("step")
        fig = plot_dev_curve([r["step"] for r in dev], {"dev macro-F1": [r["dev_macro_f1"] for r in dev],
                                                        "dev accuracy": [r["dev_accuracy"] for r in dev]}, sel)
        parts.append(_img(fig_to_data_url(fig), "dev", "dev metrics during training"))
        plots.append("dev")
    return f'<div class="grid">{"".join(parts)}</div>', plots


def _metric_columns(runs: Sequence[RunData]) -> list[tuple[str, dict]]:
    cols = [(f"{d.name}" if len(runs) > 1 else "LLM (fine-tuned)", d.metrics) for d in runs if d.metrics]
    if len(runs) == 1:  # what fine-tuning bought (zero-shot) and what selecting on the dev set bought (last step)
        d = runs[0]
        if d.last:
            cols.append(("LLM, last step", d.last))
        if d.zero_shot:
            cols.append(("zero-shot (base model)", d.zero_shot))
    seen = set()
    for d in runs:  # one baseline column pair per distinct baseline
        if d.baseline and str(d.baseline_dir) not in seen:
            seen.add(str(d.baseline_dir))
            tag = f" [{d.name}]" if len(runs) > 1 else ""
            cols.append((f"baseline, candidates{tag}", d.baseline["candidates"]))
            cols.append((f"baseline, all labels{tag}", d.baseline["all_labels"]))
    return cols


def _calibration(runs: Sequence[RunData]) -> tuple[str, list[str]]:
    """Runs with a calibration: ECE / Brier / NLL before and after on the test rows, the abstention threshold and
    what it gives, the reliability diagram and the risk-coverage curve (from predictions.jsonl)."""
    from llmcls.calibration import reliability_bins, risk_coverage

    d = next((d for d in runs if d.calibration and d.metrics
              and (d.metrics.get("calibration") or {}).get("method", "none") != "none"), None)
    if d is None:  # no calibration, or an evaluation made before it (re-run llmcls eval to see it applied)
        return "", []
    q = d.metrics["calibration"]
    rows = [[esc(k.upper() if k != "brier" else "Brier"), f'<span class="num">{_fmt(q["before"][k], "f3")}</span>',
             f'<span class="num">{_fmt(q["after"][k], "f3")}</span>'] for k in ("ece", "brier", "nll")]
    parts = [_table(["on the test rows", "uncalibrated", f"{q['method']} scaling (T = {q['temperature']:.3f})"],
                     rows, "metrics")]
    ab = q.get("abstention")
    if ab:
        parts.append(f'<p>Abstaining below a confidence of {ab["threshold"]:.4f} (chosen on the dev set for '
                     f'{ab["target_precision"]} precision) answers {ab["coverage"]:.1%} of the test rows at '
                     f'{_fmt(ab["precision"], "pct")} accuracy; the rest go to a person.</p>')
    preds = [p for p in d.predictions if p.get("probs")]
    plots = []
    if preds:
        correct = [bool(p["correct"]) for p in preds]
        after = [p["confidence"] for p in preds]
        before = [max((p.get("raw_probs") or p["probs"]).values()) for p in preds]
        rel = plot_reliability([("uncalibrated", reliability_bins(before, correct)),
                                ("calibrated", reliability_bins(after, correct))])
        rc = risk_coverage(after, correct)
        point = (ab["coverage"], ab["precision"]) if ab and ab.get("precision") is not None else None
        risk = plot_risk_coverage([("calibrated confidence", list(rc.coverage), list(rc.accuracy))], point)
        parts.append('<div class="grid">' + _img(fig_to_data_url(rel), "reliability", "reliability diagram")
                     + _img(fig_to_data_url(risk), "risk_coverage", "risk-coverage curve") + "</div>")
        plots += ["reliability", "risk_coverage"]
    return "".join(parts), plots


def _evaluation(runs: Sequence[RunData]) -> tuple[str, list[str]]:
    cols = _metric_columns(runs)
    if not cols:
        return _missing("No evaluation (eval/metrics.json): run 'llmcls eval RUN_DIR'."), []
    rows = []
    for key, label, kind in (("accuracy", "accuracy", "pct"), ("macro_f1", "macro-F1", "f3"),
                             ("weighted_f1", "weighted-F1", "f3"), ("invalid_rate", "invalid answers", "pct"),
                             ("rows", "test rows", "")):
        rows.append([esc(label)] + [f'<span class="num">{_fmt(m.get(key), kind)}</span>' for _, m in cols])
    parts = [_table(["metric"] + [c for c, _ in cols], rows, "metrics")]
    parts.append('<p class="k">The LLM picks among each row\'s candidates; "baseline, candidates" does the same '
                 'with the SVM\'s decision values, "baseline, all labels" picks among every label. Macro-F1 '
                 'averages over the labels present among the test rows\' true labels, for every column.</p>')
    plots = []
    labels: list[str] = []
    for _, m in cols:
        for c in m.get("per_class", {}):
            if c not in labels:
                labels.append(c)
    series = []
    for i, d in enumerate(runs):
        if d.metrics:
            series.append((_series_name(d, runs), {c: v["f1"] for c, v in d.metrics["per_class"].items()},
                           PALETTE[i % len(PALETTE)]))
    for d in runs:
        if d.baseline:
            series.append(("baseline (candidates)" + (f" [{d.name}]" if len(runs) > 1 else ""),
                           {c: v["f1"] for c, v in d.baseline["candidates"]["per_class"].items()}, BASELINE_COLOR))
            if len(runs) == 1:
                break
    d0 = next((d for d in runs if d.metrics), None)
    if d0 is None:  # only zero-shot or last-step results so far: the table above says all there is
        parts.append(_missing("No evaluation of the run's own weights (eval/metrics.json): run 'llmcls eval "
                              "RUN_DIR' for the per-class figures."))
        return "".join(parts), plots
    fig = plot_f1_bars(labels, series)
    parts.append('<div class="grid">' + _img(fig_to_data_url(fig), "f1", "per-class F1 bars"))
    plots.append("f1")
    # Per-class table of the (first) LLM run beside its plot: precision/recall explain the F1 bars.
    pc = d0.metrics["per_class"]
    pc_rows = [[esc(c), _fmt(v["precision"], "f3"), _fmt(v["recall"], "f3"), _fmt(v["f1"], "f3"),
                _fmt(v["support"])] for c, v in pc.items()]
    parts.append(f'<div><h3>Per class ({esc(d0.name)})</h3>'
                 + _table(["class", "precision", "recall", "F1", "support"], pc_rows) + "</div></div>")
    return "".join(parts), plots


def _multilabel(runs: Sequence[RunData]) -> str:
    """Multi-label runs: the set-level figures, then each label's P/R/F1 beside the threshold that decided it."""
    multi = [d for d in runs if d.metrics and d.metrics.get("multi_label")]
    if not multi:
        return ""
    keys = (("micro_f1", "micro-F1", "f3"), ("macro_f1", "macro-F1", "f3"), ("subset_accuracy", "subset accuracy",
            "pct"), ("hamming_loss", "Hamming loss", "f3"), ("mean_true_labels", "true labels per row", ""),
            ("mean_predicted_labels", "predicted labels per row", ""), ("rows", "test rows", ""))
    parts = [_table(["metric"] + [d.name for d in multi],
                    [[esc(label)] + [f'<span class="num">{_fmt(d.metrics.get(k), kind)}</span>' for d in multi]
                     for k, label, kind in keys], "metrics")]
    parts.append('<p class="k">Each label is predicted when its candidate probability reaches the label\'s '
                 "threshold (chosen on the dev set; rarer labels share the global one), and the most probable "
                 "candidate always is where at_least_one is on. Subset accuracy: the predicted set is exactly the "
                 "true one. Hamming loss: the share of wrong (row, label) decisions.</p>")
    for d in multi:
        th = d.metrics.get("thresholds") or {}
        own = th.get("per_label") or {}
        rows = [[esc(c), _fmt(v["precision"], "f3"), _fmt(v["recall"], "f3"), _fmt(v["f1"], "f3"),
                 _fmt(v["support"]), _fmt(own.get(c, th.get("default")), "f3") + ("" if c in own else " (global)")]
                for c, v in d.metrics["per_class"].items()]
        src = "dev-chosen" if th.get("from_dev") else "multilabel.default_threshold (no dev set)"
        parts.append(f"<h3>Per label ({esc(d.name)}; thresholds: {esc(src)})</h3>"
                     + _table(["label", "precision", "recall", "F1", "support", "threshold"], rows))
    return "".join(parts)


def _confusion(runs: Sequence[RunData]) -> tuple[str, list[str]]:
    parts, plots = [], []
    for d in runs:
        cm = _dig(d.metrics, "confusion_matrix")
        if not cm:
            continue
        title = f"Confusion matrix: {d.name}" if len(runs) > 1 else "Confusion matrix (LLM)"
        parts.append(_img(fig_to_data_url(plot_confusion(cm["labels"], cm["matrix"], title)), "confusion",
                          f"confusion matrix of {d.name}"))
        plots.append("confusion")
    if not parts:
        if any(_dig(d.metrics, "multi_label") for d in runs):
            return _missing("No confusion matrix for a multi-label run: see the per-label figures above."), []
        return _missing("No confusion matrix (not evaluated)."), []
    return f'<div class="grid">{"".join(parts)}</div>', plots


def _mistakes(runs: Sequence[RunData], n: int) -> str:
    parts = []
    for d in runs:
        if not d.predictions:
            continue
        wrong = confident_mistakes(d.predictions, n)
        total_wrong = sum(p.get("correct") is False for p in d.predictions)
        head = f"<h3>{esc(d.name)}</h3>" if len(runs) > 1 else ""
        if not wrong:
            parts.append(f"{head}<p>No mistakes on {len(d.predictions)} rows.</p>")
            continue
        rows = []
        for p in wrong:
            text = d.texts.get(p.get("line"), "")
            short = text if len(text) <= 400 else text[:400] + " …"
            probs = p.get("probs") or {}
            top = ", ".join(f"{esc(k)} {v:.2f}" for k, v in sorted(probs.items(), key=lambda kv: -kv[1])[:4])
            shown = lambda x: ", ".join(x) if isinstance(x, list) else x  # noqa: E731  (multi-label: lists)
            rows.append([_fmt(p.get("line")), esc(shown(p.get("truth"))),
                         f"<b>{esc(shown(p.get('labels') or p.get('pred') or INVALID))}</b>",
                         _fmt(p.get("confidence"), "f3"), top or esc(p.get("raw", "")),
                         (f'<span title="{esc(text[:2000])}">{esc(short) or "<i>text unavailable</i>"}</span>',
                          "text")])
        parts.append(f"{head}<p>{len(wrong)} most confident of {total_wrong} wrong predictions "
                     f"({len(d.predictions)} rows).</p>"
                     + _table(["line", "truth", "predicted", "confidence", "candidate probabilities", "text"],
                              rows, "mistakes"))
    return "".join(parts) or _missing("No predictions (eval/predictions.jsonl).")


def _data(runs: Sequence[RunData]) -> str:
    present = [d for d in runs if d.prepare]
    if not present:
        return _missing("No prepare summary (data/prepare.json).")
    rows = []

    def row(label, fn):
        rows.append([esc(label)] + [fn(d.prepare) for d in present])

    row("training file", lambda p: esc(p.get("file")))
    row("rows used / invalid skipped", lambda p: f"{_fmt(p.get('rows'))} / {_fmt(p.get('invalid'))}")
    row("labels", lambda p: _fmt(p.get("num_labels")))
    row("max_length (tokens) / truncation", lambda p: f"{_fmt(p.get('max_length'))} / {esc(p.get('truncation'))}")
    row("tokens per row before the cut: median / p90 / p99 / max", lambda p: " / ".join(
        _fmt(_dig(p, "token_lengths", k)) for k in ("median", "p90", "p99", "max")) + _sampled_rows(p))
    row("rows shortened to fit", lambda p: f"{_fmt(p.get('shortened'))} "
        f"({_fmt(p.get('shortened', 0) / max(p.get('rows', 1), 1), 'pct')})")
    row("rows keeping the whole answer", lambda p: f"{_fmt(p.get('answer_kept'))} "
        f"({_fmt(p.get('answer_kept', 0) / max(p.get('rows', 1), 1), 'pct')})")
    row("…with the tutorial's right cut (any answer token)", lambda p: f"{_fmt(p.get('tutorial_answer_kept'))} "
        f"({_fmt(p.get('tutorial_answer_kept', 0) / max(p.get('rows', 1), 1), 'pct')})")
    row("tokens trained on", lambda p: _fmt(p.get("trained_tokens")))
    row("label counts", lambda p: ", ".join(f"{esc(k)} {v}" for k, v in (p.get("labels") or {}).items()))
    return _table(["", *[d.name for d in present]], rows)


def _throughput(runs: Sequence[RunData]) -> str:
    rows = []

    def mem(v):
        return "n/a (no GPU)" if v is None else f"{v:.2f} GiB"

    def row(label, fn):
        rows.append([esc(label)] + [fn(d) for d in runs])

    row("training: optimizer steps", lambda d: _fmt(_dig(d.train_summary, "global_step")))
    row("training: wall time", lambda d: f"{_fmt(_dig(d.train_summary, 'wall_s'))} s" if d.train_summary else "–")
    row("training: tokens seen", lambda d: _fmt(_dig(d.train_summary, "tokens_seen")))
    row("training: tokens/s", lambda d: _fmt(_dig(d.train_summary, "tokens_per_s")))
    row("training: peak GPU memory", lambda d: mem(_dig(d.train_summary, "peak_mem_gib")) if d.train_summary else "–")
    row("training: peak process memory (RSS)",
        lambda d: mem(max((r["peak_rss_gib"] for r in d.train_log if "peak_rss_gib" in r), default=None))
        if any("peak_rss_gib" in r for r in d.train_log) else "–")
    row("trainable parameters", lambda d: f"{_fmt(_dig(d.train_summary, 'trainable'))} of "
        f"{_fmt(_dig(d.train_summary, 'parameters'))} ({_fmt(_dig(d.train_summary, 'trainable_pct'))}%)"
        if d.train_summary else "–")
    row("eval: rows/s", lambda d: _fmt(_dig(d.metrics, "rows_per_s")))
    row("eval: wall time", lambda d: f"{_fmt(_dig(d.metrics, 'wall_s'))} s" if d.metrics else "–")
    row("eval: peak GPU memory", lambda d: mem(_dig(d.metrics, "peak_mem_gib")) if d.metrics else "–")
    row("baseline: wall time (fit + score)", lambda d: f"{_fmt(_dig(d.baseline, 'wall_s'))} s" if d.baseline else "–")
    return _table(["", *[d.name for d in runs]], rows)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _config(runs: Sequence[RunData]) -> str:
    import yaml

    parts = []
    if len(runs) > 1:
        flat = [_flatten(d.config or {}) for d in runs]
        keys = sorted(set().union(*flat))
        differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1
                  and k != "train.output_dir"]
        if differ:
            parts.append("<h3>Settings that differ</h3>" + _table(
                ["key", *[d.name for d in runs]], [[esc(k)] + [esc(f.get(k, "–")) for f in flat] for k in differ],
                "diff"))
        else:
            parts.append("<p>The runs have the same settings (apart from the output folder).</p>")
    for d in runs:
        text = yaml.safe_dump(d.config, sort_keys=False, allow_unicode=True) if d.config else "(no config.yaml)"
        opened = " open" if len(runs) == 1 else ""
        parts.append(f"<details{opened}><summary>Resolved config: {esc(d.name)}</summary><pre>{esc(text)}</pre>"
                     "</details>")
    return "".join(parts)


def _environment(runs: Sequence[RunData]) -> str:
    envs = [(_dig(d.train_summary, "environment") or _dig(d.metrics, "environment") or {}) for d in runs]
    keys = ["python", "platform", "git_commit", "cpu_threads"]
    rows = [[esc(k)] + [esc(e.get(k, "–")) for e in envs] for k in keys]
    rows.append(["GPU"] + [esc(", ".join(f"{k}: {v}" for k, v in e["gpu"].items())) if e.get("gpu") else "none"
                           for e in envs])
    pkgs = sorted(set().union(*[set(e.get("versions") or {}) for e in envs]))
    rows += [[esc(p)] + [esc((e.get("versions") or {}).get(p) or "–") for e in envs] for p in pkgs]
    return _table(["", *[d.name for d in runs]], rows)


# ------------------------------------------------------------------------------------------------ entry point
def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llmcls")
    except metadata.PackageNotFoundError:
        return "dev"


def render_html(runs: Sequence[RunData], top_mistakes: int = 10) -> tuple[str, list[str]]:
    """The page and the names of the plots it holds (one ``<img class="plot">`` each, in page order)."""
    train_html, p1 = _training(runs)
    eval_html, p2 = _evaluation(runs)
    cm_html, p3 = _confusion(runs)
    cal_html, p4 = _calibration(runs)
    names = ", ".join(d.name for d in runs)
    title = f"llmcls report: {names}" if len(runs) == 1 else f"llmcls comparison: {names}"
    sections = [
        ("summary", "At a glance", _summary(runs)),
        ("training", "Training curves", train_html),
        ("evaluation", "Evaluation" + (" (LLM vs baseline)" if any(d.baseline for d in runs) else ""), eval_html),
        *([("calibration", "Calibration and abstention", cal_html)] if cal_html else []),
        *([("multilabel", "Multi-label", ml_html)] if (ml_html := _multilabel(runs)) else []),
        ("confusion", "Confusion matrix", cm_html),
        ("mistakes", "Most confident mistakes", _mistakes(runs, top_mistakes)),
        ("data", "Data and truncation (prepare)", _data(runs)),
        ("throughput", "Throughput and memory", _throughput(runs)),
        ("config", "Configuration", _config(runs)),
        ("environment", "Environment", _environment(runs)),
    ]
    body = "".join(f'<section id="{sid}"><h2>{esc(h)}</h2>{content}</section>' for sid, h, content in sections)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    runs_line = " · ".join(esc(d.path) for d in runs)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p>{runs_line} · generated {stamp} by llmcls {esc(_version())}</p>"
            f"</header><main>{body}</main></body></html>\n")
    return page, p1 + p2 + p3 + p4


def default_output(run_dirs: Sequence[str | Path]) -> Path:
    return RunDir(run_dirs[0]).report if len(run_dirs) == 1 else Path("llmcls-report.html")


def write_report(run_dirs: Sequence[str | Path], out: Optional[str | Path] = None,
                 baseline_dir: Optional[str | Path] = None, overwrite: bool = False,
                 top_mistakes: int = 10) -> Path:
    """Build the page and write it atomically. ``RUN/report.html`` belongs to the run and is always refreshed;
    any other existing file is only replaced with ``overwrite``."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    target = Path(out) if out else default_output(run_dirs)
    owned = len(run_dirs) == 1 and target.resolve() == RunDir(run_dirs[0]).report.resolve()
    if not owned:
        refuse_overwrite(target, overwrite)
    runs = [load_run(r, baseline_dir, top_mistakes) for r in run_dirs]
    names = [d.name for d in runs]
    for i, d in enumerate(runs):  # two runs called "run" in different folders must stay apart on the page
        if names.count(d.name) > 1:
            d.name = f"{d.path.resolve().parent.name}/{d.name}"
    page, _ = render_html(runs, top_mistakes)
    atomic_write_text(target, page)
    return target
