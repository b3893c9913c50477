"""What serving needs from a run or an export: the model, its prompt, its labels and token budget, with the two
steps the batcher drives (``prepare`` on request threads, ``score`` on the model thread). Framework-free."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from llmcls.config import PromptConfig
from llmcls.data import Row


@dataclass
class Classifier:
    """What serving needs from a run or an export: the model, its prompt, its labels and token budget."""

    model: Any
    tokenizer: Any
    prompt: PromptConfig
    labels: Optional[list[str]]
    max_length: Optional[int]
    name: str
    kind: str                      # "run" or "export"
    calibration: Any = None        # llmcls.calibration.Calibration: calibrated probabilities, abstention threshold
    abstain_below: Optional[float] = None  # predict.abstain_below: a threshold over the calibration's
    lexical: Any = None            # llmcls.lexical.LexicalModel of a hybrid / shortlist run
    shortlist: int = 0             # eval.shortlist: candidates offered to the LLM per row (0: all)
    windows: Any = None            # llmcls.windows.WindowSettings: long texts read in windows (data.long_text)
    thresholds: Any = None         # llmcls.multilabel.Thresholds: a multi-label model's per-label thresholds
    builder: Any = field(init=False)

    def __post_init__(self):
        from llmcls.encode import PromptBuilder

        self.builder = PromptBuilder(self.tokenizer, self.prompt)
        self._local = threading.local()

    @property
    def device(self) -> str:
        from llmcls.model.load import compute_device

        return str(compute_device(self.model))

    @property
    def dtype(self) -> str:
        from llmcls.model.load import compute_dtype

        return str(compute_dtype(self.model)).replace("torch.", "")

    def prepare(self, rows: Sequence[Row]) -> list[tuple[Row, list[int], Optional[list[float]]]]:
        """Each row (cut to its shortlist, where the run has one) with its prompt ids, the text shortened to
        ``max_length`` as in training, and its candidates' TF-IDF scores (hybrid / shortlist; else None)
        (:func:`llmcls.infer.prompts_for`). Tokenising costs milliseconds of CPU per long text; done here, on the
        requests' side and on several threads, it overlaps the model's work instead of stalling it. Each thread
        has its own copy of the tokenizer: a fast tokenizer shared between threads can fail with 'Already
        borrowed'."""
        from llmcls.infer import prompts_for

        builder = getattr(self._local, "builder", None)
        if builder is None:
            import copy

            from llmcls.encode import PromptBuilder

            builder = self._local.builder = PromptBuilder(copy.deepcopy(self.tokenizer), self.prompt)
        lex: list = [None] * len(rows)
        if self.lexical is not None:  # the whole text's TF-IDF scores, read as the LLM reads it; the shortlist
            from llmcls.infer import lexical_scores

            rows, lex = lexical_scores(self.lexical, builder, rows, self.max_length, self.windows, self.shortlist)
        if self._windowed:  # a row's item holds all its windows, so one request row stays one batcher item
            from llmcls.windows import split

            return [(r, [(w.row, w.prompt) for w in ws], x)
                    for r, ws, x in zip(rows, split(builder, rows, self.max_length, self.windows), lex)]
        return list(zip(rows, prompts_for(builder, rows, self.max_length), lex))

    @property
    def _windowed(self) -> bool:
        return self.windows is not None and self.windows.active and self.max_length is not None

    def score(self, prepared: Sequence[tuple[Row, list[int]]]) -> list:
        """One :class:`llmcls.infer.Prediction` per prepared row, all in one :func:`llmcls.infer.score_batch`."""
        from llmcls.infer import score_batch, scored_prediction

        rows = [r for r, _, _ in prepared]
        if self._windowed:  # every window of every row in one forward, then one prediction per row
            from llmcls.windows import combine, regroup

            flat = [w for _, ws, _ in prepared for w in ws]
            owner = [i for i, (_, ws, _) in enumerate(prepared) for _ in ws]
            scores = score_batch(self.model, self.builder, [w for w, _ in flat], prompts=[p for _, p in flat])
            logliks = [combine(g, self.windows.combine) for g in regroup(scores, owner, len(rows))]
        else:
            logliks = score_batch(self.model, self.builder, rows, prompts=[p for _, p, _ in prepared])
        return [scored_prediction(i, r.candidates, ll, self.calibration, self.abstain_below, lex)
                for i, (r, ll, (_, _, lex)) in enumerate(zip(rows, logliks, prepared))]

    def classify(self, rows: Sequence[Row]) -> list:
        """The library's own path (:func:`llmcls.infer.classify`), for comparisons: the server uses
        :meth:`prepare` and :meth:`score`."""
        from llmcls.infer import classify

        return classify(self.model, self.builder, rows, method="score", batch_size=max(1, len(rows)),
                        max_length=self.max_length, progress=False, calibration=self.calibration,
                        abstain_below=self.abstain_below, lexical=self.lexical, shortlist=self.shortlist,
                        windows=self.windows)


def load_classifier(path: str | Path, device: Optional[str] = None, dtype=None, compile: bool = False) -> Classifier:
    """A run directory (``llmcls train``) or an export folder (``llmcls export``), told apart by their files.
    ``compile``: regional torch.compile of the decoder layers (:func:`llmcls.model.compiling.compile_layers`)."""
    clf = _load_classifier(path, device, dtype)
    if compile:
        from llmcls.model.compiling import compile_layers

        compile_layers(clf.model)
    return clf


def _load_classifier(path, device, dtype) -> Classifier:
    from llmcls.model.load import device_default, resolve_dtype
    from llmcls.rundir import EXPORT_META, RunDir, is_export, load_trained, read_export_meta

    p = Path(path)
    if is_export(p):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        meta = read_export_meta(p)
        device = device or device_default()
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype or resolve_dtype("auto", device)).to(device)
        model.eval()
        tok = AutoTokenizer.from_pretrained(p)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        from llmcls.calibration import Calibration

        from llmcls.multilabel import Thresholds

        cal = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") else None
        from llmcls.lexical import LexicalModel
        from llmcls.rundir import export_config
        from llmcls.windows import settings

        lexical = LexicalModel.load(p / meta["lexical"]) if meta.get("lexical") else None
        th = Thresholds.from_dict(meta["thresholds"]) if meta.get("thresholds") else None
        return Classifier(model, tok, PromptConfig(**meta["prompt"]), list(meta["labels"]), meta["max_length"],
                          p.resolve().name, "export", cal, lexical=lexical, shortlist=meta.get("shortlist", 0),
                          windows=settings(export_config(p)), thresholds=th)
    run = RunDir(p)
    if run.config_file.is_file():
        model, tok, cfg = load_trained(p, device=device, dtype=dtype)
        from llmcls.windows import settings

        lexical = run.load_lexical()
        return Classifier(model, tok, cfg.prompt, run.labels(), cfg.data.max_length, p.resolve().name, "run",
                          run.load_calibration(), lexical=lexical, shortlist=cfg.eval.shortlist if lexical else 0,
                          windows=settings(cfg), thresholds=run.load_thresholds(cfg) if run.multi_label else None)
    raise FileNotFoundError(f"{p} is neither a run directory (config.yaml) nor an export ({EXPORT_META})")


