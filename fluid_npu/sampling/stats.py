"""Per-call statistics of the sampler: forwards, tokens, TPF, accept-length and K histograms.

Counted, never estimated (DESIGN §1.3):

* ``prefill_forwards``: forwards that only encode the prompt (the prompt minus its last token; they
  commit nothing), kept apart;
* ``decode_forwards``: every other forward of the call (fused steps, drafts, refinements, verifies);
* ``row_forwards[b]``: the decode forwards row ``b`` took part in (a row leaves the batch when it
  finishes), so a row's TPF is ``new_tokens[b] / row_forwards[b]``;
* ``tpf`` = Σ new tokens / Σ row forwards: tokens per forward per sequence, 1.0 for greedy AR
  decoding at any batch size;
* ``accept_hist[a]``: row-steps that accepted ``a`` drafted tokens; ``k_hist[k]``: row-steps that
  drafted ``k`` tokens for verification (the horizon the policy chose);
* ``computed_tokens``: token positions the call's forwards computed, prefill included (rows ×
  width of each forward: padding, drafts that were rejected and blocks that were not used count
  too) — the work a compute-bound device pays for, against ``total_new_tokens`` committed;
* ``cached_tokens``: prompt tokens not computed because a slot's cache already held them (the
  engine's prefix reuse: ``reuse.py``);
* ``wall_s``: wall time of the call, prefill included (the device synchronised at the end).

``GenerateStats.merged`` folds the calls of one run (its batches) into one record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class GenerateStats:
    policy: str = ""
    loop: str = ""
    batch_size: int = 0
    prefill_forwards: int = 0
    decode_forwards: int = 0
    computed_tokens: int = 0
    cached_tokens: int = 0
    new_tokens: list[int] = field(default_factory=list)
    row_forwards: list[int] = field(default_factory=list)
    accept_hist: Counter = field(default_factory=Counter)
    k_hist: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    _pending_accept: list[torch.Tensor] = field(default_factory=list, repr=False)
    _pending_k: list[torch.Tensor] = field(default_factory=list, repr=False)

    @classmethod
    def merged(cls, parts: Sequence[GenerateStats]) -> GenerateStats:
        """One run's statistics from its calls (e.g. batches): rows appended, counts summed."""
        out = cls(policy=parts[0].policy if parts else "", loop=parts[0].loop if parts else "")
        for st in parts:
            st.finalize()
            out.batch_size += st.batch_size
            out.prefill_forwards += st.prefill_forwards
            out.decode_forwards += st.decode_forwards
            out.computed_tokens += st.computed_tokens
            out.cached_tokens += st.cached_tokens
            out.new_tokens += st.new_tokens
            out.row_forwards += st.row_forwards
            out.accept_hist.update(st.accept_hist)
            out.k_hist.update(st.k_hist)
            out.wall_s += st.wall_s
        return out

    @property
    def total_new_tokens(self) -> int:
        return int(sum(self.new_tokens))

    @property
    def tpf(self) -> float:
        """New tokens per decode forward per sequence (see the module docstring)."""
        forwards = sum(self.row_forwards)
        return self.total_new_tokens / forwards if forwards else 0.0

    def row_tpf(self, row: int) -> float:
        f = self.row_forwards[row]
        return self.new_tokens[row] / f if f else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.total_new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_accept(self) -> float:
        return _mean(self.accept_hist)

    @property
    def mean_k(self) -> float:
        """The mean horizon the policy drafted per row-step (0.0 for ``ar``)."""
        return _mean(self.k_hist)

    def record(
        self, accepted: torch.Tensor | None = None, drafted: torch.Tensor | None = None
    ) -> None:
        """Remember one step's accept lengths / drafted horizons (``[B]`` ints; no host sync)."""
        if accepted is not None:
            self._pending_accept.append(accepted.detach())
        if drafted is not None:
            self._pending_k.append(drafted.detach())

    def finalize(self) -> None:
        """Fold the recorded steps into the histograms (one host transfer per call)."""
        for pending, counter in (
            (self._pending_accept, self.accept_hist),
            (self._pending_k, self.k_hist),
        ):
            if pending:
                values = torch.cat([p.flatten() for p in pending]).cpu()
                for v, c in enumerate(torch.bincount(values).tolist()):
                    if c:
                        counter[v] += c
                pending.clear()

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "loop": self.loop,
            "batch_size": self.batch_size,
            "prefill_forwards": self.prefill_forwards,
            "decode_forwards": self.decode_forwards,
            "computed_tokens": self.computed_tokens,
            "cached_tokens": self.cached_tokens,
            "new_tokens": self.total_new_tokens,
            "tpf": self.tpf,
            "tokens_per_s": self.tokens_per_s,
            "mean_accept": self.mean_accept,
            "mean_k": self.mean_k,
            "accept_hist": {str(k): v for k, v in sorted(self.accept_hist.items())},
            "k_hist": {str(k): v for k, v in sorted(self.k_hist.items())},
            "wall_s": self.wall_s,
        }


def _mean(hist: Counter) -> float:
    n = sum(hist.values())
    return sum(v * c for v, c in hist.items()) / n if n else 0.0
