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

log = logging.getLogger(__name__)


def swanlab_mode(cfg: TrackConfig) -> str:
    if cfg.mode == "auto":
        return "online" if _has_swanlab_key() else "offline"
    return {"cloud": "online"}.get(cfg.mode, cfg.mode)


def _has_swanlab_key() -> bool:
    if os.environ.get("SWANLAB_API_KEY"):
        return True
    try:  # a key saved by `swanlab login`
        from swanlab.core_python.auth import get_key  # type: ignore

        return bool(get_key())
    except Exception:
        return False


class Tracker:
    """One tracked run. ``callbacks`` go to the Trainer; ``log`` and ``log_samples`` take eval results."""

    def __init__(self, cfg: TrackConfig, run_dir: str | Path, config: dict, is_main: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.kind = cfg.tracker if is_main else "none"
        self.callbacks: list = []
        self._run = None
        self._tb = None
        if self.kind == "swanlab":
            self._start_swanlab(config)
        elif self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            self._tb.add_text("config", "```\n" + json.dumps(config, indent=2, ensure_ascii=False) + "\n```")
            from transformers.integrations import TensorBoardCallback

            self.callbacks.append(TensorBoardCallback(tb_writer=self._tb))

    def _start_swanlab(self, config: dict) -> None:
        import swanlab

        mode = swanlab_mode(self.cfg)
        if mode == "disabled":
            self.kind = "none"
            return
        logdir = self.run_dir / "swanlog"
        logdir.mkdir(parents=True, exist_ok=True)
        self._run = swanlab.init(project=self.cfg.project, name=self.cfg.experiment, config=config, mode=mode,
                                 log_dir=str(logdir), reinit=True)
        from swanlab.integration.transformers import SwanLabCallback

        # The run above is already active, so the callback logs into it instead of starting its own.
        self.callbacks.append(SwanLabCallback(log_config=False))
        log.info("SwanLab run '%s/%s' in %s mode, logs in %s", self.cfg.project, self.cfg.experiment, mode, logdir)

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

    def finish(self) -> None:
        if self.kind == "swanlab":
            import swanlab

            swanlab.finish()
        elif self._tb is not None:
            self._tb.close()


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
        if self._t is not None and state.num_input_tokens_seen:
            dt = now - self._t
            if dt > 0:
                rec["tokens_per_s"] = round((state.num_input_tokens_seen - self._tokens) / dt, 1)
            self._t, self._tokens = now, state.num_input_tokens_seen
        if torch.cuda.is_available():
            rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:  # appended: a resumed run continues the log
            fh.write(json.dumps(rec) + "\n")
        if self.echo and "loss" in logs:
            extra = f" tokens/s {rec['tokens_per_s']:.0f}" if "tokens_per_s" in rec else ""
            mem = f" mem {rec['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in rec else ""
            lr = logs.get("learning_rate", float("nan"))
            print(f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} lr {lr:.2e}{extra}{mem}",
                  flush=True)
