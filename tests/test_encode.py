"""Prompts, masking and answer-keeping truncation on the real Qwen tokenizer."""

import json

import pytest
import torch

from conftest import FUDAN
from llmcls.config import PromptConfig, TUTORIAL_SYSTEM, load_config
from llmcls.data import Row
from llmcls.collate import AnswerCollator, answer_loss
from llmcls.encode import (IGNORE, PromptBuilder, PromptTooLong, encode_train, fit_prompt,
                           fit_prompts, fit_rows)


def tutorial_prompt(text, category):
    # The tutorial's process_func, verbatim in substance: a hand-written ChatML string.
    user = f"Text: {text}, Type Options: {category}"
    return (f"<|im_start|>system\n{TUTORIAL_SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def test_prompt_equals_tutorial_string(tokenizer):
    b = PromptBuilder(tokenizer, PromptConfig())
    rows = [Row("国务院召开会议，讨论经济形势。", ["Economy", "Politics"], "Economy"),
            Row("Arsenal won 2-1 at home.\nGreat match!", ["Sport", "Art", "Enviornment"], "Sport")]
    for r in rows:
        want = tokenizer(tutorial_prompt(r.text, r.candidates), add_special_tokens=False)["input_ids"]
        assert b.prompt_ids(r) == want
        assert b.prompt_text(r) == tutorial_prompt(r.text, r.candidates)


EDGY = ["", " lead and trail \n", "{{ braces }} {% tag %} <|im_end|> <|im_start|>user", "\t\n\n", "国" * 30]


def _rendered(tokenizer, b, r):
    return tokenizer.apply_chat_template(b.messages(r), tokenize=False, add_generation_prompt=True)


def test_prompt_text_is_the_templates_rendering(tokenizer):
    """prompt_text fills the template's frame instead of rendering the template for every row: it must give the
    rendering, character for character, for texts and candidates with the template's own syntax in them, for
    Fudan rows, and with another system prompt."""
    from llmcls.config import DataConfig
    from llmcls.data import read_rows

    rows = [Row(t, ["Sport", "{{ x }}", " Art "], "Sport") for t in EDGY]
    if (FUDAN / "train.jsonl").is_file():
        rows += read_rows(FUDAN / "train.jsonl", DataConfig(), limit=300)[0]
    for prompt in (PromptConfig(), PromptConfig(system="Be brief. {{ system }}")):
        b = PromptBuilder(tokenizer, prompt)
        assert b._template_frame() is not None  # ChatML inserts the message as it is: the frame is used
        for r in rows:
            assert b.prompt_text(r) == _rendered(tokenizer, b, r)


def test_a_template_that_changes_the_message_is_rendered_for_every_row(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tok.chat_template.replace("message['content']", "(message['content'] | trim)")
    assert tok.chat_template != tokenizer.chat_template
    b = PromptBuilder(tok, PromptConfig())
    assert b._template_frame() is None
    for t in EDGY:
        r = Row(t, ["Sport", "Art"], "Sport")
        assert b.prompt_text(r) == _rendered(tok, b, r)


def test_encode_texts_gives_the_tokenizers_ids_and_offsets(tokenizer):
    import copy

    texts = ["国务院召开会议，讨论经济形势。", "Arsenal won 2-1.\n", "", "😀 x" * 20, " " * 9 + "end"]
    b = PromptBuilder(tokenizer, PromptConfig())
    want = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = b.encode_texts(texts, offsets=True)
    assert ids == want["input_ids"] and [list(map(tuple, o)) for o in offsets] == \
        [list(map(tuple, o)) for o in want["offset_mapping"]]
    assert b.encode_texts(texts) == (want["input_ids"], None)
    # a backend set to cut is not called directly: the tokenizer's own call (which never cuts here) is
    cutting = copy.deepcopy(tokenizer)
    cutting.backend_tokenizer.enable_truncation(3)
    assert PromptBuilder(cutting, PromptConfig()).encode_texts(texts)[0] == want["input_ids"]


def test_a_head_too_short_to_prove_the_length_is_extended_not_tokenised_whole(tokenizer):
    """The first head of "x x x ..." holds just over the text's token budget: too few tokens to prove the prompt at
    least max_length long (PROOF_SLACK). A head twice as long proves it; the whole text is never tokenised, and the
    ids are the reference's."""
    from llmcls.encode import encode_train_fit

    b = PromptBuilder(tokenizer, PromptConfig())
    rows = [Row("x " * 2200, ["Economy", "Sport", "Politics"], "Sport"),
            Row("x " * 200 + "国" * 28 + "x " * 2000, ["Economy", "Sport", "Politics"], "Sport")]
    heads = {}
    limit = 384 - len(b.answer_ids("Sport"))
    fit_rows(b, rows, [limit] * 2, heads=heads)
    for k in heads:  # the first proof fails for both rows
        n, whole, _ = heads[k]
        assert not whole and 0 <= n - (limit - b.empty_prompt_length(rows[k].candidates)) < 32 + 2
    seen = []
    encode_texts = b.encode_texts
    b.encode_texts = lambda texts, offsets=False: (seen.extend(texts), encode_texts(texts, offsets))[1]
    got = encode_train_fit(b, rows, 384, [False, False])
    assert not any(r.text in t for r in rows for t in seen)  # no whole text was tokenised
    for g, r in zip(got, rows):
        want = encode_train(b, r, 384)
        assert g.full_length is None and want.full_length > 384
        assert (g.input_ids, g.labels, g.shortened, g.answer_kept) == (want.input_ids, want.labels, True, True)


def test_masking_and_end_token(tokenizer):
    b = PromptBuilder(tokenizer, PromptConfig())
    r = Row("短新闻", ["Enviornment", "Sport"], "Enviornment")
    enc = encode_train(b, r, 384)
    prompt = b.prompt_ids(r)
    answer = tokenizer("Enviornment", add_special_tokens=False)["input_ids"]
    assert len(answer) == 3  # a multi-token label
    assert enc.input_ids == prompt + answer + [151645]  # <|im_end|> closes the answer
    assert enc.labels == [IGNORE] * len(prompt) + answer + [151645]
    assert not enc.shortened and enc.answer_kept


def test_long_row_keeps_whole_answer(tokenizer):
    b = PromptBuilder(tokenizer, PromptConfig())
    text = "经济发展和社会进步是我们的共同目标。" * 200
    r = Row(text, ["Economy", "Enviornment"], "Enviornment")
    for max_len in (100, 200, 384):
        enc = encode_train(b, r, max_len)
        answer = b.answer_ids("Enviornment")
        assert len(enc.input_ids) <= max_len
        assert len(enc.input_ids) >= max_len - 3  # the text is cut close to the limit, not far below it
        assert enc.input_ids[-len(answer):] == answer
        assert [t for t in enc.labels if t != IGNORE] == answer
        assert enc.shortened and enc.answer_kept
        # the shortened prompt is a real prompt: a prefix of the text inside the same template
        prompt_text = tokenizer.decode(enc.input_ids[:-len(answer)])
        kept = prompt_text.split("Text: ", 1)[1].split(", Type Options:")[0]
        assert text.startswith(kept) and len(kept) > 10
    right = encode_train(b, r, 200, truncation="right")  # the tutorial's cut loses the answer
    assert len(right.input_ids) == 200 and all(t == IGNORE for t in right.labels)


def test_prompt_too_long_is_a_clear_error(tokenizer):
    b = PromptBuilder(tokenizer, PromptConfig())
    with pytest.raises(PromptTooLong, match="without any text"):
        encode_train(b, Row("x" * 500, ["A", "B"], "A"), 30)


def test_answer_loss_equals_model_loss(tokenizer, model_factory):
    """Left padding + logits on answer positions only gives the model's own full-logits loss."""
    model = model_factory(seed=3)
    b = PromptBuilder(tokenizer, PromptConfig())
    rows = [Row("a short one", ["Sport", "Art"], "Sport"), Row("a much longer text " * 8, ["Enviornment", "Art"],
                                                                   "Enviornment")]
    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in (encode_train(b, r, 128) for r in rows)]
    batch = AnswerCollator(pad_id=tokenizer.pad_token_id)(feats)
    assert batch["logits_to_keep"] < batch["input_ids"].shape[1]
    labels = batch.pop("labels")
    fast = answer_loss(model(**batch), labels)
    # reference: each row alone, unpadded, full logits, the model's own loss summed over answer tokens
    total, n = 0.0, 0
    for f in feats:
        ids, lab = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        k = int((lab != IGNORE).sum())
        total += model(input_ids=ids, labels=lab).loss.item() * k
        n += k
    assert abs(fast.item() - total / n) < 1e-4


def assert_fitted(b, row, fitted, ids, limit):
    """What fitting promises, checked from outside: the prompt of a prefix of the text, within the limit, and when
    cut, cut close to it (a few tokens of slack where the template's token boundaries moved)."""
    assert row.text.startswith(fitted.text) and b.prompt_ids(fitted) == ids and len(ids) <= limit
    if fitted is not row:
        assert len(fitted.text) < len(row.text) and len(ids) >= limit - 4


def test_batched_fitting_equals_one_row_at_a_time(tokenizer):
    """fit_prompts tokenises short texts in one batched call and cuts long ones in lockstep rounds: the same ids as
    fit_prompt row by row, whichever side of the whole-text threshold (2 characters per token) a row falls."""
    b = PromptBuilder(tokenizer, PromptConfig())
    unit = "经济发展和社会进步是我们的共同目标。"
    rows = [Row(unit * n, ["Economy", "Enviornment", "Art"][:2 + n % 2], "Economy") for n in (1, 3, 9, 12, 40)]
    rows.append(Row("Arsenal won 2-1 at home. " * 40, ["Sport", "Art"], "Sport"))
    budgets = [120, 200, 100, 300, 150, 384]
    got = fit_prompts(b, rows, budgets)
    want = [fit_prompt(b, r, n)[0] for r, n in zip(rows, budgets)]
    assert got == want
    # the rows cover every path: whole and fitting, whole then cut, head-only
    whole = [len(r.text) <= 2 * n for r, n in zip(rows, budgets)]
    cut = [len(g) < len(b.prompt_ids(r)) for g, r in zip(got, rows)]
    assert any(w and not c for w, c in zip(whole, cut)) and any(w and c for w, c in zip(whole, cut))
    assert not all(whole)
    assert all(len(g) <= n for g, n in zip(got, budgets))
    for r, n, (fitted, ids) in zip(rows, budgets, fit_rows(b, rows, budgets)):
        assert_fitted(b, r, fitted, ids, n)


@pytest.mark.skipif(not (FUDAN / "test.jsonl").is_file(), reason="../shared/data/fudan-news is absent")
def test_batched_fitting_equals_one_row_at_a_time_on_fudan(tokenizer):
    """Real news rows, most longer than the limit: the lockstep cut-and-check rounds give each row what it gets
    alone, and what fitting promises, including rows whose first cut lands over the limit (the template's token
    boundaries move) and need a second round."""
    from llmcls.config import DataConfig
    from llmcls.data import read_rows
    from llmcls.encode import _cut_at, _first_head

    def first_cut(r, budget):
        off = tokenizer(r.text[:_first_head(budget)], add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
        return _cut_at(r, off, budget)

    b = PromptBuilder(tokenizer, PromptConfig())
    rows, _ = read_rows(FUDAN / "test.jsonl", DataConfig())
    rows = rows[:160]
    for limit in (380, 150):
        want = [fit_prompt(b, r, limit)[0] for r in rows]
        fitted = fit_rows(b, rows, [limit] * len(rows))
        assert [ids for _, ids in fitted] == want
        for r, (f, ids) in zip(rows, fitted):
            assert_fitted(b, r, f, ids, limit)
        first_over = sum(len(b.prompt_ids(first_cut(r, limit - b.empty_prompt_length(r.candidates)))) > limit
                         for r in rows if len(b.prompt_ids(r)) > limit)
        assert first_over > 10  # the second round is exercised


@pytest.mark.skipif(not (FUDAN / "train.jsonl").is_file(), reason="../shared/data/fudan-news is absent")
def test_fudan_every_row_keeps_its_answer(tokenizer, tmp_path):
    """On the real development data (first 600 rows, for time) the tutorial's cut drops most answers; ours
    keeps every one. The full file is checked by `llmcls prepare --json` (see README)."""
    from llmcls.recipes.prepare import prepare

    cfg = load_config(None, {"data.train_file": str(FUDAN / "train.jsonl"), "data.max_train_rows": 600})
    s = prepare(cfg, tokenizer, tmp_path / "prep", progress=False)
    assert s["rows"] == 600 and s["answer_kept"] == 600
    assert s["tutorial_answer_kept"] < 0.25 * 600
    assert s["shortened"] > 400
    enc = json.loads((tmp_path / "prep" / "prepare.json").read_text())
    assert enc["answer_kept"] == s["answer_kept"]
