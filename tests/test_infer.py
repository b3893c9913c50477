"""Scoring equals brute force; batched generation equals one-row generation; metrics equal a hand count."""

import random

import pytest
import torch

from llmcls.config import PromptConfig
from llmcls.data import Row
from llmcls.encode import PromptBuilder
from llmcls.evaluate import INVALID, compute_metrics
from llmcls.infer import classify, generate_batch, map_output, score_batch

ROWS = [
    Row("短文本", ["Sports", "Enviornment", "Art"], "Art"),
    Row("a much longer text about the economy of a country " * 6, ["Economy", "Politics"], "Economy"),
    Row("x", ["Sport", "Sports"], "Sport"),
    Row("环境污染问题日益严重，政府出台新政策。", ["Enviornment", "Politics", "Economy", "Sports"], "Enviornment"),
]


def brute_force(model, b, row, cand):
    """Log p(candidate tokens + end token | prompt) from one unpadded forward of prompt + answer."""
    p, a = b.prompt_ids(row), b.answer_ids(cand)
    logp = torch.log_softmax(model(torch.tensor([p + a])).logits.float(), -1)[0]
    return sum(logp[len(p) - 1 + k, a[k]].item() for k in range(len(a)))


def test_score_equals_brute_force(tokenizer, model_factory):
    model = model_factory(seed=1)
    b = PromptBuilder(tokenizer, PromptConfig())
    assert len(b.label_ids("Enviornment")) == 3
    got = score_batch(model, b, ROWS)
    for row, lls in zip(ROWS, got):
        for cand, ll in zip(row.candidates, lls):
            assert abs(ll - brute_force(model, b, row, cand)) < 1e-4, (row.text[:10], cand)
    # order and batch size do not change results
    one = [score_batch(model, b, [r])[0] for r in ROWS]
    for x, y in zip(got, one):
        assert max(abs(p - q) for p, q in zip(x, y)) < 1e-4
    preds = classify(model, b, ROWS, batch_size=3, progress=False)
    for row, pred, lls in zip(ROWS, preds, got):
        assert abs(sum(pred.probs.values()) - 1) < 1e-6
        assert pred.pred == row.candidates[max(range(len(lls)), key=lls.__getitem__)]


def test_cached_scoring_path_equals_packed(tokenizer, model_factory):
    """The KV-cache path (used with flash-attention, which takes no custom mask) gives the same scores."""
    from llmcls.infer import _score_cached, pack, prompts_for, score_packed

    model = model_factory(seed=4)
    b = PromptBuilder(tokenizer, PromptConfig())
    prompts = prompts_for(b, ROWS, None)
    for x, y in zip(score_packed(model, pack(b, ROWS, prompts)), _score_cached(model, b, ROWS, prompts)):
        assert max(abs(p - q) for p, q in zip(x, y)) < 1e-4


def test_pack_lays_candidates_back_to_back(tokenizer):
    """Each prompt is followed by its candidates' tokens but the last of each (only ever predicted, never read):
    the batch is as wide as its longest prompt plus its largest such sum, not candidates x longest answer."""
    from llmcls.infer import pack, prompts_for

    b = PromptBuilder(tokenizer, PromptConfig())
    prompts = prompts_for(b, ROWS, None)
    p = pack(b, ROWS, prompts)
    P = max(map(len, prompts))
    answers = [[b.answer_ids(c) for c in r.candidates] for r in ROWS]
    # the last row's labels: Enviornment 3 tokens, Politics 1, Economy 2, Sports 1 (slots of width 4 would be 16)
    assert p.ids.shape[1] == P + max(sum(len(a) - 1 for a in ans) for ans in answers) == P + 7
    for i, ans in enumerate(answers):
        tail = [a[:-1] for a in ans]
        flat = [t for a in tail for t in a]
        assert p.ids[i, P:P + len(flat)].tolist() == flat
        assert p.segment[i, P:P + len(flat)].tolist() == [j + 1 for j, a in enumerate(tail) for _ in a]
        assert (p.segment[i, P + len(flat):] == -1).all()


def test_batched_generate_equals_single(tokenizer, model_factory):
    model = model_factory(seed=2)
    b = PromptBuilder(tokenizer, PromptConfig())
    batched = generate_batch(model, b, ROWS, max_new_tokens=4)
    single = [generate_batch(model, b, [r], max_new_tokens=4)[0] for r in ROWS]
    assert batched == single


@pytest.mark.parametrize("text,want", [
    ("Sport", "Sport"), (" sports ", "Sports"), ("Sports<|im_end|>", None), ("Politics.", "Politics"),
    ("The answer is Politics", "Politics"), ("banana", None), ("", None),
])
def test_map_output(text, want):
    cands = ["Sport", "Sports", "Politics"]
    assert map_output(text.replace("<|im_end|>", " x"), cands) == want


def test_metrics_equal_a_hand_count():
    rng = random.Random(0)
    labels = ["A", "B", "C"]
    truth = [rng.choice(labels) for _ in range(200)]
    pred = [t if rng.random() < 0.7 else rng.choice(labels + [None]) for t in truth]
    m = compute_metrics(truth, pred, labels)
    assert m["accuracy"] == sum(t == p for t, p in zip(truth, pred)) / 200
    assert m["invalid"] == sum(p is None for p in pred)
    f1s = []
    for c in labels:
        tp = sum(t == c and p == c for t, p in zip(truth, pred))
        fp = sum(t != c and p == c for t, p in zip(truth, pred))
        fn = sum(t == c and p != c for t, p in zip(truth, pred))
        prec, rec = tp / (tp + fp), tp / (tp + fn)
        f1s.append(2 * prec * rec / (prec + rec))
        assert abs(m["per_class"][c]["f1"] - f1s[-1]) < 1e-12
    assert abs(m["macro_f1"] - sum(f1s) / 3) < 1e-12
    cm = m["confusion_matrix"]
    assert cm["labels"] == labels + [INVALID]
    i, j = labels.index("A"), cm["labels"].index(INVALID)
    assert cm["matrix"][i][j] == sum(t == "A" and p is None for t, p in zip(truth, pred))
    assert sum(map(sum, cm["matrix"])) == 200


def test_compiled_layers_score_the_same(tokenizer, model_factory):
    """eval.compile / serve --compile: regional torch.compile changes the speed, not the scores (dynamic shapes:
    batches of other sizes and lengths reuse the compiled code)."""
    from llmcls.model import compile_layers

    model = model_factory(seed=5)
    b = PromptBuilder(tokenizer, PromptConfig())
    eager = score_batch(model, b, ROWS)
    compile_layers(model)
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    compiled = score_batch(model, b, ROWS) + score_batch(model, b, ROWS[:2])
    for x, y in zip(eager + eager[:2], compiled):
        assert max(abs(p - q) for p, q in zip(x, y)) < 1e-4
