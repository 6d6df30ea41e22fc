"""Draft statistics of logits (``fluid_ops.logit_stats``): the ``triton`` back end gives the torch
rule's argmax and, to float32 rounding, its log-probability and entropy; and the decode engine with
every step kernel on (its inputs, the step mask, its verify, the block it hit, the next blocks'
lengths, these statistics) commits the same tokens and drafts as with the torch rules — and, with
the draft budget's gate on as well, the same tokens.

On CPU the kernels run under ``TRITON_INTERPRET=1`` in a child process (the flag never leaks into
other test modules). On a lent CUDA machine (``-m gpu``) the compiled kernel is checked the same
way.
"""

import textwrap
from types import SimpleNamespace

import pytest
import torch
from interpreted import run_interpreted

from fluid_ops.logit_stats import logit_stats, logit_stats_torch

_CASES = textwrap.dedent(
    """
    import torch

    def cases(device):
        gen = torch.Generator().manual_seed(0)
        out = []
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for shape in [(3, 486), (2, 5000), (4, 7), (1, 1), (2, 3, 4096), (2, 9000), (0, 5)]:
                x = torch.randn(*shape, generator=gen) * 4
                if x.numel() and shape[-1] > 2:  # the largest logit twice, far apart: the first
                    flat = x.view(-1, shape[-1])
                    flat[0, shape[-1] // 3] = flat[0].max() + 1
                    flat[0, -1] = flat[0, shape[-1] // 3]
                out.append(x.to(dtype).to(device))
        out.append(torch.zeros(2, 300, device=device))  # every logit tied: index 0, log V
        return out

    def check(got, want):
        assert torch.equal(got.argmax, want.argmax), (got.argmax, want.argmax)
        torch.testing.assert_close(got.max_logprob, want.max_logprob, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-5)
        assert got.max_logprob.dtype == got.entropy.dtype == torch.float32 and got.ce is None
    """
)

_TRITON_CHILD = _CASES + textwrap.dedent(
    """
    from fluid_ops import dispatch, logit_stats as ls, logit_stats_triton
    from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request, Scheduler

    assert dispatch.select("logit_stats", torch.device("cpu"), "triton") == "triton"
    for x in cases("cpu"):
        check(ls.logit_stats(x, backend="triton"), ls.logit_stats_torch(x))
    logit_stats_triton.MAX_BLOCK = 64  # many tiles a row, a tie across them
    for x in cases("cpu")[:7]:
        check(ls.logit_stats(x, backend="triton"), ls.logit_stats_torch(x))
    # banned tokens (-inf), whole first tiles of them: the statistics of the tokens left (where the
    # torch rule's entropy is NaN)
    x = torch.randn(2, 300) * 3
    x[:, :150] = -float("inf")
    got, rest = ls.logit_stats(x, backend="triton"), ls.logit_stats_torch(x[:, 150:])
    check(ls.TokenStats(got.argmax - 150, got.max_logprob, got.entropy, None), rest)

    # the engine with every step kernel against the torch rules: the same tokens (greedy), in
    # float32 and bfloat16
    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, seed=3)
    texts = ["hello world", "a", "the quick brown fox jumps", "xyz", "over the lazy dog"]
    import contextlib
    import fluid_ops.gate, fluid_ops.hits, fluid_ops.step_inputs, fluid_ops.verify  # (their ops)
    ops = ("step_mask", "choose_anchors", "logit_stats", "step_inputs", "verify_drafts",
           "draft_gate", "block_hits")
    def decode(backend, policy, adaptive=False):
        with contextlib.ExitStack() as forced:
            for op in ops:
                forced.enter_context(dispatch.force_backend(op, backend))
            sched = Scheduler(model, tok.mask_token_id, policy=policy, max_batch=3, eos_ids=[],
                              k_max=4, host_step=False, adaptive=adaptive)
            drafts, draft = [], sched._draft
            def record(*a):  # every draft block and how much of it the policy keeps
                out = draft(*a)
                drafts.append((out[0].tolist(), out[2].tolist()))
                return out
            sched._draft = record
            reqs = [Request(str(i), tok(t * 2)["input_ids"], 10) for i, t in enumerate(texts)]
            done = run_requests(sched, reqs)
            sched.close()
        return {k: list(v.tokens) for k, v in done.items()}, drafts
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        policy = "entropy:6"  # (the statistics' entropy feeds its cut)
        want, want_drafts = decode("torch", policy)
        got, got_drafts = decode("triton", policy)
        # the same tokens, and here the same drafts (statistics that differ by rounding could
        # move a policy's cut on a near-tie: none in these runs)
        assert got == want and got_drafts == want_drafts, (dtype, got, want)
        assert len(want_drafts) > 10, len(want_drafts)
        # with the draft budget on (its gate): the shapes follow timings, the tokens must not
        assert decode("triton", policy, adaptive=True)[0] == want, dtype
    print("ok")
    """
)


def test_triton_logit_stats_equal_the_torch_rule_under_the_interpreter():
    assert run_interpreted(_TRITON_CHILD).startswith("ok")


def test_the_lm_head_reads_its_direct_logits_through_the_op(monkeypatch):
    """The engine's draft statistics (``LMHead.stats`` below ``DIRECT_LOGITS``) use this op, and
    on a CPU they are the torch rule's."""
    from fluid_npu.sampling import head

    hidden, weight = torch.randn(2, 3, 8), torch.randn(11, 8)
    lm = SimpleNamespace(weight=weight, bias=None, _direct=lambda h: True)
    got = head.LMHead.stats(lm, hidden)  # type: ignore[arg-type]
    want = logit_stats_torch(hidden @ weight.T)
    assert torch.equal(got.argmax, want.argmax) and torch.equal(got.entropy, want.entropy)
    calls = []
    monkeypatch.setattr(head, "logit_stats", lambda x: calls.append(x.shape) or "read")
    assert head.LMHead.stats(lm, hidden) == "read" and calls == [(2, 3, 11)]  # type: ignore


@pytest.mark.gpu
def test_compiled_logit_stats_on_cuda_equal_the_torch_rule():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run with -m gpu)")
    namespace: dict = {}
    exec(_CASES, namespace)  # (the same cases and check as the interpreter's)
    for x in namespace["cases"]("cuda"):
        namespace["check"](logit_stats(x, backend="triton"), logit_stats_torch(x))
