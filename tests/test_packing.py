"""Padding-free training batches (train.packing): rows laid end to end, attention kept within each row.

The packed path must compute what the padded one does: the same loss and the same LoRA gradients on the same rows,
each row's logits unaffected by its neighbours, the Trainer's token and answer counts unchanged."""

import pytest
import torch
from transformers import TrainerCallback

from conftest import LoggedLosses

from llmcls.config import LoraConfig, PromptConfig, load_config
from llmcls.data import Row
from llmcls.collate import AnswerCollator, PackedCollator, answer_loss
from llmcls.encode import IGNORE, PromptBuilder, encode_train
from llmcls.model.attention import PACKED_ATTENTION, packed_rows
from llmcls.model.load import add_lora

ROWS = [Row("a short one", ["Sport", "Art"], "Sport"),
        Row("a much longer text about the election and the vote " * 4, ["Politics", "Enviornment"], "Politics"),
        Row("pollution in the river", ["Enviornment", "Technology", "Art"], "Enviornment"),
        Row("new software", ["Technology", "Sport"], "Technology")]


def features(tokenizer, rows=ROWS):
    b = PromptBuilder(tokenizer, PromptConfig())
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in (encode_train(b, r, 128) for r in rows)]


def test_packed_collator_lays_rows_end_to_end(tokenizer):
    feats = features(tokenizer)
    lengths = [len(f["input_ids"]) for f in feats]
    batch = PackedCollator()(feats)
    assert batch["input_ids"].tolist() == [[t for f in feats for t in f["input_ids"]]]
    assert batch["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch["max_length_q"] == max(lengths) and "attention_mask" not in batch
    # positions restart on every row
    starts = batch["cu_seq_lens_q"][:-1].tolist()
    pos = batch["position_ids"][0]
    assert all(pos[s] == 0 for s in starts) and pos.tolist() == [i for n in lengths for i in range(n)]
    # the LM head runs only where an answer token is predicted, and each kept logit's target is that token
    answers = [[t for t in f["labels"] if t != IGNORE] for f in feats]
    assert batch["labels"][0, 1:].tolist() == [t for a in answers for t in a]
    ids = batch["input_ids"][0]
    assert torch.equal(ids[batch["logits_to_keep"] + 1], batch["labels"][0, 1:])
    # what the Trainer counts as the step's answer tokens (labels[:, 1:]) is the same for both collators
    padded = AnswerCollator(pad_id=tokenizer.pad_token_id)(feats)
    n = sum(map(len, answers))
    assert (batch["labels"][:, 1:] != IGNORE).sum() == (padded["labels"][:, 1:] != IGNORE).sum() == n


def test_a_row_never_learns_from_the_row_before(tokenizer):
    """If a row started with an answer token, the previous row's last position must not be asked to predict it."""
    feats = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = PackedCollator()(feats)
    assert batch["logits_to_keep"].tolist() == [0, 1, 3]  # predicts 6, 7 and (inside row 2) 9; never 8
    assert batch["labels"][0, 1:].tolist() == [6, 7, 9]


def test_packed_rows_attend_only_within_themselves(tokenizer, model_factory):
    model = model_factory(seed=5)
    feats = features(tokenizer)
    batch = PackedCollator()(feats)
    batch.pop("labels"), batch.pop("logits_to_keep")
    with torch.no_grad(), packed_rows(model):
        packed = model(**batch).logits[0]
        other = dict(batch, input_ids=batch["input_ids"].clone())
        other["input_ids"][0, :len(feats[0]["input_ids"])] = 42  # a different first row
        packed_other = model(**other).logits[0]
    assert model.config._attn_implementation == "sdpa"  # back to what scoring needs
    start = 0
    for f in feats:
        n = len(f["input_ids"])
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
        torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-4, atol=1e-4)
        start += n
    n0 = len(feats[0]["input_ids"])
    assert not torch.allclose(packed[:n0], packed_other[:n0])
    torch.testing.assert_close(packed[n0:], packed_other[n0:], rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, batch):
    batch = dict(batch)
    labels = batch.pop("labels")
    model.zero_grad()
    loss = answer_loss(model(**batch), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_batch_gives_the_padded_loss_and_lora_gradients(tokenizer, model_factory):
    model = add_lora(model_factory(seed=7), LoraConfig(r=4, dropout=0.0))
    for n, p in model.named_parameters():  # B starts at zero; give the adapters a state where gradients differ
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    feats = features(tokenizer)
    padded_loss, padded = _loss_and_grads(model, AnswerCollator(pad_id=tokenizer.pad_token_id)(feats))
    with packed_rows(model):
        packed_loss, packed = _loss_and_grads(model, PackedCollator()(feats))
    assert padded_loss.item() > 1.0
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert packed.keys() == padded.keys() and len(packed) == 2 * 7 * 2
    for n in padded:
        assert padded[n].abs().max() > 0, n
        torch.testing.assert_close(packed[n], padded[n], rtol=1e-4, atol=1e-6)


def test_padding_to_a_graph_shape_changes_neither_loss_nor_gradients(tokenizer, model_factory):
    """train.cuda_graphs pads each packed step up to a multiple of a bucket, as a continuation of the last row: the
    real tokens must compute exactly what they compute unpadded, and the bounds and longest row take the padded
    length (the shapes a recorded graph is keyed on)."""
    model = add_lora(model_factory(seed=7), LoraConfig(r=4, dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    feats = features(tokenizer)
    total = sum(len(f["input_ids"]) for f in feats)
    plain = PackedCollator()(feats)
    padded = PackedCollator(pad_multiple=64, pad_id=tokenizer.pad_token_id)(feats)
    n = padded["input_ids"].shape[1]
    assert n % 64 == 0 and total < n < total + 64 and padded["padding_tokens"] == n - total
    assert "padding_tokens" not in plain
    assert padded["cu_seq_lens_q"].tolist() == [*plain["cu_seq_lens_q"][:-1].tolist(), n]
    assert padded["max_length_q"] == padded["max_length_k"] == n
    assert padded["input_ids"][0, total:].eq(tokenizer.pad_token_id).all()
    assert padded["position_ids"][0, total - 1] + 1 == padded["position_ids"][0, total]  # the last row goes on
    assert torch.equal(padded["labels"], plain["labels"]) and torch.equal(padded["logits_to_keep"], plain["logits_to_keep"])
    with packed_rows(model):
        plain_loss, plain_grads = _loss_and_grads(model, plain)
        pad_loss, pad_grads = _loss_and_grads(model, {k: v for k, v in padded.items() if k != "padding_tokens"})
    assert plain_loss.item() > 1.0
    torch.testing.assert_close(pad_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for k in plain_grads:
        assert plain_grads[k].abs().max() > 0, k
        torch.testing.assert_close(pad_grads[k], plain_grads[k], rtol=1e-4, atol=1e-6)
    # a total already on the multiple gets no padding
    exact = PackedCollator(pad_multiple=total)(feats)
    assert exact["padding_tokens"] == 0 and exact["input_ids"].shape[1] == total


def test_answer_loss_refuses_labels_from_elsewhere(tokenizer, model_factory):
    model = model_factory()
    batch = AnswerCollator(pad_id=tokenizer.pad_token_id)(features(tokenizer))
    batch.pop("labels")
    with pytest.raises(ValueError, match="do not match the kept logits"):
        answer_loss(model(**batch), torch.full((4, 3), IGNORE))


def test_packed_attention_without_boundaries_is_a_clear_error(model_factory):
    model = model_factory()
    with packed_rows(model), pytest.raises(ValueError, match="PackedCollator"):
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert model.config._attn_implementation == "sdpa"


def test_rows_longer_than_a_sliding_window_are_refused(tokenizer):
    from conftest import tiny_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = tiny_model().config.to_dict()
    cfg.update(use_sliding_window=True, sliding_window=4, max_window_layers=0, layer_types=None)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    batch = PackedCollator()(features(tokenizer)[:2])
    batch.pop("labels")
    with packed_rows(model), pytest.raises(ValueError, match="sliding window"):
        model(**batch)


def test_packed_training_counts_the_same_tokens_and_learns(tokenizer, model_factory, tmp_path):
    """Through the Trainer (as `llmcls train` runs it): every token counted once per epoch, no padding; the same
    losses as the padded run, step by step (dropout off, same seed, same row order)."""
    from llmcls.trainer import build_trainer, training_arguments

    torch.manual_seed(0)
    feats = features(tokenizer) * 3
    cfg = load_config(None, {"model.name_or_path": "tiny", "train.batch_size": "4", "train.grad_accum": "1",
                             "train.epochs": "2", "train.logging_steps": "1", "train.save_steps": "0",
                             "train.lr": "1e-2", "track.tracker": "none"})

    runs = {}
    # (packing, pad_multiple): padded rows, packed rows, packed rows padded up to graph shapes (train.cuda_graphs)
    for packing, pad in ((False, 0), (True, 0), (True, 64)):
        model = add_lora(model_factory(seed=1), LoraConfig(r=4, dropout=0.0))
        log = LoggedLosses()
        trainer = build_trainer(model, tokenizer, feats, training_arguments(cfg, tmp_path / f"{packing}{pad}",
                                                                            progress=False),
                                callbacks=[log], packing=packing, pad_multiple=pad)
        trainer.train()
        assert model.get_base_model().config._attn_implementation == "sdpa"  # as before the training
        runs[packing, pad] = (trainer.state.num_input_tokens_seen, log.seen)
    tokens = sum(len(f["input_ids"]) for f in feats)
    assert runs[True, 0][0] == runs[False, 0][0] == runs[True, 64][0] == 2 * tokens  # the padding is not counted
    torch.testing.assert_close(runs[True, 64][1], runs[True, 0][1], rtol=1e-4, atol=1e-4)
    padded, packed = runs[False, 0][1], runs[True, 0][1]
    assert len(packed) == len(padded) == 6 and packed[-1] < packed[0]
    for a, b in zip(padded, packed):
        assert abs(a - b) < 1e-3 * max(1.0, abs(a)), (padded, packed)


def test_packing_is_a_config_key_llmcls_train_uses(tokenizer_dir, learnable_data, tmp_path):
    from llmcls.recipes.train import train

    opts = {"model.name_or_path": "tiny", "data.train_file": str(learnable_data["train"]),
            "data.test_file": str(learnable_data["test"]), "data.max_length": "128", "lora.r": "4",
            "train.output_dir": str(tmp_path / "run"), "train.max_steps": "3", "train.batch_size": "8",
            "train.grad_accum": "1", "train.save_steps": "0", "train.packing": "true", "track.tracker": "none"}
    seen = []

    class Batches(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.append(kw["model"].get_base_model().config._attn_implementation)

    out = train(load_config(None, opts), progress=False, callbacks=[Batches()])
    assert seen == [PACKED_ATTENTION] * 3
    assert out["global_step"] == 3 and out["tokens_seen"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (FlashAttention's varlen kernel)")
def test_varlen_kernel_on_a_gpu_matches_the_padded_batch(tokenizer, model_factory):
    """On a GPU the packed path runs torch's variable-length FlashAttention; in bf16 its loss and LoRA gradients
    agree with the padded sdpa path within bf16 tolerance, compiled (as the fast config runs it) or not."""
    from llmcls.model.attention import _varlen_attn
    from llmcls.model.compiling import compile_layers

    assert _varlen_attn() is not None, "torch.nn.attention.varlen is missing (torch >= 2.10 has it)"
    feats = features(tokenizer) * 4
    for compiled in (False, True):
        model = add_lora(model_factory(seed=7).to("cuda", torch.bfloat16), LoraConfig(r=4, dropout=0.0))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        if compiled:
            compile_layers(model)
        to = lambda b: {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
        padded_loss, padded = _loss_and_grads(model, to(AnswerCollator(pad_id=tokenizer.pad_token_id)(feats)))
        with packed_rows(model):
            packed_loss, packed = _loss_and_grads(model, to(PackedCollator()(feats)))
            again, _ = _loss_and_grads(model, to(PackedCollator()(feats[3:] + feats[:3])))  # another shape
        assert abs(packed_loss.item() - padded_loss.item()) < 2e-2 * padded_loss.item(), compiled
        assert abs(again.item() - packed_loss.item()) < 2e-2 * packed_loss.item()
        for n in padded:
            cos = torch.nn.functional.cosine_similarity(packed[n].flatten().float(), padded[n].flatten().float(), 0)
            assert cos > 0.98, (n, compiled, cos.item())


def test_a_gpu_torch_without_varlen_is_told_packing_falls_back(model_factory, monkeypatch, caplog):
    import llmcls.model.attention as m

    monkeypatch.setattr(m, "_varlen_attn", lambda: None)
    monkeypatch.setattr(m, "compute_device", lambda model: torch.device("cuda"))
    with caplog.at_level("WARNING", logger="llmcls.model.attention"), packed_rows(model_factory()):
        pass
    assert "dense mask" in caplog.text and "torch >= 2.10" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (its attention kernels)")
def test_padded_training_batches_give_finite_gradients_on_a_gpu(tokenizer, model_factory):
    """Left-padded training rows (the generative padded path) give the pads queries with nothing to attend to;
    a seq_cls run on an H200 went NaN with such batches (docs/bench/seqcls_vs_generative-run1-nan.log). Rows of
    very different lengths, bf16, eager and compiled: the loss and every LoRA gradient must stay finite, for the
    left-padded answer batches and for seq_cls's right-padded ones."""
    from llmcls import seqcls
    from llmcls.model.compiling import compile_layers

    feats = features(tokenizer) * 4  # rows of 20-70 tokens: the short ones get many pads
    for compiled in (False, True):
        model = add_lora(model_factory(seed=7).to("cuda", torch.bfloat16), LoraConfig(r=4, dropout=0.0))
        if compiled:
            compile_layers(model)
        to = lambda b: {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
        batch = to(AnswerCollator(pad_id=tokenizer.pad_token_id)(feats))
        assert (batch["attention_mask"][:, 0] == 0).any()  # left padding is really there
        loss, grads = _loss_and_grads(model, batch)
        assert torch.isfinite(loss), compiled
        assert all(torch.isfinite(g).all() for g in grads.values()), compiled

        seq = add_lora(seqcls.from_causal(model_factory(seed=7), tokenizer, ["A", "B"]).to("cuda", torch.bfloat16),
                       LoraConfig(r=4, dropout=0.0, task="seq_cls"))
        if compiled:
            compile_layers(seq)
        rows = to(seqcls.LabelCollator(tokenizer.pad_token_id)(
            [{"input_ids": f["input_ids"], "class": i % 2} for i, f in enumerate(feats)]))
        labels = rows.pop("labels")
        out = seq(**rows)
        seqcls.LabelLoss()(out, labels).backward()
        assert all(torch.isfinite(p.grad).all() for p in seq.parameters() if p.grad is not None), compiled
