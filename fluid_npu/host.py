"""What the host itself has: its memory (``/proc/meminfo``, and the memory cgroup that bounds a
container) and its CPU's name — the CPU side of ``fluid_npu.device``'s memory and naming helpers,
which need no accelerator and no torch.
"""

from __future__ import annotations


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
