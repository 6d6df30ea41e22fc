"""DeepSpeed set up for a FLUID run, beside what transformers' Trainer does: the config file
checked before anything loads, the CPU accelerator and no JIT-built collective on CPU processes,
DeepSpeed's communication layer joined there (ZeRO-3's partitioned loading), and the hidden-size
``"auto"`` entries Stage II's model cannot fill itself."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from transformers import TrainingArguments

from fluid_npu.errors import ConfigError


def fill_hidden_size_autos(args: TrainingArguments, hidden_size: int) -> None:
    """DeepSpeed's hidden-size ``"auto"`` entries (``reduce_bucket_size``; ZeRO-3's prefetch
    bucket and persistence threshold), filled as transformers fills them from ``model.config`` —
    which Stage II's objective (the K-head around a frozen backbone) does not have: without this,
    a ZeRO-2 config such as ``configs/ds_z2.json`` or LLaMA-Factory's stops Stage II when the
    Trainer starts."""
    ds = getattr(args, "hf_deepspeed_config", None)
    if ds is None:
        return
    ds.fill_only("zero_optimization.reduce_bucket_size", hidden_size * hidden_size)
    if ds.is_zero3():
        ds.fill_only("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size**2))
        ds.fill_only("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size)


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def deepspeed_on_cpu() -> None:
    """DeepSpeed for a run on the CPU.

    Its accelerator is the CPU's: DeepSpeed takes the NPU's wherever torch_npu imports, device or
    not (a CANN container with no NPU visible, or ``device: cpu`` on an Ascend host), and then
    sets an NPU device that is not there. DeepSpeed keeps the accelerator it first chooses for the
    whole process, so it is chosen here with ``$DS_ACCELERATOR`` set to ``cpu`` for that moment
    only (a value the user set is kept; nothing is left for later runs or child processes).

    On a CPU it JIT-compiles a shared-memory all-reduce when it sets up its process group (about
    30 s on two cores, and it needs a C++ compiler). Only its inference all-reduce (tensor-parallel
    inference) calls it; ZeRO training reduces through torch.distributed (gloo), so the build is
    skipped by marking the op unavailable, which DeepSpeed's own check reads."""
    given = os.environ.get("DS_ACCELERATOR")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.accelerator import get_accelerator

        chosen = get_accelerator().device_name()
    finally:
        if given is None:
            os.environ.pop("DS_ACCELERATOR", None)
    if given is None and chosen != "cpu":
        raise ConfigError(
            f"DeepSpeed already chose its {chosen!r} accelerator in this process, and this run is "
            "on the CPU: start the run in a new process (or set DS_ACCELERATOR=cpu before "
            "DeepSpeed is first imported)"
        )
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def join_deepspeed_comm(args: TrainingArguments) -> None:
    """DeepSpeed's communication layer over the run's process group, on CPU processes.

    On an accelerator accelerate starts the processes through ``deepspeed.comm``; on a CPU it
    starts plain gloo and leaves DeepSpeed's layer uninitialised, so ZeRO-3's ``zero.Init`` (which
    transformers enters to load the model partitioned) reads a world size of 1 and refuses an
    ``"auto"`` ``train_batch_size`` the Trainer filled for every process (LLaMA-Factory's ZeRO
    configs and ``configs/ds_z2.json`` have one)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # (one process: nothing to communicate)
        return
    _ = args.device  # (the process group is set up with the arguments' devices)
    if not (dist.is_available() and dist.is_initialized()):
        return
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def check_deepspeed_config(path: str) -> None:
    """The ``deepspeed`` key names a readable JSON file and the deepspeed package is installed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed config {path!r} does not exist; point it at a JSON file")
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"deepspeed config {path!r} is not valid JSON ({exc})") from None
    zero = ds.get("zero_optimization") if isinstance(ds, dict) else None
    zero = zero if isinstance(zero, dict) else {}
    gather = zero.get("stage3_gather_16bit_weights_on_model_save")
    if str(zero.get("stage")) == "3" and gather not in (True, "true", "auto"):
        # (without it the Trainer saves only DeepSpeed's shards: no adapter, model or K-head
        # weights in the output or a checkpoint-N, and Stage II's final save fails)
        raise ConfigError(
            f"deepspeed config {path!r}: ZeRO stage 3 without "
            '"stage3_gather_16bit_weights_on_model_save": true saves only sharded weights, and '
            "a FLUID run's outputs are whole weights; set it to true in zero_optimization"
        )
    if not deepspeed_available():
        raise ConfigError(
            f"deepspeed: {path} is set but the deepspeed package is not installed; install it "
            "(pip install -e '.[deepspeed]', which works on Ascend too) or remove the key"
        )
