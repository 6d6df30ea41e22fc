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
from torch.utils._python_dispatch import TorchDispatchMode

from fluid_npu.errors import FluidError
from fluid_npu.model.khead import KHead
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling import generate
from fluid_npu.sampling.lossless import compare, hf_greedy
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.scheduler import Request, Scheduler

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


def test_a_forward_past_the_slot_cache_is_refused_before_it_writes(tok):
    """The eager cache write is one index_copy_ into the flattened cache, where an index past a
    slot's capacity would land in another row rather than raise: a forward whose host-side bound
    on its write indices passes the capacity (an engine that sized its cache wrong) is refused
    before its plan is set, and nothing is written."""
    model = build_tiny_model("llama", tok, seed=4)
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:2", max_batch=2, eos_ids=[])
    before = [k.clone() for k in sched.kv.keys]
    sched.kv.capacity = 8  # (as if sized for 8 entries: the tensors themselves are larger)
    with pytest.raises(RuntimeError, match="past the slot cache's 8"):
        run_requests(sched, [Request("a", tok("the quick brown fox jumps")["input_ids"], 4)])
    assert all(torch.equal(a, b) for a, b in zip(before, sched.kv.keys))


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


class _RecordingKHead(KHead):
    """A K-head that keeps the anchor hidden states it is asked about."""

    def __init__(self, hidden_size: int, k_max: int) -> None:
        super().__init__(hidden_size, k_max)
        self.seen: list[torch.Tensor] = []

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        self.seen.append(hidden.clone())
        return super().predict(hidden)


def test_khead_reads_each_prompts_own_last_token_when_prompts_of_other_lengths_share_a_prefill(
    tok,
):
    model = build_tiny_model("llama", tok, seed=3)
    torch.manual_seed(1)
    head = _RecordingKHead(model.config.hidden_size, 4).eval()
    prompts = [tok(t)["input_ids"] for t in ("the quick brown fox jumps", "ab")]
    assert len(prompts[0]) > len(prompts[1]) >= 2

    def first_anchors(batch: list[list[int]]) -> torch.Tensor:
        head.seen.clear()
        sched = Scheduler(
            model, tok.mask_token_id, policy="khead", khead=head, max_batch=2, adaptive=False
        )
        for n, p in enumerate(batch):
            sched.submit(Request(str(n), p, 4))
        sched.step()  # the prefill (it drafts the first tokens) and one decode step
        return head.seen[0]  # the prefill's call: one anchor per prompt

    together = first_anchors(prompts)
    alone = torch.cat([first_anchors([p]) for p in prompts])
    # the shorter prompt's chunk is padded to the longer one's: its anchor is its own last token,
    # not a padding position
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_a_sliding_window_bounds_the_engines_context(tok):
    """``max_len`` is what a request may fill (the server offers it as the context and fills a
    chat's default ``max_tokens`` up to it): with a sliding window it leaves room for the drafts
    inside the window, so a request that fills it is accepted."""
    model = build_tiny_model("mistral", tok, seed=3, sliding_window=64, max_position_embeddings=512)
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", k_max=4, max_batch=1)
    assert sched.max_len == 64 - 4
    assert sched.max_len_reason == (  # (the server's banner and /health say why)
        "the sliding attention window of 64 positions less the policy's 4 draft slots"
    )
    prompt = tok("hello world")["input_ids"]
    sched.submit(Request("full", prompt, sched.max_len - len(prompt)))  # no error: it fits
    with pytest.raises(FluidError, match="at most 60"):
        Scheduler(model, tok.mask_token_id, policy="fixed:4", k_max=4, max_len=64)


def test_one_token_prompts_cost_no_prefill_forward(tok):
    """A prompt of one token has nothing to encode and no anchor for first drafts: it goes
    straight to decoding (a forward of padding only was run for such prompts while drafting)."""
    model = build_tiny_model("llama", tok, seed=3)
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", k_max=3, max_batch=2,
                      adaptive=False, eos_ids=[])  # fmt: skip
    prompts = [[5], [9]]
    res = run_requests(sched, [Request(str(i), p, 6) for i, p in enumerate(prompts)])
    assert sched.prefill_forwards == 0
    ours = [res[str(i)].tokens for i in range(2)]
    _assert_same(model, prompts, ours, [_greedy_alone(model, p, 6, []) for p in prompts], "1-tok")


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random norm weights: sharper, more varied logits than a fresh tiny model's."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def test_a_dynamic_rope_keeps_generates_frequencies_while_drafts_run_ahead(tok):
    """Dynamic NTK rope grows its frequencies when a forward's largest position passes the
    context; generate never gets there for a request that fits, but the engine's draft slots
    (a block past the committed tokens) would, and regrow every row's rope mid-request."""
    rope = {"rope_type": "dynamic", "factor": 64.0, "rope_theta": 10000.0}
    prompt = tok("the quick brown fox")["input_ids"]
    n = 40 - len(prompt)  # the request fills the context
    for seed in range(12):  # (2 of these 12 seeds committed another token before)
        model = _perturbed(
            build_tiny_model(
                "llama", tok, seed=seed, max_position_embeddings=40, rope_parameters=rope
            )
        )
        sched = Scheduler(model, tok.mask_token_id, policy="fixed:8", k_max=8, max_batch=1,
                          adaptive=False, eos_ids=[])  # fmt: skip
        ours = run_requests(sched, [Request("0", prompt, n)])["0"].tokens
        assert model.model.rotary_emb.max_seq_len_cached == 40  # not grown, not left changed
        _assert_same(model, [prompt], [ours], [_greedy_alone(model, prompt, n, [])], f"s{seed}")


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_learned_positions_decode_a_request_that_fills_the_context(tok, arch):
    """GPT-2's and OPT's positions index a table as long as the context: the draft slots a block
    past the committed tokens once indexed past its end (IndexError; the server's engine died)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    size = {
        "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64},
        "opt": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "ffn_dim": 128,
            "word_embed_proj_dim": 64,
            "max_position_embeddings": 64,
        },
    }
    config = AutoConfig.for_model(arch, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  **size[arch])  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts = [tok("the quick brown fox")["input_ids"], tok("ab")["input_ids"]]
    for policy in ("fixed:8", "entropy"):
        sched = Scheduler(model, tok.mask_token_id, policy=policy, k_max=8, max_batch=2,
                          adaptive=False, eos_ids=[])  # fmt: skip
        assert sched.max_len == 64
        requests = [Request(str(i), p, 64 - len(p)) for i, p in enumerate(prompts)]
        results = run_requests(sched, requests)
        sched.close()
        ours = [results[str(i)].tokens for i in range(len(prompts))]
        assert [len(t) for t in ours] == [64 - len(p) for p in prompts]
        alone = [_greedy_alone(model, p, 64 - len(p), []) for p in prompts]
        _assert_same(model, prompts, ours, alone, f"{arch}/{policy}")
        reference = [  # (the published loop as well)
            generate(model, tok, [p], policy=policy, k_max=8, max_new_tokens=64 - len(p),
                     eos_token_id=[], loop="reference").new_tokens[0]
            for p in prompts
        ]  # fmt: skip
        _assert_same(model, prompts, reference, alone, f"{arch}/{policy}/reference")


@pytest.mark.parametrize("feature", ["longrope", "softcap"])
def test_features_the_engine_cannot_reproduce_are_refused(tok, feature):
    if feature == "longrope":
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": 32, "short_factor": [1.0] * 8,
                "long_factor": [4.0 + i for i in range(8)]}  # fmt: skip
        model = build_tiny_model("llama", tok, max_position_embeddings=128, rope_parameters=rope)
    else:  # Gemma 2 (a small one: no tiny builder for it here)
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(
            "gemma2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, attn_logit_softcapping=1.0,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(FluidError, match=feature.replace("softcap", "soft-capping")):
        Scheduler(model, tok.mask_token_id, policy="fixed:3", k_max=3)


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


def test_events_carry_the_engines_clock(tok):
    """Each event says when its step ended and when its request was queued and given a slot (what
    a server's queue / prefill / decode times come from): a request waiting for the only slot is
    admitted after the first one ended, and every time follows the one before it."""
    model = build_tiny_model("llama", tok, seed=3)
    prompts = [tok(t)["input_ids"] for t in TEXTS[:2]]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:2", max_batch=1, eos_ids=[], k_max=4)
    for i, p in enumerate(prompts):
        sched.submit(Request(str(i), p, 6))
    seen: dict[str, list] = {"0": [], "1": []}
    while sched.has_work():
        for ev in sched.step():
            seen[ev.request_id].append(ev)
    for events in seen.values():
        queued, admitted = events[0].queued_at, events[0].admitted_at
        assert all((e.queued_at, e.admitted_at) == (queued, admitted) for e in events)
        steps = [e.at for e in events]
        assert queued <= admitted <= steps[0] and steps == sorted(steps)
    assert seen["0"][0].queued_at <= seen["1"][0].queued_at
    assert seen["1"][0].admitted_at >= seen["0"][-1].at  # (it waited for the slot)
    assert seen["1"][0].admitted_at - seen["1"][0].queued_at > 0


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_waiting_requests_start_by_priority_then_arrival(tok, policy):
    """One slot, one request running: the waiting ones start lowest ``priority`` first, ties in
    arrival order (first come, first served under "fcfs"); the running one is not preempted; each
    output equals decoding it alone."""
    model = build_tiny_model("llama", tok, seed=3)
    prompts = [tok(t)["input_ids"] for t in TEXTS[:5]]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:2", max_batch=1, eos_ids=[],
                      k_max=4, scheduling_policy=policy)  # fmt: skip
    given = [0, 5, -1, 0, -1]
    sched.submit(Request("r0", prompts[0], 6))
    started, out = ["r0"], {"r0": [t for ev in sched.step() for t in ev.tokens]}  # r0 runs
    for i in range(1, 5):
        sched.submit(Request(f"r{i}", prompts[i], 6, priority=given[i] if policy != "fcfs" else 0))
    while sched.has_work():
        for ev in sched.step():
            if ev.request_id not in out:
                started.append(ev.request_id)
            out.setdefault(ev.request_id, []).extend(ev.tokens)
    want = ["r0", "r1", "r2", "r3", "r4"] if policy == "fcfs" else ["r0", "r2", "r4", "r3", "r1"]
    assert started == want
    ours = [out[f"r{i}"] for i in range(5)]
    _assert_same(model, prompts, ours, [_greedy_alone(model, p, 6, []) for p in prompts], policy)
    fcfs = Scheduler(model, tok.mask_token_id, max_batch=1)
    with pytest.raises(FluidError, match=r"priority 3 needs Scheduler\(scheduling_policy="):
        fcfs.submit(Request("x", prompts[0], 4, priority=3))
    ranked = Scheduler(model, tok.mask_token_id, max_batch=1, scheduling_policy="priority")
    for bad in (None, 1.5, True):  # refused before the id is taken: the same id may come again
        with pytest.raises(FluidError, match="priority must be an integer"):
            ranked.submit(Request("y", prompts[0], 4, priority=bad))
    ranked.submit(Request("y", prompts[0], 4, priority=2))
    from fluid_npu.sampling import llm

    vllms = llm.SamplingParams(temperature=0.7)  # (the LLM API's, given to the engine by mistake)
    with pytest.raises(FluidError, match=r"sampling is a .*llm_params.SamplingParams; the engine"):
        ranked.submit(Request("z", prompts[0], 4, sampling=vllms))
    with pytest.raises(FluidError, match="scheduling_policy 'lifo' is not one of fcfs, priority"):
        Scheduler(model, tok.mask_token_id, scheduling_policy="lifo")


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_a_request_waiting_for_a_shared_prefix_keeps_its_place(tok, policy):
    """Two requests share a prefix the first is still encoding (in 8-token chunks): the second
    waits to copy it, and a free slot waits with it — the request behind it in the queue (later,
    or of a higher priority value) does not take the slot and run first."""
    model = build_tiny_model("llama", tok, seed=3)
    shared = tok("a shared system prompt: answer in one word. ")["input_ids"]
    first, second = shared + tok("xyz")["input_ids"], shared + tok("hello world")["input_ids"]
    other = tok("the quick brown fox jumps")["input_ids"]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=2, eos_ids=[],
                      k_max=4, prefill_chunk=8, scheduling_policy=policy)  # fmt: skip
    ranked = policy == "priority"
    sched.submit(Request("first", first, 4, priority=-1 if ranked else 0))
    sched.submit(Request("second", second, 4))
    sched.submit(Request("other", other, 30, priority=1 if ranked else 0))
    started, out, cached = {}, {}, {}
    step = 0
    while sched.has_work():
        step += 1
        for ev in sched.step():
            started.setdefault(ev.request_id, step)
            cached.setdefault(ev.request_id, ev.cached)
            out.setdefault(ev.request_id, []).extend(ev.tokens)
    assert started["first"] <= started["second"] < started["other"], started
    assert cached["second"] >= 16  # (it copied the shared prefix)
    prompts = {"first": first, "second": second, "other": other}
    for rid, prompt in prompts.items():
        want = _greedy_alone(model, prompt, len(out[rid]), [])
        _assert_same(model, [prompt], [out[rid]], [want], rid)


def test_an_aborted_id_can_be_submitted_again_at_once(tok):
    """As in vLLM, ``abort`` frees the id: a client retrying under its own id is not refused,
    whether the first request was still waiting or already decoding; the retry decodes as alone."""
    model = build_tiny_model("llama", tok, seed=3)
    prompts = [tok(t)["input_ids"] for t in TEXTS[:2]]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:2", max_batch=1, eos_ids=[], k_max=4)
    sched.submit(Request("run", prompts[0], 8))
    sched.submit(Request("wait", prompts[1], 8))
    sched.step()  # "run" decodes, "wait" waits for the one slot
    assert sched.abort("run") and sched.abort("wait") and not sched.abort("wait")
    sched.submit(Request("run", prompts[1], 8))  # refused before: "already queued or running"
    sched.submit(Request("wait", prompts[0], 8))
    events: list = []
    while sched.has_work():
        events += sched.step()
    first = [(e.request_id, e.finish_reason) for e in events if e.finished]
    assert first[:2] == [("run", "abort"), ("wait", "abort")]
    out = {"run": [], "wait": []}
    for e in events:
        if e.finish_reason != "abort":
            out[e.request_id] += e.tokens
    for rid, p in (("run", prompts[1]), ("wait", prompts[0])):
        _assert_same(model, [p], [out[rid]], [_greedy_alone(model, p, 8, [])], f"resubmit/{rid}")


def test_run_requests_checks_every_request_before_queueing_any(tok):
    model = build_tiny_model("llama", tok, seed=3)
    sched = Scheduler(model, tok.mask_token_id, policy="ar", max_batch=2, max_len=32)
    p = tok(TEXTS[0])["input_ids"]
    with pytest.raises(FluidError, match="'a' is given twice"):
        run_requests(sched, [Request("a", p, 4), Request("b", p, 4), Request("a", p, 4)])
    with pytest.raises(FluidError, match="max_len 32"):
        run_requests(sched, [Request("a", p, 4), Request("b", [1] * 30, 4)])
    assert not sched.has_work()  # the good requests before the bad one were not left queued
    assert set(run_requests(sched, [Request("a", p, 4)])) == {"a"}


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
    # a stop string no text can hold: refused at submit (matching it as UTF-8 mid-step failed
    # the whole engine: every request in the batch, and on the server every later one)
    reader = Scheduler(model, tok.mask_token_id, policy="ar", max_batch=1, tokenizer=tok)
    with pytest.raises(FluidError, match="unpaired UTF-16 surrogate"):
        reader.submit(Request("s", [1, 2], 4, stop=["ok", "\ud800"]))
    assert not reader.has_work()
    limit = model.config.max_position_embeddings  # a cache longer than the model can attend
    with pytest.raises(FluidError, match=f"over the model's context \\({limit} positions"):
        Scheduler(model, tok.mask_token_id, policy="ar", max_len=limit + 1)


def test_decode_step_reads_the_device_once(tok, monkeypatch):
    model = chain_model(tok, attn_scale=4.0)
    # the tensor step, which accelerators run (a CPU engine's lone greedy row steps on host
    # numbers, where a read costs nothing: test_host_step.py)
    sched = Scheduler(model, tok.mask_token_id, policy="entropy", max_batch=2, eos_ids=[], k_max=8,
                      host_step=False)  # fmt: skip
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


class _Kernels(TorchDispatchMode):
    """Counts the ops that launch work on a device (views and metadata-only ops left out)."""

    QUIET = frozenset(
        ("aten::detach", "aten::detach_", "aten::lift_fresh", "aten::alias", "aten::to")
    )

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not (func.is_view or func._schema.name in self.QUIET)
        return func(*args, **(kwargs or {}))


def test_admission_and_first_drafts_cost_the_same_launches_for_one_or_many(tok):
    """Requests a step admits, and the prompts a prefill ends, get their settings and first drafts
    in one set of writes: on an eager accelerator every op is a launch, so 4 requests arriving
    together cost the launches of 1 (the prefill forward itself aside)."""
    model = chain_model(tok, attn_scale=4.0)

    def kernels(n: int) -> tuple[int, int]:
        sched = Scheduler(
            model, tok.mask_token_id, policy="fixed:4", max_batch=4, eos_ids=[], adaptive=False
        )
        for i in range(n):
            eos = [3 + i] if i % 2 else None  # a request's own EOS ids beside the default
            sched.submit(Request(str(i), tok(TEXTS[i])["input_ids"] + [5, 6], 8, eos_ids=eos))
        forward = sched._forward
        with _Kernels() as admit:
            sched._admit()
        with _Kernels() as prefill:
            sched._forward = lambda *a, **k: _untracked(forward, *a, **k)
            sched._prefill()
        assert all(s.running for s in sched.slots[:n])
        return admit.n, prefill.n

    assert kernels(4) == kernels(1)


def _untracked(fn, *args, **kwargs):
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return fn(*args, **kwargs)


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


@pytest.mark.slow
@pytest.mark.parametrize("lean", [True, False])
def test_compiled_decode_step_gives_the_same_tokens(tok, lean):
    """``compile=True``: the decode step's forward runs under torch.compile (inductor on CPU) —
    the lean forward where it applies, else the model's modules."""
    from torch._dynamo.utils import counters

    model = build_tiny_model("llama", tok, seed=3)
    p = tok("hello world")["input_ids"]
    outs = []
    graphs = counters["stats"]["unique_graphs"]
    for compile in (False, True):
        sched = Scheduler(
            model,
            tok.mask_token_id,
            policy="ar",
            max_batch=1,
            max_len=48,
            eos_ids=[],
            compile=compile,
            lean=lean,
        )
        assert (sched._lean is not None) is lean
        outs.append(run_requests(sched, [Request("0", p, 20)])["0"][0])
        sched.close()
    assert outs[0] == outs[1] == _greedy_alone(model, p, 20, [])
    assert counters["stats"]["unique_graphs"] > graphs  # a graph really was captured


def test_compile_options_reach_torch_compile(tok, monkeypatch):
    """``compile_options`` go to ``torch.compile`` as given (``dynamic`` included: static shapes
    only by default); the compiled forward is the lean one where it applies."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    model = build_tiny_model("llama", tok, seed=3)
    for options in (None, {"dynamic": None, "fullgraph": True}):
        sched = Scheduler(
            model, tok.mask_token_id, policy="ar", compile=True, compile_options=options
        )
        assert sched._compiled is sched._lean
    assert seen == [
        {"mode": None, "dynamic": False},
        {"dynamic": None, "fullgraph": True, "mode": None},
    ]


def test_engines_share_a_budget_only_with_the_same_compile_settings(tok, monkeypatch):
    """A draft budget holds measured step costs, so engines compiled with other settings (another
    backend or mode costs other time) or not compiled keep their own; the same settings share."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = build_tiny_model("llama", tok, seed=3)
    store: dict = {}

    def engine(**kw):
        return Scheduler(model, tok.mask_token_id, policy="entropy", budgets=store, **kw)

    inductor = engine(compile=True)
    assert engine(compile=True).budget is inductor.budget
    eager_backend = engine(compile=True, compile_options={"backend": "eager"})
    assert eager_backend.budget is not inductor.budget
    assert engine().budget not in (inductor.budget, eager_backend.budget)
    assert len(store) == 3


def test_a_compiled_step_over_some_slots_writes_the_cache_in_place(tok):
    """A compiled decode step over fewer rows than the engine has slots writes its keys and values
    into the whole cache tensor at absolute slot indices: a write through a view of some rows is
    functionalised into a ``slice_scatter`` of the whole cache — a copy of every slot's cache each
    step (3-20x slower on a CPU; far worse for a long context on an accelerator)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = build_tiny_model("llama", tok, seed=3)
    sched = Scheduler(
        model,
        tok.mask_token_id,
        policy="ar",
        max_batch=4,
        eos_ids=[],
        compile=True,
        compile_options={"backend": aot_autograd(fw_compiler=capture)},
    )
    prompts = [tok(t)["input_ids"] for t in TEXTS[:2]]
    out = run_requests(sched, [Request(str(i), p, 6) for i, p in enumerate(prompts)])
    assert [out[str(i)].tokens for i in range(2)] == [
        _greedy_alone(model, p, 6, []) for p in prompts
    ]
    ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert graphs and "aten.index_put.default" in ops  # the step's cache writes were traced
    assert not any("scatter" in op for op in ops), ops


def test_compiled_engine_times_only_the_steps_that_did_not_compile(tok):
    """With real dynamo (the eager backend: no inductor, quick): the first decode step compiles
    and is left out of the budget; later steps on known shapes are timed into it."""
    model = build_tiny_model("llama", tok, seed=3)
    p = tok("hello world")["input_ids"]
    sched = Scheduler(
        model,
        tok.mask_token_id,
        policy="fixed:2",
        max_batch=1,
        eos_ids=[],
        k_max=4,
        compile=True,
        compile_options={"backend": "eager"},
    )
    out = run_requests(sched, [Request("0", p, 24)])["0"][0]
    assert out == _greedy_alone(model, p, 24, [])
    timed = sched.budget._decode_steps
    assert 0 < timed < sched.decode_forwards and sched.budget.step_cost


@pytest.mark.parametrize("compiling", [True, False])
def test_a_step_that_compiles_is_not_timed_into_the_budget(tok, monkeypatch, compiling):
    """A compiled engine's decode step during which torch.compile compiled a frame took seconds of
    compilation, not of decoding: timed into the draft budget it would price every block out (the
    engine would decode as AR). Such steps are not recorded; steps that compiled nothing are."""
    from fluid_npu.sampling import step

    frames = iter(range(10**6))
    monkeypatch.setattr(step, "_compiles", (lambda: next(frames)) if compiling else (lambda: 7))
    model = build_tiny_model("llama", tok, seed=3)
    p = tok("hello world")["input_ids"]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:2", max_batch=1, eos_ids=[], k_max=4)
    sched._compiled = sched._lean  # stands in for the compiled forward (the same arithmetic)
    out = run_requests(sched, [Request("0", p, 12)])["0"][0]
    assert out == _greedy_alone(model, p, 12, [])
    assert sched.decode_forwards > 0
    assert (sched.budget.step_cost == {}) is compiling


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


def test_accepted_drafts_count_only_what_reaches_the_output(tok):
    # a limit (or EOS, or a stop string) can end a step's tokens inside its accepted drafts: the
    # event's accepted count (the server's accepted-draft histogram) is what went into the output
    model = chain_model(tok, attn_scale=4.0)
    prompt = tok("xx")["input_ids"]  # then '*' for ever: every draft is accepted
    sched = Scheduler(
        model, tok.mask_token_id, policy="fixed:8", max_batch=1, k_max=8, adaptive=False
    )
    sched.submit(Request("r", prompt, 3, eos_ids=[]))
    events = []
    while sched.has_work():
        events += sched.step()
    assert sum(len(e.tokens) for e in events) == 3
    assert max(sched.accept_hist) >= 3  # the verify accepted more drafts than the limit left
    assert all(e.accepted <= len(e.tokens) for e in events), events
    assert sum(e.accepted for e in events) <= 3


@pytest.mark.parametrize("arch", ["stablelm", "nemotron"])
def test_decoders_that_do_not_hand_keywords_to_the_attention_decode_as_generate(arch, tok):
    # StableLM's and Nemotron's decoder layers call their attention without the forward's
    # keywords: the engine's plan must still reach it (it once fell back to plain SDPA with a
    # stand-in mask, and a causal prefill then attended both ways)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms off their initial 1 / 0, so a wrong prefill shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    prompts = [tok(t)["input_ids"] for t in ("the quick brown fox jumps over the lazy dog", "ab")]
    alone = [_greedy_alone(model, p, 10, []) for p in prompts]
    for policy in ("ar", "fixed:4"):
        sched = Scheduler(
            model, tok.mask_token_id, policy=policy, max_batch=2, eos_ids=[], k_max=4,
            adaptive=False, prefill_chunk=8,
        )  # fmt: skip
        results = run_requests(sched, [Request(str(i), p, 10) for i, p in enumerate(prompts)])
        sched.close()
        ours = [results[str(i)].tokens for i in range(len(prompts))]
        _assert_same(model, prompts, ours, alone, f"{arch}/{policy}")


def test_window_and_context_errors_say_what_fits(tok):
    # the window's refusal names the draft slots and what fits; an engine a window leaves no room
    # in is refused when it is made; a model whose layers none slide is not refused; a request
    # over the context is named by its id, with the library's keyword
    model = build_tiny_model("mistral", tok, seed=3, sliding_window=16, max_position_embeddings=64)
    with pytest.raises(FluidError, match=r"4 draft slots.*at most 12.*15 asked"):
        generate(model, tok, [[5] * 5], policy="fixed:4", k_max=4, max_new_tokens=10)
    with pytest.raises(FluidError, match="leaves no room beside the policy's 16 draft slots"):
        Scheduler(model, tok.mask_token_id, policy="entropy")
    full = build_tiny_model(
        "qwen2", tok, seed=3, sliding_window=16, use_sliding_window=True, max_window_layers=2
    )  # every layer full attention (layer_types): no window to keep within
    out = generate(full, tok, [[5] * 30], policy="ar", max_new_tokens=6, eos_token_id=[])
    assert len(out.new_tokens[0]) == 6
    small = build_tiny_model("llama", tok, seed=3, max_position_embeddings=32)
    sched = Scheduler(small, tok.mask_token_id, policy="ar", max_batch=2)
    assert (sched.max_len, sched.max_len_reason) == (32, "the model's context")
    long = build_tiny_model("llama", tok, seed=3, max_position_embeddings=8192)
    capped = Scheduler(long, tok.mask_token_id, policy="ar", max_batch=1)  # (a 4096 default)
    assert (capped.max_len, capped.max_len_reason) == (
        4096, "the default cap; the model's own context is 8192: max_len raises it"
    )  # fmt: skip
    sched.submit(Request("alpha", [5] * 4, 4))
    with pytest.raises(FluidError, match=r"request 'gamma' has 30 tokens.*lower max_new_tokens"):
        sched.submit(Request("gamma", [5] * 30, 8))


def test_a_kv_cache_larger_than_free_memory_is_one_clear_error(tok, monkeypatch):
    # sized before anything is allocated: on a CPU an over-large cache would be the OOM killer's
    from fluid_npu import device as devices

    free = devices.free_memory("cpu")
    assert free is None or free > 0  # the host's available memory, where /proc/meminfo says
    model = build_tiny_model("llama", tok, seed=3)
    sched = Scheduler(model, tok.mask_token_id, policy="ar", max_batch=2, max_len=64)
    need = sched.kv.nbytes
    monkeypatch.setattr(devices, "free_memory", lambda device: need - 1)
    with pytest.raises(
        FluidError, match=r"KV cache needs 0\.00 GiB.*2 rows \(request slots.*--max-batch"
    ):
        Scheduler(model, tok.mask_token_id, policy="ar", max_batch=2, max_len=64)
    monkeypatch.setattr(devices, "free_memory", lambda device: need)
    Scheduler(model, tok.mask_token_id, policy="ar", max_batch=2, max_len=64)  # exactly fits


def test_closing_one_engine_leaves_another_on_the_same_model_decoding(tok):
    # engines on a model's own modules switch it to the slot attention; the first to close must
    # not take it from one still decoding (its causal prefill then attended both ways)
    model = _perturbed(build_tiny_model("llama", tok, seed=4))
    first = Scheduler(model, tok.mask_token_id, policy="ar", lean=False, eos_ids=[])
    second = Scheduler(model, tok.mask_token_id, policy="ar", lean=False, eos_ids=[], max_batch=3)
    run_requests(first, [Request("x", [5, 6, 7, 8], 4)])
    first.close()
    first.close()  # twice: harmless
    prompts = [tok(t)["input_ids"] for t in TEXTS[:3]]
    res = run_requests(second, [Request(str(i), p, 8) for i, p in enumerate(prompts)])
    second.close()
    assert model.config._attn_implementation == "sdpa"  # the model's own, once both are closed
    ours = [res[str(i)].tokens for i in range(3)]
    _assert_same(model, prompts, ours, [_greedy_alone(model, p, 8, []) for p in prompts], "2nd")


def test_compiled_engines_of_other_sizes_reuse_the_compiled_step(tok):
    # every engine in a process shares dynamo's recompile limit (8); generate makes an engine per
    # call, sized by its prompts: the cache's compiled shape is bucketed so calls keep running
    # the compiled step (calls after the eighth ran none of it when every size was its own)
    import torch._dynamo

    from fluid_npu.sampling import generate

    counts = {"compiles": 0, "runs": 0}

    def counting(gm, example_inputs):
        counts["compiles"] += 1

        def run(*args):
            counts["runs"] += 1
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    try:
        model = build_tiny_model("llama", tok, seed=3)
        engine = {"compile": True, "compile_options": {"backend": counting}}
        for n in range(12):  # other prompt lengths and batch sizes each call
            prompts = [[5 + i] * (3 + n) for i in range(1 + n % 3)]
            before = counts["runs"]
            out = generate(model, tok, prompts, policy="ar", max_new_tokens=5, eos_token_id=[],
                           engine_kwargs=engine)  # fmt: skip
            assert counts["runs"] - before == out.stats.decode_forwards, f"call {n}"
        assert counts["compiles"] <= 6
    finally:
        torch._dynamo.reset()


def test_device_graphs_see_a_cache_that_keeps_its_address(tok):
    # reduce-overhead (CUDA / NPU graphs) records a graph only when the inputs it writes are
    # static: the cache tensors are marked as transformers' StaticCache marks its own
    model = build_tiny_model("llama", tok, seed=3)
    graphs = Scheduler(model, tok.mask_token_id, policy="ar", compile=True,
                       compile_options={"mode": "reduce-overhead"})  # fmt: skip
    cache = [*graphs.kv.keys, *graphs.kv.values]
    assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in cache)
    plain = Scheduler(model, tok.mask_token_id, policy="ar", compile=True)  # inductor on a CPU
    assert not any(hasattr(t, "_dynamo_static_input_type") for t in plain.kv.keys)


def test_an_engine_that_fails_to_start_gives_the_model_its_attention_back(tok):
    model = build_tiny_model("llama", tok, seed=3)
    with pytest.raises(RuntimeError, match="mode"):
        Scheduler(model, tok.mask_token_id, policy="ar", lean=False, compile=True,
                  compile_options={"mode": "no-such-mode"})  # fmt: skip
    assert model.config._attn_implementation == "sdpa"
