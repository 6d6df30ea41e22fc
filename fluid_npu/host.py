"""What the host itself has: its memory (``/proc/meminfo``, and the memory cgroup that bounds a
container) and its CPU's name — the CPU side of ``fluid_npu.device``'s memory and naming helpers,
which need no accelerator and no torch — and the process's garbage collector, set for serving.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
from collections.abc import Iterator

GC_FREEZE_ENV = "FLUID_GC_FREEZE"  # "0": leave the garbage collector as it is


def freeze_heap() -> int:
    """Once a server is built: collect, then move every object alive into the collector's
    permanent generation, which it never scans again (what vLLM's ``freeze_gc_heap`` does after
    its start-up) — the model's modules, torch's and transformers' module data: ~430,000 objects
    for the demo model, whose full collections paused the whole process, the engine's thread too,
    80–170 ms every few seconds under load on this project's CPU. ``$FLUID_GC_FREEZE=0`` skips it.
    Returns how many objects the permanent generation holds."""
    if os.environ.get(GC_FREEZE_ENV, "1") == "0":
        return gc.get_freeze_count()
    gc.collect()  # (first: garbage frozen now could never be reclaimed)
    gc.freeze()
    # at exit the frozen objects go back to the collector: left frozen, the interpreter's last
    # collection skips them and extensions report them as leaked (triton's nanobind: ~60 lines)
    atexit.unregister(gc.unfreeze)  # (once, however often it is called)
    atexit.register(gc.unfreeze)
    return gc.get_freeze_count()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """``freeze_heap`` for the block, undone after it (a load generator: its own full collections
    would stall every client at once and show up as the server's latency)."""
    was = gc.get_freeze_count()
    freeze_heap()
    try:
        yield
    finally:
        if not was:  # (a process frozen before keeps its own freeze)
            gc.unfreeze()


def meminfo(key: str) -> int | None:
    """A ``/proc/meminfo`` figure in bytes (None where there is none)."""
    with open("/proc/meminfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def cgroup_memory(
    proc: str = "/proc/self/cgroup", mount: str = "/sys/fs/cgroup"
) -> tuple[int | None, int | None]:
    """This process's memory cgroup limit and usage in bytes (v2 ``memory.max`` /
    ``memory.current``, v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``): what a
    container may use, which ``/proc/meminfo`` does not know. (None, None) without a limit."""
    try:
        with open(proc, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None, None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            names, root = ("memory.max", "memory.current"), mount
        elif "memory" in controllers.split(","):
            names, root = ("memory.limit_in_bytes", "memory.usage_in_bytes"), f"{mount}/memory"
        else:
            continue
        for where in (root + path.rstrip("/"), root):  # its own group, else the mount's root
            try:
                with open(f"{where}/{names[0]}", encoding="utf-8") as fh:
                    limit_text = fh.read().strip()
                with open(f"{where}/{names[1]}", encoding="utf-8") as fh:
                    used = int(fh.read().strip())
            except (OSError, ValueError):
                continue
            if limit_text == "max" or int(limit_text) >= 1 << 60:  # (v1's "none": ~2^63)
                return None, used
            return int(limit_text), used
    return None, None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"
