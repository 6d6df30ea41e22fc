"""``fluid_attention``: the FLUID causal-masked attention, one entry point over four back ends.

Queries attend keys by the §1.1 visibility rule computed from per-token metadata
(``fluid_ops.meta.AttnMeta``), never from a mask the caller builds. Shapes are BNSD, exactly what
transformers hands a registered attention function: ``q [B, Hq, Lq, D]``, ``k``/``v``
``[B, Hkv, Lk, D]`` with ``Hq`` divisible by ``Hkv`` (GQA). A query row with no visible key outputs
exactly 0 (and contributes no gradient); nothing is ever NaN. Back ends, chosen by
``fluid_ops.dispatch``:

* ``reference``: the dense bool mask from ``visibility`` + ``F.scaled_dot_product_attention``;
* ``blocked``: the Stage I memory order exploited with stock SDPA on any device. The queries are
  cut into blocks: the main stream ``[0, n_main)`` as one block (one ``is_causal`` call when the
  main region is a causal square, see ``plan_blocks``), then the slot queries in chunks. Each block
  attends only to the key ranges it can see: main keys up to its largest anchor, slot keys of its
  anchors. The CPU fast path; falls back to the reference math when ``meta.n_main`` is None;
* ``npu``: ``torch_npu`` fused kernels over the same blocks (``fluid_ops.attention_npu``);
* ``triton``: block-sparse flash attention (``fluid_ops.attention_triton``).

Every back end is checked against a float64 softmax straight from ``visibility`` in
``tests/test_ops_attention.py``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

from fluid_ops import dispatch
from fluid_ops.meta import MAIN, PAD, AttnMeta, visibility

OP = "attention"
# Slot queries per SDPA call in the blocked back end: small blocks waste least on a CPU, while an
# accelerator pays a launch per block (measured fwd+bwd, N=1024, k_max=16, anchor_prob 0.5: CPU
# 64/128/256 within noise of each other; H100 1024 best of 128..1024).
BLOCKED_CHUNK = {"cpu": 256}
ACCELERATOR_CHUNK = 1024

_NATIVE_GQA = TorchVersion(torch.__version__) >= "2.5"  # SDPA's enable_gqa
_NEG = -(2**62)  # "sees no main key" / empty-reduction sentinels for int64 metadata
_BIG = 2**62
_PLAN_BUDGET = 1 << 22  # elements of the [segments, B, Lk] temporaries planned at once


def fluid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttnMeta,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """FLUID attention ``[B, Hq, Lq, D]`` of ``q`` over ``k``/``v`` under ``visibility(meta)``.

    ``scale`` defaults to ``1/sqrt(D)``. ``backend`` names a back end (``reference``, ``blocked``,
    ``npu``, ``triton``) or ``None``/``"auto"`` for the dispatch order; see ``fluid_ops.dispatch``.
    """
    _check(q, k, v, meta)
    if meta.q_pos.device != q.device:
        meta = meta.to(q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = dispatch.select(OP, q.device, backend)
    return _BACKENDS[name](q, k, v, meta, scale)


def visible_pairs(meta: AttnMeta, query_chunk: int = 1024) -> int:
    """Number of (query, key) pairs that ``visibility(meta)`` allows, summed over the batch."""
    total = 0
    for start in range(0, meta.q_pos.shape[1], query_chunk):
        part = AttnMeta(
            meta.q_pos[:, start : start + query_chunk],
            meta.q_anchor[:, start : start + query_chunk],
            meta.k_pos,
            meta.k_anchor,
        )
        total += int(visibility(part).sum())
    return total


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"fluid_attention takes BNSD tensors [B, H, L, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, hq, lq, d = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[-1] != d:
        raise ValueError(
            f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)} "
            "(need k [B, Hkv, Lk, D] and v [B, Hkv, Lk, Dv])"
        )
    if hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]})")
    meta.validate(lq, k.shape[2])
    if meta.batch != b:
        raise ValueError(f"AttnMeta has batch {meta.batch}, the tensors have batch {b}")


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Stock SDPA with GQA (native ``enable_gqa`` when torch has it, else expanded KV heads)."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and not _NATIVE_GQA:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    extra = {"enable_gqa": True} if gqa else {}
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, **extra
    )


def zero_rows(out: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Zero the query rows where ``keep [B, Lq]`` is False (their gradient is zero too)."""
    return out if keep is None else out.masked_fill(~keep[:, None, :, None], 0.0)


def safe_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask', keep)``: rows of ``mask [B, Lq, Lk]`` with no visible key opened to every key.

    No kernel then ever sees a fully masked row (the source of NaN in softmax and its gradient);
    ``keep [B, Lq]`` marks the real rows, and the opened ones are zeroed after the call.
    """
    keep = mask.any(dim=-1)
    return mask | ~keep[..., None], keep


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, scale: float
) -> torch.Tensor:
    """Dense bool mask from ``visibility`` + one SDPA call; the ground truth of the back ends."""
    mask, keep = safe_mask(visibility(meta))
    return zero_rows(_sdpa(q, k, v, scale, mask=mask[:, None]), keep)


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
    ranges: tuple[tuple[int, int], ...]
    causal: bool
    mask: torch.Tensor | None
    keep: torch.Tensor | None


def plan_blocks(meta: AttnMeta, lq: int, lk: int, chunk: int) -> list[Block]:
    """Cut the queries into blocks and find, per block, the key ranges holding all its visible keys.

    Blocks: ``[0, n_main)`` (the main stream) then ``[n_main, Lq)`` in chunks of ``chunk``. The key
    ranges come from the metadata itself, so they are exact supersets whatever the order: a block
    sees main keys whose position is ≤ the largest limit of its rows (``q_pos`` for a main query,
    the anchor for a slot), and slot keys whose anchor lies between the smallest and largest anchor
    of its slot rows (per batch row, then the union over the batch). With the Stage I memory order
    this is "main keys up to the block's largest anchor + its own slot groups".

    The main block is one causal square when ``Lq == Lk`` (no cache), queries and keys are the same
    tokens there, its anchors are a run of MAIN followed by PAD with strictly increasing positions,
    and no main key lies beyond ``n_main``. Then a real main query ``i`` sees exactly the keys
    ``j <= i``: earlier indices are real main tokens at smaller positions, later ones are larger
    positions or padding; pad queries see only main keys under the causal square (never NaN) and
    are zeroed. Otherwise the main block uses a mask like the others.

    Without ``n_main`` the plan is one block over all queries and keys. All the planning needs one
    host transfer; the plan is cached on ``meta`` (every layer of a forward reuses it), so treat an
    ``AttnMeta`` as immutable once it has been used.
    """
    key = (lq, lk, chunk, str(meta.q_pos.device))
    cache = vars(meta).setdefault("_fluid_blocks", {})
    if key not in cache:
        cache[key] = _plan(meta, lq, lk, chunk)
    return cache[key]


def _plan(meta: AttnMeta, lq: int, lk: int, chunk: int) -> list[Block]:
    if meta.n_main is None:
        return [_masked_block(meta, 0, lq, ((0, lk),))]
    n_main = min(max(int(meta.n_main), 0), lq)
    spans = ([(0, n_main)] if n_main > 0 else []) + [
        (s, min(s + chunk, lq)) for s in range(n_main, lq, chunk)
    ]
    group = max(1, _PLAN_BUDGET // max(1, meta.batch * lk))  # spans planned at once
    stats = [_key_extents(meta, spans[i : i + group]) for i in range(0, len(spans), group)]
    flags = _causal_main_ok(meta, n_main) if lq == lk and n_main > 0 else meta.q_pos.new_zeros(1)
    host = torch.cat([*stats, flags.view(1).long()]).tolist()  # the one host transfer
    causal_ok = bool(host[-1])
    extents = [host[4 * i : 4 * i + 4] for i in range(len(spans))]
    blocks = []
    for (q0, q1), (m0, m1, s0, s1) in zip(spans, extents):
        if causal_ok and (q0, q1) == (0, n_main):
            keep = meta.q_anchor[:, :n_main] == MAIN
            blocks.append(Block(0, n_main, ((0, n_main),), True, None, keep))
            continue
        ranges = sorted(r for r in ((m0, m1), (s0, s1)) if r[1] > r[0])
        if len(ranges) == 2 and ranges[1][0] <= ranges[0][1]:  # touching or overlapping
            ranges = [(ranges[0][0], max(m1, s1))]
        blocks.append(_masked_block(meta, q0, q1, tuple(ranges)))
    return _drop_full_keeps(blocks)


def _drop_full_keeps(blocks: list[Block]) -> list[Block]:
    """Set ``keep`` to None on blocks whose every row sees a key (nothing to zero); one transfer."""
    full = torch.stack([blk.keep.all() for blk in blocks]).tolist() if blocks else []
    return [replace(blk, keep=None) if f else blk for blk, f in zip(blocks, full)]


def _key_extents(meta: AttnMeta, spans: list[tuple[int, int]]) -> torch.Tensor:
    """``[4 * len(spans)]`` int64: per span, the main then the slot key range (start, end)."""
    dev = meta.q_pos.device
    n = len(spans)
    lo, hi = spans[0][0], spans[-1][1]
    seg = torch.repeat_interleave(
        torch.arange(n, device=dev), torch.tensor([b - a for a, b in spans], device=dev)
    ).expand(meta.batch, -1)
    qa, qp = meta.q_anchor[:, lo:hi].long(), meta.q_pos[:, lo:hi].long()
    is_slot = qa >= 0
    limit = torch.where(qa == MAIN, qp, torch.where(is_slot, qa, _NEG))

    def reduce(values: torch.Tensor, how: str, fill: int) -> torch.Tensor:  # -> [n, B, 1]
        out = torch.full((meta.batch, n), fill, dtype=torch.long, device=dev)
        return out.scatter_reduce(1, seg, values, how).t()[..., None]

    lim = reduce(limit, "amax", _NEG)
    a_lo = reduce(torch.where(is_slot, qa, _BIG), "amin", _BIG)
    a_hi = reduce(torch.where(is_slot, qa, _NEG), "amax", _NEG)
    p_hi = reduce(torch.where(is_slot, qp, _NEG), "amax", _NEG)
    ka, kp = meta.k_anchor.long()[None], meta.k_pos.long()[None]
    see_main = (ka == MAIN) & (kp <= lim)
    see_slot = (ka >= 0) & (ka >= a_lo) & (ka <= a_hi) & (kp <= p_hi)
    lk = ka.shape[-1]
    idx = torch.arange(lk, device=dev)

    def extent(cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.where(cond, idx, lk).amin(dim=(1, 2))
        end = torch.where(cond, idx + 1, 0).amax(dim=(1, 2))
        return start, end

    (m0, m1), (s0, s1) = extent(see_main), extent(see_slot)
    return torch.stack([m0, m1, s0, s1], dim=1).flatten()


def _causal_main_ok(meta: AttnMeta, n_main: int) -> torch.Tensor:
    """0-d bool: ``[0, n_main)`` is an exact causal square (conditions in ``plan_blocks``)."""
    qa, ka = meta.q_anchor[:, :n_main], meta.k_anchor[:, :n_main]
    qp, kp = meta.q_pos[:, :n_main], meta.k_pos[:, :n_main]
    is_main = ka == MAIN
    checks = [
        (qa == ka).all() & (qp == kp).all(),  # queries are the keys
        ((ka == MAIN) | (ka == PAD)).all(),  # only main tokens and padding
        (is_main[:, 1:] <= is_main[:, :-1]).all(),  # main run first, padding after
        ((kp[:, 1:] > kp[:, :-1]) | ~is_main[:, 1:]).all(),  # increasing positions
        (meta.k_anchor[:, n_main:] != MAIN).all(),  # no main key after the main region
    ]
    return torch.stack(checks).all()


def _masked_block(meta: AttnMeta, q0: int, q1: int, ranges: tuple[tuple[int, int], ...]) -> Block:
    if not ranges:
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


def take_keys(t: torch.Tensor, ranges: tuple[tuple[int, int], ...], dim: int = 1) -> torch.Tensor:
    """The key ranges of metadata ``t`` along ``dim``, concatenated (a view for one range)."""
    parts = [t.narrow(dim, a, b - a) for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class Pieces:
    """Query and key/value tensors cut once at every boundary a plan uses.

    Each block gathers its keys from these pieces instead of slicing the full tensors: autograd
    then accumulates gradients piece by piece, where a slice per block would zero-fill and add a
    full-size gradient for every block (which dominated the backward pass on CPU).
    """

    def __init__(self, blocks: list[Block], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        cuts = sorted({0, k.shape[2], *(x for blk in blocks for r in blk.ranges for x in r)})
        sizes = [b - a for a, b in itertools.pairwise(cuts)]
        self._at = {c: i for i, c in enumerate(cuts)}
        self.k, self.v = k.split(sizes, dim=2), v.split(sizes, dim=2)
        self.q = q.split([blk.q1 - blk.q0 for blk in blocks], dim=2)

    def keys(self, blk: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's keys and values over its ranges, concatenated (a view when one piece)."""
        idx = [i for a, b in blk.ranges for i in range(self._at[a], self._at[b])]
        if len(idx) == 1:
            return self.k[idx[0]], self.v[idx[0]]
        return torch.cat([self.k[i] for i in idx], 2), torch.cat([self.v[i] for i in idx], 2)


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttnMeta,
    scale: float,
    chunk: int | None = None,
) -> torch.Tensor:
    """The Stage I / cached-inference structure exploited with stock SDPA (see ``plan_blocks``).

    ``chunk``: slot queries per call; None picks ``BLOCKED_CHUNK`` for the device type.
    """
    if meta.n_main is None:
        return reference_attention(q, k, v, meta, scale)
    chunk = chunk or BLOCKED_CHUNK.get(q.device.type, ACCELERATOR_CHUNK)

    def attend(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, blk: Block) -> torch.Tensor:
        if blk.causal:
            return _sdpa(qs, ks, vs, scale, is_causal=True)
        return _sdpa(qs, ks, vs, scale, mask=blk.mask[:, None])

    return run_blocks(q, k, v, meta, chunk, attend)


def run_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttnMeta,
    chunk: int,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Block], torch.Tensor],
) -> torch.Tensor:
    """Plan the blocks, run ``attend(q_block, k_keys, v_keys, block)`` on each, zero empty rows.

    Shared by the ``blocked`` (SDPA) and ``npu`` (torch_npu) back ends; only ``attend`` differs.
    """
    blocks = plan_blocks(meta, q.shape[2], k.shape[2], chunk)
    pieces = Pieces(blocks, q, k, v)
    outs = []
    for blk, qs in zip(blocks, pieces.q):
        if not blk.ranges:
            outs.append(q.new_zeros(*qs.shape[:3], v.shape[-1]))
            continue
        outs.append(zero_rows(attend(qs, *pieces.keys(blk), blk), blk.keep))
    return torch.cat(outs, dim=2) if len(outs) != 1 else outs[0]


def _npu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, scale: float):
    from fluid_ops.attention_npu import npu_attention

    return npu_attention(q, k, v, meta, scale)


def _triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, scale: float):
    from fluid_ops.attention_triton import triton_attention

    return triton_attention(q, k, v, meta, scale)


_BACKENDS = {
    "reference": reference_attention,
    "blocked": blocked_attention,
    "npu": _npu,
    "triton": _triton,
}

dispatch.register_backend(OP, "reference", lambda device: None)
dispatch.register_backend(OP, "blocked", lambda device: None)
dispatch.register_backend(OP, "npu", dispatch.npu_unavailable)
dispatch.register_backend(OP, "triton", dispatch.triton_unavailable)
dispatch.set_preference(OP, "npu", ["npu", "triton", "blocked"])
dispatch.set_preference(OP, "cuda", ["triton", "blocked"])
dispatch.set_preference(OP, "default", ["blocked"])
