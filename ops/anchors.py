"""The elastic sampler's candidate accept lengths (``choose_anchors``): the torch rule and its
Triton launch, behind ``fluid_ops.dispatch`` (op ``"choose_anchors"``).

A row's pending drafts ``v_1 … v_m`` carry log-confidences ``log p_i``; the accept length ``a`` is
``j`` with probability ``p_1 ⋯ p_j · (1 − p_{j+1})`` (every draft accepted: ``p_1 ⋯ p_m``). The
engine drafts a block after the likeliest lengths, best first, until they cover ``coverage`` of the
probability or ``count`` are taken (DESIGN §1.3; ``fluid_npu.sampling.fused``). Ties go to the
shorter length (a stable sort), as ``fluid_npu.sampling.host_step.choose_anchors_host`` takes them.

Back ends: ``torch`` (any device: about twenty small ops, paid by a loaded FLUID step twice — its
decode step and the prefill's first drafts) and ``triton`` (``fluid_ops.anchors_triton``: one
launch; CUDA first, where an eager step costs what it launches; on an NPU only when asked for with
``FLUID_CHOOSE_ANCHORS_BACKEND=triton`` — not yet run on triton-ascend; on a CPU only under
``TRITON_INTERPRET=1``, for tests). Both take the same lengths; where two scores (or a running
mass and ``coverage``) differ only by float32 rounding, the back ends' ``exp`` and products may
round them apart — a step's shape, never a token. A NaN confidence (a row whose logits overflowed,
which then ends as an error) may get other lengths from each.
"""

from __future__ import annotations

import torch

from fluid_ops import dispatch

OP = "choose_anchors"
dispatch.register_step_op(OP)


def choose_anchors(
    logp: torch.Tensor,
    m: torch.Tensor,
    count: int,
    coverage: float,
    backend: str | None = None,
) -> torch.Tensor:
    """Candidate accept lengths that get a draft block, ``[B, count]`` int64 (``-1`` = none), by
    the selected back end. ``logp [B, M]``: the pending drafts' log-confidences; ``m [B]``: how
    many of them are real (the rest are not read). On the device: no host read."""
    if dispatch.select(OP, logp.device, backend) == "triton":
        from fluid_ops import anchors_triton

        return anchors_triton.choose_anchors(logp, m, count, coverage)
    return choose_anchors_torch(logp, m, count, coverage)


def choose_anchors_torch(
    logp: torch.Tensor, m: torch.Tensor, count: int, coverage: float
) -> torch.Tensor:
    """The torch rule (any device)."""
    b, big_m = logp.shape
    j = torch.arange(big_m + 1, device=logp.device)
    p = torch.where(j[None, :big_m] < m[:, None], logp.exp(), 0.0)
    ones = torch.ones((b, 1), dtype=p.dtype, device=p.device)
    reach = torch.cat([ones, torch.cumprod(p, dim=1)], dim=1)  # P(a >= j)
    stop = torch.cat([1.0 - p, ones], dim=1)  # P(draft j+1 rejected | reached j)
    score = torch.where(j[None] <= m[:, None], reach * stop, -1.0)
    vals, idx = score.sort(dim=1, descending=True, stable=True)  # (ties: the shorter first)
    vals, idx = vals[:, :count], idx[:, :count]
    mass = vals.clamp(min=0)
    keep = (vals >= 0) & (mass.cumsum(dim=1) - mass < coverage)
    out = torch.where(keep, idx, -1)
    if out.shape[1] < count:  # fewer lengths than count exist (M + 1 < count)
        out = torch.cat([out, out.new_full((b, count - out.shape[1]), -1)], dim=1)
    return out
