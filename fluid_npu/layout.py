"""The Stage I layout (DESIGN §1.1): one example expanded into a main stream plus anchored slots.

``expand`` turns a tokenized example (``input_ids``, ``labels`` with -100 on prompt tokens) into the
expanded sequence that one strictly causal forward pass trains on:

* main stream: positions ``0…N-1``, input ``x_i``, label ``x_{i+1}`` where that is a response token;
* anchors: each column ``c`` whose next token is a response token, with probability
  ``anchor_prob``, drawn per example; and always the column just before each run of those, whose
  slots are what the sampler's prefill drafts from (the prompt's second to last token; DESIGN
  §1.1; the ``max_slots_ratio`` budget drops it last); ``k_c ~ U{1…k_max}`` slots (every anchor
  gets ``k_max`` with ``fixed_k``);
* slot ``(c, j)``: position ``c+j``, input ``MASK`` (revealed to ``x_{c+j}`` with probability
  ``r_c ~ U(0,1)``, then replaced by a random token with probability ``noise_ratio``), label
  ``x_{c+j+1}`` (-100 on a prompt token). Slots are clipped so every slot's label exists.

Where a slot sits is ``slot_block``'s rule, the one place it is written: the sampler's drafts
(the prefill's, the decode step's blocks, the reference loop's) are placed by it too.

Draws come from a generator seeded by ``(seed, example index, epoch)``: a resumed run, or the same
example in another process, gets the same layout. ``collate`` batches expanded examples with the
main streams right-padded to a common ``n_main`` and the slot regions after them, and builds the
``AttnMeta`` that every attention back end reads (the visibility rule lives in ``fluid_ops.meta``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from fluid_ops.meta import MAIN, PAD, AttnMeta

IGNORE = -100


@dataclass
class LayoutConfig:
    """How examples are expanded; built from ``FluidArgs`` by the trainers."""

    mask_id: int
    pad_id: int
    k_max: int = 16
    anchor_prob: float = 0.5
    noise_ratio: float = 0.1
    max_slots_ratio: float | None = 6.0
    reveal: bool = True
    fixed_k: bool = False
    seed: int = 0
    noise_ids: np.ndarray = field(default_factory=lambda: np.arange(0))

    def __post_init__(self) -> None:
        if self.k_max < 1:
            raise ValueError(f"k_max must be ≥ 1, got {self.k_max}")
        if not 0.0 <= self.anchor_prob <= 1.0:
            raise ValueError(f"anchor_prob must be in [0, 1], got {self.anchor_prob}")


@dataclass
class Expanded:
    """One expanded example: per-token arrays of length ``n_main + n_slots``."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    anchor: np.ndarray  # MAIN for main tokens, c for the slots of anchor c
    slot_index: np.ndarray  # 0 for main tokens, j for slot j
    n_main: int

    @property
    def n_slots(self) -> int:
        return int(len(self.input_ids) - self.n_main)


def response_mask(labels: Sequence[int]) -> np.ndarray:
    """True where the token is a response token (carries loss)."""
    return np.asarray(labels) != IGNORE


class SlotBlock(NamedTuple):
    """The §1.1 slots of a set of anchors, each ``[..., k]`` (see ``slot_block``)."""

    input_ids: torch.Tensor  # MASK
    position_ids: torch.Tensor  # c + j
    anchor: torch.Tensor  # c, or PAD where the slot is not live
    slot_index: torch.Tensor  # j = 1 … k


def slot_block(
    anchors: torch.Tensor, k: int, mask_id: int, live: torch.Tensor | None = None
) -> SlotBlock:
    """The ``k`` slots of each anchor in ``anchors [...]`` (positions ``c``): slot ``j = 1…k``
    of anchor ``c`` sits at position ``c + j``, carries the anchor id ``c`` and the input ``MASK``.

    Stage I's layout, the sampler's prefill drafts and the decode step's draft blocks all place
    their slots with this one rule (a CPU's host step writes the same placement on Python lists:
    ``sampling/host_step.py``, held to this by its tests). ``live`` ``[...]`` (per anchor) or
    ``[..., k]`` (per slot): where False the slot's anchor id is ``PAD`` (a slot no query sees and
    that sees nothing).
    """
    j = torch.arange(1, k + 1, device=anchors.device)
    pos = anchors[..., None] + j
    anchor = anchors[..., None].expand(pos.shape)
    if live is not None:
        live = live[..., None] if live.dim() == anchors.dim() else live
        anchor = torch.where(live, anchor, PAD)
    return SlotBlock(torch.full_like(pos, mask_id), pos, anchor, j.expand(pos.shape))


def _generator(cfg: LayoutConfig, index: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, index, epoch, 0xF1D]))


def expand(
    input_ids: Sequence[int], labels: Sequence[int], cfg: LayoutConfig, index: int, epoch: int = 0
) -> Expanded:
    """Expand one example (see the module docstring); deterministic in ``(seed, index, epoch)``."""
    x = np.asarray(input_ids, dtype=np.int64)
    resp = response_mask(labels)
    n = len(x)
    if len(resp) != n:
        raise ValueError(f"input_ids has {n} tokens but labels has {len(resp)}")
    rng = _generator(cfg, index, epoch)
    target = np.full(n, IGNORE, dtype=np.int64)
    target[:-1] = np.where(resp[1:], x[1:], IGNORE)

    # Anchors: columns whose next token is a response token, drawn; and always the column just
    # before each of those runs (its slots' labels are the response's first tokens: the sampler
    # drafts from it in the prefill, before the prompt's last token is decoded — demo TPF +10 %
    # over drawing it too); each must leave a supervised slot.
    supervised = target != IGNORE
    lead = np.zeros(n, dtype=bool)
    lead[:-1] = supervised[1:] & ~supervised[:-1]
    cols = np.nonzero(supervised | lead)[0]
    cols = cols[cols <= n - 3]
    chosen = cols[(rng.random(len(cols)) < cfg.anchor_prob) | lead[cols]]
    if cfg.fixed_k:
        ks = np.full(len(chosen), cfg.k_max, dtype=np.int64)
    else:
        ks = rng.integers(1, cfg.k_max + 1, size=len(chosen))
    ks = np.minimum(ks, n - 2 - chosen)  # slot j's label x_{c+j+1} must exist
    if cfg.max_slots_ratio is not None and len(chosen):
        budget = int(cfg.max_slots_ratio * n)
        if ks.sum() > budget:
            order = rng.permutation(len(chosen))
            order = order[np.argsort(~lead[chosen[order]], kind="stable")]  # the lead ones first
            keep = np.cumsum(ks[order]) <= budget
            kept = np.sort(order[keep])
            chosen, ks = chosen[kept], ks[kept]
    reveal_p = rng.random(len(chosen)) if cfg.reveal else np.zeros(len(chosen))

    # every anchor's k_max slots, then the first k_c of each (row-major: grouped by anchor)
    slots = slot_block(torch.from_numpy(chosen), cfg.k_max, cfg.mask_id)
    taken = slots.slot_index <= torch.from_numpy(ks)[:, None]
    s_ids, s_pos, s_anc, s_j = (t[taken].numpy() for t in slots)
    s_lab = target[s_pos]
    at = 0
    for k, r in zip(ks.tolist(), reveal_p.tolist()):
        sl = slice(at, at + k)
        if r > 0:
            revealed = rng.random(k) < r
            s_ids[sl] = np.where(revealed, x[s_pos[sl]], cfg.mask_id)
            if cfg.noise_ratio > 0 and len(cfg.noise_ids):
                noisy = revealed & (rng.random(k) < cfg.noise_ratio)
                if noisy.any():
                    s_ids[sl][noisy] = rng.choice(cfg.noise_ids, size=int(noisy.sum()))
        at += k

    return Expanded(
        input_ids=np.concatenate([x, s_ids]),
        labels=np.concatenate([target, s_lab]),
        position_ids=np.concatenate([np.arange(n, dtype=np.int64), s_pos]),
        anchor=np.concatenate([np.full(n, MAIN, dtype=np.int64), s_anc]),
        slot_index=np.concatenate([np.zeros(n, dtype=np.int64), s_j]),
        n_main=n,
    )


@dataclass
class Batch:
    """Collated expanded examples: ``[B, n_main + n_slot_max]`` tensors and attention metadata."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    anchor: torch.Tensor
    slot_index: torch.Tensor
    n_main: int

    @property
    def meta(self) -> AttnMeta:
        return AttnMeta.self_attention(self.position_ids, self.anchor, n_main=self.n_main)


def collate(examples: Sequence[Expanded], pad_id: int) -> Batch:
    """Batch expanded examples: main streams right-padded to the longest, then the slot regions."""
    n_main = max(e.n_main for e in examples)
    n_slot = max(e.n_slots for e in examples)
    b, width = len(examples), n_main + n_slot
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    anchor = torch.full((b, width), PAD, dtype=torch.long)
    slot = torch.zeros((b, width), dtype=torch.long)
    for row, e in enumerate(examples):
        for dst, src in ((ids, e.input_ids), (labels, e.labels), (pos, e.position_ids)):
            dst[row, : e.n_main] = torch.from_numpy(src[: e.n_main])
            dst[row, n_main : n_main + e.n_slots] = torch.from_numpy(src[e.n_main :])
        anchor[row, : e.n_main] = MAIN
        anchor[row, n_main : n_main + e.n_slots] = torch.from_numpy(e.anchor[e.n_main :])
        slot[row, n_main : n_main + e.n_slots] = torch.from_numpy(e.slot_index[e.n_main :])
    return Batch(ids, labels, pos, anchor, slot, n_main)


def noise_vocabulary(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """Token ids a noisy revealed slot may take: the whole vocabulary except special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = np.arange(min(vocab_size, len(tokenizer)), dtype=np.int64)
    return ids[~np.isin(ids, np.fromiter(special, dtype=np.int64, count=len(special)))]
