"""Plots a person would rather look at than a table: training curves, per-class F1, the confusion matrix
(matplotlib, headless; every function returns a figure, :func:`fig_to_data_url` inlines it in a page)."""

from __future__ import annotations

import base64
import io
from typing import Sequence

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
BASELINE_COLOR = "#9a9a9a"

# Chinese label names (the tutorial's data set) need a CJK font; matplotlib falls back along this list per glyph.
CJK_FONTS = ["Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC"]
_fonts_done = False


def _plt():
    global _fonts_done
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display here; never let a GUI backend be picked
    import matplotlib.pyplot as plt

    if not _fonts_done:
        from matplotlib import font_manager

        have = {f.name for f in font_manager.fontManager.ttflist}
        # Only installed ones: a missing family in the list makes matplotlib warn on every text it draws.
        extra = [f for f in CJK_FONTS if f in have and f not in matplotlib.rcParams["font.sans-serif"]]
        matplotlib.rcParams["font.sans-serif"] = [*matplotlib.rcParams["font.sans-serif"], *extra]
        _fonts_done = True
    return plt


def fig_to_data_url(fig, dpi: int = 110) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_curves(series: Sequence[tuple[str, list[float], list[float]]], ylabel: str, title: str,
                logy: bool = False):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.1))
    for i, (name, xs, ys) in enumerate(series):
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, lw=1.6, color=PALETTE[i % len(PALETTE)],
                label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_f1_bars(labels: list[str], series: Sequence[tuple[str, dict[str, float], str]]):
    """Horizontal grouped bars: one group per class, one bar per series (runs, then the baseline)."""
    import numpy as np

    plt = _plt()
    n = len(series)
    height = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(6.4, max(2.4, 0.32 * len(labels) * max(1, n * 0.6) + 1.2)))
    y = np.arange(len(labels))
    for i, (name, f1, color) in enumerate(series):
        vals = [f1.get(c, 0.0) for c in labels]
        ax.barh(y + (i - (n - 1) / 2) * height, vals, height=height * 0.95, color=color, label=name)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("F1")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Per-class F1")
    # Below the axes: inside, the legend would hide the bars of the last classes.
    if n:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.16), ncol=min(n, 3), frameon=False)
    fig.tight_layout()
    return fig


def plot_confusion(labels: list[str], matrix: list[list[int]], title: str = "Confusion matrix"):
    """Colours are row-normalised (recall per true class) so small classes show; cells print the counts."""
    import numpy as np

    plt = _plt()
    cm = np.asarray(matrix, dtype=float)
    n_true, n_pred = cm.shape
    rows = labels[:n_true]
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = max(3.6, 0.42 * n_pred + 2.2)
    fig, ax = plt.subplots(figsize=(side + 0.8, max(3.2, 0.42 * n_true + 1.8)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(n_pred), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_true), rows, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n_pred <= 30:
        for i in range(n_true):
            for j in range(n_pred):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.55 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="share of the true class")
    fig.tight_layout()
    return fig


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, legend_loc: str):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_loc)
    fig.tight_layout()
    return fig


def plot_dev_curve(steps: list[int], series: dict[str, list[float]], selected: int | None):
    """Dev metrics over the optimizer steps, the step whose weights the run kept marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.1))
    for i, (name, ys) in enumerate(series.items()):
        ax.plot(steps, ys, marker="o", ms=3, lw=1.6, color=PALETTE[i % len(PALETTE)], label=name)
    if selected is not None:
        ax.axvline(selected, color="#444", ls="--", lw=1, label=f"kept: step {selected}")
    return _finish(fig, ax, "optimizer step", "dev score", "Dev set during training", "best")


def plot_reliability(series: Sequence[tuple[str, dict]]):
    """Reliability diagram: per confidence bin, the accuracy against the mean confidence (on the diagonal: the
    probabilities mean what they say); marker area follows the bin's row count."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls=":", label="perfect calibration")
    for i, (name, bins) in enumerate(series):
        count = np.asarray(bins["count"], dtype=float)
        keep = count > 0
        conf, acc = np.asarray(bins["confidence"])[keep], np.asarray(bins["accuracy"])[keep]
        ax.plot(conf, acc, lw=1.4, color=PALETTE[i % len(PALETTE)], label=name)
        ax.scatter(conf, acc, s=8 + 120 * count[keep] / max(count.sum(), 1), color=PALETTE[i % len(PALETTE)])
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    return _finish(fig, ax, "confidence (mean of the bin)", "accuracy of the bin", "Reliability (15 bins)",
                   "upper left")


def plot_risk_coverage(series: Sequence[tuple[str, list[float], list[float]]], threshold_point=None):
    """Accuracy of the rows answered against the share answered, answering the most confident first; the run's
    abstention threshold marked where it has one."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for i, (name, cov, acc) in enumerate(series):
        ax.plot(cov, acc, lw=1.6, color=PALETTE[i % len(PALETTE)], label=name)
    if threshold_point is not None:
        ax.scatter([threshold_point[0]], [threshold_point[1]], color="#d62728", zorder=3,
                   label=f"threshold: {threshold_point[0]:.1%} answered")
    return _finish(fig, ax, "coverage (share of rows answered)", "accuracy of the rows answered", "Risk-coverage",
                   "lower left")
