"""Triton kernel of the decode step's inputs (``fluid_npu.sampling.step_inputs``' ``triton`` back
end).

A decode step feeds each row its last committed token and its pending drafts (the main tokens,
at the row's next positions, ``PAD`` past its real drafts) and then one MASK block of ``k`` slots
per candidate accept length (slot ``s`` of the block anchored at length ``c`` sits at position
``length + c + s`` with anchor id ``length + c``; ``PAD`` where the row has no such block). The
torch rule builds that in 19 small ops with drafts and blocks, 6 for an AR step (clamps,
comparisons, the block placement, three concatenations); here one program per row writes its ids,
positions and anchor ids, and the clamped draft counts and live candidate lengths the rest of the
step reads.

One source for CUDA and triton-ascend (no ``tl.dot``, no atomics, 1-D grid); under
``TRITON_INTERPRET=1`` it runs on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fluid_ops.meta import MAIN, PAD


# (one compiled variant per power of two of the width and of the blocks, whatever the sizes)
@triton.jit(do_not_specialize=["big_m", "n_blocks", "k", "w", "mask_id", "d_stride", "c_stride"])
def _step_inputs_kernel(
    last_ptr,  # [B] int64: each row's last committed token
    drafts_ptr,  # [B, >= big_m] int64, row stride d_stride: its pending drafts
    base_ptr,  # [B] int64: committed entries (the last token's position + 1)
    m_ptr,  # [B] int64: pending drafts per row
    run_ptr,  # [B] bool (as uint8): the row decodes
    cand_ptr,  # [B, >= n_blocks] int64, row stride c_stride: candidate accept lengths, -1 none
    ids_ptr,  # [B, W] int64 out
    pos_ptr,  # [B, W] int64 out
    anchor_ptr,  # [B, W] int64 out
    m_out_ptr,  # [B] int64 out: the pending drafts this step verifies
    cand_out_ptr,  # [B, n_blocks] int64 out: the blocks it drafts (-1 where the row does not run)
    big_m,
    n_blocks,
    k,  # the block length, at least 1 (k = 0 places no block column: w says so)
    w,  # the row's width, big_m + 1 + n_blocks * (the real k)
    mask_id,
    d_stride,
    c_stride,
    MAIN_: tl.constexpr,
    PAD_: tl.constexpr,
    BLOCK_W: tl.constexpr,  # a power of two >= W
    BLOCK_C: tl.constexpr,  # a power of two >= n_blocks
):
    b = tl.program_id(0).to(tl.int64)
    run = tl.load(run_ptr + b) != 0
    base = tl.load(base_ptr + b)
    m = tl.where(run, tl.minimum(tl.load(m_ptr + b), big_m), 0)
    tl.store(m_out_ptr + b, m)
    blocks = tl.arange(0, BLOCK_C)
    cand = tl.load(cand_ptr + b * c_stride + blocks, mask=blocks < n_blocks, other=-1)
    cand = tl.where(run, cand, -1)
    tl.store(cand_out_ptr + b * n_blocks + blocks, cand, mask=blocks < n_blocks)
    t = tl.arange(0, BLOCK_W)
    main = t <= big_m
    # the main tokens: v_0 (the last token), then the drafts, at the row's next positions
    draft = tl.load(drafts_ptr + b * d_stride + (t - 1), mask=main & (t >= 1), other=0)
    last = tl.load(last_ptr + b)
    ids = tl.where(t == 0, last, draft)
    pos = base + t
    anchor = tl.where(run & (t <= m), MAIN_, PAD_)
    # the blocks: slot s = 1 … k of the block of candidate length c at base + max(c, 0) + s
    u = tl.maximum(t - (big_m + 1), 0)
    blk = u // k
    c = tl.load(cand_ptr + b * c_stride + blk, mask=(~main) & (t < w), other=-1)
    c = tl.where(run, c, -1)
    ids = tl.where(main, ids, mask_id)
    pos = tl.where(main, pos, base + tl.maximum(c, 0) + (u % k) + 1)
    anchor = tl.where(main, anchor, tl.where(c >= 0, base + tl.maximum(c, 0), PAD_))
    out = b * w + t
    tl.store(ids_ptr + out, ids, mask=t < w)
    tl.store(pos_ptr + out, pos, mask=t < w)
    tl.store(anchor_ptr + out, anchor, mask=t < w)


def step_inputs(
    last: torch.Tensor,
    drafts: torch.Tensor,
    base: torch.Tensor,
    m: torch.Tensor,
    run: torch.Tensor,
    cand: torch.Tensor,
    k: int,
    mask_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, pos, anchor, m, cand)`` of ``fluid_npu.sampling.step_inputs.step_inputs_torch`` in
    one launch (``drafts`` / ``cand`` may be row slices of wider tensors)."""
    hi, big_m = drafts.shape
    n_blocks = cand.shape[1]
    w = big_m + 1 + n_blocks * k
    dev = last.device
    ids, pos, anchor = (torch.empty((hi, w), dtype=torch.long, device=dev) for _ in range(3))
    m_out = torch.empty(hi, dtype=torch.long, device=dev)
    cand_out = torch.empty((hi, n_blocks), dtype=torch.long, device=dev)
    if hi == 0:
        return ids, pos, anchor, m_out, cand_out
    drafts = drafts if drafts.stride(1) == 1 or big_m == 0 else drafts.contiguous()
    cand = cand if cand.stride(1) == 1 or n_blocks == 0 else cand.contiguous()
    _step_inputs_kernel[(hi,)](
        last.contiguous(),
        drafts,
        base.contiguous(),
        m.contiguous(),
        run.contiguous().view(torch.uint8),
        cand,
        ids,
        pos,
        anchor,
        m_out,
        cand_out,
        big_m,
        n_blocks,
        max(k, 1),  # (a divisor: with k = 0 no column is a block's, w = big_m + 1)
        w,
        mask_id,
        drafts.stride(0) if big_m else 0,
        cand.stride(0) if n_blocks else 0,
        MAIN_=MAIN,
        PAD_=PAD,
        BLOCK_W=triton.next_power_of_2(w),
        BLOCK_C=triton.next_power_of_2(max(n_blocks, 1)),
    )
    return ids, pos, anchor, m_out, cand_out
