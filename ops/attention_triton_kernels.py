"""The Triton kernels of the ``triton`` attention back end: block-sparse flash attention.

Visibility is decided inside the kernels from the per-token metadata (the rule of
``fluid_ops.meta``, restated in ``_visible``), never from a dense mask, and only over the tile
pairs that ``fluid_ops.attention_tiles`` lists. Every kernel has a 1-D grid of at most 65535
programs (on Ascend: the AI-core count) and loops over its work items, so one source runs on
CUDA, on Ascend (triton-ascend) and on the CPU under ``TRITON_INTERPRET=1``:

* ``_fwd_kernel``: one item per (batch, query head, query tile); online softmax over the visited
  key tiles; writes the output and the base-2 log-sum-exp (``+inf`` for a row that sees no key,
  whose output is 0);
* ``_bwd_dq_kernel``: the same walk, recomputing P, accumulating dQ; it also computes the
  backward's preprocess ``delta = rowsum(dO * O)`` for its rows;
* ``_bwd_dkdv_kernel``: one item per (batch, query head, key tile); walks the query tiles that see
  the key tile, accumulating dK and dV in registers (no atomics: deterministic). With GQA each
  query head writes an fp32 slice and the slices of a group are summed in torch.

A visit-list entry ``c >= 0`` is a tile whose pairs are masked by ``_visible``; ``-c - 1`` is a
tile where every pair is visible, which skips the mask. The launches are in
``fluid_ops.attention_triton``.
"""

import triton
import triton.language as tl


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
