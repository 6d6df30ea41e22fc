"""Which candidate block the accepted length hit (``fluid_ops.hits.block_hits``): the ``triton``
back end gives the torch rule's block, flag and index.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` in a child process (the flag never leaks into
other test modules): random rows (candidates as row slices of wider state, lengths hit once, twice
or never, rows that do not run, steps a grammar cut short) and every call a real engine run makes
give the same values. On a lent CUDA machine (``-m gpu``) the compiled kernel is checked the same
way.
"""

import textwrap

import pytest
import torch
from interpreted import run_interpreted

from fluid_ops.hits import block_hits, block_hits_torch

_CASES = textwrap.dedent(
    """
    import torch

    def cases(device):
        gen = torch.Generator().manual_seed(0)
        out = []
        for n in range(200):
            rows = int(torch.randint(1, 20, (), generator=gen))
            anchors = int(torch.randint(1, 5, (), generator=gen))
            width = int(torch.randint(1, anchors + 1, (), generator=gen))
            top = int(torch.randint(0, 6, (), generator=gen))  # (few lengths: hits, repeats)
            cand = torch.randint(-1, top + 1, (rows + 2, anchors), generator=gen)[:rows, :width]
            a = torch.randint(0, top + 2, (rows,), generator=gen)
            run = torch.rand(rows, generator=gen) < 0.8
            cut = torch.rand(rows, generator=gen) < 0.2 if n % 3 == 0 else None
            t = [x.to(device) for x in (cand, a, run)]
            out.append((*t, None if cut is None else cut.to(device)))
        return out

    def check(got, want):
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w), (g, w)
    """
)

_TRITON_CHILD = _CASES + textwrap.dedent(
    """
    from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
    from fluid_npu.sampling import step as engine_step
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request, Scheduler
    from fluid_ops import hits

    outcomes = set()
    for args in cases("cpu"):
        want = hits.block_hits_torch(*args)
        check(hits.block_hits(*args, backend="triton"), want)
        outcomes |= set(want[2].tolist())
    assert {-1, 0, 1} <= outcomes, outcomes  # (no block, the first, a later one)

    # every call of real runs
    seen = []
    def keep(a):  # a copy with the same strides
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).copy_(a)
    def capture(*args):
        seen.append(tuple(keep(a) if torch.is_tensor(a) else a for a in args))
        return hits.block_hits_torch(*args)
    engine_step.block_hits = capture
    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, seed=3)
    texts = ["hello world", "a", "the quick brown fox jumps", "xyz", "over the lazy dog"]
    for policy in ("fixed:3", "entropy:6"):
        sched = Scheduler(model, tok.mask_token_id, policy=policy, max_batch=3, eos_ids=[],
                          k_max=4, host_step=False, adaptive=False, anchors=2, coverage=1.0)
        reqs = [Request(str(i), tok(t * 2)["input_ids"], 9) for i, t in enumerate(texts)]
        run_requests(sched, reqs)
        sched.close()
    assert len(seen) > 10 and any(a[0].shape[1] == 2 for a in seen), len(seen)
    for args in seen:
        check(hits.block_hits(*args, backend="triton"), hits.block_hits_torch(*args))
    print("ok", len(seen))
    """
)


def test_triton_block_hits_equal_the_torch_rule_under_the_interpreter():
    assert run_interpreted(_TRITON_CHILD).startswith("ok")


def test_the_engine_finds_its_next_drafts_through_the_op():
    """The first block anchored at the accepted length holds the next drafts; a row has it only if
    it runs and its step was not cut. The engine's decode step (``fluid_npu.sampling.step``) calls
    this op; on a CPU it is the torch rule."""
    from fluid_npu.sampling import step as engine_step

    assert engine_step.block_hits is block_hits
    t = torch.tensor
    cand = t([[0, 3], [2, 2], [0, 3], [1, -1], [0, 3]])
    a, run = t([3, 2, 1, 1, 0]), t([True, True, True, False, True])
    cut = t([False, False, False, False, True])
    blk, has, hit = block_hits(cand, a, run, cut)
    assert blk.tolist() == [1, 0, 0, 0, 0] and has.tolist() == [True, True, False, False, False]
    assert hit.tolist() == [1, 0, -1, -1, -1]
    want = block_hits_torch(cand, a, run, cut)
    assert all(torch.equal(x, y) for x, y in zip((blk, has, hit), want, strict=True))


@pytest.mark.gpu
def test_compiled_block_hits_on_cuda_equal_the_torch_rule():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run with -m gpu)")
    namespace: dict = {}
    exec(_CASES, namespace)  # (the same cases and check as the interpreter's)
    for args in namespace["cases"]("cuda"):
        namespace["check"](block_hits(*args, backend="triton"), block_hits_torch(*args))
