"""Model resolution: local folder, ModelScope (offline switch honoured), Hugging Face; dtypes; tiny preset."""

import pytest
import torch

from llmcls.config import ModelConfig
from llmcls.model.load import ModelNotFound, resolve_dtype, resolve_model_path


def test_local_folder_skips_the_hub(tmp_path, monkeypatch):
    import modelscope

    monkeypatch.setattr(modelscope, "snapshot_download", lambda *a, **k: pytest.fail("hub was called"))
    assert resolve_model_path(ModelConfig(name_or_path=str(tmp_path))) == str(tmp_path)


@pytest.mark.parametrize("offline", [True, False])
def test_modelscope_id_uses_the_returned_path(monkeypatch, offline):
    import modelscope

    calls = []

    def fake(model_id, **kw):
        calls.append((model_id, kw))
        return "/cache/qwen/Qwen1.5-7B-Chat"

    monkeypatch.setattr(modelscope, "snapshot_download", fake)
    got = resolve_model_path(ModelConfig(name_or_path="qwen/Qwen1.5-7B-Chat", offline=offline))
    assert got == "/cache/qwen/Qwen1.5-7B-Chat"
    assert calls[0][0] == "qwen/Qwen1.5-7B-Chat" and calls[0][1]["local_files_only"] is offline


def test_offline_missing_model_is_a_clear_error(tmp_path):
    cfg = ModelConfig(name_or_path="nobody/not-cached", offline=True, cache_dir=str(tmp_path))
    with pytest.raises(ModelNotFound, match="nobody/not-cached"):
        resolve_model_path(cfg)
    with pytest.raises(ModelNotFound, match="Hugging Face"):
        resolve_model_path(ModelConfig(name_or_path="nobody/not-cached", source="huggingface", offline=True,
                                       cache_dir=str(tmp_path)))
    with pytest.raises(ModelNotFound, match="not found"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "nope"), source="local"))


def test_dtype_and_remote_code_defaults():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert ModelConfig().trust_remote_code is False


def test_tiny_preset_is_a_loadable_qwen2_folder(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmcls.config import TinyConfig
    from llmcls.model.tiny import build_tiny

    path = build_tiny(TinyConfig(), tokenizer, tmp_path / "tiny", seed=0)
    m = AutoModelForCausalLM.from_pretrained(path)
    assert m.config.model_type == "qwen2" and m.config.num_hidden_layers == 2 and m.config.hidden_size == 64
    assert m.get_input_embeddings().weight.shape[0] >= len(tokenizer)


def _untied_tiny(seed=0, hidden=32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def test_offloaded_embedding_table_stays_on_host_and_changes_nothing():
    from llmcls.model.load import HostEmbedding, compute_device, place_model

    ref = _untied_tiny()
    model = place_model(_untied_tiny(), "cpu", offload_embeddings=True)
    assert isinstance(model.get_input_embeddings(), HostEmbedding)
    assert list(model.state_dict()) == list(ref.state_dict())  # checkpoints keep their names
    ids = torch.randint(0, 151936, (2, 7))
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    assert not model.get_input_embeddings().weight.requires_grad
    # Moving the model moves every weight but the table: it is what the 16 GB mode keeps off the GPU.
    model.to("meta")
    assert model.get_input_embeddings().weight.device.type == "cpu"
    # model.device is where generate() moves its inputs: the layers' device, not the table's
    assert model.device.type == "meta"
    assert model.lm_head.weight.device.type == "meta" and compute_device(model).type == "meta"
    assert all(p.device.type == "meta" for n, p in model.named_parameters() if "embed_tokens" not in n)


def test_offloaded_embeddings_train_lora_and_leave_the_table_frozen():
    from llmcls.config import LoraConfig
    from llmcls.model.load import add_lora, place_model

    model = add_lora(place_model(_untied_tiny(), "cpu", offload_embeddings=True), LoraConfig(dropout=0.0))
    table = model.get_input_embeddings().weight.detach().clone()
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 151936, (2, 9))
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.get_input_embeddings().weight, table)
    assert all(not torch.equal(p, lora_b[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_a_4bit_base_with_its_table_on_the_host_scores_like_the_4bit_base(tokenizer, tmp_path):
    """quantize and offload_embeddings together: the first parameter is then a packed uint8 weight, so the
    compute dtype and device must come from the LM head (scoring built its mask in uint8 before)."""
    from llmcls.config import ModelConfig, PromptConfig
    from llmcls.data import Row
    from llmcls.encode import PromptBuilder
    from llmcls.infer import classify
    from llmcls.model.load import compute_device, compute_dtype, load_model

    _untied_tiny(seed=5, hidden=64).save_pretrained(tmp_path / "m")  # bitsandbytes' CPU kernel needs 64
    path = str(tmp_path / "m")
    both = load_model(ModelConfig(name_or_path=path, quantize="nf4", offload_embeddings=True), path, device="cpu")
    only4 = load_model(ModelConfig(name_or_path=path, quantize="nf4"), path, device="cpu")
    assert next(both.parameters()).dtype == torch.uint8  # the trap: the first parameter is a packed weight
    assert compute_dtype(both) == torch.float32 and compute_device(both).type == "cpu"
    b = PromptBuilder(tokenizer, PromptConfig())
    rows = [Row("the match ended 2-1", ["Sport", "Politics"], None), Row("a vote", ["Politics", "Arts"], None)]
    for x, y in zip(classify(only4, b, rows, progress=False), classify(both, b, rows, progress=False)):
        assert x.pred == y.pred and max(abs(x.probs[k] - y.probs[k]) for k in x.probs) < 1e-6


def test_offloading_a_tied_table_is_refused():
    from llmcls.config import ConfigError
    from llmcls.model.load import place_model

    from conftest import tiny_model

    with pytest.raises(ConfigError, match="ties its input embeddings"):
        place_model(tiny_model(), "cpu", offload_embeddings=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the table on the host, the rest on it)")
def test_offloaded_table_on_a_gpu_scores_generates_and_trains_like_the_whole_model(tokenizer):
    from llmcls.config import LoraConfig, PromptConfig
    from llmcls.data import Row
    from llmcls.encode import PromptBuilder
    from llmcls.infer import classify, generate_batch
    from llmcls.model.load import add_lora, compute_device, place_model

    ref = place_model(_untied_tiny(seed=3), "cuda")
    model = place_model(_untied_tiny(seed=3), "cuda", offload_embeddings=True)
    assert model.get_input_embeddings().weight.device.type == "cpu" and compute_device(model).type == "cuda"
    b = PromptBuilder(tokenizer, PromptConfig())
    rows = [Row("the match ended 2-1", ["Sport", "Politics"], None), Row("the vote was close", ["Politics", "Arts"],
                                                                         None)]
    for x, y in zip(classify(ref, b, rows, progress=False), classify(model, b, rows, progress=False)):
        assert x.pred == y.pred and max(abs(x.probs[k] - y.probs[k]) for k in x.probs) < 1e-5
    assert generate_batch(ref, b, rows, 4) == generate_batch(model, b, rows, 4)
    lora = add_lora(model, LoraConfig(dropout=0.0))
    ids = torch.randint(0, 151936, (2, 9), device="cuda")
    lora(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)


def test_wrapping_with_lora_warns_about_nothing_the_user_could_act_on():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model; the user would see
    that FutureWarning on every run and can do nothing about it."""
    import warnings

    from llmcls.config import LoraConfig
    from llmcls.model.load import add_lora

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        model = add_lora(_untied_tiny(), LoraConfig(dropout=0.0))
    assert any("lora_A" in n for n, _ in model.named_parameters())
