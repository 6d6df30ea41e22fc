"""Tile selection of the ``triton`` attention back end: which (query tile, key tile) pairs to visit.

The kernels (``fluid_ops.attention_triton_kernels``) cut the queries into tiles of ``block_m`` rows
and the keys into tiles of ``block_n`` columns, and compute a tile pair only when it may hold a
visible pair. This module decides which, in torch, from cheap per-tile summaries of the metadata:

* ``_tile_summary``: per tile, the position and anchor ranges of its main and slot tokens;
* ``_tile_pairs`` (``active_tiles``): a pair is visited when, by the summaries, some query may see
  some key — conservative (a pair holding a visible pair is never skipped; tested against
  ``visibility``) and tight for the Stage I memory order. ``full`` marks visited pairs where every
  pair is visible, whose mask the kernels skip;
* ``_visit_list``: the visited tiles of each row as a compact list the kernels walk;
* ``plan_visits``: the int32 metadata and both sides' visit lists one launch needs, cached per
  metadata by the one rule of ``fluid_ops.meta.cached_plan``;
* ``tile_stats``: the query-key pairs the kernels compute against the visible pairs
  (``attn_compute_ratio``).

Nothing here imports triton: the figures are available wherever torch is.
"""

from __future__ import annotations

import torch

from fluid_ops.meta import MAIN, PAD, AttnMeta, cached_plan, visibility

#: Tile sizes used when the caller gives none: 64 query rows × 32 keys. On the default Stage I
#: layout (N = 1024, k_max = 16, anchor_prob 0.5) this computes 1.25× the visible pairs (64 × 64:
#: 1.37×, 128 × 64: 1.52×, dense: 10.4×; see ``tile_stats``), and it was the fastest forward +
#: backward of the three on an H100 (tools/bench_triton_attention.py).
DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 32
_BIG = 1 << 30


def _tile_summary(pos: torch.Tensor, anchor: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """Per tile of ``block`` tokens: position/anchor ranges of its main and slot tokens.

    Absent kinds get empty ranges (min = +BIG, max = -BIG) so every comparison with them fails.
    """
    b, length = pos.shape
    n_tiles = -(-length // block)  # ceil
    pad = n_tiles * block - length
    pos = torch.nn.functional.pad(pos.long(), (0, pad), value=0).view(b, n_tiles, block)
    anchor = torch.nn.functional.pad(anchor.long(), (0, pad), value=PAD).view(b, n_tiles, block)
    is_main = anchor == MAIN
    is_slot = anchor >= 0
    big = torch.full_like(pos, _BIG)
    # what each token may see of the main stream: its position (main), its anchor (slot), none
    limit = torch.where(is_main, pos, torch.where(is_slot, anchor, -big))
    return {
        "all_main": is_main.all(-1),
        "limit_min": limit.amin(-1),
        "main_pos_min": torch.where(is_main, pos, big).amin(-1),
        "main_pos_max": torch.where(is_main, pos, -big).amax(-1),
        "slot_anchor_min": torch.where(is_slot, anchor, big).amin(-1),
        "slot_anchor_max": torch.where(is_slot, anchor, -big).amax(-1),
        "slot_pos_min": torch.where(is_slot, pos, big).amin(-1),
        "slot_pos_max": torch.where(is_slot, pos, -big).amax(-1),
    }


def active_tiles(meta: AttnMeta, block_m: int, block_n: int) -> torch.Tensor:
    """Bool ``[B, n_q_tiles, n_k_tiles]``: True where the kernels visit the (query, key) tile.

    A tile is visited when, by the tile summaries, some query may see some key: a main key at or
    before the latest main query position or the largest slot anchor of the query tile, or a slot
    key whose anchor range meets the query tile's slot anchor range at a position not after its
    latest slot query. Every visible pair lies in a visited tile (tested against ``visibility``).
    """
    return _tile_pairs(meta, block_m, block_n)[0]


def _tile_pairs(meta: AttnMeta, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``active_tiles`` and ``full``: visited tiles where every pair is visible (no mask needed:
    only main keys, each at or before what every query of the tile may see of the main stream)."""
    q = _tile_summary(meta.q_pos, meta.q_anchor, block_m)
    k = _tile_summary(meta.k_pos, meta.k_anchor, block_n)
    main_limit = torch.maximum(q["main_pos_max"], q["slot_anchor_max"])[:, :, None]
    sees_main = k["main_pos_min"][:, None, :] <= main_limit
    sees_slot = (
        (k["slot_anchor_min"][:, None, :] <= q["slot_anchor_max"][:, :, None])
        & (k["slot_anchor_max"][:, None, :] >= q["slot_anchor_min"][:, :, None])
        & (k["slot_pos_min"][:, None, :] <= q["slot_pos_max"][:, :, None])
    )
    full = k["all_main"][:, None, :] & (k["main_pos_max"][:, None, :] <= q["limit_min"][:, :, None])
    return sees_main | sees_slot, full


def _visit_list(active: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``active`` ``[B, R, C]``: the True columns (ascending, first) and their count.

    Returns int32 ``idx [B, R, max(C, 1)]`` and ``cnt [B, R]``; kernels read ``idx[b, r, :cnt]``.
    A column ``c`` whose tile is ``full`` is stored as ``-c - 1``: the kernels skip its mask.
    """
    if active.shape[-1] == 0:
        active = torch.nn.functional.pad(active, (0, 1), value=False)
        full = torch.nn.functional.pad(full, (0, 1), value=False)
    order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)
    code = torch.where(full.gather(-1, order), -order - 1, order)
    return code.to(torch.int32).contiguous(), active.sum(-1).to(torch.int32).contiguous()


def resolve_tiles(block_m: int | None, block_n: int | None) -> tuple[int, int]:
    """The tile sizes to use (the defaults for None), checked: powers of two ≥ 16."""
    block_m = DEFAULT_BLOCK_M if block_m is None else int(block_m)
    block_n = DEFAULT_BLOCK_N if block_n is None else int(block_n)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two ≥ 16, got {value}")
    return block_m, block_n


def tile_stats(meta: AttnMeta, block_m: int | None = None, block_n: int | None = None) -> dict:
    """Query-key pairs the kernels compute vs. the visible pairs, at the kernels' tile sizes.

    ``computed_pairs`` counts every pair of every visited tile (``active_tiles``, the selection
    the kernels use, whole tiles even past the sequence end), summed over the batch, per head;
    ``visible_pairs`` counts the True entries of ``visibility(meta)``. The forward, dQ and dK/dV
    kernels visit the same tile pairs, so one figure covers all three. ``tiles_unmasked``: visited
    tiles whose pairs are all visible, where the kernels skip the visibility rule.
    """
    block_m, block_n = resolve_tiles(block_m, block_n)
    active, full = _tile_pairs(meta, block_m, block_n)
    computed = int(active.sum()) * block_m * block_n
    visible = sum(int(visibility(_row(meta, i)).sum()) for i in range(meta.batch))
    return {
        "computed_pairs": computed,
        "visible_pairs": visible,
        "attn_compute_ratio": computed / visible if visible else float("nan"),
        "dense_pairs": meta.batch * meta.q_pos.shape[1] * meta.k_pos.shape[1],
        "tiles_visited": int(active.sum()),
        "tiles_unmasked": int((active & full).sum()),
        "tiles_total": int(active.numel()),
        "attn_tile": [block_m, block_n],
    }


def _row(meta: AttnMeta, i: int) -> AttnMeta:
    s = slice(i, i + 1)
    return AttnMeta(meta.q_pos[s], meta.q_anchor[s], meta.k_pos[s], meta.k_anchor[s], meta.n_main)


def plan_visits(meta: AttnMeta, block_m: int, block_n: int, device: torch.device) -> tuple:
    """int32 metadata on ``device`` and the visit lists of both sides, cached on ``meta``.

    Returns ``(q_pos, q_anchor, k_pos, k_anchor, kv_idx, kv_cnt, q_idx, q_cnt)``: the query side
    lists the key tiles each query tile visits (forward, dQ), the key side the query tiles each key
    tile is visited by (dK/dV). A model calls every layer with the same metadata, so the selection
    runs once per step, not per layer (``cached_plan``: keyed by tile sizes and device, renewed
    when a metadata tensor is replaced or written in place).
    """
    key = ("triton", block_m, block_n, str(device))
    return cached_plan(meta, key, lambda: _build_visits(meta, block_m, block_n, device))


def _build_visits(meta: AttnMeta, block_m: int, block_n: int, device: torch.device) -> tuple:
    tensors = (meta.q_pos, meta.q_anchor, meta.k_pos, meta.k_anchor)
    m32 = AttnMeta(*(t.to(device=device, dtype=torch.int32).contiguous() for t in tensors))
    active, full = _tile_pairs(m32, block_m, block_n)
    by_query = _visit_list(active, full)  # per query tile: its key tiles
    by_key = _visit_list(active.mT, full.mT)  # per key tile: its query tiles
    return (m32.q_pos, m32.q_anchor, m32.k_pos, m32.k_anchor, *by_query, *by_key)
