"""The Stage II held-out report: how well the K-head predicts K*, against the best constant K.

* ``split_heldout`` — the examples the report is measured on: the ``val_size`` split when the
  config has one, otherwise ``AUTO_HELDOUT_FRACTION`` of the examples (at least 1, at most
  ``AUTO_HELDOUT_MAX``), drawn with the run's seed and removed from Stage II training — of the
  conversations, whole, where a template split them into one example per response turn.
* ``heldout_figures`` — the head's exact accuracy, accuracy within ±1 and mean |K̂ − K*|, and the
  same figures for a constant predictor. The constant is chosen without looking at the held-out
  labels: the mode of the training labels (``const_k``). The constant that would be best *on the
  held-out labels themselves* is reported too (``const_oracle_k``), as an upper bound for any
  constant predictor.
* ``plot_khead_report`` — a PNG (matplotlib, Agg back end) of the label and prediction
  distributions and their confusion matrix. matplotlib is optional: without it the plot is
  skipped with a warning and the figures are still written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from fluid_npu.errors import DataError
from fluid_npu.train.khead_labels import horizon_metrics

logger = logging.getLogger(__name__)

AUTO_HELDOUT_FRACTION = 0.1
AUTO_HELDOUT_MAX = 1000
PLOT_FILE = "khead_report.png"


def split_heldout(
    train: Any,
    evaluation: Any,
    seed: int,
    given: str = "val_size",
    groups: list[int] | None = None,
) -> tuple[Any, Any, str]:
    """``(train, heldout, source)``: the held-out data the config gave (``given`` names where it
    came from: ``val_size`` or ``eval_dataset``), or a seeded part of ``train`` — whole
    conversations where ``groups`` (each example's, ``SFTData.train_groups``) says a template
    split them into one example per response turn."""
    if evaluation is not None and len(evaluation) > 0:
        return train, evaluation, given
    n = len(train)
    if n < 2:
        raise DataError(
            f"Stage II holds out examples for its report but the dataset has {n}; add examples"
        )
    if groups is None or len(set(groups)) == n:
        held = min(max(1, round(AUTO_HELDOUT_FRACTION * n)), AUTO_HELDOUT_MAX)
        parts = train.train_test_split(test_size=held, seed=seed, shuffle=True)
        return parts["train"], parts["test"], f"auto: {held} of {n} examples (val_size is 0)"
    units = sorted(set(groups))
    if len(units) < 2:
        raise DataError(
            "Stage II holds out whole conversations for its report but the dataset has one; "
            "add conversations"
        )
    held = min(max(1, round(AUTO_HELDOUT_FRACTION * len(units))), AUTO_HELDOUT_MAX)
    parts = Dataset.from_dict({"group": units}).train_test_split(test_size=held, seed=seed)
    out = set(parts["test"]["group"])
    kept = train.select([i for i, g in enumerate(groups) if g not in out])
    heldout = train.select([i for i, g in enumerate(groups) if g in out])
    what = f"auto: {held} of {len(units)} conversations, {len(heldout)} of {n} examples"
    return kept, heldout, f"{what} (val_size is 0)"


def histogram(values: torch.Tensor, k_max: int) -> list[int]:
    """Counts of ``K = 1…k_max`` in ``values``."""
    return torch.bincount(values.long().cpu() - 1, minlength=k_max)[:k_max].tolist()


def mode_k(counts: torch.Tensor | list[int]) -> int:
    """The most frequent K (ties → the smallest) from counts over ``1…k_max``."""
    c = torch.as_tensor(counts)
    if int(c.sum()) == 0:
        raise ValueError("no labels were counted")
    return int(torch.argmax(c)) + 1  # argmax returns the first maximal index


def heldout_figures(
    pred: torch.Tensor, label: torch.Tensor, const_k: int, k_max: int
) -> dict[str, Any]:
    """Head and constant-K figures on the held-out anchors (see the module docstring)."""
    if label.numel() == 0:
        raise DataError(
            "the held-out examples have no anchor with a supervised slot (responses too short); "
            "raise val_size or use longer responses"
        )
    head = horizon_metrics(pred, label)
    const = horizon_metrics(torch.full_like(label, const_k), label)
    label_counts = torch.bincount(label.long().cpu() - 1, minlength=k_max)[:k_max]
    oracle_k = mode_k(label_counts)
    oracle = horizon_metrics(torch.full_like(label, oracle_k), label)
    return {
        "khead_exact_acc": head["exact_acc"],
        "khead_within1_acc": head["within1_acc"],
        "khead_mae": head["mae"],
        "const_k": int(const_k),
        "const_exact_acc": const["exact_acc"],
        "const_within1_acc": const["within1_acc"],
        "const_mae": const["mae"],
        "const_oracle_k": oracle_k,
        "const_oracle_exact_acc": oracle["exact_acc"],
        "heldout_anchors": int(label.numel()),
        "heldout_label_mean": float(label.float().mean()),
        "heldout_pred_mean": float(pred.float().mean()),
        "heldout_label_hist": label_counts.tolist(),
        "heldout_pred_hist": histogram(pred, k_max),
    }


def plot_khead_report(
    pred: torch.Tensor, label: torch.Tensor, const_k: int, k_max: int, path: str | Path
) -> Path | None:
    """Write the PNG; returns its path, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        logger.warning("matplotlib is not installed (%s): the K-head report has no PNG", exc)
        return None
    ks = torch.arange(1, k_max + 1)
    lab_h = torch.tensor(histogram(label, k_max), dtype=torch.float64)
    pred_h = torch.tensor(histogram(pred, k_max), dtype=torch.float64)
    confusion = torch.zeros(k_max, k_max)
    cells = (label.long().cpu() - 1, pred.long().cpu() - 1)
    confusion.index_put_(cells, torch.ones(len(label)), accumulate=True)
    confusion = confusion / confusion.sum(dim=1, keepdim=True).clamp(min=1)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.4
    ax1.bar(ks - width / 2, lab_h / lab_h.sum(), width, label="label K*")
    ax1.bar(ks + width / 2, pred_h / max(pred_h.sum(), 1.0), width, label="K-head K̂")
    ax1.axvline(const_k, color="grey", linestyle="--", label=f"constant K = {const_k}")
    ax1.set_xlabel("horizon K")
    ax1.set_ylabel("fraction of held-out anchors")
    ax1.set_xticks(ks.tolist())
    ax1.legend()
    ax1.set_title(f"held-out K distributions ({len(label)} anchors)")
    im = ax2.imshow(confusion.numpy(), origin="lower", cmap="viridis", vmin=0, vmax=1)
    ax2.set_xticks(range(k_max), [str(k) for k in ks.tolist()])
    ax2.set_yticks(range(k_max), [str(k) for k in ks.tolist()])
    ax2.set_xlabel("predicted K̂")
    ax2.set_ylabel("label K*")
    ax2.set_title("P(K̂ | K*)")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
