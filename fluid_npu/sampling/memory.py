"""How many request slots a share of the device's memory holds: vLLM's ``gpu_memory_utilization``.

vLLM sizes its KV cache from a fraction of the accelerator's memory instead of a request count;
``Scheduler(memory_fraction=F)`` (``fluid serve --gpu-memory-utilization F``,
``LLM(gpu_memory_utilization=F)``) does the same for the engine's slot cache: the model's weights
(the K-head's too) and the cache together take at most ``F`` of the device's total memory (on a
CPU the host's ``MemTotal``, or a container's memory cgroup limit if lower), and the activations
of a step come out of the rest. With no ``max_batch`` the engine gets as many slots as fit (at
most ``MAX_SIZED_BATCH``, as vLLM's usual ``max_num_seqs``; a power of two when the step is
compiled, whose cache has such a size); with one, at most that many — a cap, as vLLM's
``max_num_seqs`` is: fewer, with a warning, when fewer fit. A share that holds not one slot is one
``ConfigError`` naming the sizes and the fix, before anything is allocated. The cache must still
fit the memory free at start (``SlotKV``'s own check, whose error then names the share).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from fluid_npu import device as devices
from fluid_npu.errors import ConfigError
from fluid_npu.sampling.kv import kv_row_bytes

MAX_SIZED_BATCH = 256  # the most slots a share of memory is turned into (vLLM's usual cap)
GIB = 2**30


def module_bytes(modules: Iterable[torch.nn.Module | None]) -> int:
    """Bytes of the parameters and buffers of ``modules`` (each tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if module is None:
            continue
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def engine_slots(
    modules: tuple[torch.nn.Module, torch.nn.Module | None],
    max_batch: int | None,
    fraction: float | None,
    capacity: int,
    dtype: torch.dtype,
    prefix_rows: int = 0,
    power_of_two: bool = False,
) -> int:
    """A ``Scheduler``'s slots: ``max_batch`` as given, or under ``fraction`` (``sized_batch``)
    for the ``modules`` (the model and its K-head, on their device) and cache rows of
    ``capacity`` positions in ``dtype``; neither given is a ``ConfigError``."""
    if fraction is None:
        if max_batch is None:
            raise ConfigError(
                "max_batch=None sizes the slots from memory_fraction (vLLM's "
                "gpu_memory_utilization); give one of them"
            )
        return max_batch
    model = modules[0]
    return sized_batch(
        fraction=fraction, max_batch=max_batch, device=next(model.parameters()).device,
        row_bytes=kv_row_bytes(model, capacity, dtype), weight_bytes=module_bytes(modules),
        prefix_rows=prefix_rows, power_of_two=power_of_two,
    )  # fmt: skip


def sized_batch(
    *,
    fraction: float,
    max_batch: int | None,
    row_bytes: int,
    weight_bytes: int,
    device: torch.device,
    prefix_rows: int = 0,
    power_of_two: bool = False,
) -> int:
    """The engine's slots under ``fraction`` of ``device``'s memory (the module docstring):
    ``row_bytes`` per cache row, ``prefix_rows`` rows beside the slots, the weights already
    loaded. ``max_batch`` None: as many as fit; else at most that many (a warning says when fewer
    fit, as vLLM's ``max_num_seqs`` is a cap)."""
    check_fraction(fraction)
    total = devices.total_memory(device)
    if total is None:
        raise ConfigError(
            f"the total memory of {device} is not known here, so gpu_memory_utilization cannot "
            "size the KV cache; give max_batch (--max-batch / max_num_seqs) without it"
        )
    share = fraction * total
    rows = int((share - weight_bytes) // row_bytes) if share > weight_bytes else 0
    fits = min(rows - prefix_rows, MAX_SIZED_BATCH if max_batch is None else max_batch)
    if power_of_two and fits >= 1 and 1 << (fits - 1).bit_length() > rows - prefix_rows:
        fits = 1 << (fits.bit_length() - 1)  # (a compiled cache's slots are a power of two)
    if fits < 1:
        beside = f" beside {prefix_rows} prefix-cache rows" if prefix_rows else ""
        raise ConfigError(
            f"gpu_memory_utilization {fraction} of {device}'s {_size(total)} is {_size(share)}, "
            f"of which the weights take {_size(weight_bytes)}; a KV-cache row (one slot's keys "
            f"and values) takes {_size(row_bytes)}, so not one slot fits{beside}; raise "
            "gpu_memory_utilization, or lower max_len (--max-len / max_model_len) or "
            "--prefix-cache-slots"
        )
    if max_batch is not None and fits < max_batch:
        warnings.warn(
            f"max_batch {max_batch}: gpu_memory_utilization {fraction} holds {fits} slots of "
            f"{_size(row_bytes)} beside the weights, so {fits} requests run at once",
            stacklevel=3,
        )
    return fits


def check_fraction(fraction: float) -> None:
    """A ``ConfigError`` unless ``fraction`` is a share in (0, 1]."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(
            f"gpu_memory_utilization must be in (0, 1], got {fraction}: the share of the "
            "device's memory the weights and the KV cache may take"
        )


def short_of_free(fraction: float) -> str:
    """What to do when a cache sized by ``fraction`` does not fit the memory free now."""
    return (
        f"gpu_memory_utilization {fraction} asks for more than is free now (another process "
        "holds the rest, or the host has less available): lower it, or give max_batch without it"
    )


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"
