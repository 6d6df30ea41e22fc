"""The plan of the blocked back ends: which keys each block of queries must attend, and how.

``plan_blocks(meta, Lq, Lk, chunk)`` cuts the queries into consecutive blocks ``[q0, q1)`` — the
main stream ``[0, n_main)``, then the slot queries in chunks of ``chunk`` — and gives each block a
few key index ranges and a way to mask them. A back end (``blocked``: stock SDPA, ``npu``:
torch_npu) then runs one attention call per block over just those keys.

**The invariant.** For every block and every query ``i`` it keeps, (a) every key that ``i`` may
attend under ``visibility(meta)`` lies inside the block's key ranges, and (b) the block's masking
allows ``i`` exactly those keys. Then each kept row is the reference softmax over the same keys,
and every other row (padding: it sees nothing) is zeroed through ``keep``. Three facts give it,
one helper each:

1. ``_key_extents`` — the ranges are supersets (a). Query ``i`` sees a main key only at a
   position ≤ its *limit* (its own position for a main query, its anchor for a slot query), and a
   slot key only when ``i`` is a slot with the same anchor and a position ≥ the key's. So over a
   span of queries every visible key is a main key at a position ≤ the span's largest limit, or a
   slot key whose anchor lies between the span's smallest and largest slot anchors at a position ≤
   its largest slot position. The index interval from the first to the last key meeting these
   weaker tests, in any batch row, holds every visible key. Exact whatever the memory order; tight
   for the Stage I order (main keys up to the block's last anchor, then its own slot groups).
2. ``_masked_block`` — the mask is ``visibility`` itself on the gathered keys (b), with rows that
   see nothing opened to every key so no softmax is empty (``safe_mask``); those rows are zeroed.
3. ``_is_causal_square`` — when five checkable conditions hold, the main block's visibility *is*
   the causal triangle, so it needs no mask at all (one ``is_causal`` call; see its docstring).

**Cost.** The planning is torch on the metadata's device; all key ranges and the causal check come
back in one host transfer, and one more says which blocks need no ``keep``. Plans are cached per
metadata by the one rule of ``fluid_ops.meta.cached_plan``: every layer of a forward reuses its
plan, and metadata that changes (a replaced tensor, an in-place write, a new ``n_main``) is
planned anew.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fluid_ops.meta import MAIN, PAD, AttnMeta, cached_plan, visibility

_NEG = -(2**62)  # "sees no main key" / empty-reduction sentinels for int64 metadata
_BIG = 2**62
_PLAN_BUDGET = 1 << 22  # elements of the [spans, B, Lk] temporaries planned at once

Range = tuple[int, int]


@dataclass(frozen=True)
class Block:
    """Queries ``[q0, q1)`` attend the keys in ``ranges`` (ascending, disjoint index intervals).

    ``causal``: the block is the square ``[q0, q1) × [q0, q1)`` whose visibility is exactly the
    causal triangle for every kept row (no mask needed). Otherwise ``mask [B, q1-q0, K]`` (True =
    attend, over the concatenated ranges, fully masked rows opened) is set when ``ranges`` is not
    empty. ``keep [B, q1-q0]`` marks the rows that see at least one key; the others are zeroed
    (None: every row sees a key).
    """

    q0: int
    q1: int
    ranges: tuple[Range, ...]
    causal: bool
    mask: torch.Tensor | None
    keep: torch.Tensor | None


def plan_blocks(meta: AttnMeta, lq: int, lk: int, chunk: int) -> list[Block]:
    """The blocks of ``lq`` queries over ``lk`` keys (see the module docstring), cached on ``meta``.

    Without ``meta.n_main`` (no structure hint) the plan is one masked block over every query and
    key: the reference math.
    """
    return cached_plan(meta, ("blocked", lq, lk, chunk), lambda: _plan(meta, lq, lk, chunk))


def _plan(meta: AttnMeta, lq: int, lk: int, chunk: int) -> list[Block]:
    """The plan, uncached: the query spans, their key ranges (fact 1), whether the main span is a
    causal square (fact 3), then one block per span (the square, or masked: fact 2)."""
    if meta.n_main is None:
        return [_masked_block(meta, 0, lq, ((0, lk),))]
    n_main = min(max(int(meta.n_main), 0), lq)
    spans = _query_spans(lq, n_main, chunk)
    # Spans are planned in groups so the [spans, B, Lk] temporaries stay within the budget.
    group = max(1, _PLAN_BUDGET // max(1, meta.batch * lk))
    extents = [_key_extents(meta, spans[i : i + group]) for i in range(0, len(spans), group)]
    square = lq == lk and n_main > 0  # queries are the keys: a causal square is possible
    causal = _is_causal_square(meta, n_main) if square else meta.q_pos.new_zeros(())
    host = torch.cat([*extents, causal.view(1).long()]).tolist()  # the one host transfer
    main_is_causal = bool(host[-1])
    blocks = []
    for i, (q0, q1) in enumerate(spans):
        if main_is_causal and (q0, q1) == (0, n_main):
            keep = meta.q_anchor[:, :n_main] == MAIN  # padding rows are zeroed
            blocks.append(Block(0, n_main, ((0, n_main),), True, None, keep))
        else:
            m0, m1, s0, s1 = host[4 * i : 4 * i + 4]  # span i's main range, then its slot range
            blocks.append(_masked_block(meta, q0, q1, _merge((m0, m1), (s0, s1))))
    return _drop_full_keeps(blocks)


def _query_spans(lq: int, n_main: int, chunk: int) -> list[Range]:
    """``[0, n_main)`` (when not empty), then ``[n_main, lq)`` cut into chunks of ``chunk``."""
    main = [(0, n_main)] if n_main > 0 else []
    return main + [(s, min(s + chunk, lq)) for s in range(n_main, lq, chunk)]


def _merge(main: Range, slot: Range) -> tuple[Range, ...]:
    """The non-empty ranges among ``main`` and ``slot``, ascending; one range when they touch."""
    ranges = sorted(r for r in (main, slot) if r[1] > r[0])
    if len(ranges) == 2 and ranges[1][0] <= ranges[0][1]:
        return ((ranges[0][0], max(ranges[0][1], ranges[1][1])),)
    return tuple(ranges)


def _key_extents(meta: AttnMeta, spans: list[Range]) -> torch.Tensor:
    """int64 ``[4 * len(spans)]``: per span, its main key range then its slot key range.

    ``spans`` are consecutive (each starts where the previous ends). Fact 1 of the module
    docstring: per span and batch row, reduce the queries to the span's largest main-stream limit,
    its slot anchor interval and its largest slot position; a key passes when it meets these; a
    range runs from the first to the last passing key index over the batch (``[Lk, 0)``: empty).
    """
    dev = meta.q_pos.device
    n = len(spans)
    lo, hi = spans[0][0], spans[-1][1]
    # span_of[b, t]: which span query lo + t belongs to (the same in every batch row)
    lengths = torch.tensor([b - a for a, b in spans], device=dev)
    span_of = torch.repeat_interleave(torch.arange(n, device=dev), lengths).expand(meta.batch, -1)
    qa, qp = meta.q_anchor[:, lo:hi].long(), meta.q_pos[:, lo:hi].long()
    is_slot = qa >= 0
    limit = torch.where(qa == MAIN, qp, torch.where(is_slot, qa, _NEG))  # padding: sees nothing

    def per_span(values: torch.Tensor, how: str, empty: int) -> torch.Tensor:
        """``values [B, hi-lo]`` reduced per span and row: ``[n, B, 1]`` (``empty`` if none)."""
        out = torch.full((meta.batch, n), empty, dtype=torch.long, device=dev)
        return out.scatter_reduce(1, span_of, values, how).t()[..., None]

    main_limit = per_span(limit, "amax", _NEG)
    anchor_lo = per_span(torch.where(is_slot, qa, _BIG), "amin", _BIG)
    anchor_hi = per_span(torch.where(is_slot, qa, _NEG), "amax", _NEG)
    slot_pos_hi = per_span(torch.where(is_slot, qp, _NEG), "amax", _NEG)
    ka, kp = meta.k_anchor.long()[None], meta.k_pos.long()[None]  # [1, B, Lk]
    may_see_main = (ka == MAIN) & (kp <= main_limit)
    may_see_slot = (ka >= 0) & (ka >= anchor_lo) & (ka <= anchor_hi) & (kp <= slot_pos_hi)
    (m0, m1), (s0, s1) = _index_extent(may_see_main), _index_extent(may_see_slot)
    return torch.stack([m0, m1, s0, s1], dim=1).flatten()


def _index_extent(passes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per span of ``passes [n, B, Lk]``: first passing key index and last + 1, over every row."""
    lk = passes.shape[-1]
    idx = torch.arange(lk, device=passes.device)
    start = torch.where(passes, idx, lk).amin(dim=(1, 2))
    end = torch.where(passes, idx + 1, 0).amax(dim=(1, 2))
    return start, end


def _is_causal_square(meta: AttnMeta, n: int) -> torch.Tensor:
    """0-d bool: the block ``[0, n)`` attends exactly the causal triangle (``Lq == Lk`` given).

    Conditions, each checked below on every batch row:

    1. the first ``n`` queries are the first ``n`` keys (same positions and anchors);
    2. those tokens are main tokens or padding only;
    3. the main tokens come first, the padding after them;
    4. positions strictly increase along the main tokens;
    5. no main key lies at an index ≥ ``n``.

    Proof. A kept (main) query ``i`` sees no slot key and sees main key ``j`` iff ``k_pos[j] <=
    q_pos[i]``. By 5 and 3 the main keys are exactly the indices ``[0, m)`` for some ``m ≤ n``, and
    by 1 query ``i`` is key ``i``, so ``i < m``. By 4, ``k_pos[j] <= k_pos[i] = q_pos[i]`` iff
    ``j <= i``: the visible keys are ``{j <= i}``, the causal triangle. A padding query sees no key;
    under the triangle it attends key 0 at least (never an empty softmax) and is zeroed by ``keep``.
    """
    qa, ka = meta.q_anchor[:, :n], meta.k_anchor[:, :n]
    qp, kp = meta.q_pos[:, :n], meta.k_pos[:, :n]
    is_main = ka == MAIN
    # along each row, is_main must never go from False back to True (bools compare as 0 < 1)
    main_then_padding = is_main[:, 1:] <= is_main[:, :-1]
    increasing = (kp[:, 1:] > kp[:, :-1]) | ~is_main[:, 1:]  # checked only where j+1 is main
    conditions = [
        (qa == ka).all() & (qp == kp).all(),  # 1
        (is_main | (ka == PAD)).all(),  # 2
        main_then_padding.all(),  # 3
        increasing.all(),  # 4
        (meta.k_anchor[:, n:] != MAIN).all(),  # 5
    ]
    return torch.stack(conditions).all()


def _masked_block(meta: AttnMeta, q0: int, q1: int, ranges: tuple[Range, ...]) -> Block:
    """Queries ``[q0, q1)`` over ``ranges`` with the mask ``visibility`` gives there (fact 2)."""
    if not ranges:  # no query of the block sees any key
        keep = torch.zeros_like(meta.q_anchor[:, q0:q1], dtype=torch.bool)
        return Block(q0, q1, ranges, False, None, keep)
    sub = AttnMeta(
        meta.q_pos[:, q0:q1],
        meta.q_anchor[:, q0:q1],
        take_keys(meta.k_pos, ranges, dim=1),
        take_keys(meta.k_anchor, ranges, dim=1),
    )
    mask, keep = safe_mask(visibility(sub))
    return Block(q0, q1, ranges, False, mask, keep)


def _drop_full_keeps(blocks: list[Block]) -> list[Block]:
    """Set ``keep`` to None on blocks whose every row sees a key (nothing to zero); one transfer."""
    full = torch.stack([blk.keep.all() for blk in blocks]).tolist() if blocks else []
    return [replace(blk, keep=None) if f else blk for blk, f in zip(blocks, full)]


def safe_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask', keep)``: rows of ``mask [B, Lq, Lk]`` with no visible key opened to every key.

    No kernel then ever sees a fully masked row (the source of NaN in softmax and its gradient);
    ``keep [B, Lq]`` marks the real rows, and the opened ones are zeroed after the call.
    """
    keep = mask.any(dim=-1)
    return mask | ~keep[..., None], keep


def take_keys(t: torch.Tensor, ranges: tuple[Range, ...], dim: int = 1) -> torch.Tensor:
    """The key ranges of ``t`` along ``dim``, concatenated (a view for one range)."""
    parts = [t.narrow(dim, a, b - a) for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
