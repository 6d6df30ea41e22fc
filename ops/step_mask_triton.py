"""Triton kernel of the decode engine's step mask (``fluid_ops.step_mask``'s ``triton`` back end).

The torch rule builds the bool mask ``[B, 1, W, extent]`` of a forward whose ``W`` new tokens sit
at cache indices ``length_b + t`` in about thirty small tensor ops (the §1.1 visibility of the new
tokens among themselves, gathered into the key range, the committed entries, and the empty-row
fix); on an eager accelerator each is a kernel launch, paid twice in a loaded FLUID step (the
decode forward and the prefill forward with its first drafts) however small the batch. Here it is
one launch: a program per (row, query) walks the key range in ``BLOCK`` columns, reading the key's
position and anchor from the row's own new tokens, and opens key 0 when nothing else is visible.

One source for CUDA and triton-ascend (no ``tl.dot``, no atomics, 2-D grid); under
``TRITON_INTERPRET=1`` it runs on CPU tensors (tests). The result equals the torch rule bit for
bit (booleans), for any metadata, valid or not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fluid_ops.meta import MAIN, PAD

BLOCK = 128  # key columns a program handles per iteration


@triton.jit
def _visible(
    j, length, pos_row, anchor_row, qp, qa, W, extent, MAIN_: tl.constexpr, PAD_: tl.constexpr
):
    """Which keys ``j`` (a block of cache indices) the query ``(qp, qa)`` sees: the committed
    entries (a real query), and the new tokens by §1.1's rule."""
    inside = j < extent
    rel = j - length  # index among the new tokens
    in_new = (rel >= 0) & (rel < W)
    t = tl.minimum(tl.maximum(rel, 0), W - 1)
    kp = tl.load(pos_row + t, mask=inside, other=0)
    ka = tl.load(anchor_row + t, mask=inside, other=PAD_)
    q_main = qa == MAIN_
    q_slot = qa >= 0
    limit = tl.where(q_main, qp, qa)  # a main query sees main keys up to its own position
    see_main = (ka == MAIN_) & (q_main | q_slot) & (kp <= limit)
    see_slot = (ka >= 0) & q_slot & (ka == qa) & (kp <= qp)
    vis = ((rel < 0) & (qa != PAD_)) | ((see_main | see_slot) & in_new)
    # the torch rule's one-token step: a real query sees itself whatever its anchor says
    vis = vis | ((W == 1) & (rel == 0) & (qa != PAD_))
    return vis & inside


# (one compiled variant whatever the width and key range: no compile stalls as shapes change)
@triton.jit(do_not_specialize=["W", "extent"])
def _step_mask_kernel(
    length_ptr,  # [B] int64: committed entries per row (the new tokens' first cache index)
    pos_ptr,  # [B, W] int64: the new tokens' positions
    anchor_ptr,  # [B, W] int64: their anchors (MAIN, PAD, or a slot's anchor position)
    out_ptr,  # [B, W, extent] uint8: 1 = the query may attend the key
    W,
    extent,
    MAIN_: tl.constexpr,
    PAD_: tl.constexpr,
    BLOCK_: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # (int64: B·W·extent passes 2³¹ in a long prefill)
    q = tl.program_id(1).to(tl.int64)
    length = tl.load(length_ptr + b)
    pos_row = pos_ptr + b * W
    anchor_row = anchor_ptr + b * W
    qp = tl.load(pos_row + q)
    qa = tl.load(anchor_row + q)
    # first whether the query sees anything at all (a padding query does not: it is opened to
    # key 0, so no softmax is empty), then the row, written once
    seen = tl.zeros([BLOCK_], dtype=tl.int32)
    for start in range(0, extent, BLOCK_):
        j = start + tl.arange(0, BLOCK_)
        seen += _visible(j, length, pos_row, anchor_row, qp, qa, W, extent, MAIN_, PAD_).to(
            tl.int32
        )
    none = tl.sum(seen, axis=0) == 0
    out_row = out_ptr + (b * W + q) * extent
    for start in range(0, extent, BLOCK_):
        j = start + tl.arange(0, BLOCK_)
        vis = _visible(j, length, pos_row, anchor_row, qp, qa, W, extent, MAIN_, PAD_)
        vis = vis | (none & (j == 0))
        tl.store(out_row + j, vis.to(tl.uint8), mask=j < extent)


def step_mask(
    length: torch.Tensor, q_pos: torch.Tensor, q_anchor: torch.Tensor, extent: int
) -> torch.Tensor:
    """``fluid_ops.step_mask.step_mask_torch``'s mask ``[B, 1, W, extent]`` in one launch."""
    b, w = q_pos.shape
    out = torch.empty((b, w, extent), dtype=torch.uint8, device=q_pos.device)
    if b == 0 or w == 0 or extent == 0:
        return out.view(torch.bool)[:, None]
    _step_mask_kernel[(b, w)](
        length.to(torch.int64).contiguous(),
        q_pos.to(torch.int64).contiguous(),
        q_anchor.to(torch.int64).contiguous(),
        out,
        w,
        extent,
        MAIN_=MAIN,
        PAD_=PAD,
        BLOCK_=BLOCK,
    )
    return out.view(torch.bool)[:, None]
