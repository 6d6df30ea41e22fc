"""Shared pytest fixtures: tiny random models and tokenizers, built offline in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval tests load local JSON through datasets
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from fluid_npu.device import is_cuda_available, is_npu_available

# Triton reads TRITON_INTERPRET once, at its first import (transformers may import it, so this comes
# first): on a host without a GPU (CUDA, or an NPU with triton-ascend) every Triton kernel runs
# under the interpreter; on a GPU host the kernels compile and the `gpu` tests run.
HAS_GPU = is_cuda_available() or is_npu_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny  # noqa: E402

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


# the longest files (two-process runs, the demo) first: `run_npu.sh test` hands whole files to its
# workers in this order, so they end together instead of one running a long file alone at the end
FIRST = (
    "test_scale_sharded.py",
    "test_scale_sharded_zero3.py",
    "test_scale_zero3_added_mask.py",
    "test_demo.py",
    "test_serve_dp.py",
    "test_scale_distributed.py",
)


def pytest_collection_modifyitems(config, items):
    """The longest files first (``FIRST``); `gpu` tests run compiled kernels on CUDA: they need a
    CUDA device and no interpreter."""
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # (stable: files keep order)
    if not is_cuda_available():
        reason = "compiled CUDA kernels: this host has no CUDA device"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        reason = "compiled CUDA kernels: TRITON_INTERPRET=1 was set; unset it to run them"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
