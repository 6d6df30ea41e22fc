"""The decode engine (``Scheduler``): continuous batching that never changes a request's tokens.

Every request's output must equal greedy decoding of it alone (transformers' ``generate``, fp32),
whatever joins or leaves the batch around it: staggered arrivals, different lengths, EOS mid-way,
slots refilled, long prompts prefilled in chunks, aborts. The cache is static (the same storage
from the first step to the last) and a decode step reads the device once.
"""

from __future__ import annotations

import pytest
import torch
from test_sampling_lossless import chain_model

from fluid_npu.errors import FluidError
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling.drafting import HISTORY, DraftBudget
from fluid_npu.sampling.lossless import compare, hf_greedy
from fluid_npu.sampling.scheduler import Request, Scheduler, run_requests

TEXTS = ("hello world", "a", "the quick brown fox jumps", "xyz", "over the lazy dog", "ab")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


def _greedy_alone(model, prompt: list[int], max_new: int, eos: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    return hf_greedy(model, ids, torch.ones_like(ids), max_new, eos, 0)[0]


def _assert_same(model, prompts, ours, theirs, what):
    real = [d for d in compare(model, prompts, ours, theirs) if not d.tie]
    assert not real, f"{what}: {real}"


@pytest.mark.parametrize("policy", ["ar", "fixed:3", "entropy:6"])
def test_staggered_arrivals_equal_decoding_alone(tok, policy):
    model = build_tiny_model("llama", tok, seed=3)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    lengths = [9, 4, 12, 7, 10, 5]
    eos = [_greedy_alone(model, prompts[0], 12, [])[4]]  # row 0 stops mid-way on this token
    sched = Scheduler(model, tok.mask_token_id, policy=policy, max_batch=3, eos_ids=eos, k_max=4)
    out: dict[str, list[int]] = {}
    reasons = {}
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5]}  # step -> requests arriving before it
    step = 0
    while step < 200 and (sched.has_work() or any(k >= step for k in arrivals)):
        for i in arrivals.get(step, []):
            sched.submit(Request(f"r{i}", prompts[i], lengths[i]))
        for ev in sched.step():
            out.setdefault(ev.request_id, []).extend(ev.tokens)
            if ev.finished:
                reasons[ev.request_id] = ev.finish_reason
        step += 1
    ours = [out[f"r{i}"] for i in range(len(prompts))]
    alone = [_greedy_alone(model, p, n, eos) for p, n in zip(prompts, lengths)]
    _assert_same(model, prompts, ours, alone, policy)
    assert reasons["r0"] == "stop" and ours[0][-1] == eos[0] and len(ours[0]) < lengths[0]
    assert all(reasons[f"r{i}"] == "length" for i in (1, 2)), reasons
    assert sched.num_running == 0 and sched.num_waiting == 0


@pytest.mark.parametrize(
    ("arch", "extra"),
    [("llama", {"attention_bias": True}), ("qwen2", {}), ("mistral", {})],  # llama+bias: openPangu
)
def test_architectures_in_one_batch(tok, arch, extra):
    model = build_tiny_model(arch, tok, seed=5, **extra)
    prompts = [tok(t)["input_ids"] for t in TEXTS[:4]]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=3, eos_ids=[], k_max=4)
    results = run_requests(sched, [Request(str(i), p, 9) for i, p in enumerate(prompts)])
    ours = [results[str(i)][0] for i in range(len(prompts))]
    _assert_same(model, prompts, ours, [_greedy_alone(model, p, 9, []) for p in prompts], arch)


def test_refill_chunked_prefill_and_static_cache(tok):
    model = build_tiny_model("qwen3", tok, seed=4)
    prompts = [tok(t * 3)["input_ids"] for t in TEXTS]  # up to 75 tokens: several chunks of 16
    reqs = [Request(str(i), p, 6 + i) for i, p in enumerate(prompts)]
    sched = Scheduler(
        model,
        tok.mask_token_id,
        policy="fixed:2",
        max_batch=2,
        prefill_chunk=16,
        eos_ids=[],
        k_max=4,
    )
    storage = [k.data_ptr() for k in sched.kv.keys]
    results = run_requests(sched, reqs)
    assert [k.data_ptr() for k in sched.kv.keys] == storage  # nothing reallocated
    ours = [results[str(i)][0] for i in range(len(prompts))]
    alone = [_greedy_alone(model, p, 6 + i, []) for i, p in enumerate(prompts)]
    _assert_same(model, prompts, ours, alone, "refill/chunks")
    assert sched.prefill_forwards > len(prompts) // 2  # long prompts took several chunks


def test_predictable_model_batched_with_other_lengths(tok):
    model = chain_model(tok, attn_scale=4.0)
    prompts = [tok(p)["input_ids"] for p in ("abc", "hello p", "xx", "ijk")]
    reqs = [Request(str(i), p, n) for i, (p, n) in enumerate(zip(prompts, (40, 25, 33, 40)))]
    eos = [tok.eos_token_id]
    sched = Scheduler(
        model,
        tok.mask_token_id,
        policy="fixed:4",
        max_batch=4,
        eos_ids=eos,
        k_max=8,
        adaptive=False,  # block choices that do not follow timing: the TPF bound is exact
    )
    results = run_requests(sched, reqs)
    ours = [results[str(i)][0] for i in range(4)]
    alone = [_greedy_alone(model, p, r.max_new_tokens, eos) for p, r in zip(prompts, reqs)]
    _assert_same(model, prompts, ours, alone, "chain")
    forwards = sum(results[str(i)][1].forwards for i in range(4))
    assert sum(len(t) for t in ours) / forwards > 1.5  # drafts accepted while batched
    assert max(sched.accept_hist) >= 3


def test_abort_frees_the_slot_and_spares_the_others(tok):
    model = build_tiny_model("llama", tok, seed=3)
    prompts = [tok(t)["input_ids"] for t in TEXTS[:3]]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:2", max_batch=2, eos_ids=[], k_max=4)
    for i, p in enumerate(prompts):
        sched.submit(Request(str(i), p, 10))
    out: dict[str, list[int]] = {"0": [], "1": [], "2": []}
    events = sched.step()
    assert {e.request_id for e in events} == {"0", "1"}  # two slots: request 2 waits
    assert sched.abort("1") and not sched.abort("nope")
    for ev in events:
        out[ev.request_id] += ev.tokens
    finished = {}
    while sched.has_work():
        for ev in sched.step():
            out[ev.request_id] += ev.tokens
            if ev.finished:
                finished[ev.request_id] = ev.finish_reason
    assert finished == {"0": "length", "1": "abort", "2": "length"}
    for i in (0, 2):  # request 2 took the aborted request's slot
        _assert_same(
            model,
            [prompts[i]],
            [out[str(i)]],
            [_greedy_alone(model, prompts[i], 10, [])],
            f"abort/{i}",
        )


def test_bad_requests_are_clear_errors(tok):
    model = build_tiny_model("llama", tok, seed=3)
    sched = Scheduler(model, tok.mask_token_id, policy="ar", max_batch=1, max_len=32)
    sched.submit(Request("a", [1, 2], 4))
    cases = {
        "already queued": Request("a", [1, 2], 4),
        "empty": Request("b", [], 4),
        "max_len 32": Request("c", [1] * 30, 4),
        "vocabulary": Request("d", [10**6], 4),
        "at least 1": Request("e", [1], 0),
    }
    for words, req in cases.items():
        with pytest.raises(FluidError, match=words):
            sched.submit(req)
    limit = model.config.max_position_embeddings  # a cache longer than the model can attend
    with pytest.raises(FluidError, match=f"over the model's context \\({limit} positions"):
        Scheduler(model, tok.mask_token_id, policy="ar", max_len=limit + 1)


def test_decode_step_reads_the_device_once(tok, monkeypatch):
    model = chain_model(tok, attn_scale=4.0)
    sched = Scheduler(model, tok.mask_token_id, policy="entropy", max_batch=2, eos_ids=[], k_max=8)
    for i, p in enumerate(("abc", "xx")):
        sched.submit(Request(str(i), tok(p)["input_ids"], 30))
    sched.step()  # admission + prefill (host work is allowed there)
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _orig=original, **k):
            reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    steps = 0
    while sched.has_work():
        sched.step()
        steps += 1
    monkeypatch.undo()
    assert steps > 3
    assert reads.count("tolist") == steps and len(reads) == steps, reads


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
    # probes every 16 steps
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
    assert budget.price(4) == pytest.approx((0.004 + 0.0005 * 4 * 17) / 0.006 - 1)
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


def test_each_verify_counts_against_the_block_its_drafts_came_from(tok, monkeypatch):
    """The prefill drafts as many slots as the budget's chosen length and the decode steps draft
    blocks of another length: outputs stay greedy decoding's, and every verify is recorded with the
    length of the block its own drafts came from (a per-engine length misattributed them)."""
    model = build_tiny_model("llama", tok, seed=3)
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


def test_computed_tokens_count_every_position_of_every_forward(tok):
    """``computed_tokens``: rows x width of each forward. Plain AR on one request of P prompt
    tokens and N new ones: the prefill encodes P - 1 positions, then N one-token steps."""
    model = build_tiny_model("llama", tok, seed=3)
    prompt = tok("the quick brown fox")["input_ids"]
    sched = Scheduler(model, tok.mask_token_id, policy="ar", max_batch=1, eos_ids=[])
    run_requests(sched, [Request("0", prompt, 7)])
    assert sched.computed_tokens == len(prompt) - 1 + 7
    drafting = Scheduler(
        model, tok.mask_token_id, policy="fixed:4", max_batch=1, eos_ids=[], adaptive=False
    )
    run_requests(drafting, [Request("0", prompt, 7)])
    # the prefill adds K slots; every step verifies its pending drafts and drafts a new block
    assert drafting.computed_tokens > len(prompt) - 1 + 4 + drafting.decode_forwards


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
    assert budget.price(4) == pytest.approx(1.0) and budget.drafting_pays(4)
    for hit in [0] * 10 + [-1] * 30:  # a quarter of the drafting steps found their drafts
        budget.observe_blocks(1, hit)
    assert budget.hit_rate() == pytest.approx(0.25)
    assert budget.price(4) == pytest.approx(4.0) and not budget.drafting_pays(4)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(tok):
    """``compile=True``: the decode step's forward runs under torch.compile (inductor on CPU)."""
    from torch._dynamo.utils import counters

    model = build_tiny_model("llama", tok, seed=3)
    p = tok("hello world")["input_ids"]
    outs = []
    for compile in (False, True):
        sched = Scheduler(
            model,
            tok.mask_token_id,
            policy="ar",
            max_batch=1,
            max_len=48,
            eos_ids=[],
            compile=compile,
        )
        outs.append(run_requests(sched, [Request("0", p, 20)])["0"][0])
        sched.close()
    assert outs[0] == outs[1] == _greedy_alone(model, p, 20, [])
    assert counters["stats"]["unique_graphs"] >= 1  # a graph really was captured


def test_a_lone_long_request_moves_down_and_the_step_shrinks(tok):
    model = build_tiny_model("llama", tok, seed=3)
    prompts = [tok(t)["input_ids"] for t in TEXTS[:4]]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:2", max_batch=4, eos_ids=[], k_max=4)
    rows = []
    original = sched.kv.set_plan

    def spy(plan):
        rows.append(plan.hi - plan.lo)
        original(plan)

    sched.kv.set_plan = spy
    lengths = [3, 3, 3, 24]
    results = run_requests(
        sched, [Request(str(i), p, n) for i, (p, n) in enumerate(zip(prompts, lengths))]
    )
    ours = [results[str(i)][0] for i in range(4)]
    alone = [_greedy_alone(model, p, n, []) for p, n in zip(prompts, lengths)]
    _assert_same(model, prompts, ours, alone, "compaction")
    assert rows[-1] == 1 and max(rows) == 4  # the last steps computed the lone request only
