"""torch_npu's attention ops as every release declares them, and (on an Ascend host) for real.

The keywords our two calls pass must be names in op-plugin's published schema
(``op_plugin_functions.yaml``) of the first release that has both ops (6.0.rc1) and of a current one
(26.0.0): a wrong name — e.g. ``scale_value``, which belongs to the older prompt / incremental
flash-attention ops, not to ``npu_fused_infer_attention_score`` — raises on a real NPU, where no
CPU test would see it. On an Ascend host the real kernels are checked against float64 as well.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from fluid_npu import device as devices

# Argument names of the two ops in op-plugin's schema (the published API facts), per release
FUSION_6_0_RC1 = [
    "query",
    "key",
    "value",
    "head_num",
    "input_layout",
    "pse",
    "padding_mask",
    "atten_mask",
    "scale",
    "keep_prob",
    "pre_tockens",
    "next_tockens",
    "inner_precise",
    "prefix",
    "actual_seq_qlen",
    "actual_seq_kvlen",
    "sparse_mode",
    "gen_mask_parallel",
    "sync",
]
FUSION_26_0 = [*FUSION_6_0_RC1, "softmax_layout", "sink", "dropout_mask", "seed", "offset"]
INFER_6_0_RC1 = [
    "query",
    "key",
    "value",
    "pse_shift",
    "atten_mask",
    "actual_seq_lengths",
    "actual_seq_lengths_kv",
    "antiquant_scale",
    "antiquant_offset",
    "block_table",
    "dequant_scale1",
    "quant_scale1",
    "dequant_scale2",
    "quant_scale2",
    "quant_offset2",
    "query_padding_size",
    "kv_padding_size",
    "num_heads",
    "scale",
    "pre_tokens",
    "next_tokens",
    "input_layout",
    "num_key_value_heads",
    "sparse_mode",
    "inner_precise",
    "block_size",
    "antiquant_mode",
    "softmax_lse_flag",
]
INFER_26_0 = [
    *INFER_6_0_RC1,
    *[
        "key_antiquant_scale",
        "key_antiquant_offset",
        "value_antiquant_scale",
        "value_antiquant_offset",
    ],
    *[
        "key_shared_prefix",
        "value_shared_prefix",
        "actual_shared_prefix_len",
        "query_rope",
        "key_rope",
    ],
    *["key_rope_antiquant_scale", "key_antiquant_mode", "value_antiquant_mode"],
]


def _spy(op, name: str, passed: list):
    def call(*args, **kwargs):
        passed.append((name, len(args), set(kwargs)))
        return op(*args, **kwargs)

    return call


@pytest.mark.parametrize("release", ["6.0.rc1", "26.0.0"])
def test_our_npu_attention_calls_use_only_names_every_release_declares(monkeypatch, release):
    from test_ops_attention import FakeTorchNpu, _qkv, cached_meta, stage1_meta

    from fluid_ops import attention_npu, dispatch

    fake = FakeTorchNpu()
    passed: list[tuple[str, int, set[str]]] = []  # (op, positional count, keywords) as called
    for name in ("npu_fusion_attention", "npu_fused_infer_attention_score"):
        fake.__dict__[name] = _spy(getattr(fake, name), name, passed)
    monkeypatch.setattr(dispatch, "load_torch_npu", lambda: fake)
    names = {
        "npu_fusion_attention": FUSION_6_0_RC1 if release == "6.0.rc1" else FUSION_26_0,
        "npu_fused_infer_attention_score": INFER_6_0_RC1 if release == "6.0.rc1" else INFER_26_0,
    }
    for meta, grad, dtype in (
        (stage1_meta([30, 22, 9], seed=2), True, torch.float32),  # training: the fusion op
        (cached_meta([12, 7], [4, 2]), False, torch.bfloat16),  # cached inference: the infer op
    ):
        q, k, v = _qkv(meta, 4, 2, d=32, dtype=dtype)
        with torch.set_grad_enabled(grad):
            attention_npu.npu_attention(q, k, v, meta, 1 / math.sqrt(32))
    assert {op for op, _, _ in passed} == set(names), passed
    for op, positional, keywords in passed:
        declared = names[op]
        assert keywords <= set(declared), (op, keywords - set(declared))
        # positional arguments fill the schema's leading names, never one passed by keyword too
        assert not keywords & set(declared[:positional]), (op, positional, keywords)
        assert "scale" in keywords  # the op's default is 1.0, never the model's
    # and the CPU emulation the other tests check our calls against takes no name the op lacks
    for op, declared in names.items():
        emulated = set(inspect.signature(getattr(FakeTorchNpu, op)).parameters) - {"self"}
        assert emulated <= set(declared), (op, release, emulated - set(declared))


@pytest.mark.skipif(
    not devices.is_npu_available(), reason="real-op check: this host has no NPU (the contract "
    "tests above cover the arguments)"
)  # fmt: skip
def test_the_installed_torch_npu_attention_matches_the_reference():
    """On an Ascend host: the real kernels (training and cached inference) against float64."""
    import math

    from test_ops_attention import _qkv, cached_meta, naive_attention, stage1_meta

    from fluid_ops import attention_npu

    device = devices.current().device
    for meta, grad in (
        (stage1_meta([30, 22, 9], seed=2), True),
        (cached_meta([12, 7], [4, 2]), False),
    ):
        q, k, v = _qkv(meta, 4, 2, d=64, dtype=torch.bfloat16)
        scale = 1 / math.sqrt(64)
        want = naive_attention(q, k, v, meta, scale)
        moved = type(meta)(
            *(getattr(meta, f).to(device) for f in ("q_pos", "q_anchor", "k_pos", "k_anchor")),
            meta.n_main,
        )
        with torch.set_grad_enabled(grad):
            got = attention_npu.npu_attention(
                q.to(device), k.to(device), v.to(device), moved, scale
            )
        torch.testing.assert_close(got.double().cpu(), want, atol=3e-2, rtol=3e-2)
