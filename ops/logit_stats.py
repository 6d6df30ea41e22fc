"""Draft statistics of logits already computed (``logit_stats``): the torch rule and its Triton
launch, behind ``fluid_ops.dispatch`` (op ``"logit_stats"``).

The decode engine's LM head (``fluid_npu.sampling.head``) applies the head directly while a call's
logits are few (below that ``fluid_ops.token_stats`` walks the vocabulary in tiles), then reads
per position the argmax (the draft), its log-probability (the draft's confidence) and the entropy
(the horizon policy's signal). Back ends: ``torch`` (any device: a log-softmax and six more small
ops, paid by a loaded FLUID step twice — its decode step's drafts and the prefill's first — where
``ar`` never drafts) and ``triton`` (``fluid_ops.logit_stats_triton``: one launch; CUDA first; on
an NPU only when asked for with ``FLUID_LOGIT_STATS_BACKEND=triton`` — not yet run on
triton-ascend; on a CPU only under ``TRITON_INTERPRET=1``, for tests). The argmax is the same
(the first index of the largest logit); the log-probability and entropy agree to float32 rounding
(the sums run in another order), which can move a horizon policy's cut or a block's length — a
step's shape, never a token: every committed token is still the verified argmax.
"""

from __future__ import annotations

import torch

from fluid_ops import dispatch
from fluid_ops.vocab import TokenStats

OP = "logit_stats"
dispatch.register_step_op(OP)


def logit_stats(logits: torch.Tensor, backend: str | None = None) -> TokenStats:
    """Argmax (int64), max log-prob and entropy (float32, nats) of ``logits [..., V]`` per
    position, shaped like ``logits[..., 0]``, by the selected back end (``ce`` is None)."""
    if dispatch.select(OP, logits.device, backend) == "triton":
        from fluid_ops import logit_stats_triton

        return logit_stats_triton.logit_stats(logits)
    return logit_stats_torch(logits)


def logit_stats_torch(logits: torch.Tensor) -> TokenStats:
    """The torch rule (any device; the softmax in float32)."""
    logp = logits.float().log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    arg = logits.argmax(dim=-1)
    return TokenStats(arg, logp.gather(-1, arg[..., None])[..., 0], entropy, None)
