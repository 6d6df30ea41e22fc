"""``fluid_attention``: the FLUID causal-masked attention, one entry point over four back ends.

Queries attend keys by the §1.1 visibility rule computed from per-token metadata
(``fluid_ops.meta.AttnMeta``), never from a mask the caller builds. Shapes are BNSD, exactly what
transformers hands a registered attention function: ``q [B, Hq, Lq, D]``, ``k``/``v``
``[B, Hkv, Lk, D]`` with ``Hq`` divisible by ``Hkv`` (GQA). A query row with no visible key outputs
exactly 0 (and contributes no gradient); nothing is ever NaN. Back ends, chosen by
``fluid_ops.dispatch``:

* ``reference``: the dense bool mask from ``visibility`` + ``F.scaled_dot_product_attention``;
* ``blocked``: the Stage I memory order exploited with stock SDPA on any device: the queries cut
  into blocks that each attend only the key ranges they can see (``fluid_ops.attention_plan``
  plans, ``fluid_ops.attention_blocked`` runs). The CPU fast path; the reference math when
  ``meta.n_main`` is None;
* ``npu``: ``torch_npu`` fused kernels over the same blocks (``fluid_ops.attention_npu``);
* ``triton``: block-sparse flash attention (``fluid_ops.attention_triton``).

**The custom op.** ``fluid_ops::fluid_attention`` (a ``torch.library`` custom op) takes the four
metadata tensors and ``n_main`` as arguments, selects the back end and runs it inside its real
implementation; its fake implementation gives ``torch.compile`` the output's shape, dtype and
strides (those of ``q``), so a compiled model traces through it without looking at the planning
(host transfers, caches). Its backward, ``fluid_ops::fluid_attention_backward``, recomputes the
forward of the same back end and takes its vector-Jacobian product with ``torch.func.vjp`` (the
``triton`` back end: its own backward kernels), because a custom op's implementation runs below
autograd and the forward's own graph cannot be kept. In eager mode a call that records autograd
(training) therefore runs the back end directly under autograd instead — the same function and
numbers, its native backward, no recomputation; every other call (inference, and every call that
``torch.compile`` traces, training included) goes through the op.

Every back end is checked against a float64 softmax straight from ``visibility`` in
``tests/test_ops_attention.py``; the op against direct calls in ``tests/test_attention_op.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from fluid_ops import dispatch
from fluid_ops.attention_blocked import blocked_attention, reference_attention
from fluid_ops.attention_plan import plan_blocks
from fluid_ops.meta import AttnMeta, visibility

OP = "attention"


def fluid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttnMeta,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """FLUID attention ``[B, Hq, Lq, Dv]`` of ``q`` over ``k``/``v`` under ``visibility(meta)``.

    ``scale`` defaults to ``1/sqrt(D)``. ``backend`` names a back end (``reference``, ``blocked``,
    ``npu``, ``triton``) or ``None``/``"auto"`` for the dispatch order; see ``fluid_ops.dispatch``.
    """
    _check(q, k, v, meta)
    if meta.q_pos.device != q.device:
        meta = meta.to(q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _records_autograd(q, k, v) and not torch.compiler.is_compiling():
        return _run(q, k, v, meta, scale, backend)  # eager training: see the module docstring
    return _attention_op(q, k, v, *_meta_args(meta), scale, backend)


def _records_autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _meta_args(meta: AttnMeta) -> tuple:
    """The metadata as the op's arguments (``n_main`` a plain int: the schema says ``int?``)."""
    n_main = None if meta.n_main is None else int(meta.n_main)
    return meta.q_pos, meta.q_anchor, meta.k_pos, meta.k_anchor, n_main


def _run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttnMeta,
    scale: float,
    backend: str | None,
) -> torch.Tensor:
    """Select the back end for ``q``'s device and run it (the op's real implementation)."""
    name = dispatch.select(OP, q.device, backend)
    return _BACKENDS[name](q, k, v, meta, scale)


# ------------------------------------------------------------------------------------------------
# The custom ops: forward, its fake, and autograd through the backward op.


@torch.library.custom_op("fluid_ops::fluid_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    q_anchor: torch.Tensor,
    k_pos: torch.Tensor,
    k_anchor: torch.Tensor,
    n_main: int | None,
    scale: float,
    backend: str | None,
) -> torch.Tensor:
    meta = AttnMeta(q_pos, q_anchor, k_pos, k_anchor, n_main)
    return _laid_out(_run(q, k, v, meta, scale, backend), partial(_out_like, q, v))


@_attention_op.register_fake
def _attention_fake(q, k, v, *_meta_and_options):
    return _out_like(q, v)


@torch.library.custom_op("fluid_ops::fluid_attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    q_anchor: torch.Tensor,
    k_pos: torch.Tensor,
    k_anchor: torch.Tensor,
    n_main: int | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = AttnMeta(q_pos, q_anchor, k_pos, k_anchor, n_main)
    if backend == "triton":  # its kernels have a backward of their own (and no torch.func rule)
        from fluid_ops.attention_triton import triton_attention_backward

        grads = triton_attention_backward(grad_out, q, k, v, meta, scale)
    else:

        def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return _BACKENDS[backend](q, k, v, meta, scale)

        _, vjp = torch.func.vjp(forward, q, k, v)  # recompute, then the back end's own backward
        grads = vjp(grad_out)
    return tuple(_laid_out(g, partial(torch.empty_like, x)) for g, x in zip(grads, (q, k, v)))


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, *_meta_and_options):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _out_like(q: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
    """An empty output ``[B, Hq, Lq, Dv]`` laid out like ``q`` (transformers hands a transposed
    BSHD view: the output then transposes back to BSHD for free)."""
    if v.shape[-1] == q.shape[-1]:
        return torch.empty_like(q, **kw)
    return q.new_empty((*q.shape[:3], v.shape[-1]), **kw)


def _laid_out(t: torch.Tensor, empty: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``t`` with the strides of ``empty()``, copied into a new tensor only when they differ.

    The fake implementations promise these strides and a compiled graph plans its views on them,
    so the real implementations keep the promise.
    """
    if t.stride() == empty(device="meta").stride():  # the strides alone: nothing allocated
        return t
    return empty().copy_(t)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, q_pos, q_anchor, k_pos, k_anchor, n_main, scale, backend = inputs
    ctx.save_for_backward(q, k, v, q_pos, q_anchor, k_pos, k_anchor)
    # the back end the forward ran (same call, same thread: the same answer as its selection)
    ctx.options = (n_main, scale, dispatch.select(OP, q.device, backend))


def _backward(ctx, grad_out):
    dq, dk, dv = _attention_backward_op(grad_out, *ctx.saved_tensors, *ctx.options)
    return dq, dk, dv, *([None] * 7)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Checks, figures and the back-end table.


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

# The entry point, and what tests and tools import from here.
__all__ = [
    "OP",
    "blocked_attention",
    "fluid_attention",
    "plan_blocks",
    "reference_attention",
    "visible_pairs",
]
