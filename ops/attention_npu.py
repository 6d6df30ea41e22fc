"""The ``npu`` back end of ``fluid_attention``: torch_npu's fused attention kernels, directly.

Training (and any call needing gradients) runs ``torch_npu.npu_fusion_attention``, which has its own
backward, over the blocks of ``fluid_ops.attention.plan_blocks``: the Stage I main stream as one
causal square through ``sparse_mode=2`` (leftUpCausal, the causal triangle anchored at the top-left
corner, i.e. SDPA's ``is_causal``; on a square it equals 3, rightDownCausal) with the documented
compressed ``triu(ones(2048, 2048), 1)`` mask, and every other block with an explicit mask and
``sparse_mode=0``. Cached inference (keys longer than queries, no gradient, fp16/bf16, head dim a
multiple of 16 as the prefill kernel requires) runs ``torch_npu.npu_fused_infer_attention_score``
once with the full mask: the new tokens are few, so one launch beats blocking.

Conventions of both vendor ops, unlike SDPA (op-plugin docs, ``docs/context/torch_npu-*.md``):
``atten_mask`` is bool with **True = masked out**, ``scale`` defaults to 1.0 and is always passed,
``input_layout="BNSD"``, GQA is native (``head_num`` = query heads; the inference op also takes
``num_key_value_heads``). A fully masked row loses precision unless ``inner_precise=2`` (which the
docs say costs speed), so no row we hand over is ever fully masked: rows without a visible key are
opened to every key and zeroed afterwards, the same rule as the other back ends.

torch_npu is reached only through ``fluid_ops.dispatch.load_torch_npu()`` so tests can inject a CPU
emulation of the documented semantics and check the exact arguments.

Both ops take the softmax scale as ``scale`` in every torch_npu release that has them (op-plugin's
``op_plugin_functions.yaml``, 6.0.rc1 to master; ``scale_value`` belongs to the older
``npu_prompt_flash_attention`` / ``npu_incre_flash_attention``, which we do not call), so it is
passed by that name.
"""

from __future__ import annotations

from types import ModuleType

import torch

from fluid_ops import dispatch
from fluid_ops.attention_blocked import run_blocks, zero_rows
from fluid_ops.attention_plan import Block, safe_mask
from fluid_ops.meta import AttnMeta, cached_plan, visibility

# Slot queries per fused call: each launch costs more than on a CPU; 1024 is what measured best for
# the blocked back end on an H100 (the nearest analogue we could time), not yet tuned on a 910B.
NPU_CHUNK = 1024
COMPRESSED_CAUSAL = 2048  # side of the compressed causal mask that sparse_mode 2/3 take
LEFT_UP_CAUSAL = 2  # sparse_mode: query i sees keys j <= i (SDPA's is_causal)
EXPLICIT_MASK = 0  # sparse_mode: the full atten_mask is applied as given
_CAUSAL_MASKS: dict[torch.device, torch.Tensor] = {}


def compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The documented ``triu(ones(2048, 2048), diagonal=1)`` bool mask (cached per device)."""
    if device not in _CAUSAL_MASKS:
        ones = torch.ones(COMPRESSED_CAUSAL, COMPRESSED_CAUSAL, dtype=torch.bool, device=device)
        _CAUSAL_MASKS[device] = torch.triu(ones, diagonal=1)
    return _CAUSAL_MASKS[device]


def npu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttnMeta,
    scale: float,
    chunk: int = NPU_CHUNK,
) -> torch.Tensor:
    """FLUID attention through torch_npu (shapes and semantics of ``fluid_attention``)."""
    npu = dispatch.load_torch_npu()
    if _use_infer_kernel(q, k, v):
        return _infer(npu, q, k, v, meta, scale)
    return run_blocks(
        q, k, v, meta, chunk, lambda qs, ks, vs, blk: _fusion(npu, qs, ks, vs, blk, scale)
    )


def _use_infer_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Cached inference the prefill/decode kernel supports: no gradient, fp16/bf16, D % 16 == 0."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (
        k.shape[2] > q.shape[2]
        and not needs_grad
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 16 == 0
    )


def _fusion(
    npu: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk: Block, scale: float
) -> torch.Tensor:
    if blk.causal:
        mask, mode = compressed_causal_mask(q.device), LEFT_UP_CAUSAL
    else:
        mask, mode = (~blk.mask)[:, None], EXPLICIT_MASK  # B1SS, True = masked out
    result = npu.npu_fusion_attention(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        q.shape[1],
        "BNSD",
        atten_mask=mask,
        scale=scale,
        sparse_mode=mode,
    )
    return result[0]  # (out, softmax_max, softmax_sum, reserved, seed, offset, numels)


def _infer(
    npu: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, scale: float
) -> torch.Tensor:
    # every layer of a decoding step shares the metadata: one mask per step (``cached_plan``)
    masked_out, keep = cached_plan(meta, ("npu_infer", str(q.device)), lambda: _infer_mask(meta))
    out, _lse = npu.npu_fused_infer_attention_score(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        atten_mask=masked_out,  # B1SS, True = masked out
        num_heads=q.shape[1],
        num_key_value_heads=k.shape[1],
        scale=scale,
        input_layout="BNSD",
        sparse_mode=EXPLICIT_MASK,
    )
    return zero_rows(out, keep)


def _infer_mask(meta: AttnMeta) -> tuple[torch.Tensor, torch.Tensor]:
    mask, keep = safe_mask(visibility(meta))
    return (~mask)[:, None], keep  # B1SS, True = masked out
