"""Tests for ``fluid_ops.vocab``: chunked token statistics and linear cross-entropy vs full logits.

The reference is the naive computation (``F.linear`` to full logits, ``log_softmax``,
``F.cross_entropy``, autograd). The ``triton`` back end against this one: ``test_ops_vocab_triton``.
"""

import pytest
import torch
import torch.nn.functional as F

from fluid_ops import dispatch
from fluid_ops.vocab import TokenStats, linear_cross_entropy, token_stats


def _naive_stats(logits: torch.Tensor, labels: torch.Tensor | None, ignore_index: int = -100):
    logp = logits.log_softmax(-1)
    entropy = torch.special.entr(logp.exp()).sum(-1)
    ce = None
    if labels is not None:
        flat = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=ignore_index,
            reduction="none",
        )
        ce = flat.reshape(labels.shape)
    return logits.argmax(-1), logp.max(-1).values, entropy, ce


def _inputs(lead, hidden_size, vocab_size, *, bias=True, seed=0, scale=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(*lead, hidden_size, generator=gen) * scale).to(dtype)
    w = (torch.randn(vocab_size, hidden_size, generator=gen) / hidden_size**0.25).to(dtype)
    b = (torch.randn(vocab_size, generator=gen) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, vocab_size, lead, generator=gen)
    return h, w, b, labels


SHAPES = [
    # (leading dims, H, V, chunk_tokens, chunk_vocab)
    ((37,), 16, 1000, 16, 256),  # neither T nor V divisible by its chunk
    ((2, 9), 8, 512, 4, 128),  # [B, L, H], both divisible
    ((3, 5), 12, 300, 1024, 4096),  # one chunk each (the defaults)
    ((1,), 8, 97, 1, 7),  # one token, tiny odd chunks
]


@pytest.mark.parametrize(("lead", "hidden_size", "vocab_size", "ct", "cv"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_token_stats_matches_full_logits(lead, hidden_size, vocab_size, ct, cv, bias):
    h, w, b, labels = _inputs(lead, hidden_size, vocab_size, bias=bias, scale=2.0)
    labels.view(-1)[::3] = -100
    stats = token_stats(h, w, labels, bias=b, chunk_tokens=ct, chunk_vocab=cv)
    argmax, max_logprob, entropy, ce = _naive_stats(F.linear(h, w, b), labels)
    assert isinstance(stats, TokenStats)
    for got in stats:
        assert got.shape == lead
    assert stats.argmax.dtype == torch.int64
    assert torch.equal(stats.argmax, argmax)
    torch.testing.assert_close(stats.max_logprob, max_logprob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.entropy, entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.ce, ce, atol=1e-5, rtol=1e-5)
    assert (stats.ce.view(-1)[::3] == 0).all()


def test_auto_vocab_chunk_is_wide_for_few_tokens_and_bounded_for_many():
    from fluid_ops.vocab_tiles import MIN_AUTO_CHUNK_VOCAB, TILE_BUDGET, vocab_chunk

    assert vocab_chunk(5000, 153376, 1024, 256) == 256  # explicit sizes are kept
    assert vocab_chunk(5000, 153376, 4096, 0) == MIN_AUTO_CHUNK_VOCAB
    wide = vocab_chunk(200, 153376, 4096, 0)
    assert wide % 1024 == 0 and 200 * wide >= TILE_BUDGET > 200 * (wide - 1024)
    assert vocab_chunk(1, 153376, 1024, 0) == 153376
    h, w, b, labels = _inputs((3,), 8, 9000)
    stats = token_stats(h, w, labels, bias=b)  # one 9000-wide chunk
    torch.testing.assert_close(stats.ce, _naive_stats(F.linear(h, w, b), labels)[3])


def test_token_stats_without_labels_has_no_ce():
    h, w, _, _ = _inputs((6,), 8, 50, bias=False)
    stats = token_stats(h, w, chunk_vocab=16)
    assert stats.ce is None
    argmax, max_logprob, entropy, _ = _naive_stats(F.linear(h, w), None)
    assert torch.equal(stats.argmax, argmax)
    torch.testing.assert_close(stats.entropy, entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.max_logprob, max_logprob, atol=1e-5, rtol=1e-5)


def test_entropy_is_exact_for_peaked_and_large_logits():
    # logits of order 1e3: entropy ≈ 0 must not come out of a difference of two large numbers
    h, w, b, labels = _inputs((24,), 16, 700, scale=60.0)
    stats = token_stats(h, w, labels, bias=b, chunk_vocab=128)
    ref = _naive_stats(F.linear(h.double(), w.double(), b.double()), labels)
    assert torch.equal(stats.argmax, ref[0])
    torch.testing.assert_close(stats.entropy, ref[2].float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats.max_logprob, ref[1].float(), atol=1e-5, rtol=1e-4)
    assert (stats.entropy >= 0).all() and (stats.max_logprob <= 0).all()


def test_minus_inf_logits_are_masked_vocabulary():
    # a bias of -inf removes tokens (e.g. a banned vocabulary slice spanning a whole chunk)
    h, w, b, labels = _inputs((10,), 8, 300)
    b[40:200] = float("-inf")
    labels[labels.ge(40) & labels.lt(200)] = 5
    stats = token_stats(h, w, labels, bias=b, chunk_vocab=64)
    argmax, max_logprob, entropy, ce = _naive_stats(F.linear(h, w, b), labels)
    assert torch.equal(stats.argmax, argmax)
    torch.testing.assert_close(stats.entropy, entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.ce, ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.max_logprob, max_logprob, atol=1e-5, rtol=1e-5)


def test_ties_resolve_to_the_first_index_like_argmax():
    h, w, _, _ = _inputs((5,), 8, 1000, bias=False)
    b = torch.zeros(1000)
    b[[300, 5, 900]] = 3.0  # equal maxima in chunks 1, 0 and 3 (chunk_vocab=256)
    stats = token_stats(h, w * 0, bias=b, chunk_vocab=256)
    assert stats.argmax.tolist() == [5] * 5
    torch.testing.assert_close(stats.entropy, _naive_stats(F.linear(h, w * 0, b), None)[2])


def _naive_lce(h, w, b, labels, reduction, ignore_index=-100):
    logits = F.linear(h, w, b).float()
    return F.cross_entropy(
        logits.reshape(-1, w.shape[0]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
    )


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize(("lead", "hidden_size", "vocab_size", "ct", "cv"), SHAPES[:3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_values_and_grads(lead, hidden_size, vocab_size, ct, cv, reduction):
    h, w, b, labels = _inputs(lead, hidden_size, vocab_size)
    labels.view(-1)[1::4] = -100
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    refs = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = linear_cross_entropy(
        *leaves[:2], labels, bias=leaves[2], reduction=reduction, chunk_tokens=ct, chunk_vocab=cv
    )
    ref = _naive_lce(*refs, labels, reduction)
    if reduction == "none":
        ref = ref.reshape(lead)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # a non-uniform upstream gradient for "none" exercises per-token scaling
    upstream = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
    for got, want in zip(
        _grads((loss * upstream).sum(), leaves), _grads((ref * upstream).sum(), refs)
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_only_needed_grads_are_computed():
    h, w, _, labels = _inputs((12,), 8, 64, bias=False)
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, w, labels, chunk_vocab=16)
    loss.backward()
    ref_h = h.clone().requires_grad_()
    _naive_lce(ref_h, w, None, labels, "mean").backward()
    torch.testing.assert_close(hh.grad, ref_h.grad, atol=1e-5, rtol=1e-5)
    assert w.grad is None


def test_ignore_index_custom_value():
    h, w, b, labels = _inputs((20,), 8, 40)
    labels[::2] = 7  # 7 is ignored, although a valid token id
    got = linear_cross_entropy(h, w, labels, ignore_index=7, bias=b, chunk_vocab=16)
    torch.testing.assert_close(got, _naive_lce(h, w, b, labels, "mean", ignore_index=7))
    stats = token_stats(h, w, labels, bias=b, ignore_index=7, chunk_vocab=16)
    assert (stats.ce[::2] == 0).all() and (stats.ce[1::2] > 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_labels_ignored_gives_zero_loss_and_grads(reduction):
    h, w, b, labels = _inputs((2, 5), 8, 33)
    labels.fill_(-100)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], reduction=reduction)
    assert loss.item() == 0.0
    loss.backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all() and (t.grad == 0).all()


def test_no_tokens_gives_zero_loss_and_zero_grads():
    h, w, b, labels = _inputs((0,), 8, 33)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = linear_cross_entropy(*leaves[:2], labels, bias=leaves[2])
    assert loss.item() == 0.0
    loss.backward()
    assert (leaves[1].grad == 0).all() and (leaves[2].grad == 0).all()
    assert token_stats(h, w, labels).entropy.shape == (0,)


def test_lse_output_is_differentiable():
    # lce_fwd also returns the per-token log-sum-exp (for z-loss style terms); its gradient is
    # softmax, folded into the same backward
    h, w, b, labels = _inputs((9,), 8, 50)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    refs = [t.clone().requires_grad_() for t in (h, w, b)]
    loss, lse = torch.ops.fluid_ops.lce_fwd(*leaves[:2], labels, leaves[2], -100, 4, 16, "torch")
    logits = F.linear(*refs)
    ref_loss = F.cross_entropy(logits, labels, reduction="none")
    ref_lse = logits.logsumexp(-1)
    torch.testing.assert_close(lse, ref_lse)
    objective, ref_objective = (
        loss.sum() + 0.1 * (lse**2).sum(),
        ref_loss.sum() + 0.1 * (ref_lse**2).sum(),
    )
    for got, want in zip(_grads(objective, leaves), _grads(ref_objective, refs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_give_fp32_outputs_close_to_reference():
    h, w, b, labels = _inputs((4, 8), 32, 1000, dtype=torch.bfloat16)
    labels.view(-1)[::5] = -100
    stats = token_stats(h, w, labels, bias=b, chunk_tokens=16, chunk_vocab=256)
    logits = F.linear(h, w, b).float()  # a bf16 LM head, upcast
    _, max_logprob, entropy, ce = _naive_stats(logits, labels)
    assert stats.max_logprob.dtype == stats.entropy.dtype == stats.ce.dtype == torch.float32
    # chunked bf16 matmuls may round differently: the chosen token must be a maximal logit
    picked = logits.gather(-1, stats.argmax.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(picked, logits.max(-1).values, atol=0.05, rtol=0.02)
    torch.testing.assert_close(stats.max_logprob, max_logprob, atol=0.05, rtol=0.02)
    torch.testing.assert_close(stats.entropy, entropy, atol=0.05, rtol=0.02)
    torch.testing.assert_close(stats.ce, ce, atol=0.05, rtol=0.02)

    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    refs = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = linear_cross_entropy(
        *leaves[:2], labels, bias=leaves[2], chunk_tokens=16, chunk_vocab=256
    )
    ref = _naive_lce(*refs, labels, "mean")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=0.02, rtol=0.01)
    for got, want in zip(_grads(loss, leaves), _grads(ref, refs)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=0.05)


def test_autocast_computes_the_head_in_autocast_dtype():
    h, w, b, labels = _inputs((16,), 32, 200)
    wl = w.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, wl, labels, bias=b, chunk_vocab=64)
        ref = _naive_lce(h, wr, b, labels, "mean")
    assert ref.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=0.02, rtol=0.01)
    loss.backward()
    ref.backward()
    assert wl.grad.dtype == torch.float32
    torch.testing.assert_close(wl.grad, wr.grad, atol=2e-3, rtol=0.05)


def test_bad_inputs_fail_clearly():
    h, w, _, labels = _inputs((5,), 8, 20, bias=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_stats(h, w, torch.full((5,), 20))
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(h, w[:, :4], labels)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, labels, reduction="avg")
    with pytest.raises(ValueError, match="leading dims"):
        linear_cross_entropy(h, w, labels[:4])


def test_cpu_dispatch_picks_torch(monkeypatch):
    monkeypatch.delenv("FLUID_VOCAB_BACKEND", raising=False)
    assert dispatch.select("vocab", torch.device("cpu")) == "torch"
    assert set(dispatch.backends("vocab")) == {"torch", "triton"}


def test_forcing_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, w, _, labels = _inputs((3,), 8, 20, bias=False)
    with pytest.raises(dispatch.BackendUnavailable, match="TRITON_INTERPRET"):
        token_stats(h, w, backend="triton")
    with dispatch.force_backend("vocab", "triton"), pytest.raises(dispatch.BackendUnavailable):
        linear_cross_entropy(h, w, labels)
    monkeypatch.setenv("FLUID_VOCAB_BACKEND", "triton")
    with pytest.raises(dispatch.BackendUnavailable, match="TRITON_INTERPRET"):
        token_stats(h, w)


def test_ops_pass_opcheck():
    h, w, b, labels = _inputs((6,), 8, 40)
    labels[0] = -100
    h.requires_grad_()
    w.requires_grad_()
    lse = F.linear(h, w, b).logsumexp(-1).detach()
    cases = [
        (
            torch.ops.fluid_ops.token_stats.default,
            (h.detach(), w.detach(), labels, b, -100, 4, 16, "auto"),
        ),
        (
            torch.ops.fluid_ops.token_stats.default,
            (h.detach(), w.detach(), None, None, -100, 4, 16, "auto"),
        ),
        (torch.ops.fluid_ops.lce_fwd.default, (h, w, labels, b, -100, 4, 16, "auto")),
        (
            torch.ops.fluid_ops.lce_bwd.default,
            (
                torch.ones(6),
                None,
                h.detach(),
                w.detach(),
                labels,
                b,
                lse,
                -100,
                4,
                16,
                "torch",
                True,
                True,
                True,
            ),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h = torch.empty(2, 3, 8, dtype=torch.bfloat16)
        w = torch.empty(100, 8, dtype=torch.bfloat16)
        labels = torch.zeros(2, 3, dtype=torch.int64)
        stats = token_stats(h, w, labels)
        loss = linear_cross_entropy(h, w, labels, reduction="none")
    assert stats.argmax.shape == stats.entropy.shape == stats.ce.shape == (2, 3)
    assert stats.argmax.dtype == torch.int64 and stats.entropy.dtype == torch.float32
    assert loss.shape == (2, 3) and loss.dtype == torch.float32


def test_wrappers_compile_without_graph_breaks():
    h, w, _, labels = _inputs((2, 7), 16, 100, bias=False)
    leaf, ref = w.clone().requires_grad_(), w.clone().requires_grad_()

    def step(h, w, labels):
        return linear_cross_entropy(h, w, labels, chunk_vocab=32), token_stats(h, w).entropy

    loss, entropy = torch.compile(step, fullgraph=True, backend="aot_eager")(h, leaf, labels)
    loss.backward()
    ref_loss = _naive_lce(h, ref, None, labels, "mean")
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(leaf.grad, ref.grad)
    torch.testing.assert_close(entropy, _naive_stats(F.linear(h, w), None)[2])


def test_compiled_token_stats_equal_eager_over_an_lm_head():
    """A small LM (embedding → LM head) read through token_stats, compiled with dynamic shapes:
    the op stays one opaque node (its fake gives the shapes), one graph serves two lengths, and
    the compiled statistics equal eager's."""
    torch.manual_seed(0)
    embed, head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 300)

    def stats(ids, labels):
        return token_stats(embed(ids), head.weight, labels, bias=head.bias, chunk_vocab=128)

    graphs = []

    def aot_eager_recording(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(stats, fullgraph=True, dynamic=True, backend=aot_eager_recording)
    compiled_after = []
    for length in (7, 12):
        ids = torch.randint(0, 50, (2, length))
        labels = torch.randint(0, 300, (2, length))
        labels[:, 0] = -100
        got, want = compiled(ids, labels), stats(ids, labels)
        assert torch.equal(got.argmax, want.argmax)
        for name in ("max_logprob", "entropy", "ce"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)
        assert not any(t.requires_grad for t in got)  # statistics only: no gradient to follow
        compiled_after.append(len(graphs))
    assert compiled_after[0] == compiled_after[1] > 0  # the second length reused the graph
    ops = [n.target for n in graphs[-1].graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.fluid_ops.token_stats) == 1  # one opaque op, not its tile loop
