"""One dispatch rule for every fluid_ops op: npu > cuda > cpu, with overrides.

Each op (``"attention"``, ``"vocab"``) registers its back ends here with an availability check that
returns a reason when the back end cannot run. ``select`` picks, in this order:

1. a back end forced by ``force_backend`` (tests) or passed explicitly by the caller;
2. the environment variable ``FLUID_<OP>_BACKEND`` (e.g. ``FLUID_ATTENTION_BACKEND=blocked``);
3. the first available back end in the op's preference list for the tensor's device type.

Forcing a back end that cannot run raises ``BackendUnavailable`` with the reason; nothing falls
back silently once a back end is asked for by name.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType

import torch

Availability = Callable[[torch.device], "str | None"]  # None = available, else the reason


class BackendUnavailable(RuntimeError):
    """A back end was requested by name but cannot run here."""


@dataclass
class _Op:
    backends: dict[str, Availability] = field(default_factory=dict)
    preference: dict[str, list[str]] = field(default_factory=dict)  # device type -> order


_OPS: dict[str, _Op] = {}
_FORCED = threading.local()


def register_backend(op: str, name: str, availability: Availability) -> None:
    """Declare back end ``name`` of ``op``; ``availability(device)`` returns None or a reason."""
    _OPS.setdefault(op, _Op()).backends[name] = availability


def set_preference(op: str, device_type: str, order: list[str]) -> None:
    """The automatic order for ``op`` on ``device_type`` (``"default"`` for any other type)."""
    _OPS.setdefault(op, _Op()).preference[device_type] = list(order)


def register_step_op(op: str) -> None:
    """Declare a decode-step op of the engine: a ``torch`` rule (any device) and a ``triton``
    kernel that CUDA runs first — where an eager step costs what it launches — and any other device
    only when asked for (an NPU: not yet run on triton-ascend; a CPU: under ``TRITON_INTERPRET=1``,
    for tests)."""
    register_backend(op, "torch", lambda device: None)
    register_backend(op, "triton", triton_unavailable)
    set_preference(op, "cuda", ["triton", "torch"])
    set_preference(op, "default", ["torch"])


def backends(op: str) -> list[str]:
    """Names of the registered back ends of ``op``."""
    return list(_OPS[op].backends)


def why_unavailable(op: str, name: str, device: torch.device) -> str | None:
    """None when back end ``name`` of ``op`` can run on ``device``, else the reason."""
    entry = _OPS[op]
    if name not in entry.backends:
        return f"unknown {op} back end {name!r}; choose one of {sorted(entry.backends)}"
    return entry.backends[name](device)


def select(op: str, device: torch.device, requested: str | None = None) -> str:
    """The back end that runs ``op`` for tensors on ``device`` (see the module docstring)."""
    forced = getattr(_FORCED, op, None)
    env = os.environ.get(f"FLUID_{op.upper()}_BACKEND", "").strip() or None
    name = forced or (requested if requested not in (None, "auto") else None) or env
    if name is not None:
        reason = why_unavailable(op, name, device)
        if reason is not None:
            raise BackendUnavailable(f"{op} back end {name!r} is unavailable on {device}: {reason}")
        return name
    entry = _OPS[op]
    order = entry.preference.get(device.type, entry.preference.get("default", []))
    for candidate in order:
        if entry.backends[candidate](device) is None:
            return candidate
    raise BackendUnavailable(f"no {op} back end can run on {device}")


@contextlib.contextmanager
def force_backend(op: str, name: str) -> Iterator[None]:
    """Test-only override: every ``select(op, …)`` inside the block returns ``name`` (or raises)."""
    previous = getattr(_FORCED, op, None)
    setattr(_FORCED, op, name)
    try:
        yield
    finally:
        setattr(_FORCED, op, previous)


def triton_unavailable(device: torch.device) -> str | None:
    """None when Triton can run on ``device`` (CUDA, NPU via triton-ascend, CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # triton absent or broken: say why
        return f"triton cannot be imported ({exc})"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda", "npu"):
        return f"Triton has no back end for device type {device.type!r}"
    if device.type == "npu" and os.environ.get("TRITON_INTERPRET") != "1":
        # triton-ascend registers its back end as "ascend" (≤ 3.2) or "cann" (later releases).
        from triton.backends import backends as registered

        if not {"ascend", "cann"} & set(registered):
            return "the installed triton has no Ascend back end; install triton-ascend"
    return None


def load_torch_npu() -> ModuleType:
    """The torch_npu module, imported on first use: the one import hook of every torch_npu call in
    fluid_ops (tests replace it with a CPU emulation of the documented semantics)."""
    try:
        import torch_npu
    except Exception as exc:  # not installed, or installed without CANN
        raise BackendUnavailable(f"torch_npu cannot be imported ({exc})") from exc
    return torch_npu


def npu_unavailable(device: torch.device) -> str | None:
    """None when torch_npu's fused ops can run on ``device``."""
    if device.type != "npu":
        return f"torch_npu kernels need NPU tensors, got {device.type!r}"
    try:
        load_torch_npu()
    except BackendUnavailable as exc:
        return str(exc)
    return None
