"""Run bad input through the real ``llmcls`` command and record how each case ends (issue 18).

    python scripts/probe.py            every case, a table
    python scripts/probe.py --fast     only the cases that load no model library (what tests/test_probe.py runs)
    python scripts/probe.py --json     one JSON object per case

Each case runs ``python -m llmcls.cli ...`` in a fresh temporary folder holding small input files (a fake run
directory where one is needed: a ``config.yaml`` is all a command reads before it refuses). Recorded per case: the
exit status, stderr's line count, whether a traceback was printed, files created, changed or removed outside the
command's own output, ``*.tmp`` files left anywhere, and the wall time. ``expect`` is the exit status the case
should end with; ``ok`` says whether everything held (status, one stderr line, no traceback, nothing touched outside
the output, no ``*.tmp``). Cases on a read-only folder or a full disk mount a small tmpfs, so they need root (a
root process ignores file permissions, so a read-only mount is the only honest test); elsewhere they are skipped
with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
ROW = {"text": "the football match was won", "category": ["Sport", "Politics"], "output": "Sport"}


@dataclass
class Case:
    name: str
    args: list[str]
    expect: int = 2
    fast: bool = True          # loads no model library: well under two seconds once start-up is light
    setup: Optional[Callable[[Path], None]] = None
    output: tuple[str, ...] = ()  # paths (relative to the folder) the command may create or change
    needs_mount: str = ""      # "ro" or "full": a tmpfs mounted at ./mnt
    stdout_has: tuple[str, ...] = ()  # for cases that succeed: what stdout must show
    env: dict = field(default_factory=dict)


def _jsonl(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _run_dir(folder: Path) -> None:
    """A fake run: the config.yaml every command on a run reads first (and refuses on) before loading anything."""
    sys.path.insert(0, str(ROOT / "src"))
    from llmcls.config import load_config, save_config

    (folder / "RUN").mkdir()
    save_config(load_config(None, {"model.name_or_path": "tiny", "train.output_dir": str(folder / "RUN"),
                                   "data.test_file": str(folder / "test.jsonl")}), folder / "RUN" / "config.yaml")
    _jsonl(folder / "test.jsonl", [json.dumps(ROW)])


def _export(meta: str) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        (folder / "EXPORT").mkdir()
        (folder / "EXPORT" / "llmcls.json").write_text(meta, encoding="utf-8")
    return setup


def _bad_rows(folder: Path) -> None:
    _jsonl(folder / "bad.jsonl", ['{"text": "a\\ud800b", "category": ["Sport", "Politics"], "output": "Sport"}',
                                  "[" * 100_000 + "]" * 100_000,
                                  '{"text": "t", "n": ' + "9" * 5000 + ', "category": ["Sport"], "output": "Sport"}',
                                  *[json.dumps(ROW)] * 2])


def _labelled(folder: Path) -> None:
    rows = [json.dumps({"text": f"{w} {w} text {i}", "category": ["Sport", "Politics"],
                        "output": "Sport" if w == "football" else "Politics"})
            for i in range(40) for w in ("football", "election")]
    _jsonl(folder / "train.jsonl", rows)
    _jsonl(folder / "test.jsonl", rows[:20])


def _source(folder: Path) -> None:
    rows = [json.dumps({"text": f"text number {i} " * 4, "category": ["A", "B", "C"], "output": "ABC"[i % 3]})
            for i in range(120)]
    _jsonl(folder / "src" / "train.jsonl", rows)
    _jsonl(folder / "src" / "test.jsonl", rows[:30])


CASES = [
    # 1. values out of range, checked before anything loads
    Case("train batch_size 0", ["train", "--train.batch_size", "0"]),
    Case("train batch_size negative", ["train", "--train.batch_size", "-4"]),
    Case("train grad_accum 0", ["train", "--train.grad_accum", "0"]),
    Case("train lr negative (argparse reads it as a value)", ["train", "--train.lr", "-1e-3"]),
    Case("lora r 0", ["train", "--lora.r", "0"]),
    Case("unknown scheduler", ["train", "--train.lr_scheduler", "cosin"]),
    Case("template names a missing field", ["train", "--prompt.user_template", "Text: {txt}"]),
    Case("template with an open brace", ["train", "--prompt.user_template", "Text: {text"]),
    Case("dry-run with batch 0", ["train", "--dry-run", "--train.batch_size", "0"]),
    Case("eval batch_size 0", ["eval", "RUN", "--eval.batch_size", "0"], setup=_run_dir),
    Case("eval batch_size negative", ["eval", "RUN", "--batch-size", "-2"], setup=_run_dir),
    Case("serve --max-batch 0", ["serve", "RUN", "--max-batch", "0"], setup=_run_dir),
    Case("unknown option", ["train", "--train.bach_size", "4"]),
    Case("config is a directory", ["train", "--config", "RUN"], setup=_run_dir),
    Case("config is not YAML", ["train", "--config", "bad.yaml"],
         setup=lambda d: (d / "bad.yaml").write_bytes(b"train: [\xff\n")),
    Case("predict -o DIR --overwrite", ["predict", "RUN", "-o", "RUN", "--overwrite"], setup=_run_dir),
    Case("export llmcls.json broken", ["serve", "EXPORT"], setup=_export("{not json")),
    Case("export llmcls.json of another format", ["serve", "EXPORT"], setup=_export('{"format": "other"}')),
    Case("export llmcls.json a list", ["serve", "EXPORT"], setup=_export("[1, 2]")),
    Case("run directory missing", ["eval", "NOPE"]),
    Case("eval test file is a directory", ["eval", "RUN", "--data.test_file", "RUN"], setup=_run_dir),
    Case("predict --input DIR", ["predict", "RUN", "--input", "RUN"], setup=_run_dir),
    Case("train data file missing", ["train", "--data.train_file", "nope.jsonl"]),
    Case("prepare --train missing", ["prepare", "--train", "nope.jsonl", "--model.name_or_path", "tiny"]),
    # 5. nonsense accepted silently before
    Case("epochs 0", ["train", "--train.epochs", "0"]),
    Case("eval --max-rows 0", ["eval", "RUN", "--max-rows", "0"], setup=_run_dir),
    Case("predict --labels with an empty label", ["predict", "RUN", "--labels", "A,,B"], setup=_run_dir),
    Case("predict --labels bad JSON list", ["predict", "RUN", "--labels", '["A", 3]'], setup=_run_dir),
    # data: rows a tokenizer or the JSON parser cannot take (needs the tokenizer: not fast)
    Case("prepare: surrogate, deep nesting, huge int", ["prepare", "--model.name_or_path", "tiny", "--train",
         "bad.jsonl", "--out", "OUT"], setup=_bad_rows, fast=False, output=("OUT",)),
    Case("prepare --skip-invalid counts them and duplicates", ["prepare", "--model.name_or_path", "tiny", "--train",
         "bad.jsonl", "--out", "OUT", "--skip-invalid", "--json"], setup=_bad_rows, fast=False, expect=0,
         output=("OUT",), stdout_has=('"invalid": 3', '"duplicates": 1')),
    Case("baseline --train DIR", ["baseline", "--train", "RUN", "--test", "test.jsonl"], setup=_run_dir),
    # writing where nothing can be written
    Case("read-only output folder", ["make-dataset", "multilabel", "--source", "src", "--out", "mnt/out"],
         setup=_source, needs_mount="ro"),
    Case("full disk", ["make-dataset", "multilabel", "--source", "src", "--out", "mnt/out"], setup=_source,
         needs_mount="full", output=("mnt",)),
    Case("baseline --out on a read-only folder", ["baseline", "--train", "train.jsonl", "--test", "test.jsonl",
         "--out", "mnt/out"], setup=_labelled, needs_mount="ro"),
    Case("prepare --out on a read-only folder", ["prepare", "--model.name_or_path", "tiny", "--train", "train.jsonl",
         "--out", "mnt/out"], setup=_labelled, needs_mount="ro"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


@contextlib.contextmanager
def _mount(folder: Path, kind: str):
    mnt = folder / "mnt"
    mnt.mkdir()
    opts = "ro,size=64k" if kind == "ro" else "size=8k"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        yield f"cannot mount a tmpfs ({r.stderr.strip() or 'mount failed'})"
        return
    try:
        yield ""
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def skip_reason(case: Case) -> str:
    if case.needs_mount and (os.name != "posix" or os.geteuid() != 0):
        return ("needs root to mount a tmpfs (read-only or full); a non-root chmod test would not show the disk-full "
                "case, and root ignores permissions")
    return ""


def run_case(case: Case, python: str = sys.executable, timeout: float = 120) -> dict:
    rec = {"case": case.name, "expect": case.expect, "fast": case.fast}
    reason = skip_reason(case)
    if reason:
        return {**rec, "skipped": reason}
    with tempfile.TemporaryDirectory(prefix="llmcls-probe-") as tmp:
        folder = Path(tmp)
        if case.setup:
            case.setup(folder)
        with contextlib.ExitStack() as stack:
            if case.needs_mount:
                reason = stack.enter_context(_mount(folder, case.needs_mount))
                if reason:
                    return {**rec, "skipped": reason}
            before = _snapshot(folder)
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **case.env}
            env.pop("LLMCLS_DEBUG", None)
            t0 = time.perf_counter()
            p = subprocess.run([python, "-m", "llmcls.cli", *case.args], cwd=folder, env=env, capture_output=True,
                               text=True, timeout=timeout)
            wall = time.perf_counter() - t0
            after = _snapshot(folder)
        own = tuple(case.output)
        outside = sorted(k for k in set(before) | set(after)
                         if before.get(k) != after.get(k) and not k.startswith(own or ("\0",)))
        tmps = sorted(k for k in after if k.endswith(".tmp") or ".tmp" in Path(k).name)
    err = [line for line in p.stderr.splitlines() if line.strip()]
    # warnings the libraries log are not our errors; the error line is the last one
    rec.update({"rc": p.returncode, "stderr_lines": len(err), "stderr": err[-1] if err else "",
                "traceback": "Traceback (most recent call last)" in p.stderr, "changed_outside": outside,
                "tmp_left": tmps, "wall_s": round(wall, 2)})
    if case.expect == 0:
        rec["ok"] = (p.returncode == 0 and all(s in p.stdout for s in case.stdout_has) and not rec["traceback"]
                     and not tmps)
    else:
        rec["ok"] = (p.returncode == case.expect and len(err) == 1 and not rec["traceback"] and not outside
                     and not tmps)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="Only the cases that load no model library.")
    ap.add_argument("--json", action="store_true", help="One JSON object per case.")
    args = ap.parse_args(argv)
    bad = 0
    for case in CASES:
        if args.fast and not case.fast:
            continue
        rec = run_case(case)
        bad += rec.get("ok") is False
        if args.json:
            print(json.dumps(rec, ensure_ascii=False), flush=True)
        elif "skipped" in rec:
            print(f"SKIP {case.name}: {rec['skipped']}", flush=True)
        else:
            print(f"{'ok  ' if rec['ok'] else 'FAIL'} {case.name}: rc {rec['rc']} (want {case.expect}), "
                  f"{rec['stderr_lines']} stderr line(s), traceback {rec['traceback']}, changed outside "
                  f"{rec['changed_outside'] or 'nothing'}, tmp {rec['tmp_left'] or 'none'}, {rec['wall_s']} s\n"
                  f"     {rec['stderr']}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
