"""The decode engine's attention mask per forward (``step_mask``): the torch rule and its Triton
launch, behind ``fluid_ops.dispatch`` (op ``"step_mask"``).

A forward of the engine (``fluid_npu.sampling``) writes ``W`` new tokens per row at cache indices
``length_b … length_b + W − 1``; a real query sees every committed entry of its row and the new
entries by §1.1's rule (``fluid_ops.meta.visibility`` of the step's own metadata), a padding query
is opened to key 0 alone. Back ends: ``torch`` (any device: about thirty small ops for a step with
drafts, five for a one-token step) and ``triton`` (``fluid_ops.step_mask_triton``: one launch;
CUDA first, where an eager step costs what it launches; on an NPU only when asked for with
``FLUID_STEP_MASK_BACKEND=triton`` — not yet run on triton-ascend; on a CPU only under
``TRITON_INTERPRET=1``, for tests). Both give the same booleans.
"""

from __future__ import annotations

import torch

from fluid_ops import dispatch
from fluid_ops.meta import PAD, AttnMeta, visibility

OP = "step_mask"
dispatch.register_step_op(OP)


def step_mask(
    length: torch.Tensor,
    q_pos: torch.Tensor,
    q_anchor: torch.Tensor,
    extent: int,
    backend: str | None = None,
) -> torch.Tensor:
    """The bool mask ``[B, 1, W, extent]`` of a forward whose new tokens sit at ``length + t``
    (``length [B]``: committed entries per row; ``q_pos`` / ``q_anchor [B, W]``: the new tokens'
    §1.1 metadata), by the selected back end (the module docstring)."""
    if dispatch.select(OP, q_pos.device, backend) == "triton":
        from fluid_ops import step_mask_triton

        return step_mask_triton.step_mask(length, q_pos, q_anchor, extent)
    return step_mask_torch(length, q_pos, q_anchor, extent)


def step_mask_torch(
    length: torch.Tensor, q_pos: torch.Tensor, q_anchor: torch.Tensor, extent: int
) -> torch.Tensor:
    """The torch rule: rows with no visible key (padding) are opened to key 0 so no softmax is
    empty; their outputs are never read. (``fluid_npu.sampling.host_step`` assembles the same
    mask for one row: a change here changes it there.)"""
    b, w = q_pos.shape
    j = torch.arange(extent, device=q_pos.device)
    rel = j[None, :] - length[:, None]  # index among the new tokens, [B, extent]
    if w == 1:  # one main token per row (AR steps): the committed entries and itself
        mask = (rel <= 0)[:, None, :] & (q_anchor != PAD)[:, :, None]
        mask[..., 0] = True
        return mask[:, None]
    new_vis = visibility(AttnMeta.self_attention(q_pos, q_anchor))  # [B, W, W]
    in_new = (rel >= 0) & (rel < w)
    new_part = new_vis.gather(2, rel.clamp(0, w - 1)[:, None, :].expand(b, w, extent))
    real = (q_anchor != PAD)[:, :, None]
    mask = ((rel < 0)[:, None, :] & real) | (new_part & in_new[:, None, :])
    mask[..., 0] |= ~mask.any(dim=-1)
    return mask[:, None]
