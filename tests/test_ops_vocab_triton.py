"""The ``triton`` back end of ``fluid_ops.vocab`` against the ``torch`` one.

On CPU the kernels run under ``TRITON_INTERPRET=1`` in a child process (the interpreter flag never
leaks into other test modules of the same pytest run): tied maxima across kernel tiles and
vocabulary chunks, ``-inf`` logits, ignored labels, bf16, and the backward with the back end
forced on the calling thread. On a lent CUDA machine (``-m gpu``) the compiled kernels are checked
in fp32 and bf16.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_ops_vocab import _grads, _inputs

from fluid_ops import dispatch
from fluid_ops.vocab import linear_cross_entropy, token_stats

_TRITON_CHILD = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from fluid_ops import dispatch, vocab

    assert dispatch.select("vocab", torch.device("cpu"), "triton") == "triton"
    gen = torch.Generator().manual_seed(1)
    # V = 1500: a 1100-wide chunk spans two 1024-wide kernel tiles, the second one masked
    T, H, V = 19, 8, 1500
    h = torch.randn(T, H, generator=gen) * 2
    w = torch.randn(V, H, generator=gen)
    b = torch.randn(V, generator=gen)
    b[1100:1300] = float("-inf")
    b[[1400, 1050, 3, 700]] = 40.0  # tied maxima across kernel tiles and vocabulary chunks
    h[-1] = 0.0
    labels = torch.randint(0, 1100, (T,), generator=gen)
    labels[::4] = -100
    kw = dict(bias=b, chunk_tokens=8, chunk_vocab=1100)
    got = vocab.token_stats(h, w, labels, backend="triton", **kw)
    want = vocab.token_stats(h, w, labels, backend="torch", **kw)
    logits = F.linear(h, w, b)
    assert torch.equal(got.argmax, logits.argmax(-1)) and got.argmax[-1] == 3
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.ce, F.cross_entropy(logits, labels, reduction="none"))

    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    refs = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = vocab.linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], reduction="sum",
                                      chunk_tokens=8, chunk_vocab=1100, backend="triton")
    with dispatch.force_backend("vocab", "triton"):  # the forced back end holds in backward too
        loss.backward()
    ref = F.cross_entropy(F.linear(*refs), labels, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for g, r in zip(leaves, refs):
        torch.testing.assert_close(g.grad, r.grad, atol=1e-5, rtol=1e-5)

    hb, wb = h.bfloat16(), w.bfloat16()
    got = vocab.token_stats(hb, wb, labels, chunk_tokens=8, chunk_vocab=1100, backend="triton")
    want = vocab.token_stats(hb, wb, labels, chunk_tokens=8, chunk_vocab=1100, backend="torch")
    assert torch.equal(got.argmax, want.argmax)
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    print("TRITON-INTERPRET-OK")
    """
)


@pytest.mark.slow  # ~10 s: a fresh interpreter process imports torch and triton
def test_triton_backend_under_interpreter_matches_torch():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FLUID_VOCAB_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_CHILD], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TRITON-INTERPRET-OK" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run with -m gpu)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda_matches_torch(dtype):
    h, w, b, labels = (t.cuda() if t is not None else t for t in _inputs((300,), 64, 5000))
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)
    labels[::7] = -100
    assert dispatch.select("vocab", h.device) == "triton"
    kw = {"bias": b, "chunk_tokens": 128, "chunk_vocab": 1536}
    got = token_stats(h, w, labels, backend="triton", **kw)
    want = token_stats(h, w, labels, backend="torch", **kw)
    assert torch.equal(got.argmax, want.argmax)
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    results = []
    for name in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        loss = linear_cross_entropy(
            *leaves[:2], labels, bias=leaves[2], backend=name, chunk_tokens=128, chunk_vocab=1536
        )
        results.append([loss, *_grads(loss, leaves)])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for g, r in zip(*results):
        torch.testing.assert_close(g.float(), r.float(), atol=tol, rtol=tol)
