"""The TF-IDF + SVM baseline: metrics recomputed by brute force from its own predictions file, the candidate
restriction doing what it says, the CLI, and (opt-in, ~1-2 min) the reference numbers on ../shared Fudan news."""

import json
import os
import random

import pytest

from conftest import FUDAN, KEYWORDS, LABELS, learnable_rows, write_jsonl


def confusing_rows(n: int, seed: int) -> tuple[list[dict], set[int]]:
    """Learnable rows where a third also carry another label's keyword, three times: the all-labels SVM follows
    the louder decoy (wrong); restricted to candidates it is right whenever the decoy is not among them."""
    rng = random.Random(seed)
    rows, swapped = learnable_rows(n, seed), set()
    for i, r in enumerate(rows):
        if rng.random() < 0.33:
            other = rng.choice([x for x in LABELS if x != r["output"]])
            r["text"] += f" {KEYWORDS[other]}" * 3
            swapped.add(i)
    return rows, swapped


def macro_f1_by_hand(truth, pred, labels):
    f1s = []
    for c in labels:
        tp = sum(t == c and p == c for t, p in zip(truth, pred))
        fp = sum(t != c and p == c for t, p in zip(truth, pred))
        fn = sum(t == c and p != c for t, p in zip(truth, pred))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


@pytest.fixture(scope="module")
def confusing(tmp_path_factory):
    d = tmp_path_factory.mktemp("confusing")
    test, swapped = confusing_rows(90, 7)
    return {"train": write_jsonl(d / "train.jsonl", learnable_rows(240, 1)), "test": write_jsonl(d / "test.jsonl", test),
            "rows": test, "swapped": swapped, "dir": d}


def test_baseline_metrics_recomputed_by_hand(confusing, tmp_path, capsys):
    from llmcls.cli import main

    out = tmp_path / "bl"
    assert main(["baseline", "--train", str(confusing["train"]), "--test", str(confusing["test"]),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "baseline: svm" in err and "baseline: tf-idf train" in err  # progress bars (tqdm, on stderr)

    m = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    rows = confusing["rows"]
    assert len(preds) == len(rows) == m["test_rows"] == 90
    truth = [r["output"] for r in rows]
    labels = sorted(LABELS)
    assert m["labels"] == labels

    # Re-derive both predictions from the stored decision values, then the metrics, without scikit-learn.
    pred_all = [max(p["scores"], key=p["scores"].get) for p in preds]
    pred_cand = [max(r["category"], key=p["scores"].get) for p, r in zip(preds, rows)]
    assert pred_all == [p["pred"] for p in preds]
    assert pred_cand == [p["pred_candidates"] for p in preds]
    for key, pred in (("all_labels", pred_all), ("candidates", pred_cand)):
        acc = sum(t == p for t, p in zip(truth, pred)) / len(truth)
        assert m[key]["accuracy"] == pytest.approx(acc, abs=1e-12), key
        assert m[key]["macro_f1"] == pytest.approx(macro_f1_by_hand(truth, pred, labels), abs=1e-12), key
        assert sum(map(sum, m[key]["confusion_matrix"]["matrix"])) == len(rows)

    # The data is built so the restriction matters: it must fix the swapped rows whose decoy label is no candidate.
    swapped = confusing["swapped"]
    decoy_absent = [i for i in swapped if pred_all[i] not in rows[i]["category"]]
    assert len(decoy_absent) >= 5
    assert all(pred_cand[i] == truth[i] for i in decoy_absent)
    assert sum(pred_all[i] != truth[i] for i in swapped) >= 0.8 * len(swapped)  # the SVM follows the decoy
    assert all(pred_all[i] == truth[i] for i in range(len(rows)) if i not in swapped)
    assert m["candidates"]["accuracy"] > m["all_labels"]["accuracy"] + 0.1


def test_baseline_agrees_with_sklearn_multiclass_svm(confusing):
    """The per-label loop (for an honest ETA) is LinearSVC's own one-vs-rest: same predictions."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    from llmcls.recipes.baseline import baseline

    m = baseline(confusing["train"], confusing["test"], out_dir=confusing["dir"] / "bl2", progress=False)
    train = [json.loads(line) for line in confusing["train"].read_text().splitlines()]
    ref = make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True),
                        LinearSVC(C=2.0, random_state=0))
    ref.fit([r["text"] for r in train], [r["output"] for r in train])
    ref_pred = ref.predict([r["text"] for r in confusing["rows"]])
    ours = [json.loads(line)["pred"] for line in (confusing["dir"] / "bl2" / "predictions.jsonl").read_text()
            .splitlines()]
    agree = sum(a == b for a, b in zip(ours, ref_pred)) / len(ours)
    assert agree >= 0.98, agree
    assert m["all_labels"]["accuracy"] == pytest.approx(
        sum(p == r["output"] for p, r in zip(ref_pred, confusing["rows"])) / len(ours), abs=0.02)


def test_baseline_cli_refuses_to_overwrite(confusing, tmp_path, capsys):
    from llmcls.cli import main

    out = tmp_path / "bl"
    args = ["baseline", "--train", str(confusing["train"]), "--test", str(confusing["test"]), "--out", str(out)]
    assert main(args + ["--json"]) == 0
    first = (out / "metrics.json").read_text()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == first
    assert main(args + ["--overwrite", "--json"]) == 0


@pytest.mark.skipif(not (FUDAN / "train.jsonl").is_file(), reason="needs ../shared/data/fudan-news")
@pytest.mark.skipif(os.environ.get("LLMCLS_SLOW_TESTS") != "1",
                    reason="takes 1-2 min on 2 cores; set LLMCLS_SLOW_TESTS=1 to check the reference numbers")
def test_baseline_reproduces_fudan_reference(tmp_path):
    from llmcls.recipes.baseline import baseline

    m = baseline(FUDAN / "train.jsonl", FUDAN / "test.jsonl", tmp_path / "bl", progress=False)
    assert (m["train_rows"], m["test_rows"], len(m["labels"])) == (6675, 1669, 20)
    # Reference (../shared/README.md): 92.3% / 0.78 over all labels, 98.7% / 0.96 restricted to candidates.
    assert m["all_labels"]["accuracy"] == pytest.approx(0.923, abs=0.003)
    assert m["all_labels"]["macro_f1"] == pytest.approx(0.78, abs=0.01)
    assert m["candidates"]["accuracy"] == pytest.approx(0.987, abs=0.003)
    assert m["candidates"]["macro_f1"] == pytest.approx(0.96, abs=0.01)


def test_the_baseline_reads_what_the_llm_reads(trained_run, learnable_data, tmp_path, capsys):
    """baseline.text: 'same' cuts each text exactly as the run's prompt fitting does (llmcls run's default), a
    number reads that many leading characters, 'whole' everything; the metrics record which."""
    from llmcls.cli import main
    from llmcls.data import read_rows
    from llmcls.encode import PromptBuilder
    from llmcls.infer import prompts_for
    from llmcls.recipes.baseline import view_of_run
    from llmcls.rundir import RunDir, load_trained

    run = RunDir(trained_run)
    cfg = run.load_config({"data.max_length": 80})  # a short budget, so that texts are cut
    rows, _ = read_rows(learnable_data["test"], cfg.data)
    _, tok, _ = load_trained(run.path, cfg)
    builder = PromptBuilder(tok, cfg.prompt)
    seen = view_of_run(run.path)(rows)  # with the run's own max_length (128): nothing to cut on these rows
    assert [r.text for r in seen] == [r.text for r in rows]
    from llmcls.infer import as_read

    cut = as_read(builder, rows, 80)
    assert any(len(c.text) < len(r.text) for c, r in zip(cut, rows))
    assert [builder.prompt_ids(c) for c in cut] == prompts_for(builder, rows, 80)  # the very prompts scored
    for text, want in (("12", 12.0), ("whole", None)):
        out = tmp_path / text
        assert main(["baseline", "--train", str(learnable_data["train"]), "--test", str(learnable_data["test"]),
                     "--out", str(out), "--baseline.text", text, "--json"]) == 0
        m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert m["text"] == text
        if want:
            assert m["mean_test_chars_read"] <= want
    assert main(["baseline", "--train", str(learnable_data["train"]), "--test", str(learnable_data["test"]),
                 "--run", str(trained_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"] == "same"
    assert main(["baseline", "--train", str(learnable_data["train"]), "--test", str(learnable_data["test"]),
                 "--baseline.text", "same"]) == 2  # what the LLM reads needs a run


def test_the_baseline_in_its_own_process_gives_the_same_result(trained_run, tmp_path):
    """`llmcls run` on a GPU trains the baseline in a process of its own while it evaluates (start_baseline, then
    after_eval waits for it): RUN/baseline holds what the same baseline computed in this process gives (same
    predictions, same decision values, same metrics), and the summary line and the report follow. On a CPU-only
    machine nothing would overlap, so the run computes it in-process, as the fixture's run did."""
    import shutil

    from llmcls.recipes.baseline import baseline_of_run
    from llmcls.recipes.pipeline import after_eval, start_baseline
    from llmcls.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = RunDir(run).load_config()
    shutil.rmtree(run / "baseline")
    (run / "report.html").unlink()
    here = baseline_of_run(run, cfg, progress=False)
    here_preds = (run / "baseline" / "predictions.jsonl").read_text()
    shutil.rmtree(run / "baseline")
    assert start_baseline(RunDir(run), cfg, overlap=False) is None
    job = start_baseline(RunDir(run), cfg, overlap=True)
    assert job is not None
    lines: list[str] = []
    after_eval(run, cfg, echo=lines.append, baseline_job=job)
    assert (run / "baseline" / "predictions.jsonl").read_text() == here_preds
    child = json.loads((run / "baseline" / "metrics.json").read_text())
    for key in ("all_labels", "candidates"):
        assert child[key] == here[key], key
    assert child["text"] == "same" and child["test_rows"] == 60
    assert lines[0].startswith("baseline (240 train / 60 test rows") and lines[1].startswith("report: ")
    assert (run / "report.html").is_file()
    # and the fixture's own run (computed in-process on this CPU) is that result too
    assert (trained_run / "baseline" / "predictions.jsonl").read_text() == here_preds


def test_a_failing_background_baseline_says_why_and_stop_ends_it(trained_run, tmp_path):
    import dataclasses

    from llmcls.recipes.baseline import BaselineProcess
    from llmcls.rundir import RunDir

    cfg = RunDir(trained_run).load_config()
    gone = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_file=str(tmp_path / "nope.jsonl")))
    with pytest.raises(RuntimeError, match="nope.jsonl"):
        BaselineProcess(trained_run, gone).result()
    # stop() before the result: the child is ended, nothing is left running
    job = BaselineProcess(trained_run, cfg)
    job.stop()
    assert job._proc.poll() is not None


def test_the_background_baseline_does_not_run_the_callers_script_again(trained_run, tmp_path):
    """A script that starts the baseline's process at its top level, with no `if __name__ == "__main__"` guard (as
    a user's script calling llmcls.recipes.pipeline.run may): the child must not import it again, which would run
    the script's job a second time (multiprocessing's spawn does that)."""
    import subprocess
    import sys

    marks = tmp_path / "marks.txt"
    script = tmp_path / "user_script.py"
    script.write_text(
        "from pathlib import Path\n"
        f"with open({str(marks)!r}, 'a') as f: f.write('ran\\n')\n"
        "from llmcls.recipes.baseline import BaselineProcess\n"
        "from llmcls.rundir import RunDir\n"
        f"run = {str(tmp_path / 'run')!r}\n"
        "import shutil\n"
        f"shutil.copytree({str(trained_run)!r}, run)\n"
        "m = BaselineProcess(run, RunDir(run).load_config()).result()\n"
        "print('accuracy', m['candidates']['accuracy'])\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert marks.read_text() == "ran\n"  # once: the child did not run the script
    assert "accuracy" in out.stdout
