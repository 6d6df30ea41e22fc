"""Triton kernels for the vocabulary reductions of ``fluid_ops.vocab`` (the ``triton`` back end).

The LM-head matmul stays in torch (cuBLAS / the Ascend cube unit are better at it than anything we
would write); these kernels do the memory-bound part on the logits tile it produces, so the tile is
read once and never copied to fp32:

* ``reduce_chunk`` folds a ``[rows, cols]`` logits tile (any float dtype, upcast on load) into the
  per-row online state ``m`` (running max), ``s = Σ exp(l − m)``, ``t = Σ exp(l − m)·(l − m)``,
  the first argmax and the label's logit. ``t`` is kept relative to ``m`` so every term is bounded
  (|x·eˣ| ≤ 1/e for x ≤ 0) and the entropy ``log s − t/s`` has no cancellation between large logits.
* ``grad_chunk`` overwrites a logits tile (in place, or into another buffer) with
  ``coef_p · softmax − coef_y · onehot(label)``, the cross-entropy's gradient w.r.t. the logits.

One source for CUDA and triton-ascend: a 1-D grid whose programs stride over rows (sized to the
vector-core count on Ascend, one program per row elsewhere), power-of-two tiles along the
vocabulary, no ``tl.dot``, no atomics. Under ``TRITON_INTERPRET=1`` it runs on CPU tensors (tests).
This module imports triton at import time; ``fluid_ops.vocab_tiles`` imports it only when the back
end is selected.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 1024  # tile width along the vocabulary: 4 KiB of fp32, a multiple of every alignment
_FMIN = -3.4028234663852886e38  # float32 min: -inf logits are clamped here (no inf − inf = NaN)
_NO_INDEX = 2**31 - 1


@triton.jit
def _reduce_chunk_kernel(
    logits_ptr,
    stride_row,
    n_rows,
    n_cols,
    col_offset,
    labels_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    argmax_ptr,
    label_logit_ptr,
    HAS_LABELS: tl.constexpr,
    BLOCK: tl.constexpr,
    FMIN: tl.constexpr,
    NO_INDEX: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    for row in range(pid, n_rows, n_prog):
        row_ptr = logits_ptr + tl.cast(row, tl.int64) * stride_row
        m = tl.load(m_ptr + row)
        s = tl.load(s_ptr + row)
        t = tl.load(t_ptr + row)
        best = tl.load(argmax_ptr + row)
        for v0 in range(0, n_cols, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < n_cols, other=FMIN).to(tl.float32)
            x = tl.maximum(x, FMIN)
            tile_max = tl.max(x, axis=0)
            # first column reaching the tile max; masked lanes sit after every valid one
            tile_arg = tl.min(tl.where(x == tile_max, cols, NO_INDEX), axis=0)
            new_m = tl.maximum(m, tile_max)
            alpha = tl.exp(m - new_m)  # 0 on the first tile (m = -inf)
            shift = s * (tl.where(s > 0.0, m, new_m) - new_m)  # no 0·(-inf) on the first tile
            d = x - new_m
            e = tl.exp(d)
            t = alpha * (t + shift) + tl.sum(e * d, axis=0)
            s = alpha * s + tl.sum(e, axis=0)
            best = tl.where(tile_max > m, (tile_arg + col_offset).to(tl.int64), best)
            m = new_m
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        tl.store(t_ptr + row, t)
        tl.store(argmax_ptr + row, best)
        if HAS_LABELS:
            local = tl.load(labels_ptr + row) - col_offset
            inside = (local >= 0) & (local < n_cols)
            picked = tl.load(row_ptr + tl.where(inside, local, 0)).to(tl.float32)
            old = tl.load(label_logit_ptr + row)
            tl.store(label_logit_ptr + row, tl.where(inside, tl.maximum(picked, FMIN), old))


@triton.jit
def _grad_chunk_kernel(
    logits_ptr,
    stride_row,
    out_ptr,
    stride_out,
    n_rows,
    n_cols,
    col_offset,
    labels_ptr,
    lse_ptr,
    coef_p_ptr,
    coef_y_ptr,
    BLOCK: tl.constexpr,
    FMIN: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    for row in range(pid, n_rows, n_prog):
        row_ptr = logits_ptr + tl.cast(row, tl.int64) * stride_row
        out_row = out_ptr + tl.cast(row, tl.int64) * stride_out
        lse = tl.load(lse_ptr + row)
        cp = tl.load(coef_p_ptr + row)
        cy = tl.load(coef_y_ptr + row)
        local = tl.load(labels_ptr + row) - col_offset
        for v0 in range(0, n_cols, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            valid = cols < n_cols
            x = tl.load(row_ptr + cols, mask=valid, other=FMIN).to(tl.float32)
            g = tl.exp(tl.maximum(x, FMIN) - lse) * cp
            g = tl.where(cols == local, g - cy, g)
            tl.store(out_row + cols, g.to(out_ptr.dtype.element_ty), mask=valid)


def _grid(n_rows: int, device: torch.device) -> tuple[int]:
    """1-D grid: Ascend wants one program per vector core, elsewhere one per row (≤ 65535)."""
    cap = 65535
    if device.type == "npu":
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        cores = int(props.get("num_vectorcore", -1))
        if cores > 0:
            cap = cores
    return (max(1, min(n_rows, cap)),)


def reduce_chunk(
    logits: torch.Tensor,
    col_offset: int,
    labels: torch.Tensor | None,
    m: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    argmax: torch.Tensor,
    label_logit: torch.Tensor,
) -> None:
    """Fold ``logits`` (``[rows, cols]``, columns ``col_offset…``) into the row state, in place.

    ``m``/``s``/``t``/``label_logit`` are fp32 ``[rows]``, ``argmax`` int64 ``[rows]``; start from
    ``m = -inf``, ``s = t = 0``. ``labels`` (int64 ``[rows]``) may be None.
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, cols = logits.shape
    if rows == 0 or cols == 0:
        return
    has_labels = labels is not None
    _reduce_chunk_kernel[_grid(rows, logits.device)](
        logits,
        logits.stride(0),
        rows,
        cols,
        col_offset,
        labels if has_labels else argmax,  # unused pointer when there are no labels
        m,
        s,
        t,
        argmax,
        label_logit,
        HAS_LABELS=has_labels,
        BLOCK=BLOCK_V,
        FMIN=_FMIN,
        NO_INDEX=_NO_INDEX,
    )


def grad_chunk(
    logits: torch.Tensor,
    col_offset: int,
    labels: torch.Tensor,
    lse: torch.Tensor,
    coef_p: torch.Tensor,
    coef_y: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = coef_p[:, None] · exp(logits − lse[:, None]) − coef_y[:, None] · onehot(labels)``.

    ``out`` (returned) is written in its own dtype; None means ``logits`` itself, in place.
    """
    out = logits if out is None else out
    if logits.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("grad_chunk needs row-major logits and output tiles")
    rows, cols = logits.shape
    if rows == 0 or cols == 0:
        return out
    _grad_chunk_kernel[_grid(rows, logits.device)](
        logits,
        logits.stride(0),
        out,
        out.stride(0),
        rows,
        cols,
        col_offset,
        labels,
        lse,
        coef_p,
        coef_y,
        BLOCK=BLOCK_V,
        FMIN=_FMIN,
    )
    return out
