"""Multi-label rows (docs/MULTILABEL.md): parsing and its errors, one training example per true label, per-label
thresholds that maximise dev F1, the multi-label metrics, and a whole CLI run on a tiny model."""

import json
import random

import numpy as np
import pytest

from conftest import FILLER, KEYWORDS, LABELS, tiny_args, write_jsonl
from llmcls.config import DataConfig, load_config
from llmcls.data import DataError, Row, read_rows, split_dev, to_instruction, to_raw
from llmcls.metrics import multilabel_metrics
from llmcls.multilabel import Thresholds, best_threshold, fit_thresholds, is_multi_label

CANDS = ["Politics", "Economy", "Sport"]


def one_file(tmp_path, output, category=CANDS):
    good = {"text": "国务院召开常务会议", "category": CANDS, "output": "Politics"}
    p = tmp_path / "raw.jsonl"
    write_jsonl(p, [good, {"text": "abc", "category": category, "output": output}])
    return p


# ---- data ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output,words", [
    ([], "empty list"),
    (["Politics", "Law"], "'Law' is not among the candidates"),
    (["Sport", "Politics", "Sport"], "duplicate label 'Sport'"),
    (["Sport", 3], "label 2 of the list: expected a string, got int"),
    (["Sport", ""], "label 2 of the list is empty"),
    ("Sport, Law", "'Law' is not among the candidates"),
    ("Sport、Sport", "duplicate label 'Sport'"),
])
def test_bad_multilabel_row_is_named(tmp_path, output, words):
    path = one_file(tmp_path, output)
    with pytest.raises(DataError) as e:
        read_rows(path, DataConfig())
    assert (e.value.line, e.value.field) == (2, "output")
    assert f"{path}:2: field 'output'" in str(e.value) and words in str(e.value), str(e.value)


def test_multi_label_false_refuses_several_labels(tmp_path):
    path = one_file(tmp_path, ["Sport", "Politics"])
    with pytest.raises(DataError, match="data.multi_label is false") as e:
        read_rows(path, DataConfig(multi_label="false"))
    assert e.value.line == 2
    # YAML's bare false reaches the Literal as a bool
    assert load_config(None, {"data.multi_label": False}).data.multi_label == "false"


def test_list_and_separated_string_give_labels_in_candidate_order(tmp_path):
    for output in (["Sport", "Politics"], "Sport, Politics", "Sport、Politics", "Sport，Politics"):
        rows, _ = read_rows(one_file(tmp_path, output), DataConfig())
        r = rows[1]
        assert (r.label, r.labels, r.true_labels) == (None, ["Politics", "Sport"], ["Politics", "Sport"])
    # one label in a list is a single-label row; a candidate holding a comma stays one label
    rows, _ = read_rows(one_file(tmp_path, ["Sport"]), DataConfig())
    assert (rows[1].label, rows[1].labels) == ("Sport", None)
    rows, _ = read_rows(one_file(tmp_path, "Arts, Culture", category=["Arts, Culture", "Sport"]), DataConfig())
    assert (rows[1].label, rows[1].labels) == ("Arts, Culture", None)
    assert not is_multi_label(rows, "auto") and is_multi_label(rows, "true")


def test_single_label_rows_write_as_before(tmp_path):
    from llmcls.config import PromptConfig

    rows, _ = read_rows(one_file(tmp_path, "Sport"), DataConfig())
    assert [r.labels for r in rows] == [None, None]
    assert to_raw(rows[1], DataConfig()) == {"text": "abc", "category": CANDS, "output": "Sport"}
    assert to_instruction(rows[1], PromptConfig())["output"] == "Sport"
    multi = Row("abc", CANDS, None, 2, labels=["Politics", "Sport"])
    assert to_raw(multi, DataConfig())["output"] == ["Politics", "Sport"]
    # the dev split takes multi-label rows with their first true label in sorted order (label None is no group)
    rows = [Row(str(i), CANDS, CANDS[i % 3], i) for i in range(30)]
    rows += [Row(f"m{i}", CANDS, None, 30 + i, labels=["Sport", "Politics"]) for i in range(10)]
    tr, dev = split_dev(rows, 0.5, 0)
    assert len(tr) + len(dev) == 40 and sum(r.labels is not None for r in dev) >= 1
    assert sum(r.label == "Politics" or r.labels is not None for r in dev) == 10  # half of the 20 in that group


# ---- training examples --------------------------------------------------------------------------------------
def test_every_true_label_is_trained_with_the_prompt_masked(tokenizer, tmp_path):
    from llmcls.encode import IGNORE, PromptBuilder
    from llmcls.recipes.prepare import load_encoded, prepare

    rows = [{"text": "football and election news", "category": LABELS, "output": ["Sport", "Politics"]},
            {"text": "software", "category": LABELS, "output": "Technology"},
            {"text": "pollution, software, football", "category": LABELS, "output": "Technology、Sport、Enviornment"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = load_config(None, {"data.train_file": str(path)})
    s = prepare(cfg, tokenizer, tmp_path / "prep", progress=False)
    assert s["multi_label"] and s["rows"] == 3 and s["examples"] == 6 and s["rows_with_several_labels"] == 2
    assert s["labels"] == {"Sport": 2, "Technology": 2, "Politics": 1, "Enviornment": 1}
    enc = load_encoded(tmp_path / "prep")
    builder = PromptBuilder(tokenizer, cfg.prompt)
    # candidate order of each row: (row, label) for every example, in file order
    expected = [(0, "Sport"), (0, "Politics"), (1, "Technology"), (2, "Sport"), (2, "Enviornment"), (2, "Technology")]
    assert list(enc["label"]) == [lab for _, lab in expected]
    for (i, label), ids, labels in zip(expected, enc["input_ids"], enc["labels"]):
        prompt = builder.prompt_ids(Row(rows[i]["text"], LABELS, None))
        answer = builder.answer_ids(label)
        assert ids == prompt + answer
        assert labels == [IGNORE] * len(prompt) + answer  # the prompt is masked, the whole answer trained on
        assert tokenizer.decode(answer[:-1]) == label and answer[-1] == tokenizer.eos_token_id
    inst = [json.loads(x) for x in (tmp_path / "prep" / "train.instruct.jsonl").read_text().splitlines()]
    assert [x["output"] for x in inst] == [["Sport", "Politics"], "Technology", ["Sport", "Enviornment", "Technology"]]


# ---- thresholds ---------------------------------------------------------------------------------------------
def _f1(truth, pred):
    tp = sum(t and p for t, p in zip(truth, pred))
    return 2 * tp / (sum(truth) + sum(pred)) if sum(truth) + sum(pred) else 0.0


def _synthetic(seed, n=60):
    rng = np.random.default_rng(seed)
    labels = ["a", "b", "c", "d", "e"]
    probs, cands, truth = [], [], []
    for _ in range(n):
        cs = list(rng.choice(labels, size=rng.integers(2, 6), replace=False))
        t = list(rng.choice(cs, size=rng.integers(1, min(3, len(cs)) + 1), replace=False))
        if "e" in t and rng.random() < 0.8:  # e: rarely true, so it falls back to the global threshold
            t.remove("e")
            t = t or [c for c in cs if c != "e"][:1]
        logits = rng.normal(size=len(cs)) + 1.5 * np.array([c in t for c in cs])
        p = np.exp(logits) / np.exp(logits).sum()
        p = np.round(p, 2)  # ties between rows, as real probabilities have
        probs.append(p.tolist()), cands.append(cs), truth.append(t)
    return probs, cands, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("at_least_one", [True, False])
def test_thresholds_maximise_each_labels_dev_f1(seed, at_least_one):
    probs, cands, truth = _synthetic(seed)
    th = fit_thresholds(probs, cands, truth, min_positives=8, at_least_one=at_least_one)
    preds = [th.select(c, p) for c, p in zip(cands, probs)]

    def decisions(label, t):  # brute force: the label's decisions on the rows offering it at threshold t
        out = []
        for c, p, ts in zip(cands, probs, truth):
            if label in c:
                i = c.index(label)
                out.append((label in ts, p[i] >= t or (at_least_one and int(np.argmax(p)) == i)))
        return out

    rare = [lab for lab in "abcde" if lab not in th.per_label]
    assert "e" in rare and len(th.per_label) >= 3
    for label in th.per_label:
        values = sorted({p[c.index(label)] for c, p in zip(cands, probs) if label in c}) + [2.0]
        best = max(_f1(*zip(*decisions(label, t))) for t in values)
        got = [(label in ts, label in pr) for c, ts, pr in zip(cands, truth, preds) if label in c]
        assert _f1(*zip(*got)) == pytest.approx(best) == pytest.approx(th.dev_f1[label])
    # the global threshold maximises the pooled micro-F1 of the labels that fall back to it... of every label
    pooled_values = sorted({x for p in probs for x in p}) + [2.0]
    best_micro = max(_f1(*zip(*[d for lab in "abcde" for d in decisions(lab, t)])) for t in pooled_values)
    assert th.default_dev_micro_f1 == pytest.approx(best_micro)
    for label in rare:
        got = [(label in ts, label in pr) for c, ts, pr in zip(cands, truth, preds) if label in c]
        assert got == decisions(label, th.default)


def test_best_threshold_edges_and_at_least_one():
    # every score positive -> predict all: the threshold lies at or below the lowest score
    t, f1 = best_threshold([0.9, 0.4, 0.2], [True, True, True], [False] * 3)
    assert f1 == 1.0 and t <= 0.2
    # nothing positive above the forced ones -> a threshold above every score
    t, f1 = best_threshold([0.9, 0.4], [True, False], [True, False])
    assert f1 == 1.0 and t > 0.9  # ties of F1 keep the highest threshold
    th = Thresholds(default=0.99, per_label={"x": 0.1})
    assert th.select(["y", "x", "z"], [0.5, 0.2, 0.3]) == ["y", "x"]  # top forced, x over its own threshold
    assert Thresholds(default=0.99, at_least_one=False).select(["y", "x"], [0.6, 0.4]) == []
    assert Thresholds.from_dict(json.loads(json.dumps(th.to_dict()))) == th


# ---- metrics ------------------------------------------------------------------------------------------------
def test_multilabel_metrics_equal_brute_force_and_sklearn():
    truth = [["a", "b"], ["c"], ["a"], ["b", "c"], ["a", "c"]]
    pred = [["a"], ["c"], ["a", "b"], ["b", "c"], ["d"]]
    m = multilabel_metrics(truth, pred)
    labels = ["a", "b", "c", "d"]
    cells = [(lab in t, lab in p, lab) for t, p in zip(truth, pred) for lab in labels]
    tp = sum(a and b for a, b, _ in cells)
    fp = sum(b and not a for a, b, _ in cells)
    fn = sum(a and not b for a, b, _ in cells)
    assert m["micro_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    per = {lab: _f1([a for a, _, x in cells if x == lab], [b for _, b, x in cells if x == lab]) for lab in labels}
    assert m["macro_f1"] == pytest.approx(np.mean([per[x] for x in "abc"]))  # d is never true: not averaged
    assert m["subset_accuracy"] == pytest.approx(2 / 5)
    assert m["hamming_loss"] == pytest.approx((fp + fn) / (5 * 4))
    assert {k: v["f1"] for k, v in m["per_class"].items()} == pytest.approx(per)
    assert m["per_class"]["a"]["support"] == 3 and m["per_class"]["d"]["precision"] == 0.0
    # hand-made: a: tp 2 fp 0 fn 1; b: tp 1 fp 1 fn 1; c: tp 2 fp 0 fn 1; d: fp 1 -> micro 2*5/(10+2+3)
    assert m["micro_f1"] == pytest.approx(10 / 15)


# ---- a whole run through the CLI ----------------------------------------------------------------------------
def multilabel_rows(n: int, seed: int) -> list[dict]:
    """The learnable keyword task with one or two keywords, each signalling its label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        labels = rng.sample(LABELS, rng.choice([1, 2]))
        words = [rng.choice(FILLER) for _ in range(rng.randint(6, 12))]
        for lab in labels:
            words.insert(rng.randrange(len(words)), KEYWORDS[lab])
        rows.append({"text": " ".join(words), "category": LABELS, "output": labels if len(labels) > 1 else labels[0]})
    return rows


@pytest.mark.slow  # ~20-25 s on 2 shared cores: a model built, trained, loaded twice, a report drawn
def test_cli_prepare_train_eval_predict_multilabel(tmp_path, tokenizer_dir, capsys):
    from sklearn.metrics import f1_score, hamming_loss
    from sklearn.preprocessing import MultiLabelBinarizer

    from llmcls.cli import main

    train = write_jsonl(tmp_path / "train.jsonl", multilabel_rows(48, 5))
    test = write_jsonl(tmp_path / "test.jsonl", multilabel_rows(16, 6))
    out = tmp_path / "run"
    args = tiny_args(train, test, out, **{"train.max_steps": 2, "train.batch_size": 8, "train.save_steps": 1000,
                                          "data.dev_fraction": 0.25, "multilabel.min_positives": 2})
    assert main(["prepare", *args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["multi_label"] and summary["examples"] > summary["rows"]
    assert main(["train", *args]) == 0
    th = json.loads((out / "thresholds.json").read_text())
    assert th["fitted_on_rows"] == summary["dev"]["rows"] and th["per_label"]
    # llmcls calibrate scores the dev rows again with the same weights: the same thresholds
    assert main(["calibrate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == th
    assert main(["eval", str(out), "--json"]) == 0
    m = json.loads((out / "eval" / "metrics.json").read_text())
    preds = [json.loads(x) for x in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert m["multi_label"] and m["rows"] == len(preds) == 16 and m["thresholds"]["from_dev"]
    mlb = MultiLabelBinarizer(classes=sorted(LABELS))
    y, p = mlb.fit_transform([r["truth"] for r in preds]), mlb.transform([r["labels"] for r in preds])
    assert m["micro_f1"] == pytest.approx(f1_score(y, p, average="micro"))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y, p))
    for r in preds:  # every label over its threshold, and the most probable one (probs are rounded to 1e-6)
        for c, v in r["probs"].items():
            t = th["per_label"].get(c, th["default"])
            if abs(v - t) > 1e-6:
                assert (c in r["labels"]) == (v >= t or c == r["pred"]), (c, t, r)
    out_file = tmp_path / "pred.jsonl"
    assert main(["predict", str(out), "-i", str(test), "-o", str(out_file)]) == 0
    got = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [g["labels"] for g in got] == [r["labels"] for r in preds]
    html = (out / "report.html").read_text()
    assert "Multi-label" in html and "Hamming loss" in html
    # serve and export carry the thresholds: the server's labels are predict's
    from llmcls.data import read_rows as read
    from llmcls.serving.app import result
    from llmcls.serving.classifier import load_classifier

    test_rows, _ = read(test, DataConfig())
    exp = tmp_path / "export"
    assert main(["export", str(out), str(exp)]) == 0
    meta = json.loads((exp / "llmcls.json").read_text())
    assert meta["format_version"] == 3 and meta["thresholds"]["per_label"] == th["per_label"]
    for path in (out, exp):
        clf = load_classifier(path, device="cpu")
        served = [result(p, 0, clf.thresholds)["labels"] for p in clf.classify(test_rows)]
        assert served == [g["labels"] for g in got], path


def test_single_label_consumers_name_a_multilabel_row(tmp_path):
    from llmcls.recipes.baseline import baseline

    rows = [{"text": "football", "category": CANDS, "output": "Sport"},
            {"text": "election football", "category": CANDS, "output": ["Politics", "Sport"]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match="the TF-IDF baseline is single-label") as e:
        baseline(path, path, None, DataConfig(), progress=False)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 2, "output")


def test_paired_dataset_joins_two_classes_and_uses_each_row_once(tmp_path):
    from llmcls.cli import main
    from llmcls.datasets_builtin import pair_rows

    src = [{"text": f"{lab}-{i} " + "x" * 500, "category": [lab, "Other"], "output": lab}
           for i in range(40) for lab in ("A", "B", "C")]
    out = pair_rows(src, seed=1, pair_fraction=0.5, max_chars=300)
    multi = [r for r in out if isinstance(r["output"], list)]
    assert 0.3 < len(multi) / len(out) < 0.7
    used = [part.split(" ")[0] for r in out for part in r["text"].split("\n\n")]
    assert sorted(used) == sorted(r["text"].split(" ")[0] for r in src)  # every source row once
    for r in multi:
        a, b = r["output"]
        assert a != b and {a, b} <= set(r["category"]) and len(r["text"]) == 300 + 2 + 300
        assert [p.split("-")[0] for p in r["text"].split("\n\n")] == [a, b]
    d = tmp_path / "src"
    write_jsonl(d / "train.jsonl", src), write_jsonl(d / "test.jsonl", src[:30])
    assert main(["make-dataset", "multilabel", "--source", str(d), "--out", str(tmp_path / "ml")]) == 0
    rows, _ = read_rows(tmp_path / "ml" / "train.jsonl", DataConfig())  # valid input for llmcls
    assert is_multi_label(rows, "auto") and len(rows) == len(pair_rows(src, seed=0))


def test_dry_run_plans_one_example_per_true_label(tmp_path):
    import yaml

    from llmcls.recipes.plan import dry_run

    rows = multilabel_rows(40, 7)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = load_config(None, {"data.train_file": str(path), "model.name_or_path": "tiny"})
    plan = yaml.safe_load(dry_run(cfg).split("# plan (nothing was loaded or downloaded)\n")[1])["plan"]
    assert plan["rows"] == sum(len(r["output"]) if isinstance(r["output"], list) else 1 for r in rows) > 40
