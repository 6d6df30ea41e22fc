"""Stage II's trainable objective: the frozen Stage I backbone, the K-head and their loss.

``FrozenBackbone`` runs a fixed-k layout batch through the Stage I model without gradients and
labels every anchor with its horizon K* (``khead_labels``); ``KHeadObjective`` is the module the
Trainer trains — the head its only submodule, the backbone a plain attribute, so optimizers,
distributed wrappers and checkpoints see the head alone — and ``predict_heldout`` scores a trained
head on held-out anchors. ``fluid_npu.train.stage2`` puts them in a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fluid_npu.layout import IGNORE
from fluid_npu.model.attention import forward_hidden, lm_head
from fluid_npu.model.khead import KHead
from fluid_npu.train.khead_labels import (
    anchor_tables,
    gaussian_target,
    horizon_labels,
    khead_kl_loss,
)
from fluid_npu.train.stage1 import LayoutCollator
from fluid_ops.meta import AttnMeta

COUNTS = "label_counts"


@dataclass
class AnchorBatch:
    """What the head trains on: one row per anchor with at least one supervised slot."""

    hidden: torch.Tensor  # [A, H] final hidden state of the anchor's main token
    k_star: torch.Tensor  # [A] int64 label in 1…k_max
    n_valid: torch.Tensor  # [A] supervised slots of the anchor


class FrozenBackbone:
    """The Stage I model, frozen: runs a fixed-k layout batch and labels its anchors.

    Deliberately not an ``nn.Module``: whoever holds it (``KHeadObjective``) does not register it,
    so optimizers, distributed wrappers and checkpoints never see its parameters.
    """

    def __init__(self, model: nn.Module, *, rule: str, tau: float, k_max: int) -> None:
        self.model = model
        self.rule, self.tau, self.k_max = rule, tau, k_max
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    def to(self, device: torch.device | str) -> FrozenBackbone:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def anchors(self, inputs: dict[str, Any]) -> AnchorBatch:
        """Backbone forward (no gradient), per-slot CE / argmax, per-anchor labels K*."""
        self.model.eval()
        anchor, labels = inputs["anchor"], inputs["labels"]
        n_main = int(inputs["n_main"])
        meta = AttnMeta.self_attention(inputs["position_ids"], anchor, n_main=n_main)
        hidden, _ = forward_hidden(self.model, inputs["input_ids"], inputs["position_ids"], meta)
        is_slot = anchor >= 0
        ce_slots, argmax_slots = slot_stats(hidden[is_slot], lm_head(self.model), labels[is_slot])
        ce = torch.zeros(anchor.shape, dtype=torch.float32, device=anchor.device)
        argmax = torch.full_like(anchor, -1)
        ce[is_slot] = ce_slots
        argmax[is_slot] = argmax_slots
        table = anchor_tables(
            anchor, inputs["slot_index"], labels, ce, argmax, n_main=n_main, k_max=self.k_max
        )
        table = table.select(table.n_valid > 0)
        return AnchorBatch(
            hidden=hidden[table.row, table.col],
            k_star=horizon_labels(self.rule, table, self.tau),
            n_valid=table.n_valid,
        )


def slot_stats(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token CE (0 where the label is ignored) and argmax of ``head(hidden)``.

    A plain ``nn.Linear`` LM head goes through ``fluid_ops.token_stats`` (no ``[T, V]`` logits);
    an adapted head (LoRA on ``lm_head``) is called as a module, ``chunk`` tokens at a time.
    """
    if type(head) is nn.Linear:
        import fluid_ops

        stats = fluid_ops.token_stats(hidden, head.weight, labels, bias=head.bias)
        return stats.ce, stats.argmax
    ces, argmaxes = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start : start + chunk]).float()
        lab = labels[start : start + chunk]
        ces.append(F.cross_entropy(logits, lab, ignore_index=IGNORE, reduction="none"))
        argmaxes.append(logits.argmax(dim=-1))
    if not ces:
        return hidden.new_zeros(0, dtype=torch.float32), labels.new_zeros(0)
    return torch.cat(ces), torch.cat(argmaxes)


def head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The head in its own dtype (fp32, or bf16 under pure_bf16) whatever the autocast."""
    dtype = next(head.parameters()).dtype
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return head(hidden.to(dtype)).float()


class KHeadObjective(nn.Module):
    """What the Trainer trains: the K-head (the only submodule) and the Stage II loss.

    ``forward(**batch)`` returns ``{"loss", "khead_acc", "khead_label_mean"}``; it also counts the
    training labels in the buffer ``label_counts``, whose mode is the report's constant-K
    baseline. Being a buffer, the histogram is saved in every ``checkpoint-N`` and restored on
    resume, so a resumed run reports the same baseline as an uninterrupted one. Under several
    processes each step's counts are summed over them (one small all-reduce per training forward,
    made by every process whatever its batch holds), so every process holds the histogram of the
    whole global batch: the same as one process with the same global batch, resumed on any count.
    """

    def __init__(self, head: KHead, backbone: FrozenBackbone, sigma: float) -> None:
        super().__init__()
        self.head = head
        self.backbone = backbone  # a plain object: not registered, not trained, not saved
        self.sigma = sigma
        self.register_buffer(COUNTS, torch.zeros(head.k_max, dtype=torch.long))

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        batch = self.backbone.anchors(inputs)
        logits = head_logits(self.head, batch.hidden)
        if self.training:  # the training labels only, not a held-out evaluation's
            self._count(batch.k_star)
        if batch.k_star.numel() == 0:  # no supervised anchor in this batch: a zero with a graph
            zero = logits.sum() * 0.0
            nan = torch.tensor(float("nan"))
            return {"loss": zero, "khead_acc": nan, "khead_label_mean": nan}
        target = gaussian_target(batch.k_star, self.head.k_max, self.sigma)
        loss = khead_kl_loss(logits, target)
        with torch.no_grad():
            acc = ((logits.argmax(dim=-1) + 1) == batch.k_star).float().mean()
        return {
            "loss": loss,
            "khead_acc": acc,
            "khead_label_mean": batch.k_star.float().mean(),
        }

    @torch.no_grad()
    def _count(self, k_star: torch.Tensor) -> None:
        """Add this step's labels (every process's, summed) to ``label_counts``."""
        import torch.distributed as dist

        counts = torch.bincount(k_star - 1, minlength=self.head.k_max)
        counts = counts.to(self.label_counts.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = counts.float()  # (exact: a step's counts are far below 2**24; every back end
            dist.all_reduce(total)  # sums float32, not every one int64)
            counts = total.round().long()
        self.label_counts += counts


@torch.no_grad()
def predict_heldout(
    head: KHead,
    backbone: FrozenBackbone,
    dataset: Any,
    collator: LayoutCollator,
    batch_size: int,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K̂, K*)`` for every supervised anchor of ``dataset`` (CPU int64 tensors)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    device = backbone.device
    head = head.to(device).eval()
    preds, labels = [], []
    for batch in tqdm(loader, desc="Stage II held-out", disable=not progress):
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        anchors = backbone.anchors(inputs)
        preds.append((head_logits(head, anchors.hidden).argmax(dim=-1) + 1).cpu())
        labels.append(anchors.k_star.cpu())
    return torch.cat(preds), torch.cat(labels)
