"""The draft budget's gate (``fluid_ops.gate.draft_gate``): the ``triton`` back end keeps the same
rows' next blocks as the torch rule.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` in a child process (the flag never leaks into
other test modules): random batches (rows worth a block or not, the batch's earnings above and
below its price, rows that ended or do not run, a due probe, sampling rows, a price that is
infinite or zero, candidates as row slices of wider state) and every call of real engine runs with
adaptive drafting give the same lengths. On a lent CUDA machine (``-m gpu``) the compiled kernel is
checked the same way.
"""

import textwrap

import pytest
import torch
from interpreted import run_interpreted

from fluid_ops.gate import draft_gate, draft_gate_torch

_CASES = textwrap.dedent(
    """
    import torch

    def cases(device):
        gen = torch.Generator().manual_seed(0)
        out = []
        for n in range(200):
            rows = int(torch.randint(1, 40, (), generator=gen))
            anchors = int(torch.randint(1, 4, (), generator=gen))
            width = int(torch.randint(0, anchors + 1, (), generator=gen))
            cand = torch.randint(-1, 9, (rows + 3, anchors), generator=gen)[:rows, :width]
            # averages in quarters: sums of them are exact in float32 whatever the order
            ema = torch.randint(0, 33, (rows,), generator=gen).float() / 4
            run = torch.rand(rows, generator=gen) < 0.8
            done = torch.rand(rows, generator=gen) < 0.2
            sampling = torch.rand(rows, generator=gen) < (0.2 if n % 4 == 0 else 0.0)
            temp = torch.where(sampling, 0.7, 0.0)
            price = [0.0, 0.5, 1.25, 2.0, 3.0, 5.0, float("inf")][n % 7]
            probe = n % 5 == 0
            t = [x.to(device) for x in (cand, ema, run, done, temp)]
            out.append((*t, price, probe))
        return out

    def check(got, want):
        assert got.dtype == want.dtype and torch.equal(got, want), (got, want)
    """
)

_TRITON_CHILD = _CASES + textwrap.dedent(
    """
    from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
    from fluid_npu.sampling import step as engine_step
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request, Scheduler
    from fluid_ops import gate

    decided = set()
    for args in cases("cpu"):
        want = gate.draft_gate_torch(*args)
        check(gate.draft_gate(*args, backend="triton"), want)
        cand = args[0]
        decided.add((bool((want >= 0).any()), bool(((want < 0) & (cand >= 0)).any())))
    assert decided == {(False, False), (False, True), (True, False), (True, True)}, decided

    # every call of real runs with adaptive drafting
    seen = []
    def keep(a):  # a copy with the same strides
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).copy_(a)
    def capture(*args):
        seen.append(tuple(keep(a) if torch.is_tensor(a) else a for a in args))
        return gate.draft_gate_torch(*args)
    engine_step.draft_gate = capture
    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, seed=3)
    texts = ["hello world", "a", "the quick brown fox jumps", "xyz", "over the lazy dog"]
    for policy in ("fixed:3", "entropy:6"):
        sched = Scheduler(model, tok.mask_token_id, policy=policy, max_batch=3, eos_ids=[],
                          k_max=4, host_step=False, adaptive=True)
        reqs = [Request(str(i), tok(t * 3)["input_ids"], 16) for i, t in enumerate(texts * 2)]
        run_requests(sched, reqs)
        sched.close()
    assert len(seen) > 10, len(seen)
    for args in seen:
        check(gate.draft_gate(*args, backend="triton"), gate.draft_gate_torch(*args))
    print("ok", len(seen))
    """
)


def test_triton_gate_equals_the_torch_rule_under_the_interpreter():
    assert run_interpreted(_TRITON_CHILD).startswith("ok")


def test_the_engine_gates_blocks_through_the_op():
    """A row drafts while its average reaches the price and the rows worth a block together earn
    what the batch pays; a due probe or a sampling row drafts anyway. The engine's decode step
    (``fluid_npu.sampling.step``) calls this op; on a CPU it is the torch rule."""
    from fluid_npu.sampling import step as engine_step

    assert engine_step.draft_gate is draft_gate
    t = torch.tensor
    cand = t([[0, 2], [1, -1], [0, 3]])
    run, done, temp = t([True, True, True]), t([False, False, False]), t([0.0, 0.0, 0.0])
    # rows 0 and 2 are worth a block (3.0, 2.0 >= 2.0) and earn 5.0 < 2.0 * 3 rows: none drafts
    ema = t([3.0, 1.0, 2.0])
    assert draft_gate(cand, ema, run, done, temp, 2.0, False).tolist() == [[-1, -1]] * 3
    # the row that ended no longer pays: 5.0 >= 2.0 * 2 rows, the rows worth it draft
    got = draft_gate(cand, ema, run, t([False, True, False]), temp, 2.0, False)
    assert got.tolist() == [[0, 2], [-1, -1], [0, 3]]
    # a due probe drafts every row; a sampling row drafts whatever it earns
    assert torch.equal(draft_gate(cand, ema, run, done, temp, 2.0, True), cand)
    got = draft_gate(cand, ema, run, done, t([0.0, 0.8, 0.0]), 2.0, False)
    assert got.tolist() == [[-1, -1], [1, -1], [-1, -1]]
    assert torch.equal(got, draft_gate_torch(cand, ema, run, done, t([0.0, 0.8, 0.0]), 2.0, False))


@pytest.mark.gpu
def test_compiled_gate_on_cuda_equals_the_torch_rule():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run with -m gpu)")
    namespace: dict = {}
    exec(_CASES, namespace)  # (the same cases and check as the interpreter's)
    for args in namespace["cases"]("cuda"):
        namespace["check"](draft_gate(*args, backend="triton"), draft_gate_torch(*args))
