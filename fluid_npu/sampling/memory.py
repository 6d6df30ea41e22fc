"""How many request slots a share of the device's memory holds: vLLM's ``gpu_memory_utilization``.

vLLM sizes its KV cache from a fraction of the accelerator's memory instead of a request count;
``Scheduler(memory_fraction=F)`` (``fluid serve --gpu-memory-utilization F``,
``LLM(gpu_memory_utilization=F)``) does the same for the engine's slot cache: the model's weights
(the K-head's too) and the cache together take at most ``F`` of the device's total memory (the
host's ``MemTotal`` on a CPU), and the activations of a step come out of the rest. With no
``max_batch`` the engine gets as many slots as fit (at most ``MAX_SIZED_BATCH``, vLLM's default
``max_num_seqs``; a power of two when the step is compiled, whose cache has such a size); with one,
that many must fit. Either way a share too small is one ``ConfigError`` naming the sizes and the
fix, before anything is allocated. The cache must still fit the memory free at start
(``SlotKV``'s own check).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fluid_npu import device as devices
from fluid_npu.errors import ConfigError

MAX_SIZED_BATCH = 256  # the most slots a share of memory is turned into (vLLM's max_num_seqs)
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
    loaded. ``max_batch`` None: as many as fit; else checked to fit (and returned)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(
            f"gpu_memory_utilization must be in (0, 1], got {fraction}: the share of the "
            "device's memory the weights and the KV cache may take"
        )
    total = devices.total_memory(device)
    if total is None:
        raise ConfigError(
            f"the total memory of {device} is not known here, so gpu_memory_utilization cannot "
            "size the KV cache; give max_batch (--max-batch) without it"
        )
    share = fraction * total
    rows = int((share - weight_bytes) // row_bytes) if share > weight_bytes else 0
    told = (
        f"gpu_memory_utilization {fraction} of {device}'s {total / GIB:.2f} GiB is "
        f"{share / GIB:.2f} GiB, of which the weights take {weight_bytes / GIB:.2f} GiB; a "
        f"KV-cache row (one slot's keys and values) takes {row_bytes / GIB:.3f} GiB, so {rows} "
        "rows fit"
    )
    if max_batch is None:
        slots = min(rows - prefix_rows, MAX_SIZED_BATCH)
        if slots < 1:
            raise ConfigError(
                f"{told}: no slot beside {prefix_rows} prefix-cache rows; raise "
                "gpu_memory_utilization, or lower max_len (--max-len) or --prefix-cache-slots"
            )
        return 1 << (slots.bit_length() - 1) if power_of_two else slots
    need = (1 << (max_batch - 1).bit_length() if power_of_two else max_batch) + prefix_rows
    if need > rows:
        rounded = ", the slots rounded up to a power of two: compiled" if power_of_two else ""
        raise ConfigError(
            f"{told}, and max_batch {max_batch} needs {need} (with {prefix_rows} prefix-cache "
            f"rows{rounded}); raise gpu_memory_utilization, lower max_batch (--max-batch) or "
            "max_len (--max-len), or leave max_batch out to get as many slots as fit"
        )
    return max_batch
