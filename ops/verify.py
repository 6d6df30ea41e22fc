"""The fused loop's verify (``verify_drafts``): how many pending drafts each row accepts, its
correction and the tokens it would commit — the torch rule and its Triton launch, behind
``fluid_ops.dispatch`` (op ``"verify_drafts"``).

A row's pending drafts ``v_1 … v_m`` are accepted while each equals the AR argmax before it
(DESIGN §1.3; ``fluid_npu.sampling.fused``): ``a`` is the length of that leading run, the argmax
at ``v_a`` is the correction, and the tokens the row commits are ``v_1 … v_a`` then the
correction — the argmax all the way, so greedy decoding's tokens. Positions the caller marks
``nothing`` (its adjusted logits left no token there) are never accepted.

Back ends: ``torch`` (any device: nine small ops — the match, its running product, the
correction's gather, the tokens' concatenation and scatter — paid by every FLUID decode step and
never by ``ar``'s, which has no drafts) and ``triton`` (``fluid_ops.verify_triton``: one launch;
CUDA first, where an eager step costs what it launches; on an NPU only when asked for with
``FLUID_VERIFY_DRAFTS_BACKEND=triton`` — not yet run on triton-ascend; on a CPU only under
``TRITON_INTERPRET=1``, for tests). Both give the same integers.
"""

from __future__ import annotations

import torch

from fluid_ops import dispatch

OP = "verify_drafts"
dispatch.register_step_op(OP)

Verified = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def verify_drafts(
    drafts: torch.Tensor,
    ar: torch.Tensor,
    m: torch.Tensor,
    nothing: torch.Tensor | None = None,
    tokens: bool = True,
    backend: str | None = None,
) -> Verified:
    """``(a, corr, toks)``: the accepted drafts per row ``[B]``, the correction ``[B, 1]`` and the
    tokens ``[B, M + 1]`` (the drafts with the correction written at ``a`` and at ``M``: the row
    commits ``toks[:, :a + 1]``; None unless ``tokens``). ``drafts [B, M]`` and ``ar [B, M + 1]``
    (the argmax after ``v_0 … v_M``) int64 — row slices of wider state are fine — ``m [B]`` how
    many drafts are real, ``nothing [B, >= M]`` bool or None. On the device: no host read."""
    if dispatch.select(OP, drafts.device, backend) == "triton":
        from fluid_ops import verify_triton

        return verify_triton.verify_drafts(drafts, ar, m, nothing, tokens)
    return verify_drafts_torch(drafts, ar, m, nothing, tokens)


def verify_drafts_torch(
    drafts: torch.Tensor,
    ar: torch.Tensor,
    m: torch.Tensor,
    nothing: torch.Tensor | None = None,
    tokens: bool = True,
) -> Verified:
    """The torch rule (any device)."""
    big_m = drafts.shape[1]
    j = torch.arange(big_m, device=drafts.device)
    match = (drafts == ar[:, :big_m]) & (j[None] < m[:, None])
    if nothing is not None:
        match = match & ~nothing[:, :big_m]
    a = match.long().cumprod(dim=1).sum(dim=1)
    corr = ar.gather(1, a[:, None])
    return a, corr, commit_tokens(drafts, corr, a) if tokens else None


def commit_tokens(drafts: torch.Tensor, corr: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``toks [B, M + 1]``: the drafts, with ``corr [B, 1]`` at ``a`` and at ``M`` (the torch rule;
    the engine's sampling rows, whose ``a`` and correction the rejection rule sets, take this)."""
    return torch.cat([drafts, corr], dim=1).scatter(1, a[:, None], corr)
