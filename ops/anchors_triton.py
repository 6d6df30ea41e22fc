"""Triton kernel of the elastic sampler's candidate accept lengths (``fluid_ops.choose_anchors``'s
``triton`` back end).

The torch rule scores every accept length, sorts, and cuts at ``coverage`` in about twenty small
tensor ops; on an eager accelerator each is a kernel launch, paid twice by a loaded FLUID step
(its decode step's next blocks and the prefill's first). Here it is one launch: a program per row
scores the lengths ``0 … M`` in one pass over the drafts (``P(a ≥ j)`` carried as a running
product, in the order a CPU's ``cumprod`` takes; a CUDA scan may group the products otherwise),
then takes the ``count`` best, a stable pick (ties to the
shorter length), until their mass reaches ``coverage``.

One source for CUDA and triton-ascend (no ``tl.dot``, no atomics, no float64, 1-D grid); under
``TRITON_INTERPRET=1`` it runs on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# (one compiled variant per power of two of M + 1, whatever M and count are)
@triton.jit(do_not_specialize=["M", "count"])
def _anchors_kernel(
    logp_ptr,  # [B, M] float32: log-confidence of each pending draft
    m_ptr,  # [B] int64: how many of them are real
    out_ptr,  # [B, count] int64: the chosen accept lengths, -1 = no block
    M,
    count,
    coverage,
    BLOCK: tl.constexpr,  # a power of two > M
):
    b = tl.program_id(0).to(tl.int64)
    m = tl.load(m_ptr + b)
    j = tl.arange(0, BLOCK)
    lp = tl.load(logp_ptr + b * M + j, mask=j < M, other=0.0)
    p = tl.where((j < m) & (j < M), tl.exp(lp), 0.0)
    # score_j = P(a >= j) * P(draft j + 1 rejected): the running product, the torch rule's order
    reach = tl.sum(tl.where(j == 0, 1.0, 0.0), axis=0)  # (1.0, as a float32 scalar)
    score = tl.full([BLOCK], -3.0, tl.float32)  # past M: never chosen before a real length
    for i in range(0, M + 1):
        p_i = tl.sum(tl.where(j == i, p, 0.0), axis=0)  # (0 at i = M: that length stops surely)
        stop = tl.where(i < M, 1.0 - p_i, 1.0)
        score = tl.where(j == i, tl.where(i <= m, reach * stop, -1.0), score)
        reach = reach * p_i
    # the count best, ties to the shorter length, kept while the mass before them < coverage
    mass_sum = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    for c in range(0, count):
        best = tl.max(score, axis=0)
        at = tl.min(tl.where(score == best, j, BLOCK), axis=0)
        mass = tl.maximum(best, 0.0)
        mass_sum = mass_sum + mass
        keep = (best >= 0.0) & (mass_sum - mass < coverage)
        tl.store(out_ptr + b * count + c, tl.where(keep, at, -1).to(tl.int64))
        score = tl.where(j == at, -4.0, score)  # taken


def choose_anchors(
    logp: torch.Tensor, m: torch.Tensor, count: int, coverage: float
) -> torch.Tensor:
    """``fluid_ops.anchors.choose_anchors_torch``'s lengths ``[B, count]`` in one launch."""
    b, big_m = logp.shape
    out = torch.empty((b, count), dtype=torch.int64, device=logp.device)
    if b == 0 or count == 0:
        return out
    _anchors_kernel[(b,)](
        logp.to(torch.float32).contiguous(),
        m.to(torch.int64).contiguous(),
        out,
        big_m,
        count,
        float(coverage),
        BLOCK=triton.next_power_of_2(big_m + 1),
    )
    return out
