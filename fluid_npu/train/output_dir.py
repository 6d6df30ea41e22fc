"""One run per ``output_dir``: a new run never mixes with an earlier run's output.

A training run writes ``checkpoint-N`` directories into ``output_dir`` while it trains, then its
weights (LoRA adapter, model or K-head), the tokenizer, ``fluid_model.json`` and ``run.json``.
Before a run loads anything, ``claim_output_dir`` looks at what the directory already holds
(``earlier_output``: ``checkpoint-N`` directories and the files in ``RUN_FILES``; hidden files,
logs and anything else no run writes do not count):

* nothing of an earlier run: the run starts;
* an earlier run's output and neither key below: one ConfigError naming the directory, what it
  holds and the three ways on. LLaMA-Factory resumes on its own when it finds a checkpoint; here a
  new recipe pointed at an old directory would then continue a run with other settings (a
  state_dict error at best, the old run's schedule continued silently at worst), so the user says;
* ``overwrite_output_dir: true``: the earlier run's output (``removable``: the run files, their
  companions — config, tokenizer, README, plot — and leftovers of interrupted saves) is removed
  once the run has loaded and passed its checks, just before training (``clear_earlier_run``: a
  run refused on the way leaves it whole); other files stay. It never removes the model, adapter
  or checkpoint the run reads;
* ``resume_from_checkpoint``: ``true`` continues the run from its last complete checkpoint, a path
  inside ``output_dir`` from that checkpoint; a checkpoint elsewhere needs a clean ``output_dir``.

``check_resume`` compares what a checkpoint records (``recorded_settings``: stage, LoRA or full
fine-tuning, LoRA rank and target modules, ``k_masks``, the learning rate, the base model's and
Stage I adapter's fingerprints, Stage I's template) with this run's, so a checkpoint that cannot
continue this run is one error naming the difference instead of a state_dict traceback (or, for
the learning rate, a run that silently keeps the old one); a checkpoint at the run's last step is
refused (the run has finished there), and so is DeepSpeed ZeRO optimizer state split over another
number of processes than this run has, and one saved with another global batch or under another
wrapper (both in ``run_shape``). ``prepare_run_dir`` does all this
for a stage: the main process claims the directory while the others wait for its answer.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from fluid_npu.data.template_export import TRAINED_TEMPLATE
from fluid_npu.errors import ConfigError
from fluid_npu.io import FINAL_STAGING, RUN_FILE
from fluid_npu.model.adapters import META_FILE
from fluid_npu.model.khead import CONFIG as KHEAD_CONFIG
from fluid_npu.model.khead import WEIGHTS as KHEAD_WEIGHTS
from fluid_npu.train.checkpoint import (
    PREFIX,
    STAGING_PREFIX,
    checkpoint_step,
    finished_at,
    resolve_resume,
)
from fluid_npu.train.khead_report import PLOT_FILE
from fluid_npu.train.run_shape import check_run_shape, check_world_size, fresh_start

logger = logging.getLogger(__name__)

# files only a run writes: any of them (or a checkpoint-N directory) marks an earlier run
RUN_FILES = frozenset(
    {
        RUN_FILE,
        META_FILE,
        KHEAD_WEIGHTS,
        KHEAD_CONFIG,
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter_model.bin",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "trainer_state.json",
        "training_args.bin",
    }
)
SHARD_RE = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
# what a run writes beside them (model config, tokenizer, peft's model card, the Stage II plot)
COMPANION_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "README.md",
        PLOT_FILE,
        "chat_template.jinja",
        TRAINED_TEMPLATE,
        "chat_template.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "tokenizer.model",
        "spiece.model",
    }
)
SHOWN = 6  # names an error message lists before "and N more"


def _is_run_output(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if checkpoint_step(path) is not None:
        return path.is_dir()
    return path.is_file() and (path.name in RUN_FILES or SHARD_RE.match(path.name) is not None)


def _order(path: Path) -> tuple[int, int, str]:
    step = checkpoint_step(path)
    return (1, step, "") if step is not None else (0, 0, path.name)


def earlier_output(directory: str | Path) -> list[Path]:
    """The entries of ``directory`` that an earlier run wrote (files first, then checkpoints by
    step); empty when there are none or there is no directory."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _is_run_output(p)), key=_order)


def removable(directory: str | Path) -> list[Path]:
    """What ``overwrite_output_dir`` removes: the earlier output, its companions, leftovers."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(
        (
            p
            for p in root.iterdir()
            if _is_run_output(p) or (p.name in COMPANION_FILES and p.is_file()) or _is_staging(p)
        ),
        key=_order,
    )


def _is_staging(path: Path) -> bool:
    """An interrupted final or checkpoint save (``io.FINAL_STAGING``, ``.tmp-checkpoint-N``)."""
    name = path.name
    return name == FINAL_STAGING or (name.startswith(STAGING_PREFIX) and PREFIX in name)


def describe(entries: list[Path]) -> str:
    """``run.json, adapter_model.safetensors, 3 checkpoint-N directories (last checkpoint-6)``."""
    files = [p.name for p in entries if checkpoint_step(p) is None]
    checkpoints = [p.name for p in entries if checkpoint_step(p) is not None]
    parts = files[:SHOWN] + ([f"{len(files) - SHOWN} more files"] if len(files) > SHOWN else [])
    if checkpoints:
        n = len(checkpoints)
        parts.append(
            checkpoints[0] if n == 1 else f"{n} {PREFIX}-N directories (last {checkpoints[-1]})"
        )
    return ", ".join(parts)


def _within(path: Path, entry: Path) -> bool:
    return path == entry or entry in path.parents


def claim_output_dir(
    output_dir: str | Path,
    *,
    resume: str | bool | None,
    overwrite: bool,
    inputs: dict[str, str | None],
) -> None:
    """Check ``output_dir`` holds no earlier run's output unless asked to continue or replace it
    (see the module docstring), removing that output for ``overwrite``. ``inputs``: the setting →
    directory the run reads (model, adapter), never removed."""
    root = Path(output_dir).resolve()
    found = earlier_output(root)
    ckpt = None if resume is None or isinstance(resume, bool) or resume == "" else Path(resume)
    if overwrite:
        if resume is True:
            raise ConfigError(
                "resume_from_checkpoint: true continues the run in output_dir and "
                "overwrite_output_dir: true removes it: set one of them"
            )
        if found:  # (checked now; removed only once the run has loaded: clear_earlier_run)
            reads = {**inputs, "resume_from_checkpoint": None if ckpt is None else str(ckpt)}
            _check_removal(root, reads)
        return
    if not found or resume is True or (ckpt is not None and _within(ckpt.resolve(), root)):
        return
    elsewhere = (
        f" (resume_from_checkpoint names a checkpoint elsewhere, {str(ckpt)!r}: its run "
        "continues in a new output_dir)"
        if ckpt is not None
        else ""
    )
    raise ConfigError(
        f"output_dir {str(output_dir)!r} holds an earlier run's output: {describe(found)}"
        f"{elsewhere}. Set resume_from_checkpoint: true to continue that run, "
        "overwrite_output_dir: true to start over (its output is removed first), or choose "
        "another output_dir"
    )


def _check_removal(root: Path, inputs: dict[str, str | None]) -> list[Path]:
    """What ``overwrite_output_dir`` will remove from ``root``; an error if that holds what the
    run reads (``inputs``: setting -> path)."""
    victims = removable(root)
    for key, value in inputs.items():
        for item in (value or "").split(","):
            if not item.strip():
                continue
            path = Path(item.strip()).resolve()
            if path == root or any(_within(path, v) for v in victims):
                raise ConfigError(
                    f"overwrite_output_dir: true would remove {key} {item.strip()!r}, which is "
                    f"in output_dir {str(root)!r}; choose another output_dir"
                )
    return victims


def clear_earlier_run(cfg: Any) -> None:
    """``overwrite_output_dir``: remove the earlier run's output, once this run has loaded and
    passed every check (a run refused on the way leaves the earlier one whole); on the main
    process, the others waiting. Called just before training starts."""
    from fluid_npu.train.data import main_process_builds

    t, m = cfg.train, cfg.model
    if not t.overwrite_output_dir:
        return
    root = Path(t.output_dir).resolve()

    def clear() -> None:
        if not earlier_output(root):
            return
        resume = t.resume_from_checkpoint
        ckpt = None if resume is None or isinstance(resume, bool) or resume == "" else resume
        reads = {
            "model_name_or_path": m.model_name_or_path,
            "adapter_name_or_path": m.adapter_name_or_path,
            "resume_from_checkpoint": None if ckpt is None else str(ckpt),
        }
        victims = _check_removal(root, reads)
        _remove(root, victims)

    main_process_builds(clear, "output_dir")


def _remove(root: Path, victims: list[Path]) -> None:
    logger.warning(
        "overwrite_output_dir: removing the earlier run's output from %s: %s",
        root,
        describe(victims),
    )
    for path in victims:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Resuming: does the checkpoint belong to a run like this one?
# ---------------------------------------------------------------------------------------------


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def recorded_settings(ckpt: str | Path) -> dict[str, Any]:
    """What checkpoint ``ckpt`` says about the run that saved it (only the settings it records):
    ``stage``, ``finetuning_type``, ``lora_rank``, ``lora_alpha``, ``lora_target``, ``k_masks``,
    ``learning_rate``, ``base_fingerprint``, ``adapter_fingerprint``."""
    d = Path(ckpt)
    rec: dict[str, Any] = {}
    adapter = _json(d / "adapter_config.json")
    head = _json(d / KHEAD_CONFIG)
    if adapter is not None:
        targets = adapter.get("target_modules")
        rec.update(stage="fluid_stage1", finetuning_type="lora", lora_rank=adapter.get("r"),
                   lora_alpha=adapter.get("lora_alpha"))  # fmt: skip
        rec["lora_target"] = sorted(targets) if isinstance(targets, list) else targets
    elif (d / "config.json").is_file():
        rec.update(stage="fluid_stage1", finetuning_type="full")
    elif head is not None or (d / "model.safetensors").is_file():  # the K-head objective alone
        rec["stage"] = "fluid_stage2"
    if head is not None:
        rec.update(k_masks=head.get("k_max"), base_fingerprint=head.get("base_fingerprint"))
        rec["adapter_fingerprint"] = head.get("adapter_fingerprint") or ""
    meta = _json(d / META_FILE)
    if meta is not None:
        rec.update(stage=meta.get("stage"), base_fingerprint=meta.get("base_fingerprint"))
        if meta.get("stage", "fluid_stage1") == "fluid_stage1":  # (what Stage I trained with)
            rec.update(template=meta.get("template"), k_masks=meta.get("k_masks"))
    rec["learning_rate"] = _learning_rate(d / "scheduler.pt")
    return {k: v for k, v in rec.items() if v is not None}


def _learning_rate(path: Path) -> float | None:
    """The learning rate a checkpoint's schedule was built on: a resumed Trainer restores it (its
    optimizer and scheduler state) whatever ``learning_rate`` the new run sets. None when the file
    is missing or unreadable (the Trainer then says so) or its groups have different rates."""
    if not path.is_file():
        return None
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # (the Trainer reports an unreadable scheduler itself)
        return None
    rates = state.get("base_lrs") if isinstance(state, dict) else None
    if not isinstance(rates, list) or not rates or len(set(rates)) != 1:
        return None
    return float(rates[0])


_NAMED = {  # settings a user does not write as key: value
    "base_fingerprint": "the base model (model_name_or_path) with fingerprint",
    "adapter_fingerprint": "the Stage I adapter (adapter_name_or_path) with fingerprint",
}


def _show(value: Any) -> str:
    if isinstance(value, list) and len(value) > 3:  # (lora_target: peft's resolved module names)
        return f"{len(value)} modules ({', '.join(map(str, value[:3]))}, …)"
    return str(value)


def check_resume(ckpt: str | Path | None, settings: dict[str, Any]) -> None:
    """A ConfigError when checkpoint ``ckpt`` recorded another value of one of ``settings`` (this
    run's values; None: not compared) — it could not continue this run."""
    if ckpt is None:
        return
    recorded = recorded_settings(ckpt)
    for key, now in settings.items():
        then = recorded.get(key)
        if now is None or then is None or then == now:
            continue
        if key in _NAMED:
            was, fix = f"{_NAMED[key]} {then or 'none'}", "the same model (and adapter)"
            now_text = f"{_NAMED[key]} {now or 'none'}"
        else:
            was, now_text = f"{key}: {_show(then)}", f"{key}: {_show(now)}"
            fix = f"the {key} it was saved with" if isinstance(then, list) else f"{key}: {then}"
        raise ConfigError(
            f"resume_from_checkpoint {str(ckpt)!r} cannot continue this run: it was saved with "
            f"{was}, this run has {now_text}. Resume with {fix} to continue that run, or start a "
            "new one (overwrite_output_dir: true, or another output_dir without "
            "resume_from_checkpoint)"
        )


def prepare_run_dir(cfg: Any, args: Any, settings: dict[str, Any]) -> str | None:
    """Claim ``output_dir`` for the run of ``cfg`` (on the main process; the others get its answer)
    and return the checkpoint to resume from, checked against ``settings`` (``check_resume``).

    ``args``: the run's TrainingArguments (``args.device`` sets up torch.distributed first).
    """
    from fluid_npu.train.data import main_process_builds

    t, m = cfg.train, cfg.model
    args.device  # noqa: B018 - torch.distributed is up: one process claims, the others wait
    inputs = {
        "model_name_or_path": m.model_name_or_path,
        "adapter_name_or_path": m.adapter_name_or_path,
    }

    def claim() -> None:
        claim_output_dir(
            t.output_dir,
            resume=t.resume_from_checkpoint,
            overwrite=t.overwrite_output_dir,
            inputs=inputs,
        )

    resume = resolve_resume(t.resume_from_checkpoint, t.output_dir)
    check_resume(resume, settings)
    done = None if resume is None else finished_at(resume, t.max_steps, t.num_train_epochs)
    if done is not None:  # (transformers' Trainer would train a step past the end)
        raise ConfigError(
            f"resume_from_checkpoint {resume!r} is at step {done}, where the run ends "
            f"(max_steps / num_train_epochs): it has finished; its weights are the run's final "
            "ones (fluid merge or adapter_name_or_path take them), or raise max_steps to train on"
        )
    check_world_size(resume, cfg, args.world_size)
    check_run_shape(resume, t, args, fresh_start(resume, cfg))
    main_process_builds(claim, "output_dir")  # (checks only: clear_earlier_run removes)
    return resume
