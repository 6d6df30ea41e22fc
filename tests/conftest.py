"""Shared pytest fixtures: tiny random models and tokenizers, built offline in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval tests load local JSON through datasets
# Triton reads TRITON_INTERPRET once, at its first import (transformers may import it): the CPU
# suite runs every Triton kernel under the interpreter. On a GPU host run `TRITON_INTERPRET=0
# pytest -m gpu` for the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny

# Tiny models gain nothing from intra-op threads, and a contended 2-core machine (or a
# 2-process gloo test) slows down badly when each process spins several.
torch.set_num_threads(1)


def tiny_stage1_recipe(base, data, **extra: object) -> dict[str, object]:
    """The tiny Stage I run the training tests share (tiny model, demo data, LoRA r8, k_max 4)."""
    values: dict[str, object] = dict(
        stage="fluid_stage1",
        model_name_or_path=str(base),
        dataset="fluid_demo",
        dataset_dir=str(data),
        template="empty",
        cutoff_len=64,
        k_masks=4,
        lora_rank=8,
        lora_alpha=16,
        learning_rate=1e-2,
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    values.update(extra)
    return values


def as_overrides(values: dict[str, object]) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer(mask_token=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer (no MASK token: Stage I adds one)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture
def make_model():
    def make(arch: str = "llama", tok=None, **kwargs):
        return build_tiny_model(
            arch, tok if tok is not None else build_tiny_tokenizer(mask_token=True), **kwargs
        )

    return make


def pytest_collection_modifyitems(config, items):
    """`gpu` tests exercise compiled kernels: under the Triton interpreter they would not."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="compiled-kernel test: run `TRITON_INTERPRET=0 pytest -m gpu`")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
