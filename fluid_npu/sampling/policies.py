"""Horizon policies of the elastic sampler (DESIGN §1.3): how many MASK slots to draft and keep.

A policy is parsed once from its command-line spelling and then answers two questions per step:

* ``block_len``: how many slots to draft after an anchor (0 = plain greedy decoding);
* ``keep``: of the drafted slots, how many leading ones become drafts to verify, per row.

Spellings:

* ``ar`` — K = 0: one token per forward, the greedy baseline run through the same engine;
* ``fixed:K`` — always draft and keep ``K`` slots (``1 <= K <= k_max``);
* ``entropy[:T]`` — draft ``k_max`` slots and keep the longest leading run whose predictive entropy
  is below ``T`` nats (default ``DEFAULT_ENTROPY`` = 2.0): the sampler sprints through predictable
  text and drafts nothing at a high-entropy transition. A kept wrong draft costs one verified
  position, a dropped right one a whole step, so the bound is loose (a larger ``T`` keeps more);
  compare thresholds on your model with ``fluid bench sampler --policies entropy:1,entropy:2,...``
  (the README lists the current figures);
* ``khead`` — draft ``k_max`` slots and keep ``K`` = the K-head's prediction from the anchor's final
  hidden state, clamped to ``[k_min, k_max]``.

Which policy is used never changes the committed tokens (every one is the AR argmax); it only
changes how many forwards they take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fluid_npu.errors import ConfigError

DEFAULT_K_MAX = 16
DEFAULT_ENTROPY = 2.0
KINDS = ("ar", "fixed", "entropy", "khead")


class HorizonError(ConfigError):
    """A horizon policy is misspelt or asks for a horizon the model cannot draft."""


@dataclass(frozen=True)
class Policy:
    """A parsed horizon policy; ``k`` is the fixed horizon, ``threshold`` the entropy bound."""

    kind: str
    k: int = 0
    threshold: float = DEFAULT_ENTROPY
    k_min: int = 1
    k_max: int = DEFAULT_K_MAX

    @property
    def block_len(self) -> int:
        """Slots drafted after an anchor (0 for ``ar``)."""
        if self.kind == "ar":
            return 0
        if self.kind == "fixed":
            return self.k
        return self.k_max

    @property
    def name(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.k}"
        if self.kind == "entropy":
            return f"entropy:{self.threshold:g}"
        return self.kind

    def keep(
        self,
        entropy: torch.Tensor,
        anchor_hidden: torch.Tensor | None = None,
        khead: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """How many leading drafted slots each row keeps, ``[B]`` int64 in ``[0, block_len]``.

        ``entropy [B, block_len]`` is each slot's predictive entropy (nats); ``anchor_hidden
        [B, H]`` the final hidden state of each row's anchor (for the K-head).
        """
        b, n = entropy.shape
        if self.kind in ("ar", "fixed"):
            return torch.full((b,), n, dtype=torch.long, device=entropy.device)
        if self.kind == "entropy":
            return (entropy < self.threshold).long().cumprod(dim=1).sum(dim=1)
        if khead is None or anchor_hidden is None:
            raise HorizonError("the khead policy needs a K-head (--khead DIR)")
        k = khead.predict(anchor_hidden).to(entropy.device).long()
        return k.clamp(self.k_min, min(self.k_max, n))


def block_bound(k_max: int | None, khead: Any = None) -> int:
    """The horizon bound a run uses: the one asked for, else the K-head's (a ``KHead``, its
    ``k_max`` or None), else ``DEFAULT_K_MAX``."""
    if k_max is not None:
        return int(k_max)
    head_k = getattr(khead, "k_max", khead)
    return int(head_k or DEFAULT_K_MAX)


def parse_policy(
    spec: str,
    *,
    k_max: int = DEFAULT_K_MAX,
    k_min: int = 1,
    has_khead: bool = False,
) -> Policy:
    """Parse ``ar`` / ``fixed:K`` / ``entropy[:T]`` / ``khead``; bad input is a ``HorizonError``."""
    if isinstance(spec, Policy):
        return spec
    if k_max < 1:
        raise HorizonError(f"k_max must be at least 1, got {k_max}")
    if not 1 <= k_min <= k_max:
        raise HorizonError(f"k_min must lie in [1, k_max={k_max}], got {k_min}")
    text = str(spec).strip().lower()
    kind, _, arg = text.partition(":")
    if kind not in KINDS:
        raise HorizonError(
            f"unknown horizon policy {spec!r}; choose ar, fixed:K, entropy[:T] or khead"
        )
    if kind == "fixed":
        try:
            k = int(arg)
        except ValueError:
            raise HorizonError(
                f"policy {spec!r}: write fixed:K with an integer K, e.g. fixed:4"
            ) from None
        if not 1 <= k <= k_max:
            raise HorizonError(f"policy {spec!r}: K must lie in [1, k_max={k_max}], got {k}")
        return Policy("fixed", k=k, k_min=k_min, k_max=k_max)
    if kind == "entropy":
        threshold = DEFAULT_ENTROPY
        if arg:
            try:
                threshold = float(arg)
            except ValueError:
                raise HorizonError(
                    f"policy {spec!r}: write entropy:T with T in nats, e.g. entropy:2.0"
                ) from None
            if not threshold > 0:
                raise HorizonError(f"policy {spec!r}: the entropy threshold must be > 0 nats")
        return Policy("entropy", threshold=threshold, k_min=k_min, k_max=k_max)
    if arg:
        raise HorizonError(f"policy {spec!r} takes no argument; write {kind}")
    if kind == "khead" and not has_khead:
        raise HorizonError("the khead policy needs a K-head: pass --khead DIR (or khead=...)")
    return Policy(kind, k_min=k_min, k_max=k_max)
