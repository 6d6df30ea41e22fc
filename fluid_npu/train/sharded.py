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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

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
