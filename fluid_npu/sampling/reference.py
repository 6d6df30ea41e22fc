"""The reference loop (published FLUID, DESIGN §1.3): draft, refine Jacobi-style, then verify.

One step per row, with ``n`` committed tokens (the last, ``x_{n-1}``, not yet in the cache):

1. **Draft** — input ``x_{n-1}`` (main, position ``n-1``) and ``K_d`` MASK slots anchored at it
   (positions ``n … n+K_d-1``). The main token's argmax is the AR token ``t_0 = x_n``, committed at
   once; slot ``j`` drafts ``x_{n+j}``. The horizon policy keeps ``K`` of the ``K_d`` slots (the
   K-head reads the anchor's hidden state from this same forward). The slots leave the cache.
2. **Refine** — a slot whose confidence (probability of its argmax) reaches ``refine_threshold`` is
   committed to its draft; the others are re-forwarded with the committed drafts revealed as inputs
   (slot ``j`` at position ``n-1+j`` carries token ``x_{n-1+j}`` once known — slot 1 always carries
   ``t_0`` — exactly Stage I's reveal). Each round commits at least the most confident open slot,
   at most ``max_refine`` rounds; open slots then keep their current argmax.
3. **Verify** — input ``t_0, d_1 … d_K`` as main tokens; drafts are accepted while they equal the
   AR argmax of the token before; the argmax after the last accepted one is the correction. The
   cache keeps ``t_0, d_1 … d_a``; the correction is the next step's ``x_{n-1}``.

A step costs ``2 + rounds`` forwards (one with ``ar``) and commits ``a + 2`` tokens (``t_0``, the
accepted drafts, the correction), each one the AR argmax.

**Sampling** (``sampling`` with temperature > 0): ``t_0`` is drawn from the AR distribution ``p``;
the refined drafts are deterministic, i.e. proposals with ``q`` a point mass, so the rejection rule
becomes: accept draft ``d`` with probability ``p(d)``; at the first rejection draw from ``p`` with
``d`` removed (``norm(max(0, p − δ_d))``), and after the last accepted draft from ``p`` — exactly AR
sampling's distribution, with the same seeded uniforms as the decode engine (``rules.py``).
"""

from __future__ import annotations

import torch

from fluid_npu.layout import slot_block
from fluid_npu.sampling.engine import Engine
from fluid_npu.sampling.policies import Policy
from fluid_npu.sampling.rules import (
    ACCEPT,
    DRAW,
    SamplingParams,
    filtered_probs,
    residual,
    sample,
    uniform,
)
from fluid_ops.meta import MAIN, PAD

DEFAULT_REFINE_THRESHOLD = 0.9
DEFAULT_MAX_REFINE = 4


def run_reference(
    eng: Engine,
    policy: Policy,
    khead: torch.nn.Module | None = None,
    refine_threshold: float = DEFAULT_REFINE_THRESHOLD,
    max_refine: int = DEFAULT_MAX_REFINE,
    sampling: SamplingParams | None = None,
) -> None:
    """Decode until every row has finished (EOS or ``max_new_tokens``); ``sampling`` with a
    temperature samples (row ``r`` seeded ``seed + r``), else greedy."""
    rule = None if sampling is None or sampling.greedy else _Sampler(eng, sampling)
    kd = policy.block_len
    dev = eng.device
    log_thr = float(torch.log(torch.tensor(refine_threshold)))
    while eng.active:
        b = eng.active
        anchor_pos = eng.next_pos - 1
        # 1. draft: x_{n-1} then K_d MASK slots anchored at it
        block = slot_block(anchor_pos, kd, eng.mask_id)
        ids = torch.cat([eng.last[:, None], block.input_ids], 1)
        pos = torch.cat([anchor_pos[:, None], block.position_ids], 1)
        anchor = torch.cat([torch.full((b, 1), MAIN, device=dev), block.anchor], 1)
        hidden = eng.forward(ids, pos, anchor, n_main=1)
        t0 = eng.argmax(hidden[:, 0]) if rule is None else rule.draw(hidden[:, 0], anchor_pos + 1)
        if kd:
            st = eng.slot_stats(hidden[:, 1:])
            k = policy.keep(st.entropy, hidden[:, 0], khead)
            drafts, logp = st.argmax, st.max_logprob
        eng.cache.keep_new(kd + 1, [1] * b)
        finished, _ = eng.commit(t0[:, None], torch.ones(b, dtype=torch.long, device=dev))
        eng.last = t0
        kept = eng.retire(finished)
        if kd == 0:
            zeros = torch.zeros(b, dtype=torch.long, device=dev)
            eng.stats.record(accepted=zeros, drafted=zeros)
            continue
        if kept is not None:
            drafts, logp, k, anchor_pos = drafts[kept], logp[kept], k[kept], anchor_pos[kept]
        if not eng.active:
            break
        eng.stats.record(drafted=k)  # the horizons that go on to be verified
        width = int(k.max())
        if width == 0:
            continue  # nothing drafted anywhere: the next step drafts again from t_0
        drafts, logp = drafts[:, :width], logp[:, :width]
        drafts = _refine(eng, drafts, logp, k, anchor_pos, refine_threshold, log_thr, max_refine)
        _verify(eng, drafts, k, rule)


def _refine(
    eng: Engine,
    drafts: torch.Tensor,
    logp: torch.Tensor,
    k: torch.Tensor,
    anchor_pos: torch.Tensor,
    threshold: float,
    log_thr: float,
    max_refine: int,
) -> torch.Tensor:
    """Confidence-threshold refinement of the drafts ``[B, W]`` (see the module docstring)."""
    width = drafts.shape[1]
    dev = drafts.device
    col = torch.arange(width, device=dev)
    live = col[None] < k[:, None]
    fixed = _commit_confident(logp, live, torch.zeros_like(live), log_thr)
    block = slot_block(anchor_pos, width, eng.mask_id, live=live)
    for _ in range(max_refine):
        if bool((fixed | ~live).all()):
            break
        # slot j (0-based) reveals x at its own position: t_0 for j = 0, else the draft before it
        shifted = torch.cat([eng.last[:, None], drafts[:, :-1]], dim=1)
        known = torch.cat([torch.ones_like(fixed[:, :1]), fixed[:, :-1]], dim=1)
        ids = torch.where(known, shifted, block.input_ids)
        hidden = eng.forward(ids, block.position_ids, block.anchor, n_main=0)
        eng.cache.crop(width)
        st = eng.slot_stats(hidden)
        drafts = torch.where(fixed, drafts, st.argmax)
        logp = torch.where(fixed, logp, st.max_logprob)
        fixed = _commit_confident(logp, live, fixed, log_thr)
    return drafts


def _commit_confident(
    logp: torch.Tensor, live: torch.Tensor, fixed: torch.Tensor, log_thr: float
) -> torch.Tensor:
    """Fix open slots at or above the threshold, and at least each row's most confident one."""
    open_ = live & ~fixed
    new = open_ & (logp >= log_thr)
    best = torch.where(open_, logp, -torch.inf).argmax(dim=1, keepdim=True)
    forced = torch.zeros_like(new).scatter(1, best, True) & open_
    return fixed | new | forced


def _verify(
    eng: Engine, drafts: torch.Tensor, k: torch.Tensor, rule: _Sampler | None = None
) -> None:
    """Verify ``t_0, d_1 … d_K`` in one forward; commit the accepted drafts and the correction."""
    width = drafts.shape[1]
    dev = drafts.device
    j = torch.arange(width + 1, device=dev)
    base = eng.next_pos - 1  # position of t_0
    ids = torch.cat([eng.last[:, None], drafts], dim=1)
    anchor = torch.where(j[None] <= k[:, None], MAIN, PAD)
    hidden = eng.forward(ids, base[:, None] + j[None], anchor, n_main=width + 1)
    if rule is None:
        ar = eng.argmax(hidden)
        match = (drafts == ar[:, :width]) & (j[None, :width] < k[:, None])
        a = match.long().cumprod(dim=1).sum(dim=1)
        correction = ar.gather(1, a[:, None])
    else:
        a, correction = rule.verify(hidden, drafts, k, base)
    cand = torch.cat([drafts, correction], dim=1).scatter(1, a[:, None], correction)
    eng.stats.record(accepted=a)
    finished, committed = eng.commit(cand, a + 1)
    eng.last = correction[:, 0]
    eng.cache.keep_new(width + 1, committed)  # a + 1 each, unless the row just finished
    eng.retire(finished)


class _Sampler:
    """The sampling rule over the reference loop's active rows (point-mass proposals)."""

    def __init__(self, eng: Engine, params: SamplingParams) -> None:
        self.eng, self.params = eng, params
        # row r: seed + r; no seed: drawn from torch's global generator, as the engine does
        first = int(torch.randint(0, 2**62, ()).item()) if params.seed is None else int(params.seed)
        self.seeds = torch.arange(len(eng.tokens), device=eng.device) + first

    def _p(self, hidden: torch.Tensor) -> torch.Tensor:
        b = hidden.shape[0]
        full = torch.ones(b, device=hidden.device)
        pr = self.params
        return filtered_probs(
            self.eng.head.logits(hidden),
            full * pr.temperature,
            full.long() * pr.top_k,
            full * pr.top_p,
            full * pr.min_p,
        )

    def _seed(self) -> torch.Tensor:
        return self.seeds[torch.tensor(self.eng.row_ids, device=self.eng.device)]

    def draw(self, hidden: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """A token per row from ``p`` at ``position`` (the DRAW uniform of that position)."""
        return sample(self._p(hidden), uniform(self._seed(), position, DRAW))

    def verify(
        self, hidden: torch.Tensor, drafts: torch.Tensor, k: torch.Tensor, base: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        width = drafts.shape[1]
        p = self._p(hidden)  # [b, W+1, V]
        j = torch.arange(width, device=drafts.device)
        seed = self._seed()
        p_draft = p[:, :width].gather(-1, drafts[..., None])[..., 0]
        u = uniform(seed[:, None], base[:, None] + 1 + j[None], ACCEPT)
        ok = (u <= p_draft.double()) & (j[None] < k[:, None])
        a = ok.long().cumprod(dim=1).sum(dim=1)
        rows = torch.arange(p.shape[0], device=p.device)
        dist = p[rows, a]
        rejected = drafts.gather(1, a.clamp(max=max(width - 1, 0))[:, None])
        point = torch.zeros_like(dist).scatter(1, rejected, 1.0)  # the proposal: a point mass
        dist = torch.where((a < k)[:, None], residual(dist, point), dist)
        return a, sample(dist, uniform(seed, base + 1 + a, DRAW))[:, None]
