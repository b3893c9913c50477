"""Model resolution: local folder, ModelScope (offline switch honoured), Hugging Face; dtypes; tiny preset."""

import pytest
import torch

from llmcls.config import ModelConfig
from llmcls.model import ModelNotFound, resolve_dtype, resolve_model_path


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
    from llmcls.model import build_tiny

    path = build_tiny(TinyConfig(), tokenizer, tmp_path / "tiny", seed=0)
    m = AutoModelForCausalLM.from_pretrained(path)
    assert m.config.model_type == "qwen2" and m.config.num_hidden_layers == 2 and m.config.hidden_size == 64
    assert m.get_input_embeddings().weight.shape[0] >= len(tokenizer)
