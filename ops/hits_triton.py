"""Triton kernel of which candidate block the accepted length hit (``fluid_ops.hits``'s
``triton`` back end).

The torch rule compares every candidate length with the accepted one, takes the first hit, reduces
the rows and masks: five small ops, each a kernel launch on an eager accelerator, in every FLUID
decode step with blocks. Here one program per row reads its candidates and writes the block
to read, whether the row has it and its index.

One source for CUDA and triton-ascend (no ``tl.dot``, no atomics, 1-D grid); under
``TRITON_INTERPRET=1`` it runs on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# (one compiled variant per power of two of the candidates, whatever their count and stride)
@triton.jit(do_not_specialize=["n", "c_stride"])
def _hits_kernel(
    cand_ptr,  # [B, >= n] int64, row stride c_stride: candidate lengths, -1 none
    a_ptr,  # [B] int64: the accepted length
    run_ptr,  # [B] bool (as uint8): the row decodes
    cut_ptr,  # [B] bool (as uint8): its step was cut short (read when HAS_CUT)
    blk_ptr,  # [B] int64 out: the first block hit, 0 where none is
    has_ptr,  # [B] bool (as uint8) out: the row has that block
    hit_ptr,  # [B] int64 out: its index where it has it, else -1
    n,
    c_stride,
    HAS_CUT: tl.constexpr,
    BLOCK: tl.constexpr,  # a power of two >= n
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    cand = tl.load(cand_ptr + b * c_stride + c, mask=c < n, other=-1)
    a = tl.load(a_ptr + b)
    hit = (cand == a) & (c < n)
    first = tl.min(tl.where(hit, c, BLOCK), axis=0)
    found = first < BLOCK
    blk = tl.where(found, first, 0)
    has = found & (tl.load(run_ptr + b) != 0)
    if HAS_CUT:
        has = has & (tl.load(cut_ptr + b) == 0)
    tl.store(blk_ptr + b, blk.to(tl.int64))
    tl.store(has_ptr + b, has.to(tl.uint8))
    tl.store(hit_ptr + b, tl.where(has, blk, -1).to(tl.int64))


def block_hits(
    cand: torch.Tensor, a: torch.Tensor, run: torch.Tensor, cut: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(blk, has, hit)`` of ``fluid_ops.hits.block_hits_torch`` in one launch."""
    rows, n = cand.shape
    dev = cand.device
    blk = torch.empty(rows, dtype=torch.long, device=dev)
    has = torch.empty(rows, dtype=torch.bool, device=dev)
    hit = torch.empty(rows, dtype=torch.long, device=dev)
    if rows == 0:
        return blk, has, hit
    if n == 0:  # (no candidate: the torch rule's argmax of nothing is an error; the engine never
        raise ValueError("block_hits needs at least one candidate column")  # asks)
    cand = cand if cand.stride(1) == 1 else cand.contiguous()
    has_cut = cut is not None
    _hits_kernel[(rows,)](
        cand,
        a.contiguous(),
        run.contiguous().view(torch.uint8),
        cut.contiguous().view(torch.uint8) if has_cut else blk,  # (blk: never read)
        blk,
        has.view(torch.uint8),
        hit,
        n,
        cand.stride(0),
        HAS_CUT=has_cut,
        BLOCK=triton.next_power_of_2(n),
    )
    return blk, has, hit
