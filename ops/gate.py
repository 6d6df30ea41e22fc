"""The draft budget's gate (``draft_gate``): which rows draft blocks in the next step — the torch
rule and its Triton launch, behind ``fluid_ops.dispatch`` (op ``"draft_gate"``).

With adaptive drafting a row gets next blocks only while they pay (``fluid_npu.sampling.drafting``,
the engine's step): its running average of accepted drafts must reach the ``price`` the measured
step costs set, and since a block widens the step for every row, the rows worth a block draft only
while together they earn what the whole batch pays — the sum of their averages at least ``price``
times the rows still running. Rows due a probe, and sampling rows, draft whatever they earn. The
others' candidate lengths become ``-1`` (no block).

Back ends: ``torch`` (any device: about fourteen small ops, a FLUID decode step's and never
``ar``'s) and ``triton`` (``fluid_ops.gate_triton``: one launch, one program over the rows; CUDA
first, where an eager step costs what it launches; on an NPU only when asked for with
``FLUID_DRAFT_GATE_BACKEND=triton`` — not yet run on triton-ascend; on a CPU only under
``TRITON_INTERPRET=1``, for tests). The rows' sum is taken in another order by each, so where the
batch's earnings and its price agree to float32 rounding the two may decide apart — the next
step's shape, never a token.
"""

from __future__ import annotations

import torch

from fluid_ops import dispatch

OP = "draft_gate"
dispatch.register_step_op(OP)


def draft_gate(
    cand: torch.Tensor,
    ema: torch.Tensor,
    run: torch.Tensor,
    done: torch.Tensor,
    temp: torch.Tensor,
    price: float,
    probe: bool,
    backend: str | None = None,
) -> torch.Tensor:
    """``cand [B, n]`` with the rows that do not draft set to ``-1``. ``ema [B]`` float32: each
    row's average accepted drafts; ``run`` / ``done [B]`` bool: it decoded this step / it ended;
    ``temp [B]``: its temperature (sampling rows always draft); ``price``: what a block must earn
    (host float); ``probe``: the step's probe is due. On the device: no host read."""
    if dispatch.select(OP, cand.device, backend) == "triton":
        from fluid_ops import gate_triton

        return gate_triton.draft_gate(cand, ema, run, done, temp, price, probe)
    return draft_gate_torch(cand, ema, run, done, temp, price, probe)


def draft_gate_torch(
    cand: torch.Tensor,
    ema: torch.Tensor,
    run: torch.Tensor,
    done: torch.Tensor,
    temp: torch.Tensor,
    price: float,
    probe: bool,
) -> torch.Tensor:
    """The torch rule (any device)."""
    worth = ema >= price
    going = run & ~done
    earned = torch.where(worth & going, ema, 0.0).sum()
    worth = worth & (earned >= price * going.sum())
    draft_on = worth | probe | (temp > 0)
    return torch.where(draft_on[:, None], cand, -1)
