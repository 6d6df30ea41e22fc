"""What a run really did: its parallelism as observed after the set-up, and its throughput.

* ``observe_parallelism`` looks at the model the Trainer actually trains (``model_wrapped``) once
  training has started: the wrapper class (``DistributedDataParallel``,
  ``FullyShardedDataParallel`` / ``FSDPModule``, ``DeepSpeedEngine``, or none), the ZeRO stage the
  engine runs, and the fraction of the parameters this process holds — 1.0 when they are
  replicated, about ``1 / world_size`` when they are sharded. Next to it stand the keys that asked
  for it (``deepspeed``, ``fsdp``), so a key that had no effect is visible in ``run.json``.
* ``Throughput`` counts the main-stream and expanded (main + MASK slot) tokens every training step
  sees and the peak device memory (host RSS on a CPU); ``FluidTrainer`` logs the rates at every
  logging step, summed over the processes, and ``run.json`` carries the whole-run figures.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fluid_npu import device as devices
from fluid_ops.meta import MAIN, PAD


def observe_parallelism(trainer: Any, requested: dict[str, Any]) -> dict[str, Any]:
    """``{"world_size", "wrapper", "zero_stage", "local_param_fraction", …}`` of a started run."""
    wrapped = trainer.model_wrapped
    inner = trainer.model
    name = type(wrapped).__name__
    try:
        from torch.distributed.fsdp import FSDPModule

        fsdp2 = isinstance(wrapped, FSDPModule)  # fully_shard changes the model in place
    except ImportError:  # an older torch without FSDP2
        fsdp2 = False
    if fsdp2:
        name = f"FSDPModule ({name})"
    zero_stage = None
    if hasattr(wrapped, "zero_optimization_stage"):  # a DeepSpeedEngine
        zero_stage = int(wrapped.zero_optimization_stage())
    local, full = _param_counts(wrapped)
    return {
        "world_size": int(trainer.args.world_size),
        "wrapper": name if fsdp2 or wrapped is not inner else None,
        "zero_stage": zero_stage,
        "local_param_fraction": round(local / full, 4) if full else None,
        "requested": {k: v for k, v in requested.items() if v not in (None, "", False, [])},
    }


def _param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """Elements of ``model``'s parameters held by this process, and in the whole model."""
    local = full = 0
    for param in model.parameters():
        here = param.numel()
        if hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3: the partition is ds_tensor
            here = param.ds_tensor.numel() if hasattr(param, "ds_tensor") else 0
            total = int(param.ds_numel)
        elif hasattr(param, "to_local"):  # an FSDP2 DTensor: numel() is the global size
            here = param.to_local().numel()
            total = param.numel()
        elif hasattr(param, "_unpadded_unsharded_size"):  # an FSDP1 FlatParameter
            total = param._unpadded_unsharded_size.numel()
            here = min(here, total)
        else:
            total = here
        local += here
        full += total
    return local, full


class Throughput:
    """Token counts and wall time between logging steps, and over the whole run.

    A micro-batch's counts stay on its device (``count`` adds them up there, no host read in the
    training step); they are read once per log (``interval``)."""

    def __init__(self) -> None:
        self.main: Any = 0.0  # since the last log (a device tensor once a batch is counted)
        self.expanded: Any = 0.0
        self.total_main = self.total_expanded = 0.0
        self.started: float | None = None
        self.last: float | None = None

    def count(self, inputs: dict[str, Any]) -> None:
        """Add one micro-batch (a FLUID layout batch with an ``anchor`` row per example)."""
        now = time.perf_counter()
        if self.started is None:
            self.started = self.last = now
        anchor = inputs.get("anchor")
        if anchor is None:
            return
        self.main = self.main + (anchor == MAIN).sum()
        self.expanded = self.expanded + (anchor != PAD).sum()

    def interval(self, reduce: Any) -> dict[str, float]:
        """Rates since the last call, with ``reduce`` summing token counts over the processes."""
        now = time.perf_counter()
        if self.last is None:
            return {}
        main, expanded = reduce([float(self.main), float(self.expanded)])
        if not expanded:  # no step since the last log: the time in between is not training
            return {}
        seconds = max(now - self.last, 1e-9)
        self.total_main += main
        self.total_expanded += expanded
        self.main = self.expanded = 0.0
        self.last = now
        return {
            "tokens_per_s_main": round(main / seconds, 2),
            "tokens_per_s_expanded": round(expanded / seconds, 2),
        }

    def summary(self, reduce: Any) -> dict[str, float]:
        """The whole run's token rates (what is left since the last log is counted too)."""
        self.interval(reduce)
        if self.started is None or self.last is None:
            return {}
        seconds = max(self.last - self.started, 1e-9)
        return {
            "tokens_main": int(self.total_main),
            "tokens_expanded": int(self.total_expanded),
            "tokens_per_s_main": round(self.total_main / seconds, 2),
            "tokens_per_s_expanded": round(self.total_expanded / seconds, 2),
        }


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """This process's peak memory so far: allocated device memory, or the host RSS on a CPU."""
    stats = devices.memory_stats(device)
    if "peak_allocated_mib" in stats:
        return round(stats["peak_allocated_mib"], 1), "device_allocated"
    return round(stats["rss_peak_mib"], 1), "host_rss"
