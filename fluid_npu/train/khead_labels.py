"""Stage II supervision (DESIGN §1.2): per-anchor slot tables, labels K*, soft targets, loss.

The frozen backbone runs the §1.1 layout with exactly ``k_max`` slots per anchor and no reveal
noise. ``anchor_tables`` turns its per-token outputs into one row per anchor:

* ``ce[a, j-1]`` — cross-entropy of slot ``j`` of anchor ``a`` against its label;
* ``correct[a, j-1]`` — whether slot ``j``'s argmax equals its label;
* ``valid[a, j-1]`` — slot ``j`` exists and has a label, **and so do slots 1…j-1**. Slots past the
  end of the example are never created by the layout, and a slot whose label is a prompt token
  (e.g. the newline after the end-of-turn token) cannot be scored; both end the anchor's valid run.
  ``n_valid = valid.sum(-1)`` ≤ ``k_max``; anchors with ``n_valid = 0`` carry no evidence and are
  dropped by the callers.

Label rules (``khead_label``), both in ``1…k_max`` and ``≤ max(1, n_valid)``:

* ``ce_threshold`` (reference): the largest ``k ≤ n_valid`` with ``mean(ce_1…ce_k) < τ``, else 1.
  Missing slots are excluded, never counted as zero loss.
* ``accept_length``: ``max(1, a)`` where ``a`` is the number of leading valid slots whose argmax
  equals the label — the tokens a lossless verifier would accept when the data is the model's own
  greedy output. ``a = 0`` maps to 1 because horizon 0 is not a class of the head (the sampler
  clamps K to ``[k_min, k_max]`` anyway).

The head's target is a discretised Gaussian over ``1…k_max`` centred at ``K*`` (σ =
``khead_sigma``), normalised; the loss is ``KL(Q ‖ P_φ)`` with ``P_φ = softmax(head logits)``,
averaged over anchors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fluid_npu.layout import IGNORE

LABEL_RULES = ("ce_threshold", "accept_length")


@dataclass
class AnchorTable:
    """Per-anchor slot statistics of one collated batch (``A`` anchors, ``k_max`` columns)."""

    row: torch.Tensor  # [A] batch row of the anchor
    col: torch.Tensor  # [A] anchor column c = index of its main token in the row
    ce: torch.Tensor  # [A, k_max] float32, 0 where not valid
    correct: torch.Tensor  # [A, k_max] bool, False where not valid
    valid: torch.Tensor  # [A, k_max] bool, a leading run per row

    @property
    def n_valid(self) -> torch.Tensor:
        return self.valid.sum(dim=-1)

    def select(self, keep: torch.Tensor) -> AnchorTable:
        return AnchorTable(
            self.row[keep], self.col[keep], self.ce[keep], self.correct[keep], self.valid[keep]
        )


def leading_run(mask: torch.Tensor) -> torch.Tensor:
    """``mask[..., j]`` and every column before it (the leading run of True along the last dim)."""
    return torch.cumprod(mask.to(torch.int64), dim=-1).bool()


def anchor_tables(
    anchor: torch.Tensor,
    slot_index: torch.Tensor,
    labels: torch.Tensor,
    ce: torch.Tensor,
    argmax: torch.Tensor,
    n_main: int,
    k_max: int,
) -> AnchorTable:
    """Gather the slot tokens of a collated batch into per-anchor tables.

    ``anchor``, ``slot_index``, ``labels`` are the ``[B, L]`` layout tensors; ``ce`` and ``argmax``
    are per-token ``[B, L]`` (their values on non-slot tokens are ignored). Anchors come out sorted
    by (row, column).
    """
    is_slot = anchor >= 0
    rows, cols = is_slot.nonzero(as_tuple=True)
    a = anchor[rows, cols]
    j = slot_index[rows, cols] - 1
    if (j < 0).any() or (j >= k_max).any():
        raise ValueError(f"slot indices must lie in 1…{k_max} (the layout's k_max)")
    keys, inverse = torch.unique(rows * n_main + a, return_inverse=True)
    n_anchors = int(keys.numel())
    device = anchor.device
    lab = labels[rows, cols]
    has_label = torch.zeros(n_anchors, k_max, dtype=torch.bool, device=device)
    has_label[inverse, j] = lab != IGNORE
    valid = leading_run(has_label)
    ce_t = torch.zeros(n_anchors, k_max, dtype=torch.float32, device=device)
    ce_t[inverse, j] = ce[rows, cols].float()
    hit = torch.zeros(n_anchors, k_max, dtype=torch.bool, device=device)
    hit[inverse, j] = argmax[rows, cols] == lab
    return AnchorTable(
        row=keys // n_main,
        col=keys % n_main,
        ce=torch.where(valid, ce_t, torch.zeros_like(ce_t)),
        correct=hit & valid,
        valid=valid,
    )


def ce_threshold_labels(ce: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """K* = the largest ``k ≤ n_valid`` with ``mean(ce_1…ce_k) < tau``, else 1 (``[A]`` int64)."""
    k = torch.arange(1, ce.shape[-1] + 1, device=ce.device)
    running_mean = torch.cumsum(torch.where(valid, ce.float(), 0.0), dim=-1) / k
    ok = valid & (running_mean < tau)
    largest = torch.where(ok, k, torch.zeros_like(k)).amax(dim=-1)
    return largest.clamp(min=1)


def accept_length_labels(correct: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """K* = ``max(1, number of leading valid slots whose argmax equals the label)`` (``[A]``)."""
    return leading_run(correct & valid).sum(dim=-1).clamp(min=1)


def horizon_labels(rule: str, table: AnchorTable, tau: float) -> torch.Tensor:
    """K* for every anchor of ``table`` under ``rule`` (``ce_threshold`` or ``accept_length``)."""
    if rule == "ce_threshold":
        return ce_threshold_labels(table.ce, table.valid, tau)
    if rule == "accept_length":
        return accept_length_labels(table.correct, table.valid)
    raise ValueError(f"unknown khead_label {rule!r}; choose one of {', '.join(LABEL_RULES)}")


def gaussian_target(k_star: torch.Tensor, k_max: int, sigma: float) -> torch.Tensor:
    """``[A, k_max]`` discretised Gaussian over ``K = 1…k_max`` centred at ``K*``, rows sum to 1."""
    k = torch.arange(1, k_max + 1, device=k_star.device, dtype=torch.float32)
    logits = -((k[None, :] - k_star[:, None].float()) ** 2) / (2.0 * sigma * sigma)
    return torch.softmax(logits, dim=-1)  # exp(·) normalised, computed without underflow to 0/0


def khead_kl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``KL(Q ‖ P_φ)`` averaged over anchors; ``logits`` are the head's, ``target`` is ``Q``."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(log_p, target, reduction="batchmean")


def horizon_metrics(pred: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """Exact accuracy, accuracy within ±1 and mean absolute error of predicted horizons."""
    if pred.numel() == 0:
        return {"exact_acc": float("nan"), "within1_acc": float("nan"), "mae": float("nan")}
    diff = (pred.long() - label.long()).abs()
    return {
        "exact_acc": float((diff == 0).float().mean()),
        "within1_acc": float((diff <= 1).float().mean()),
        "mae": float(diff.float().mean()),
    }
