"""The ``triton`` back end of ``fluid_attention``: block-sparse flash attention, fwd and bwd.

Three files, one concept each: ``fluid_ops.attention_tiles`` chooses which (query tile, key tile)
pairs may hold a visible pair (torch, conservative, cached per metadata);
``fluid_ops.attention_triton_kernels`` holds the Triton kernels that walk those tiles and decide
visibility per pair from the metadata; this module launches them. One source runs on CUDA, on
Ascend (triton-ascend) and on the CPU under ``TRITON_INTERPRET=1``.

The kernels are wrapped as ``torch.library`` custom ops (``fluid_ops::triton_attn_fwd`` /
``fluid_ops::triton_attn_bwd``) with fake implementations and a registered autograd formula, so
they compose with ``torch.compile``. ``tile_stats`` counts the query-key pairs the kernels
compute (same tile selection) against the visible pairs, for ``attn_compute_ratio``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fluid_ops.attention_tiles import (
    DEFAULT_BLOCK_M,
    DEFAULT_BLOCK_N,
    active_tiles,
    plan_visits,
    resolve_tiles,
    tile_stats,
)
from fluid_ops.attention_triton_kernels import _bwd_dkdv_kernel, _bwd_dq_kernel, _fwd_kernel
from fluid_ops.meta import AttnMeta

_MAX_PROGRAMS = 65535  # grid limit shared by CUDA (y/z) and Ascend (coreDim)
_LOG2E = 1.4426950408889634


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
    block_m, block_n = resolve_tiles(block_m, block_n)
    _check_interpreter(q.device)
    plan = plan_visits(meta, block_m, block_n, q.device)
    out, _ = _attn_fwd(q, k, v, *plan, float(scale), block_m, block_n)
    return out


def triton_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttnMeta,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``triton_attention`` (default tiles) for ``grad_out``.

    Recomputes the forward's output and log-sum-exp, then runs the backward kernels: what
    ``fluid_attention``'s backward op needs, where autograd (and so ``torch.func``) is unavailable.
    """
    block_m, block_n = resolve_tiles(None, None)
    _check_interpreter(q.device)
    plan = plan_visits(meta, block_m, block_n, q.device)
    out, lse = _attn_fwd(q, k, v, *plan, float(scale), block_m, block_n)
    return _attn_bwd(grad_out, q, k, v, out, lse, *plan, float(scale), block_m, block_n)


__all__ = [
    "DEFAULT_BLOCK_M",
    "DEFAULT_BLOCK_N",
    "active_tiles",
    "tile_stats",
    "triton_attention",
    "triton_attention_backward",
]
