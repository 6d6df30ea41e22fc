"""Triton kernel of the draft statistics of logits (``fluid_ops.logit_stats``'s ``triton`` back
end).

The torch rule is a float32 log-softmax, an exp, a product, a sum, a negation, an argmax and a
gather: seven launches on an eager accelerator, paid twice by a loaded FLUID step. Here a program
per position walks the vocabulary once in ``BLOCK`` columns with the online softmax's running
state — the largest logit and its first index, ``s = Σ exp(x − m)`` and ``t = Σ exp(x − m)(x − m)``,
rescaled when the largest grows — and writes the argmax, ``log p(argmax) = −log s`` and the
entropy ``log s − t / s``.

One source for CUDA and triton-ascend (no ``tl.dot``, no atomics, no float64, 1-D grid); under
``TRITON_INTERPRET=1`` it runs on CPU tensors (tests). Logits are read in their own dtype and
summed in float32. The engine's logits (the head applied to hidden states) are finite; a ``-inf``
logit (a banned token) adds nothing here, where the torch rule's entropy turns NaN
(``0 · −inf``), and a position with a NaN logit or none finite gets NaN statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fluid_ops.vocab import TokenStats

MAX_BLOCK = 4096  # vocabulary columns a program reads per iteration


@triton.jit(do_not_specialize=["V"])
def _logit_stats_kernel(
    logits_ptr,  # [N, V]: one position's logits per row, any float dtype, contiguous
    arg_ptr,  # [N] int64: the first index of the largest logit
    lp_ptr,  # [N] float32: its log-probability
    ent_ptr,  # [N] float32: the entropy, nats
    V,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    j = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    m = zero - float("inf")  # the largest logit so far
    s = zero  # Σ exp(x − m)
    t = zero  # Σ exp(x − m)(x − m)
    arg = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0)
    for v0 in range(0, V, BLOCK):
        cols = v0 + j
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        tile_max = tl.max(x, axis=0)
        tile_arg = tl.min(tl.where(x == tile_max, cols, V), axis=0).to(tl.int64)
        arg = tl.where(tile_max > m, tile_arg, arg)  # (a tie keeps the earlier index)
        new_m = tl.maximum(m, tile_max)
        # (no −inf − (−inf) while every logit so far is −inf, no 0·(−inf) on the first tile)
        alpha = tl.where(new_m > -float("inf"), tl.exp(m - new_m), 1.0)
        shift = tl.where(s > 0, m - new_m, 0.0) * s
        e = tl.where(x > -float("inf"), tl.exp(x - new_m), 0.0)
        t = alpha * (t + shift) + tl.sum(tl.where(e > 0, x - new_m, 0.0) * e, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = new_m
    log_s = tl.log(s)
    tl.store(arg_ptr + row, arg)
    tl.store(lp_ptr + row, -log_s)
    tl.store(ent_ptr + row, log_s - t / s)


def logit_stats(logits: torch.Tensor) -> TokenStats:
    """``fluid_ops.logit_stats.logit_stats_torch``'s statistics in one launch."""
    shape, v = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, v).contiguous()
    n = flat.shape[0]
    arg = torch.empty(n, dtype=torch.int64, device=logits.device)
    lp = torch.empty(n, dtype=torch.float32, device=logits.device)
    ent = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n and v:
        block = min(triton.next_power_of_2(v), MAX_BLOCK)
        _logit_stats_kernel[(n,)](flat, arg, lp, ent, v, BLOCK=block)
    return TokenStats(arg.view(shape), lp.view(shape), ent.view(shape), None)
