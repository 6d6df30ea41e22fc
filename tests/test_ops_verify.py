"""The fused loop's verify (``fluid_ops.verify.verify_drafts``): the ``triton`` back end gives the
torch rule's accepted lengths, corrections and tokens.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` in a child process (the flag never leaks into
other test modules): random rows (drafts as row slices of wider state, fewer real drafts than
columns, every draft accepted, positions with no token) and every call a real engine run makes —
greedy, sampling and penalised rows — give the same integers. On a lent CUDA machine (``-m gpu``)
the compiled kernel is checked the same way.
"""

import textwrap

import pytest
import torch
from interpreted import run_interpreted

from fluid_ops.verify import commit_tokens, verify_drafts, verify_drafts_torch

_CASES = textwrap.dedent(
    """
    import torch

    def cases(device):
        gen = torch.Generator().manual_seed(0)
        out = []
        for n in range(200):
            hi = int(torch.randint(1, 6, (), generator=gen))
            k_max = int(torch.randint(1, 17, (), generator=gen))
            big_m = int(torch.randint(1, k_max + 1, (), generator=gen))
            vocab = int(torch.randint(2, 6, (), generator=gen))  # (few ids: long runs of matches)
            # the engine's drafts are a row slice of [slots, k_max]
            drafts = torch.randint(0, vocab, (hi + 2, k_max), generator=gen)[:hi, :big_m]
            ar = torch.randint(0, vocab, (hi, big_m + 1), generator=gen)
            agree = torch.rand(hi, 1, generator=gen) < 0.3  # rows whose every draft is the argmax
            ar[:, :big_m] = torch.where(agree, drafts, ar[:, :big_m])
            m = torch.randint(0, big_m + 1, (hi,), generator=gen)
            nothing = None
            if n % 3 == 0:  # (as wide as the engine's, or a row slice of wider flags)
                wide = big_m + 1 + int(torch.randint(0, 3, (), generator=gen))
                nothing = (torch.rand(hi, wide, generator=gen) < 0.15)[:, : big_m + 1]
            t = [x.to(device) for x in (drafts, ar, m)]
            tokens = n % 7 != 0  # (sampling steps build their tokens later)
            out.append((*t, None if nothing is None else nothing.to(device), tokens))
        return out

    def check(got, want):
        for g, w in zip(got, want, strict=True):
            if w is None:
                assert g is None
                continue
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w), (g, w)
    """
)

_TRITON_CHILD = _CASES + textwrap.dedent(
    """
    import copy

    from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
    from fluid_npu.sampling import step as engine_step
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.rules import SamplingParams
    from fluid_npu.sampling.scheduler import Request, Scheduler
    from fluid_ops import verify

    for args in cases("cpu"):
        check(verify.verify_drafts(*args, backend="triton"), verify.verify_drafts_torch(*args))

    # every call of real runs: greedy rows, sampling rows, penalised rows (their "nothing")
    seen = []
    def keep(a):  # a copy with the same strides (the engine's row slices of wider state)
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).copy_(a)
    def capture(*args, tokens=True):
        seen.append((*(keep(a) if torch.is_tensor(a) else a for a in args), tokens))
        return verify.verify_drafts_torch(*args, tokens=tokens)
    engine_step.verify_drafts = capture
    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, seed=3)
    texts = ["hello world", "a", "the quick brown fox jumps", "xyz", "over the lazy dog"]
    # (a head of zeros: every logit ties, the argmax and every draft are token 0, all accepted)
    flat = copy.deepcopy(model)
    flat.get_output_embeddings().weight.data.zero_()
    runs = ((model, "fixed:3", None), (model, "entropy:6", SamplingParams(temperature=0.8, seed=1)),
            (model, "fixed:4", SamplingParams(repetition_penalty=1.3)), (flat, "fixed:4", None),
            (flat, "entropy:2", None))
    for net, policy, extra in runs:
        sched = Scheduler(net, tok.mask_token_id, policy=policy, max_batch=3, eos_ids=[],
                          k_max=4, host_step=False, adaptive=False)
        reqs = [Request(str(i), tok(t * 2)["input_ids"], 9, sampling=extra)
                for i, t in enumerate(texts)]
        run_requests(sched, reqs)
        sched.close()
    assert len(seen) > 20 and any(a[3] is not None for a in seen)
    assert {a[4] for a in seen} == {True, False}  # (greedy and sampling steps)
    accepted = [verify.verify_drafts_torch(*a)[0] for a in seen]
    assert any(bool((a == 0).any()) for a in accepted)  # (drafts rejected at once, ...
    assert any(int(a.max()) == args[0].shape[1] for a, args in zip(accepted, seen))  # ... all taken
    for args in seen:
        check(verify.verify_drafts(*args, backend="triton"), verify.verify_drafts_torch(*args))
    print("ok", len(seen))
    """
)


def test_triton_verify_equals_the_torch_rule_under_the_interpreter():
    assert run_interpreted(_TRITON_CHILD).startswith("ok")


def test_the_engine_verifies_through_the_op():
    """The accepted length is the leading run of drafts equal to the argmax (never past ``m``,
    never through a position with no token); the row commits them, then the correction. The
    engine's decode step (``fluid_npu.sampling.step``) calls this op; on a CPU it is the torch
    rule."""
    from fluid_npu.sampling import step as engine_step

    assert engine_step.verify_drafts is verify_drafts
    t = torch.tensor
    drafts = t([[5, 6, 7], [5, 6, 7], [5, 6, 7], [1, 2, 3]])
    ar = t([[5, 6, 7, 8], [5, 9, 7, 8], [5, 6, 7, 8], [1, 2, 3, 4]])
    m = t([3, 3, 1, 3])
    nothing = t([[False] * 4, [False] * 4, [False] * 4, [False, True, False, False]])
    a, corr, toks = verify_drafts(drafts, ar, m, nothing)
    assert a.tolist() == [3, 1, 1, 1] and corr.tolist() == [[8], [9], [6], [2]]
    assert toks.tolist() == [[5, 6, 7, 8], [5, 9, 7, 9], [5, 6, 7, 6], [1, 2, 3, 2]]
    assert torch.equal(commit_tokens(drafts, corr, a), toks)
    want = verify_drafts_torch(drafts, ar, m, nothing)
    assert all(torch.equal(x, y) for x, y in zip((a, corr, toks), want, strict=True))


@pytest.mark.gpu
def test_compiled_verify_on_cuda_equals_the_torch_rule():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run with -m gpu)")
    namespace: dict = {}
    exec(_CASES, namespace)  # (the same cases and check as the interpreter's)
    for args in namespace["cases"]("cuda"):
        namespace["check"](verify_drafts(*args, backend="triton"), verify_drafts_torch(*args))
