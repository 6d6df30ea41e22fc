"""Training precision as LLaMA-Factory does it: fp32 trainable weights under mixed precision.

A checkpoint's own dtype never decides how a run trains (transformers 5 loads ``dtype="auto"``, so
a bf16 checkpoint would otherwise train in pure bf16, where AdamW updates below ~4e-3 of a weight
round away). The rule:

* ``bf16: true`` / ``fp16: true`` — mixed precision: the frozen weights (the LoRA base, Stage II's
  backbone) are stored in that compute dtype, every trainable parameter (full fine-tuning, LoRA, the
  MASK embedding row, the K-head) in fp32, and the forward runs under autocast;
* ``pure_bf16: true`` — everything in bf16, trainable parameters included, no autocast (half the
  optimizer memory, the updates of a pure bf16 run);
* neither — fp32 throughout.

Under DeepSpeed ZeRO-3 the loaded weights are partitions DeepSpeed stores in its config's dtype
(``zero.Init``), keeping fp32 master weights in its optimizer: a full fine-tune's trainable weights
stay in that dtype, and the ones loading did not partition (an embedding and head resized for an
added MASK token) join them, as stage 3's optimizer takes one dtype.

``Precision.observe`` reads the dtypes back from the model, so ``run.json`` states what really
trained, not what was asked for.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from fluid_npu import device as devices
from fluid_npu.device import DeviceChoice
from fluid_npu.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """How a run stores and computes: ``mode`` is ``fp32``, ``bf16``, ``fp16`` or ``pure_bf16``."""

    mode: str
    compute_dtype: torch.dtype  # frozen weights and the forward's matmuls
    trainable_dtype: torch.dtype  # the parameters the optimizer updates

    @property
    def autocast(self) -> bool:
        """Whether the Trainer runs the forward under autocast (bf16 / fp16 mixed precision)."""
        return self.mode in ("bf16", "fp16")

    def load_dtype(self, finetuning_type: str) -> torch.dtype:
        """The dtype to load a base in: full fine-tuning trains every weight, LoRA freezes them."""
        return self.trainable_dtype if finetuning_type == "full" else self.compute_dtype

    def cast_trainable(self, model: torch.nn.Module) -> None:
        """Store every trainable floating-point parameter of ``model`` in ``trainable_dtype`` or,
        where some are ZeRO-3 partitions, in theirs (DeepSpeed's; see the module docstring)."""
        params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
        partitioned = [_partition(p).dtype for p in params if _partition(p) is not None]
        dtype = partitioned[0] if partitioned else self.trainable_dtype
        for param in params:
            if _partition(param) is None and param.dtype != dtype:
                param.data = param.data.to(dtype)

    def observe(self, model: torch.nn.Module) -> dict[str, Any]:
        """The run's precision as the model's parameters show it (for ``run.json``)."""
        trainable: Counter[str] = Counter()
        frozen: Counter[str] = Counter()
        for param in model.parameters():  # ds_numel: the whole size of a ZeRO-3 partition
            count = int(getattr(param, "ds_numel", param.numel()))
            # a ZeRO-3 partition's dtype, not its empty placeholder's
            dtype = (_partition(param) if _partition(param) is not None else param).dtype
            (trainable if param.requires_grad else frozen)[_name(dtype)] += count
        return {
            "mode": self.mode,
            "compute_dtype": _name(self.compute_dtype),
            "autocast": self.autocast,
            "trainable_params": dict(trainable),
            "frozen_params": dict(frozen),
        }


def observe_trained(precision: Precision, model: torch.nn.Module, trainer: Any) -> dict[str, Any]:
    """The run's precision as training left it (``run.json``). Under DeepSpeed the engine decides:
    with its bf16 / fp16 enabled it holds the module in that dtype (what ``save_model`` writes;
    the float32 master weights live in its optimizer) and the Trainer runs without autocast."""
    record = precision.observe(model)
    engine = getattr(trainer, "model_wrapped", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and hasattr(engine, "bfloat16_enabled"):
        half = engine.bfloat16_enabled() or engine.fp16_enabled()
        record["autocast"] = False
        record["deepspeed_mixed_precision"] = (
            "bfloat16" if engine.bfloat16_enabled() else "float16" if half else None
        )
        record["master_weights"] = "float32 (DeepSpeed's optimizer)" if half else None
    return record


def _partition(param: torch.Tensor) -> torch.Tensor | None:
    """A ZeRO-3 parameter's partition (what it really stores), None for a plain tensor."""
    return getattr(param, "ds_tensor", None)


def device_choice(train: Any, force: str | None = None) -> DeviceChoice:
    """The device of a run and its autocast dtype: bf16 when ``bf16`` *or* ``pure_bf16`` asks for
    it (a pure bf16 run needs a bf16 device as much as a mixed one), fp16 for ``fp16``."""
    return devices.current(
        want_bf16=train.bf16 or train.pure_bf16, want_fp16=train.fp16, force=force
    )


def resolve_precision(train: Any, choice: DeviceChoice) -> Precision:
    """The precision of a run from its ``bf16`` / ``fp16`` / ``pure_bf16`` keys and the device.

    ``train`` is the config's ``TrainArgs`` (``deepspeed`` is read too: pure bf16 excludes it).
    """
    bf16, fp16, pure_bf16 = train.bf16, train.fp16, train.pure_bf16
    deepspeed = train.deepspeed
    if pure_bf16:  # (pure_bf16 with fp16 is refused by the config itself)
        if choice.type != "cpu" and choice.autocast_dtype != torch.bfloat16:
            raise ConfigError(
                f"pure_bf16: this {choice.type} device does not support bf16; use fp16: true "
                "(mixed precision) instead"
            )
        if deepspeed is not None:
            raise ConfigError(
                "pure_bf16 cannot be combined with deepspeed (DeepSpeed's bf16 mode keeps its own "
                "fp32 master weights): use bf16: true, or remove the deepspeed key"
            )
        return Precision("pure_bf16", torch.bfloat16, torch.bfloat16)
    mode = mixed_mode(train, choice)
    asked = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    if mode != asked:  # (run.json's precision records what ran)
        logger.warning(
            "%s: true, but this %s device trains in %s%s", asked, choice.type, mode,
            " (no float16 autocast on a CPU: bf16: true there)" if choice.type == "cpu" else "",
        )  # fmt: skip
    if mode == "fp32":
        return Precision("fp32", torch.float32, torch.float32)
    return Precision(mode, choice.autocast_dtype, torch.float32)


def mixed_mode(train: Any, choice: DeviceChoice) -> str:
    """The Trainer's mixed precision, ``bf16`` or ``fp16`` (``fp32``: none, as under
    ``pure_bf16``): the device's autocast dtype where ``bf16`` or ``fp16`` asks for one — an
    accelerator without bf16 runs ``bf16: true`` in fp16, a CPU runs ``fp16: true`` in fp32."""
    if train.pure_bf16 or not (train.bf16 or train.fp16) or choice.autocast_dtype is None:
        return "fp32"
    return "bf16" if choice.autocast_dtype == torch.bfloat16 else "fp16"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
