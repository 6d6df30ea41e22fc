"""The ``npu`` back end of ``fluid_attention``: torch_npu's fused attention kernels, directly.

Training (and any call needing gradients) runs ``torch_npu.npu_fusion_attention``, which has its own
backward, over the blocks of ``fluid_ops.attention.plan_blocks``: the Stage I main stream as one
causal square through ``sparse_mode=2`` (leftUpCausal, the causal triangle anchored at the top-left
corner, i.e. SDPA's ``is_causal``; on a square it equals 3, rightDownCausal) with the documented
compressed ``triu(ones(2048, 2048), 1)`` mask, and every other block with an explicit mask and
``sparse_mode=0``. Cached inference (keys longer than queries, no gradient, fp16/bf16, head dim a
multiple of 16 as the prefill kernel requires) runs ``torch_npu.npu_fused_infer_attention_score``
once with the full mask: the new tokens are few, so one launch beats blocking.

Conventions of both vendor ops, unlike SDPA (op-plugin docs, ``docs/context/torch_npu-*.md``):
``atten_mask`` is bool with **True = masked out**, ``scale`` defaults to 1.0 and is always passed,
``input_layout="BNSD"``, GQA is native (``head_num`` = query heads; the inference op also takes
``num_key_value_heads``). A fully masked row loses precision unless ``inner_precise=2`` (which the
docs say costs speed), so no row we hand over is ever fully masked: rows without a visible key are
opened to every key and zeroed afterwards, the same rule as the other back ends.

torch_npu is reached only through ``fluid_ops.dispatch.load_torch_npu()`` so tests can inject a CPU
emulation of the documented semantics and check the exact arguments.

Argument names that changed between torch_npu releases are read from the installed op, never
assumed: the inference op's scale is ``scale_value`` up to torch_npu 6.0.x and ``scale`` from 7.0
(``npu_fusion_attention`` has always said ``scale``; nothing else we pass was renamed between 2.1
and the newest docs). ``keyword_for`` looks at the op's Python signature, then its schema under
``torch.ops.npu``, then the prototype in its docstring, and as a last resort calls it and keeps
the spelling that it accepts.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from fluid_ops import dispatch
from fluid_ops.attention_blocked import run_blocks, zero_rows
from fluid_ops.attention_plan import Block, safe_mask
from fluid_ops.meta import AttnMeta, cached_plan, visibility

# Slot queries per fused call: each launch costs more than on a CPU; 1024 is what measured best for
# the blocked back end on an H100 (the nearest analogue we could time), not yet tuned on a 910B.
NPU_CHUNK = 1024
COMPRESSED_CAUSAL = 2048  # side of the compressed causal mask that sparse_mode 2/3 take
LEFT_UP_CAUSAL = 2  # sparse_mode: query i sees keys j <= i (SDPA's is_causal)
EXPLICIT_MASK = 0  # sparse_mode: the full atten_mask is applied as given
_CAUSAL_MASKS: dict[torch.device, torch.Tensor] = {}


def compressed_causal_mask(device: torch.device) -> torch.Tensor:
    """The documented ``triu(ones(2048, 2048), diagonal=1)`` bool mask (cached per device)."""
    if device not in _CAUSAL_MASKS:
        ones = torch.ones(COMPRESSED_CAUSAL, COMPRESSED_CAUSAL, dtype=torch.bool, device=device)
        _CAUSAL_MASKS[device] = torch.triu(ones, diagonal=1)
    return _CAUSAL_MASKS[device]


def npu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttnMeta,
    scale: float,
    chunk: int = NPU_CHUNK,
) -> torch.Tensor:
    """FLUID attention through torch_npu (shapes and semantics of ``fluid_attention``)."""
    npu = dispatch.load_torch_npu()
    if _use_infer_kernel(q, k, v):
        return _infer(npu, q, k, v, meta, scale)
    return run_blocks(
        q, k, v, meta, chunk, lambda qs, ks, vs, blk: _fusion(npu, qs, ks, vs, blk, scale)
    )


def _use_infer_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Cached inference the prefill/decode kernel supports: no gradient, fp16/bf16, D % 16 == 0."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (
        k.shape[2] > q.shape[2]
        and not needs_grad
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 16 == 0
    )


def _fusion(
    npu: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk: Block, scale: float
) -> torch.Tensor:
    if blk.causal:
        mask, mode = compressed_causal_mask(q.device), LEFT_UP_CAUSAL
    else:
        mask, mode = (~blk.mask)[:, None], EXPLICIT_MASK  # B1SS, True = masked out
    result = npu.npu_fusion_attention(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        q.shape[1],
        "BNSD",
        atten_mask=mask,
        scale=scale,
        sparse_mode=mode,
    )
    return result[0]  # (out, softmax_max, softmax_sum, reserved, seed, offset, numels)


def _infer(
    npu: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, scale: float
) -> torch.Tensor:
    # every layer of a decoding step shares the metadata: one mask per step (``cached_plan``)
    masked_out, keep = cached_plan(meta, ("npu_infer", str(q.device)), lambda: _infer_mask(meta))
    op = npu.npu_fused_infer_attention_score
    kwargs: dict[str, Any] = dict(
        atten_mask=masked_out,  # B1SS, True = masked out
        num_heads=q.shape[1],
        num_key_value_heads=k.shape[1],
        input_layout="BNSD",
        sparse_mode=EXPLICIT_MASK,
    )
    args = (q.contiguous(), k.contiguous(), v.contiguous())
    out, _lse = call_renamed(op, INFER_SCALE, scale, args, kwargs)
    return zero_rows(out, keep)


def _infer_mask(meta: AttnMeta) -> tuple[torch.Tensor, torch.Tensor]:
    mask, keep = safe_mask(visibility(meta))
    return (~mask)[:, None], keep  # B1SS, True = masked out


# The inference op's scale keyword: torch_npu >= 7.0 first, then the 6.0.x spelling.
INFER_SCALE = ("scale", "scale_value")
_KEYWORDS: dict[tuple[Any, tuple[str, ...]], str] = {}  # (op, spellings) -> the one it takes


def keyword_for(op: Callable[..., Any], spellings: tuple[str, ...]) -> str | None:
    """Which of ``spellings`` the installed ``op`` takes, from what it says about itself.

    None when neither its signature, its ``torch.ops.npu`` schema nor its docstring tells.
    """
    try:
        params = inspect.signature(op).parameters
    except (TypeError, ValueError):  # a builtin without a text signature
        params = {}
    named = [p for p in params.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if named:
        names = {p.name for p in named}
        return next((s for s in spellings if s in names), None)
    schema_names = _schema_argument_names(getattr(op, "__name__", ""))
    if schema_names:
        return next((s for s in spellings if s in schema_names), None)
    doc = getattr(op, "__doc__", None) or ""
    return next((s for s in spellings if re.search(rf"\b{s}\s*=", doc)), None)


def _schema_argument_names(name: str) -> set[str]:
    """Argument names of ``torch.ops.npu.<name>`` (empty when there is no such op)."""
    try:
        packet = getattr(torch.ops.npu, name)
        return {a.name for a in packet.default._schema.arguments}
    except Exception:  # no npu namespace (torch_npu not loaded) or no such overload
        return set()


def call_renamed(
    op: Callable[..., Any],
    spellings: tuple[str, ...],
    value: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``op(*args, **kwargs, <name>=value)`` with ``<name>`` the spelling the installed op takes.

    The spelling is resolved once per op (``keyword_for``); when the op does not say, each
    spelling is tried in turn and the one it accepts is remembered.
    """
    key = (getattr(op, "__func__", op), spellings)  # a bound method: its function
    name = _KEYWORDS.get(key) or keyword_for(op, spellings)
    if name is not None:
        _KEYWORDS[key] = name
        return op(*args, **kwargs, **{name: value})
    errors = []
    for candidate in spellings:
        try:
            result = op(*args, **kwargs, **{candidate: value})
        except TypeError as exc:  # an unknown keyword: try the next spelling
            if candidate not in str(exc):
                raise
            errors.append(str(exc))
            continue
        _KEYWORDS[key] = candidate
        return result
    raise TypeError(f"{getattr(op, '__name__', op)} takes none of {spellings}: {errors}")
