"""Scoring equals brute force; batched generation equals one-row generation; metrics equal a hand count."""

import itertools
import random

import pytest
import torch

from llmcls.config import PromptConfig
from llmcls.data import Row
from llmcls.encode import PromptBuilder
from llmcls.metrics import INVALID, compute_metrics
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
    from llmcls.infer import prompts_for
    from llmcls.layouts import pad_batch, queue_padded, score_cached

    model = model_factory(seed=4)
    b = PromptBuilder(tokenizer, PromptConfig())
    prompts = prompts_for(b, ROWS, None)
    for x, y in zip(queue_padded(model, pad_batch(b, ROWS, prompts)).result(), score_cached(model, b, ROWS, prompts)):
        assert max(abs(p - q) for p, q in zip(x, y)) < 1e-4


def test_padded_batch_lays_out_each_rows_trie(tokenizer):
    """Each prompt is followed by its candidates' trie nodes (each distinct prefix of a candidate's tokens but its
    last, once): the batch is as wide as its longest prompt plus its largest trie."""
    from llmcls.infer import prompts_for
    from llmcls.layouts import pad_batch

    b = PromptBuilder(tokenizer, PromptConfig())
    prompts = prompts_for(b, ROWS, None)
    p = pad_batch(b, ROWS, prompts)
    P = max(map(len, prompts))
    answers = [[b.answer_ids(c) for c in r.candidates] for r in ROWS]
    # the last row's labels: Enviornment 3 tokens, Politics 1, Economy 2, Sports 1; no shared prefix: 3 + 1 + 2 + 1
    assert p.ids.shape[1] == P + 7
    for i, ans in enumerate(answers):
        tail = [a[:-1] for a in ans]
        flat = [t for a in tail for t in a]  # no shared prefix in ROWS: the trie is each candidate's chain
        assert p.ids[i, P:P + len(flat)].tolist() == flat
        assert p.segment[i, P:P + len(flat)].tolist() == [1] * len(flat)
        assert (p.segment[i, P + len(flat):] == -1).all()
        k = 0
        for a in tail:  # each node sees its own chain so far and nothing else
            for t in range(len(a)):
                assert p.ancestors[i, k + t].tolist() == list(range(k, k + t + 1)) + [-1] * (2 - t)
            k += len(a)


TRIE_ROWS = [
    Row("昨晚的足球比赛和网球比赛都很精彩。" * 3,
        ["Sports/Football", "Sports/Tennis", "Sports/Football/Club", "Sport", "Sports", "Art"], "Sports"),
    Row("the economy of a country", ["Economy", "Economics", "Art"], "Economy"),
    Row("x", ["体育", "体育新闻", "体育/足球"], "体育"),
    Row("one", ["Art"], "Art"),
    Row("another economy text, longer than the first one", ["Economy", "Economics", "Art"], "Economics"),
]


def test_trie_shares_prefixes_and_scores_equal_brute_force(tokenizer, model_factory):
    """Candidates sharing a prefix ("Sports/…", "Economy"/"Economics" share their first token, "体育" is a prefix
    of "体育新闻"), one-token labels, one candidate alone, rows of 6, 3, 3, 1 and 3 candidates in one batch (the
    last with the second's label set, whose trie the batch makes once, after a longer prompt): both
    trie layouts (padded under its 4-D mask; packed under shared-prompt attention with the dense reference of the
    variable-length kernel) give every candidate's separate prompt + candidate forward, and lay out each distinct
    prefix once."""
    from llmcls.infer import prompts_for
    from llmcls.layouts import pack_batch, pad_batch, queue_packed, queue_padded

    model = model_factory(seed=9)
    b = PromptBuilder(tokenizer, PromptConfig())
    assert b.label_ids("Sports/Football")[:1] == b.label_ids("Sports/Tennis")[:1] == b.label_ids("Sports")
    assert b.label_ids("Economy")[0] == b.label_ids("Economics")[0]
    prompts = prompts_for(b, TRIE_ROWS, None)
    answers = [[b.answer_ids(c) for c in r.candidates] for r in TRIE_ROWS]
    distinct = [len({tuple(a[:t]) for a in ans for t in range(1, len(a))}) for ans in answers]
    own = [sum(len(a) - 1 for a in ans) for ans in answers]
    assert all(d < o for d, o in zip(distinct[:3], own[:3])) and distinct[3] == own[3] == 1
    padded, packed = pad_batch(b, TRIE_ROWS, prompts), pack_batch(b, TRIE_ROWS, prompts)
    assert padded.ids.shape[1] == max(map(len, prompts)) + max(distinct)
    assert packed.ids.shape[1] == sum(map(len, prompts)) + sum(distinct)
    assert packed.answer_rows.tolist() == [0, *itertools.accumulate(distinct)]
    for got in (queue_padded(model, padded).result(), queue_packed(model, packed).result()):
        for row, lls in zip(TRIE_ROWS, got):
            assert len(lls) == len(row.candidates)
            for cand, ll in zip(row.candidates, lls):
                assert abs(ll - brute_force(model, b, row, cand)) < 1e-4, (row.text[:10], cand)
    assert model.config._attn_implementation == "sdpa"


def test_trie_of_100_candidates_sharing_a_prefix_counts_each_prefix_once():
    from llmcls.layouts import answer_trie

    end = 9
    answers = [[5, 6, 100 + i, end] for i in range(100)] + [[5, end], [7, end]]
    trie = answer_trie(answers)
    assert len(trie.tokens) == 2 + 100 + 1          # [5], [5, 6], each [5, 6, x]; [7]; "5" alone is node [5]
    assert len(answer_trie(answers, share=False).tokens) == 3 * 100 + 1 + 1
    assert trie.paths[0] == [0, 1, 2] and trie.paths[99] == [0, 1, 101] and trie.paths[100] == [0]
    assert trie.ancestors[101] == [0, 1, 101] and trie.depth[101] == 3 and trie.tokens[102] == 7


def test_ancestor_attention_equals_masked_softmax():
    """The gathered attention of trie nodes over their ancestors (grouped-query heads: 4 query heads over 2 key
    heads): the softmax over exactly those keys, and its log-sum-exp."""
    from llmcls.model.attention import ancestor_attention

    torch.manual_seed(0)
    T = 7
    q, k, v = torch.randn(T, 4, 8), torch.randn(T, 2, 8), torch.randn(T, 2, 8)
    anc = torch.tensor([[0, -1, -1], [0, 1, -1], [0, 1, 2], [0, 3, -1], [4, -1, -1], [4, 5, -1], [4, 5, 6]])
    out, lse = ancestor_attention(q, k, v, anc, scale=0.3)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        allowed[t, anc[t][anc[t] >= 0]] = True
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kk).mul(0.3).masked_fill(~allowed, float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5)
    assert torch.allclose(out, torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), vv), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_classify_on_a_gpu_equals_the_cpu(tokenizer, model_factory):
    """On a GPU, batches are pinned and each one's scores are read back only once the next is queued: the
    predictions come back in input order with the CPU's probabilities (float32, one row per batch and more)."""
    b = PromptBuilder(tokenizer, PromptConfig())
    rows = ROWS * 3
    cpu = classify(model_factory(seed=6), b, rows, batch_size=5, progress=False)
    gpu_model = model_factory(seed=6).cuda()
    for bs in (1, 5, len(rows)):
        gpu = classify(gpu_model, b, rows, batch_size=bs, progress=False)
        assert [p.index for p in gpu] == list(range(len(rows)))
        for x, y in zip(cpu, gpu):
            assert max(abs(x.probs[c] - y.probs[c]) for c in x.probs) < 1e-4
            assert x.pred == y.pred or abs(x.probs[x.pred] - x.probs[y.pred]) < 2e-4


def test_flat_batch_scores_equal_brute_force(tokenizer, model_factory):
    """The GPU layout (one sequence, no padding; shared-prompt attention: prompts causal, trie nodes over their
    prompt and over their ancestors, merged by log-sum-exp), run on the CPU through the dense reference of the
    variable-length kernel, gives the brute-force log-likelihoods, and takes exactly prompts + candidate tokens."""
    from llmcls.infer import prompts_for
    from llmcls.layouts import pack_batch, queue_packed

    model = model_factory(seed=7)
    b = PromptBuilder(tokenizer, PromptConfig())
    prompts = prompts_for(b, ROWS, None)
    flat = pack_batch(b, ROWS, prompts)
    answers = [[b.answer_ids(c) for c in r.candidates] for r in ROWS]
    assert flat.ids.shape == (1, sum(map(len, prompts)) + sum(len(a) - 1 for ans in answers for a in ans))
    assert flat.prompt_bounds.tolist() == [0, *itertools.accumulate(map(len, prompts))]
    assert flat.answer_rows.tolist() == [0, *itertools.accumulate(sum(len(a) - 1 for a in ans) for ans in answers)]
    got = queue_packed(model, flat).result()
    for row, lls in zip(ROWS, got):
        for cand, ll in zip(row.candidates, lls):
            assert abs(ll - brute_force(model, b, row, cand)) < 1e-4, (row.text[:10], cand)
    assert model.config._attn_implementation == "sdpa"  # the model attends as before once the batch is scored


def test_dense_varlen_reference_equals_sdpa_per_sequence():
    """dense_varlen_attn (the CPU stand-in for FlashAttention's varlen kernel): each sequence pair attended alone
    by sdpa, causal aligned at the end as FlashAttention does, and the log-sum-exp of each query's scores."""
    from llmcls.model.attention import dense_varlen_attn
    from llmcls.model.attention import _lse_request

    torch.manual_seed(0)
    lq, lk = [3, 1, 5], [4, 6, 5]
    q, k, v = torch.randn(sum(lq), 2, 8), torch.randn(sum(lk), 2, 8), torch.randn(sum(lk), 2, 8)
    cq, ck = (torch.tensor([0, *itertools.accumulate(x)], dtype=torch.int32) for x in (lq, lk))
    for causal in (False, True):
        window = (-1, 0) if causal else (-1, -1)
        out, lse = dense_varlen_attn(q, k, v, cq, ck, 5, 6, window_size=window, return_aux=_lse_request())
        # without the log-sum-exp it takes sdpa's path (what packed training uses on a CPU): the same output
        assert torch.allclose(dense_varlen_attn(q, k, v, cq, ck, 5, 6, window_size=window), out, atol=1e-5)
        for i in range(3):
            qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
            qi, ki, vi = (t.transpose(0, 1) for t in (q[qs], k[ks], v[ks]))
            allowed = torch.ones(lq[i], lk[i], dtype=torch.bool)
            if causal:
                allowed = allowed.tril(lk[i] - lq[i])
            want = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=allowed)
            assert torch.allclose(out[qs].transpose(0, 1), want, atol=1e-5)
            scores = (qi @ ki.transpose(1, 2) / 8 ** 0.5).masked_fill(~allowed, float("-inf"))
            assert torch.allclose(lse[:, qs], torch.logsumexp(scores, -1), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flat_batch_on_a_gpu_equals_the_padded_one(tokenizer, model_factory):
    """In bf16 on a GPU the flat batch runs FlashAttention's variable-length kernel (what layout_for picks there):
    the same scores as the padded batch with its 4-D mask, eager and with compiled layers."""
    from llmcls.infer import prompts_for
    from llmcls.layouts import layout_for, pack_batch, pad_batch, queue_packed, queue_padded
    from llmcls.model.compiling import compile_layers

    model = model_factory(seed=8).to("cuda", torch.bfloat16)
    assert layout_for(model).name == "packed"
    b = PromptBuilder(tokenizer, PromptConfig())
    rows = ROWS * 3
    prompts = prompts_for(b, rows, None)
    padded = queue_padded(model, pad_batch(b, rows, prompts)).result()
    for _ in range(2):
        flat = queue_packed(model, pack_batch(b, rows, prompts).pin()).result()
        for x, y in zip(padded, flat):
            assert max(abs(p - q) for p, q in zip(x, y)) < 0.05 + 0.01 * max(map(abs, x))
        compile_layers(model)
    preds = classify(model, b, rows, batch_size=5, progress=False)  # pinned batches, read back one behind
    for pred, x in zip(preds, padded):
        want = [p for p in torch.softmax(torch.tensor(x, dtype=torch.float64), 0).tolist()]
        assert max(abs(pred.probs[c] - w) for c, w in zip(pred.probs, want)) < 0.05
    assert layout_for(model.float()).name == "padded"  # the kernel takes 16-bit inputs only


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


@pytest.mark.slow  # torch.compile on a CPU takes ~9 s: the second tier keeps the default one under 8 minutes on 2 cores
def test_compiled_layers_score_the_same(tokenizer, model_factory):
    """eval.compile / serve --compile: regional torch.compile changes the speed, not the scores (dynamic shapes:
    batches of other sizes and lengths reuse the compiled code)."""
    from llmcls.model.compiling import compile_layers

    model = model_factory(seed=5)
    b = PromptBuilder(tokenizer, PromptConfig())
    eager = score_batch(model, b, ROWS)
    compile_layers(model)
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    compiled = score_batch(model, b, ROWS) + score_batch(model, b, ROWS[:2])
    for x, y in zip(eager + eager[:2], compiled):
        assert max(abs(p - q) for p, q in zip(x, y)) < 1e-4


def test_macro_f1_has_one_definition_and_the_matrix_counts_every_row():
    """Macro-F1 averages over the labels present in the truth, for the LLM and the baseline alike; a label only
    predicted (or only in the label set) is listed per class and in the matrix but not averaged."""
    truth = ["A", "A", "B", "B"]
    pred = ["A", "C", "B", "B"]
    m = compute_metrics(truth, pred, ["A", "B", "C", "D"])
    f1_a, f1_b = 2 * 1 * 0.5 / 1.5, 1.0
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 2, abs=1e-12)
    assert set(m["per_class"]) == {"A", "B", "C", "D"} and m["per_class"]["C"]["support"] == 0
    assert m["confusion_matrix"]["labels"] == ["A", "B", "C", "D"]
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) == 4
    assert compute_metrics(truth, pred)["macro_f1"] == m["macro_f1"]  # the label list does not change it
