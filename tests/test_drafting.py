"""Drafting that pays for itself (``sampling/drafting.py``): the engine's measured costs and
acceptance decide block lengths, second blocks, the prefill's first drafts and the AR fallback —
and whatever they decide, every request's tokens stay greedy decoding's.
"""

from __future__ import annotations

import pytest
import torch
from test_scheduler import TEXTS, _assert_same, _greedy_alone

from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling.drafting import DEFAULT_PRICE, HISTORY, MARGIN, WINDOW, DraftBudget
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.scheduler import Request, Scheduler


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


def _step_widths(monkeypatch) -> list[int]:
    """The width of every decode step the engine runs from now on (its budget records each)."""
    widths = []
    original = DraftBudget.record

    def record(self, rows, width, seconds):
        widths.append(width)
        original(self, rows, width, seconds)

    monkeypatch.setattr(DraftBudget, "record", record)
    return widths


def test_drafts_that_never_pay_fall_back_to_ar(tok, monkeypatch):
    model = build_tiny_model("llama", tok, seed=3)  # random: its drafts are almost never right
    # a block costing half a step more must earn half a token per verify; these earn ~0
    monkeypatch.setattr(DraftBudget, "price", lambda self, rows, length=None: 0.5)
    widths = _step_widths(monkeypatch)
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=1, eos_ids=[], k_max=4)
    results = run_requests(sched, [Request("0", tok("hello")["input_ids"], 60)])
    assert len(results["0"][0]) == 60
    late = widths[10:]
    assert late.count(1) > 0.8 * len(late), widths  # mostly plain AR steps ...
    assert any(w > 1 for w in late)  # ... which still probe


def test_the_first_requests_drop_the_optimistic_prior_once_verifies_tell(tok, monkeypatch):
    """The first requests start on the prior "draft and see" (K accepted per verify); once the
    history says drafts earn nothing, they decode as AR at once rather than after the prior
    decays through many wasted verifies."""
    model = build_tiny_model("llama", tok, seed=3)  # random: its drafts are almost never right
    # probes every 32 steps
    monkeypatch.setattr(DraftBudget, "price", lambda self, rows, length=None: 0.5)
    widths = _step_widths(monkeypatch)
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=4, eos_ids=[], k_max=4)
    prompts = ["hello", "a b c", "x y", "one two three four"]
    run_requests(sched, [Request(str(i), tok(p)["input_ids"], 40) for i, p in enumerate(prompts)])
    assert sched.budget.prior_accept() < 0.5
    assert set(widths[4:16]) == {1}, widths  # drafting stopped within the first four steps


def test_requests_that_start_as_ar_add_no_blocks(tok, monkeypatch):
    """Where drafting does not pay, a request joining the batch decodes as AR from its first step:
    no step carries block columns that no row asked for."""
    model = build_tiny_model("llama", tok, seed=3)
    monkeypatch.setattr(DraftBudget, "drafting_pays", lambda self, rows: False)
    # no probes either
    monkeypatch.setattr(DraftBudget, "price", lambda self, rows, length=None: 1e6)
    widths = _step_widths(monkeypatch)
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=2, eos_ids=[], k_max=4)
    prompts = ["hello", "a b c", "x y", "one two three four"]
    reqs = [Request(str(i), tok(p)["input_ids"], 6 + 3 * i) for i, p in enumerate(prompts)]
    results = run_requests(sched, reqs)
    assert [len(results[str(i)][0]) for i in range(4)] == [6, 9, 12, 15]
    assert widths and set(widths) == {1}, widths


def test_block_length_and_price_follow_the_measured_costs():
    budget = DraftBudget(8, fixed=False, adaptive=True)
    assert budget.price(4) == pytest.approx(0.25)  # nothing measured: the default
    assert budget.choose_length(4) == 8
    for rows, width in ((1, 1), (4, 1), (4, 17), (2, 9)):  # seconds = 4 ms + 0.5 ms per token
        budget.record(rows, width, 0.004 + 0.0005 * rows * width)
    c0, c1 = budget.cost_model()
    assert c0 == pytest.approx(0.004) and c1 == pytest.approx(0.0005)
    ratio = (0.004 + 0.0005 * 4 * 17) / 0.006  # a 17-wide step against an AR one, at 4 rows
    assert budget.price(4) == pytest.approx((1 + MARGIN) * ratio - 1)
    # drafts accepted up to depth 2 only: at 4 rows, blocks of 2 give the most tokens per second
    for _ in range(20):
        budget.observe(8, 2)
    assert budget.expected_accept(8) == pytest.approx(2.0)
    assert budget.choose_length(4) == 2
    # ... while on a machine where width is free (overhead-bound) the full length wins
    budget.step_cost.clear()
    budget.record(1, 1, 0.004)
    budget.record(4, 17, 0.004)
    assert budget.choose_length(4) == 8
    # a second block: measured first, then kept while what it catches pays for its cost
    assert budget.choose_blocks(4, 8, 2, 8) == 2
    for hit in [1] * 4 + [0] * 12 + [-1] * 4:  # it caught 4 of 20 rows' accept lengths
        budget.observe_blocks(2, hit)
    budget.observe_blocks(1, 0)  # a row with one block says nothing about the second
    assert (budget.two_block_rows, budget.second_hits) == (20, 4)
    assert budget.choose_blocks(4, 8, 2, 8) == 2  # width is free here
    budget.record(4, 25, 0.02)  # width now costs: 8 more slots x 4 rows, far more than it saves
    assert budget.choose_blocks(4, 8, 2, 8) == 1
    assert budget.choose_blocks(4, 8, 1, 8) == 1  # one wanted: one
    # fixed:K keeps K however expensive width is
    fixed = DraftBudget(8, fixed=True, adaptive=True)
    fixed.step_cost = dict(budget.step_cost)
    for _ in range(20):
        fixed.observe(8, 2)
    fixed.record(4, 17, 1.0)
    assert fixed.choose_length(4) == 8


def test_the_budget_is_cautious_where_width_costs_and_deaf_to_a_busy_host():
    budget = DraftBudget(16, fixed=False, adaptive=True)
    # before any decode step, the prefill forwards tell what width costs: 30 us a token here
    budget.record_prefill(32 * 46, 0.001 + 30e-6 * 32 * 46)
    budget.record_prefill(16 * 46, 0.001 + 30e-6 * 16 * 46)
    assert budget.cost_model() == pytest.approx((0.001, 30e-6))
    # 32 rows: a second block of 16 would add ~48 % to the step; it is not tried ...
    assert budget.choose_blocks(32, 16, 2, 16) == 1
    # ... while at one row, where width is nearly free, it is measured
    assert budget.choose_blocks(1, 16, 2, 16) == 2
    # once two drafting shapes ran, they alone make the model
    budget.record(4, 17, 0.002 + 10e-6 * 4 * 17)
    budget.record(4, 33, 0.002 + 10e-6 * 4 * 33)
    assert budget.cost_model() == pytest.approx((0.002, 10e-6))
    # a timing taken while the host was busy does not move a shape's cost
    budget.record(4, 1, 0.001)
    budget.record(4, 1, 0.050)
    assert budget.seconds(4, 1) == pytest.approx(0.001)
    # AR at an unmeasured row count: the nearest measured one, plus the rows between
    assert budget.seconds(2, 1) == pytest.approx(0.001 + 10e-6 * (2 - 4))
    # probing costs about `price` AR steps, so a dear block is probed rarely
    cheap = budget.probe_interval(4)
    budget.record(4, 1, 0.0001)  # AR steps are now far cheaper than drafting ones
    assert budget.price(4) > 10 and budget.probe_interval(4) >= 10 * budget.price(4) > cheap


def test_drafting_timed_on_a_busy_host_does_not_price_it_out_once_the_host_is_quiet():
    """Where drafting does not run, its shapes are timed again only by the rare probes while every
    AR step re-times AR: drafting shapes timed while the host was busy (AR steps three times dearer
    than now) no longer count, so a server whose first steps ran beside other work drafts again
    once it runs alone; on a steady host nothing is dropped."""

    def cost(rows, width, busy=1.0):  # an overhead-bound step: 4 ms + 2 us a token
        return busy * (0.004 + 2e-6 * rows * width)

    steady, recovered = (DraftBudget(16, fixed=False, adaptive=True) for _ in range(2))
    for budget, busy in ((steady, 1.0), (recovered, 3.0)):
        for _ in range(40):
            budget.observe(16, 7)  # drafts earn 7 a verify
        budget.record(16, 1, cost(16, 1, busy))
        for width in (9, 17, 33):
            for rows in (12, 14, 16):
                budget.record(rows, width, cost(rows, width, busy))
    quiet = steady.price(16)
    assert quiet < 1 and recovered.price(16) == pytest.approx(quiet)  # (both timed alike)
    for _ in range(WINDOW):  # the host is quiet again: AR steps at their quiet cost
        recovered.record(16, 1, cost(16, 1))
        steady.record(16, 1, cost(16, 1))
    assert steady.price(16) == pytest.approx(quiet) and not steady.needs_prefill_timing()
    # the busy drafting timings (price ~3 against AR's quiet cost) are dropped: the prior price,
    # and the prefill forwards are timed again until drafting shapes run on the quiet host
    assert recovered.price(16) == pytest.approx(DEFAULT_PRICE) and recovered.needs_prefill_timing()
    recovered.record_prefill(16 * 17, cost(16, 17))
    recovered.record_prefill(16 * 33, cost(16, 33))
    assert recovered.price(16) == pytest.approx(quiet)
    # a host that got busier keeps what it measured before (the least of the timings)
    steady.record(16, 1, cost(16, 1, 3.0))
    assert steady.price(16) == pytest.approx(quiet)
    # AR measured later at fewer rows is cheaper for its rows, not for a quieter host: each shape
    # is compared with the AR shape it was timed beside (here a compute-bound 1 ms + 100 us a token)
    wide = DraftBudget(16, fixed=False, adaptive=True)
    wide.record(32, 1, 0.001 + 100e-6 * 32)
    wide.record(16, 33, 0.001 + 100e-6 * 16 * 33)
    wide.record(16, 17, 0.001 + 100e-6 * 16 * 17)
    wide.record(16, 1, 0.001 + 100e-6 * 16)  # 0.62 of the 32-row step
    assert not wide.needs_prefill_timing() and wide.cost_model() == pytest.approx((0.001, 100e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_verify_counts_against_the_block_its_drafts_came_from(tok, monkeypatch, dtype):
    """The prefill drafts as many slots as the budget's chosen length and the decode steps draft
    blocks of another length: outputs stay greedy decoding's (in bf16: divergences only near-ties,
    judged in fp32), and every verify is recorded with the length of the block its own drafts came
    from (a per-engine length misattributed them)."""
    model = build_tiny_model("llama", tok, seed=3).to(dtype)
    monkeypatch.setattr(DraftBudget, "prefill_length", lambda self, rows: 2)
    monkeypatch.setattr(DraftBudget, "choose_length", lambda self, rows: 3)
    seen = []
    original = DraftBudget.observe

    def observe(self, drafted_len, accepted):
        seen.append((drafted_len, accepted))
        original(self, drafted_len, accepted)

    monkeypatch.setattr(DraftBudget, "observe", observe)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=2, eos_ids=[], k_max=4)
    results = run_requests(sched, [Request(str(i), p, 8) for i, p in enumerate(prompts)])
    ours = [results[str(i)][0] for i in range(len(prompts))]
    _assert_same(model, prompts, ours, [_greedy_alone(model, p, 8, []) for p in prompts], "lens")
    assert {n for n, _ in seen} == {2, 3}, seen  # prefill drafts (2) and step blocks (3)
    assert all(a <= n for n, a in seen), seen


def test_a_budget_store_carries_costs_and_acceptance_between_engines(tok):
    """``budgets=``: engines on the same model share one budget per policy, so a second engine
    starts from the first one's measurements instead of the optimistic prior."""
    model = build_tiny_model("llama", tok, seed=3)  # random: its drafts are almost never right
    store: dict = {}
    kw = dict(max_batch=2, eos_ids=[], k_max=4, budgets=store)
    first = Scheduler(model, tok.mask_token_id, policy="fixed:4", **kw)
    run_requests(first, [Request(str(i), tok(t)["input_ids"], 20) for i, t in enumerate(TEXTS)])
    first.close()
    second = Scheduler(model, tok.mask_token_id, policy="fixed:4", **kw)
    assert second.budget is first.budget and second.budget.has_history()
    assert second.budget.prior_accept() < 1.0  # a new request is not credited with K accepts
    other = Scheduler(model, tok.mask_token_id, policy="entropy:6", **kw)
    assert other.budget is not first.budget and not other.budget.has_history()
    assert len(store) == 2
    # the acceptance counts follow the recent past: halved once HISTORY verifies are counted
    budget = DraftBudget(4, fixed=False, adaptive=True)
    for _ in range(HISTORY - 1):
        budget.observe(4, 0)
    budget.observe(4, 4)
    assert sum(budget.verifies_by_len) == HISTORY // 2
    assert budget.accepted_by_count[0] == (HISTORY - 1) // 2 and budget.accepted_by_count[4] == 0


def test_the_prefill_drafts_what_the_decode_steps_would():
    """A prefill's first drafts take the length a decode step at that batch would: short where
    width is dear (many rows on a compute-bound host), the full K where it is nearly free."""
    budget = DraftBudget(16, fixed=False, adaptive=True)
    for rows, width in ((1, 1), (32, 1), (1, 33), (32, 33), (32, 5)):
        budget.record(rows, width, 0.001 + 30e-6 * rows * width)
    for a in range(17):  # verifies accepting every count, all 16 most often (~9.5 on average)
        for _ in range(10 if a == 16 else 2):
            budget.observe(16, a)
    assert budget.prefill_length(1) == 16
    assert budget.prefill_length(32) < 16
    assert DraftBudget(16, fixed=True, adaptive=True).prefill_length(32) == 16


def test_drafts_pay_only_through_the_steps_that_find_them():
    """A step whose accept length hit none of its blocks leaves nothing to verify: the price of
    drafting grows as the measured hit rate falls, until drafting no longer pays."""
    budget = DraftBudget(8, fixed=True, adaptive=True)
    budget.record(4, 1, 0.002)
    budget.record(4, 17, 0.004)  # blocks of 8 double a 4-row step: they must earn 1 token
    budget.record(2, 17, 0.003)
    for _ in range(20):
        budget.observe(8, 2)
    price = (1 + MARGIN) * 2 - 1  # doubling the step, with the margin over AR
    assert budget.price(4) == pytest.approx(price) and budget.drafting_pays(4)
    for hit in [0] * 10 + [-1] * 30:  # a quarter of the drafting steps found their drafts
        budget.observe_blocks(1, hit)
    assert budget.hit_rate() == pytest.approx(0.25)
    assert budget.price(4) == pytest.approx(4 * price) and not budget.drafting_pays(4)


def test_a_block_that_barely_beats_ar_is_not_drafted():
    """Break-even choices go to AR: drafts that would make the batch only a few per cent faster
    than AR (less than ``MARGIN``) are not worth the timing noise they are judged on."""
    budget = DraftBudget(8, fixed=True, adaptive=True)
    budget.record(4, 1, 0.002)
    budget.record(4, 17, 0.004)  # a drafting step costs two AR steps ...
    budget.record(2, 17, 0.003)
    for _ in range(20):
        budget.observe(8, 1)  # ... and commits 1 + ~1.05 tokens: ~2 % faster than AR
    budget.observe(8, 2)
    assert 1.0 < budget.expected_accept(8) < 1.0 + MARGIN  # without the margin it would pay
    assert not budget.drafting_pays(4)
    for _ in range(60):
        budget.observe(8, 2)  # 1 + ~1.75 tokens for the price of 2 AR steps: it pays
    assert budget.drafting_pays(4)


def test_a_sampling_request_beside_greedy_ones_drafts_k_whatever_the_budget_says(tok, monkeypatch):
    """The budget would have the prefill draft 2 slots and the steps blocks of 2, but a seeded
    sampling request's tokens depend on its drafts: in a batch with greedy rows it still drafts K,
    so it gives the same tokens as alone (and the greedy rows stay greedy decoding)."""
    from test_sampling_lossless import chain_model

    from fluid_npu.sampling.rules import SamplingParams

    model = chain_model(tok, attn_scale=4.0)
    params = SamplingParams(temperature=0.8, seed=1234)
    prompts = [tok(t)["input_ids"] for t in ("hello p", "abc", "xx")]

    def run(reqs: list[Request], batch: int) -> dict:
        sched = Scheduler(model, tok.mask_token_id, policy="entropy", max_batch=batch,
                          eos_ids=[], k_max=8, max_len=64)  # fmt: skip
        return run_requests(sched, reqs)

    alone = run([Request("s", prompts[0], 12, sampling=params)], 1)["s"][0]
    monkeypatch.setattr(DraftBudget, "prefill_length", lambda self, rows: 2)
    monkeypatch.setattr(DraftBudget, "choose_length", lambda self, rows: 2)
    mixed = run(
        [Request("g1", prompts[1], 12), Request("s", prompts[0], 12, sampling=params),
         Request("g2", prompts[2], 12)], 3,
    )  # fmt: skip
    assert mixed["s"][0] == alone
    greedy = [_greedy_alone(model, prompts[i], 12, []) for i in (1, 2)]
    _assert_same(model, [prompts[1], prompts[2]], [mixed["g1"][0], mixed["g2"][0]], greedy, "mix")


def test_the_probe_clock_and_the_chosen_length_outlive_an_engine_and_a_probe_step():
    """Probes are due every ``probe_interval`` decode steps counted over every engine sharing the
    budget (a short call still probes in turn); a full-length probe step does not become the
    length that prices are taken at."""
    budget = DraftBudget(16, fixed=False, adaptive=True)
    for rows, width in ((4, 1), (4, 33), (4, 5), (4, 9)):
        budget.record(rows, width, 0.001 + 30e-6 * rows * width)
    for _ in range(40):
        budget.observe(16, 1)  # drafts are right once, then wrong: short blocks pay best
    interval = budget.probe_interval(4)
    due = []
    for _ in range(3 * interval):  # steps of several short calls on one budget
        due.append(budget.probe_due(4))
        budget.record(4, 1, 0.001 + 30e-6 * 4)
    assert due.count(True) == 3 and not due[0]
    chosen = [budget.choose_length(4) for _ in range(64)]
    assert chosen.count(16) == 2 and set(chosen) - {16} == {budget.length}
    assert budget.length < 16


def test_the_compute_bound_of_a_bench_row_comes_from_the_fitted_step_cost():
    from types import SimpleNamespace

    from fluid_npu.sampling.bench_report import compute_bound
    from fluid_npu.sampling.policies import parse_policy

    budget = DraftBudget(8, fixed=False, adaptive=True)
    budget.record(4, 17, 0.002 + 20e-6 * 4 * 17)
    budget.record(4, 9, 0.002 + 20e-6 * 4 * 9)
    fluid = SimpleNamespace(draft_budgets={(parse_policy("fixed:8"), True): budget})
    row = {"policy": "fixed:8", "computed_tokens": 5000}
    out = compute_bound(fluid, row, baseline_s=0.5)
    assert out["compute_floor_s"] == pytest.approx(0.1)  # 5000 positions x 20 us
    assert out["speedup_ceiling"] == pytest.approx(5.0)
    assert out["step_cost_fit"]["c1_us_per_token"] == pytest.approx(20.0)
    assert compute_bound(fluid, {"policy": "ar", "computed_tokens": 10}, 0.5) == {}


def test_one_row_worth_a_block_does_not_widen_a_batch_that_pays_more(tok, monkeypatch):
    """A block widens the step for every row: with three rows decoding as AR beside one whose
    drafts just earn their price, the batch's steps stay plain AR (one row's gain does not pay
    four rows' wider step); alone, the same row drafts."""
    model = build_tiny_model("llama", tok, seed=3)
    monkeypatch.setattr(DraftBudget, "price", lambda self, rows, length=None: 1.0)
    monkeypatch.setattr(DraftBudget, "probe_due", lambda self, rows: False)
    monkeypatch.setattr(DraftBudget, "drafting_pays", lambda self, rows: False)
    monkeypatch.setattr(DraftBudget, "prior_accept", lambda self: 1.5)  # the earner's average
    widths = _step_widths(monkeypatch)

    def run(prompts: list[str]) -> None:
        sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=4, eos_ids=[],
                          k_max=4, adaptive=True)  # fmt: skip
        reqs = [Request(str(i), tok(p)["input_ids"], 12) for i, p in enumerate(prompts)]
        for r in reqs:
            sched.submit(r)
        sched.step()  # every prompt prefilled, no drafts (drafting_pays is False)
        sched.ema[:] = 0.0
        sched.ema[0] = 1.5  # row 0 earns 1.5 per verify: above the price, alone
        sched.cand[0, 0] = 0  # and asks for a block from its next step
        sched._next_shape = (0, 1)
        widths.clear()
        while sched.has_work():
            sched.step()

    run(["hello"])
    assert max(widths) > 1  # alone, its block pays: it drafts
    run(["hello", "a b c", "x y", "one two three four"])
    # the block it asked for (width 5) and the verify of its drafts (5); then no more blocks
    assert widths[:2] == [5, 5] and set(widths[2:]) == {1}, widths


def test_prefills_are_timed_only_while_the_cost_fit_needs_them(tok, monkeypatch):
    """Timing a prefill waits for the device in the middle of a step; the engine times one only
    until two drafting step shapes have run (from then on the cost fit reads the steps alone), so
    a loaded server's every-step prefill no longer synchronises. The tokens stay greedy's."""
    from fluid_npu import device as devices

    model = build_tiny_model("llama", tok, seed=3)
    monkeypatch.setattr(DraftBudget, "drafting_pays", lambda self, rows: True)  # always drafts
    timed, syncs = [], []
    original = DraftBudget.record_prefill

    def record_prefill(self, tokens, seconds):
        timed.append(self.needs_prefill_timing())
        original(self, tokens, seconds)

    monkeypatch.setattr(DraftBudget, "record_prefill", record_prefill)
    monkeypatch.setattr(devices, "synchronize", lambda device=None: syncs.append(device))
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=2, eos_ids=[], k_max=4)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    results = run_requests(sched, [Request(str(i), p, 8) for i, p in enumerate(prompts)])
    assert not sched.budget.needs_prefill_timing()  # two drafting shapes ran
    assert timed and all(timed) and len(syncs) == len(timed)  # each timed prefill waited once
    assert sched.prefill_forwards > len(timed)  # the later prefills were not timed
    ours = [results[str(i)][0] for i in range(len(prompts))]
    _assert_same(model, prompts, ours, [_greedy_alone(model, p, 8, []) for p in prompts], "timing")
