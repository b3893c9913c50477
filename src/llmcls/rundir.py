"""The run directory and the export folder: the one owner of their layout. Every other module asks here for a
path (``RunDir(path).adapter``), a run's config, labels or weights, so a file name is spelled once.

Run directory (``train.output_dir``)::

    RUN/config.yaml          resolved configuration (what was actually run)
    RUN/data/                prepare's outputs: train.instruct.jsonl, encoded/, prepare.json (summary, labels),
                             dev.jsonl (the rows data.dev_fraction took out of training)
    RUN/base-model/          the tiny preset's random-init base (tiny runs only)
    RUN/checkpoints/         Trainer checkpoints (resume from the last one)
    RUN/adapter/             LoRA adapter, PEFT format, safetensors      (lora.method: lora)
    RUN/model/               fine-tuned weights, safetensors              (lora.method: full)
    RUN/best/                the best dev evaluation's weights so far (train.select_best), its step and scores
    RUN/last/                the last step's weights when select_best kept an earlier one (train.keep_last)
    RUN/calibration.json     temperature / label biases, abstention threshold, dev figures before and after
    RUN/thresholds.json      multi-label runs: per-label probability thresholds chosen on the dev set
    RUN/tokenizer/           tokenizer used for training
    RUN/train_log.jsonl      one line per logging step
    RUN/train_summary.json   steps, loss, throughput, memory, versions
    RUN/eval/                metrics.json, predictions.jsonl             (llmcls eval)
    RUN/eval-last/, RUN/zero-shot/   the same for the last step's and the base model's weights
    RUN/baseline/            the TF-IDF baseline's metrics.json, predictions.jsonl
    RUN/report.html          llmcls report
    RUN/swanlog/, RUN/tensorboard/   tracker files

Export folder (``llmcls export``): a plain Hugging Face model folder plus ``llmcls.json`` (labels, prompt,
config), see ``llmcls.recipes.export``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llmcls.config import Config, ConfigError, check_model, check_scoring, check_task, load_config

EXPORT_META = "llmcls.json"
EXPORT_FORMAT = "llmcls-export"
EXPORT_VERSION = 3  # 2: llmcls.json may carry "calibration" (an older reader would silently ignore it); 3:
# "lexical" and "shortlist" (a TF-IDF model in lexical/ that a hybrid calibration needs), "thresholds" (multi-label)


def read_json(path: Path) -> Optional[dict]:
    """A JSON file's object, or None when it is absent or unreadable (an interrupted run's files are optional)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _file(name: str) -> property:
    """A path of the folder, as a read-only attribute."""
    return property(lambda self: self.path / name)


@dataclass(frozen=True)
class DataDir:
    """``llmcls prepare``'s outputs (``RUN/data`` or the folder given with ``--out``)."""

    path: Path
    summary = _file("prepare.json")
    encoded = _file("encoded")
    instructions = _file("train.instruct.jsonl")
    dev = _file("dev.jsonl")  # the rows data.dev_fraction took out of the training file, in its format


@dataclass(frozen=True)
class ResultsDir:
    """Where an evaluation writes (``RUN/eval``, ``RUN/baseline`` or a folder the user names)."""

    path: Path
    metrics = _file("metrics.json")
    predictions = _file("predictions.jsonl")


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    # ---- layout
    config_file = _file("config.yaml")
    data = property(lambda self: DataDir(self.path / "data"))
    base_model = _file("base-model")
    checkpoints = _file("checkpoints")
    adapter = _file("adapter")
    best = _file("best")                      # weights of the best dev evaluation so far
    best_record = _file("best/llmcls-selection.json")
    last = _file("last")                      # train.keep_last
    calibration = _file("calibration.json")
    lexical = _file("lexical")                # the TF-IDF model of eval.hybrid / eval.shortlist
    thresholds = _file("thresholds.json")
    model = _file("model")
    tokenizer = _file("tokenizer")
    train_log = _file("train_log.jsonl")
    train_summary = _file("train_summary.json")
    eval = property(lambda self: ResultsDir(self.path / "eval"))
    eval_last = property(lambda self: ResultsDir(self.path / "eval-last"))
    zero_shot = property(lambda self: ResultsDir(self.path / "zero-shot"))
    baseline = property(lambda self: ResultsDir(self.path / "baseline"))
    report = _file("report.html")
    swanlog = _file("swanlog")
    swanlab_record = _file("swanlog/llmcls-run.json")  # the SwanLab run id that a later eval resumes
    tensorboard = _file("tensorboard")

    def training_outputs(self) -> list[Path]:
        """What ``train --overwrite`` removes: a new training makes all of it stale."""
        return [self.checkpoints, self.adapter, self.model, self.best, self.last, self.calibration, self.lexical,
                self.thresholds, self.train_log, self.train_summary, self.eval.path, self.eval_last.path,
                self.zero_shot.path, self.baseline.path, self.report]

    # ---- state
    @property
    def finished(self) -> bool:
        return self.adapter.is_dir() or self.model.is_dir()

    @property
    def started(self) -> bool:
        """A run holds a finished step: saved weights, or a checkpoint the Trainer completed (its state file is
        written last). A start that failed before (a bad setting, out of memory) leaves an empty checkpoints/ or
        a half-saved checkpoint: that is not a run, and a corrected command may start afresh."""
        return self.finished or bool(self.checkpoint_steps())

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints, in order."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(c.name.split("-", 1)[1]) for c in self.checkpoints.glob("checkpoint-*")
                      if c.name.split("-", 1)[1].isdigit() and (c / "trainer_state.json").is_file())

    def failed_start_outputs(self) -> list[Path]:
        """What a training that stopped before its first complete checkpoint may have left: removed before a new
        start (the run's config, data and earlier evaluations stay)."""
        return [self.checkpoints, self.best, self.last, self.lexical, self.thresholds, self.calibration,
                self.train_log, self.train_summary]

    def require(self) -> "RunDir":
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory (no config.yaml); train one with "
                                    "'llmcls train'")
        return self

    # ---- contents
    def load_config(self, overrides: Optional[dict[str, Any]] = None) -> Config:
        return load_config(self.require().config_file, overrides)

    def labels(self) -> Optional[list[str]]:
        """The labels the run was trained on (prepare's summary), sorted; None when unknown."""
        summary = read_json(self.data.summary)
        return sorted(summary["labels"]) if summary and "labels" in summary else None

    @property
    def multi_label(self) -> bool:
        """Whether the run was trained multi-label (prepare's summary says)."""
        return bool((read_json(self.data.summary) or {}).get("multi_label"))

    def load_thresholds(self, cfg: Config):
        """A multi-label run's dev-chosen thresholds (``thresholds.json``), else ``multilabel.default_threshold``."""
        from llmcls.multilabel import Thresholds, default_thresholds

        d = read_json(self.thresholds)
        return Thresholds.from_dict(d) if d else default_thresholds(cfg)

    def method(self) -> str:
        return "lora" if self.adapter.is_dir() else "full"

    def weights(self, which: str = "selected") -> Path:
        """The folder of the run's own weights (``selected``: adapter/ or model/) or of the last step's (``last``)."""
        return {"selected": self.adapter if self.adapter.is_dir() else self.model, "last": self.last}[which]

    def results(self, weights: str = "selected") -> ResultsDir:
        """Where an evaluation of these weights writes: the run's own (``selected``), the last step's, the base
        model's (``base``, zero-shot)."""
        return {"selected": self.eval, "last": self.eval_last, "base": self.zero_shot}[weights]

    def dev_file(self, cfg: Config) -> Optional[Path]:
        """The dev set: ``data.dev_file``, or the rows ``data.dev_fraction`` took out of training."""
        if cfg.data.dev_file:
            return Path(cfg.data.dev_file)
        return self.data.dev if cfg.data.dev_fraction > 0 else None

    def load_calibration(self):
        """The run's fitted calibration (``calibration.json``), or None."""
        from llmcls.calibration import Calibration

        d = read_json(self.calibration)
        return Calibration.from_dict({k: v for k, v in d.items() if k != "report"}) if d else None

    def load_lexical(self):
        """The run's TF-IDF model (``lexical/``: fitted in training for eval.hybrid / eval.shortlist), or None."""
        from llmcls.lexical import LexicalModel

        return LexicalModel.load(self.lexical) if self.lexical.is_dir() else None


def load_trained(run_dir: str | Path, cfg: Optional[Config] = None, device: Optional[str] = None,
                 dtype=None, weights: str = "selected", merge: Optional[bool] = None):
    """Load a finished run: (model, tokenizer, config). LoRA runs load the base named in the run's config and apply
    ``adapter/``; full fine-tunes load ``model/``. ``weights``: the run's own (``selected``), the last step's kept
    by ``train.keep_last`` (``last``), or the base model alone (``base``: zero-shot, same prompt and tokenizer).
    ``cfg`` is the run's config with the caller's overrides (default: read from the run), e.g.
    ``model.device_map: auto`` to evaluate a model trained with FSDP on a single process, or
    ``model.quantize: none`` (export merges a QLoRA adapter into the unquantised base). The adapter keeps the dtype
    it trained in (:func:`llmcls.model.load.adapter_autocast`); ``merge`` (default ``eval.merge_lora``; export
    passes True) merges it into the base weights."""
    from llmcls import dist
    from llmcls.model.load import adapter_autocast, load_model, load_tokenizer, peft_quietly, resolve_model_path

    run = RunDir(run_dir)
    cfg = cfg or run.load_config()
    check_model(cfg.model, dist.world_size())
    check_task(cfg)
    if merge is None:
        check_scoring(cfg)
        merge = cfg.eval.merge_lora
    tok = load_tokenizer(cfg.model, str(run.tokenizer))
    folder = None if weights == "base" else run.weights(weights)
    if cfg.lora.task == "seq_cls":  # a classification head over the run's labels (llmcls.seqcls)
        from llmcls import seqcls

        if folder is not None and not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: did training finish (or keep those weights)?")
        labels = run.labels()
        if not labels:
            raise FileNotFoundError(f"{run.data.summary} is missing: the classification head's labels are unknown")
        model = seqcls.load(cfg, tok, labels, folder, device, dtype, adapter_name=ADAPTER_NAMES.get(weights))
    elif folder is None:
        model = load_model(cfg.model, resolve_model_path(cfg.model), device, dtype)
    elif (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        with peft_quietly():
            model = PeftModel.from_pretrained(load_model(cfg.model, resolve_model_path(cfg.model), device, dtype),
                                              # a merge computes the delta in float32 and rounds once
                                              folder, adapter_name=ADAPTER_NAMES[weights],
                                              autocast_adapter_dtype=adapter_autocast(cfg.lora) or merge)
    elif (folder / "config.json").is_file():
        model = load_model(cfg.model, str(folder), device, dtype)
    elif weights == "last":
        raise FileNotFoundError(f"{run.last} does not exist: the run kept no separate last-step weights "
                                "(train.keep_last, and only when select_best chose an earlier step)")
    else:
        raise FileNotFoundError(f"{run.path} holds neither adapter/ nor model/: did training finish? "
                                "Resume it with 'llmcls train --resume'")
    if merge and hasattr(model, "merge_and_unload"):  # a PEFT model; weights=base has no adapter to merge
        model = model.merge_and_unload()
    model.eval()
    return model, tok, cfg


# The adapter's name in the PEFT model, the same in a fresh load as in the model `llmcls run` keeps in memory: the
# name is part of every parameter's path in the compiled layer's graph, so a second name would miss the AOTAutograd
# compile cache the other path filled (seen: a fresh `llmcls eval` after `llmcls run` recompiled for 5.9 s, 7B shape).
ADAPTER_NAMES = {"selected": "llmcls_selected", "last": "llmcls_last"}


def model_for_run(run_dir: str | Path, cfg: Optional[Config] = None, model=None, tokenizer=None,
                  weights: str = "selected"):
    """(model, tokenizer, config) for eval and predict: the caller's already-loaded pair, or
    :func:`load_trained`'s; decoder layers compiled when ``eval.compile`` says so."""
    cfg = cfg or RunDir(run_dir).load_config()
    if model is None:
        model, tokenizer, cfg = load_trained(run_dir, cfg, weights=weights)
    if cfg.eval.compile:
        from llmcls.model.compiling import compile_layers

        compile_layers(model, cfg.model.compile_cache, background=cfg.eval.compile_background)
    return model, tokenizer, cfg


class TrainedInMemory:
    """The model ``llmcls run`` has just trained, kept for the evaluations that follow (the base is loaded once per
    process): a PEFT model in the state of a fresh load for scoring (:func:`llmcls.trainer.for_scoring`).
    :meth:`weights` gives it each set of weights :func:`load_trained` would load, without loading the base again:
    ``selected`` and ``last`` load the run's own adapter folder (``adapter/``, ``last/``) into the model as a
    second adapter, with the call and the dtype casting ``PeftModel.from_pretrained`` uses in :func:`load_trained`
    (a bf16 adapter stays bf16 there as here: :func:`llmcls.model.load.adapter_autocast`), the training's adapter
    is deleted; with ``merge`` the adapter is merged into the base for good, so no other weights can follow;
    ``base`` disables the adapter (PEFT's ``disable_adapter()``: a seq_cls run's head is its initial one, as
    :func:`seqcls.load` builds it). The tokenizer is the one training used, the very object it saved to the run's ``tokenizer/``, which
    :func:`load_trained` reads."""

    def __init__(self, model, tokenizer, run_dir: str | Path, cfg: Config):
        self.model, self.tokenizer, self.run, self.cfg = model, tokenizer, RunDir(run_dir), cfg
        self.merged = False

    @contextlib.contextmanager
    def weights(self, which: str = "selected", merge: bool = False):
        """A context giving ``(model, tokenizer)`` with the ``which`` weights (``selected``, ``last``, ``base``),
        the adapter merged into the base weights with ``merge`` (eval.merge_lora). Unmerging would not give the
        base back bit for bit (each weight is rounded to bf16 twice), so a merge is final: score it last."""
        if self.merged:
            raise RuntimeError("the adapter was merged into the base weights for an evaluation; the model in "
                               "memory can score no other weights now")
        if which == "base":
            with self.model.disable_adapter():
                yield self.model, self.tokenizer
            return
        folder, name = self.weights_folder(which), ADAPTER_NAMES[which]
        if name not in self.model.peft_config:
            from llmcls.model.load import adapter_autocast

            self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False,
                                    autocast_adapter_dtype=adapter_autocast(self.cfg.lora))
        self.model.set_adapter(name, inference_mode=True)
        if "default" in self.model.peft_config:  # the training's own adapter: its weights are on disk
            self.model.delete_adapter("default")
        if merge:
            check_scoring(self.cfg)
            self.model.merge_adapter()
            self.merged = True
        self.model.eval()
        yield self.model, self.tokenizer

    def weights_folder(self, which: str) -> Path:
        folder = self.run.weights(which)
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{folder} holds no adapter: did training finish (or keep those weights)?")
        return folder


# ------------------------------------------------------------------------------------------------- export
def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_META).is_file()


def read_export_meta(path: str | Path) -> dict:
    """``llmcls.json`` of an export folder, checked for the fields a server needs."""
    meta_path = Path(path) / EXPORT_META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # also a file that is not UTF-8
        raise ConfigError(f"{meta_path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if isinstance(meta, dict) and meta.get("format") == "llmcls-seq-cls":  # llmcls.recipes.export_seqcls
        raise ConfigError(f"{meta_path}: a sequence-classification export (export --as seq-cls, or a "
                          "lora.task=seq_cls run), which transformers' pipeline('text-classification') loads; "
                          "llmcls serve takes a causal-LM export or a run directory (a seq_cls run's too)")
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ConfigError(f"{meta_path} is not an llmcls export (format {found!r})")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > EXPORT_VERSION:
        raise ConfigError(f"{meta_path} has format_version {version!r}; this llmcls reads "
                          f"up to {EXPORT_VERSION}: upgrade llmcls")
    for key in ("labels", "prompt", "max_length"):
        if key not in meta:
            raise ConfigError(f"{meta_path} lacks '{key}'")
    return meta


def export_config(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> Config:
    """The config an export was made from (its ``llmcls.json``), with the caller's overrides."""
    from llmcls.config import config_from_dict

    meta = read_export_meta(path)
    tree = meta.get("config") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{Path(path) / EXPORT_META}: 'config' is not a mapping of sections")
    return config_from_dict(tree, overrides, str(Path(path) / EXPORT_META))

