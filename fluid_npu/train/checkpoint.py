"""Trainer checkpoints that are never half-written, and checked before a run resumes from one.

transformers' Trainer writes ``checkpoint-N`` in place — weights, optimizer, scheduler, RNG states,
then ``trainer_state.json`` — so a run killed mid-save leaves a directory that looks like a
checkpoint and that ``get_last_checkpoint`` would pick. Here every process writes into
``<output_dir>/.tmp-checkpoint-N/checkpoint-N`` instead (the same path on every rank, so DeepSpeed
and FSDP shards land together), and the saving process renames it to ``<output_dir>/checkpoint-N``
once everyone is done: a ``checkpoint-N`` directory is complete by construction, and leftovers of a
killed save are dot-directories nobody reads (removed by the next run). ``trainer_state.json``'s
``best_model_checkpoint`` is rewritten from the staging path to the final one as it is published.

Before a resume the chosen checkpoint is validated (``validate_checkpoint``): ``trainer_state.json``
and every JSON file parse, weights are present, each ``*.safetensors`` file is exactly as long as
its header says, and each torch archive (optimizer, scheduler, RNG, DeepSpeed shards) has its zip
directory intact. A truncated or corrupt checkpoint is a ``CheckpointError`` naming the file, raised
before the Trainer touches it. ``resume_from_checkpoint: true`` picks the newest checkpoint that
passes (``last_complete_checkpoint``), skipping damaged ones with a warning. A checkpoint without
the optimizer's state (``save_only_model``) cannot continue a run as it would have gone on, and a
run's folder given as a checkpoint is named as such.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from fluid_npu.errors import CheckpointError
from fluid_npu.io import safetensors_problem, write_text_atomic

logger = logging.getLogger(__name__)

PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
STAGING_PREFIX = ".tmp-"
CHECKPOINT_RE = re.compile(rf"^{PREFIX}-(\d+)$")
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
TORCH_ARCHIVES = (".pt", ".pth", ".bin")
# DeepSpeed's ZeRO optimizer state, one file per data-parallel rank in global_stepN/
# (DeepSpeedEngine._get_rank_zero_ckpt_name; older releases wrote "..._mp_rank_00optim_states.pt")
ZERO_SHARD_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_?optim_states\.pt$")


def checkpoint_step(path: str | Path) -> int | None:
    """N for a directory named ``checkpoint-N``, else None."""
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def staging_root(run_dir: str | Path, step: int) -> Path:
    """Where every rank writes checkpoint ``step`` before it is renamed into ``run_dir``."""
    return Path(run_dir) / f"{STAGING_PREFIX}{PREFIX}-{step}"


def remove_stale_staging(run_dir: str | Path) -> list[Path]:
    """Delete leftovers of killed saves (``.tmp-checkpoint-N``, ``.tmp-old-checkpoint-N``)."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.glob(f"{STAGING_PREFIX}*{PREFIX}-*") if p.is_dir()]
    for path in stale:
        logger.warning("removing %s: an interrupted checkpoint save", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def publish_checkpoint(staged: Path, target: Path) -> Path:
    """Flush ``staged`` to disk and rename it to ``target`` (replacing an older one)."""
    _unstage_best(staged, target)
    for path in sorted(staged.rglob("*")):
        if path.is_file():
            _fsync(path)
    old = None
    if target.exists():  # the same step saved again (e.g. resumed from an earlier checkpoint)
        old = target.with_name(f"{STAGING_PREFIX}old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staged, target)
    _fsync(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if staged.parent.name.startswith(STAGING_PREFIX) and staged.parent != target.parent:
        shutil.rmtree(staged.parent, ignore_errors=True)
    return target


def _unstage_best(staged: Path, target: Path) -> None:
    """``best_model_checkpoint`` in ``staged``'s trainer state, written while the checkpoint was
    staged (``.../.tmp-checkpoint-N/checkpoint-N``), made the published path."""
    file = staged / TRAINER_STATE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # validate_checkpoint reports a missing or broken state
    best = state.get("best_model_checkpoint") if isinstance(state, dict) else None
    if not isinstance(best, str):
        return
    where = Path(best)
    if where.parent.name.startswith(STAGING_PREFIX) and where.parent.parent == target.parent:
        state["best_model_checkpoint"] = str(target.parent / where.name)
        # transformers' own layout (TrainerState.save_to_json)
        write_text_atomic(file, (json.dumps(state, indent=2, sort_keys=True), "\n"))


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. a file system that cannot open directories: nothing more to flush
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # fsync is unsupported on some network file systems; the rename is still atomic
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _bad(ckpt: Path, file: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {ckpt} is incomplete or corrupt: {file.name} {why}; resume from an earlier "
        "checkpoint (resume_from_checkpoint: true picks the last complete one) or start afresh"
    )


def _check_safetensors(ckpt: Path, file: Path) -> None:
    """The header parses and the file is exactly as long as the header says."""
    why = safetensors_problem(file)
    if why is not None:
        raise _bad(ckpt, file, why)


def _check_archive(ckpt: Path, file: Path) -> None:
    """A torch.save file is a zip archive; truncation destroys its central directory."""
    try:
        with zipfile.ZipFile(file) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise _bad(ckpt, file, f"is truncated or not a torch archive ({exc})") from None


def _check_json(ckpt: Path, file: Path) -> object:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(ckpt, file, f"is truncated or not JSON ({exc})") from None


def _has_weights(ckpt: Path) -> bool:
    if any((ckpt / name).is_file() for name in WEIGHT_FILES):
        return True
    # DeepSpeed (global_stepN/) and FSDP sharded (pytorch_model_fsdp_*) checkpoints
    return any(ckpt.glob("global_step*")) or any(ckpt.glob("pytorch_model_fsdp*"))


def _has_optimizer(ckpt: Path) -> bool:
    """Whether the Trainer saved its optimizer there (a file, FSDP's folder, DeepSpeed's)."""
    return any(
        p.name.startswith("optimizer") or (p.is_dir() and p.name.startswith("global_step"))
        for p in ckpt.iterdir()
    )


def zero_world_size(ckpt: str | Path) -> int | None:
    """How many processes a DeepSpeed checkpoint's ZeRO optimizer state is split over (its
    ``global_stepN/[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` files, one per rank R);
    None when it holds no such state (saved without DeepSpeed, or without ZeRO)."""
    ranks = {
        int(match.group(1))
        for step in Path(ckpt).glob("global_step*")
        if step.is_dir()
        for file in step.iterdir()
        if (match := ZERO_SHARD_RE.match(file.name))
    }
    return len(ranks) or None


def finished_at(ckpt: str | Path, max_steps: int, epochs: float) -> int | None:
    """The step checkpoint ``ckpt`` ended its run at, where it reached the end a run of
    ``max_steps`` (> 0) or, without one, of ``epochs`` would train to; else None. transformers'
    Trainer resumed there trains one step past it."""
    state = json.loads((Path(ckpt) / TRAINER_STATE).read_text(encoding="utf-8"))
    step, total = state.get("global_step"), state.get("max_steps")
    if max_steps > 0:
        return step if step >= max_steps else None
    same_epochs = epochs <= (state.get("num_train_epochs") or 0)
    return step if same_epochs and isinstance(total, int) and total and step >= total else None


def validate_checkpoint(path: str | Path) -> Path:
    """Return ``path`` when it is a complete Trainer checkpoint, else raise a CheckpointError."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(
            f"resume_from_checkpoint {str(ckpt)!r} is not a directory; pass a checkpoint-N "
            "directory of an earlier run, or true for the last complete one in output_dir"
        )
    state = ckpt / TRAINER_STATE
    if not state.is_file() and checkpoint_step(ckpt) is None:  # (a run's folder, a model's)
        last = last_complete_checkpoint(ckpt)
        raise CheckpointError(
            f"resume_from_checkpoint {str(ckpt)!r} is a run's output_dir or a model folder, not "
            "a checkpoint: pass one of its checkpoint-N directories"
            + (f" (its last complete one: {last})" if last else "")
            + ", or resume_from_checkpoint: true with output_dir set to the run's folder"
        )
    if not state.is_file():
        raise _bad(ckpt, state, "is missing (the save did not finish)")
    data = _check_json(ckpt, state)
    if not isinstance(data, dict) or not isinstance(data.get("global_step"), int):
        raise _bad(ckpt, state, "has no global_step")
    if not _has_weights(ckpt):
        raise _bad(ckpt, ckpt / WEIGHT_FILES[0], "is missing: the checkpoint holds no weights")
    if not _has_optimizer(ckpt):  # (save_only_model: the run cannot go on as it would have)
        raise CheckpointError(
            f"checkpoint {ckpt} holds the weights only (no optimizer state: saved with "
            "save_only_model), so a resume would restart the schedule and the optimizer; "
            "continue from its weights as a new run (adapter_name_or_path: the checkpoint), or "
            "resume from a checkpoint saved without save_only_model"
        )
    for file in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        if file.suffix == ".safetensors":
            _check_safetensors(ckpt, file)
        elif file.suffix in TORCH_ARCHIVES:
            _check_archive(ckpt, file)
        elif file.suffix == ".json":
            index = _check_json(ckpt, file)
            if file.name.endswith(".index.json") and isinstance(index, dict):
                for shard in sorted(set((index.get("weight_map") or {}).values())):
                    if not (file.parent / shard).is_file():
                        raise _bad(ckpt, file.parent / shard, "is missing (listed in the index)")
    return ckpt


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` directories of ``run_dir`` that pass validation, oldest first."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = sorted(
        (p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
        key=lambda p: checkpoint_step(p) or 0,
    )
    good = []
    for path in found:
        try:
            good.append(validate_checkpoint(path))
        except CheckpointError as exc:
            logger.warning("skipping %s: %s", path.name, exc)
    return good


def last_complete_checkpoint(run_dir: str | Path | None) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``run_dir`` (None when there is none)."""
    if not run_dir:
        return None
    good = complete_checkpoints(run_dir)
    return good[-1] if good else None


def resolve_resume(value: str | bool | None, output_dir: str | Path | None) -> str | None:
    """The checkpoint directory a run resumes from, validated, or None for a fresh start.

    ``value`` is the config's ``resume_from_checkpoint``: a path (validated: a truncated checkpoint
    is a CheckpointError naming the file), ``true`` (the last complete checkpoint in
    ``output_dir``; none is an error), or ``false`` / None.
    """
    if value is None or value is False or value == "":
        return None
    if value is True:
        last = last_complete_checkpoint(output_dir)
        if last is None:
            raise CheckpointError(
                f"resume_from_checkpoint: true, but output_dir {str(output_dir)!r} holds no "
                "complete checkpoint-N directory; remove the key to start a new run (with "
                "overwrite_output_dir: true if the directory holds an earlier run's output)"
            )
        logger.info("resuming from %s", last)
        return str(last)
    return str(validate_checkpoint(value))
