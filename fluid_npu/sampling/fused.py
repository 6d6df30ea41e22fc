"""The fused loop (DESIGN §1.3): verify the pending drafts and draft the next ones in one forward.

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
With ``anchors=0`` every ``j`` gets a block. More anchors can raise TPF a little, but every block
costs compute, so tokens/s need not follow; measure the trade-off on your model with
``fluid bench sampler --anchors N`` (the README lists the current figures).
"""

from __future__ import annotations

import torch

from fluid_npu.sampling.engine import Engine
from fluid_npu.sampling.policies import Policy
from fluid_ops.meta import MAIN, PAD

DEFAULT_ANCHORS = 2
DEFAULT_COVERAGE = 0.9


def choose_anchors(
    logp: torch.Tensor,
    m: torch.Tensor,
    count: int,
    coverage: float = DEFAULT_COVERAGE,
    fixed: bool = False,
) -> torch.Tensor:
    """Candidate accept lengths that get a draft block, ``[B, n]`` (``-1`` = no block).

    ``logp [B, M]``: log-confidence of each pending draft; ``m [B]``: how many are real. Lengths
    are taken most likely first until they cover ``coverage`` of the probability or ``count``
    of them are taken (``count=0``: every length, no coverage cut). ``fixed``: exactly ``count``
    columns, no host read (the decode engine's fixed shapes); otherwise as many as some row needs.
    """
    b, big_m = logp.shape
    j = torch.arange(big_m + 1, device=logp.device)
    p = torch.where(j[None, :big_m] < m[:, None], logp.exp(), 0.0)
    ones = torch.ones((b, 1), dtype=p.dtype, device=p.device)
    reach = torch.cat([ones, torch.cumprod(p, dim=1)], dim=1)  # P(a >= j)
    stop = torch.cat([1.0 - p, ones], dim=1)  # P(draft j+1 rejected | reached j)
    score = torch.where(j[None] <= m[:, None], reach * stop, -1.0)
    if count <= 0:
        return torch.where(score >= 0, j[None].expand(b, -1), -1)
    vals, idx = score.sort(dim=1, descending=True)
    vals, idx = vals[:, :count], idx[:, :count]
    mass = vals.clamp(min=0)
    keep = (vals >= 0) & (mass.cumsum(dim=1) - mass < coverage)
    if fixed:
        out = torch.where(keep, idx, -1)
        if out.shape[1] < count:
            out = torch.cat([out, out.new_full((b, count - out.shape[1]), -1)], dim=1)
        return out
    n = int(keep.sum(dim=1).max())
    return torch.where(keep, idx, -1)[:, :n]


def run_fused(
    eng: Engine,
    policy: Policy,
    khead: torch.nn.Module | None = None,
    anchors: int = DEFAULT_ANCHORS,
    coverage: float = DEFAULT_COVERAGE,
) -> None:
    """Decode until every row has finished (EOS or ``max_new_tokens``)."""
    k = policy.block_len
    dev = eng.device
    b = eng.active
    drafts = torch.zeros((b, 0), dtype=torch.long, device=dev)
    logp = torch.zeros((b, 0), dtype=torch.float32, device=dev)
    m = torch.zeros(b, dtype=torch.long, device=dev)
    first = eng.prefill(draft=k)
    if first is not None:  # the prefill drafted the first tokens (anchor: prompt's P-2)
        st = eng.slot_stats(first[0])
        one_token = (eng.next_pos < 2).to(dev)
        m = torch.where(one_token, 0, policy.keep(st.entropy, first[1], khead))
        drafts, logp = st.argmax, st.max_logprob
    slots = torch.arange(1, k + 1, device=dev)
    while eng.active:
        b = eng.active
        big_m = int(m.max())
        drafts, logp = drafts[:, :big_m], logp[:, :big_m]
        j = torch.arange(big_m + 1, device=dev)
        base = eng.next_pos - 1  # position of v_0
        ids = [torch.cat([eng.last[:, None], drafts], dim=1)]
        pos = [base[:, None] + j[None]]
        anchor = [torch.where(j[None] <= m[:, None], MAIN, PAD)]
        if k > 0:
            cand_j = choose_anchors(logp, m, anchors, coverage)  # [b, A]
            n_blocks = cand_j.shape[1]
            c = base[:, None] + cand_j.clamp(min=0)
            ids.append(torch.full((b, n_blocks * k), eng.mask_id, dtype=torch.long, device=dev))
            pos.append((c[:, :, None] + slots).reshape(b, -1))
            blk_anchor = torch.where(cand_j >= 0, c, PAD)
            anchor.append(blk_anchor[:, :, None].expand(b, n_blocks, k).reshape(b, -1))
        ids_t, pos_t, anchor_t = (torch.cat(t, dim=1) for t in (ids, pos, anchor))
        width = ids_t.shape[1]
        hidden = eng.forward(ids_t, pos_t, anchor_t, n_main=big_m + 1)

        ar = eng.argmax(hidden[:, : big_m + 1])  # [b, M+1]
        match = (drafts == ar[:, :big_m]) & (j[None, :big_m] < m[:, None])
        a = match.long().cumprod(dim=1).sum(dim=1)
        correction = ar.gather(1, a[:, None])
        cand = torch.cat([drafts, correction], dim=1).scatter(1, a[:, None], correction)
        eng.stats.record(accepted=a, drafted=m)
        finished, committed = eng.commit(cand, a + 1)
        eng.last = correction[:, 0]
        eng.cache.keep_new(width, committed)  # a + 1 each, unless the row just finished

        if k > 0:
            hit = cand_j == a[:, None]
            rows = torch.arange(b, device=dev)
            block = hit.float().argmax(dim=1)  # the block anchored at a (0 when there is none)
            blocks = hidden[:, big_m + 1 :].view(b, n_blocks, k, -1)
            st = eng.slot_stats(blocks[rows, block])
            keep = policy.keep(st.entropy, hidden[rows, a], khead)
            m = torch.where(hit.any(dim=1), keep, 0)
            drafts, logp = st.argmax, st.max_logprob
        kept = eng.retire(finished)
        if kept is not None:
            drafts, logp, m = drafts[kept], logp[kept], m[kept]
