"""The random-init ``tiny`` preset and the exact Qwen tokenizer rebuilt from a PyPI wheel: what lets every stage
run and be tested on a CPU with no model hub (the tests, the demo)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional

import torch

from llmcls.config import TinyConfig
from llmcls.files import atomic_dir, atomic_open

log = logging.getLogger(__name__)

TINY = "tiny"
QWEN_VOCAB = 151936  # embedding width of Qwen1.5/Qwen2 models (the tokenizer itself has 151,646 tokens)
# Qwen's BPE split pattern, from the model card; with qwen.tiktoken it rebuilds the Qwen tokenizer exactly.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DASHSCOPE_PIN = "dashscope==2.0.2"  # a PyPI wheel that ships Qwen's BPE ranks (resources/qwen.tiktoken)


def cache_root() -> Path:
    return Path(os.environ.get("LLMCLS_CACHE", Path.home() / ".cache" / "llmcls"))


def build_qwen_tokenizer(out_dir: Path, tiktoken_file: Optional[Path] = None) -> Path:
    """Rebuild the exact Qwen tokenizer from Qwen's BPE ranks, which the ``dashscope`` wheel on PyPI ships.
    Only that one file is taken from the wheel (``pip download --no-deps``), not the package's dependencies."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if tiktoken_file is None:
        wheel_dir = cache_root() / "wheels"
        wheels = sorted(wheel_dir.glob("dashscope-*.whl"))
        if not wheels:
            log.info("downloading %s from PyPI for Qwen's tokenizer ranks", DASHSCOPE_PIN)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                            "-d", str(wheel_dir), DASHSCOPE_PIN], check=True)
            wheels = sorted(wheel_dir.glob("dashscope-*.whl"))
        tiktoken_file = out_dir.parent / "qwen.tiktoken"
        with zipfile.ZipFile(wheels[-1]) as z, atomic_open(tiktoken_file, "wb") as fh:
            fh.write(z.read("dashscope/resources/qwen.tiktoken"))
    core = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=QWEN_PATTERN).converted()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=QWEN_CHAT_TEMPLATE,
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    with atomic_dir(out_dir, exists="keep") as tmp:  # another process finishing first built the same thing
        tok.save_pretrained(tmp)
    return out_dir


def qwen_tokenizer_dir() -> Path:
    """The Qwen tokenizer for the tiny preset: ``$LLMCLS_TOKENIZER``, else a cached build from PyPI."""
    env = os.environ.get("LLMCLS_TOKENIZER")
    if env:
        return Path(env)
    out = cache_root() / "qwen-tokenizer"
    if not (out / "tokenizer.json").is_file():
        build_qwen_tokenizer(out)
    return out


def build_tiny(tiny: TinyConfig, tokenizer, out_dir: Path, seed: int) -> Path:
    """Materialise the random-init tiny preset as an ordinary model folder, so that every later stage (eval,
    predict, export, serve) loads it like any other local model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=max(QWEN_VOCAB, len(tokenizer)), hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size, num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads, num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=4096, tie_word_embeddings=tiny.tie_word_embeddings,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    with atomic_dir(out_dir, exists="replace") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir

