"""The ``triton`` back end of ``fluid_attention``: block-sparse flash attention, fwd and bwd.

Visibility is decided inside the kernels from the per-token metadata of ``AttnMeta`` (the rule
of ``fluid_ops.meta``), never from a dense mask. Work is block-sparse: queries are cut into tiles
of ``block_m`` rows, keys into tiles of ``block_n`` columns, and a tile pair is visited only when
cheap per-tile summaries of the metadata (computed in torch, ``active_tiles``) say it may hold a
visible pair. The summaries are conservative (a pair that can be visible is never skipped) and
tight for the Stage I memory order: the main causal square, slot rows that see main keys up to
their anchor, and the small causal squares of slot groups stored in anchor order.

Every kernel has a 1-D grid of at most 65535 programs (on Ascend: the AI-core count) and loops
over its work items, so one source runs on CUDA, on Ascend (triton-ascend) and on the CPU under
``TRITON_INTERPRET=1``:

* ``_fwd_kernel``: one item per (batch, query head, query tile); online softmax over the visited
  key tiles; writes the output and the base-2 log-sum-exp (``+inf`` for a row that sees no key,
  whose output is 0);
* ``_bwd_dq_kernel``: the same walk, recomputing P, accumulating dQ; it also computes the
  backward's preprocess ``delta = rowsum(dO * O)`` for its rows;
* ``_bwd_dkdv_kernel``: one item per (batch, query head, key tile); walks the query tiles that see
  the key tile, accumulating dK and dV in registers (no atomics: deterministic). With GQA each
  query head writes an fp32 slice and the slices of a group are summed in torch: one item per KV
  head would leave the key tiles seen by every slot query on too few programs.

The kernels are wrapped as ``torch.library`` custom ops (``fluid_ops::triton_attn_fwd`` /
``fluid_ops::triton_attn_bwd``) with fake implementations and a registered autograd formula, so
they compose with ``torch.compile``. ``tile_stats`` counts the query-key pairs the kernels
compute (same tile selection) against the visible pairs, for ``attn_compute_ratio``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fluid_ops.meta import MAIN, PAD, AttnMeta, visibility

#: Tile sizes used when the caller gives none: 64 query rows × 32 keys. On the default Stage I
#: layout (N = 1024, k_max = 16, anchor_prob 0.5) this computes 1.25× the visible pairs (64 × 64:
#: 1.37×, 128 × 64: 1.52×, dense: 10.4×; see ``tile_stats``), and it was the fastest forward +
#: backward of the three on an H100 (tools/bench_triton_attention.py).
DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 32
_MAX_PROGRAMS = 65535  # grid limit shared by CUDA (y/z) and Ascend (coreDim)
_BIG = 1 << 30
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Tile selection (torch): per-tile summaries of the metadata and the tile pairs to visit.
# --------------------------------------------------------------------------------------------


def _tile_summary(pos: torch.Tensor, anchor: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """Per tile of ``block`` tokens: position/anchor ranges of its main and slot tokens.

    Absent kinds get empty ranges (min = +BIG, max = -BIG) so every comparison with them fails.
    """
    b, length = pos.shape
    n_tiles = triton.cdiv(length, block)
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


def _resolve_tiles(block_m: int | None, block_n: int | None) -> tuple[int, int]:
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
    block_m, block_n = _resolve_tiles(block_m, block_n)
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


# --------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------


@triton.jit
def _visible(qp, qa, kp, ka):
    """The fluid_ops.meta rule on broadcastable position/anchor blocks (MAIN = -1, PAD = -2)."""
    limit = tl.where(qa == -1, qp, qa)  # main query: its position; slot query: its anchor
    see_main = (ka == -1) & (qa >= -1) & (kp <= limit)
    see_slot = (ka == qa) & (qa >= 0) & (kp <= qp)
    return see_main | see_slot


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32; ``UPCAST`` for the CPU interpreter, which has no bf16 math."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _tile(base, offs_r, offs_c, s_r, s_c, ok_r, ok_c):
    """Load the ``[len(offs_r), len(offs_c)]`` block ``base[r * s_r + c * s_c]``, 0 outside."""
    return tl.load(
        base + offs_r[:, None] * s_r + offs_c[None, :] * s_c,
        mask=ok_r[:, None] & ok_c[None, :],
        other=0.0,
    )


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, QP, QA, KP, KA, KV_IDX, KV_CNT,
    qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    B, H, G, LQ, LK, HEAD_D: tl.constexpr, N_QT, N_KT_CAP, TOTAL,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    for work in range(pid, TOTAL, nprog):
        h = work % H
        rest = work // H
        b = (rest % B).to(tl.int64)
        qt = N_QT - 1 - rest // B  # last query tiles (long slot prefixes) first
        hq = h.to(tl.int64)
        hk = hq // G
        offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < LQ
        q = _tile(Q + b * s_qb + hq * s_qh, offs_m, offs_d, s_qm, s_qd, m_ok, d_ok)
        qp = tl.load(QP + b * LQ + offs_m, mask=m_ok, other=0)
        qa = tl.load(QA + b * LQ + offs_m, mask=m_ok, other=-2)
        k_base = K + b * s_kb + hk * s_kh
        v_base = V + b * s_vb + hk * s_vh
        list_base = KV_IDX + (b * N_QT + qt) * N_KT_CAP
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for i in range(0, tl.load(KV_CNT + b * N_QT + qt)):
            code = tl.load(list_base + i)  # key tile, or -tile-1 when no pair is masked
            offs_n = tl.where(code < 0, -code - 1, code) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < LK
            kv_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(
                k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_ok, other=0.0
            )
            v = tl.load(
                v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_ok, other=0.0
            )
            s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
            if code >= 0:
                kp = tl.load(KP + b * LK + offs_n, mask=n_ok, other=0)
                ka = tl.load(KA + b * LK + offs_n, mask=n_ok, other=-2)
                vis = _visible(qp[:, None], qa[:, None], kp[None, :], ka[None, :])
                s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        o_ptr = Out + b * s_ob + hq * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od
        tl.store(o_ptr, (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok)
        lse = tl.where(seen, m_i + tl.log2(l_safe), float("inf"))
        tl.store(LSE + (b * H + hq) * LQ + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Out, DO, DQ, LSE, DELTA, QP, QA, KP, KA, KV_IDX, KV_CNT,
    qk_scale, sm_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_dob, s_doh, s_dom, s_dod,
    s_dqb, s_dqh, s_dqm, s_dqd,
    B, H, G, LQ, LK, HEAD_D: tl.constexpr, N_QT, N_KT_CAP, TOTAL,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    for work in range(pid, TOTAL, nprog):
        h = work % H
        rest = work // H
        b = (rest % B).to(tl.int64)
        qt = N_QT - 1 - rest // B
        hq = h.to(tl.int64)
        hk = hq // G
        offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < LQ
        q = _tile(Q + b * s_qb + hq * s_qh, offs_m, offs_d, s_qm, s_qd, m_ok, d_ok)
        do = _tile(DO + b * s_dob + hq * s_doh, offs_m, offs_d, s_dom, s_dod, m_ok, d_ok)
        o = _tile(Out + b * s_ob + hq * s_oh, offs_m, offs_d, s_om, s_od, m_ok, d_ok)
        row = (b * H + hq) * LQ + offs_m
        lse = tl.load(LSE + row, mask=m_ok, other=float("inf"))
        # the preprocess of the backward, fused: delta = rowsum(dO * O), read by the dK/dV kernel
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + row, delta, mask=m_ok)
        qp = tl.load(QP + b * LQ + offs_m, mask=m_ok, other=0)
        qa = tl.load(QA + b * LQ + offs_m, mask=m_ok, other=-2)
        k_base = K + b * s_kb + hk * s_kh
        v_base = V + b * s_vb + hk * s_vh
        list_base = KV_IDX + (b * N_QT + qt) * N_KT_CAP
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for i in range(0, tl.load(KV_CNT + b * N_QT + qt)):
            code = tl.load(list_base + i)
            offs_n = tl.where(code < 0, -code - 1, code) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < LK
            kv_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(
                k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_ok, other=0.0
            )
            v = tl.load(
                v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_ok, other=0.0
            )
            s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
            if code >= 0:
                kp = tl.load(KP + b * LK + offs_n, mask=n_ok, other=0)
                ka = tl.load(KA + b * LK + offs_n, mask=n_ok, other=-2)
                vis = _visible(qp[:, None], qa[:, None], kp[None, :], ka[None, :])
                s = tl.where(vis, s, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            ds = p * (_mm(do, tl.trans(v), PRECISION, UPCAST) - delta[:, None])
            dq += _mm(ds.to(k.dtype), k, PRECISION, UPCAST)
        dq_ptr = DQ + b * s_dqb + hq * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd
        tl.store(dq_ptr, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, QP, QA, KP, KA, Q_IDX, Q_CNT,
    qk_scale, sm_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_dob, s_doh, s_dom, s_dod,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    B, H, G, LQ, LK, HEAD_D: tl.constexpr, N_KT, N_QT_CAP, TOTAL,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    for work in range(pid, TOTAL, nprog):
        hq = (work % H).to(tl.int64)  # DK/DV hold one slice per query head (summed per group)
        rest = work // H
        b = (rest % B).to(tl.int64)
        kt = rest // B  # first key tiles (seen by most queries) first
        hk = hq // G
        offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < LK
        k = _tile(K + b * s_kb + hk * s_kh, offs_n, offs_d, s_kn, s_kd, n_ok, d_ok)
        v = _tile(V + b * s_vb + hk * s_vh, offs_n, offs_d, s_vn, s_vd, n_ok, d_ok)
        kp = tl.load(KP + b * LK + offs_n, mask=n_ok, other=0)
        ka = tl.load(KA + b * LK + offs_n, mask=n_ok, other=-2)
        list_base = Q_IDX + (b * N_KT + kt) * N_QT_CAP
        q_base = Q + b * s_qb + hq * s_qh
        do_base = DO + b * s_dob + hq * s_doh
        row_base = (b * H + hq) * LQ
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for i in range(0, tl.load(Q_CNT + b * N_KT + kt)):
            code = tl.load(list_base + i)  # query tile, or -tile-1 when no pair is masked
            offs_m = tl.where(code < 0, -code - 1, code) * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < LQ
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(
                q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=md_ok, other=0.0
            )
            do = tl.load(
                do_base + offs_m[:, None] * s_dom + offs_d[None, :] * s_dod, mask=md_ok, other=0.0
            )
            lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
            sT = _mm(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
            if code >= 0:
                qp = tl.load(QP + b * LQ + offs_m, mask=m_ok, other=0)
                qa = tl.load(QA + b * LQ + offs_m, mask=m_ok, other=-2)
                visT = _visible(qp[None, :], qa[None, :], kp[:, None], ka[:, None])
                sT = tl.where(visT, sT, float("-inf"))
            pT = tl.exp2(sT - lse[None, :])
            dv += _mm(pT.to(do.dtype), do, PRECISION, UPCAST)
            dsT = pT * (_mm(v, tl.trans(do), PRECISION, UPCAST) - delta[None, :])
            dk += _mm(dsT.to(q.dtype), q, PRECISION, UPCAST)
        dk_ptr = DK + b * s_dkb + hq * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd
        tl.store(dk_ptr, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok)
        dv_ptr = DV + b * s_dvb + hq * s_dvh + offs_n[:, None] * s_dvn + offs_d[None, :] * s_dvd
        tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & d_ok)


# --------------------------------------------------------------------------------------------
# Launch helpers.
# --------------------------------------------------------------------------------------------


def _grid(device: torch.device, total: int) -> tuple[int]:
    """A 1-D grid: one program per work item, at most the core count (Ascend) or 65535."""
    cap = _MAX_PROGRAMS
    if device.type == "npu":
        # triton-ascend binds programs to physical cores: launch one per AI core, loop inside.
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        cap = min(cap, int(props["num_aicore"]))
    return (max(1, min(total, cap)),)


#: Launch options for CUDA, per kernel; tools/bench_triton_attention.py --launch overrides them.
_LAUNCH = {"fwd": {"num_warps": 4, "num_stages": 2}, "bwd": {"num_warps": 4, "num_stages": 2}}


def _launch_opts(device: torch.device, kernel: str) -> dict:
    return dict(_LAUNCH[kernel]) if device.type == "cuda" else {}


def _precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs: exact products (no TF32); half types: the back end's default.
    return "ieee" if dtype == torch.float32 else None


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def _check_interpreter(device: torch.device) -> None:
    """CPU tensors run only when triton *and* these kernels were loaded under TRITON_INTERPRET=1."""
    if device.type == "cpu" and not (_interpreted(tl.zeros) and _interpreted(_fwd_kernel)):
        raise RuntimeError(
            "triton attention on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "in the environment before torch or triton is first imported (triton reads it once)"
        )


def _upcast(dtype: torch.dtype) -> bool:
    # The CPU interpreter stores bf16 as raw bits and has no bf16 arithmetic (its documented
    # limitation): there the tiles are widened to fp32 before each product (values unchanged).
    return dtype == torch.bfloat16 and _interpreted(_fwd_kernel)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _s(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Custom ops.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fluid_ops::triton_attn_fwd", mutates_args=())
def _attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    q_anchor: torch.Tensor,
    k_pos: torch.Tensor,
    k_anchor: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    q_idx: torch.Tensor,
    q_cnt: torch.Tensor,
    scale: float,
    block_m: int,
    block_n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    # q_idx / q_cnt (the key-side visit lists) are inputs only to be saved for the backward.
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    out = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    n_qt = kv_cnt.shape[1]
    total = b * h * n_qt
    _fwd_kernel[_grid(q.device, total)](
        q, k, v, out, lse, q_pos, q_anchor, k_pos, k_anchor, kv_idx, kv_cnt,
        scale * _LOG2E,
        *_s(q), *_s(k), *_s(v), *_s(out),
        b, h, h // hk, lq, lk, d, n_qt, kv_idx.shape[2], total,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(d),
        PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
        **_launch_opts(q.device, "fwd"),
    )  # fmt: skip
    return out, lse


@_attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, *_meta_lists_and_scalars):
    b, h, lq, d = q.shape
    return q.new_empty((b, h, lq, d)), q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.custom_op("fluid_ops::triton_attn_bwd", mutates_args=())
def _attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_pos: torch.Tensor,
    q_anchor: torch.Tensor,
    k_pos: torch.Tensor,
    k_anchor: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_cnt: torch.Tensor,
    q_idx: torch.Tensor,
    q_cnt: torch.Tensor,
    scale: float,
    block_m: int,
    block_n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    delta = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)  # by the dQ kernel
    dq = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    # GQA: one dK/dV slice per query head (fp32), summed over each group below; this spreads the
    # heavy key tiles (seen by every slot query) over more programs than one per KV head would.
    grouped = h != hk
    part = (b, h, lk, d)
    dk = torch.empty(part, dtype=torch.float32, device=k.device) if grouped else torch.empty_like(k)
    dv = torch.empty(part, dtype=torch.float32, device=v.device) if grouped else torch.empty_like(v)
    common = {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_D": _block_d(d),
        "PRECISION": _precision(q.dtype),
        "UPCAST": _upcast(q.dtype),
        **_launch_opts(q.device, "bwd"),
    }
    n_qt, n_kt = kv_cnt.shape[1], q_cnt.shape[1]
    total_q = b * h * n_qt
    _bwd_dq_kernel[_grid(q.device, total_q)](
        q, k, v, out, do, dq, lse, delta, q_pos, q_anchor, k_pos, k_anchor, kv_idx, kv_cnt,
        scale * _LOG2E, scale,
        *_s(q), *_s(k), *_s(v), *_s(out), *_s(do), *_s(dq),
        b, h, h // hk, lq, lk, d, n_qt, kv_idx.shape[2], total_q,
        **common,
    )  # fmt: skip
    total_k = b * h * n_kt
    _bwd_dkdv_kernel[_grid(q.device, total_k)](
        q, k, v, do, dk, dv, lse, delta, q_pos, q_anchor, k_pos, k_anchor, q_idx, q_cnt,
        scale * _LOG2E, scale,
        *_s(q), *_s(k), *_s(v), *_s(do), *_s(dk), *_s(dv),
        b, h, h // hk, lq, lk, d, n_kt, q_idx.shape[2], total_k,
        **common,
    )  # fmt: skip
    if grouped:
        dk = dk.view(b, hk, h // hk, lk, d).sum(2).to(k.dtype)
        dv = dv.view(b, hk, h // hk, lk, d).sum(2).to(v.dtype)
    return dq, dk, dv


@_attn_bwd.register_fake
def _attn_bwd_fake(do, q, k, v, out, lse, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *meta_and_lists, scale, block_m, block_n = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *meta_and_lists)
    ctx.scale, ctx.block_m, ctx.block_n = scale, block_m, block_n
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    dq, dk, dv = _attn_bwd(grad_out, *ctx.saved_tensors, ctx.scale, ctx.block_m, ctx.block_n)
    return dq, dk, dv, *([None] * 11)


_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttnMeta,
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Block-sparse FLUID attention: q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` → like q.

    ``Hq`` must be a multiple of ``Hkv`` (GQA). Rows that see no key return 0 (and zero gradients).
    fp32, bf16 and fp16 inputs; products accumulate in fp32. Differentiable in q, k and v.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q/k/v must be [B, H, L, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    b, h, lq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if k.shape[1] == 0 or h % k.shape[1]:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({k.shape[1]})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"triton attention supports fp32/bf16/fp16, got {q.dtype}")
    if d > 256:
        raise ValueError(f"head dim {d} > 256 is not supported by the triton back end")
    meta.validate(lq, k.shape[2])
    if meta.batch != b:
        raise ValueError(f"AttnMeta has batch {meta.batch}, q has {b}")
    block_m, block_n = _resolve_tiles(block_m, block_n)
    _check_interpreter(q.device)
    plan = _plan(meta, block_m, block_n, q.device)
    out, _ = _attn_fwd(q, k, v, *plan, float(scale), block_m, block_n)
    return out


def _plan(meta: AttnMeta, block_m: int, block_n: int, device: torch.device) -> tuple:
    """int32 metadata on ``device`` and the visit lists of both sides, cached on ``meta``.

    A model calls every layer with the same ``AttnMeta``: outside ``torch.compile`` the plan is
    kept on the object (keyed by tile sizes and device, invalidated when a metadata tensor is
    replaced or modified in place), so the torch-side selection runs once per step, not per layer.
    """
    tensors = _tensors(meta)
    stamp = tuple((t, t._version) for t in tensors)
    key = (block_m, block_n, str(device))
    cache = None if torch.compiler.is_compiling() else meta.__dict__.setdefault("_triton_plans", {})
    if cache is not None and key in cache:
        old_stamp, plan = cache[key]
        if all(a is b and va == vb for (a, va), (b, vb) in zip(old_stamp, stamp)):
            return plan
    m32 = AttnMeta(*(t.to(device=device, dtype=torch.int32).contiguous() for t in tensors))
    active, full = _tile_pairs(m32, block_m, block_n)
    plan = (*_tensors(m32), *_visit_list(active, full), *_visit_list(active.mT, full.mT))
    if cache is not None:
        cache[key] = (stamp, plan)
    return plan


def _tensors(meta: AttnMeta) -> tuple[torch.Tensor, ...]:
    return meta.q_pos, meta.q_anchor, meta.k_pos, meta.k_anchor


__all__ = ["DEFAULT_BLOCK_M", "DEFAULT_BLOCK_N", "active_tiles", "tile_stats", "triton_attention"]
