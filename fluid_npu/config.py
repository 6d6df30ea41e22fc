"""Typed run configuration: dataclasses filled from a LLaMA-Factory-style YAML plus ``key=value``.

A YAML is flat, as in LLaMA-Factory. Each key belongs to exactly one group:

* ``ModelArgs`` — the base model, adapter, MASK token, attention back end, device options;
* ``DataArgs`` — datasets, template, ``cutoff_len`` (read by ``fluid_npu.data``);
* ``FluidArgs`` — the method: stage, LoRA, the §1.1 layout and loss, the K-head;
* ``TrainArgs`` — the optimisation keys we own; any other ``transformers.TrainingArguments`` name
  (``seed``, ``report_to``, ``save_total_limit``, …) passes through to the Trainer.

Keys that LLaMA-Factory recipes carry but that mean nothing here (``do_train``,
``overwrite_cache``, …) are accepted with a one-line warning; LLaMA-Factory's keys of features this
project lacks are refused by name with the reason (``lf_keys.py``), and its other spellings of a
key here are read as that key (``lf_keys.lf_spellings``). An unknown key or a value of the wrong
type is a ``ConfigError`` naming the key and the nearest valid one; values are checked in each
dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fluid_npu.config_values import coerce, pass_through
from fluid_npu.device import DEVICE_CHOICES, VISIBLE_DEVICES, card_type
from fluid_npu.errors import ConfigError
from fluid_npu.lf_keys import UNSUPPORTED, lf_spellings, refusal

logger = logging.getLogger(__name__)

STAGES = ("fluid_stage1", "fluid_stage2")
ATTN_BACKENDS = ("auto", "reference", "blocked", "npu", "triton", "eager", "sdpa")

# LLaMA-Factory keys that have no meaning in fluid-npu: accepted with a warning.
IGNORED_KEYS = {
    "do_train": "training always runs with `fluid train`",
    "do_predict": "use `fluid generate` for predictions",
    "overwrite_cache": "the tokenized data is cached by its content and settings, so a changed "
    "dataset or setting is tokenized again",
    "plot_loss": "run.json carries the loss figures",
    "flash_attn": "the attention back end is chosen by attn_backend",
    "cache_dir": "nothing is downloaded",
    "tokenized_path": "datasets are tokenized at each start (the datasets library may reuse its "
    "cache); no tokenized copy is saved to or read from a path",
    "packing": "FLUID expands each example separately; packing is not used",
    "neat_packing": "FLUID expands each example separately; packing is not used",
    "use_fast_tokenizer": "the tokenizer's own class is used",
    "upcast_layernorm": "norms follow the model dtype",
    "use_unsloth": "not used",
    "print_param_status": "trainable parameters are logged at start",
    "preprocessing_batch_size": "rows are tokenized one at a time; the result is the same",
    "data_shared_file_system": "rank 0 alone reads and tokenizes the datasets and sends them to "
    "every rank (with their rows to other nodes): no file system is shared for them",
}


@dataclass
class ModelArgs:
    model_name_or_path: str | None = None
    adapter_name_or_path: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    mask_token: str | None = None
    attn_backend: str = "auto"
    loss_impl: str = "auto"
    device: str = "auto"
    npu_fused_kernels: bool = True
    use_mindspeed: bool = False
    quantization_bit: int | None = None  # 4 / 8: QLoRA, the frozen base quantized (bitsandbytes)
    quantization_type: str = "nf4"
    double_quantization: bool = True

    def __post_init__(self) -> None:
        if self.quantization_bit is not None:
            _choice("quantization_bit", str(self.quantization_bit), ("4", "8"))
        _choice("quantization_type", self.quantization_type, ("nf4", "fp4"))
        _choice("attn_backend", self.attn_backend, ATTN_BACKENDS)
        _choice("loss_impl", self.loss_impl, ("auto", "fused", "reference"))
        name = card_type(str(self.device))
        if name is not None:  # (each training rank takes the card LOCAL_RANK says)
            raise ConfigError(
                f"device: {self.device!r} gives a card index; a run takes its cards from the "
                f"launcher (rank r on card r): give {name!r}, and pick the cards with "
                f"{VISIBLE_DEVICES[name]}"
            )
        _choice("device", self.device, DEVICE_CHOICES)


@dataclass
class DataArgs:
    dataset: str | None = None
    dataset_dir: str = "data"
    template: str | None = None
    cutoff_len: int = 1024
    skip_bad_rows: bool = False
    max_samples: int | None = None
    val_size: float = 0.0
    eval_dataset: str | None = None  # held out instead of val_size: evaluated every eval_steps
    mask_history: bool = False
    train_on_prompt: bool = False
    # the tokenizer's chat template's variable (Qwen3: false trains the non-thinking answers
    # after the empty <think> block its prompt then carries); None: the template's default
    enable_thinking: bool | None = None
    preprocessing_num_workers: int | None = None
    seed: int = field(default=42, metadata={"internal": True})  # copied from TrainArgs.seed

    def __post_init__(self) -> None:
        _positive("cutoff_len", self.cutoff_len)
        if self.max_samples is not None:
            _positive("max_samples", self.max_samples)
        if self.val_size < 0:
            raise ConfigError(
                f"val_size must be ≥ 0 (a fraction < 1 or a count), got {self.val_size}"
            )
        if self.mask_history and self.train_on_prompt:  # (LLaMA-Factory refuses it too)
            raise ConfigError(
                "mask_history (loss on the last response only) and train_on_prompt (loss on the "
                "prompts too) contradict each other; set one of them"
            )
        if self.val_size and self.eval_dataset:
            raise ConfigError(
                "val_size and eval_dataset both hold out data: set one of them (val_size splits "
                "the training data, eval_dataset names separate datasets)"
            )


@dataclass
class FluidArgs:
    stage: str = "fluid_stage1"
    finetuning_type: str = "lora"
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: 2 × lora_rank, LLaMA-Factory's default
    lora_dropout: float = 0.0
    lora_target: str | list[str] = "all"
    train_mask_embedding: bool = False
    k_masks: int = 16
    anchor_prob: float = 0.5  # each response column's chance to anchor slots (the column before
    # each response always anchors: the sampler's prefill drafts from it; layout.py)
    noise_ratio: float = 0.1
    max_slots_ratio: float | None = 6.0
    loss_reduction: str = "sum_of_means"
    ar_loss_weight: float = 1.0
    diff_loss_weight: float = 1.0
    khead_label: str = "ce_threshold"
    khead_tau: float = 2.8
    khead_sigma: float = 1.5
    skip_nonfinite_check: bool = False

    def __post_init__(self) -> None:
        _choice("stage", self.stage, STAGES)
        _choice("finetuning_type", self.finetuning_type, ("lora", "full"))
        _choice("loss_reduction", self.loss_reduction, ("sum_of_means", "pooled"))
        _choice("khead_label", self.khead_label, ("ce_threshold", "accept_length"))
        _positive("k_masks", self.k_masks)
        _positive("lora_rank", self.lora_rank)
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0 (or left out: 2 × lora_rank), got "
                              f"{self.lora_alpha}")  # fmt: skip
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("anchor_prob", "noise_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if self.max_slots_ratio is not None and self.max_slots_ratio <= 0:
            raise ConfigError(f"max_slots_ratio must be > 0 or null, got {self.max_slots_ratio}")
        if self.khead_sigma <= 0 or self.khead_tau <= 0:
            raise ConfigError("khead_sigma and khead_tau must be > 0")
        if min(self.ar_loss_weight, self.diff_loss_weight) < 0 or not (
            self.ar_loss_weight or self.diff_loss_weight
        ):
            raise ConfigError(
                f"ar_loss_weight {self.ar_loss_weight} and diff_loss_weight "
                f"{self.diff_loss_weight}: each must be >= 0 and one > 0 (a negative weight "
                "ascends its loss; both 0 train nothing)"
            )
        if isinstance(self.lora_target, str) and self.lora_target != "all":
            self.lora_target = [t.strip() for t in self.lora_target.split(",") if t.strip()]


@dataclass
class TrainArgs:
    output_dir: str | None = None
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2.0e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    bf16: bool = False
    fp16: bool = False
    pure_bf16: bool = False  # bf16 weights and optimizer, no fp32 master copy (LLaMA-Factory's)
    deepspeed: str | None = None
    fsdp: bool | str | list[str] = ""
    fsdp_config: str | None = None
    logging_steps: float = 10
    save_steps: float = 500
    save_total_limit: int | None = None
    seed: int = 42
    resume_from_checkpoint: str | bool | None = None  # true: the last complete checkpoint
    overwrite_output_dir: bool = False  # start over: the earlier run in output_dir is removed
    report_to: str | list[str] = "none"
    gradient_checkpointing: bool = False
    dataloader_num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps"):  # fmt: skip
            _positive(name, getattr(self, name))
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ConfigError(
                f"max_steps {self.max_steps} with num_train_epochs {self.num_train_epochs} trains "
                "no step: give max_steps > 0, or max_steps: -1 and num_train_epochs > 0"
            )
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.dataloader_num_workers < 0:
            raise ConfigError(
                f"dataloader_num_workers must be >= 0 (0: load in the main process), got "
                f"{self.dataloader_num_workers}"
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(
                f"warmup_ratio must be in [0, 1) (a share of the run's steps), got "
                f"{self.warmup_ratio}; give a number of steps as warmup_steps"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both true: choose one")
        if self.pure_bf16 and self.fp16:
            raise ConfigError("pure_bf16 and fp16 are both true: choose one")


GROUPS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "fluid": FluidArgs,
    "train": TrainArgs,
}


@dataclass
class FluidConfig:
    """A whole run: the four typed groups plus pass-through TrainingArguments names."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    fluid: FluidArgs = field(default_factory=FluidArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    extra_training_args: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    given: frozenset[str] = frozenset()  # the keys the recipe and overrides set (not defaults)

    def to_dict(self) -> dict[str, Any]:
        """The flat key → value mapping (what a YAML for this run would hold)."""
        flat: dict[str, Any] = {}
        for group in GROUPS:
            for f in dataclasses.fields(getattr(self, group)):
                if not f.metadata.get("internal"):
                    flat[f.name] = getattr(getattr(self, group), f.name)
        flat.update(self.extra_training_args)
        return flat

    def require(self, *keys: str) -> None:
        """Raise a ConfigError for each listed key that is unset (None)."""
        flat = self.to_dict()
        missing = [k for k in keys if flat.get(k) in (None, "")]
        if missing:
            raise ConfigError(
                f"missing required key(s): {', '.join(missing)}; add them to the YAML"
            )


def _owner_of() -> dict[str, str]:
    owners = {}
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            if not f.metadata.get("internal"):
                owners[f.name] = group
    return owners


def _training_argument_fields() -> dict[str, dataclasses.Field]:
    from fluid_npu.model.adapters import quiet_peft

    with quiet_peft():  # (transformers' training_args imports peft, peft bitsandbytes)
        from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def _choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        near = difflib.get_close_matches(str(value), valid, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{name}: {value!r} is not valid{hint}; choose one of {', '.join(valid)}")


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _nearest(key: str, candidates: list[str]) -> str:
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lora_rank=8", "bf16=false"]`` → ``{"lora_rank": 8, "bf16": False}`` (YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value (e.g. learning_rate=1e-4)")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {pair!r}: the value is not valid YAML ({exc})") from None
    return out


def build_config(values: dict[str, Any], source: str | None = None) -> FluidConfig:
    """Validate a flat key → value mapping into a ``FluidConfig`` (see the module docstring)."""
    owners = _owner_of()
    hf_fields: dict[str, dataclasses.Field] | None = None  # (read only for a key not ours)
    per_group: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    extra: dict[str, Any] = {}
    hints = {g: typing.get_type_hints(cls) for g, cls in GROUPS.items()}
    for key, value in lf_spellings(values).items():
        if key in owners:
            group = owners[key]
            per_group[group][key] = coerce(key, value, hints[group][key])
        elif key in IGNORED_KEYS:
            logger.warning("config key %r is ignored: %s", key, IGNORED_KEYS[key])
        elif refusal(key, value) is not None:  # (a feature of LLaMA-Factory's this lacks)
            raise ConfigError(str(refusal(key, value)))
        elif key in UNSUPPORTED:  # (the same feature, asked to stay off: it is)
            logger.info("config key %r: %r asks for nothing fluid-npu does not do", key, value)
        else:
            if hf_fields is None:  # transformers' TrainingArguments: seconds to import
                hf_fields = _training_argument_fields()
            if key not in hf_fields:
                candidates = sorted(set(owners) | set(hf_fields))
                raise ConfigError(f"unknown config key {key!r}{_nearest(key, candidates)}")
            extra[key] = pass_through(key, value, hf_fields[key].type)
    if per_group["fluid"].get("stage") == "sft":
        raise ConfigError(
            "stage: sft is LLaMA-Factory's; use stage: fluid_stage1 (or fluid_stage2)"
        )
    try:
        groups = {g: GROUPS[g](**per_group[g]) for g in GROUPS}
    except TypeError as exc:  # pragma: no cover - keys were checked above
        raise ConfigError(str(exc)) from None
    groups["data"].seed = groups["train"].seed
    adapter = groups["model"].adapter_name_or_path
    if groups["fluid"].stage == "fluid_stage1" and adapter:
        if groups["fluid"].finetuning_type != "lora":
            raise ConfigError(
                "adapter_name_or_path continues a Stage I LoRA adapter (finetuning_type: lora); "
                "for full fine-tuning merge it first (fluid merge) and give the merged model as "
                "model_name_or_path"
            )
        if "," in adapter:
            raise ConfigError(
                f"adapter_name_or_path {adapter!r} lists several adapters; Stage I continues one "
                "(merge the others into the base first: fluid merge)"
            )
    given = frozenset(k for k, v in values.items() if v is not None)  # (null: left out)
    return FluidConfig(**groups, extra_training_args=extra, source=source, given=given)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> FluidConfig:
    """Read a YAML recipe (or nothing) and apply ``key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML recipe path")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of key: value, got {type(loaded).__name__}")
        values.update(loaded)
    given = parse_overrides(overrides or [])
    if "gradient_checkpointing" in given:  # (an override beats the recipe's other spelling)
        values.pop("disable_gradient_checkpointing", None)
    values.update(given)
    return build_config(values, source=str(path) if path is not None else None)
