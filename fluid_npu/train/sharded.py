"""What ZeRO-3 and FSDP need from the FLUID losses: the LM head used through its own forward.

The fused losses (``fluid_ops.linear_cross_entropy`` / ``token_stats``) read ``lm_head.weight``
instead of calling the head, so ``[T, V]`` logits never exist. Under DeepSpeed ZeRO-3, or FSDP2 with
the head in its own group, that attribute is only this process's shard (an empty partition, a
``DTensor``) until the head's *forward* runs: the wrappers gather a module's parameters in hooks
around its forward and regather them for its backward. ``through_forward`` therefore runs the fused
computation *as* the head's forward — the module's ``forward`` is swapped for that one call — so
every wrapper gathers, frees and reduces the head exactly as for ``head(hidden)``, without the
logits. With plain or DDP-replicated weights the hooks do nothing and the call costs nothing extra.

Stage II's frozen backbone is not handed to the Trainer: every process keeps a whole copy, and
``unpartitioned_loading`` keeps transformers from loading it ZeRO-3-partitioned (``zero.Init``)
when the run's DeepSpeed config is stage 3.

The ``fsdp`` key: ``fsdp_arguments`` turns LLaMA-Factory's ``"full_shard auto_wrap"`` strings
(deprecated in transformers 5) into ``fsdp=True`` plus ``fsdp_config`` options, and
``enable_fsdp_on_cpu_processes`` makes it take effect on CPU processes (gloo), where accelerate
would silently train under DDP instead; its checkpoints save and resume there without rank-0
broadcasts (``full_state_resume_everywhere``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from fluid_npu.errors import ConfigError

T = TypeVar("T")
FSDP_MODEL_NAME = "pytorch_model_fsdp"  # accelerate's names for a FULL_STATE_DICT checkpoint
OPTIMIZER_NAME = "optimizer"


def through_forward(module: nn.Module, fn: Callable[..., T], *args: Any) -> T:
    """``fn(module, *args)`` run as ``module``'s forward, so sharding hooks gather its weights."""
    previous = module.__dict__.get("forward")
    module.forward = lambda *inner: fn(module, *inner)
    try:
        return module(*args)
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


@contextmanager
def unpartitioned_loading() -> Iterator[None]:
    """Inside: ``from_pretrained`` loads whole weights even when the run uses ZeRO-3."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers always has the module
        yield
        return
    active = hf_deepspeed.is_deepspeed_zero3_enabled()
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref if active else None
    if active:
        hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if active:
            hf_deepspeed._hf_deepspeed_config_weak_ref = saved


@contextmanager
def full_state_resume_everywhere() -> Iterator[None]:
    """Inside: resuming an FSDP2 checkpoint reads its full state on every process.

    accelerate loads a ``FULL_STATE_DICT`` checkpoint on rank 0 and broadcasts it; with CPU
    processes (gloo) the other ranks skip that broadcast and the run deadlocks. Each process
    reading the (small: CPU-sized) file itself and keeping its own shard needs no broadcast.
    """
    import transformers.trainer as hf_trainer

    saved = hf_trainer.load_fsdp_model, hf_trainer.load_fsdp_optimizer
    hf_trainer.load_fsdp_model = _load_model_everywhere
    hf_trainer.load_fsdp_optimizer = _load_optimizer_everywhere
    try:
        yield
    finally:
        hf_trainer.load_fsdp_model, hf_trainer.load_fsdp_optimizer = saved


def _load_model_everywhere(
    plugin: Any, accelerator: Any, model: Any, input_dir: str, *a: Any, **k: Any
) -> Any:
    import torch
    from accelerate.utils import fsdp_utils
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    path = Path(input_dir) / f"{FSDP_MODEL_NAME}.bin"
    if not path.is_file():
        return fsdp_utils.load_fsdp_model(plugin, accelerator, model, input_dir, *a, **k)
    state = torch.load(path, weights_only=True, map_location="cpu")
    options = StateDictOptions(full_state_dict=True, strict=False)
    return set_model_state_dict(model, state, options=options)


def _load_optimizer_everywhere(
    plugin: Any, accelerator: Any, optimizer: Any, model: Any, input_dir: str, *a: Any, **k: Any
) -> None:
    import torch
    from accelerate.utils import fsdp_utils
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    path = Path(input_dir) / f"{OPTIMIZER_NAME}.bin"
    if not path.is_file():
        fsdp_utils.load_fsdp_optimizer(plugin, accelerator, optimizer, model, input_dir, *a, **k)
        return
    state = torch.load(path, weights_only=True, map_location="cpu")
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def fsdp_arguments(fsdp: bool | str | list[str], config: str | None) -> dict[str, Any]:
    """``fsdp`` / ``fsdp_config`` for ``TrainingArguments``, LLaMA-Factory's strings translated.

    ``fsdp: "full_shard auto_wrap"`` (LLaMA-Factory, older transformers) is deprecated in
    transformers 5: it becomes ``fsdp=True`` with the options in ``fsdp_config`` — ``full_shard`` /
    ``shard_grad_op`` as FSDP2's ``reshard_after_forward`` true / false, ``offload`` as
    ``cpu_offload``; ``auto_wrap`` is the default. An option FSDP2 lacks names the key to change.
    """
    if not fsdp:
        return {"fsdp": False, "fsdp_config": config}
    options: dict[str, Any] = {}
    if config is not None:
        try:
            options = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"fsdp_config {config!r} is not readable JSON ({exc})") from None
    words = fsdp.split() if isinstance(fsdp, str) else [] if fsdp is True else list(fsdp)
    version = int(options.get("version", 2))
    for word in (w.lower() for w in words):
        if word in ("true", "auto_wrap"):
            continue
        if word == "offload":
            options.setdefault("cpu_offload", True)
        elif version == 2 and word in ("full_shard", "shard_grad_op"):
            options.setdefault("reshard_after_forward", word == "full_shard")
        elif version == 1 and word.upper() in FSDP1_STRATEGIES:
            options.setdefault("reshard_after_forward", word)
        else:
            raise ConfigError(
                f"fsdp: {word!r} is not an FSDP{version} option; use full_shard, shard_grad_op, "
                "offload or auto_wrap (other strategies need version: 1 in fsdp_config)"
            )
    return {"fsdp": True, "fsdp_config": options}


FSDP1_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")


def enable_fsdp_on_cpu_processes(trainer: Any) -> bool:
    """Honour ``fsdp`` on CPU processes, where accelerate silently falls back to DDP.

    accelerate turns FSDP on only for accelerator back ends, so two gloo processes with
    ``fsdp: full_shard`` would train replicated under DistributedDataParallel. FSDP2
    (``fully_shard``) runs on gloo, so the plugin transformers built from the config is
    installed here as accelerate would on a GPU; FSDP1 needs an accelerator and says so.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    plugin_args = trainer.args.fsdp_plugin_args
    if trainer.is_fsdp_enabled or plugin_args is None:
        return False
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if plugin.fsdp_version != 2:
        raise ConfigError(
            "fsdp on CPU processes needs FSDP2 (torch's fully_shard): set version: 2 in "
            "fsdp_config (FSDP1 runs only on an accelerator)"
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    trainer.accelerator.get_state_dict = _full_state_dict_on_cpu
    return True


def _full_state_dict_on_cpu(model: torch.nn.Module, unwrap: bool = True) -> dict[str, torch.Tensor]:
    """The whole FSDP2 state dict for CPU processes, as fresh tensors on every process.

    accelerate asks for it with ``cpu_offload=True``, which on tensors already on the CPU returns
    views of FSDP's freed all-gather buffers (safetensors then fails on an "invalid python
    storage"); gathering without the offload returns tensors of their own.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=options).items()}
