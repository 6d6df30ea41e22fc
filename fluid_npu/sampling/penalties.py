"""Repetition, presence and frequency penalties in the decode engine: per-slot token counts kept on
the device, and the penalised logits of a verify step whose every position sees the drafts before
it.

The semantics are vLLM's — transformers' for ``repetition_penalty``, OpenAI's for the other two —
applied to the raw logits before temperature and the filters (the order of both):

* ``repetition_penalty`` ``r`` (1 = off): a token that occurs in the prompt or the output so far
  has its logit divided by ``r`` where positive, multiplied by ``r`` otherwise (transformers'
  ``RepetitionPenaltyLogitsProcessor``);
* ``presence_penalty`` ``a`` and ``frequency_penalty`` ``f`` (0 = off, each in [-2, 2]): logit
  ``− a·[n > 0] − f·n`` where ``n`` counts the token's occurrences in the output so far.

A verify step scores position ``j`` after the pending drafts ``d_0 … d_{j−1}`` — the sequence the
AR model would have seen there — so "so far" for position ``j`` includes those drafts: the counts
of committed tokens (``[slots, V]``, made at the first penalised request) are broadcast over the
step's positions and each pending draft is added to the positions after it (one small scatter per
draft position, no host read). Only the rows of penalised requests are computed. Every committed
token is then the argmax (or the exact sample) of the penalised AR distribution, as transformers'
``generate(repetition_penalty=…)`` decodes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Penalties:
    """The engine's per-slot penalty settings and counts (``scheduler.Scheduler.penalties``)."""

    def __init__(self, slots: int, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.prompt = torch.zeros((slots, vocab), dtype=torch.bool, device=device)  # in the prompt
        self.count = torch.zeros((slots, vocab), dtype=torch.int32, device=device)  # in the output
        self.rep = torch.ones(slots, dtype=torch.float32, device=device)
        self.presence = torch.zeros(slots, dtype=torch.float32, device=device)
        self.frequency = torch.zeros(slots, dtype=torch.float32, device=device)

    def admit(self, row: int, prompt: Sequence[int], rep: float, presence: float,
              frequency: float) -> None:  # fmt: skip
        """Slot ``row`` starts a request with these settings and ``prompt``."""
        dev = self.prompt.device
        self.prompt[row] = False
        self.count[row] = 0
        self.prompt[row, torch.tensor(list(prompt), dtype=torch.long, device=dev)] = True
        self.rep[row], self.presence[row], self.frequency[row] = rep, presence, frequency

    def commit(self, rows: torch.Tensor, toks: torch.Tensor, take: torch.Tensor) -> None:
        """Rows ``rows`` (of the step's ``[hi, W]`` tokens ``toks``) committed their first
        ``take`` tokens: they count as output from now on."""
        toks, take = toks[rows], take[rows]
        kept = torch.arange(toks.shape[1], device=toks.device)[None] < take[:, None]
        at = rows[:, None].expand_as(toks)
        self.count.index_put_((at, toks), kept.to(self.count.dtype), accumulate=True)

    def move(self, dst: int, src: int) -> None:
        """A request moved from slot ``src`` to ``dst`` (the scheduler's compaction)."""
        for t in (self.prompt, self.count, self.rep, self.presence, self.frequency):
            t[dst] = t[src]

    def apply(self, logits: torch.Tensor, drafts: torch.Tensor, m: torch.Tensor,
              rows: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """``logits [hi, M+1, V]`` (float32) of a verify step with the penalties applied in
        ``rows``: position ``j`` sees the committed tokens and the row's pending drafts before
        ``j`` (``drafts [hi, M]``, the first ``m`` of each row real)."""
        sub = logits[rows]  # [R, P, V]
        r, p = sub.shape[0], sub.shape[1]
        count = self.count[rows][:, None, :].repeat(1, p, 1).float()
        idx = torch.arange(r, device=sub.device)[:, None]
        for i in range(p - 1):  # draft i is part of what positions i + 1 … M have seen
            real = (i < m[rows])[:, None]  # [R, 1]
            after = torch.arange(i + 1, p, device=sub.device)[None]
            tok = drafts[rows, i][:, None]
            count[idx, after, tok] += real.float()
        seen = self.prompt[rows][:, None, :] | (count > 0)
        rep = self.rep[rows][:, None, None]
        out = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        out = out - self.frequency[rows][:, None, None] * count
        out = out - self.presence[rows][:, None, None] * (count > 0).float()
        logits = logits.clone()
        logits[rows] = out
        return logits
