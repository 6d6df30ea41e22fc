"""Vocabulary reductions over an LM head without materialising the ``[T, V]`` logits (DESIGN §3).

With V = 153 376 (openPangu) and a ~5k-token Stage I layout, fp32 logits alone take ~3 GB, and
``F.cross_entropy`` keeps a log-softmax of the same size for backward. Both ops here walk the
logits in ``[chunk_tokens, chunk_vocab]`` tiles (``F.linear`` on the LM head, in the input dtype,
like a real LM head) and keep only per-token running statistics in fp32:

* ``m`` (running max), ``s = Σ exp(l − m)``, ``t = Σ exp(l − m)·(l − m)``, the first argmax and
  the label's logit. Then ``lse = m + log s``, ``max log-prob = −log s``,
  ``entropy = log s − t/s`` (``t`` relative to ``m``: bounded terms, no cancellation between large
  logits) and ``CE = lse − l_y``.

Ops (``torch.library.custom_op`` with fake implementations, so they compose with torch.compile):

* ``fluid_ops::token_stats`` → :func:`token_stats`, no gradient (the sampler and Stage II labels);
* ``fluid_ops::lce_fwd`` / ``fluid_ops::lce_bwd`` → :func:`linear_cross_entropy` with autograd to
  hidden, weight and bias. ``lce_fwd`` returns the per-token loss and lse (both differentiable:
  the lse serves a z-loss). Forward saves only the lse; backward recomputes each tile and
  turns it into ``coef_p·softmax − coef_y·onehot`` before two matmuls (grad hidden, grad weight).
  Backward walks vocabulary chunks outermost, so each grad-weight chunk is finished (fp32
  accumulation, or none when all tokens fit one chunk) before the next starts, and only grad
  hidden ``[T, H]`` stays resident in fp32.

Back ends (op ``"vocab"`` in ``fluid_ops.dispatch``): ``torch`` (any device; the CPU and fallback
path) and ``triton`` (``fluid_ops.vocab_triton``: the tile reductions and the logits gradient as
Triton kernels, CUDA and triton-ascend; CPU under ``TRITON_INTERPRET=1``). The matmuls are torch's
in both. The back end is resolved inside the ops (``select`` per call), and the one the forward
used is handed to the backward explicitly, so a ``force_backend`` on the calling thread also holds
in autograd's device threads.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fluid_ops import dispatch

OP = "vocab"
DEFAULT_CHUNK_TOKENS = 4096
MIN_AUTO_CHUNK_VOCAB = 4096  # chunk_vocab=None: at least this wide, a multiple of 1024 ...
TILE_BUDGET = 2048 * 4096  # ... and as wide as this many logits per tile allow (32 MiB in fp32)
_FMIN = torch.finfo(torch.float32).min  # -inf logits are clamped here: no inf − inf = NaN
_REDUCTIONS = ("mean", "sum", "none")

dispatch.register_backend(OP, "torch", lambda device: None)
dispatch.register_backend(OP, "triton", dispatch.triton_unavailable)
dispatch.set_preference(OP, "cuda", ["triton", "torch"])
dispatch.set_preference(OP, "npu", ["triton", "torch"])
dispatch.set_preference(OP, "default", ["torch"])


class TokenStats(NamedTuple):
    """Per-token statistics of ``softmax(hidden @ weight.T + bias)``, shaped like hidden[..., 0]."""

    argmax: Tensor  # int64, first index of the largest logit
    max_logprob: Tensor  # float32, log-prob of the argmax token (≤ 0)
    entropy: Tensor  # float32, nats
    ce: Tensor | None  # float32, cross-entropy of the label (0 where ignored); None without labels


# ----------------------------------------------------------------------------- tile kernels (torch)


def _torch_reduce_chunk(
    logits: Tensor,
    col_offset: int,
    labels: Tensor | None,
    m: Tensor,
    s: Tensor,
    t: Tensor,
    argmax: Tensor,
    label_logit: Tensor,
) -> None:
    """Torch twin of ``vocab_triton.reduce_chunk``: fold one tile into the row state, in place."""
    x = logits.float().clamp_(min=_FMIN)  # a temporary: the matmul output or its fp32 copy
    if labels is not None:
        local = labels - col_offset
        inside = (local >= 0) & (local < x.shape[1])
        picked = x.gather(1, local.clamp(0, x.shape[1] - 1).unsqueeze(1)).squeeze(1)
        label_logit.copy_(torch.where(inside, picked, label_logit))
    tile_max, tile_arg = x.max(dim=1)
    new_m = torch.maximum(m, tile_max)
    alpha = torch.exp(m - new_m)
    shift = s * (torch.where(s > 0, m, new_m) - new_m)  # no 0·(-inf) on the first tile
    d = x.sub_(new_m.unsqueeze(1))
    e = torch.exp(d)
    s_tile = e.sum(dim=1)
    t_tile = e.mul_(d).sum(dim=1)
    t.copy_(alpha * (t + shift) + t_tile)
    s.copy_(alpha * s + s_tile)
    argmax.copy_(torch.where(tile_max > m, tile_arg + col_offset, argmax))
    m.copy_(new_m)


def _torch_grad_chunk(
    logits: Tensor,
    col_offset: int,
    labels: Tensor,
    lse: Tensor,
    coef_p: Tensor,
    coef_y: Tensor,
) -> Tensor:
    """``coef_p·exp(logits − lse) − coef_y·onehot(labels)`` in the logits' dtype."""
    g = logits.float().clamp_(min=_FMIN).sub_(lse.unsqueeze(1)).exp_().mul_(coef_p.unsqueeze(1))
    local = labels - col_offset
    inside = (local >= 0) & (local < g.shape[1])
    index = local.clamp(0, g.shape[1] - 1).unsqueeze(1)
    g.scatter_add_(1, index, torch.where(inside, -coef_y, 0.0).unsqueeze(1))
    return g.to(logits.dtype)


def _triton_grad_chunk(
    logits: Tensor,
    col_offset: int,
    labels: Tensor,
    lse: Tensor,
    coef_p: Tensor,
    coef_y: Tensor,
) -> Tensor:
    from fluid_ops import vocab_triton

    vocab_triton.grad_chunk(logits, col_offset, labels, lse, coef_p, coef_y, out=logits)
    return logits


def _kernels(backend: str):  # -> (reduce_chunk, grad_chunk)
    if backend == "triton":
        from fluid_ops import vocab_triton

        return vocab_triton.reduce_chunk, _triton_grad_chunk
    return _torch_reduce_chunk, _torch_grad_chunk


# ----------------------------------------------------------------------------- chunked drivers


def _vocab_chunk(n_tokens: int, vocab: int, chunk_tokens: int, chunk_vocab: int) -> int:
    """``chunk_vocab`` as given, or (0 = auto) wide enough that few tokens make few launches."""
    if chunk_vocab > 0:
        return chunk_vocab
    rows = max(1, min(n_tokens, chunk_tokens))
    width = -(-(TILE_BUDGET // rows) // 1024) * 1024
    return max(1, min(vocab, max(MIN_AUTO_CHUNK_VOCAB, width)))


def _check_labels(labels: Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"label {value} is outside the vocabulary [0, {vocab}) and is not ignore_index "
            f"({ignore_index}); fix the labels or pass the ignore_index they use"
        )


def _row_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    bias: Tensor | None,
    chunk_tokens: int,
    chunk_vocab: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Online statistics of every row of ``hidden @ weight.T + bias``: m, s, t, argmax, l_label."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    chunk_vocab = _vocab_chunk(n_tokens, vocab, chunk_tokens, chunk_vocab)
    opts = {"device": hidden.device, "dtype": torch.float32}
    m = torch.full((n_tokens,), float("-inf"), **opts)
    s = torch.zeros(n_tokens, **opts)
    t = torch.zeros(n_tokens, **opts)
    label_logit = torch.zeros(n_tokens, **opts)
    argmax = torch.zeros(n_tokens, device=hidden.device, dtype=torch.int64)
    reduce_chunk, _ = _kernels(backend)
    for t0 in range(0, n_tokens, chunk_tokens):
        rows = slice(t0, t0 + chunk_tokens)
        h = hidden[rows]
        lab = None if labels is None else labels[rows]
        for v0 in range(0, vocab, chunk_vocab):
            cols = slice(v0, v0 + chunk_vocab)
            tile = F.linear(h, weight[cols], None if bias is None else bias[cols])
            reduce_chunk(tile, v0, lab, m[rows], s[rows], t[rows], argmax[rows], label_logit[rows])
    return m, s, t, argmax, label_logit


def _lce_backward(
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
    need: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Recompute each logits tile and accumulate grad hidden / weight / bias from it."""
    need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    chunk_vocab = _vocab_chunk(n_tokens, vocab, chunk_tokens, chunk_vocab)
    coef_y = torch.where(labels != ignore_index, grad_loss.float(), 0.0)
    coef_p = coef_y if grad_lse is None else coef_y + grad_lse.float()
    fp32 = hidden.dtype == torch.float32
    single = (
        0 < n_tokens <= chunk_tokens
    )  # one token chunk: weight / bias grads need no accumulator
    _, grad_chunk = _kernels(backend)
    grad_h = (
        torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_h else None
    )
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    for v0 in range(0, vocab, chunk_vocab):
        cols = slice(v0, v0 + chunk_vocab)
        w = weight[cols]
        b = None if bias is None else bias[cols]
        acc_w = acc_b = None
        if need_w and not single:
            acc_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32)
        if need_b and not single:
            acc_b = torch.zeros(w.shape[0], device=w.device, dtype=torch.float32)
        for t0 in range(0, n_tokens, chunk_tokens):
            rows = slice(t0, t0 + chunk_tokens)
            h = hidden[rows]
            g = grad_chunk(
                F.linear(h, w, b), v0, labels[rows], lse[rows], coef_p[rows], coef_y[rows]
            )
            if grad_h is not None:  # fp32 accumulator; add_ upcasts a bf16 product in one pass
                if fp32:
                    grad_h[rows].addmm_(g, w)
                else:
                    grad_h[rows].add_(g @ w)
            if need_w:
                if single:  # the matmul accumulates in fp32 internally
                    torch.mm(g.t(), h, out=grad_w[cols])
                elif fp32:
                    acc_w.addmm_(g.t(), h)
                else:
                    acc_w.add_(g.t() @ h)
            if need_b:
                part = g.sum(dim=0, dtype=torch.float32)
                if single:
                    grad_b[cols] = part
                else:
                    acc_b += part
        if acc_w is not None:
            grad_w[cols] = acc_w
        if acc_b is not None:
            grad_b[cols] = acc_b
    return (None if grad_h is None else grad_h.to(hidden.dtype)), grad_w, grad_b


# ----------------------------------------------------------------------------- custom ops


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
    name = dispatch.select(OP, hidden.device, backend)
    if labels is not None:
        _check_labels(labels, weight.shape[0], ignore_index)
    m, s, t, argmax, label_logit = _row_stats(
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
    name = dispatch.select(OP, hidden.device, backend)
    _check_labels(labels, weight.shape[0], ignore_index)
    m, s, _, _, label_logit = _row_stats(
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
    name = dispatch.select(OP, hidden.device, backend)
    grads = _lce_backward(
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
        dispatch.select(OP, hidden.device, backend),
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


# ----------------------------------------------------------------------------- public API


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
