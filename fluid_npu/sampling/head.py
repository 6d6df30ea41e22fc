"""The LM head as the sampler reads it: AR argmax for verification, token statistics for drafts.

Both go through ``fluid_ops.token_stats``, which never materialises the logits, once a call would
hold more than ``DIRECT_LOGITS`` of them; below that the head is applied directly — the same
``F.linear`` and softmax, without the op's fixed cost (≈ 0.7 ms a call on a CPU, as much as a
whole decode step of a tiny model), the statistics read by ``fluid_ops.logit_stats`` (on CUDA one
Triton launch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

import fluid_ops
from fluid_npu.model.attention import lm_head
from fluid_ops.logit_stats import logit_stats

DIRECT_LOGITS = 1 << 22  # logits per call up to which the LM head is applied directly


class LMHead:
    """The model's output projection (weight ``[V, H]``, optional bias) with the sampler's reads."""

    def __init__(self, model: PreTrainedModel) -> None:
        head = lm_head(model)
        self.weight, self.bias = head.weight, getattr(head, "bias", None)

    def _direct(self, hidden: torch.Tensor) -> bool:
        return hidden.numel() // hidden.shape[-1] * self.weight.shape[0] <= DIRECT_LOGITS

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full logits ``[..., V]`` (float32) — for sampling and logprobs, not for argmax."""
        return F.linear(hidden, self.weight, self.bias).float()

    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """The AR argmax on ``hidden [..., H]`` (first index on exact ties)."""
        if self._direct(hidden):
            return F.linear(hidden, self.weight, self.bias).argmax(dim=-1)
        return fluid_ops.token_stats(hidden, self.weight, bias=self.bias).argmax

    def stats(self, hidden: torch.Tensor) -> fluid_ops.TokenStats:
        """Argmax, max log-prob and entropy (nats) on ``hidden [..., H]``."""
        if not self._direct(hidden):
            return fluid_ops.token_stats(hidden, self.weight, bias=self.bias)
        return logit_stats(F.linear(hidden, self.weight, self.bias))
