"""The fused loop (DESIGN §1.3): verify the pending drafts and draft the next ones in one forward.

The decode engine (``scheduler.py``) runs it with fixed shapes; this module states the method and
names its one pure piece, ``choose_anchors`` (the rule and its kernel: ``fluid_ops.anchors``).

Per step and row, with ``n`` committed tokens (the last one, ``v_0``, not yet in the cache) and
pending drafts ``v_1 … v_m`` (guesses for positions ``n … n+m-1``), the forward's input is:

* the main tokens ``v_0 … v_M`` at positions ``n-1 … n-1+M`` (``M`` = the batch's largest ``m``,
  shorter rows padded with ``PAD``);
* ``|A|`` MASK blocks of ``K`` slots; the block anchored at ``j ∈ A`` sits at positions
  ``n+j … n+j+K-1`` with anchor ``n-1+j`` — by the §1.1 rule it sees the cache, ``v_0 … v_j`` and
  its own earlier slots: exactly the Stage I slots of anchor ``v_j``.

The AR argmax at ``v_i`` predicts position ``n+i``; drafts are accepted while ``v_{i+1}`` equals it
(``a`` accepted), and the argmax at ``v_a`` is the correction. The row commits ``v_1 … v_a`` and the
correction (every one an AR argmax, so the output is greedy decoding's), keeps ``v_0 … v_a`` in the
cache (they come first in memory, so cutting the tail drops the rejected ``v``s and all the blocks),
and the block anchored at ``a`` — whose slots predict the tokens right after the correction —
becomes the next drafts, truncated by the horizon policy. When ``a`` had no block the next step
simply drafts from ``v_0`` again. The first drafts come from the prefill (``Engine.prefill``), so
even the first decode step verifies a full horizon.

``A`` is pruned to the most likely accept lengths, scored from the drafts' own confidences
``p_i``: ``P(a = j) = p_1 ⋯ p_j · (1 − p_{j+1})``, taken best first until they cover ``coverage``
(0.9) of the probability, at most ``anchors`` (2) of them; confident drafts thus cost one block.
The engine adds a second block only while its measured cost is small (see ``scheduler.py``).
"""

from __future__ import annotations

import torch

from fluid_npu.sampling.defaults import DEFAULT_ANCHORS, DEFAULT_COVERAGE
from fluid_ops import anchors

__all__ = ["DEFAULT_ANCHORS", "DEFAULT_COVERAGE", "choose_anchors"]


def choose_anchors(
    logp: torch.Tensor, m: torch.Tensor, count: int, coverage: float = DEFAULT_COVERAGE
) -> torch.Tensor:
    """Candidate accept lengths that get a draft block, ``[B, count]`` (``-1`` = no block).

    ``logp [B, M]``: log-confidence of each pending draft; ``m [B]``: how many are real. Lengths
    are taken most likely first (ties: the shorter first) until they cover ``coverage`` of the
    probability or ``count`` of them are taken. Always ``count`` columns, computed on the device
    (the engine's fixed shapes: no host read) by ``fluid_ops.anchors.choose_anchors`` — on CUDA
    one Triton launch, elsewhere the torch rule. ``host_step.choose_anchors_host`` is its one-row
    twin on a CPU.
    """
    return anchors.choose_anchors(logp, m, count, coverage)
