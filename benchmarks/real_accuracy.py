"""What llmcls's classifier is worth on a real pretrained chat model: zero-shot, last step, best step by dev macro-F1,
calibrated, beside the TF-IDF baseline, on the same test rows (issue 14's numbers).

On the GPU machine (the model from ``../shared/tools/real-qwen.sh hf``, the Fudan development data)::

    python benchmarks/real_accuracy.py run --model DIR --data DIR --out OUT [--config configs/...-fast.yaml]

trains with the config (default: the fast one) plus the settings of a trusted classifier (a stratified 10% dev
split, dev scoring every 50 steps, best weights by dev macro-F1, the last step kept for comparison, temperature
scaling, an abstention threshold for 99.5% precision), evaluates the selected, last and base weights on the test
file, scores the dev set once more with the selected weights (so that other calibrations can be fitted from the
stored log-likelihoods without a GPU), and writes ``OUT/real_accuracy.json`` and ``OUT/run-files.tar.gz``.

Here, without a GPU::

    python benchmarks/real_accuracy.py table OUT/real_accuracy.json [--files OUT/run-files.tar.gz]
        [--baseline DIR] > docs/ACCURACY.md-part

prints the table: accuracy, macro-F1, ECE, Brier, NLL, coverage at 99.5% precision, for each set of weights, with
vector scaling fitted from the stored dev log-likelihoods beside temperature scaling, and the baseline's figures
(``llmcls baseline --out DIR`` on the same files).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

from llmcls.config import load_config
from llmcls.env import environment
from llmcls.files import atomic_write_json
from llmcls.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
TRUSTED = {  # what a classifier one can trust adds to the speed config; each is an issue-14 setting
    "data.dev_fraction": 0.1, "data.split_seed": 0, "eval.every_steps": 50, "train.select_best": "macro_f1",
    "train.keep_last": True, "eval.zero_shot": True, "calibration.method": "temperature",
    "calibration.target_precision": 0.995,
    "track.tracker": "none",  # no tracker on the GPU machine (no swanlab there)
}


def run(a) -> None:
    from llmcls.data import read_rows
    from llmcls.infer import classify_with
    from llmcls.recipes.pipeline import run as run_pipeline
    from llmcls.rundir import load_trained

    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.workdir)
    overrides = {**TRUSTED, "model.name_or_path": a.model, "model.source": "local",
                 "data.train_file": str(data / "train.jsonl"), "data.test_file": str(data / "test.jsonl"),
                 "train.output_dir": str(work / "run"), **dict(kv.split("=", 1) for kv in a.set)}
    cfg = load_config(a.config, overrides)
    t0 = time.perf_counter()
    run_pipeline(cfg, overwrite=True, with_baseline=False)
    wall = time.perf_counter() - t0
    rd = RunDir(cfg.train.output_dir)

    # the dev set once more with the selected weights: its log-likelihoods let any calibration be fitted later
    saved = rd.load_config()
    model, tok, saved = load_trained(rd.path, saved)
    rows, _ = read_rows(rd.dev_file(saved), saved.data)
    preds = classify_with(saved, model, tok, rows, method="score", desc="dev", lexical=rd.load_lexical())
    with open(rd.path / "dev-logliks.jsonl", "w", encoding="utf-8") as fh:
        for r, p in zip(rows, preds):
            fh.write(json.dumps({"line": r.line, "truth": r.label, "candidates": r.candidates,
                                 "logliks": p.logliks, "lexical": p.lexical}, ensure_ascii=False) + "\n")

    def metrics(results):
        if not results.metrics.is_file():  # eval-last: absent where the run kept its last step
            return None
        m = json.loads(results.metrics.read_text())
        return {k: m.get(k) for k in ("rows", "accuracy", "macro_f1", "calibration", "rows_per_s", "weights")}

    def llm_alone(results):
        """The selected weights' LLM alone (argmax of its log-likelihoods), where eval applied a hybrid."""
        from llmcls.metrics import compute_metrics

        recs = [json.loads(line) for line in results.predictions.read_text().splitlines()]
        preds = [max(zip(r["logliks"], r["probs"]))[1] for r in recs]
        m = compute_metrics([r["truth"] for r in recs], preds, sorted({r["truth"] for r in recs}))
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    summary = json.loads(rd.train_summary.read_text())
    result = {
        "config": a.config, "overrides": overrides, "wall_s": round(wall, 1),
        "train": {k: summary.get(k) for k in ("global_step", "wall_s", "tokens_per_s", "peak_mem_gib", "rows")},
        "selection": summary.get("selection"), "calibration": summary.get("calibration"),
        "test": {"zero_shot": metrics(rd.zero_shot), "last": metrics(rd.eval_last),
                 "selected": metrics(rd.eval), "selected_llm_alone": llm_alone(rd.eval)},
        "environment": environment(),
    }
    atomic_write_json(out / "real_accuracy.json", result)
    with tarfile.open(out / "run-files.tar.gz", "w:gz") as tar:  # what the table needs, small enough to return
        for p in [rd.train_log, rd.train_summary, rd.calibration, rd.data.summary, rd.path / "dev-logliks.jsonl",
                  rd.eval.predictions, rd.eval.metrics, rd.eval_last.predictions, rd.eval_last.metrics,
                  rd.zero_shot.metrics, rd.config_file]:
            if p.is_file():
                tar.add(p, arcname=str(p.relative_to(rd.path)))
    if a.keep_weights:  # small LoRA weights come back, so later runs can evaluate them without training again
        import shutil

        shutil.copytree(rd.weights("selected"), out / "weights", dirs_exist_ok=True)
        shutil.copy(rd.config_file, out / "weights" / "run-config.yaml")
        shutil.copy(rd.data.summary, out / "weights" / "prepare.json")
    print(json.dumps({k: result[k] for k in ("wall_s", "train", "test")}, indent=1))


# -------------------------------------------------------------------------------------------------- table
def _oracle_coverage(probs: list[list[float]], cands: list[list[str]], truth: list[str], target: float = 0.995):
    """Coverage at ``target`` precision with the threshold chosen on these very rows (the best any threshold can
    do on them), and whether ``target`` is reachable at all."""
    from llmcls.calibration import UnreachablePrecision, confidences, threshold_for_precision

    conf, correct = confidences(probs, cands, truth)
    try:
        return threshold_for_precision(conf, correct, target)[1]
    except UnreachablePrecision:
        return 0.0


def table(a) -> None:
    from llmcls.calibration import Calibration, fit_vector_scaling, summary

    res = json.loads(Path(a.result).read_text())
    files = {}
    if a.files:
        with tarfile.open(a.files) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    files[m.name] = tar.extractfile(m).read().decode("utf-8")
    jl = lambda name: [json.loads(l) for l in files.get(name, "").splitlines() if l.strip()]  # noqa: E731
    sel, dev = jl("eval/predictions.jsonl"), jl("dev-logliks.jsonl")
    t, s = res["test"], res["selection"]
    cal = t["selected"]["calibration"]
    rows = []

    def row(name, m, q=None, note=""):
        q = q or {}
        rows.append(f"| {name} | {m['accuracy']:.4f} | " + (f"{m['macro_f1']:.4f}" if m.get("macro_f1") else "")
                    + " | " + " | ".join(f"{q[k]:.4f}" if k in q else "" for k in ("ece", "brier", "nll"))
                    + f" | {note} |")

    # the eval's own before/after figures: computed from unrounded probabilities (predictions.jsonl rounds them)
    row("zero-shot (base model, same prompt)", t["zero_shot"], t["zero_shot"]["calibration"]["before"])
    if t["last"]:  # absent where selection kept the last step: then "selected" is the last step
        row(f"last step ({res['train']['global_step']})", t["last"], t["last"]["calibration"]["before"])
    row(f"selected by dev macro-F1 (step {s['step']}, {s['source']})", t["selected"], cal["before"])
    ab = cal.get("abstention") or {}
    row(f"best + temperature scaling (T = {cal['temperature']:.3f})", t["selected"], cal["after"],
        f"threshold from the dev set ({ab.get('target_precision')}): {ab.get('coverage', 0):.1%} of test rows "
        f"answered at precision {ab.get('precision') or 0:.4f}")
    lines = []
    if sel:
        cands, truth = [list(p["probs"]) for p in sel], [p["truth"] for p in sel]
        logliks = [p["logliks"] for p in sel]
        raw = Calibration().probs(logliks, cands)
        temp = Calibration(temperature=cal["temperature"]).probs(logliks, cands)
        lines.append(f"Coverage at 99.5% precision with the threshold chosen on the test rows themselves (the best "
                     f"any threshold can do): {_oracle_coverage(raw, cands, truth):.1%} uncalibrated, "
                     f"{_oracle_coverage(temp, cands, truth):.1%} with temperature scaling.")
        if dev:
            vec = fit_vector_scaling([d["logliks"] for d in dev], [d["candidates"] for d in dev],
                                     [d["truth"] for d in dev], sorted({d["truth"] for d in dev}))
            q = summary(vec.probs(logliks, cands), cands, truth)
            row(f"best + vector scaling (T = {vec.temperature:.3f}, {sum(1 for v in vec.bias.values() if v)} "
                "label biases; fitted here from the stored dev log-likelihoods)", {"accuracy": q["accuracy"]}, q)
            dev_err = sum(1 for d in dev if d["candidates"][max(range(len(d["logliks"])),
                                                                 key=d["logliks"].__getitem__)] != d["truth"])
            lines.append(f"Dev set: {len(dev)} rows, {dev_err} wrong with the selected weights; test: {len(sel)} "
                         f"rows, {sum(1 for p in sel if not p['correct'])} wrong.")
    if a.baseline:
        b = json.loads((Path(a.baseline) / "metrics.json").read_text())
        row("TF-IDF + linear SVM, restricted to each row's candidates", b["candidates"])
        row("TF-IDF + linear SVM, all labels", b["all_labels"])
    print("| weights | accuracy | macro-F1 | ECE | Brier | NLL | |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if lines:
        print("\n" + "\n\n".join(lines))


# -------------------------------------------------------------------------------------------------- compare
def _seed(res: dict) -> str:
    return str(res["overrides"].get("train.seed", "42"))  # the config's own seed where none was set


def paired(a_results: list[dict], b_results: list[dict], weights: str = "last") -> dict:
    """Two settings trained with the same seeds (same data split, same batches' order): accuracy and macro-F1
    of ``weights`` ("last" = the tutorial's recipe as it ends, or "selected") per seed, each side's mean and the
    mean of the paired differences, B - A, in points. The last weights are the selected ones where selection
    kept the last step (then the run stored no separate "last")."""
    pick = lambda r: r["test"][weights] or r["test"]["selected"]  # noqa: E731
    a, b = {_seed(r): pick(r) for r in a_results}, {_seed(r): pick(r) for r in b_results}
    if len(a) != len(a_results) or len(b) != len(b_results):
        raise SystemExit("compare: two results of one side share a seed")
    seeds = sorted(set(a) & set(b), key=int)
    if not seeds:
        raise SystemExit(f"compare: no seed on both sides (A: {sorted(a)}, B: {sorted(b)})")
    rows = [{"seed": s, **{f"{side}_{k}": 100 * m[k] for side, m in (("a", a[s]), ("b", b[s]))
                           for k in ("accuracy", "macro_f1")}} for s in seeds]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    out = {"weights": weights, "seeds": seeds, "rows": rows}
    for k in ("accuracy", "macro_f1"):
        out[f"a_{k}"], out[f"b_{k}"] = mean(f"a_{k}"), mean(f"b_{k}")
        out[f"diff_{k}"] = out[f"b_{k}"] - out[f"a_{k}"]
        out[f"worst_diff_{k}"] = min(r[f"b_{k}"] - r[f"a_{k}"] for r in rows)
    return out


def compare(a) -> None:
    load = lambda paths: [json.loads(Path(x).read_text()) for x in paths]  # noqa: E731
    res = {w: paired(load(a.a), load(a.b), w) for w in ("last", "selected")}
    lines = [f"| weights | seed | {a.a_name} accuracy | {a.b_name} accuracy | {a.a_name} macro-F1 | "
             f"{a.b_name} macro-F1 |", "|---|---|---|---|---|---|"]
    for w, r in res.items():
        for row in r["rows"]:
            lines.append(f"| {w} | {row['seed']} | {row['a_accuracy']:.2f} | {row['b_accuracy']:.2f} | "
                         f"{row['a_macro_f1']:.2f} | {row['b_macro_f1']:.2f} |")
        lines.append(f"| {w} | **mean** | **{r['a_accuracy']:.2f}** | **{r['b_accuracy']:.2f}** | "
                     f"**{r['a_macro_f1']:.2f}** | **{r['b_macro_f1']:.2f}** |")
    lines += ["", *(f"{w}: {a.b_name} - {a.a_name}, mean of the paired differences: accuracy "
                    f"{r['diff_accuracy']:+.2f} pt (worst seed {r['worst_diff_accuracy']:+.2f}), macro-F1 "
                    f"{r['diff_macro_f1']:+.2f} pt (worst seed {r['worst_diff_macro_f1']:+.2f})"
                    for w, r in res.items())]
    if a.json:
        atomic_write_json(Path(a.json), {"a": {"name": a.a_name, "results": a.a},
                                         "b": {"name": a.b_name, "results": a.b}, **res})
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="Train, evaluate and calibrate on the GPU machine.")
    r.add_argument("--model", required=True, help="Hugging Face folder of the pretrained chat model.")
    r.add_argument("--data", required=True, help="Folder with train.jsonl and test.jsonl (Fudan dev data).")
    r.add_argument("--out", required=True, help="Where real_accuracy.json and run-files.tar.gz go.")
    r.add_argument("--config", default=str(ROOT / "configs" / "qwen1.5-7b-chat-fudan-fast.yaml"))
    r.add_argument("--workdir", default="/tmp/llmcls-real", help="Run directory parent (default: %(default)s).")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="More config overrides.")
    r.add_argument("--keep-weights", action="store_true", help="Copy the selected weights (LoRA) to OUT/weights.")
    r.set_defaults(func=run)
    t = sub.add_parser("table", help="The markdown table from a result (no GPU needed).")
    t.add_argument("result")
    t.add_argument("--files", help="run-files.tar.gz from the same run.")
    t.add_argument("--baseline", help="Folder of 'llmcls baseline --out' on the same train/test files.")
    t.set_defaults(func=table)
    c = sub.add_parser("compare", help="Two settings over the same seeds, paired (no GPU needed).")
    c.add_argument("--a", nargs="+", required=True, help="real_accuracy.json of the reference (e.g. bf16).")
    c.add_argument("--b", nargs="+", required=True, help="real_accuracy.json of the setting compared (e.g. FP8).")
    c.add_argument("--a-name", default="A")
    c.add_argument("--b-name", default="B")
    c.add_argument("--json", help="Also write the comparison here.")
    c.set_defaults(func=compare)
    a = p.parse_args(argv)
    a.func(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
