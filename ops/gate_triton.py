"""Triton kernel of the draft budget's gate (``fluid_ops.gate``'s ``triton`` back end).

The torch rule compares each row's average with the price, sums what the rows worth a block earn
against what the batch pays and masks the next candidate lengths: about fourteen small ops, each
a kernel launch on an eager accelerator, in every FLUID decode step with adaptive drafting. Here
one program reads the batch's rows at once (the gate is a decision of the whole batch), sums, and
writes the lengths.

One source for CUDA and triton-ascend (no ``tl.dot``, no atomics, 1-D grid of one program); under
``TRITON_INTERPRET=1`` it runs on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# (one compiled variant per power of two of the rows and of the lengths, whatever their counts)
@triton.jit(do_not_specialize=["rows", "n", "c_stride", "price", "probe"])
def _gate_kernel(
    cand_ptr,  # [B, >= n] int64, row stride c_stride: the next candidate lengths, -1 none
    ema_ptr,  # [B] float32: each row's average accepted drafts
    run_ptr,  # [B] bool (as uint8): it decoded this step
    done_ptr,  # [B] bool (as uint8): it ended this step
    temp_ptr,  # [B] float32: its temperature (> 0: a sampling row)
    out_ptr,  # [B, n] int64 out
    rows,
    n,
    c_stride,
    price,  # float32: what a block must earn
    probe,  # int32: 1 when the probe is due
    BLOCK_B: tl.constexpr,  # a power of two >= B
    BLOCK_C: tl.constexpr,  # a power of two >= n
):
    r = tl.arange(0, BLOCK_B)
    live = r < rows
    ema = tl.load(ema_ptr + r, mask=live, other=0.0)
    going = (tl.load(run_ptr + r, mask=live, other=0) != 0) & (
        tl.load(done_ptr + r, mask=live, other=1) == 0
    )
    worth = ema >= price
    earned = tl.sum(tl.where(worth & going, ema, 0.0), axis=0)
    paying = tl.sum(going.to(tl.int32), axis=0).to(tl.float32)
    enough = earned >= price * paying  # (the batch's decision: one scalar for every row)
    temp = tl.load(temp_ptr + r, mask=live, other=0.0)
    draft_on = tl.where(enough, worth, False) | (probe != 0) | (temp > 0)
    c = tl.arange(0, BLOCK_C)
    at = r[:, None] * c_stride + c[None, :]
    inside = live[:, None] & (c[None, :] < n)
    cand = tl.load(cand_ptr + at, mask=inside, other=-1)
    out = tl.where(draft_on[:, None], cand, -1)
    tl.store(out_ptr + r[:, None] * n + c[None, :], out, mask=inside)


def draft_gate(
    cand: torch.Tensor,
    ema: torch.Tensor,
    run: torch.Tensor,
    done: torch.Tensor,
    temp: torch.Tensor,
    price: float,
    probe: bool,
) -> torch.Tensor:
    """``fluid_ops.gate.draft_gate_torch``'s lengths in one launch (``cand`` may be a row slice of
    wider state)."""
    rows, n = cand.shape
    out = torch.empty((rows, n), dtype=torch.long, device=cand.device)
    if rows == 0 or n == 0:
        return out
    cand = cand if cand.stride(1) == 1 else cand.contiguous()
    _gate_kernel[(1,)](
        cand,
        ema.contiguous(),
        run.contiguous().view(torch.uint8),
        done.contiguous().view(torch.uint8),
        temp.contiguous(),
        out,
        rows,
        n,
        cand.stride(0),
        float(price),
        int(bool(probe)),
        BLOCK_B=triton.next_power_of_2(rows),
        BLOCK_C=triton.next_power_of_2(n),
    )
    return out
