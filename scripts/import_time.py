"""Where a command's start-up goes: the imports ``llmcls`` does before its model loads, measured in fresh
interpreters. Per path: the median wall time of N runs of ``python -c IMPORTS`` (interpreter exit included) and of
the process's age when the imports are done, then one ``python -X importtime`` run summed by top-level package
(``self``: the time in the package's own modules; ``cumulative``: from where the package was first imported, with
what it pulled in) and the import chain that first brought in each of the largest.

    python scripts/import_time.py                      # every path, 3 runs each
    python scripts/import_time.py run eval -n 5 --top 30

Run from the repository root with ``src`` on ``PYTHONPATH`` (or llmcls installed). The paths (:data:`PATHS`) follow
``llmcls.cli``: keep them in step with what its commands import before loading a model.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import sys
import time

_RUN = ("import llmcls.cli; from llmcls.recipes.pipeline import run; from llmcls.recipes.evaluate import "
        "eval_tracker, evaluate; from llmcls.recipes.train import train; from llmcls.rundir import TrainedInMemory; "
        "from transformers import set_seed")
_EVAL_BASE = ("import llmcls.cli; from llmcls.rundir import RunDir; from llmcls.recipes.evaluate import eval_tracker, "
              "evaluate; from llmcls.recipes.pipeline import after_eval, metrics_line; from llmcls.warmup import "
              "split_line")
PATHS = {
    "cli": "import llmcls.cli",
    # llmcls run / train: cli, the recipes' modules, and what train() imports before the tokenizer loads
    "run": _RUN,
    # llmcls eval RUN: the run's own weights are scored with the run's tracker (created before the model loads)
    "eval": _EVAL_BASE + "; from llmcls.reporting.track import Tracker",
    # llmcls eval RUN --weights base (or last): no tracker
    "eval-base": _EVAL_BASE,
}
# prints the process's age in seconds (Linux): the interpreter's start and every import
_AGE = ("\nimport os\nticks = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19])\n"
        "print(float(open('/proc/uptime').read().split()[0]) - ticks / os.sysconf('SC_CLK_TCK'))")


def _python(args: list[str], capture: str = "stdout") -> str:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{args}: exit status {p.returncode}\n{p.stderr[-2000:]}")
    return p.stdout if capture == "stdout" else p.stderr


def walls(code: str, n: int) -> tuple[list[float], list[float]]:
    """Wall seconds of ``python -c code`` and the process's age at the end of ``code``, n fresh runs each."""
    wall, age = [], []
    for _ in range(n):
        t = time.perf_counter()
        _python(["-c", code])
        wall.append(time.perf_counter() - t)
        age.append(float(_python(["-c", code + _AGE]).split()[-1]))
    return wall, age


def by_package(code: str) -> tuple[dict[str, float], dict[str, float], dict[str, int], dict[str, list[str]]]:
    """From one ``-X importtime`` run: self and cumulative seconds and module counts per top-level package, and the
    chain (importer after importee) that first imported each package from outside itself."""
    rows = []
    for line in _python(["-X", "importtime", "-c", code], capture="stderr").splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            own, cum, name = line.split(":", 1)[1].split("|", 2)
            rows.append(((len(name) - len(name.lstrip(" "))) // 2, name.strip(), int(own), int(cum)))
    # importtime prints a module after everything it imported: a row's importer is the next row less indented
    parent: list = [None] * len(rows)
    waiting: list[int] = []
    for i, (depth, *_rest) in enumerate(rows):
        while waiting and rows[waiting[-1]][0] > depth:
            parent[waiting.pop()] = i
        waiting.append(i)
    own_s: dict[str, float] = collections.Counter()
    cum_s: dict[str, float] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    chain: dict[str, list[str]] = {}
    for i, (_, name, own, cum) in enumerate(rows):
        top = name.split(".")[0]
        own_s[top] += own / 1e6
        count[top] += 1
        above, p = [], parent[i]
        while p is not None:
            above.append(rows[p][1])
            p = parent[p]
        if top not in {a.split(".")[0] for a in above}:  # the package entered from outside: its whole subtree
            cum_s[top] += cum / 1e6
            chain.setdefault(top, [name, *above])
    return own_s, cum_s, count, chain


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", metavar="PATH", help=f"Import paths: {', '.join(PATHS)} (default: all).")
    ap.add_argument("-n", type=int, default=3, help="Fresh interpreters per wall-time median (default: 3).")
    ap.add_argument("--top", type=int, default=20, help="Packages listed per path (default: 20).")
    ap.add_argument("--chains", type=int, default=8, help="Import chains shown per path (default: 8).")
    a = ap.parse_args(argv)
    unknown = [p for p in a.paths if p not in PATHS]
    if unknown:
        ap.error(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    for path in a.paths or list(PATHS):
        code = PATHS[path]
        wall, age = walls(code, a.n)
        own, cum, count, chain = by_package(code)
        print(f"## {path}: median of {a.n}: wall {statistics.median(wall):.2f} s, imports done at "
              f"{statistics.median(age):.2f} s (wall {' '.join(f'{x:.2f}' for x in wall)}; "
              f"done at {' '.join(f'{x:.2f}' for x in age)})")
        print(f"one -X importtime run: {sum(count.values())} modules, {sum(own.values()):.2f} s in them\n")
        print("| package | self s | cumulative s | modules |\n|---|---|---|---|")
        for top, s in sorted(own.items(), key=lambda kv: -kv[1])[:a.top]:
            print(f"| {top} | {s:.3f} | {cum[top]:.3f} | {count[top]} |")
        print()
        for top, _ in sorted(cum.items(), key=lambda kv: -kv[1])[:a.chains]:
            print(f"- {top} ({cum[top]:.2f} s): {' <- '.join(chain[top])}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
