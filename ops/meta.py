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
"""

from __future__ import annotations

from dataclasses import dataclass

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
