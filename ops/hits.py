"""Which candidate block the accepted length hit (``block_hits``): the torch rule and its Triton
launch, behind ``fluid_ops.dispatch`` (op ``"block_hits"``).

A FLUID decode step drafts a MASK block after each candidate accept length (DESIGN §1.3). Once the
verify knows each row's accepted length ``a``, the block anchored at ``a`` — if the row had one —
holds the next drafts: the engine takes that block's hidden states, and the row pays for the next
verify only if it had it (and still runs, and no grammar cut its step short).

Back ends: ``torch`` (any device: five small ops — the comparison, its argmax, the row's any, the
masks — in every FLUID decode step with blocks, never in ``ar``'s; inline in the step they were
eight) and ``triton`` (``fluid_ops.hits_triton``: one launch; CUDA first, where an eager step costs
what it launches; on an NPU only when asked for with ``FLUID_BLOCK_HITS_BACKEND=triton`` — not yet
run on triton-ascend; on a CPU only under ``TRITON_INTERPRET=1``, for tests). Both give the same
values.
"""

from __future__ import annotations

import torch

from fluid_ops import dispatch

OP = "block_hits"
dispatch.register_step_op(OP)

Hits = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def block_hits(
    cand: torch.Tensor,
    a: torch.Tensor,
    run: torch.Tensor,
    cut: torch.Tensor | None = None,
    backend: str | None = None,
) -> Hits:
    """``(blk, has, hit)``, each ``[B]``: the first block whose length equals ``a`` (0 where none
    does: a block to read, never used), whether the row has it — it runs and ``cut`` (bool or
    None) does not mark it — and that block's index where it has it, else -1. ``cand [B, n]``
    int64: the step's candidate lengths, -1 for no block. On the device: no host read."""
    if dispatch.select(OP, cand.device, backend) == "triton":
        from fluid_ops import hits_triton

        return hits_triton.block_hits(cand, a, run, cut)
    return block_hits_torch(cand, a, run, cut)


def block_hits_torch(
    cand: torch.Tensor, a: torch.Tensor, run: torch.Tensor, cut: torch.Tensor | None = None
) -> Hits:
    """The torch rule (any device)."""
    hit = cand == a[:, None]
    blk = hit.long().argmax(dim=1)
    has = hit.any(dim=1) & run
    if cut is not None:
        has = has & ~cut
    return blk, has, torch.where(has, blk, -1)
