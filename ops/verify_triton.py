"""Triton kernel of the fused loop's verify (``fluid_ops.verify``'s ``triton`` back end).

The torch rule compares the drafts with the argmax, takes the running product of the matches,
gathers the correction and builds the tokens with a concatenation and a scatter: nine small
ops, each a kernel launch on an eager accelerator, in every FLUID decode step. Here one program
per row finds the first position that is not accepted — the accepted length is the leading run of
matches, so no product is needed — and writes the accepted length, the correction and the tokens.

One source for CUDA and triton-ascend (no ``tl.dot``, no atomics, 1-D grid); under
``TRITON_INTERPRET=1`` it runs on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# (one compiled variant per power of two of M + 1, whatever M and the strides are)
@triton.jit(do_not_specialize=["big_m", "d_stride", "r_stride", "n_stride"])
def _verify_kernel(
    drafts_ptr,  # [B, >= M] int64, row stride d_stride: the pending drafts
    ar_ptr,  # [B, >= M + 1] int64, row stride r_stride: the argmax after v_0 … v_M
    m_ptr,  # [B] int64: how many drafts are real
    nothing_ptr,  # [B, >= M] bool (as uint8), row stride n_stride: no token there (HAS_NOTHING)
    a_ptr,  # [B] int64 out: drafts accepted
    corr_ptr,  # [B] int64 out: the correction (the argmax at v_a)
    toks_ptr,  # [B, M + 1] int64 out (written when TOKENS)
    big_m,
    d_stride,
    r_stride,
    n_stride,
    HAS_NOTHING: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK: tl.constexpr,  # a power of two > M
):
    b = tl.program_id(0).to(tl.int64)
    m = tl.load(m_ptr + b)
    t = tl.arange(0, BLOCK)
    drafted = t < big_m
    d = tl.load(drafts_ptr + b * d_stride + t, mask=drafted, other=0)
    g = tl.load(ar_ptr + b * r_stride + t, mask=t <= big_m, other=0)
    ok = (d == g) & (t < m) & drafted
    if HAS_NOTHING:
        none_left = tl.load(nothing_ptr + b * n_stride + t, mask=drafted, other=1)
        ok = ok & (none_left == 0)
    # the leading run of matches ends at the first position that is not one (at most M)
    a = tl.min(tl.where(ok, BLOCK, t), axis=0)
    corr = tl.sum(tl.where(t == a, g, 0), axis=0)
    tl.store(a_ptr + b, a.to(tl.int64))
    tl.store(corr_ptr + b, corr.to(tl.int64))
    if TOKENS:
        toks = tl.where((t == a) | (t == big_m), corr, d)
        tl.store(toks_ptr + b * (big_m + 1) + t, toks, mask=t <= big_m)


def verify_drafts(
    drafts: torch.Tensor,
    ar: torch.Tensor,
    m: torch.Tensor,
    nothing: torch.Tensor | None = None,
    tokens: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(a, corr, toks)`` of ``fluid_ops.verify.verify_drafts_torch`` in one launch."""
    hi, big_m = drafts.shape
    dev = drafts.device
    a = torch.empty(hi, dtype=torch.long, device=dev)
    corr = torch.empty((hi, 1), dtype=torch.long, device=dev)
    toks = torch.empty((hi, big_m + 1), dtype=torch.long, device=dev) if tokens else None
    if hi == 0:
        return a, corr, toks
    drafts = drafts if drafts.stride(1) == 1 or big_m == 0 else drafts.contiguous()
    ar = ar if ar.stride(1) == 1 else ar.contiguous()
    has_nothing = nothing is not None
    if has_nothing and nothing.stride(1) != 1:
        nothing = nothing.contiguous()
    flags = nothing.view(torch.uint8) if has_nothing else a  # (a: never read)
    _verify_kernel[(hi,)](
        drafts,
        ar,
        m.contiguous(),
        flags,
        a,
        corr,
        a if toks is None else toks,  # (a: never written)
        big_m,
        drafts.stride(0) if big_m else 0,
        ar.stride(0),
        flags.stride(0) if has_nothing else 0,
        HAS_NOTHING=has_nothing,
        TOKENS=tokens,
        BLOCK=triton.next_power_of_2(big_m + 1),
    )
    return a, corr, toks
