"""What Stage I and Stage II share: TrainingArguments from the config, a Trainer base that logs
extra loss parts and stops on a non-finite loss, crash-safe checkpoints, and the atomic final save.

Distribution (torchrun + hccl / nccl / gloo, DeepSpeed, FSDP) is entirely transformers' Trainer and
accelerate: the config's ``deepspeed`` / ``fsdp`` keys are handed to ``TrainingArguments``. What
``FluidTrainer`` adds for it:

* ``run_objective`` runs a stage's loss *inside* the wrapped model's forward (the DDP / FSDP /
  DeepSpeed wrapper, or accelerate's autocast wrapper on one device), so gradient synchronisation,
  parameter gathering and mixed precision see the computation exactly as for ``model(**inputs)``;
* loss parts (``loss_ar``, ``loss_diff``, …) are averaged over all processes before they are logged,
  for training and for the held-out evaluation (``eval_loss_ar``, …), with the token rates and peak
  memory of ``fluid_npu.train.report``; ``run_figures`` gives ``run.json`` the observed parallelism;
* ``fsdp`` takes effect on CPU processes too (``fluid_npu.train.sharded``), and so does ZeRO-3's
  partitioned loading (``fluid_npu.train.deepspeed_setup``: accelerate starts DeepSpeed's
  communication layer only for accelerator processes);
* ``checkpoint-N`` directories appear atomically and a resume is validated first
  (``fluid_npu.train.checkpoint``); ``checkpoint_files`` (a stage's metadata, e.g.
  ``fluid_model.json``) are written into each, so a checkpoint is usable like the final output.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import TrainOutput, rotate_checkpoints

from fluid_npu import device as devices
from fluid_npu.config import FluidConfig
from fluid_npu.data.template_export import TRAINED_TEMPLATE
from fluid_npu.errors import ConfigError, FluidError
from fluid_npu.io import FINAL_STAGING, publish_dir
from fluid_npu.model.legacy_config import add_legacy_keys
from fluid_npu.train.checkpoint import (
    PREFIX,
    last_complete_checkpoint,
    publish_checkpoint,
    remove_stale_staging,
    resolve_resume,
    staging_root,
)
from fluid_npu.train.data import evaluation_arguments, has_eval_split
from fluid_npu.train.deepspeed_setup import (
    check_deepspeed_config,
    deepspeed_on_cpu,
    join_deepspeed_comm,
)
from fluid_npu.train.precision import mixed_mode
from fluid_npu.train.report import Throughput, observe_parallelism, peak_memory_mib
from fluid_npu.train.run_shape import record_batch
from fluid_npu.train.sharded import (
    enable_fsdp_on_cpu_processes,
    fsdp_arguments,
    full_state_resume_everywhere,
)

Parts = dict[str, torch.Tensor]
Objective = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, Parts]]


def training_arguments(
    cfg: FluidConfig,
    choice: devices.DeviceChoice,
    *,
    evaluate: bool = True,
    held_out: bool | None = None,
) -> TrainingArguments:
    """``TrainingArguments`` from the typed config plus pass-through keys.

    ``evaluate``: the held-out split is evaluated every ``eval_steps``
    (``fluid_npu.train.data.evaluation_arguments``). ``held_out``: whether the run has held-out
    data; None leaves it to the config (``val_size`` / ``eval_dataset``, Stage I's rule).
    """
    t = cfg.train
    mixed = mixed_mode(t, choice)
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
        # what the device runs (precision.py): bf16 on one without it falls back to fp16
        bf16=mixed == "bf16",
        fp16=mixed == "fp16",
        deepspeed=t.deepspeed,
        **fsdp_arguments(t.fsdp, t.fsdp_config),
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=t.report_to,
        # transformers 5.24 renamed it (gradient_checkpointing stays our config key)
        activation_checkpointing=t.gradient_checkpointing,
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,
        use_cpu=choice.type == "cpu",
        ddp_find_unused_parameters=False,
    )
    if t.deepspeed is not None:
        check_deepspeed_config(t.deepspeed)
        if choice.type == "cpu":
            deepspeed_on_cpu()
    kwargs.update(cfg.extra_training_args)
    if evaluate:
        held = has_eval_split(cfg) if held_out is None else held_out
        kwargs.update(evaluation_arguments(cfg, held))
    stage1 = cfg.fluid.stage == "fluid_stage1"
    if kwargs.get("torch_compile") and stage1 and cfg.model.loss_impl != "reference":
        raise ConfigError(
            "torch_compile: true cannot trace Stage I's fused loss (loss_impl auto / fused runs "
            "the LM head through a forward it swaps in for the call); set loss_impl: reference "
            "with it, or leave torch_compile out"
        )
    check_report_to(kwargs.get("report_to"))
    try:
        args = TrainingArguments(**kwargs)
    except (ValueError, TypeError, ImportError) as exc:
        raise ConfigError(f"invalid training arguments: {exc}") from None
    if t.deepspeed is not None and choice.type == "cpu":
        join_deepspeed_comm(args)
    return args


def check_report_to(report_to: str | list[str] | None) -> None:
    """Each ``report_to`` integration known to transformers and, where transformers can tell,
    installed: checked before the model loads (the Trainer would only find out after)."""
    from transformers.integrations import integration_utils as hf

    for name in [report_to] if isinstance(report_to, str) else report_to or []:
        if name in ("none", "all"):
            continue
        if name not in hf.INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(hf.INTEGRATION_TO_CALLBACK))
            raise ConfigError(f"report_to {name!r} is not an integration transformers knows "
                              f"({known}, or none)")  # fmt: skip
        check = getattr(hf, _AVAILABLE.get(name, ""), None)  # (none known: the Trainer tells)
        if check is not None and not check():
            raise ConfigError(
                f"report_to {name!r}: its package is not installed here; install it or set "
                "report_to: none"
            )


# report_to name -> transformers' check that its package is installed
_AVAILABLE = {
    "azure_ml": "is_azureml_available", "comet_ml": "is_comet_available",
    "dagshub": "is_dagshub_available", "dvclive": "is_dvclive_available",
    "mlflow": "is_mlflow_available", "neptune": "is_neptune_available",
    "tensorboard": "is_tensorboard_available", "wandb": "is_wandb_available",
    "codecarbon": "is_codecarbon_available", "clearml": "is_clearml_available",
    "swanlab": "is_swanlab_available", "trackio": "is_trackio_available",
    "kubeflow": "is_kubeflow_available",
}  # fmt: skip


def requested_parallelism(cfg: FluidConfig) -> dict[str, Any]:
    """The config keys that ask for a distributed wrapper (shown beside what really ran)."""
    t = cfg.train
    return {"deepspeed": t.deepspeed, "fsdp": t.fsdp, "fsdp_config": t.fsdp_config}


class FluidTrainer(Trainer):
    """A Trainer whose ``compute_loss`` returns named parts; they are logged as running means, and
    a non-finite loss stops the run (the last saved checkpoint stays the last good one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False  # our losses are per-micro-batch means: scale for GA
        # running sums of the loss parts since the last log: "train" and "eval" (held-out)
        self._part_sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._part_counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.last_parts: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.throughput = Throughput()
        self.checkpoint_files: list[Any] = []  # objects with save(directory), in every checkpoint

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.fsdp_on_cpu = enable_fsdp_on_cpu_processes(self)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any) -> Any:
        self.throughput.count(inputs)
        return super().training_step(model, inputs, *args)

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes: one float32 all-reduce (HCCL on some Ascend parts
        has no float64 reductions)."""
        if self.args.world_size == 1 or not values:
            return values
        packed = torch.tensor(values, dtype=torch.float32, device=self.args.device)
        return self.accelerator.reduce(packed, reduction="sum").tolist()

    def peak_memory(self) -> dict[str, Any]:
        """The largest peak memory of any process so far (device allocated, or host RSS)."""
        peak, kind = peak_memory_mib(self.args.device)
        if self.args.world_size > 1:
            mine = torch.tensor([peak], dtype=torch.float32, device=self.args.device)
            peak = float(self.accelerator.gather(mine).max())
        return {"peak_memory_mib": peak, "memory_kind": kind}

    def run_figures(self, requested: dict[str, Any]) -> dict[str, Any]:
        """``parallelism``, ``throughput`` and peak memory for ``run.json`` (a collective)."""
        return {
            "parallelism": observe_parallelism(self, requested),
            "throughput": {**self.throughput.summary(self._sum_over_ranks), **self.peak_memory()},
        }

    def record_parts(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Add a batch's loss parts to the running means (training or held-out evaluation)."""
        values = {k: float(v.detach()) for k, v in parts.items()}
        value = float(loss.detach())
        kind = "train" if self.model.training else "eval"
        if kind == "train" and not math.isfinite(value):
            last = _last_checkpoint(self.args.output_dir)
            raise FluidError(
                f"the loss became {value} at step {self.state.global_step}; the run stopped and "
                f"the last good checkpoint is {last or 'none (no checkpoint was saved yet)'}. "
                "Lower learning_rate, or check the data and bf16/fp16 settings"
            )
        for key, v in values.items():
            finite = math.isfinite(v)
            self._part_sums[kind][key] += v if finite else 0.0
            self._part_counts[kind][key] += int(finite)

    def run_objective(
        self, model: torch.nn.Module, inputs: dict[str, Any], objective: Objective
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``objective(inner, inputs)`` run as the forward of ``model`` (the wrapped model).

        ``inner`` is the model inside the DDP / FSDP / DeepSpeed / compile wrappers; its ``forward``
        is swapped for this call only, so the wrappers' gradient hooks, unsharding and engine run as
        for ``model(**inputs)``. accelerate's autocast, which it installs by wrapping that same
        ``forward``, is applied here instead.
        """
        from accelerate.utils import extract_model_from_parallel

        inner = extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)
        accelerator = self.accelerator

        def forward(**batch: Any) -> dict[str, torch.Tensor]:
            with accelerator.autocast():
                loss, parts = objective(inner, batch)
            return {"loss": loss, **parts}

        previous = inner.__dict__.get("forward")
        inner.forward = forward
        try:
            out = model(**inputs)
        finally:
            if previous is None:
                del inner.forward
            else:
                inner.forward = previous
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # a training-step or an evaluation log: every process gets here together
        if "loss" in logs:
            self.last_parts = self._mean_parts("train")
            logs.update(self.last_parts)
            logs.update(self.throughput.interval(self._sum_over_ranks))
            logs["peak_memory_mib"] = self.peak_memory()["peak_memory_mib"]
        elif "eval_loss" in logs:
            logs.update({f"eval_{k}": v for k, v in self._mean_parts("eval").items()})
            self.last_eval = {k: v for k, v in logs.items() if k.startswith("eval_")}
        super().log(logs, *args, **kwargs)

    def _mean_parts(self, kind: str) -> dict[str, float]:
        """The running means of ``kind``'s loss parts over every process; resets the sums."""
        keys = sorted(self._part_sums[kind])
        sums = [self._part_sums[kind][k] for k in keys]
        counts = [float(self._part_counts[kind][k]) for k in keys]
        packed = self._sum_over_ranks(sums + counts)
        sums, counts = packed[: len(keys)], packed[len(keys) :]
        self._part_sums[kind].clear()
        self._part_counts[kind].clear()
        return {k: round(t / c, 6) for k, t, c in zip(keys, sums, counts) if c}

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> TrainOutput:
        """``Trainer.train`` with the checkpoint validated (or the last complete one picked)."""
        resume = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if self.args.should_save:  # nothing is saving yet: no step has run on any process
            remove_stale_staging(self.args.output_dir)
        if getattr(self, "fsdp_on_cpu", False) and resume:
            with full_state_resume_everywhere():
                return super().train(resume, *args, **kwargs)
        return super().train(resume, *args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write ``checkpoint-N`` into a staging directory on every process, then rename it."""
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX}-{self.state.global_step}"
        staging = staging_root(run_dir, self.state.global_step)
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: str(staging)  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()  # every shard / RNG state is on disk
        if self.args.should_save:
            add_legacy_keys(staging / name)  # (a full fine-tune's checkpoint is a model too)
            for item in self.checkpoint_files:
                item.save(staging / name)
            record_batch(staging / name, self.args)  # (checked when a run resumes from it)
            publish_checkpoint(staging / name, run_dir / name)
            best = self.state.best_global_step
            if best and (run_dir / f"{PREFIX}-{best}").is_dir():
                self.state.best_model_checkpoint = str(run_dir / f"{PREFIX}-{best}")
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


def _last_checkpoint(output_dir: str | None) -> str | None:
    last = last_complete_checkpoint(output_dir)
    return str(last) if last is not None else None


def save_final(trainer: Trainer, tokenizer: Any, output_dir: Path, extra: list[Any]) -> None:
    """Save the model / adapter, tokenizer and metadata objects atomically into ``output_dir``.

    ``extra`` holds objects with a ``save(directory)`` method (e.g. ``FluidModelMeta``); the last
    one is published last, so its file marks a complete save. Every process takes part (the save is
    collective under DeepSpeed / FSDP) and writes into the same staging directory; the saving
    process adds the rest and publishes it.
    """
    stage = output_dir / FINAL_STAGING
    if trainer.args.should_save and stage.exists():
        shutil.rmtree(stage)
    trainer.accelerator.wait_for_everyone()
    config = getattr(trainer.model, "config", None)
    if config is not None:  # (off while training; a saved model decodes with its KV cache)
        config.use_cache = True
    trainer.save_model(str(stage))
    trainer.accelerator.wait_for_everyone()
    if not trainer.args.should_save:
        return
    stage.mkdir(parents=True, exist_ok=True)
    add_legacy_keys(stage)  # (a full fine-tune's config, read right by transformers 4.x too)
    tokenizer.save_pretrained(str(stage))
    last = []
    for item in extra:
        before = {p.name for p in stage.iterdir()}
        item.save(stage)
        last = sorted({p.name for p in stage.iterdir()} - before)
    stale = output_dir / TRAINED_TEMPLATE  # (an earlier save's: this run serves as it trained)
    if not (stage / TRAINED_TEMPLATE).exists() and stale.is_file():
        stale.unlink()
    publish_dir(stage, output_dir, last=last)
