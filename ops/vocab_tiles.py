"""The tile walk behind ``fluid_ops.vocab``: online statistics over ``[rows, cols]`` logits tiles.

``hidden @ weight.T + bias`` is computed one ``[chunk_tokens, chunk_vocab]`` tile at a time
(``F.linear`` on a slice of the LM head, in the input dtype, like a real LM head); each tile is
folded into per-token running statistics in fp32 and dropped:

* ``m`` (running max), ``s = Σ exp(l − m)``, ``t = Σ exp(l − m)·(l − m)``, the first argmax and
  the label's logit. Then ``lse = m + log s``, ``max log-prob = −log s``,
  ``entropy = log s − t/s`` (``t`` relative to ``m``: bounded terms, no cancellation between large
  logits) and ``CE = lse − l_y``.
* The cross-entropy backward recomputes each tile and turns it into ``coef_p·softmax −
  coef_y·onehot`` before two matmuls (grad hidden, grad weight). It walks vocabulary chunks
  outermost, so each grad-weight chunk is finished (fp32 accumulation, or none when all tokens fit
  one chunk) before the next starts, and only grad hidden ``[T, H]`` stays resident in fp32.

The per-tile work has two back ends (op ``"vocab"`` in ``fluid_ops.dispatch``, registered here):
``torch`` (any device; the CPU and fallback path, the twins below) and ``triton``
(``fluid_ops.vocab_triton``, imported only when selected). The matmuls are torch's in both.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fluid_ops import dispatch

OP = "vocab"
MIN_AUTO_CHUNK_VOCAB = 4096  # chunk_vocab=0 (auto): at least this wide, a multiple of 1024 ...
TILE_BUDGET = 2048 * 4096  # ... and as wide as this many logits per tile allow (32 MiB in fp32)
_FMIN = torch.finfo(torch.float32).min  # -inf logits are clamped here: no inf − inf = NaN

dispatch.register_backend(OP, "torch", lambda device: None)
dispatch.register_backend(OP, "triton", dispatch.triton_unavailable)
dispatch.set_preference(OP, "cuda", ["triton", "torch"])
dispatch.set_preference(OP, "npu", ["triton", "torch"])
dispatch.set_preference(OP, "default", ["torch"])


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


def _kernels(backend: str) -> tuple[Callable[..., None], Callable[..., Tensor]]:
    """``(reduce_chunk, grad_chunk)`` of back end ``backend``."""
    if backend == "triton":
        from fluid_ops import vocab_triton

        return vocab_triton.reduce_chunk, vocab_triton.grad_chunk  # the tile in place
    return _torch_reduce_chunk, _torch_grad_chunk


# ----------------------------------------------------------------------------- chunked drivers


def vocab_chunk(n_tokens: int, vocab: int, chunk_tokens: int, chunk_vocab: int) -> int:
    """``chunk_vocab`` as given, or (0 = auto) wide enough that few tokens make few launches."""
    if chunk_vocab > 0:
        return chunk_vocab
    rows = max(1, min(n_tokens, chunk_tokens))
    width = -(-(TILE_BUDGET // rows) // 1024) * 1024
    return max(1, min(vocab, max(MIN_AUTO_CHUNK_VOCAB, width)))


def check_labels(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Raise a ValueError naming the first label that is neither a token id nor ignored."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"label {value} is outside the vocabulary [0, {vocab}) and is not ignore_index "
            f"({ignore_index}); fix the labels or pass the ignore_index they use"
        )


def row_stats(
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
    chunk_vocab = vocab_chunk(n_tokens, vocab, chunk_tokens, chunk_vocab)
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


def lce_backward(
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
    chunk_vocab = vocab_chunk(n_tokens, vocab, chunk_tokens, chunk_vocab)
    coef_y = torch.where(labels != ignore_index, grad_loss.float(), 0.0)
    coef_p = coef_y if grad_lse is None else coef_y + grad_lse.float()
    fp32 = hidden.dtype == torch.float32
    single = 0 < n_tokens <= chunk_tokens  # one token chunk: no weight / bias accumulator
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
