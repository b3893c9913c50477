"""Stage 6 — tracking: SwanLab as in the tutorial (cloud, offline, local or disabled), TensorBoard, or none.

Traps avoided here: ``report_to="swanlab"`` crashes with swanlab >= 0.9 unless a run was started, and
``SwanLabCallback(config=...)`` silently drops the config; so the run is started explicitly with the resolved
config and the callback only forwards Trainer logs. Without an API key SwanLab is put in offline mode
explicitly, so it never prompts for a login nor touches the network.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from llmcls.config import TrackConfig
from llmcls.files import atomic_open, atomic_write_json
from llmcls.rundir import RunDir

log = logging.getLogger(__name__)


def swanlab_mode(cfg: TrackConfig) -> str:
    if cfg.mode == "auto":
        return "online" if _has_swanlab_key() else "offline"
    return {"cloud": "online"}.get(cfg.mode, cfg.mode)


def _has_swanlab_key() -> bool:
    """An API key in the environment or saved by ``swanlab login`` (a .netrc under SWANLAB_ROOT or ~/.swanlab,
    or ./.swanlab)."""
    if os.environ.get("SWANLAB_API_KEY"):
        return True
    try:  # swanlab >= 0.9: the settings resolve env, config files and the saved .netrc
        from swanlab.sdk.internal.settings import create_settings  # type: ignore

        return bool(create_settings().api_key)
    except ImportError:
        pass
    except Exception:  # a malformed saved key must not stop training: treat as "no key", run offline
        return False
    try:  # swanlab 0.6 - 0.8
        from swanlab.core_python.auth import get_key  # type: ignore

        return bool(get_key())
    except Exception:
        return False


def swanboard_available() -> bool:
    """The local dashboard (``swanlab watch``) and the 'local' mode need the ``swanlab[dashboard]`` extra."""
    try:
        import swanboard  # noqa: F401
    except ImportError:
        return False
    return True


class Tracker:
    """One tracked run. ``callbacks`` go to the Trainer; ``log``, ``log_samples`` and ``log_eval_details`` take
    eval results. With ``resume``, SwanLab continues the run that training started in the same run directory
    (same id), so one experiment holds the loss curves and the eval results."""

    def __init__(self, cfg: TrackConfig, run_dir: str | Path, config: dict, is_main: bool = True,
                 resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.kind = cfg.tracker if is_main else "none"
        self.callbacks: list = []
        self._run = None
        self._tb = None
        self.mode: Optional[str] = None
        if self.kind == "swanlab":
            self._start_swanlab(config, resume)
        elif self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(RunDir(self.run_dir).tensorboard))
            self._tb.add_text("config", "```\n" + json.dumps(config, indent=2, ensure_ascii=False) + "\n```")
            from transformers.integrations import TensorBoardCallback

            self.callbacks.append(TensorBoardCallback(tb_writer=self._tb))

    def _start_swanlab(self, config: dict, resume: bool) -> None:
        import swanlab

        from llmcls.config import ConfigError

        mode = self.mode = swanlab_mode(self.cfg)
        if mode == "disabled":
            self.kind = "none"
            return
        if mode == "local" and not swanboard_available():
            # A ConfigError reaches the user as one line from the CLI, before any step is trained.
            raise ConfigError("track.mode=local needs the SwanLab dashboard: pip install 'swanlab[dashboard]' "
                              "(or use track.mode=offline and `swanlab sync` later)")
        logdir, record = RunDir(self.run_dir).swanlog, RunDir(self.run_dir).swanlab_record
        logdir.mkdir(parents=True, exist_ok=True)
        previous = None
        if resume and record.is_file():
            try:
                previous = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                previous = None
        extra = {"id": previous["id"], "resume": "allow"} if previous and previous.get("mode") == mode else {}
        self._run = swanlab.init(project=self.cfg.project, name=self.cfg.experiment, config=config, mode=mode,
                                 log_dir=str(logdir), reinit=True, **extra)
        if not extra:
            atomic_write_json(record, {"id": self._run.id, "mode": mode, "project": self.cfg.project,
                                       "experiment": self.cfg.experiment})
        from swanlab.integration.transformers import SwanLabCallback

        # The run above is already active, so the callback logs into it instead of starting its own.
        self.callbacks.append(SwanLabCallback(log_config=False))
        hint = {"offline": f"upload later with `swanlab sync {logdir}/run-*`",
                "local": f"view with `swanlab watch {logdir}`"}.get(mode, "")
        log.info("SwanLab run '%s/%s' in %s mode, logs in %s%s", self.cfg.project, self.cfg.experiment, mode,
                 logdir, f"; {hint}" if hint else "")

    def log(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.kind == "swanlab":
            import swanlab

            swanlab.log(scalars, step=step)
        elif self.kind == "tensorboard":
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=step)

    def log_samples(self, samples: list[dict], key: str = "eval/samples") -> None:
        """Sample predictions, right and wrong, as text (``swanlab.Text`` like the tutorial)."""
        if not samples:
            return
        lines = [f"[{'OK' if s['correct'] else 'WRONG'}] truth={s['truth']} pred={s['pred']} | {s['text'][:300]}"
                 for s in samples]
        if self.kind == "swanlab":
            import swanlab

            swanlab.log({key: [swanlab.Text(line) for line in lines]})
        elif self.kind == "tensorboard":
            self._tb.add_text(key, "\n\n".join(lines))

    def log_eval_details(self, metrics: dict, key: str = "eval") -> None:
        """Per-class F1 as scalars and the confusion matrix: an interactive ECharts heatmap for the SwanLab web
        UI plus the report's matplotlib heatmap as an image (the local dashboard shows images, not ECharts)."""
        if self.kind == "none":
            return
        per_class = metrics.get("per_class") or {}
        self.log({f"{key}/f1/{c}": v["f1"] for c, v in per_class.items()})
        cm = metrics.get("confusion_matrix")
        if not cm:
            return
        from llmcls.reporting.plots import plot_confusion

        fig = plot_confusion(cm["labels"], cm["matrix"])
        if self.kind == "swanlab":
            import swanlab

            swanlab.log({f"{key}/confusion_matrix": swanlab.ECharts(confusion_heatmap(cm["labels"], cm["matrix"])),
                         f"{key}/confusion_matrix_image": swanlab.Image(fig, caption="rows: truth, columns: "
                                                                                      "prediction")})
        elif self.kind == "tensorboard":
            self._tb.add_figure(f"{key}/confusion_matrix", fig)
        import matplotlib.pyplot as plt

        plt.close(fig)

    def finish(self) -> None:
        if self.kind == "swanlab":
            import swanlab

            swanlab.finish()
        elif self._tb is not None:
            self._tb.close()


def confusion_heatmap(labels: list[str], matrix: list[list[int]]):
    """The confusion matrix as a SwanLab ECharts heatmap (rows: truth, columns: prediction, cells: counts)."""
    from swanlab import echarts

    opts = echarts.options

    n_true = len(matrix)
    data = [[j, i, int(matrix[i][j])] for i in range(n_true) for j in range(len(labels))]
    top = max((v for _, _, v in data), default=1) or 1
    chart = echarts.HeatMap()
    chart.add_xaxis(list(labels))
    chart.add_yaxis("count", list(labels[:n_true]), data, label_opts=opts.LabelOpts(is_show=True, position="inside"))
    chart.set_global_opts(
        title_opts=opts.TitleOpts(title="Confusion matrix"),
        visualmap_opts=opts.VisualMapOpts(min_=0, max_=top),
        xaxis_opts=opts.AxisOpts(name="prediction", type_="category"),
        yaxis_opts=opts.AxisOpts(name="truth", type_="category"),
    )
    return chart


def trim_log(path: str | Path, step: int) -> int:
    """Keep the lines of ``train_log.jsonl`` up to ``step`` (the checkpoint a run resumes from): the steps after
    it are trained again and logged again, so their first lines would repeat (with the crash's last, perhaps half
    written, line). Rewritten atomically; returns the lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        with atomic_open(path) as fh:
            fh.write("".join(k + "\n" for k in kept))
    return dropped


def whole_run_loss(log_history: list[dict], resumed_from: int, resumed_loss: float, final_step: int) -> float:
    """The mean training loss over the whole run, when the Trainer's own figure covers only the steps since
    ``resumed_from``: each loss logged up to the checkpoint is the mean of the steps since the previous log, so
    they are weighted by those steps, then joined with the resumed part's mean weighted by its steps. Steps between
    the checkpoint's last log and the checkpoint itself (logging_steps not dividing save_steps) are left out."""
    total, steps, prev = 0.0, 0, 0
    for h in log_history:
        if "loss" in h and isinstance(h.get("step"), int) and prev < h["step"] <= resumed_from:
            total += h["loss"] * (h["step"] - prev)
            steps += h["step"] - prev
            prev = h["step"]
    after = max(final_step - resumed_from, 0)
    if steps + after == 0:
        return resumed_loss
    return (total + resumed_loss * after) / (steps + after)


class JsonlLogCallback(TrainerCallback):
    """Writes one JSON line per logging step (loss, lr, tokens/s, memory) to ``train_log.jsonl`` and prints a
    one-line summary, so a run is readable without any tracker and the report can plot it."""

    def __init__(self, path: str | Path, echo: bool = True):
        self.path = Path(path)
        self.echo = echo
        self._t = None
        self._tokens = 0

    def on_train_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()
        self._tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        import torch

        now = time.perf_counter()
        rec: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
        seen = state.num_input_tokens_seen
        # The Trainer's closing log (train_runtime...) comes with no new tokens: no rate rather than a false 0.
        if self._t is not None and seen and seen > self._tokens and "dev_accuracy" not in logs:
            dt = now - self._t
            if dt > 0:
                rec["tokens_per_s"] = round((seen - self._tokens) / dt, 1)
            self._t, self._tokens = now, seen
        if torch.cuda.is_available():
            rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        rss = _peak_rss_gib()
        if rss is not None:  # on a CPU run this is the only memory figure there is
            rec["peak_rss_gib"] = rss
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:  # appended: a resumed run continues the log
            fh.write(json.dumps(rec) + "\n")
        if self.echo and "loss" in logs:
            extra = f" tokens/s {rec['tokens_per_s']:.0f}" if "tokens_per_s" in rec else ""
            if "peak_mem_gib" in rec:
                mem = f" gpu mem {rec['peak_mem_gib']:.2f} GiB"
            elif "peak_rss_gib" in rec:
                mem = f" rss {rec['peak_rss_gib']:.2f} GiB"
            else:
                mem = ""
            lr = logs.get("learning_rate", float("nan"))
            print(f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} lr {lr:.2e}{extra}{mem}",
                  flush=True)


def _peak_rss_gib() -> Optional[float]:
    try:
        import resource
    except ImportError:  # Windows
        return None
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import sys

    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)
