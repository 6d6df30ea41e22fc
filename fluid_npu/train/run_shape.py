"""The shape of a run a checkpoint belongs to — its global batch and its wrapper — checked before
a resume.

A resumed Trainer continues the data and the schedule where they stopped, counted in *optimizer
steps*: it skips ``global_step × gradient_accumulation_steps`` batches of the new per-device size
on each process, and keeps the step total of the schedule it restores. So a run resumed with
another global batch (``world_size × per_device_train_batch_size × gradient_accumulation_steps``)
trains examples twice or never, and an epoch-based run can find itself past its new end and train
nothing; transformers says nothing of either. Every checkpoint therefore records the batch it was
saved with (``BATCH_FILE``), and ``check_run_shape`` refuses a resume with another one, naming the
``gradient_accumulation_steps`` that keeps it: on another number of processes with the same global
batch a resume goes on as the run would have (a tiny run resumed from 2 processes on 1 matched the
uninterrupted run to 1.5e-8; RNG states are per process, so dropout's draws are not the same ones).

DeepSpeed's ZeRO state also needs the process count that saved it (``check_world_size``), unless
the run loads DeepSpeed's universal checkpoints.

The wrapper is read from the checkpoint's own files (``saved_wrapper``), so checkpoints written
before ``BATCH_FILE`` existed are checked too: DeepSpeed's state (``global_stepN/``), FSDP's
(accelerate's ``optimizer*.bin`` / ``optimizer_N/``) and the plain Trainer's (``optimizer.pt``)
each load only under the wrapper that wrote them — otherwise the Trainer either fails once the
model has loaded, or (DeepSpeed's state under a plain run) silently starts the optimizer and the
schedule over.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fluid_npu.errors import ConfigError
from fluid_npu.io import write_text_atomic
from fluid_npu.train.checkpoint import zero_world_size

logger = logging.getLogger(__name__)

BATCH_FILE = "fluid_batch.json"
BATCH_KEYS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")
WRAPPERS = {  # (what it is, how to resume under it)
    "deepspeed": ("DeepSpeed", "with the deepspeed key (the config) it was saved with"),
    "fsdp": ("FSDP", "with the fsdp key (and fsdp_config) it was saved with"),
    "plain": ("neither DeepSpeed nor FSDP", "without the deepspeed and fsdp keys, as it was saved"),
}


def batch_shape(args: Any) -> dict[str, int]:
    """The batch of a run from its TrainingArguments: processes, per-device batch, accumulation."""
    return {key: int(getattr(args, key)) for key in BATCH_KEYS}


def run_wrapper(train: Any) -> str:
    """``deepspeed`` / ``fsdp`` / ``plain``: what wraps the model in a run with these training
    settings (the config's ``train`` section, or the TrainingArguments made from it)."""
    if getattr(train, "deepspeed", None):
        return "deepspeed"
    return "fsdp" if getattr(train, "fsdp", None) else "plain"


def record_batch(ckpt: str | Path, args: Any) -> None:
    """Write ``BATCH_FILE`` into checkpoint directory ``ckpt`` (the saving process, before it is
    published)."""
    shape = {**batch_shape(args), "wrapper": run_wrapper(args)}
    write_text_atomic(Path(ckpt) / BATCH_FILE, (json.dumps(shape, indent=2), "\n"))


def recorded_batch(ckpt: str | Path) -> dict[str, int] | None:
    """The batch ``ckpt`` recorded, or None (saved before the file existed, or unreadable)."""
    try:
        data = json.loads((Path(ckpt) / BATCH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    values = [data.get(key) for key in BATCH_KEYS]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return None
    return dict(zip(BATCH_KEYS, values))


def saved_wrapper(ckpt: str | Path) -> str | None:
    """What wrapped the model of the run that saved ``ckpt``, from its optimizer state's files;
    None when they do not say."""
    names = [(p.name, p.is_dir()) for p in Path(ckpt).iterdir()]
    if any(is_dir and name.startswith("global_step") for name, is_dir in names):
        return "deepspeed"
    if any(
        (name.startswith("optimizer") and name.endswith(".bin"))
        or (is_dir and name.startswith("optimizer_"))
        for name, is_dir in names
    ):
        return "fsdp"
    return "plain" if ("optimizer.pt", False) in names else None


def _global(shape: dict[str, int]) -> tuple[int, str]:
    w, b, a = (shape[key] for key in BATCH_KEYS)
    return w * b * a, f"{w} process{'' if w == 1 else 'es'} × {b} per device × {a} accumulated"


def check_run_shape(ckpt: str | None, train: Any, args: Any, fresh: str) -> None:
    """A ConfigError when checkpoint ``ckpt`` was saved under another wrapper than this run's
    (``train``: its config's section), or with another global batch than ``args`` (its
    TrainingArguments) make; ``fresh`` says how to start a new run from its weights instead."""
    if ckpt is None:
        return
    then_wrapper, now_wrapper = saved_wrapper(ckpt), run_wrapper(train)
    if then_wrapper is not None and then_wrapper != now_wrapper:
        raise ConfigError(
            f"resume_from_checkpoint {ckpt!r} holds optimizer state saved under "
            f"{WRAPPERS[then_wrapper][0]}, and this run uses {WRAPPERS[now_wrapper][0]}: the "
            "Trainer can load it only under the wrapper that wrote it (or would start the "
            f"optimizer and the schedule over). Resume {WRAPPERS[then_wrapper][1]}; or {fresh}"
        )
    then = recorded_batch(ckpt)
    if then is None:  # (saved by an earlier build, before every checkpoint recorded it)
        logger.warning(
            "%s records no global batch (%s): resume with the processes, "
            "per_device_train_batch_size and gradient_accumulation_steps it was saved with, or "
            "examples are trained twice or skipped",
            ckpt,
            BATCH_FILE,
        )
        return
    now = batch_shape(args)
    (g_then, said_then), (g_now, said_now) = _global(then), _global(now)
    if g_then == g_now:
        return
    w, b = now["world_size"], now["per_device_train_batch_size"]
    if g_then % (w * b) == 0:
        keep = f"gradient_accumulation_steps: {g_then // (w * b)} keeps it on {w} process"
        keep += "" if w == 1 else "es"
    elif g_then % w == 0:
        keep = (
            f"per_device_train_batch_size × gradient_accumulation_steps = {g_then // w} keeps it "
            f"on {w} process{'' if w == 1 else 'es'}"
        )
    else:
        saved = then["world_size"]
        keep = f"resume on {saved} process{'' if saved == 1 else 'es'}, as it was saved"
    raise ConfigError(
        f"resume_from_checkpoint {ckpt!r} was saved with a global batch of {g_then} ({said_then}) "
        f"and this run has {g_now} ({said_now}): a resume continues the data and the schedule "
        "counted in steps of the saved batch, so examples would be trained twice or skipped. "
        f"To go on: {keep}; or {fresh}"
    )


def check_world_size(ckpt: str | None, cfg: Any, world_size: int) -> None:
    """A ConfigError when checkpoint ``ckpt`` holds DeepSpeed ZeRO optimizer state split over
    another number of processes than this run's ``world_size``: DeepSpeed cannot load it (and
    would say so only once the model has loaded on every rank). A run whose DeepSpeed config
    loads universal checkpoints (``"checkpoint": {"load_universal": true}``, after DeepSpeed's
    ``ds_to_universal``) may resume on another count: DeepSpeed reshards those itself."""
    ds = cfg.train.deepspeed
    then = None if ckpt is None or ds is None or _loads_universal(ds) else zero_world_size(ckpt)
    if then is None or then == world_size:
        return
    raise ConfigError(
        f"resume_from_checkpoint {ckpt!r} holds DeepSpeed ZeRO optimizer state split over {then} "
        f"process{'' if then == 1 else 'es'} and this run has {world_size}: DeepSpeed cannot load "
        f"it on another count. Resume on {then} device{'' if then == 1 else 's'} "
        "(ASCEND_RT_VISIBLE_DEVICES or NPROC, and NNODES); or convert it with DeepSpeed's "
        'ds_to_universal and set "checkpoint": {"load_universal": true} in the DeepSpeed config; '
        f"or {fresh_start(ckpt, cfg)}"
    )


def fresh_start(ckpt: str | None, cfg: Any) -> str:
    """How to start a new run from checkpoint ``ckpt``'s weights instead of resuming it."""
    f = cfg.fluid
    if f.stage == "fluid_stage2":  # (no key continues a K-head's weights)
        return (
            "start Stage II over (overwrite_output_dir: true without resume_from_checkpoint): it "
            "trains the K-head alone"
        )
    key = "adapter_name_or_path" if f.finetuning_type == "lora" else "model_name_or_path"
    return (
        f"start a new run from its weights, with a new optimizer and schedule, in another "
        f"output_dir: {key}: {ckpt} without resume_from_checkpoint"
    )


def _loads_universal(path: str) -> bool:
    """Whether the DeepSpeed config at ``path`` loads universal checkpoints."""
    try:
        ds = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # (check_deepspeed_config names an unreadable file)
        return False
    section = ds.get("checkpoint") if isinstance(ds, dict) else None
    return isinstance(section, dict) and bool(section.get("load_universal"))
