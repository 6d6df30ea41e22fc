"""Vocabulary reductions over an LM head without materialising the ``[T, V]`` logits (DESIGN §3).

With V = 153 376 (openPangu) and a ~5k-token Stage I layout, fp32 logits alone take ~3 GB, and
``F.cross_entropy`` keeps a log-softmax of the same size for backward. The two functions here walk
the logits in ``[chunk_tokens, chunk_vocab]`` tiles and keep only per-token running statistics:

* :func:`token_stats` → argmax, max log-prob, entropy and (with labels) CE per token; no gradient
  (the sampler's LM head and Stage II's horizon labels);
* :func:`linear_cross_entropy` → ``F.cross_entropy(hidden @ weight.T + bias, labels)`` with
  autograd to hidden, weight and bias.

This module checks and flattens the inputs and picks the compute dtype; the rest lives in

* ``fluid_ops.vocab_ops``: the ``torch.library`` custom ops (``fluid_ops::token_stats``,
  ``fluid_ops::lce_fwd`` / ``lce_bwd``) with fake implementations and the autograd, so both
  functions compose with ``torch.compile``;
* ``fluid_ops.vocab_tiles``: the online statistics, the tile walk and the backward, and the back
  ends (op ``"vocab"`` in ``fluid_ops.dispatch``): ``torch`` on any device and ``triton``
  (``fluid_ops.vocab_triton``: CUDA and triton-ascend; CPU under ``TRITON_INTERPRET=1``).
"""

from typing import NamedTuple

import torch
from torch import Tensor

from fluid_ops import vocab_ops  # noqa: F401  (registers torch.ops.fluid_ops.token_stats / lce_*)
from fluid_ops.vocab_tiles import MIN_AUTO_CHUNK_VOCAB, TILE_BUDGET

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "MIN_AUTO_CHUNK_VOCAB",
    "TILE_BUDGET",
    "TokenStats",
    "linear_cross_entropy",
    "token_stats",
]

DEFAULT_CHUNK_TOKENS = 4096
_REDUCTIONS = ("mean", "sum", "none")


class TokenStats(NamedTuple):
    """Per-token statistics of ``softmax(hidden @ weight.T + bias)``, shaped like hidden[..., 0]."""

    argmax: Tensor  # int64, first index of the largest logit
    max_logprob: Tensor  # float32, log-prob of the argmax token (≤ 0)
    entropy: Tensor  # float32, nats
    ce: Tensor | None  # float32, cross-entropy of the label (0 where ignored); None without labels


def _prepare(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor | None,
    chunk_tokens: int,
    chunk_vocab: int | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Flatten ``hidden [..., H]`` / ``labels [...]``, check shapes, and agree on one dtype."""
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden [..., H] and weight [V, H] disagree: {tuple(hidden.shape)} vs "
            f"{tuple(weight.shape)}; pass the LM head weight (out_features × hidden_size)"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if chunk_tokens < 1 or (chunk_vocab is not None and chunk_vocab < 1):
        raise ValueError(f"chunk sizes must be positive, got {chunk_tokens} and {chunk_vocab}")
    if labels is not None:
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(
                f"labels {tuple(labels.shape)} must match the leading dims of hidden "
                f"{tuple(hidden.shape[:-1])}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
        labels = labels.reshape(-1).long()
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # what an autocast LM head would compute in
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return hidden, weight, bias, labels


def token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int | None = None,
    backend: str | None = None,
) -> TokenStats:
    """Argmax, max log-prob, entropy and (with ``labels``) CE of ``hidden @ weight.T + bias``.

    ``hidden`` is ``[..., H]``, ``weight`` the LM head ``[V, H]``; every output has the leading
    dims of ``hidden`` and is fp32 (argmax int64). No gradient. Tiles are ``chunk_tokens`` ×
    ``chunk_vocab`` logits; ``chunk_vocab=None`` widens the tile for few tokens (a sampler step
    over V = 153k makes a handful of launches, not 38) within ``TILE_BUDGET`` logits.
    ``backend``: ``"torch"``, ``"triton"`` or None (dispatch rule / ``FLUID_VOCAB_BACKEND``).
    """
    lead = hidden.shape[:-1]
    h, w, b, lab = _prepare(hidden, weight, bias, labels, chunk_tokens, chunk_vocab)
    with torch.no_grad():
        argmax, max_logprob, entropy, ce = torch.ops.fluid_ops.token_stats(
            h, w, lab, b, ignore_index, chunk_tokens, chunk_vocab or 0, backend or "auto"
        )
    return TokenStats(
        argmax.reshape(lead),
        max_logprob.reshape(lead),
        entropy.reshape(lead),
        None if labels is None else ce.reshape(lead),
    )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    *,
    bias: Tensor | None = None,
    reduction: str = "mean",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, labels)`` without the logits, with autograd.

    ``hidden [..., H]``, ``labels [...]``, ``weight [V, H]``. ``reduction="mean"`` averages over
    non-ignored labels (0 when there are none, with zero gradients); ``"none"`` returns the
    per-token losses (0 where ignored) shaped like ``labels``. The result is fp32. Chunking and
    ``backend`` as in :func:`token_stats`.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if labels is None:
        raise ValueError("linear_cross_entropy needs labels; use token_stats for label-free stats")
    lead = labels.shape
    h, w, b, lab = _prepare(hidden, weight, bias, labels, chunk_tokens, chunk_vocab)
    loss, _ = torch.ops.fluid_ops.lce_fwd(
        h, w, lab, b, ignore_index, chunk_tokens, chunk_vocab or 0, backend or "auto"
    )
    if reduction == "none":
        return loss.reshape(lead)
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (lab != ignore_index).sum().clamp(min=1)
