"""The ``reference`` and ``blocked`` back ends of ``fluid_attention``, on stock SDPA.

* ``reference_attention``: the dense bool mask from ``visibility`` + one SDPA call, the ground
  truth of every back end;
* ``blocked_attention``: the plan of ``fluid_ops.attention_plan`` run with one SDPA call per block
  (the main stream as one ``is_causal`` call when it is a causal square, slot chunks over just the
  keys they can see): the CPU fast path, usable on any device. ``run_blocks`` executes a plan with
  any per-block attention, so the ``npu`` back end shares it.

Shapes are BNSD (``q [B, Hq, Lq, D]``, ``k``/``v`` ``[B, Hkv, Lk, D]``, GQA when ``Hq > Hkv``);
a query row with no visible key outputs exactly 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

from fluid_ops.attention_plan import Block, plan_blocks, safe_mask
from fluid_ops.meta import AttnMeta, visibility

# Slot queries per SDPA call in the blocked back end: small blocks waste least on a CPU, while an
# accelerator pays a launch per block (measured fwd+bwd, N=1024, k_max=16, anchor_prob 0.5: CPU
# 64/128/256 within noise of each other; H100 1024 best of 128..1024).
BLOCKED_CHUNK = {"cpu": 256}
ACCELERATOR_CHUNK = 1024

_NATIVE_GQA = TorchVersion(torch.__version__) >= "2.5"  # SDPA's enable_gqa


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Stock SDPA with GQA (native ``enable_gqa`` when torch has it, else expanded KV heads)."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and not _NATIVE_GQA:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    extra = {"enable_gqa": True} if gqa else {}
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, **extra
    )


def zero_rows(out: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Zero the query rows where ``keep [B, Lq]`` is False (their gradient is zero too)."""
    return out if keep is None else out.masked_fill(~keep[:, None, :, None], 0.0)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta, scale: float
) -> torch.Tensor:
    """Dense bool mask from ``visibility`` + one SDPA call; the ground truth of the back ends."""
    mask, keep = safe_mask(visibility(meta))
    return zero_rows(_sdpa(q, k, v, scale, mask=mask[:, None]), keep)


class Pieces:
    """Query and key/value tensors cut once at every boundary a plan uses.

    Each block gathers its keys from these pieces instead of slicing the full tensors: autograd
    then accumulates gradients piece by piece, where a slice per block would zero-fill and add a
    full-size gradient for every block (which dominated the backward pass on CPU).
    """

    def __init__(self, blocks: list[Block], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # every range boundary of every block, plus both ends: piece i is keys [cuts[i], cuts[i+1])
        cuts = sorted({0, k.shape[2], *(x for blk in blocks for r in blk.ranges for x in r)})
        self._piece_at = {c: i for i, c in enumerate(cuts)}  # boundary -> first piece after it
        sizes = [b - a for a, b in itertools.pairwise(cuts)]
        self.k, self.v = k.split(sizes, dim=2), v.split(sizes, dim=2)
        self.q = q.split([blk.q1 - blk.q0 for blk in blocks], dim=2)  # the blocks tile the queries

    def keys(self, blk: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's keys and values over its ranges, concatenated (a view when one piece)."""
        # range [a, b) is exactly the pieces from the one starting at a up to the one ending at b
        idx = [i for a, b in blk.ranges for i in range(self._piece_at[a], self._piece_at[b])]
        if len(idx) == 1:
            return self.k[idx[0]], self.v[idx[0]]
        return torch.cat([self.k[i] for i in idx], 2), torch.cat([self.v[i] for i in idx], 2)


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttnMeta,
    scale: float,
    chunk: int | None = None,
) -> torch.Tensor:
    """The Stage I / cached-inference structure exploited with stock SDPA (see ``plan_blocks``).

    ``chunk``: slot queries per call; None picks ``BLOCKED_CHUNK`` for the device type. Without
    ``meta.n_main`` this is ``reference_attention``.
    """
    if meta.n_main is None:
        return reference_attention(q, k, v, meta, scale)
    chunk = chunk or BLOCKED_CHUNK.get(q.device.type, ACCELERATOR_CHUNK)

    def attend(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, blk: Block) -> torch.Tensor:
        if blk.causal:
            return _sdpa(qs, ks, vs, scale, is_causal=True)
        return _sdpa(qs, ks, vs, scale, mask=blk.mask[:, None])

    return run_blocks(q, k, v, meta, chunk, attend)


def run_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttnMeta,
    chunk: int,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Block], torch.Tensor],
) -> torch.Tensor:
    """Plan the blocks, run ``attend(q_block, k_keys, v_keys, block)`` on each, zero empty rows.

    Shared by the ``blocked`` (SDPA) and ``npu`` (torch_npu) back ends; only ``attend`` differs.
    """
    blocks = plan_blocks(meta, q.shape[2], k.shape[2], chunk)
    pieces = Pieces(blocks, q, k, v)
    outs = []
    for blk, qs in zip(blocks, pieces.q):
        if not blk.ranges:
            outs.append(q.new_zeros(*qs.shape[:3], v.shape[-1]))
            continue
        outs.append(zero_rows(attend(qs, *pieces.keys(blk), blk), blk.keep))
    return torch.cat(outs, dim=2) if len(outs) != 1 else outs[0]
