"""Stage I continued from a finished Stage I LoRA adapter (``adapter_name_or_path``).

As LLaMA-Factory continues an adapter named in a LoRA run, the adapter's weights load trainable
(its MASK-row deltas included) and training goes on from them with a new optimizer and schedule;
``resume_from_checkpoint`` is what continues an interrupted run exactly. The adapter keeps its own
LoRA settings (rank, alpha, dropout, target modules, whether the MASK row trains), MASK token and
template: a recipe key that sets another value is an error naming both, and an unset one (or a
null ``lora_alpha`` / ``template``) takes the adapter's (so ``run.json`` records what ran). The
adapter's tokenizer is the run's (the base's when the adapter directory holds none, as
``load_fluid`` reads it), and the base must be the one it was trained on (its fingerprint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluid_npu.config import FluidConfig
from fluid_npu.data.templates import AUTO
from fluid_npu.errors import CheckpointError, ConfigError
from fluid_npu.model.adapters import FluidModelMeta
from fluid_npu.model.loading import check_adapter_dir
from fluid_npu.model.mask_token import NEW_MASK


@dataclass(frozen=True)
class ContinuedAdapter:
    """The Stage I adapter a run continues: its directory and what it was trained with."""

    path: Path
    meta: FluidModelMeta
    lora: dict[str, Any]  # adapter_config.json
    all_linear: bool = False  # the recipe says lora_target: all (checked once the base loads)


def continued_adapter(cfg: FluidConfig) -> ContinuedAdapter | None:
    """The adapter a Stage I run continues (None without ``adapter_name_or_path``), checked, with
    ``cfg``'s LoRA keys set to the adapter's; every disagreement is one ``ConfigError``."""
    if not cfg.model.adapter_name_or_path:
        return None
    path = Path(cfg.model.adapter_name_or_path)
    what = (
        "adapter_name_or_path continues a Stage I adapter: give a Stage I output_dir (LoRA) or "
        "one of its checkpoint-N directories"
    )
    check_adapter_dir(path, what)
    meta = FluidModelMeta.load(path)
    if meta is None or meta.stage != "fluid_stage1":
        found = "no fluid_model.json" if meta is None else f"its stage is {meta.stage}"
        raise CheckpointError(f"{path} is not a Stage I output ({found}); {what}")
    if cfg.train.output_dir and Path(cfg.train.output_dir).resolve() == path.resolve():
        raise ConfigError(
            f"output_dir {cfg.train.output_dir!r} is the adapter being continued; write the "
            "continued adapter to another output_dir"
        )
    try:
        lora = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / 'adapter_config.json'} is unreadable ({exc})") from None
    theirs: dict[str, Any] = {
        "lora_rank": lora.get("r"),
        "lora_alpha": lora.get("lora_alpha"),
        "lora_dropout": lora.get("lora_dropout"),
        "lora_target": _targets(lora.get("target_modules")),
    }
    f = cfg.fluid
    all_linear = "lora_target" in cfg.given and f.lora_target == "all"
    # a MASK row the adapter trains: always for a MASK token Stage I added to the vocabulary
    row = bool(lora.get("trainable_token_indices"))
    if meta.mask_token != NEW_MASK and meta.mask_id < meta.vocab_size:  # (a token of the base)
        theirs["train_mask_embedding"] = row
    conflicts = []
    for key, value in theirs.items():
        ours = getattr(f, key)
        if key in cfg.given and not _same(key, ours, value):
            conflicts.append(f"{key}: {ours!r} (the adapter's: {value!r})")
        setattr(f, key, value)
    if meta.template is not None:  # (recorded since the template joined fluid_model.json)
        ours = cfg.data.template or AUTO
        if "template" in cfg.given and ours != meta.template:
            conflicts.append(f"template: {ours!r} (the adapter's: {meta.template!r})")
        cfg.data.template = meta.template
    if cfg.model.mask_token and cfg.model.mask_token != meta.mask_token:
        mask = cfg.model.mask_token
        conflicts.append(f"mask_token: {mask!r} (the adapter's: {meta.mask_token!r})")
    if conflicts:
        raise ConfigError(
            f"continuing the adapter in {path} keeps its LoRA settings, MASK token and template, "
            f"but the recipe sets {'; '.join(conflicts)}: remove those keys or set the adapter's "
            "values"
        )
    return ContinuedAdapter(path, meta, lora, all_linear=all_linear)


def check_all_linear(parent: ContinuedAdapter, linear: list[str]) -> None:
    """``lora_target: all`` in the recipe: the adapter must target every linear layer of the base
    but its head (``linear``, by layer name), as "all" does for a new adapter."""
    theirs = _targets(parent.lora.get("target_modules"))
    if parent.all_linear and theirs != "all" and theirs != sorted(set(linear)):
        raise ConfigError(
            f"continuing the adapter in {parent.path} keeps its LoRA settings, but the recipe sets "
            f"lora_target: 'all' ({sorted(set(linear))}) and the adapter targets {theirs}: remove "
            "the key or set the adapter's value"
        )


def _targets(modules: Any) -> str | list[str]:
    """Target modules by layer name (``q_proj``), as a recipe writes them: peft saves "all-linear"
    as every module path it resolved to."""
    if isinstance(modules, (list, tuple, set)):
        return sorted({str(m).rsplit(".", 1)[-1] for m in modules})
    return "all" if modules in (None, "all-linear") else str(modules)


def _same(key: str, ours: Any, theirs: Any) -> bool:
    if key == "lora_target":  # ("all": compared with the base's layers by check_all_linear)
        return ours == "all" or _targets(ours) == _targets(theirs)
    return ours == theirs
