"""The decode step's constrained rows (``grammar.py``): the drafts their grammars force and the
masks of the positions a step verifies for them.

``ConstrainedMixin`` is what ``step.py`` does only when a request follows a grammar: before the
forward, each running constrained row gets its pending drafts — the block the model drafted
for it in the last step (read back with that step's tokens), for a greedy row up to the first
token its grammar refuses, or the tokens its grammar forces next where those are more; for a
sampling row up to and with that token — and the bitmask of every position it verifies (after
0, 1, … of those drafts), filled on the host by the row's matcher and unpacked on the device.
After the forward the masks set every refused token's logit to ``-inf``, so the verify accepts a
draft only where it is the masked argmax, or, sampling, where the rejection rule takes it (never
a refused one: its probability is 0).
"""

from __future__ import annotations

from typing import Any

import torch

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.grammar import bitmasks, follow, jump_forward, unpack, valid_prefix


class ConstrainedMixin:
    """Constrained-row bookkeeping of ``Scheduler`` (which owns the slots and their state)."""

    def _check_grammar(self, req: Any) -> None:
        """A submitted request's grammar against this engine: compiled for its logits, with an
        EOS to end on, ``grammar_after`` only with one; a ``ConfigError`` naming the problem."""
        if req.grammar_after is not None and (req.grammar is None or req.grammar_after < 0):
            raise ConfigError(
                f"request {req.request_id!r}: grammar_after names the token a grammar starts "
                "after; give it with a grammar, as a token id"
            )
        if req.grammar is not None:
            eos_ids = self.eos_ids if req.eos_ids is None else list(req.eos_ids)
            if req.grammar.vocab_size != self.head.weight.shape[0]:
                raise ConfigError(
                    f"request {req.request_id!r}: its grammar was compiled for "
                    f"{req.grammar.vocab_size} logits, the model has "
                    f"{self.head.weight.shape[0]}; compile it with the model's vocabulary size"
                )
            if not eos_ids:
                raise ConfigError(
                    f"request {req.request_id!r}: a grammar ends with the EOS token, and the "
                    "request has no EOS id (ignore_eos / eos_ids=[]); give it one"
                )

    def _constrained_rows(self, hi: int) -> tuple[list[int], list[list[int]], list[int]]:
        """The running constrained rows below ``hi``, their drafts for this step — a greedy
        row's the longer of the model's (the block the last step drafted, up to the first token
        the grammar refuses) and the text the grammar forces; a sampling row's the model's up to
        and with the first refused one (grammar.py says why) — and the running rows whose grammar
        starts after a token not yet committed (``Request.grammar_after``)."""
        rows, armed = [], []
        for i, s in enumerate(self.slots[:hi]):
            if s is not None and s.running and s.matcher is not None:
                (armed if s.armed else rows).append(i)
        drafts = []
        for i in rows:
            s = self.slots[i]
            n = valid_prefix(s.matcher, s.next_drafts)
            if not s.params.greedy:  # its drafts up to and with the first one refused: the
                # rejection rule turns that one down and draws from the residual (grammar.py)
                ended = n and s.next_drafts[n - 1] in self._eos_of(i)
                drafts.append(s.next_drafts[: n if ended else n + 1])
                continue
            model = s.next_drafts[:n]
            forced = jump_forward(s.matcher, self.k)
            s.model_drafts = bool(model) and len(model) >= len(forced)  # (the budget learns
            drafts.append(model if s.model_drafts or not forced else forced)  # from these only)
        return rows, drafts, armed

    def _cut_at_arm(
        self, toks: torch.Tensor, take: torch.Tensor, a: torch.Tensor, j: torch.Tensor, hi: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A row whose grammar starts after its ``arm`` token commits up to that token and no
        further this step (the tokens after it are decoded again, under the grammar); which rows
        it cut short of their accepted drafts (their new block is void)."""
        arm = self.arm[:hi]
        at = (toks == arm[:, None]) & (j[None] < take[:, None]) & (arm >= 0)[:, None]
        found = at.any(dim=1)
        cut = torch.where(found, at.long().argmax(dim=1) + 1, take)
        return cut, found & (cut < a + 1)

    def _arm(self, i: int, s: Any, toks: list[int]) -> None:
        """Row ``i``'s tokens of a step: once its ``grammar_after`` token is among them (its
        last: ``_cut_at_arm``), its grammar holds every token after."""
        if s.req.grammar_after in toks:
            s.armed = False
            self.arm[i] = -1

    def _follow(
        self, s: Any, toks: list[int], lps: list | None, tops: list | None, done: int
    ) -> tuple[list[int], list | None, list | None, int]:
        """A constrained row's committed tokens through its matcher (``grammar.follow``). A row
        whose grammar left no token it could take — its text complete, and the EOS that alone
        ends it held back by ``min_tokens``: a greedy row's argmax is then refused, a sampling
        row's draw finds nothing (``done`` 3: the step committed its accepted drafts and no draw)
        — ends there as "stop"; a token refused otherwise, or numbers that broke (``done`` 2: an
        overflow), end it as "error"."""
        refused = follow(s.matcher, toks)
        if done == 3:  # a sampling row's draw found nothing: its accepted drafts, then "stop"
            s.stopped = True
            return toks, lps, tops, 1
        if refused is None and done != 2:
            return toks, lps, tops, done
        cut = len(toks) if refused is None else refused
        s.stopped = s.matcher.is_completed() and len(s.new) + cut < s.params.min_tokens
        lps = None if lps is None else lps[:cut]
        tops = None if tops is None else tops[:cut]
        return toks[:cut], lps, tops, 1 if s.stopped else 2

    def _keep_drafts(self, rows: list[int], packed: list[list[float]], k: int) -> None:
        """The constrained rows' next drafts, from the step's read (its last ``1 + k`` columns:
        how many the row keeps, then the drafts)."""
        for i in rows:
            row = packed[i]
            kept = int(row[-k - 1])
            self.slots[i].next_drafts = [int(t) for t in row[len(row) - k :][:kept]]

    def _set_drafts(self, rows: list[int], drafts: list[list[int]], big_m: int) -> None:
        """The rows' ``drafts`` (each one its grammar takes: ``_constrained_rows``) become their
        pending drafts, before the step reads them."""
        dev = self.device
        at = torch.tensor(rows, device=dev)
        if big_m:
            padded = [d + [0] * (big_m - len(d)) for d in drafts]
            self.drafts[at, :big_m] = torch.tensor(padded, dtype=torch.long, device=dev)
        self.m[at] = torch.tensor([len(d) for d in drafts], dtype=torch.long, device=dev)

    def _grammar_masks(self, rows: list[int], drafts: list[list[int]], big_m: int) -> torch.Tensor:
        """The rows' masks ``[len(rows), big_m + 1, V]`` (True: allowed) on the device, position
        ``j`` after their first ``j`` drafts (filled on the host while the device runs the
        forward)."""
        vocab = self.head.weight.shape[0]
        masks, taken = bitmasks([self.slots[i].matcher for i in rows], drafts, big_m + 1, vocab)
        for i, d, n in zip(rows, drafts, taken):  # (they were checked: _constrained_rows)
            if n < len(d) - (0 if self.slots[i].params.greedy else 1):
                raise RuntimeError("a constrained row was given drafts its grammar refuses")
        return unpack(masks.to(self.device), vocab)
