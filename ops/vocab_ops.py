"""The vocabulary reductions as ``torch.library`` custom ops (DESIGN §3) under ``fluid_ops.vocab``.

Each op has a fake (meta) implementation, so ``torch.compile`` traces through it without a graph
break, and selects its back end inside the real implementation (``dispatch.select`` per call):

* ``fluid_ops::token_stats`` → argmax, max log-prob, entropy and CE (empty without labels) of
  2-D ``hidden`` rows. No autograd: its callers (the sampler's LM head, Stage II's horizon labels)
  read statistics and never backpropagate through them; ``fluid_ops.vocab.token_stats`` runs it
  under ``torch.no_grad()``.
* ``fluid_ops::lce_fwd`` / ``fluid_ops::lce_bwd`` → ``linear_cross_entropy`` with autograd to
  hidden, weight and bias. ``lce_fwd`` returns the per-token loss and lse (both differentiable:
  the lse serves a z-loss); its autograd saves only the lse and calls ``lce_bwd``, which recomputes
  the tiles. The back end the forward used is resolved on the forward's thread and handed to the
  backward explicitly, so a ``force_backend`` on the calling thread also holds in autograd's
  device threads.

``chunk_vocab`` 0 = auto; ``backend`` ``"auto"`` = the dispatch rule.
"""

import torch
from torch import Tensor

from fluid_ops import dispatch
from fluid_ops import vocab_tiles as tiles


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("fluid_ops::token_stats", mutates_args=())
def _token_stats_op(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    bias: Tensor | None,
    ignore_index: int,
    chunk_tokens: int,
    chunk_vocab: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """argmax, max log-prob, entropy, CE (empty without labels) of 2-D ``hidden`` rows.

    ``chunk_vocab`` 0 = auto; ``backend`` ``"auto"`` = the dispatch rule (same for the lce ops).
    """
    name = dispatch.select(tiles.OP, hidden.device, backend)
    if labels is not None:
        tiles.check_labels(labels, weight.shape[0], ignore_index)
    m, s, t, argmax, label_logit = tiles.row_stats(
        hidden, weight, labels, bias, chunk_tokens, chunk_vocab, name
    )
    log_s = torch.log(s)
    entropy = log_s - t / s
    if labels is None:
        ce = m.new_empty(0)
    else:
        ce = torch.where(labels != ignore_index, m + log_s - label_logit, 0.0)
    return argmax, -log_s, entropy, ce


@_token_stats_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, chunk_tokens, chunk_vocab, backend):
    n = hidden.shape[0]
    f32 = hidden.new_empty(n, dtype=torch.float32)
    ce = hidden.new_empty(0 if labels is None else n, dtype=torch.float32)
    return hidden.new_empty(n, dtype=torch.int64), f32, torch.empty_like(f32), ce


@torch.library.custom_op("fluid_ops::lce_fwd", mutates_args=())
def _lce_fwd_op(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    chunk_tokens: int,
    chunk_vocab: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy (0 where ignored) and log-sum-exp of 2-D ``hidden`` rows."""
    name = dispatch.select(tiles.OP, hidden.device, backend)
    tiles.check_labels(labels, weight.shape[0], ignore_index)
    m, s, _, _, label_logit = tiles.row_stats(
        hidden, weight, labels, bias, chunk_tokens, chunk_vocab, name
    )
    lse = m + torch.log(s)
    return torch.where(labels != ignore_index, lse - label_logit, 0.0), lse


@_lce_fwd_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, chunk_tokens, chunk_vocab, backend):
    loss = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    return loss, torch.empty_like(loss)


@torch.library.custom_op("fluid_ops::lce_bwd", mutates_args=())
def _lce_bwd_op(
    grad_loss: Tensor,
    grad_lse: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    ignore_index: int,
    chunk_tokens: int,
    chunk_vocab: int,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``Σ grad_loss·loss + Σ grad_lse·lse``; an unneeded one comes back empty."""
    name = dispatch.select(tiles.OP, hidden.device, backend)
    grads = tiles.lce_backward(
        grad_loss,
        grad_lse,
        hidden,
        weight,
        labels,
        bias,
        lse,
        ignore_index,
        chunk_tokens,
        chunk_vocab,
        name,
        (need_hidden, need_weight, need_bias),
    )
    return tuple(_empty(hidden) if g is None else g for g in grads)


@_lce_bwd_op.register_fake
def _(
    grad_loss,
    grad_lse,
    hidden,
    weight,
    labels,
    bias,
    lse,
    ignore_index,
    chunk_tokens,
    chunk_vocab,
    backend,
    need_hidden,
    need_weight,
    need_bias,
):
    grad_h = torch.empty_like(hidden) if need_hidden else _empty(hidden)
    grad_w = torch.empty_like(weight) if need_weight else _empty(hidden)
    grad_b = torch.empty_like(bias) if need_bias and bias is not None else _empty(hidden)
    return grad_h, grad_w, grad_b


def _lce_setup_context(ctx, inputs, output) -> None:
    hidden, weight, labels, bias, ignore_index, chunk_tokens, chunk_vocab, backend = inputs
    ctx.save_for_backward(hidden, weight, labels, bias, output[1])
    # resolved here, on the forward's thread, so the backward uses the forward's back end
    ctx.config = (
        ignore_index,
        chunk_tokens,
        chunk_vocab,
        dispatch.select(tiles.OP, hidden.device, backend),
    )


def _lce_autograd(ctx, grad_loss, grad_lse):
    hidden, weight, labels, bias, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
    if not (need_h or need_w or need_b):
        return (None,) * 8
    grad_h, grad_w, grad_b = torch.ops.fluid_ops.lce_bwd(
        grad_loss, grad_lse, hidden, weight, labels, bias, lse, *ctx.config, need_h, need_w, need_b
    )
    return (
        grad_h if need_h else None,
        grad_w if need_w else None,
        None,
        grad_b if need_b else None,
        None,
        None,
        None,
        None,
    )


_lce_fwd_op.register_autograd(_lce_autograd, setup_context=_lce_setup_context)
