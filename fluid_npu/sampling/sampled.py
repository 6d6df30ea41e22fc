"""The decode step's sampling rows (``step.py``): filtered distributions, the speculative
rejection rule of ``rules.py`` over a step's drafts, and log-probabilities.

``SampledMixin`` holds what a step does only when a request samples (or asks for logprobs); the
greedy path never calls it. Every random number is ``rules.uniform`` of the request's seed and the
position it decides, so a seeded request draws the same numbers alone or in a batch.
"""

from __future__ import annotations

import math

import torch

from fluid_npu.sampling.rules import (
    ACCEPT,
    DRAW,
    filtered_probs,
    kept_tokens,
    residual,
    sample,
    uniform,
)


class SampledMixin:
    """Sampling-row arithmetic of ``Scheduler`` (which owns the per-slot settings it reads)."""

    def _filters(self) -> tuple[torch.Tensor, ...]:
        return self.temp, self.top_k, self.top_p, self.min_p

    def _filtered(self, logits: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
        return filtered_probs(logits, *(x[rows] for x in self._filters()))

    def _logprobs(self, raw: torch.Tensor, adjusted: torch.Tensor, hi: int) -> torch.Tensor:
        """What a request's logprobs report (``logprobs_mode``, vLLM's four), ``[hi, M+1, V]``:
        the model's own logits ``raw`` or their log-softmax; or, processed, the logits the
        token was chosen from — ``adjusted`` (logit bias, penalties, a grammar's mask) over the
        temperature, the tokens top-k / top-p / min-p drop at ``-inf`` — or their log-softmax.
        Greedy rows have no temperature and no filters (vLLM turns them off for greedy)."""
        mode = self.logprobs_mode
        if mode.startswith("raw"):
            return raw if mode == "raw_logits" else raw.log_softmax(dim=-1)
        sampled = (self.temp[:hi] > 0)[:, None, None]
        kept, scores = kept_tokens(adjusted, *(x[:hi] for x in self._filters()))
        scores = torch.where(sampled, scores.masked_fill(~kept, -math.inf), adjusted)
        return scores if mode == "processed_logits" else scores.log_softmax(dim=-1)

    def _verify_sampled(
        self,
        logits: torch.Tensor,
        drafts: torch.Tensor,
        m: torch.Tensor,
        base: torch.Tensor,
        a_greedy: torch.Tensor,
        corr_greedy: torch.Tensor,
        hi: int,
        big_m: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Speculative rejection sampling for the sampling rows (``rules.py``); greedy rows keep
        their argmax results. Returns accepted counts ``[hi]``, corrections ``[hi, 1]``, which
        sampling rows' AR distributions are not finite ``[hi]`` (an overflow upstream: NaN or inf
        logits, where transformers' sampling raises; nothing is drawn from them) and which rows'
        logits at the draw are all ``-inf`` ``[hi]`` (a grammar left nothing — its complete text's
        EOS held back by ``min_tokens``: the row ends after its accepted drafts)."""
        dev = self.device
        rows = slice(0, hi)
        p = self._filtered(logits, rows)  # [hi, M+1, V]
        j = torch.arange(big_m, device=dev)
        seed = self.seed[:hi]
        guess = base[:, None] + 1 + j[None]  # the position each draft guesses
        p_draft = p[:, :big_m].gather(-1, drafts[..., None])[..., 0]
        u = uniform(seed[:, None], guess, ACCEPT)
        ok = (u * self.qprob[:hi, :big_m].double() <= p_draft.double()) & (j[None] < m[:, None])
        ok = ok & (p_draft > 0)  # (min(1, p/q) is 0 there: a draft a grammar refuses, included)
        a = ok.long().cumprod(dim=1).sum(dim=1)
        idx = torch.arange(hi, device=dev)
        p_a = p[idx, a]
        dist = p_a
        if self.dhid is not None and big_m:
            q_a = self._filtered(self.head.logits(self.dhid[idx, a.clamp(max=self.k - 1)]), rows)
            dist = torch.where((a < m)[:, None], residual(p_a, q_a), p_a)
        drawn = sample(dist, uniform(seed, base + 1 + a, DRAW))
        sampled = self.temp[:hi] > 0
        a = torch.where(sampled, a, a_greedy)
        # the distribution the step draws from (a rejected draft's position, NaN or not, is not
        # drawn from; an accepted one's probability was finite, or it would not have passed)
        empty = sampled & (logits[idx, a] == -math.inf).all(dim=-1)
        broken = sampled & ~torch.isfinite(p_a).all(dim=-1) & ~empty
        return a, torch.where(sampled[:, None], drawn[:, None], corr_greedy), broken, empty
