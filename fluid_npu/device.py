"""Which accelerator, which distributed back end, which autocast dtype — the only hardware module.

Order of preference: Ascend NPU (torch_npu) > CUDA > CPU. ``torch_npu`` is imported here and only
here (plus ``ops/``), lazily and inside ``try/except``: with torch_npu installed but no CANN toolkit
even ``import torch`` can fail, so nothing at import time touches it. So is TorchAir, the NPU's
graph mode, when a compiled engine runs on an NPU (``compile_kwargs``).

The decision itself is the pure function ``choose`` (given what is available, what we pick), so it
is tested on a CPU for every combination; ``current()`` feeds it the real probes.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from fluid_npu import host
from fluid_npu.errors import ConfigError

DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")  # the config key ``device``


@functools.lru_cache(maxsize=1)
def npu_import_error() -> str | None:
    """None when torch_npu imports and an NPU is usable, else the reason (cached)."""
    try:
        import torch_npu  # noqa: F401
    except Exception as exc:  # not installed, or installed without CANN
        return f"torch_npu cannot be imported: {exc}"
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return "torch_npu imported but no NPU is visible (check ASCEND_RT_VISIBLE_DEVICES)"
    return None


def is_npu_available() -> bool:
    return npu_import_error() is None


def is_cuda_available() -> bool:
    return torch.cuda.is_available()


@dataclass(frozen=True)
class DeviceChoice:
    """What this process runs on."""

    type: str  # "npu" | "cuda" | "cpu"
    index: int | None
    backend: str  # torch.distributed back end: "hccl" | "nccl" | "gloo"
    autocast_dtype: torch.dtype | None  # None = run in the parameters' dtype

    @property
    def device(self) -> torch.device:
        return (
            torch.device(self.type) if self.index is None else torch.device(self.type, self.index)
        )


def choose(
    *,
    npu: bool,
    cuda: bool,
    bf16_supported: bool,
    want_bf16: bool = True,
    want_fp16: bool = False,
    local_rank: int | None = None,
    force: str | None = None,
    reason: str | None = None,
    count: int | None = None,
) -> DeviceChoice:
    """The pure device decision: npu > cuda > cpu, its collective back end and autocast dtype.

    ``force`` ("npu" / "cuda" / "cpu", or an accelerator with its index, "npu:1") overrides the
    order (config key ``device``, flag ``--device``); forcing a device that is not available
    raises ``ConfigError`` naming it, with ``reason`` (why it is not: torch_npu's import error)
    and what to check; so does an index past the ``count`` devices of that type the host shows.
    """
    available = {"npu": npu, "cuda": cuda, "cpu": True}
    forced_index = None
    if force not in (None, "auto"):
        name, forced_index = split_device(force)
        if name not in available:
            raise ConfigError(
                f"unknown device {force!r}; choose npu, cuda, cpu or auto (npu:N / cuda:N for "
                "one card of several)"
            )
        if not available[name]:
            why = f": {reason}" if reason else ""
            check = ""
            if name == "npu":  # (the reason may already name the variable)
                check = "on an Ascend host, source CANN's set_env.sh"
                if "ASCEND_RT_VISIBLE_DEVICES" not in why:
                    check += " and check ASCEND_RT_VISIBLE_DEVICES"
                check += "; or "
            has = ", ".join(name for name in ("npu", "cuda", "cpu") if available[name])
            raise ConfigError(
                f"device {force!r} was requested but is not available here{why}; {check}ask "
                f"for a device this host has ({has}), or auto for the best one it has"
            )
        kind = name
        if forced_index is not None and count is not None and forced_index >= count:
            cards = (
                f"{kind}:0" if count == 1 else f"{count} devices, {kind}:0 to {kind}:{count - 1}"
            )
            raise ConfigError(
                f"device {force!r}: this host shows {cards}; give one of those (with "
                f"{VISIBLE_DEVICES[kind]} set, the visible ones count from 0)"
            )
    else:
        kind = "npu" if npu else "cuda" if cuda else "cpu"
    backend = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[kind]
    dtype: torch.dtype | None = None
    if kind != "cpu":
        if want_bf16 and bf16_supported:
            dtype = torch.bfloat16
        elif want_fp16 or want_bf16:
            dtype = torch.float16
    elif want_bf16:
        dtype = torch.bfloat16  # CPU autocast supports bf16; only used when asked for
    index = None if kind == "cpu" else forced_index if forced_index is not None else local_rank or 0
    return DeviceChoice(kind, index, backend, dtype)


def split_device(text: str) -> tuple[str, int | None]:
    """``"npu:1"`` → ``("npu", 1)``, ``"cuda"`` → ``("cuda", None)``: a device type and its index;
    a ``ConfigError`` for an index that is not a number, or one given to the CPU."""
    name, colon, index = text.partition(":")
    if not colon or name not in ("npu", "cuda", "cpu"):  # (an unknown name is the caller's to say)
        return name, None
    if name == "cpu":
        raise ConfigError(f"device {text!r}: the CPU takes no index; give cpu")
    if not (index.isascii() and index.isdigit()):
        raise ConfigError(f"device {text!r}: the index after {name}: is a number ({name}:0)")
    return name, int(index)


def card_type(text: str) -> str | None:
    """The accelerator type a device string names one card of (``"npu:1"`` → ``"npu"``), else
    None (a type alone, the CPU, ``auto``)."""
    name, _, index = text.partition(":")
    return name if name in ("npu", "cuda") and index else None


def kind(force: str | None = None) -> str:
    """The device type ``current`` would choose ("npu" | "cuda" | "cpu"), found without touching
    a device (no context is created on it, as the bf16 probe of ``current`` would)."""
    npu = is_npu_available()
    cuda = not npu and is_cuda_available()
    count = visible_device_count() if force is not None and ":" in force else None
    return choose(
        npu=npu, cuda=cuda, bf16_supported=True, force=force, reason=_why(force), count=count
    ).type


def check_device(device: str | torch.device | None) -> None:
    """A ``ConfigError`` for a device this host does not have, or a string that names none —
    before anything loads, rather than torch's error once a model is in memory."""
    if device is None:
        return
    text = str(device)
    if text.partition(":")[0] in ("npu", "cuda"):
        kind(force=text)  # (its ConfigError names the device, a bad index, and the fix)
        return
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"device {text!r} is not a device; give cpu, cuda[:N], npu[:N] (or device_map='auto')"
        ) from None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def current(
    want_bf16: bool = False, want_fp16: bool = False, force: str | None = None
) -> DeviceChoice:
    """The device this process should use, probing torch_npu / CUDA for real."""
    npu = is_npu_available()
    cuda = not npu and is_cuda_available()
    indexed = force is not None and ":" in force
    if npu:
        bf16 = bool(torch.npu.is_bf16_supported())
    elif cuda:
        bf16 = bool(torch.cuda.is_bf16_supported())
    else:
        bf16 = True
    return choose(
        npu=npu,
        cuda=cuda,
        bf16_supported=bf16,
        want_bf16=want_bf16,
        want_fp16=want_fp16,
        local_rank=local_rank() if (npu or cuda) else None,
        force=force,
        reason=_why(force),
        count=visible_device_count() if indexed else None,
    )


def _why(force: str | None) -> str | None:
    """Why a forced accelerator is not available (asked only when one is forced)."""
    name = None if force is None else force.partition(":")[0]
    if name == "npu":
        return npu_import_error()
    if name == "cuda" and not is_cuda_available():
        return "torch.cuda.is_available() is False"
    return None


def device_module(device_type: str) -> ModuleType | None:
    """``torch.npu`` / ``torch.cuda`` for an accelerator type, None for CPU."""
    if device_type == "npu":
        if npu_import_error() is not None:
            return None
        return torch.npu
    if device_type == "cuda":
        return torch.cuda
    return None


def compile_kwargs(device_type: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``torch.compile``'s keywords for a decode step on ``device_type``, ``given`` over them:
    inductor on a CPU; inductor's CUDA graphs (``mode="reduce-overhead"``) on CUDA; TorchAir's
    npu backend in its ``reduce-overhead`` mode (aclgraph, ``npu_graph_backend``) on an Ascend
    NPU, unless ``given`` names a backend or an inductor ``mode`` (``backend=None``, torch's own
    default, counts as naming none)."""
    options = {k: v for k, v in (given or {}).items() if not (k == "backend" and v is None)}
    if device_type == "npu" and "backend" not in options and "mode" not in options:
        options["backend"] = npu_graph_backend()
    elif "backend" not in options:
        options.setdefault("mode", None if device_type == "cpu" else "reduce-overhead")
    return options


@functools.lru_cache(maxsize=1)
def npu_graph_backend() -> Callable[..., Any]:
    """TorchAir's npu backend with ``CompilerConfig().mode = "reduce-overhead"`` (aclgraph, the
    NPU's CUDA graphs), torch_npu imported first as TorchAir requires; one per process (cached),
    so engines share dynamo's compiled entries. A ``ConfigError`` says what is missing and why."""
    fix = (
        "TorchAir ships with torch_npu (Ascend Extension for PyTorch): install the torchair that "
        "matches your torch_npu (7.0 or later has reduce-overhead), or leave out --compile"
    )
    try:
        import torch_npu  # noqa: F401  (before torchair, as TorchAir requires)
        import torchair
    except Exception as exc:  # not installed, or not matching torch_npu / CANN
        raise ConfigError(
            f"--compile on an Ascend NPU runs TorchAir's graph mode, which cannot be imported "
            f"({exc}); {fix}"
        ) from exc
    config = torchair.CompilerConfig()
    if not hasattr(config, "mode"):  # torchair 6.0.x (it refuses an option it does not have)
        raise ConfigError(f"this torchair's CompilerConfig has no mode (no reduce-overhead); {fix}")
    config.mode = "reduce-overhead"
    return torchair.get_npu_backend(compiler_config=config)


def set_device(choice: DeviceChoice) -> None:
    """Bind this process to its accelerator (before ``init_process_group`` on hccl / nccl)."""
    module = device_module(choice.type)
    if module is not None and choice.index is not None:
        module.set_device(choice.index)


def claim(force: str | None = None) -> torch.device:
    """The device an inference command runs on (``--device``: ``current(force=...)``), made this
    process's current accelerator, so that work torch creates without an index (streams, graphs,
    torch_npu's workspaces) lands on the same card as the model."""
    choice = current(force=force)
    set_device(choice)
    return choice.device


def autocast(choice: DeviceChoice) -> AbstractContextManager[Any]:
    """``torch.autocast`` on the chosen device type in its dtype, or a no-op."""
    if choice.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(choice.type, dtype=choice.autocast_dtype)


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued kernels (for timing); a no-op on CPU."""
    dev = torch.device(device) if device is not None else current().device
    module = device_module(dev.type)
    if module is not None:
        module.synchronize()


def reset_peak_memory(device: torch.device | str) -> None:
    module = device_module(torch.device(device).type)
    if module is not None:
        module.reset_peak_memory_stats()


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Allocated / peak / reserved accelerator memory in MiB; process RSS peak on CPU."""
    dev = torch.device(device)
    module = device_module(dev.type)
    mib = 1024.0 * 1024.0
    if module is None:
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"rss_peak_mib": peak_kib / 1024.0}
    return {
        "allocated_mib": module.memory_allocated(dev) / mib,
        "peak_allocated_mib": module.max_memory_allocated(dev) / mib,
        "reserved_mib": module.memory_reserved(dev) / mib,
    }


def free_memory(device: torch.device | str) -> int | None:
    """Bytes free on the accelerator (its ``mem_get_info``, plus what torch's caching allocator
    holds unused), or the host's available memory for the CPU (``MemAvailable``, or what this
    process's memory cgroup — a container's limit — leaves, if less); None where not known."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda", "npu"):  # mps, xpu, meta, ...: not known here
        return None
    module = device_module(dev.type)
    try:
        if module is not None:
            cached = module.memory_reserved(dev) - module.memory_allocated(dev)
            return int(module.mem_get_info(dev)[0]) + int(cached)
        available = host.meminfo("MemAvailable")
        limit, used = host.cgroup_memory()
        if limit is not None and used is not None and available is not None:
            return max(0, min(available, limit - used))  # (a container's limit binds first)
        return available
    except (OSError, RuntimeError, AttributeError, ValueError):
        return None


def total_memory(device: torch.device | str) -> int | None:
    """Bytes of memory the accelerator has in all (its ``mem_get_info``), or the host's for the CPU
    (``MemTotal``, or this process's memory cgroup limit if lower); None where not known."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda", "npu"):
        return None
    module = device_module(dev.type)
    try:
        if module is not None:
            return int(module.mem_get_info(dev)[1])
        total = host.meminfo("MemTotal")
        limit, _ = host.cgroup_memory()
        return total if limit is None or total is None else min(total, limit)
    except (OSError, RuntimeError, AttributeError, ValueError):
        return None


def device_name(device: torch.device | str) -> str:
    """A human-readable name of the accelerator (or the CPU) for benchmark reports."""
    dev = torch.device(device)
    module = device_module(dev.type)
    if module is None:
        return host.cpu_name()
    return str(module.get_device_name(dev))


def engine_attention(device: torch.device | str) -> AbstractContextManager[Any]:
    """The SDPA back ends a decode engine's forward may take on ``device``: on CUDA every one but
    cuDNN's. torch (2.5 on) tries cuDNN first for a masked SDPA on Hopper and newer, and cuDNN
    builds an execution plan for every new shape — tens of milliseconds each — while an engine's
    steps change shape whenever their rows, blocks or key extent do (a lent H200: steps of 4-5 ms
    with one in ten taking ~40 ms under adaptive drafting, none without it). Flash (unmasked) and
    memory-efficient attention build nothing. Elsewhere, or with ``FLUID_SDPA_CUDNN=1`` in the
    environment (to measure the difference): torch's own choice."""
    if torch.device(device).type != "cuda" or os.environ.get("FLUID_SDPA_CUDNN") == "1":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(backends)


def profiler_activities(device: torch.device | str) -> list[Any]:
    """What ``torch.profiler`` should record for work on ``device``: the host always, the device's
    kernels where torch's profiler reads them (CUDA)."""
    from torch.profiler import ProfilerActivity

    cuda = torch.device(device).type == "cuda"
    return [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]


def empty_cache(device: torch.device | str) -> None:
    module = device_module(torch.device(device).type)
    if module is not None:
        module.empty_cache()


def visible_device_count() -> int:
    """How many accelerators torchrun should use on this node (0 on a CPU-only host)."""
    if is_npu_available():
        return int(torch.npu.device_count())
    if is_cuda_available():
        return torch.cuda.device_count()
    return 0


VISIBLE_DEVICES = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}


def rank_environments(
    kind: str, ranks: int, count: int, environ: Mapping[str, str] | None = None
) -> list[dict[str, str]]:
    """The environment that gives each of ``ranks`` processes one accelerator of ``kind`` (the
    ones already visible, in order: ``ASCEND_RT_VISIBLE_DEVICES`` / ``CUDA_VISIBLE_DEVICES``, else
    the ``count`` the host has); nothing for CPU processes. Fewer devices than ranks is a
    ``ConfigError``."""
    if kind == "cpu":
        return [{} for _ in range(ranks)]
    name = VISIBLE_DEVICES[kind]
    given = (os.environ if environ is None else environ).get(name)
    visible = [d.strip() for d in given.split(",") if d.strip()] if given else [
        str(i) for i in range(count)]  # fmt: skip
    if len(visible) < ranks:
        raise ConfigError(
            f"--data-parallel-size {ranks} runs one engine per {kind} device, and "
            f"{len(visible)} are visible{f' ({name}={given})' if given else ''}: lower it"
        )
    return [{name: visible[r]} for r in range(ranks)]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and every accelerator for a reproducible run."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is a dependency, but seeding must not be what breaks
        pass
    torch.manual_seed(seed)  # also seeds CUDA and, with torch_npu loaded, the NPU generators
    for kind in ("cuda", "npu"):
        module = device_module(kind) if kind == "cuda" and is_cuda_available() else None
        if kind == "npu" and is_npu_available():
            module = torch.npu
        if module is not None:
            module.manual_seed_all(seed)
