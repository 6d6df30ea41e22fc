"""The sampler's KV cache: a transformers ``DynamicCache`` plus per-row key metadata.

Every row of a batch advances on its own (ragged accept lengths), but a ``DynamicCache`` stores one
``[B, heads, T, D]`` tensor per layer and ``crop`` cuts every row equally. The rows stay independent
through the §1.1 metadata instead: each cache entry carries its RoPE position and its kind (``MAIN``
for a committed token, ``PAD`` for anything a query must never see), per row. So:

* left padding of shorter prompts is ``PAD``;
* after a step, the new entries of row ``b`` beyond its ``keep[b]`` accepted tokens are cut off the
  tail where every row agrees (``crop``) and marked ``PAD`` where a longer row still needs the slot;
* those holes are squeezed out (``compact``: one gather per layer, each row's entries moved to the
  right, order kept) once they waste a noticeable part of the cache.

A key's position, not its index, decides causality, so holes and compaction never change what a
query attends: the cache stays exact and nothing is recomputed.

In float16 a MASK slot's keys or values can overflow (a massive activation past 65504): a hidden
entry still reaches every query as ``0 * NaN`` in the attention's sums, so the float16 entries of
everything but main tokens (MASK slots, padding) enter the cache with NaN / inf as zero
(``_Float16SafeCache``). A main token's own overflow is kept as it is: it poisons its row exactly
as it does in transformers' ``generate`` (the decode engine ends such a request as an error).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from fluid_ops.meta import MAIN, PAD, AttnMeta

COMPACT_MIN = 16  # holes tolerated before a compaction, and the fraction of the cache ...
COMPACT_FRACTION = 0.125  # ... above which they are squeezed out


class _Float16SafeCache(DynamicCache):
    """A ``DynamicCache`` whose float16 entries other than main tokens are stored, and attended,
    with NaN / inf as 0; ``anchor`` is the kinds of the entries the current forward adds."""

    anchor: torch.Tensor | None = None  # [B, W] of the forward under way (RowCache.meta sets it)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.dtype == torch.float16 and self.anchor is not None:
            hidden = (self.anchor != MAIN)[:, None, :, None]  # [B, 1, W, 1]
            key_states = torch.where(hidden & ~key_states.isfinite(), 0.0, key_states)
            value_states = torch.where(hidden & ~value_states.isfinite(), 0.0, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class RowCache:
    """KV cache of the active rows with ``pos`` / ``anchor`` ``[B, T]`` for every entry."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.kv = _Float16SafeCache()
        self.pos = torch.zeros((batch, 0), dtype=torch.long, device=device)
        self.anchor = torch.zeros((batch, 0), dtype=torch.long, device=device)
        self._waste_bound = 0  # upper bound of what a compaction would save (see keep_new)

    @property
    def width(self) -> int:
        return int(self.pos.shape[1])

    def meta(self, q_pos: torch.Tensor, q_anchor: torch.Tensor, n_main: int | None) -> AttnMeta:
        """Metadata for new tokens ``[B, W]`` attending the cache followed by themselves."""
        self.kv.anchor = q_anchor
        return AttnMeta(
            q_pos,
            q_anchor,
            torch.cat([self.pos, q_pos], dim=1),
            torch.cat([self.anchor, q_anchor], dim=1),
            n_main,
        )

    def appended(self, q_pos: torch.Tensor, q_anchor: torch.Tensor) -> None:
        """Record the metadata of the entries a forward just appended to ``kv``."""
        self.pos = torch.cat([self.pos, q_pos], dim=1)
        self.anchor = torch.cat([self.anchor, q_anchor], dim=1)
        if self.kv.get_seq_length() != self.width:
            raise RuntimeError(
                f"KV cache holds {self.kv.get_seq_length()} entries but metadata {self.width}"
            )

    def keep_new(self, new: int, keep: list[int]) -> None:
        """Of the last ``new`` entries keep the first ``keep[b]`` per row; drop or hide the rest.

        The kept entries must be main tokens (they come first in a step's memory order).
        """
        top = max(keep)
        self._waste_bound += top - min(keep)
        drop = new - top
        if drop > 0:
            self.crop(drop)
        if top > min(keep):
            start = self.width - top
            idx = torch.arange(top, device=self.anchor.device)
            kept = torch.tensor(keep, device=self.anchor.device)
            tail = self.anchor[:, start:]
            self.anchor[:, start:] = torch.where(idx[None] < kept[:, None], tail, PAD)
        self.maybe_compact()

    def crop(self, n: int) -> None:
        """Remove the last ``n`` entries of every row."""
        if n <= 0:
            return
        self.kv.crop(-n)
        self.pos = self.pos[:, :-n]
        self.anchor = self.anchor[:, :-n]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the batch dimension), e.g. when rows finish."""
        for layer in self.kv.layers:
            if getattr(layer, "is_initialized", False) and layer.keys is not None:
                layer.keys = layer.keys.index_select(0, rows)
                layer.values = layer.values.index_select(0, rows)
        self.pos = self.pos.index_select(0, rows)
        self.anchor = self.anchor.index_select(0, rows)
        self._waste_bound = self.width  # unknown after a selection: check on the next step

    def maybe_compact(self, force_check: bool = False) -> bool:
        """Squeeze out the ``PAD`` holes when they waste enough of the cache; True if it did.

        The exact check costs a reduction over the cache, so it runs only when the running upper
        bound of the saving (grown by ``max(keep) − min(keep)`` per step) crosses the threshold.
        """
        threshold = max(COMPACT_MIN, int(COMPACT_FRACTION * self.width))
        if self._waste_bound < threshold and not force_check:
            return False
        valid = self.anchor != PAD
        width = int(valid.sum(dim=1).max()) if self.width else 0
        waste = self.width - width
        self._waste_bound = waste
        if waste < threshold:
            return False
        self._waste_bound = 0
        # Sorting by (kept, index) puts each row's holes first and its entries after, in order.
        idx = torch.arange(self.width, device=valid.device)
        order = torch.argsort(valid.long() * self.width + idx, dim=1)[:, self.width - width :]
        for layer in self.kv.layers:
            if getattr(layer, "is_initialized", False) and layer.keys is not None:
                b, h, _, _ = layer.keys.shape
                index = order[:, None, :, None]
                layer.keys = layer.keys.gather(2, index.expand(b, h, width, layer.keys.shape[-1]))
                layer.values = layer.values.gather(
                    2, index.expand(b, h, width, layer.values.shape[-1])
                )
        self.pos = self.pos.gather(1, order)
        self.anchor = self.anchor.gather(1, order)
        return True
