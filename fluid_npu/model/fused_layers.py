"""torch_npu's fused layer kernels swapped into a transformers backbone from outside.

``apply_npu_fused_layers(model)`` swaps fused kernels into the decoder layers of Llama (openPangu
loads as Llama), Qwen2, Qwen3 and Mistral — the model's code and classes stay untouched:

* ``*RMSNorm`` → ``fluid_ops.npu_layers.rms_norm`` (``npu_rms_norm``), Qwen3's q/k norms included;
* ``*MLP`` with a SiLU gate → ``down_proj(npu_swiglu(cat([gate_proj(x), up_proj(x)], -1)))``; the
  projections are called as modules, so LoRA on them keeps working. The concatenation costs one
  copy of the two projections; what the fused kernel saves is the separate SiLU and product
  kernels and the intermediate they keep for the backward;
* ``*Attention`` → its own forward, which calls its modeling module's ``apply_rotary_pos_emb``;
  that module-level function is replaced once, at set-up, by one that runs ``npu_rotary_mul``
  where the kernel's contract holds and transformers' function everywhere else. Nothing is patched
  per call, so concurrent forwards and ``torch.compile`` see one fixed function; a second set-up
  keeps it (the original stays reachable as its ``ROTARY_ORIGINAL`` attribute). The swap is
  per modeling module, so it also serves other models of that architecture in the process when
  their tensors fit the kernel (an NPU tensor of a supported shape): the same function, fused.
  The kernel takes ``cos`` / ``sin`` in [-1, 1] only (op-plugin's documented range on A2 / A3); a
  rotary that scales them past 1 (YaRN's and LongRoPE's attention factor: ``attention_scaling``)
  cannot be checked per call without reading the device, so a model with one keeps transformers'
  function — and its modeling module keeps it from then on, for every model of that
  architecture in the process (``ROTARY_OFF``); its norms and MLP are still fused.

Norms and MLPs get a new ``forward`` per module *instance*. Every fused path checks the kernel's
documented contract (``*_fits``: device, shape, dtype) per call and runs the original code
otherwise, so anything the kernel does not take still works. Classes are matched by name from an
allow-list whose semantics were checked (Gemma's ``1 + weight`` norm, for one, is not the same op),
and modules whose ``forward`` was already replaced by someone else are left alone. transformers'
hub-kernel mechanism is not used: nothing is downloaded.

It is a no-op (returns 0) unless an NPU is usable, so the training session calls it
unconditionally; config key ``npu_fused_kernels: false`` turns it off. ``enable_mindspeed`` is the
explicit, optional MindSpeed import (config key ``use_mindspeed``).
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fluid_npu.errors import ConfigError

ARCHS = ("Llama", "Qwen2", "Qwen3", "Mistral")
NORM_CLASSES = frozenset(f"{a}RMSNorm" for a in ARCHS)
MLP_CLASSES = frozenset(f"{a}MLP" for a in ARCHS)
ATTENTION_CLASSES = frozenset(f"{a}Attention" for a in ARCHS)
MARK = "_fluid_npu_fused"  # set on every module that runs a fused kernel from here
ROTARY_ORIGINAL = "_fluid_npu_original"  # on an installed fused rotary: the function it wraps
ROTARY_OFF = "_fluid_npu_rotary_off"  # on a modeling module: a model of it scales cos / sin past 1


def _npu_layers() -> Any:
    import fluid_ops.npu_layers as npu_layers

    return npu_layers


def _fused_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    ops = _npu_layers()
    if ops.rms_norm_fits(hidden_states, self.weight):
        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ops = _npu_layers()
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype == up.dtype:
        gate_up = torch.cat([gate, up], dim=-1)
        if ops.swiglu_fits(gate_up):
            return self.down_proj(ops.swiglu(gate_up))
    return self.down_proj(self.act_fn(gate) * up)  # the original forward, projections reused


def _fused_rotary_for(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` (a modeling module's ``apply_rotary_pos_emb``) with ``npu_rotary_mul`` for the
    calls its contract takes; every other call goes to ``original`` unchanged."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        unsqueeze_dim: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ops = _npu_layers()
        if unsqueeze_dim == 1:  # q, k are BNSD; cos, sin become B1SD
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            if ops.rotary_fits(q, c, s) and ops.rotary_fits(k, c, s):
                return ops.rotary_mul(q, c, s), ops.rotary_mul(k, c, s)
        return original(q, k, cos, sin, unsqueeze_dim)

    setattr(apply_rotary_pos_emb, ROTARY_ORIGINAL, original)
    return apply_rotary_pos_emb


def _install_fused_rotary(modeling: types.ModuleType) -> bool:
    """Point ``modeling.apply_rotary_pos_emb`` at the fused rotary once (a fused one stays);
    False where a scaled rotary turned it off for this module (``ROTARY_OFF``)."""
    if getattr(modeling, ROTARY_OFF, False):
        return False
    current = modeling.apply_rotary_pos_emb
    if getattr(current, ROTARY_ORIGINAL, None) is None:
        modeling.apply_rotary_pos_emb = _fused_rotary_for(current)
    return True


def _keep_plain_rotary(modeling: types.ModuleType) -> None:
    """transformers' own ``apply_rotary_pos_emb`` for ``modeling``, now and from now on."""
    original = getattr(modeling.apply_rotary_pos_emb, ROTARY_ORIGINAL, None)
    if original is not None:
        modeling.apply_rotary_pos_emb = original
    setattr(modeling, ROTARY_OFF, True)


def scales_rotary_past_one(model: nn.Module) -> bool:
    """Whether ``model``'s rotary embedding multiplies ``cos`` / ``sin`` by more than 1 (YaRN's
    or LongRoPE's ``attention_scaling``), outside ``npu_rotary_mul``'s documented [-1, 1]."""
    for module in model.modules():
        scale = getattr(module, "attention_scaling", None)
        if scale is None or not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        values = scale.values() if isinstance(scale, dict) else [scale]
        if any(abs(float(v)) > 1.0 for v in values):
            return True
    return False


def _kind(module: nn.Module) -> str | None:
    """Which swap applies to ``module`` (None: none, or its forward is already replaced)."""
    if getattr(module, MARK, False) or "forward" in module.__dict__:
        return None
    name = type(module).__name__
    if name in NORM_CLASSES and hasattr(module, "variance_epsilon"):
        return "norm"
    if name in MLP_CLASSES and all(hasattr(module, a) for a in ("gate_proj", "up_proj")):
        act = module.act_fn
        if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation":
            return "mlp"
        return None
    if name in ATTENTION_CLASSES:
        modeling = sys.modules.get(type(module).__module__)
        if callable(getattr(modeling, "apply_rotary_pos_emb", None)):
            return "attention"
    return None


FORWARDS = {"norm": _fused_norm_forward, "mlp": _fused_mlp_forward}


def apply_npu_fused_layers(model: nn.Module, *, enabled: bool | None = None) -> int:
    """Swap torch_npu's fused kernels into ``model``'s layers; returns how many modules changed.

    ``enabled=None`` means "when an NPU is usable" (``fluid_npu.device.is_npu_available``); a caller
    that keeps a model on the CPU of an NPU host passes ``False``. Calling it twice changes nothing
    the second time.
    """
    if enabled is None:
        from fluid_npu.device import is_npu_available

        enabled = is_npu_available()
    if not enabled:
        return 0
    swapped = 0
    scaled = scales_rotary_past_one(model)  # (the fused rotary's cos / sin must stay in [-1, 1])
    for module in model.modules():
        kind = _kind(module)
        if kind is None:
            continue
        if kind == "attention":  # its forward stays; the function it calls is swapped
            modeling = sys.modules[type(module).__module__]
            if scaled:
                _keep_plain_rotary(modeling)
                continue
            if not _install_fused_rotary(modeling):
                continue
        else:
            module.forward = types.MethodType(FORWARDS[kind], module)
        setattr(module, MARK, True)
        swapped += 1
    return swapped


def enable_mindspeed() -> str:
    """Import MindSpeed's adaptor (``use_mindspeed: true``); a ConfigError says how to install it.

    Returns its version. MindSpeed patches Megatron-LM and ``torch.cuda`` process-wide; fluid-npu's
    own NPU kernels do not need it.
    """
    from fluid_ops.dispatch import BackendUnavailable

    try:
        _npu_layers().import_mindspeed()
    except BackendUnavailable as exc:
        raise ConfigError(f"use_mindspeed: true, but {exc}; or set use_mindspeed: false") from None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mindspeed")
    except PackageNotFoundError:
        return "unknown"
