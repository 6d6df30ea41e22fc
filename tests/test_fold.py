"""Prefill chunks folded into the decode step's forward (``PrefillMixin._folds``): one forward a
step where a step costs what it launches.

What a user relies on: folding never changes a token — greedy rows equal decoding alone, a seed
gives the same tokens alone or in any batch, prompt log-probabilities are the model's — it saves
forwards, and the budget folds only where its measurements say a forward's fixed cost outweighs
widening the step and starting the new rows a step later (never on a compute-bound CPU).

The engine tests below run again with every prefill that meets a running row folded
(``_fold_pays`` forced; the capacity check still applies), and the run fails if none was.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import test_sampling_rules as rules_tests  # (modules, so their tests are not collected here too)
import test_scheduler as scheduler_tests
from test_scheduler import TEXTS, _assert_same, _greedy_alone

from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling.scheduler import Request, Scheduler


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


@pytest.fixture
def always_fold(monkeypatch):
    folded = []
    real = Scheduler._fold_in

    def counting(self, fold, *inputs):
        folded.append(len(fold.rows))
        return real(self, fold, *inputs)

    monkeypatch.setattr(Scheduler, "_fold_pays", lambda self, *a: True)
    monkeypatch.setattr(Scheduler, "_fold_in", counting)
    yield folded
    assert folded, "no prefill was folded: the test did not test folding"


@pytest.mark.parametrize("policy", ["ar", "fixed:3", "entropy:6"])
def test_staggered_arrivals_folded_equal_decoding_alone(tok, policy, always_fold):
    scheduler_tests.test_staggered_arrivals_equal_decoding_alone(tok, policy)


def test_chunked_prompts_folded_equal_decoding_alone(tok, always_fold):
    scheduler_tests.test_refill_chunked_prefill_and_static_cache(tok)


def test_a_seed_gives_the_same_tokens_with_its_prefill_folded(tok, always_fold):
    rules_tests.test_a_seed_gives_the_same_tokens_alone_or_in_any_batch(tok)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "modules"])
def test_prompt_logprobs_are_the_models_with_their_prefill_folded(tok, lean, always_fold):
    rules_tests.test_prompt_logprobs_are_the_models_whatever_the_chunks_and_batch(tok, lean)


def test_folding_saves_a_forward_per_prefill_that_meets_a_running_row(tok, monkeypatch):
    model = build_tiny_model("llama", tok, seed=3)
    prompts = [tok(t * 2)["input_ids"] for t in TEXTS]
    runs = {}
    for fold in (False, True):
        monkeypatch.setattr(Scheduler, "_fold_pays", lambda self, *a, fold=fold: fold)
        sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=2, eos_ids=[],
                          k_max=4)  # fmt: skip
        out: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            sched.submit(Request(f"r{i}", p, 6 + i))
        while sched.has_work():
            for ev in sched.step():
                out.setdefault(ev.request_id, []).extend(ev.tokens)
        forwards = sched.prefill_forwards + sched.decode_forwards
        runs[fold] = (out, forwards, sched.prefill_forwards, sched.folded_prefills)
    (_, n_plain, pre_plain, f_plain), (folded, n_folded, pre_folded, f_folded) = runs.values()
    assert f_plain == 0 and f_folded > 0
    assert pre_folded == pre_plain - f_folded  # each fold is a prefill forward not run
    assert n_folded < n_plain
    for i, p in enumerate(prompts):
        want = _greedy_alone(model, p, 6 + i, [])
        _assert_same(model, [p], [folded[f"r{i}"]], [want], f"folded r{i}")


def _engine_with(tok, fit, prefill, policy="fixed:3", **kw):
    """A 16-row engine whose budget reports the step fit ``fit`` and the prefill fit
    ``prefill`` (``(c0, c1)`` each, or None: not measured)."""
    model = build_tiny_model("llama", tok, seed=3)
    sched = Scheduler(model, tok.mask_token_id, policy=policy, max_batch=16, eos_ids=[],
                      k_max=4, **kw)  # fmt: skip
    sched.budget.cost_model = lambda: fit
    sched.budget.prefill_model = lambda: prefill
    return sched


def test_the_budget_folds_a_launch_bound_step_and_never_a_compute_bound_one(tok):
    # an accelerator's step (session 40's H200: ~4.5 ms a step whatever its width, a prefill
    # forward ~3.7 ms): two new rows of 16 fold
    gpu = _engine_with(tok, (4.5e-3, 0.0), (3.7e-3, 0.0))
    assert gpu._fold_pays(tokens=2 * 57, rows=2, hi=16, w_step=33, w=57)
    # a CPU's (c1 ~ 12 us a token; a prefill forward of 57 tokens ~1.2 ms): widening 8 rows by
    # 24 tokens and starting a row a step later cost more than the forward saves
    cpu = _engine_with(tok, (1.3e-3, 12e-6), (0.6e-3, 10e-6))
    assert not cpu._fold_pays(tokens=57, rows=1, hi=8, w_step=33, w=57)
    # before both are measured: no fold
    assert not _engine_with(tok, None, (3.7e-3, 0.0))._fold_pays(114, 2, 16, 33, 57)
    assert not _engine_with(tok, (4.5e-3, 0.0), None)._fold_pays(114, 2, 16, 33, 57)
    # many new rows of a small batch: their late start outweighs the saved forward
    assert not gpu._fold_pays(tokens=4 * 57, rows=4, hi=4, w_step=33, w=57)


def test_an_ar_engine_folds_by_its_own_measured_steps(tok):
    # AR drafts nothing, so it has no fitted step cost: its measured AR steps and the prefills'
    # per-token cost decide, as they do for a drafting engine
    gpu = _engine_with(tok, None, (2.7e-3, 0.0), policy="ar")
    assert not gpu._fold_pays(tokens=40, rows=1, hi=16, w_step=1, w=40)  # no AR step measured yet
    gpu.budget.record(16, 1, 3.0e-3)
    assert gpu._fold_pays(tokens=40, rows=1, hi=16, w_step=1, w=40)
    cpu = _engine_with(tok, None, (0.5e-3, 10e-6), policy="ar")
    cpu.budget.record(16, 1, 1.0e-3)
    assert not cpu._fold_pays(tokens=40, rows=1, hi=16, w_step=1, w=40)  # 16 rows widened x40


def test_only_an_adaptive_eager_engine_folds(tok, monkeypatch):
    monkeypatch.setattr(Scheduler, "_fold_pays", lambda self, *a: True)
    plan = SimpleNamespace(ids=SimpleNamespace(shape=(1, 8), numel=lambda: 8), rows=[1])
    eager = _engine_with(tok, (4.5e-3, 0.0), (3.7e-3, 0.0))
    assert eager._folds(plan)
    assert not _engine_with(tok, (4.5e-3, 0.0), (3.7e-3, 0.0), adaptive=False)._folds(plan)
    eager._watch = True  # (float16's overflow watch reads the prefill's own forward)
    assert not eager._folds(plan)
    eager._watch = False
    wide = SimpleNamespace(ids=SimpleNamespace(shape=(1, 10**6), numel=lambda: 10**6), rows=[1])
    assert not eager._folds(wide)  # past the slot cache's capacity: a forward of its own
    monkeypatch.setenv("FLUID_FOLD_PREFILL", "0")  # (to measure what folding changes)
    assert not eager._folds(plan)


def test_a_prefill_forwards_cost_is_fitted_over_the_prefills_measured_alone():
    from fluid_npu.sampling.drafting import DraftBudget

    budget = DraftBudget(4, fixed=False, adaptive=True)
    assert budget.prefill_model() is None  # nothing measured
    budget.record_prefill(50, 2.0e-3)
    assert budget.prefill_model() is None  # one token count: no slope yet
    budget.record_prefill(150, 3.0e-3)
    budget.record_prefill(150, 4.0e-3)  # (a shape's cost: the least of its recent timings)
    assert budget.prefill_model() == pytest.approx((1.5e-3, 1e-5))  # 1.5 ms + 10 us a token
    budget.record(4, 8, 9.0e-3)  # decode steps do not enter it
    assert budget.prefill_model() == pytest.approx((1.5e-3, 1e-5))
