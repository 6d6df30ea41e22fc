"""Stage I — strictly causal alignment (DESIGN §1.1) on transformers' Trainer.

Each batch is expanded per example by ``fluid_npu.layout`` (anchors, MASK slots, reveal noise),
run through the backbone once with the FLUID visibility, and trained with
``L = w_ar·CE(main) + w_diff·CE(slots)`` (``sum_of_means``) or one mean over both (``pooled``).
The vocabulary projection is fused with the loss (``fluid_ops.linear_cross_entropy``) unless
``loss_impl: reference`` asks for materialised logits.

``run_stage1(cfg)`` is what ``fluid train`` calls for ``stage: fluid_stage1``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, TrainerCallback

from fluid_npu.config import FluidConfig
from fluid_npu.errors import ConfigError
from fluid_npu.layout import IGNORE, LayoutConfig, collate, expand, noise_vocabulary
from fluid_npu.model.attention import forward_hidden, lm_head
from fluid_npu.train.sharded import through_forward
from fluid_ops.meta import MAIN, AttnMeta

logger = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "labels", "position_ids", "anchor", "slot_index")


class LayoutCollator:
    """Expands each example with its dataset index and the current epoch, then batches them.

    A row with its own ``epoch`` (the held-out rows, ``fluid_npu.train.data``) keeps that layout
    draw whatever the training epoch.
    """

    def __init__(self, layout: LayoutConfig) -> None:
        self.layout = layout
        self.epoch = 0

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        epoch = self.epoch
        expanded = [
            expand(f["input_ids"], f["labels"], self.layout, int(f["index"]), f.get("epoch", epoch))
            for f in features
        ]
        batch = collate(expanded, self.layout.pad_id)
        out: dict[str, Any] = {k: getattr(batch, k) for k in BATCH_KEYS}
        out["n_main"] = batch.n_main
        return out


class EpochCallback(TrainerCallback):
    """Tells the collator which epoch it is drawing layouts for (same on resume)."""

    def __init__(self, collator: LayoutCollator) -> None:
        self.collator = collator

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.collator.epoch = int(state.epoch or 0)


def use_fused_loss(model: PreTrainedModel, loss_impl: str) -> bool:
    """The fused linear+CE needs a plain LM head (no adapter on it)."""
    if loss_impl == "reference":
        return False
    head = lm_head(model)
    plain = type(head) is torch.nn.Linear
    if loss_impl == "fused" and not plain:
        raise ConfigError(
            "loss_impl: fused needs a plain LM head but lora_target includes lm_head; "
            "use loss_impl: auto (or reference), or drop lm_head from lora_target"
        )
    return plain


def token_ce(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, fused: bool
) -> torch.Tensor:
    """Per-token cross-entropy ``[T]`` of ``hidden [T, H]`` against ``labels [T]`` (fp32).

    The fused path runs as the head's own forward (``through_forward``), so its weight is
    gathered under ZeRO-3 / FSDP as for ``head(hidden)``; the reference path calls the head.
    """
    if fused:
        import fluid_ops

        def fused_ce(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return fluid_ops.linear_cross_entropy(
                x, head.weight, y, bias=head.bias, reduction="none"
            )

        return through_forward(head, fused_ce, hidden, labels)
    return F.cross_entropy(head(hidden).float(), labels, reduction="none")


def stage1_loss(
    model: PreTrainedModel,
    inputs: dict[str, Any],
    *,
    reduction: str = "sum_of_means",
    w_ar: float = 1.0,
    w_diff: float = 1.0,
    fused: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The §1.1 loss of one collated batch, and its parts (``loss_ar``, ``loss_diff``)."""
    anchor = inputs["anchor"]
    meta = AttnMeta.self_attention(inputs["position_ids"], anchor, n_main=int(inputs["n_main"]))
    hidden, _ = forward_hidden(model, inputs["input_ids"], inputs["position_ids"], meta)
    labels = inputs["labels"]
    supervised = ((anchor == MAIN) | (anchor >= 0)) & (labels != IGNORE)
    ce = token_ce(hidden[supervised], lm_head(model), labels[supervised], fused)  # one head call
    is_main = anchor[supervised] == MAIN
    sums = [ce[is_main].sum(), ce[~is_main].sum()]
    counts = [is_main.sum(), (~is_main).sum()]
    zero = hidden.new_zeros((), dtype=torch.float32)
    mean_ar = sums[0] / counts[0] if counts[0] > 0 else zero + 0 * sums[0]
    mean_diff = sums[1] / counts[1] if counts[1] > 0 else zero + 0 * sums[1]
    if reduction == "pooled":
        total = (counts[0] + counts[1]).clamp(min=1)
        loss = (sums[0] + sums[1]) / total
    else:
        loss = w_ar * mean_ar + w_diff * mean_diff
    return loss, {"loss_ar": mean_ar.detach(), "loss_diff": mean_diff.detach()}


def layout_config(cfg: FluidConfig, tokenizer: Any, mask_id: int, vocab_size: int) -> LayoutConfig:
    f = cfg.fluid
    return LayoutConfig(
        mask_id=mask_id,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        k_max=f.k_masks,
        anchor_prob=f.anchor_prob,
        noise_ratio=f.noise_ratio,
        max_slots_ratio=f.max_slots_ratio,
        seed=cfg.train.seed,
        noise_ids=noise_vocabulary(tokenizer, vocab_size),
    )


def stage1_objective(session: Any) -> tuple[Any, LayoutCollator, list[TrainerCallback]]:
    """The loss function, collator and callbacks that ``session.train`` needs for Stage I."""
    cfg = session.cfg
    fused = use_fused_loss(session.model, cfg.model.loss_impl)
    collator = LayoutCollator(
        layout_config(cfg, session.tokenizer, session.mask.id, session.base_vocab_size)
    )

    def compute(model: PreTrainedModel, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        return stage1_loss(
            model,
            inputs,
            reduction=cfg.fluid.loss_reduction,
            w_ar=cfg.fluid.ar_loss_weight,
            w_diff=cfg.fluid.diff_loss_weight,
            fused=fused,
        )

    return compute, collator, [EpochCallback(collator)]


def run_stage1(cfg: FluidConfig) -> dict[str, Any]:
    """Train Stage I from a config; returns the ``run.json`` record (also written to disk)."""
    from fluid_npu.train.session import TrainingSession

    session = TrainingSession(cfg, stage="fluid_stage1")
    compute, collator, callbacks = stage1_objective(session)
    return session.train(compute, collator, callbacks=callbacks)
