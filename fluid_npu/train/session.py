"""One training run from a config: checks, device, model + MASK, data, adapters, Trainer, save.

``TrainingSession`` does everything a stage needs before and after its loss: it validates the
inputs up front (so a bad dataset or output directory fails before any weight is touched), loads
the base model and tokenizer, resolves the MASK token, tokenizes the data and checks the MASK never
occurs in it, swaps torch_npu's fused layer kernels in on an NPU (``npu_fused_kernels``), applies
LoRA or full fine-tuning, and at the end saves the adapter / model, the tokenizer and
``fluid_model.json`` atomically and writes ``run.json``. A run that fails during set-up removes the
output directory it created (nothing half-made is left); the loss runs inside the wrapped model's
forward (``FluidTrainer.run_objective``), so DDP / FSDP / DeepSpeed see it.

Before anything loads, ``output_dir`` is claimed (``fluid_npu.train.output_dir``: an earlier run's
output there is an error unless the run resumes it or ``overwrite_output_dir`` asks to remove it,
which happens just before training, once every check passed) and a resumed checkpoint is checked
against this run's settings. Every ``checkpoint-N`` also gets ``fluid_model.json`` (and an
adapter's generation config), so a checkpoint is usable downstream like the final output (Stage
II's ``adapter_name_or_path``, ``fluid generate --adapter``, ``fluid merge``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from fluid_npu import device as devices
from fluid_npu.config import FluidConfig
from fluid_npu.data.auto_template import exported_template, get_template
from fluid_npu.data.template_export import fit_tokenizer, trained_template
from fluid_npu.data.templates import AUTO
from fluid_npu.errors import CheckpointError, ConfigError
from fluid_npu.io import first_missing, prepare_output_dir, remove_if_empty, write_run_json
from fluid_npu.model.adapters import (
    FluidModelMeta,
    apply_lora,
    quiet_peft,
    trainable_tokens_on_any_device,
)
from fluid_npu.model.attention import check_backend, configure_attention
from fluid_npu.model.fused_layers import apply_npu_fused_layers, enable_mindspeed
from fluid_npu.model.loading import (
    check_model_dir,
    fingerprint,
    load_model,
    load_tokenizer,
    quantization_config,
)
from fluid_npu.model.loading import load_config as load_model_config
from fluid_npu.model.mask_token import MaskToken, init_new_rows, resolve_mask_token
from fluid_npu.train.common import (
    FluidTrainer,
    requested_parallelism,
    save_final,
    training_arguments,
)
from fluid_npu.train.continued import ContinuedAdapter, check_all_linear, continued_adapter
from fluid_npu.train.data import load_run_data
from fluid_npu.train.output_dir import check_resume, clear_earlier_run, prepare_run_dir
from fluid_npu.train.precision import device_choice, observe_trained, resolve_precision

logger = logging.getLogger(__name__)

LossFn = Callable[[PreTrainedModel, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class TrainingSession:
    """Set-up and tear-down of a Stage I run (Stage II reuses the data and trainer parts)."""

    def __init__(self, cfg: FluidConfig, stage: str) -> None:
        cfg.require("model_name_or_path", "dataset", "output_dir")
        self.cfg = cfg
        self.stage = stage
        check_model_dir(cfg.model.model_name_or_path, allow_pickle=cfg.model.allow_pickle)
        self.choice = device_choice(cfg.train, cfg.model.device)
        check_backend(cfg.model.attn_backend, self.choice.type)  # (before anything loads)
        self.args = training_arguments(cfg, self.choice)  # fail on bad arguments before loading
        self.precision = resolve_precision(cfg.train, self.choice)
        self.quantization = self._quantization()
        self.mindspeed = enable_mindspeed() if cfg.model.use_mindspeed else None
        self.parent = continued_adapter(cfg) if stage == "fluid_stage1" else None
        f = cfg.fluid
        lora = f.finetuning_type == "lora"
        settings = {"stage": stage, "finetuning_type": f.finetuning_type,
                    "lora_rank": f.lora_rank if lora else None,
                    "lora_alpha": f.lora_alpha if lora else None,  # (it scales what trained)
                    "learning_rate": cfg.train.learning_rate}  # fmt: skip
        if stage == "fluid_stage1":  # (what the examples and the layout were built with)
            settings.update(template=cfg.data.template or AUTO, k_masks=cfg.fluid.k_masks)
        self.resume = prepare_run_dir(cfg, self.args, settings)
        created = first_missing(cfg.train.output_dir)  # (a failure removes what it made)
        self.output_dir = prepare_output_dir(cfg.train.output_dir)
        try:
            self._load()
            peft_config = getattr(self.model, "peft_config", {}).get("default")
            targets = getattr(peft_config, "target_modules", None)
            check_resume(  # what only the loaded model tells
                self.resume,
                {
                    "base_fingerprint": self.base_fingerprint,
                    "lora_target": sorted(targets) if isinstance(targets, set) else targets,
                },
            )
        except BaseException:
            if created is not None:
                remove_if_empty(self.output_dir, up_to=created)
            raise

    def _load(self) -> None:
        cfg = self.cfg
        devices.seed_everything(cfg.train.seed)
        # the model's config first: an architecture that needs remote code fails with that reason
        try:
            load_model_config(
                cfg.model.model_name_or_path, trust_remote_code=cfg.model.trust_remote_code
            )
        except CheckpointError as exc:  # transformers' text spans lines; the CLI prints one
            raise CheckpointError(" ".join(str(exc).split())) from None
        parent = self.parent
        tokenizer_dir = cfg.model.model_name_or_path  # a continued adapter's: MASK, template
        if parent is not None and (parent.path / "tokenizer_config.json").is_file():
            tokenizer_dir = str(parent.path)
        self.tokenizer = load_tokenizer(
            tokenizer_dir, trust_remote_code=cfg.model.trust_remote_code
        )
        # (an adapter that recorded its template was checked by continued_adapter)
        unrecorded = parent is not None and parent.meta.template is None
        trained_on = exported_template(self.tokenizer) if unrecorded else None
        if trained_on is not None and cfg.data.template not in (None, AUTO, trained_on):
            raise ConfigError(  # (its tokenizer keeps that chat template: decoding would differ)
                f"continuing the adapter in {parent.path}, trained with template {trained_on!r}, "
                f"but the recipe sets template: {cfg.data.template!r}: remove the key or set "
                f"template: {trained_on}"
            )
        # a local base by its absolute path: the adapter's base_model_name_or_path (peft's
        # AutoPeftModelForCausalLM loads it from there) must not depend on the working directory
        local = Path(cfg.model.model_name_or_path)
        self.base_source = str(local.resolve()) if local.is_dir() else cfg.model.model_name_or_path
        base = load_model(
            self.base_source,
            dtype=self.precision.load_dtype(cfg.fluid.finetuning_type),
            trust_remote_code=cfg.model.trust_remote_code,
            allow_pickle=cfg.model.allow_pickle,
            quantization=self.quantization,
            device=self.args.device,
        )
        self.base_fingerprint = fingerprint(base, checkpoint=cfg.model.model_name_or_path)
        # num_embeddings, not weight.shape: under ZeRO-3 the weight is this process's partition
        self.base_vocab_size = int(base.get_input_embeddings().num_embeddings)
        if parent is not None:
            self._fit_parent(base, parent)
        self.mask = resolve_mask_token(
            self.tokenizer,
            base,
            configured=self._parent_mask(parent) if parent else cfg.model.mask_token,
            allow_new=True,
        )
        if parent is not None:
            if self.mask.id != parent.meta.mask_id:
                raise CheckpointError(
                    f"the adapter in {parent.path} trained with MASK {parent.meta.mask_token!r} "
                    f"as id {parent.meta.mask_id}, but the tokenizer gives id {self.mask.id}"
                )
            self.mask = MaskToken(self.mask.token, self.mask.id, "adapter")
        self.data = self._load_data()
        # the template's turn end as EOS, the template as the chat template (template_export.py);
        # where the tokenizer's own serves otherwise, the format trained saved beside the weights
        template = get_template(cfg.data.template, self.tokenizer)
        self.trained_template = trained_template(template, self.tokenizer)
        fit_tokenizer(template, self.tokenizer, base)
        base.config.use_cache = False
        configure_attention(base, cfg.model.attn_backend, self.choice.type)
        self.fused_modules = apply_npu_fused_layers(
            base, enabled=self.choice.type == "npu" and cfg.model.npu_fused_kernels
        )
        self.model = self._trainable(base)
        self.precision.cast_trainable(self.model)

    def _parent_mask(self, parent: ContinuedAdapter) -> str | None:
        """The adapter's MASK token; None (Stage I's token added again) when the tokenizer lacks
        it (an adapter directory that holds no tokenizer): the id check then says whether it is
        the one the adapter trained with."""
        return (
            parent.meta.mask_token if parent.meta.mask_token in self.tokenizer.get_vocab() else None
        )

    def _fit_parent(self, base: PreTrainedModel, parent: ContinuedAdapter) -> None:
        """The base as the continued adapter was trained on it: the same fingerprint and
        vocabulary, then the adapter's added MASK row (rebuilt as Stage I made it; the adapter
        holds its trained delta)."""
        where = f"the adapter in {parent.path}"
        if parent.meta.base_fingerprint != self.base_fingerprint:
            raise CheckpointError(
                f"{where} was trained on another base model (fingerprint "
                f"{parent.meta.base_fingerprint}, this base is {self.base_fingerprint}); give the "
                "base it was trained on as model_name_or_path"
            )
        if parent.meta.vocab_size != self.base_vocab_size:
            raise CheckpointError(
                f"{where} was trained on a base of {parent.meta.vocab_size} tokens, this one has "
                f"{self.base_vocab_size}"
            )
        head = base.get_output_embeddings()
        linear = [n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                  if isinstance(m, torch.nn.Linear) and m is not head]  # fmt: skip
        check_all_linear(parent, linear)
        if len(self.tokenizer) > self.base_vocab_size:
            base.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
            init_new_rows(base, self.base_vocab_size)

    def _quantization(self) -> Any:
        """QLoRA's ``BitsAndBytesConfig`` for ``quantization_bit``, or None (checked up front)."""
        m = self.cfg.model
        if m.quantization_bit is None:
            return None
        if self.cfg.fluid.finetuning_type != "lora":
            raise ConfigError(
                f"quantization_bit: {m.quantization_bit} quantizes the frozen base for QLoRA; "
                "set finetuning_type: lora, or remove quantization_bit"
            )
        return quantization_config(
            m.quantization_bit,
            quant_type=m.quantization_type,
            double_quant=m.double_quantization,
            compute_dtype=self.precision.compute_dtype,
            device=self.args.device,
        )

    def _load_data(self) -> Any:
        self.args.device  # noqa: B018 - sets up torch.distributed: the data is built on rank 0
        return load_run_data(self.cfg, self.tokenizer, self.mask)

    def _trainable(self, model: PreTrainedModel) -> PreTrainedModel:
        f = self.cfg.fluid
        if f.finetuning_type == "full":
            model.train()
            return model
        if self.parent is not None:  # its own LoRA settings and trainable MASK row
            from peft import PeftModel

            with quiet_peft(), trainable_tokens_on_any_device():
                peft_model = PeftModel.from_pretrained(
                    model, str(self.parent.path), is_trainable=True
                )
            return self._ready(peft_model)
        tokens = [self.mask.id] if (f.train_mask_embedding or self.mask.source == "added") else None
        peft_model = apply_lora(
            model,
            rank=f.lora_rank,
            alpha=f.lora_alpha,
            dropout=f.lora_dropout,
            target=f.lora_target,
            trainable_token_ids=tokens,
        )
        return self._ready(peft_model)

    def _ready(self, peft_model: Any) -> Any:
        if self.cfg.train.gradient_checkpointing:
            peft_model.enable_input_require_grads()
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in peft_model.parameters())
        logger.info(
            "trainable parameters: %d of %d (%.3f%%)", trainable, total, 100 * trainable / total
        )
        return peft_model

    def train(
        self,
        loss_fn: LossFn,
        collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
        callbacks: list[Any] | None = None,
    ) -> dict[str, Any]:
        """Run the Trainer with ``loss_fn``, save everything, and return the run record."""
        args = self.args

        class _Trainer(FluidTrainer):
            def compute_loss(
                self,
                model: torch.nn.Module,
                inputs: dict[str, Any],
                return_outputs: bool = False,
                num_items_in_batch: Any = None,
            ) -> Any:
                loss, parts = self.run_objective(model, inputs, loss_fn)
                self.record_parts(loss, parts)
                return (loss, {"loss": loss}) if return_outputs else loss

        trainer = _Trainer(
            model=self.model,
            args=args,
            train_dataset=self.data.train,
            eval_dataset=self.data.eval if args.eval_strategy != "no" else None,
            data_collator=collator,
            processing_class=self.tokenizer,
            callbacks=callbacks,
        )
        meta = FluidModelMeta(
            base_fingerprint=self.base_fingerprint,
            mask_token=self.mask.token,
            mask_id=self.mask.id,
            vocab_size=self.base_vocab_size,
            base_model=self.base_source,
            stage=self.stage,
            template=self.cfg.data.template or AUTO,
            k_masks=self.cfg.fluid.k_masks if self.stage == "fluid_stage1" else None,
        )
        # every checkpoint-N and the final output: an adapter's carry its generation config (its
        # EOS ids: a template's turn end, data/template_export.py; a full model saves its own)
        gen = getattr(self.model, "generation_config", None)
        lora = self.cfg.fluid.finetuning_type == "lora" and gen is not None
        files = [*([GenerationFile(gen)] if lora else []), meta]
        if self.trained_template is not None:  # (the meta file stays last: it marks a whole save)
            files.insert(-1, self.trained_template)
        trainer.checkpoint_files = files
        clear_earlier_run(self.cfg)  # overwrite_output_dir: only now that every check passed
        result = trainer.train(resume_from_checkpoint=self.resume)
        best = getattr(trainer.state, "best_global_step", None)  # (load_best_model_at_end)
        reloaded = trainer.args.load_best_model_at_end and best not in (None, result.global_step)
        if trainer.eval_dataset is not None and (
            reloaded or _last_eval_step(trainer) != result.global_step
        ):  # the final weights' held-out losses (the best checkpoint's, when it was loaded)
            trainer.evaluate()
        figures = trainer.run_figures(requested_parallelism(self.cfg))
        self.precision_record = observe_trained(self.precision, self.model, trainer)
        save_final(trainer, self.tokenizer, self.output_dir, files)
        record = {
            "stage": self.stage,
            "config": self.cfg.to_dict(),
            "device": {
                "type": self.choice.type,
                "backend": self.choice.backend,
                "autocast_dtype": str(self.choice.autocast_dtype),
                "world_size": args.world_size,
                "npu_fused_modules": self.fused_modules,
                "mindspeed": self.mindspeed,
            },
            **figures,
            "precision": self.precision_record,
            "quantization_bit": self.cfg.model.quantization_bit,
            "mask_token": {
                "token": self.mask.token,
                "id": self.mask.id,
                "source": self.mask.source,
            },
            "base_fingerprint": self.base_fingerprint,
            "data": _as_dict(getattr(self.data, "stats", None)),
            "train_loss": float(result.training_loss),
            "global_step": int(result.global_step),
            **trainer.last_parts,
            **trainer.last_eval,
            "log_history": trainer.state.log_history,
        }
        if trainer.is_world_process_zero():
            write_run_json(self.output_dir, record)
        self.trainer = trainer
        return record


def _as_dict(stats: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else stats


def _last_eval_step(trainer: Any) -> int | None:
    steps = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    return steps[-1] if steps else None


class GenerationFile:
    """A ``GenerationConfig`` as a checkpoint file (``FluidTrainer.checkpoint_files``)."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def save(self, directory: str | Path) -> None:
        self.config.save_pretrained(str(directory))
