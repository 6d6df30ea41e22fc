"""Tiny random base models and a byte-level tokenizer, built offline in seconds.

The CPU demo and the test suite need real transformers models without downloading weights: this
module builds a byte-level BPE tokenizer (256 byte tokens, no merges, a ChatML-style chat template)
and small Llama / Qwen2 / Qwen3 / Mistral causal LMs sized for a laptop. Nothing here is a stub: the
models are stock transformers classes with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def build_tiny_tokenizer(
    *, mask_token: bool = False, reserved: int = 0, chat_template: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0–255 are bytes, then ``<s> </s> <pad> <|im_start|> <|im_end|>``.

    ``mask_token`` adds ``<mask>`` as the tokenizer's mask token; ``reserved`` adds that many
    ``[unusedN]`` special tokens (the openPangu convention) for the MASK resolution tests.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token=None,
    )
    extra = ["<|im_start|>", "<|im_end|>"] + [f"[unused{i}]" for i in range(reserved)]
    tok.add_special_tokens({"additional_special_tokens": extra})
    if mask_token:
        tok.add_special_tokens({"mask_token": "<mask>"})
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_config(arch: str, vocab_size: int, **overrides: object) -> PretrainedConfig:
    """A ~100k-parameter config of ``arch`` (GQA: 4 query heads, 2 KV heads, head dim 16)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")
    kwargs: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def build_tiny_model(
    arch: str = "llama",
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    **overrides: object,
) -> PreTrainedModel:
    """A randomly initialised causal LM of ``arch`` whose vocabulary matches ``tokenizer``."""
    tok = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    config = tiny_config(arch, len(tok), **overrides)
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


def save_tiny(
    directory: str | Path, arch: str = "llama", seed: int = 0, **tok_kwargs: bool
) -> Path:
    """Write a tiny model + tokenizer as a HF directory (safetensors) and return its path."""
    out = Path(directory)
    tok = build_tiny_tokenizer(**tok_kwargs)
    model = build_tiny_model(arch, tok, seed=seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
