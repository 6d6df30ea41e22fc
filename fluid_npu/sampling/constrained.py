"""The decode step's constrained rows (``grammar.py``): the drafts their grammars force and the
masks of the positions a step verifies for them.

``ConstrainedMixin`` is what ``step.py`` does only when a request follows a grammar: before the
forward, each running constrained row gets the tokens its grammar forces next as its pending
drafts (greedy rows, up to the policy's block length; a sampling row none) and the bitmask of
every position it verifies (after 0, 1, … of those drafts), filled on the host by the row's
matcher and unpacked on the device. After the forward the masks set every refused token's logit
to ``-inf``, so the verify accepts a forced draft only where it is the masked argmax.
"""

from __future__ import annotations

import torch

from fluid_npu.sampling.grammar import bitmasks, jump_forward, unpack


class ConstrainedMixin:
    """Constrained-row bookkeeping of ``Scheduler`` (which owns the slots and their state)."""

    def _constrained_rows(self, hi: int) -> tuple[list[int], list[list[int]]]:
        """The running constrained rows below ``hi`` and the drafts their grammars force."""
        rows = [i for i, s in enumerate(self.slots[:hi])
                if s is not None and s.running and s.matcher is not None]  # fmt: skip
        slots = [self.slots[i] for i in rows]
        return rows, [jump_forward(s.matcher, self.k if s.params.greedy else 0) for s in slots]

    def _grammar_masks(self, rows: list[int], drafts: list[list[int]], big_m: int) -> torch.Tensor:
        """The rows' forced ``drafts`` become their pending drafts (cut where a grammar refuses
        one); their masks ``[len(rows), big_m + 1, V]`` (True: allowed) on the device."""
        vocab = self.head.weight.shape[0]
        masks = bitmasks([self.slots[i].matcher for i in rows], drafts, big_m + 1, vocab)
        dev = self.device
        at = torch.tensor(rows, device=dev)
        if big_m:
            padded = [d + [0] * (big_m - len(d)) for d in drafts]
            self.drafts[at, :big_m] = torch.tensor(padded, dtype=torch.long, device=dev)
        self.m[at] = torch.tensor([len(d) for d in drafts], dtype=torch.long, device=dev)
        return unpack(masks.to(dev), vocab)
