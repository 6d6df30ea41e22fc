"""The engine's step mask (``fluid_ops.step_mask``): the ``triton`` back end equals the torch rule.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` in a child process (the flag never leaks into
other test modules): random metadata (padding, anchors anywhere, key ranges of several kernel
blocks) and every mask a real engine run builds — decode steps with drafts and candidate blocks,
prefills with their first drafts, one-token steps — give the same booleans. On a lent CUDA machine
(``-m gpu``) the compiled kernel is checked the same way, and on CUDA the engine picks it.
"""

import textwrap

import pytest
import torch
from interpreted import run_interpreted

from fluid_ops.step_mask import step_mask, step_mask_torch

_CASES = textwrap.dedent(
    """
    import torch
    from fluid_ops.meta import MAIN, PAD

    def cases(device):
        gen = torch.Generator().manual_seed(0)
        out = []
        for n in range(40):
            b = int(torch.randint(1, 5, (), generator=gen))
            w = int(torch.randint(1, 24, (), generator=gen))
            length = torch.randint(0, 300, (b,), generator=gen)
            extent = int(length.max()) + w + int(torch.randint(0, 60, (), generator=gen))
            pos = length[:, None] + torch.randint(-3, w + 3, (b, w), generator=gen)
            lag = torch.randint(1, 5, (b, w), generator=gen)
            anchor = torch.where(torch.rand(b, w, generator=gen) < 0.4, MAIN, pos - lag)
            anchor = torch.where(torch.rand(b, w, generator=gen) < 0.2, PAD, anchor)
            out.append(tuple(t.to(device) for t in (length, pos, anchor)) + (extent,))
        # edges: nothing committed, rows all padding, one-token rows of every anchor kind (an
        # invalid one too), key ranges of several 128-column blocks
        t = torch.tensor
        out += [(t([0, 0]), t([[0, 1, 2], [0, 1, 2]]), t([[MAIN, MAIN, 0], [PAD, PAD, PAD]]), 3),
                (t([5, 0, 2, 7]), t([[5], [0], [2], [7]]), t([[MAIN], [PAD], [1], [-3]]), 9),
                (t([0]), t([[0]]), t([[MAIN]]), 1),
                (t([260, 3]), t([[260, 261], [3, 4]]), t([[MAIN, 260], [PAD, PAD]]), 300)]
        out = [tuple(x.to(device) if torch.is_tensor(x) else x for x in c) for c in out]
        return out
    """
)

_TRITON_CHILD = _CASES + textwrap.dedent(
    """
    from fluid_ops import dispatch, step_mask as sm
    from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
    from fluid_npu.sampling import step as engine_step
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request, Scheduler

    assert dispatch.select("step_mask", torch.device("cpu"), "triton") == "triton"
    for length, pos, anchor, extent in cases("cpu"):
        got = sm.step_mask(length, pos, anchor, extent, backend="triton")
        assert torch.equal(got, sm.step_mask_torch(length, pos, anchor, extent)), (pos, anchor)

    # every mask of a real run: decode steps (drafts, candidate blocks, one-token rows), prefills
    seen = []
    def capture(length, pos, anchor, extent):
        seen.append((length.clone(), pos.clone(), anchor.clone(), extent))
        return sm.step_mask_torch(length, pos, anchor, extent)
    engine_step.step_mask = capture
    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, seed=3)
    texts = ["hello world", "a", "the quick brown fox jumps", "xyz", "over the lazy dog"]
    for policy in ("fixed:3", "entropy:6", "ar"):
        sched = Scheduler(model, tok.mask_token_id, policy=policy, max_batch=3, eos_ids=[],
                          k_max=4, host_step=False)
        reqs = [Request(str(i), tok(t * 2)["input_ids"], 9) for i, t in enumerate(texts)]
        run_requests(sched, reqs)
        sched.close()
    widths = {pos.shape[1] for _, pos, _, _ in seen}
    assert len(seen) > 40 and 1 in widths and max(widths) > 8, (len(seen), widths)
    for length, pos, anchor, extent in seen:
        got = sm.step_mask(length, pos, anchor, extent, backend="triton")
        assert torch.equal(got, sm.step_mask_torch(length, pos, anchor, extent))
    print("ok", len(seen))
    """
)


def test_triton_step_mask_equals_the_torch_rule_under_the_interpreter():
    assert run_interpreted(_TRITON_CHILD).startswith("ok")


def test_the_engine_s_mask_is_the_dispatched_one():
    """The engine's forwards (``fluid_npu.sampling.step``) build their mask with this op."""
    from fluid_npu.sampling import step as engine_step

    assert engine_step.step_mask is step_mask
    length, pos, anchor = torch.tensor([3]), torch.tensor([[3, 4, 5]]), torch.tensor([[-1, -1, 4]])
    assert torch.equal(step_mask(length, pos, anchor, 8), step_mask_torch(length, pos, anchor, 8))


@pytest.mark.gpu
def test_compiled_step_mask_on_cuda_equals_the_torch_rule():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run with -m gpu)")
    namespace: dict = {}
    exec(_CASES, namespace)  # (the same cases as the interpreter's)
    for length, pos, anchor, extent in namespace["cases"]("cuda"):
        got = step_mask(length, pos, anchor, extent, backend="triton")  # (asked by name: a
        # FLUID_STEP_MASK_BACKEND=torch in the environment must not make this torch against torch)
        assert torch.equal(got, step_mask_torch(length, pos, anchor, extent))
