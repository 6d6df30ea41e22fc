"""The decode step's inputs (``step_inputs``): the torch rule, and the entry to its Triton launch
(op ``"step_inputs"`` of ``fluid_ops.dispatch``: ``fluid_ops.step_inputs`` says which back end a
device runs).

Each running row feeds its last committed token ``v_0`` and its pending drafts at its next
positions (the main tokens; ``PAD`` past its real drafts), then one MASK block of ``k`` slots per
candidate accept length, placed by ``fluid_npu.layout.slot_block`` (DESIGN §1.3;
``sampling/fused.py``). Back ends: ``torch`` (any device: 19 small ops for a step with drafts and
blocks, 6 for an AR step) and ``triton`` (``fluid_ops.step_inputs_triton``: one launch; CUDA's
choice). Both give the same integers.
"""

from __future__ import annotations

import torch

from fluid_npu.layout import slot_block
from fluid_ops import step_inputs as op
from fluid_ops.meta import MAIN, PAD

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def step_inputs(
    last: torch.Tensor,
    drafts: torch.Tensor,
    base: torch.Tensor,
    m: torch.Tensor,
    run: torch.Tensor,
    cand: torch.Tensor,
    k: int,
    mask_id: int,
    backend: str | None = None,
) -> Inputs:
    """``(ids, pos, anchor, m, cand)`` of a decode step over rows ``[0, B)``: the inputs
    ``[B, M + 1 + n·k]`` (``drafts [B, M]``, ``cand [B, n]``), the pending drafts each row verifies
    (its ``m`` clamped to ``M``, 0 where it does not run) and the blocks it drafts (-1 where it
    does not run). ``last``, ``base`` (committed entries), ``m``, ``run`` are ``[B]``."""
    if op.backend(last.device, backend) == "triton":
        from fluid_ops import step_inputs_triton

        return step_inputs_triton.step_inputs(last, drafts, base, m, run, cand, k, mask_id)
    return step_inputs_torch(last, drafts, base, m, run, cand, k, mask_id)


def step_inputs_torch(
    last: torch.Tensor,
    drafts: torch.Tensor,
    base: torch.Tensor,
    m: torch.Tensor,
    run: torch.Tensor,
    cand: torch.Tensor,
    k: int,
    mask_id: int,
) -> Inputs:
    """The torch rule (any device)."""
    hi, big_m = drafts.shape
    j = torch.arange(big_m + 1, device=last.device)
    if big_m:
        m = torch.where(run, m.clamp(max=big_m), 0)
        real = run[:, None] & (j[None] <= m[:, None])
    else:  # no row has pending drafts (every AR step): each feeds its last token alone
        m = torch.zeros(hi, dtype=torch.long, device=last.device)
        real = run[:, None]
    ids = [torch.cat([last[:, None], drafts], dim=1)]
    pos = [base[:, None] + j[None]]
    anchor = [torch.where(real, MAIN, PAD)]
    cand = torch.where(run[:, None], cand, -1)
    if cand.shape[1]:  # the block anchored at accept length j: anchor position base + j
        block = slot_block(base[:, None] + cand.clamp(min=0), k, mask_id, live=cand >= 0)
        ids.append(block.input_ids.reshape(hi, -1))
        pos.append(block.position_ids.reshape(hi, -1))
        anchor.append(block.anchor.reshape(hi, -1))
    ids_t, pos_t, anchor_t = (
        t[0] if len(t) == 1 else torch.cat(t, dim=1) for t in (ids, pos, anchor)
    )
    return ids_t, pos_t, anchor_t, m, cand
