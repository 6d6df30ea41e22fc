"""torch_npu's fused layer kernels — RMSNorm, rotary embedding, SwiGLU — and the MindSpeed import.

A decoder layer of Llama / Qwen / Mistral / openPangu spends many small kernel launches on its
norms, its rotary embedding and its gated MLP. torch_npu has one fused kernel for each; this module
calls them with their documented contracts (op-plugin docs, ``docs/context/``):

* ``npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd)``: ``y = x / sqrt(mean(x²) + eps) · γ``
  over the last dimension, ``rstd`` (fp32) is ``1/Rms(x)`` for the backward. x and γ must share
  the dtype (fp16 / bf16 / fp32), x has 2–8 dimensions.
* ``npu_rotary_mul(input, r1, r2, rotary_mode='half') -> Tensor``: ``r1·x + r2·rotate_half(x)``
  with ``rotate_half(x) = cat(-x₂, x₁)``, i.e. transformers' ``apply_rotary_pos_emb`` for one
  tensor. 4-D inputs; for the BNSD layout ``r1``/``r2`` are ``11SD``, ``B1SD`` or ``BNSD``;
  ``D < 896`` and even, ``B, N < 1000`` (A2 / A3, ``jit_compile=False``). ``rotary_mode`` is not
  passed: ``'half'`` is its default and older torch_npu releases do not have the argument.
* ``npu_swiglu(input, dim=-1) -> Tensor``: ``swish(A) · B`` with ``A, B`` the first and second
  halves of ``input`` along ``dim`` — ``silu(gate) · up`` for ``cat([gate, up], -1)``; contiguous
  input whose ``dim`` has even size.

Each op has a ``*_fits`` predicate; callers fall back to the plain torch code when it is false, so
a device, shape or dtype the kernel does not take never reaches it. The kernels take tensors on
``KERNEL_DEVICE_TYPE`` only; torch_npu is reached only through the one import hook,
``fluid_ops.dispatch.load_torch_npu``. Tests replace both with a CPU emulation of these semantics.

MindSpeed patches Megatron-LM (and, through ``transfer_to_npu``, ``torch.cuda``) for Ascend. It is
never required; ``import_mindspeed`` imports ``mindspeed.megatron_adaptor`` on request only, and
says how to install it from source when it is missing (the package registry's ``mindspeed`` is a
placeholder that refuses to install).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from fluid_ops import dispatch
from fluid_ops.dispatch import BackendUnavailable

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROTARY_MAX_HEAD_DIM = 896  # D < 896 (half mode, jit_compile=False)
ROTARY_MAX_BATCH_HEADS = 1000  # B, N < 1000
MINDSPEED_SOURCE = "https://gitcode.com/Ascend/MindSpeed.git"
KERNEL_DEVICE_TYPE = "npu"  # where torch_npu's kernels run (tests point it at a CPU emulation)


def _on_kernel_device(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == KERNEL_DEVICE_TYPE for t in tensors)


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------


def rms_norm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``npu_rms_norm`` takes ``x`` normalised over its last dimension with ``weight``."""
    return (
        _on_kernel_device(x, weight)
        and x.dtype in FLOAT_DTYPES
        and weight.dtype == x.dtype
        and 2 <= x.dim() <= 8
        and weight.dim() == 1
        and weight.shape[0] == x.shape[-1]
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps) · weight`` through ``torch_npu.npu_rms_norm``."""
    out, _rstd = dispatch.load_torch_npu().npu_rms_norm(x, weight, epsilon=float(eps))
    return out


# ---------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------


def rotary_fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``npu_rotary_mul`` takes BNSD ``x`` with ``cos`` / ``sin`` of shape 11SD / B1SD /
    BNSD (the documented broadcast patterns), in ``x``'s dtype."""
    if x.dim() != 4 or cos.dim() != 4 or cos.shape != sin.shape:
        return False
    b, n, s, d = x.shape
    return (
        _on_kernel_device(x, cos, sin)
        and x.dtype in FLOAT_DTYPES
        and cos.dtype == x.dtype
        and sin.dtype == x.dtype
        and d % 2 == 0
        and d < ROTARY_MAX_HEAD_DIM
        and b < ROTARY_MAX_BATCH_HEADS
        and n < ROTARY_MAX_BATCH_HEADS
        and tuple(cos.shape) in {(1, 1, s, d), (b, 1, s, d), (b, n, s, d)}
    )


def rotary_mul(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` through ``torch_npu.npu_rotary_mul`` (half mode)."""
    return dispatch.load_torch_npu().npu_rotary_mul(x, cos, sin)


# ---------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------


def swiglu_fits(x: torch.Tensor) -> bool:
    """Whether ``npu_swiglu`` takes ``x`` split in halves along its last dimension."""
    return (
        _on_kernel_device(x)
        and x.dtype in FLOAT_DTYPES
        and 1 <= x.dim() <= 8
        and x.numel() > 0
        and x.shape[-1] % 2 == 0
        and x.is_contiguous()
    )


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(A) · B`` for ``A, B = x.chunk(2, -1)`` through ``torch_npu.npu_swiglu``."""
    return dispatch.load_torch_npu().npu_swiglu(x, dim=-1)


# ---------------------------------------------------------------------------------------------
# MindSpeed
# ---------------------------------------------------------------------------------------------


def import_mindspeed() -> ModuleType:
    """Import ``mindspeed.megatron_adaptor`` (which applies MindSpeed's patches process-wide)."""
    if importlib.util.find_spec("mindspeed") is None:
        raise BackendUnavailable(
            "MindSpeed is not installed; install it from source with the branch that matches "
            f"your torch_npu / CANN (see its version table): git clone {MINDSPEED_SOURCE} && "
            "pip install -e MindSpeed. The package registry's 'mindspeed' is a placeholder that "
            "refuses to install"
        )
    try:
        return importlib.import_module("mindspeed.megatron_adaptor")
    except Exception as exc:  # its own imports (torch_npu, megatron) failed
        raise BackendUnavailable(
            f"mindspeed is installed but mindspeed.megatron_adaptor cannot be imported ({exc}); "
            "it needs torch_npu with CANN and a matching Megatron-LM"
        ) from exc
