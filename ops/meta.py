"""Per-token attention metadata and the FLUID visibility rule (DESIGN §1.1), defined once.

Every back end of ``fluid_attention`` decides which query may attend which key from four integer
tensors instead of a dense ``L×L`` mask:

* ``q_pos`` / ``k_pos`` ``[B, L]``: the RoPE position of each query / key token;
* ``q_anchor`` / ``k_anchor`` ``[B, L]``: ``MAIN`` (-1) for a main-stream token, ``PAD`` (-2) for
  padding, and for a slot the position ``c`` of the main token it is anchored on.

The rule (query may attend key):

* key is padding, or query is padding → never;
* main query → main key: ``k_pos <= q_pos``;
* slot query (anchor ``c``) → main key: ``k_pos <= c``;
* slot query → slot key: same anchor and ``k_pos <= q_pos``;
* main query → slot key: never.

Every visible key therefore sits at a position ≤ the query's: strictly causal. The same rule covers
Stage I (queries = keys = the expanded layout) and cached inference (keys = KV cache + new tokens,
the cache holding committed main tokens only). A query row with no visible key (padding) produces a
zero output in every back end.

Plans derived from the metadata (the blocked back ends' blocks, the Triton visit lists) are cached
by one rule, ``cached_plan``: a plan is reused only while the metadata is the same tensors at the
same versions with the same ``n_main``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

import torch

MAIN = -1
PAD = -2


@dataclass
class AttnMeta:
    """Visibility metadata for one attention call; keys may be longer than queries (a KV cache).

    ``n_main`` is an optional structure hint for back ends that exploit the Stage I memory order:
    when set, query ``i < n_main`` is main (or padding) and every query ``i >= n_main`` is a slot or
    padding, and the queries are the last ``Lq`` keys (self-attention over the layout, possibly
    after a cache). Back ends that do not use it ignore it; correctness never depends on it.
    """

    q_pos: torch.Tensor
    q_anchor: torch.Tensor
    k_pos: torch.Tensor
    k_anchor: torch.Tensor
    n_main: int | None = None

    @classmethod
    def self_attention(
        cls, pos: torch.Tensor, anchor: torch.Tensor, n_main: int | None = None
    ) -> AttnMeta:
        """Metadata where the queries and keys are the same tokens (Stage I, or a prefill)."""
        return cls(pos, anchor, pos, anchor, n_main)

    @property
    def batch(self) -> int:
        return int(self.q_pos.shape[0])

    def to(self, device: torch.device | str) -> AttnMeta:
        return AttnMeta(
            self.q_pos.to(device),
            self.q_anchor.to(device),
            self.k_pos.to(device),
            self.k_anchor.to(device),
            self.n_main,
        )

    def validate(self, lq: int, lk: int) -> None:
        """Raise ``ValueError`` when the metadata does not match query/key lengths."""
        for name, t, n in (
            ("q_pos", self.q_pos, lq),
            ("q_anchor", self.q_anchor, lq),
            ("k_pos", self.k_pos, lk),
            ("k_anchor", self.k_anchor, lk),
        ):
            if t.dim() != 2 or t.shape[1] != n:
                raise ValueError(f"AttnMeta.{name} has shape {tuple(t.shape)}, expected [B, {n}]")


def visibility(meta: AttnMeta) -> torch.Tensor:
    """Dense bool mask ``[B, Lq, Lk]``, True = the query may attend the key (SDPA convention)."""
    qp = meta.q_pos[:, :, None]
    qa = meta.q_anchor[:, :, None]
    kp = meta.k_pos[:, None, :]
    ka = meta.k_anchor[:, None, :]
    q_main = qa == MAIN
    q_slot = qa >= 0
    k_main = ka == MAIN
    k_slot = ka >= 0
    # A main query sees main keys up to its own position; a slot sees main keys up to its anchor.
    limit = torch.where(q_main, qp, qa)
    see_main = k_main & (q_main | q_slot) & (kp <= limit)
    see_slot = k_slot & q_slot & (ka == qa) & (kp <= qp)
    return see_main | see_slot


# ------------------------------------------------------------------------------------------------
# The one cache-validity rule for plans derived from metadata.

T = TypeVar("T")
_PLANS = "_fluid_plans"  # attribute of ``meta.q_pos`` holding ``{key: (stamp, plan)}``


def cached_plan(meta: AttnMeta, key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, or the plan it returned before for the same metadata and ``key``.

    Every layer of a forward attends with the same metadata, so a back end plans once per forward
    and reuses the plan. A cached plan is valid while its *stamp* still matches: the four tensors
    are the same objects, each at the same version counter (torch bumps it on every in-place write,
    ``meta.q_anchor[0, 5] = PAD`` included), and ``n_main`` is unchanged. Replacing a tensor,
    writing into one or changing ``n_main`` therefore gives a fresh plan; nothing relies on the
    caller treating an ``AttnMeta`` as immutable.

    The plans live on ``meta.q_pos`` (a tensor attribute), not on the ``AttnMeta`` object: the
    ``fluid_attention`` custom op receives the four tensors and rebuilds the dataclass on every
    call, and torch hands the op the caller's tensor objects. Two limits, both from torch: while
    ``torch.compile`` traces (fake tensors) nothing is cached; and a tensor created under
    ``torch.inference_mode`` has no version counter, so for those the stamp is identity only (such
    a tensor can only be written inside inference mode: build a new ``AttnMeta`` instead).
    """
    if torch.compiler.is_compiling():
        return build()
    plans = vars(meta.q_pos).setdefault(_PLANS, {})
    stamp = _stamp(meta)
    entry = plans.get(key)
    if entry is not None and _same_stamp(entry[0], stamp):
        return entry[1]
    plan = build()
    plans[key] = (stamp, plan)
    return plan


def _tensors(meta: AttnMeta) -> tuple[torch.Tensor, ...]:
    return meta.q_pos, meta.q_anchor, meta.k_pos, meta.k_anchor


def _stamp(meta: AttnMeta) -> tuple:
    """``(n_main, weak references to the tensors, their versions)``; weak, so a cached plan never
    keeps a replaced tensor alive (nor ``q_pos``, which holds the cache, alive through itself)."""
    tensors = _tensors(meta)
    versions = tuple(None if t.is_inference() else t._version for t in tensors)
    return meta.n_main, tuple(weakref.ref(t) for t in tensors), versions


def _same_stamp(old: tuple, new: tuple) -> bool:
    (n_old, refs_old, v_old), (n_new, refs_new, v_new) = old, new
    same_objects = all(a() is not None and a() is b() for a, b in zip(refs_old, refs_new))
    return n_old == n_new and v_old == v_new and same_objects
