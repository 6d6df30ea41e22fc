"""The decode step's inputs (``fluid_npu.sampling.step_inputs``): the ``triton`` back end gives the
torch rule's integers.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` in a child process (the flag never leaks into
other test modules): random rows (some not running, drafts and candidate lengths as row slices of
wider tensors, steps without drafts or without blocks) and every call a real engine run makes give
the same ids, positions, anchor ids, draft counts and candidate lengths. On a lent CUDA machine
(``-m gpu``) the compiled kernel is checked the same way.
"""

import textwrap

import pytest
import torch
from interpreted import run_interpreted

from fluid_npu.sampling.step_inputs import step_inputs, step_inputs_torch

_CASES = textwrap.dedent(
    """
    import torch

    def cases(device):
        gen = torch.Generator().manual_seed(0)
        out = []
        for n in range(150):
            hi = int(torch.randint(1, 6, (), generator=gen))
            k_max = int(torch.randint(1, 9, (), generator=gen))
            big_m = int(torch.randint(0, k_max + 1, (), generator=gen))
            anchors = int(torch.randint(1, 4, (), generator=gen))
            n_blocks = int(torch.randint(0, anchors + 1, (), generator=gen))
            k = int(torch.randint(0, k_max + 1, (), generator=gen))  # (k = 0: blocks of no slot)
            # the engine's state is wider than a step reads: row slices of [slots, k_max / anchors]
            drafts = torch.randint(0, 500, (hi + 2, k_max), generator=gen)[:hi, :big_m]
            cand = torch.randint(-1, big_m + 1, (hi + 2, anchors), generator=gen)[:hi, :n_blocks]
            last = torch.randint(0, 500, (hi,), generator=gen)
            base = torch.randint(0, 300, (hi,), generator=gen)
            m = torch.randint(0, k_max + 1, (hi,), generator=gen)
            run = torch.rand(hi, generator=gen) < 0.7
            t = [x.to(device) for x in (last, drafts, base, m, run, cand)]
            out.append((*t, k, 7))
        return out

    def check(got, want):
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w), (g, w)
    """
)

_TRITON_CHILD = _CASES + textwrap.dedent(
    """
    from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
    from fluid_npu.sampling import step as engine_step
    from fluid_npu.sampling import step_inputs as si
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request, Scheduler

    for args in cases("cpu"):
        check(si.step_inputs(*args, backend="triton"), si.step_inputs_torch(*args))

    # every call of real runs: steps with drafts and blocks, AR steps, rows that stopped running
    seen = []
    def keep(a):  # a copy with the same strides (the engine's row slices of wider state)
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).copy_(a)
    def capture(*args):
        seen.append(tuple(keep(a) if torch.is_tensor(a) else a for a in args))
        return si.step_inputs_torch(*args)
    engine_step.step_inputs = capture
    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, seed=3)
    texts = ["hello world", "a", "the quick brown fox jumps", "xyz", "over the lazy dog"]
    for policy in ("fixed:3", "entropy:6", "ar"):
        sched = Scheduler(model, tok.mask_token_id, policy=policy, max_batch=3, eos_ids=[],
                          k_max=4, host_step=False, adaptive=False)
        reqs = [Request(str(i), tok(t * 2)["input_ids"], 9) for i, t in enumerate(texts)]
        run_requests(sched, reqs)
        sched.close()
    shapes = {(a[1].shape[1], a[5].shape[1]) for a in seen}
    assert len(seen) > 20 and (0, 0) in shapes and any(m and n for m, n in shapes), shapes
    assert any(not (a[1].is_contiguous() and a[5].is_contiguous()) for a in seen)  # (slices)
    for args in seen:
        check(si.step_inputs(*args, backend="triton"), si.step_inputs_torch(*args))
    print("ok", len(seen))
    """
)


def test_triton_step_inputs_equal_the_torch_rule_under_the_interpreter():
    assert run_interpreted(_TRITON_CHILD).startswith("ok")


def test_the_engine_s_inputs_are_the_dispatched_ones():
    """The engine's decode step (``fluid_npu.sampling.step``) builds its inputs with this op; on
    a CPU they are the torch rule's."""
    from fluid_npu.sampling import step as engine_step

    assert engine_step.step_inputs is step_inputs
    t = torch.tensor
    args = (t([5, 6]), t([[1, 2], [3, 4]]), t([10, 3]), t([2, 1]), t([True, False]), t([[0], [1]]),
            2, 9)  # fmt: skip
    ids, pos, anchor, m, cand = step_inputs(*args)
    assert ids.tolist() == [[5, 1, 2, 9, 9], [6, 3, 4, 9, 9]]
    assert pos.tolist() == [[10, 11, 12, 11, 12], [3, 4, 5, 4, 5]]
    assert anchor.tolist() == [[-1, -1, -1, 10, 10], [-2, -2, -2, -2, -2]]
    assert m.tolist() == [2, 0] and cand.tolist() == [[0], [-1]]
    assert all(torch.equal(a, b) for a, b in zip((ids, pos, anchor, m, cand),
                                                 step_inputs_torch(*args)))  # fmt: skip


@pytest.mark.gpu
def test_compiled_step_inputs_on_cuda_equal_the_torch_rule():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run with -m gpu)")
    namespace: dict = {}
    exec(_CASES, namespace)  # (the same cases and check as the interpreter's)
    for args in namespace["cases"]("cuda"):
        namespace["check"](step_inputs(*args, backend="triton"), step_inputs_torch(*args))
