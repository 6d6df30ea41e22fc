"""The elastic sampler's candidate accept lengths (``fluid_ops.anchors.choose_anchors``): the
``triton`` back end takes the torch rule's lengths, ties go to the shorter length everywhere.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` in a child process (the flag never leaks into
other test modules): random confidences (certain drafts, impossible ones, rows with fewer real
drafts than columns or none, more lengths asked for than exist, coverage past 1) and every call a
real engine run makes — decode steps and prefills' first drafts — give the same lengths. On a lent
CUDA machine (``-m gpu``) the compiled kernel is checked the same way, up to float32 near-ties.
"""

import itertools
import math
import textwrap

import pytest
import torch
from interpreted import run_interpreted

from fluid_npu.sampling.host_step import choose_anchors_host
from fluid_ops.anchors import choose_anchors, choose_anchors_torch

_CASES = textwrap.dedent(
    """
    import torch

    def cases(device):
        gen = torch.Generator().manual_seed(0)
        out = []
        for n in range(200):
            b = int(torch.randint(1, 6, (), generator=gen))
            big_m = int(torch.randint(0, 20, (), generator=gen))
            count = int(torch.randint(1, 5, (), generator=gen))
            coverage = float(torch.rand((), generator=gen)) * 1.2
            logp = -torch.rand(b, big_m, generator=gen) * 3
            logp = torch.where(torch.rand(b, big_m, generator=gen) < 0.2, 0.0, logp)  # certain
            logp = torch.where(torch.rand(b, big_m, generator=gen) < 0.1, -float("inf"), logp)
            m = torch.randint(0, big_m + 2, (b,), generator=gen)
            out.append((logp.to(device), m.to(device), count, coverage))
        # exact ties: every draft impossible (lengths 1 ... m all score 0), every draft certain
        t = torch.tensor
        out += [(torch.full((2, 6), -float("inf")), t([6, 3]), 4, 1.0),
                (torch.zeros(2, 5), t([5, 2]), 3, 1.0),
                (torch.full((1, 4), math.log(0.5)), t([4]), 4, 2.0),
                (torch.zeros(3, 0), t([0, 0, 0]), 2, 0.9)]
        return [(lp.to(device), m.to(device), c, cov) for lp, m, c, cov in out]
    """
)

_TRITON_CHILD = (
    "import math\n"
    + _CASES
    + textwrap.dedent(
        """
    from fluid_ops import anchors, dispatch
    from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request, Scheduler

    assert dispatch.select("choose_anchors", torch.device("cpu"), "triton") == "triton"
    for logp, m, count, coverage in cases("cpu"):
        got = anchors.choose_anchors(logp, m, count, coverage, backend="triton")
        want = anchors.choose_anchors_torch(logp, m, count, coverage)
        assert torch.equal(got, want), (logp, m, count, coverage, got, want)

    # every call of a real run: decode steps' next blocks and prefills' first drafts
    seen = []
    rule = anchors.choose_anchors
    def capture(logp, m, count, coverage, backend=None):
        seen.append((logp.clone(), m.clone(), count, coverage))
        return rule(logp, m, count, coverage, backend)
    anchors.choose_anchors = capture
    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, seed=3)
    texts = ["hello world", "a", "the quick brown fox jumps", "xyz", "over the lazy dog"]
    for policy in ("fixed:3", "entropy:6"):
        sched = Scheduler(model, tok.mask_token_id, policy=policy, max_batch=3, eos_ids=[],
                          k_max=4, anchors=3, host_step=False, adaptive=False)
        reqs = [Request(str(i), tok(t * 2)["input_ids"], 9) for i, t in enumerate(texts)]
        run_requests(sched, reqs)
        sched.close()
    assert len(seen) > 10 and any(int(m.max()) > 1 for _, m, _, _ in seen), len(seen)
    for logp, m, count, coverage in seen:
        got = rule(logp, m, count, coverage, backend="triton")
        assert torch.equal(got, anchors.choose_anchors_torch(logp, m, count, coverage))
    print("ok", len(seen))
    """
    )
)


def test_triton_choose_anchors_equals_the_torch_rule_under_the_interpreter():
    assert run_interpreted(_TRITON_CHILD).startswith("ok")


def test_ties_go_to_the_shorter_length_as_the_host_twin_takes_them():
    """Scores that tie exactly (impossible drafts: every length past 0 scores 0; certain ones:
    every length before m scores 0) are taken shortest first by the torch rule, as the CPU's
    one-row host step (``choose_anchors_host``) takes them: both engine paths draft the same
    blocks."""
    for logp, m, count, coverage in [
        ([-math.inf] * 6, 6, 4, 1.5),  # scores 1, 0, 0, 0, ...: lengths 0, then 1, 2, 3
        ([0.0] * 5, 2, 3, 1.5),  # 0, 0, 1: length 2, then 0, 1
        ([math.log(0.5)] * 3 + [0.0] * 3, 6, 6, 2.0),  # .5, .25, .125, 0, 0, 0, .125
    ]:
        want = choose_anchors_host(logp, m, count, coverage)
        got = choose_anchors_torch(torch.tensor([logp]), torch.tensor([m]), count, coverage)
        assert got[0].tolist() == want, (logp, m, got, want)
    # 40 exact ties: an unstable sort takes them in another order ([0, 31, 22, ...] here)
    got = choose_anchors_torch(torch.full((1, 40), -math.inf), torch.tensor([40]), 4, 1.5)
    assert got[0].tolist() == [0, 1, 2, 3] == choose_anchors_host([-math.inf] * 40, 40, 4, 1.5)


def test_the_engine_s_lengths_are_the_dispatched_ones(monkeypatch):
    """The engine's decode step and prefill (through ``fused.choose_anchors``) use this op."""
    from fluid_npu.sampling import fused
    from fluid_ops import anchors

    calls = []
    monkeypatch.setattr(anchors, "choose_anchors", lambda *a: calls.append(a) or "taken")
    assert fused.choose_anchors(torch.zeros(1, 2), torch.tensor([2]), 2) == "taken"
    assert calls and calls[0][2:] == (2, fused.DEFAULT_COVERAGE)


def _near_tie(logp: torch.Tensor, m: torch.Tensor, coverage: float) -> bool:
    """Whether a row's float64 scores hold two within float32 rounding (but not both exactly 0:
    impossible or certain drafts tie exactly on every back end, and the shorter goes first), or a
    running mass that close to ``coverage``: where two back ends' roundings may take other
    lengths."""
    p = [math.exp(x) if j < int(m) else 0.0 for j, x in enumerate(logp.tolist())]
    scores, reach = [], 1.0
    for j in range(min(int(m), len(p)) + 1):
        scores.append(reach * ((1.0 - p[j]) if j < len(p) else 1.0))
        reach *= p[j] if j < len(p) else 0.0
    ordered = sorted(scores, reverse=True)
    close = lambda a, b: abs(a - b) <= 1e-5 * max(1.0, abs(a))  # noqa: E731
    mass = [sum(ordered[:i]) for i in range(1, len(ordered) + 1)]
    return any(close(a, b) and (a, b) != (0, 0) for a, b in itertools.pairwise(ordered)) or any(
        close(x, coverage) for x in mass
    )


@pytest.mark.gpu
def test_compiled_choose_anchors_on_cuda_takes_the_torch_rule_s_lengths():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run with -m gpu)")
    namespace: dict = {"math": math}
    exec(_CASES, namespace)  # (the same cases as the interpreter's)
    for logp, m, count, coverage in namespace["cases"]("cuda"):
        got = choose_anchors(logp, m, count, coverage, backend="triton")  # (asked by name)
        want = choose_anchors_torch(logp, m, count, coverage)
        for row in (got != want).any(dim=1).nonzero()[:, 0].tolist():
            assert _near_tie(logp[row].cpu(), m[row].cpu(), coverage), (logp[row], got[row])
