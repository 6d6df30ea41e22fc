"""The datasets of a training run: tokenized once, on the main process, and shared by every rank.

``load_run_data`` builds the train split and the held-out split — ``val_size`` of the training data
or the separate ``eval_dataset`` (LLaMA-Factory's keys) — checks that the MASK token occurs in
neither, and adds the ``index`` column the layout draws are seeded by (plus a fixed ``epoch`` on the
held-out rows, so every evaluation scores the same layouts and ``eval_loss`` is comparable from one
evaluation to the next).

Under torchrun only rank 0 reads and tokenizes; the result (or its error) reaches the other ranks
with one ``broadcast_object_list``, so 8 processes do not tokenize the same corpus 8 times, and a
bad row fails every rank with the same message instead of hanging the others in a collective.

A ``datasets.Dataset`` backed by a cache file pickles as that file's path, which names rank 0's
local datasets cache. The ranks of one node read that file (one copy, in the page cache); when the
run spans several nodes (torchrun's ``LOCAL_WORLD_SIZE`` below ``WORLD_SIZE``) rank 0 sends the
splits with their rows instead (``with_rows``: an in-memory copy, sent once, through a gloo group
so the pickle is not staged in device memory as hccl / nccl would), so no rank needs the cache of
another node or a file system shared for it. Every rank but rank 0 then holds the tokenized data
in memory.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from fluid_npu.config import FluidConfig
from fluid_npu.errors import ConfigError, FluidError

logger = logging.getLogger(__name__)

T = TypeVar("T")
EVAL_EPOCH = 0  # the layout epoch of every held-out row


def main_process_builds(
    build: Callable[[], T],
    what: str = "the datasets",
    to_other_nodes: Callable[[T], T] | None = None,
) -> T:
    """``build()`` on rank 0 only; its result (or error) is shared with the other ranks.

    ``to_other_nodes``: what rank 0 sends in place of the result when the ranks span several nodes
    (a form that does not refer to files on rank 0's node); rank 0 keeps the result itself.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return build()
    # what goes to the ranks of other nodes, when there are any (every rank agrees)
    rows = to_other_nodes if spans_nodes(dist.get_world_size()) else None
    group = None  # (made before rank 0 builds: the ranks then wait in the broadcast, as before)
    if rows is not None and dist.get_backend() != "gloo":  # the rows go through host memory:
        group = dist.new_group(backend="gloo")  # hccl / nccl would stage the pickle on each device
    box: list[Any] = [None]
    failure: BaseException | None = None
    built: Any = None
    if dist.get_rank() == 0:
        try:
            built = build()
            send = built
            if rows is not None:
                send = rows(built)  # (rank 0 keeps its own, file-backed)
            box = [("ok", send)]
        except Exception as exc:  # every rank must still reach the broadcast below
            failure = exc
            message = str(exc) if isinstance(exc, FluidError) else f"{type(exc).__name__}: {exc}"
            box = [("error", (type(exc) if isinstance(exc, FluidError) else FluidError, message))]
    dist.broadcast_object_list(box, src=0, group=group)
    if group is not None:
        dist.destroy_process_group(group)
    kind, value = box[0]
    if failure is not None:
        raise failure
    if kind == "error":
        cls, message = value
        raise cls(f"{message} (raised on the main process while building {what})")
    if dist.get_rank() == 0:
        return built
    logger.info("%s: received from the main process", what)
    return value


def spans_nodes(world_size: int) -> bool:
    """Whether the run's ``world_size`` processes are on more than one node: torchrun's
    ``LOCAL_WORLD_SIZE`` (the processes of this node) is smaller; unknown (another launcher):
    assumed so."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return not local.isdigit() or int(local) < world_size


def with_rows(data: Any) -> Any:
    """``data`` (an ``SFTData``) whose splits hold their rows in memory: it pickles with them,
    not as the path of a local cache file."""
    data = copy.copy(data)
    data.train = data.train.flatten_indices(keep_in_memory=True)
    if data.eval is not None:
        data.eval = data.eval.flatten_indices(keep_in_memory=True)
    return data


def load_run_data(cfg: FluidConfig, tokenizer: Any, mask: Any) -> Any:
    """Tokenized train (+ held-out) data with ``index`` columns, shared from the main process
    (with their rows to the ranks of other nodes)."""
    return main_process_builds(lambda: _build(cfg, tokenizer, mask), to_other_nodes=with_rows)


def _build(cfg: FluidConfig, tokenizer: Any, mask: Any) -> Any:
    from fluid_npu.data import build_sft_dataset, token_occurs
    from fluid_npu.model.mask_token import check_unused

    data = build_sft_dataset(cfg.data, tokenizer)
    if cfg.data.eval_dataset:
        held = build_sft_dataset(
            dataclasses.replace(cfg.data, dataset=cfg.data.eval_dataset, val_size=0.0), tokenizer
        )
        data.eval = held.train
        data.stats.eval_examples = len(held.train)
    check_unused(
        mask,
        lambda tid: (
            token_occurs(data.train, tid)
            or (data.eval is not None and token_occurs(data.eval, tid))
        ),
    )
    data.train = data.train.add_column("index", list(range(len(data.train))))
    if data.eval is not None:
        n = len(data.eval)
        data.eval = data.eval.add_column("index", list(range(n)))
        data.eval = data.eval.add_column("epoch", [EVAL_EPOCH] * n)
    return data


def has_eval_split(cfg: FluidConfig) -> bool:
    """Whether the config holds out data (``val_size`` or ``eval_dataset``).

    This is Stage I's rule; Stage II holds examples out for its report even with ``val_size: 0``
    (``fluid_npu.train.khead_report.split_heldout``).
    """
    return bool(cfg.data.val_size) or bool(cfg.data.eval_dataset)


def evaluation_arguments(cfg: FluidConfig, held_out: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` that evaluate the held-out split every ``eval_steps``.

    ``held_out``: whether the run has held-out data to evaluate. With it, evaluation runs every
    ``eval_steps`` (default: ``logging_steps``) unless ``do_eval: false`` or an explicit
    ``eval_strategy`` says otherwise; asking for evaluation without it (``do_eval``, an
    ``eval_strategy`` other than ``no``, or ``eval_steps`` without ``do_eval: false``) is a
    ``ConfigError``.
    """
    extra = cfg.extra_training_args
    do_eval = extra.get("do_eval")
    strategy = extra.get("eval_strategy")
    if not held_out:
        if do_eval or strategy not in (None, "no") or (extra.get("eval_steps") and do_eval is None):
            raise ConfigError(
                "do_eval / eval_strategy / eval_steps ask for evaluation but nothing is held out: "
                "set val_size (a fraction or a number of examples) or eval_dataset"
            )
        return {}
    if do_eval is False:
        return {"do_eval": False, "eval_strategy": strategy or "no"}
    return {
        "do_eval": True,
        "eval_strategy": strategy or "steps",
        "eval_steps": extra.get("eval_steps") or cfg.train.logging_steps,
        "prediction_loss_only": True,
        "label_names": ["labels"],  # every batch has them: the Trainer then asks for the loss
    }
