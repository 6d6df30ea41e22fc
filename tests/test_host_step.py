"""The host step (``host_step.py``): a CPU engine's lone greedy row decodes on Python numbers.

It must be the tensor step in every respect a user or the drafting budget sees — the same tokens,
events, acceptance and drafting decisions, the same state for the tensor step to take over when a
second request joins — and run only where it can be: greedy, no logprobs, nothing adjusting the
logits, not float16.
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from test_sampling_lossless import chain_model

from fluid_npu.model.khead import KHead
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling.fused import choose_anchors
from fluid_npu.sampling.host_step import HostStepMixin, choose_anchors_host
from fluid_npu.sampling.rules import SamplingParams
from fluid_npu.sampling.scheduler import Request, Scheduler

TEXTS = ("hello world", "a", "the quick brown fox jumps", "xyz", "over the lazy dog", "ab")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


@pytest.fixture
def clock(monkeypatch):
    """A clock that moves 1/1024 s per reading (exact in binary: every interval between two
    readings is the same number, whenever it is read): the budget's timings, hence its adaptive
    choices, repeat exactly from run to run."""
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks) / 1024)


def _spy(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = HostStepMixin._decode_host

    def counted(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(HostStepMixin, "_decode_host", counted)
    return calls


def _run(model, tok, host: bool, policy: str, adaptive: bool, khead=None):
    """Staggered requests through two slots (steps of two rows and of one, in turns): every
    event, and what the engine and its budget counted."""
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    lengths = [14, 5, 20, 9, 16, 7]
    sched = Scheduler(
        model, tok.mask_token_id, policy=policy, khead=khead, max_batch=2, k_max=4,
        adaptive=adaptive, host_step=host, eos_ids=[tok.eos_token_id],
    )  # fmt: skip
    arrivals = {0: [0], 3: [1], 4: [2], 12: [3], 30: [4, 5]}
    events = []
    for step in range(400):
        for i in arrivals.get(step, []):
            sched.submit(Request(f"r{i}", prompts[i], lengths[i]))
        for ev in sched.step():
            events.append((ev.request_id, ev.tokens, ev.finished, ev.finish_reason, ev.forwards,
                           ev.accepted, ev.drafted, ev.drafts_accepted))  # fmt: skip
        if step > max(arrivals) and not sched.has_work():
            break
    b = sched.budget
    counted = (dict(sched.accept_hist), dict(sched.k_hist), sched.decode_forwards,
               sched.computed_tokens, b.verifies_by_len, b.accepted_by_count, b.block_rows,
               b.block_hits, b.two_block_rows, b.second_hits)  # fmt: skip
    return events, counted


CASES = [("chain", "fixed:3"), ("chain", "entropy:6"), ("random", "ar"), ("random", "fixed:4"),
         ("random", "khead"), ("chain", "khead")]  # fmt: skip


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize(("model_kind", "policy"), CASES)
def test_the_host_step_is_the_tensor_step(tok, monkeypatch, clock, model_kind, policy, adaptive):
    if model_kind == "chain":  # drafts accepted, blocks hit, EOS mid-way
        model = chain_model(tok, attn_scale=4.0)
    else:  # drafts rejected: rows fall back to AR and probe (adaptive)
        model = build_tiny_model("llama", tok, seed=3)
    torch.manual_seed(2)
    khead = KHead(model.config.hidden_size, 4).eval() if policy == "khead" else None
    calls = _spy(monkeypatch)
    tensor = _run(model, tok, False, policy, adaptive, khead)
    assert not calls
    host = _run(model, tok, True, policy, adaptive, khead)
    assert len(calls) >= 5  # the lone rows' steps ran on the host
    assert host[0] == tensor[0]
    assert host[1] == tensor[1]


def test_the_host_step_runs_only_for_plain_greedy_rows(tok, monkeypatch):
    model = build_tiny_model("llama", tok, seed=3)
    prompt = tok("hello world")["input_ids"]
    calls = _spy(monkeypatch)

    def steps(params: SamplingParams | None, dtype=torch.float32) -> int:
        calls.clear()
        sched = Scheduler(model.to(dtype), tok.mask_token_id, policy="fixed:3", max_batch=2,
                          eos_ids=[])  # fmt: skip
        sched.submit(Request("r", prompt, 6, sampling=params))
        while sched.has_work():
            sched.step()
        return len(calls)

    assert steps(None) > 0
    assert steps(SamplingParams(temperature=0.8, seed=1)) == 0
    assert steps(SamplingParams(logprobs=True)) == 0
    assert steps(SamplingParams(repetition_penalty=1.3)) == 0
    assert steps(SamplingParams(logit_bias={5: 2.0})) == 0
    assert steps(None, torch.float16) == 0  # (the float16 overflow watch is the tensor step's)
    model.float()


def test_host_anchor_choice_is_the_tensor_rule(tok):
    gen = torch.Generator().manual_seed(0)
    k, anchors = 8, 3
    for trial in range(300):
        logp = -torch.rand(1, k, generator=gen) * (4.0 if trial % 2 else 0.3)
        m = trial % (k + 1)
        for coverage in (0.5, 0.9, 1.0):
            want = choose_anchors(logp, torch.tensor([m]), anchors, coverage)[0].tolist()
            assert choose_anchors_host(logp[0].tolist(), m, anchors, coverage) == want
    # every draft certain: the full run, and nothing after it, even at a coverage of 1
    for coverage in (0.9, 1.0):
        want = choose_anchors(torch.zeros(1, k), torch.tensor([5]), anchors, coverage)
        assert choose_anchors_host([0.0] * k, 5, anchors, coverage) == want[0].tolist()
        assert want[0].tolist() == [5, -1, -1]


def _lone(model, tok, host: bool, prompt: str, max_new: int, policy: str, eos=None, seen=None):
    sched = Scheduler(model, tok.mask_token_id, policy=policy, max_batch=1, k_max=4,
                      host_step=host, eos_ids=[tok.eos_token_id])  # fmt: skip
    sched.submit(Request("r", tok(prompt)["input_ids"], max_new, eos_ids=eos))
    events = []
    while sched.has_work():
        events += [(e.tokens, e.finished, e.finish_reason, e.drafted, e.drafts_accepted)
                   for e in sched.step()]  # fmt: skip
    if seen is not None:
        seen.append(sched.budget)
    return events


def test_a_lone_row_stops_at_eos_inside_its_accepted_drafts(tok, clock):
    """The chain model's drafts are ``*`` runs: with ``*`` the request's EOS, the step that
    accepts it among its drafts ends at the first one, on the host as on the tensor step."""
    model = chain_model(tok, attn_scale=4.0)
    star = [tok.convert_tokens_to_ids("*")]
    host = _lone(model, tok, True, "xyz", 40, "fixed:4", star)
    assert host == _lone(model, tok, False, "xyz", 40, "fixed:4", star)
    tokens, finished, reason, drafted, accepted = host[-1]
    assert finished and reason == "stop" and tokens == star and accepted >= 1 and drafted > 1


def test_a_lone_row_falls_back_to_ar_and_probes_as_on_the_tensor_step(tok, clock):
    """A random model's drafts are rejected: the row decodes as AR, then probes (a step that
    drafts again) — the same steps on the host as on the tensor step."""
    model = build_tiny_model("llama", tok, seed=3)
    host = _lone(model, tok, True, "hello world", 150, "fixed:4")
    assert host == _lone(model, tok, False, "hello world", 150, "fixed:4")
    drafted = [d for _, _, _, d, _ in host]
    first_ar = drafted.index(0)
    assert any(d > 0 for d in drafted[first_ar + 5 :]), drafted  # a probe after AR steps


def test_a_lone_row_drafts_from_the_block_its_accept_length_hit(tok, clock):
    """With attention strong enough to make accept lengths ragged, the second candidate block
    catches some: the next drafts come from the block that was hit."""
    model = chain_model(tok, attn_scale=20.0)
    seen: list = []
    host = _lone(model, tok, True, "hello p", 60, "fixed:4", seen=seen)
    assert host == _lone(model, tok, False, "hello p", 60, "fixed:4")
    assert seen[0].second_hits >= 5


def test_the_host_steps_mask_is_step_mask(tok, monkeypatch):
    """The host step builds its forward's mask from the kept visibility of its layout: for every
    step of a run (layouts met again at other lengths included), the mask ``step_mask`` gives."""
    from fluid_npu.sampling.step import StepMixin
    from fluid_ops.step_mask import step_mask

    checked = []
    forward = StepMixin._forward

    def compared(self, lo, ids, pos, anchor, length, *a, mask_of=None, **k):
        if mask_of is not None:
            w = ids.shape[1]
            for extent in (int(length[0]) + w, int(length[0]) + w + 7):
                assert torch.equal(mask_of(extent), step_mask(length, pos, anchor, extent))
            checked.append(tuple(anchor[0].tolist()))
        return forward(self, lo, ids, pos, anchor, length, *a, mask_of=mask_of, **k)

    monkeypatch.setattr(StepMixin, "_forward", compared)
    for model in (chain_model(tok, attn_scale=20.0), build_tiny_model("llama", tok, seed=3)):
        # one request after another in one slot: a request's first step keeps the shape the
        # one before left (PAD where its own drafts and blocks are fewer)
        # (adaptive=False: no timing-driven shape choices, so the same layouts on any machine)
        sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=1, k_max=4,
                          eos_ids=[tok.eos_token_id], adaptive=False)  # fmt: skip
        for i, text in enumerate(("hello p", "xyz", "a", "hello world")):
            sched.submit(Request(str(i), tok(text)["input_ids"], 40))
        while sched.has_work():
            sched.step()
    assert len(checked) > 40 and len(set(checked)) > 5  # many steps, several layouts
    assert any(-2 in a for a in checked)  # PAD queries among them
