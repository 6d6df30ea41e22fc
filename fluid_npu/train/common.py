"""What Stage I and Stage II share: TrainingArguments from the config, a Trainer base that logs
extra loss parts and stops on a non-finite loss, and the atomic final save.

Distribution (torchrun + hccl / nccl / gloo, DeepSpeed, FSDP) is entirely transformers' Trainer and
accelerate: the config's ``deepspeed`` / ``fsdp`` keys are handed to ``TrainingArguments``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from fluid_npu import device as devices
from fluid_npu.config import FluidConfig
from fluid_npu.errors import ConfigError, FluidError
from fluid_npu.train.io import publish_dir, staging_dir


def training_arguments(cfg: FluidConfig, choice: devices.DeviceChoice) -> TrainingArguments:
    """``TrainingArguments`` from the typed config plus pass-through keys."""
    t = cfg.train
    kwargs: dict[str, Any] = dict(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        # transformers 5 folds the ratio into warmup_steps (a float < 1 is a ratio)
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        bf16=t.bf16,
        fp16=t.fp16,
        deepspeed=t.deepspeed,
        fsdp=t.fsdp,
        fsdp_config=t.fsdp_config,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=t.report_to,
        gradient_checkpointing=t.gradient_checkpointing,
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,
        use_cpu=choice.type == "cpu",
        ddp_find_unused_parameters=False,
    )
    if t.deepspeed is not None and not Path(t.deepspeed).is_file():
        raise ConfigError(
            f"deepspeed config {t.deepspeed!r} does not exist; point it at a JSON file"
        )
    kwargs.update(cfg.extra_training_args)
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError, ImportError) as exc:
        raise ConfigError(f"invalid training arguments: {exc}") from None


class FluidTrainer(Trainer):
    """A Trainer whose ``compute_loss`` returns named parts; they are logged as running means, and
    a non-finite loss stops the run (the last saved checkpoint stays the last good one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False  # our losses are per-micro-batch means: scale for GA
        self._part_sums: dict[str, float] = defaultdict(float)
        self._part_counts: dict[str, int] = defaultdict(int)
        self.last_parts: dict[str, float] = {}

    def record_parts(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        values = {k: float(v.detach()) for k, v in parts.items()}
        value = float(loss.detach())
        if not math.isfinite(value):
            last = _last_checkpoint(self.args.output_dir)
            raise FluidError(
                f"the loss became {value} at step {self.state.global_step}; the run stopped and "
                f"the last good checkpoint is {last or 'none (no checkpoint was saved yet)'}. "
                "Lower learning_rate, or check the data and bf16/fp16 settings"
            )
        for key, v in values.items():
            if math.isfinite(v):
                self._part_sums[key] += v
                self._part_counts[key] += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for key, total in self._part_sums.items():
                if self._part_counts[key]:
                    logs[key] = round(total / self._part_counts[key], 6)
            self.last_parts = {k: v for k, v in logs.items() if k in self._part_sums}
            self._part_sums.clear()
            self._part_counts.clear()
        super().log(logs, *args, **kwargs)


def _last_checkpoint(output_dir: str | None) -> str | None:
    if not output_dir or not Path(output_dir).is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir)


def save_final(trainer: Trainer, tokenizer: Any, output_dir: Path, extra: list[Any]) -> None:
    """Save the model / adapter, tokenizer and metadata objects atomically into ``output_dir``.

    ``extra`` holds objects with a ``save(directory)`` method (e.g. ``FluidModelMeta``).
    Only the main process writes.
    """
    if not trainer.is_world_process_zero():
        trainer.save_model(str(output_dir))  # collective under DeepSpeed / FSDP; rank 0 writes
        return
    stage = staging_dir(output_dir)
    trainer.save_model(str(stage))
    tokenizer.save_pretrained(str(stage))
    for item in extra:
        item.save(stage)
    publish_dir(stage, output_dir)
