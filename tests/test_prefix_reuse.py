"""Prefix reuse in the decode engine (``sampling/reuse.py``): a free slot keeps its last request's
cache entries, and a prompt that starts with those tokens encodes only the rest.

What a user relies on: the tokens never change (every output equals greedy decoding of the request
alone, with reuse on or off), the next turn of a conversation and a shared prefix really skip
their encoding (fewer positions computed, ``Event.cached`` says how many), and nothing is reused
that the cache does not hold exactly (a request that ended early, a compacted slot, one that wants
its prompt's log-probabilities, a float16 overflow).
"""

from __future__ import annotations

import pytest
import torch
from test_sampling_dtype import _overflowing
from test_scheduler import TEXTS, _assert_same, _greedy_alone

from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling.kv import SlotKV
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.reuse import MIN_REUSE, Placement, SlotPrefixes, common_prefix
from fluid_npu.sampling.rules import SamplingParams
from fluid_npu.sampling.scheduler import Request, Scheduler


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


def _drain(sched: Scheduler, reqs: list[Request]) -> dict[str, tuple[list[int], int]]:
    """Each request's tokens and the prompt tokens its slot held (``Event.cached``)."""
    for r in reqs:
        sched.submit(r)
    out: dict[str, tuple[list[int], int]] = {}
    while sched.has_work():
        for ev in sched.step():
            toks, _ = out.get(ev.request_id, ([], 0))
            out[ev.request_id] = (toks + ev.tokens, ev.cached)
    return out


def test_common_prefix_is_exact_at_every_split():
    a = list(range(600))  # (compared 256 tokens at a time: splits inside and at the borders)
    for n in [*range(40), 255, 256, 257, 300, 511, 512, 513, 599, 600]:
        b = a[:n] + [-1] * 5
        assert common_prefix(a, b, 1000) == n
        assert common_prefix(a, b, 7) == min(n, 7)
        assert common_prefix(b, a, 256) == min(n, 256)
    assert common_prefix([], a, 10) == 0 and common_prefix(a, a, 0) == 0
    assert common_prefix(a, a, -3) == 0 and common_prefix(a, a, 10**6) == 600
    prefixes = SlotPrefixes(3, enabled=False)
    prefixes.release(1, a)
    assert prefixes.match(a, [1, 2]) == (-1, 0)  # off: nothing is found ...
    assert prefixes.place(a, [1, 2]) == Placement(1, 0)  # ... and the lowest free slot taken


@pytest.mark.parametrize("policy", ["ar", "fixed:3", "entropy:6"])
def test_the_next_turn_encodes_only_what_its_slot_does_not_hold(tok, policy):
    model = build_tiny_model("llama", tok, seed=3)
    first = tok("the quick brown fox jumps")["input_ids"]
    runs = {}
    for reuse in (True, False):
        sched = Scheduler(
            model, tok.mask_token_id, policy=policy, max_batch=2, eos_ids=[], k_max=4,
            prefix_caching=reuse, adaptive=False,  # (block choices that do not follow timing)
        )  # fmt: skip
        answer = _drain(sched, [Request("t1", first, 8)])["t1"][0]
        follow = first + answer + tok(" over the lazy dog")["input_ids"][1:]
        before = sched.computed_tokens
        runs[reuse] = (answer, follow, _drain(sched, [Request("t2", follow, 8)])["t2"])
        runs[reuse] += (sched.computed_tokens - before,)
        sched.close()
    (answer, follow, (second, cached), cost), (_, _, (plain, none), plain_cost) = runs.values()
    assert cached == len(first) + len(answer) - 1  # all but the answer's last token: never fed
    assert none == 0
    assert cost <= plain_cost - cached  # those positions were not computed again
    _assert_same(model, [follow], [second], [_greedy_alone(model, follow, 8, [])], policy)
    assert second == plain


@pytest.mark.parametrize("policy", ["ar", "entropy:6"])
def test_a_shared_prefix_under_staggered_arrivals_keeps_every_output(tok, policy):
    model = build_tiny_model("qwen3", tok, seed=4)
    shared = tok("over the lazy dog " * 4)["input_ids"]
    prompts = [shared + tok(t)["input_ids"][1:] for t in TEXTS]
    prompts += [shared[:20], shared[: MIN_REUSE + 1]]  # (P - 2 reusable: 18, then too few)
    lengths = [9, 4, 12, 7, 10, 5, 6, 6]
    sched = Scheduler(
        model, tok.mask_token_id, policy=policy, max_batch=3, eos_ids=[], k_max=4,
        prefill_chunk=8, adaptive=False,
    )  # fmt: skip
    out, cached, step = {}, {}, 0
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5], 9: [6, 7]}
    while step < 300 and (sched.has_work() or any(k >= step for k in arrivals)):
        for i in arrivals.get(step, []):
            sched.submit(Request(f"r{i}", prompts[i], lengths[i]))
        for ev in sched.step():
            out.setdefault(ev.request_id, []).extend(ev.tokens)
            cached[ev.request_id] = ev.cached
        step += 1
    ours = [out[f"r{i}"] for i in range(len(prompts))]
    alone = [_greedy_alone(model, p, n, []) for p, n in zip(prompts, lengths)]
    _assert_same(model, prompts, ours, alone, policy)
    assert cached["r3"] >= len(shared) - 1  # a refilled slot held the shared prefix
    assert cached["r6"] == 18 and cached["r7"] == 0  # P - 2 at most, and MIN_REUSE at least
    assert sched.prefixes.hits == sum(cached.values()) > 0
    assert sched.prefixes.queried == sum(len(p) for p in prompts)


def test_an_aborted_prefill_leaves_only_what_it_encoded(tok):
    model = build_tiny_model("llama", tok, seed=3)
    long = tok("the quick brown fox jumps " * 5)["input_ids"]
    sched = Scheduler(
        model, tok.mask_token_id, policy="fixed:2", max_batch=1, eos_ids=[], k_max=4,
        prefill_chunk=8,
    )  # fmt: skip
    sched.submit(Request("gone", long, 5))
    sched.step()
    sched.step()  # two chunks of 8 encoded, the prompt not finished
    assert sched.abort("gone")
    sched.step()
    assert sched.prefixes.held[0] == long[:16]
    got = _drain(sched, [Request("again", long, 6)])["again"]
    assert got[1] == 16
    _assert_same(model, [long], [got[0]], [_greedy_alone(model, long, 6, [])], "abort")


def _holds_exactly(sched: Scheduler, model, slot: int) -> None:
    """The slot's cache entries ``[0, len(held))`` are those a fresh forward of the held tokens
    computes (what a later prompt reuses)."""
    held = sched.prefixes.held[slot]
    with torch.inference_mode():
        fresh = model(input_ids=torch.tensor([held]), use_cache=True).past_key_values
    n = len(held)
    for keys, values, ref in zip(sched.kv.keys, sched.kv.values, fresh.layers):
        torch.testing.assert_close(keys[slot, :, :n], ref.keys[0], atol=2e-5, rtol=0)
        torch.testing.assert_close(values[slot, :, :n], ref.values[0], atol=2e-5, rtol=0)
    if slot < sched.slots_n:  # (a pool row never decodes)
        assert int(sched.length[slot]) >= n  # idle rows write at or past their length


def test_two_conversations_keep_their_turns_through_compaction_and_unrelated_requests(tok):
    # user A's first turn ends in slot 0 while B runs in slot 1 and nothing waits: compaction
    # moves B down and A's turn up (swapped, not overwritten); an unrelated request then takes a
    # slot that holds nothing rather than A's; A's next turn still finds its whole history
    model = build_tiny_model("llama", tok, seed=3)
    a1 = tok("user a: tell me about the quick brown fox " * 3)["input_ids"]
    b1 = tok("user b: something else entirely " * 3)["input_ids"]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:2", max_batch=3, eos_ids=[], k_max=4)
    for r in (Request("a1", a1, 3), Request("b1", b1, 30)):
        sched.submit(r)
    out: dict[str, list[int]] = {}
    while "a1" not in out or len(out["a1"]) < 3:
        for ev in sched.step():
            out.setdefault(ev.request_id, []).extend(ev.tokens)
    for ev in sched.step():  # nothing waits: b1 moves down into slot 0
        out[ev.request_id] += ev.tokens
    assert sched.slots[0].req.request_id == "b1" and sched.prefixes.held[1][: len(a1)] == a1
    _holds_exactly(sched, model, 1)
    other = tok("hello world")["input_ids"]
    got = _drain(sched, [Request("u", other, 4)])  # no shared prefix: the empty slot 2
    # (then moved down into slot 1 as b1 went on, a's turn swapped up into slot 2)
    assert [i for i, h in enumerate(sched.prefixes.held) if h[: len(a1)] == a1] == [2]
    _holds_exactly(sched, model, 2)
    a2 = a1 + out["a1"] + tok(" and then?")["input_ids"][1:]
    got |= _drain(sched, [Request("a2", a2, 6)])
    assert got["a2"][1] == len(a1) + len(out["a1"]) - 1
    for p, rid in ((a2, "a2"), (other, "u")):
        want = _greedy_alone(model, p, len(got[rid][0]), [])
        _assert_same(model, [p], [got[rid][0]], [want], rid)
    b1_out = out["b1"] + got.get("b1", ([], 0))[0]
    _assert_same(model, [b1], [b1_out], [_greedy_alone(model, b1, 30, [])], "b1")


def test_a_compacted_slot_holds_the_entries_it_was_given(tok):
    model = build_tiny_model("llama", tok, seed=3)
    prompts = [tok(t)["input_ids"] for t in (TEXTS[2], TEXTS[1])]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:2", max_batch=2, eos_ids=[], k_max=4)
    out = _drain(sched, [Request("short", prompts[0], 2), Request("long", prompts[1] * 3, 40)])
    # "long" moved from slot 1 to slot 0 when "short" ended, "short"'s entries to slot 1
    whole = prompts[1] * 3 + out["long"][0]
    short = prompts[0] + out["short"][0]
    assert sched.prefixes.held == [whole[:-1], short[:-1]]
    for slot in (0, 1):
        _holds_exactly(sched, model, slot)
    # another request (its prefix in slot 0) takes slot 0 first, the next one finds its in slot 1
    follow = short[:-1] + tok(" over the lazy dog")["input_ids"]
    other = whole[:20]
    got = _drain(sched, [Request("other", other, 12), Request("next", follow, 6)])
    assert got["other"][1] == 18 and got["next"][1] == len(short) - 1
    for p, (toks, _) in ((other, got["other"]), (follow, got["next"])):
        _assert_same(model, [p], [toks], [_greedy_alone(model, p, len(toks), [])], "compacted")


def test_requests_that_end_together_are_compacted_at_once_and_keep_every_prefix(tok, monkeypatch):
    # three requests end in the same step while nothing waits: the three running above them move
    # down in one batched compaction (kv.swap_rows), each finished one's entries swapped up, not
    # overwritten; every slot then holds exactly what a fresh forward computes, the moved requests
    # finish as greedy decoding alone, and each finished request's next turn finds its history
    model = build_tiny_model("llama", tok, seed=3)
    moves = []
    original = SlotKV.swap_rows

    def counted(self, batch):
        moves.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(SlotKV, "swap_rows", counted)
    prompts = [tok(f"{t} number {i} " * 4)["input_ids"] for i, t in enumerate(TEXTS)]
    assert min(map(len, prompts)) > MIN_REUSE  # (long enough to be reused)
    sched = Scheduler(model, tok.mask_token_id, policy="ar", max_batch=6, eos_ids=[])
    lengths = (3, 3, 3, 9, 12, 15)  # (AR: one token a step, so the first three end together)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        sched.submit(Request(f"r{i}", p, n))
    out: dict[str, list[int]] = {}
    while len(out.get("r0", [])) < 3:
        for ev in sched.step():
            out.setdefault(ev.request_id, []).extend(ev.tokens)
    for ev in sched.step():  # nothing waits: r5, r4, r3 move into slots 0, 1, 2
        out[ev.request_id] += ev.tokens
    assert moves == [3]
    assert [s.req.request_id for s in sched.slots[:3]] == ["r5", "r4", "r3"]
    assert sched.slots[3:] == [None] * 3
    for i in (0, 1, 2):  # the finished turns, swapped up: slot 5 holds r0's, 4 r1's, 3 r2's
        assert sched.prefixes.held[5 - i] == (prompts[i] + out[f"r{i}"])[:-1]
    for slot in (3, 4, 5):
        _holds_exactly(sched, model, slot)
    while sched.has_work():
        for ev in sched.step():
            out[ev.request_id] += ev.tokens
    for i in (3, 4, 5):
        want = _greedy_alone(model, prompts[i], lengths[i], [])
        _assert_same(model, [prompts[i]], [out[f"r{i}"]], [want], f"moved r{i}")
    turns = [prompts[i] + out[f"r{i}"] + tok(" and then?")["input_ids"][1:] for i in range(3)]
    got = _drain(sched, [Request(f"t{i}", t, 5) for i, t in enumerate(turns)])
    for i, t in enumerate(turns):
        assert got[f"t{i}"][1] == len(prompts[i]) + 3 - 1  # its whole first turn was found
        _assert_same(model, [t], [got[f"t{i}"][0]], [_greedy_alone(model, t, 5, [])], f"t{i}")


@pytest.mark.parametrize("policy", ["fixed:3", "entropy:6"])
def test_a_batched_compaction_leaves_what_one_move_at_a_time_leaves(tok, policy):
    # every moved row takes its whole state along (drafts, acceptance averages, candidate
    # blocks: a wrong one would cost speed, not tokens), and the same requests through an engine
    # that applies each compaction's moves one at a time leave identical events, slot contents,
    # per-row state and cache entries
    model = build_tiny_model("llama", tok, seed=5)
    prompts = [tok(t * (1 + i % 3))["input_ids"] for i, t in enumerate(TEXTS * 2)]
    runs = []
    for batched in (True, False):
        sched = Scheduler(
            model, tok.mask_token_id, policy=policy, max_batch=8, eos_ids=[], k_max=4,
            adaptive=False,
        )  # fmt: skip
        moved = []
        plain = sched._move_rows

        def one_at_a_time(moves, sched=sched, plain=plain, batched=batched, moved=moved):
            moved.append(len(moves))
            before = {n: getattr(sched, n).clone() for n in Scheduler.ROW_STATE}
            for n in Scheduler.ROW_STATE:  # a free row's state is dead: make it differ
                t = getattr(sched, n)
                for dst, src, _, _ in moves:
                    t[dst] = ~t[src] if t.dtype == torch.bool else t[src] + 1
            for group in [moves] if batched else [[m] for m in moves]:
                plain(group)
            for dst, src, _, h in moves:  # each moved row's state went with it
                for n, was in before.items():
                    assert torch.equal(getattr(sched, n)[dst], was[src]), (n, dst, src)
                assert not sched.run[src] and (not h or int(sched.length[src]) == h)

        sched._move_rows = one_at_a_time
        events = []
        for i, p in enumerate(prompts[:8]):
            sched.submit(Request(f"r{i}", p, 2 + (i % 4) * 2))
        while sched.has_work():
            events += [(e.request_id, e.tokens, e.finished) for e in sched.step()]
        state = [getattr(sched, n).clone() for n in Scheduler.ROW_STATE]
        runs.append((events, moved, state, list(sched.prefixes.held), sched.kv))
    (ev_a, moved, state_a, held_a, kv_a), (ev_b, _, state_b, held_b, kv_b) = runs
    assert any(n > 1 for n in moved), moved  # (the case under test happened)
    assert ev_a == ev_b and held_a == held_b
    for a, b in zip(state_a, state_b):
        assert torch.equal(a, b)
    for slot, held in enumerate(held_a):
        for a, b in zip((*kv_a.keys, *kv_a.values), (*kv_b.keys, *kv_b.values)):
            assert torch.equal(a[slot, :, : len(held)], b[slot, :, : len(held)])


def test_prompt_logprobs_and_seeded_sampling_are_those_of_a_fresh_slot(tok):
    model = build_tiny_model("llama", tok, seed=3)
    prompt = tok("the quick brown fox jumps over")["input_ids"]
    results = {}
    for reuse in (True, False):
        sched = Scheduler(
            model, tok.mask_token_id, policy="fixed:3", max_batch=1, eos_ids=[], k_max=4,
            prefix_caching=reuse,
        )  # fmt: skip
        run_requests(sched, [Request("warm", prompt, 4)])
        scored = run_requests(
            sched, [Request("lp", prompt, 3, sampling=SamplingParams(prompt_logprobs=2))]
        )["lp"]
        drawn = _drain(
            sched, [Request("s", prompt, 10, sampling=SamplingParams(temperature=0.9, seed=7))]
        )["s"]
        results[reuse] = (scored.final.cached, scored.prompt_logprobs, drawn)
        sched.close()
    assert results[True][0] == 0  # prompt log-probabilities need the whole prompt encoded
    assert results[True][1] == results[False][1]
    assert results[True][2][1] == len(prompt) - 2 and results[False][2][1] == 0
    assert results[True][2][0] == results[False][2][0]  # the seed draws the same tokens


def test_a_float16_request_that_overflowed_leaves_nothing_to_reuse(tok):
    model = _overflowing(tok, "Z")
    bad = tok("a long request Z that overflows")["input_ids"]
    sched = Scheduler(model, tok.mask_token_id, policy="ar", max_batch=1, eos_ids=[], k_max=4)
    final = _drain(sched, [Request("bad", bad, 4)])
    assert "bad" in final and sched.prefixes.held[0] == []
    assert _drain(sched, [Request("again", bad + bad, 2)])["again"][1] == 0
    sched.close()
    assert torch.float16 == next(model.parameters()).dtype


@pytest.mark.parametrize(
    ("policy", "system"), [("ar", ""), ("fixed:3", ""), ("ar", "be brief. " * 4)]
)
def test_a_prefix_pool_keeps_more_conversations_than_there_are_slots(tok, policy, system):
    # three conversations take turns on one slot: with two pool rows each next turn finds its
    # history (copied back from the pool), without them none does (the slot held another); with a
    # system prompt every conversation shares, a new one matches the slot's start and the rest of
    # what the slot held goes to the pool rather than being overwritten
    model = build_tiny_model("llama", tok, seed=3)
    firsts = [
        tok(f"{system}user {u}: tell me about the quick brown fox " * 2)["input_ids"] for u in "abc"
    ]
    for pool in (2, 0):
        sched = Scheduler(
            model, tok.mask_token_id, policy=policy, max_batch=1, eos_ids=[], k_max=4,
            prefix_slots=pool, adaptive=False,
        )  # fmt: skip
        answers = [
            _drain(sched, [Request(f"{u}1", p, 5)])[f"{u}1"][0] for u, p in zip("abc", firsts)
        ]
        if pool:
            rows = sorted(len(h) for h in sched.prefixes.held)
            assert rows == sorted(len(p) + len(a) - 1 for p, a in zip(firsts, answers))
            for row in range(sched.kv.slots):
                _holds_exactly(sched, model, row)
        for u, p, a in zip("abc", firsts, answers):
            follow = p + a + tok(" and then?")["input_ids"]
            toks, cached = _drain(sched, [Request(f"{u}2", follow, 6)])[f"{u}2"]
            shared = common_prefix(firsts[0], firsts[1], len(p)) if system else 0
            assert cached == (len(p) + len(a) - 1 if pool else shared), (pool, u)
            want = _greedy_alone(model, follow, 6, [])
            _assert_same(model, [follow], [toks], [want], f"{policy}/{pool}/{u}")
        sched.close()


def test_a_pool_row_that_matches_only_the_start_keeps_its_history():
    system, a, q, b = (
        [*range(1000, 1020)],
        [*range(1, 101)],
        [*range(5000, 5040)],
        [*range(7000, 7040)],
    )
    prefixes = SlotPrefixes(3, pool=[1, 2])
    for row, tokens in ((1, system + a), (2, q), (0, b)):  # oldest first: a's row is the oldest
        prefixes.release(row, tokens)
    prompt = [*system, *range(9000, 9030)]
    placed = prefixes.place(prompt, [0], prefixes.match(prompt, [0]))
    # the system prompt is copied from row 1, which keeps a's history (though the oldest); the
    # slot's own tokens take the other row
    assert placed == Placement(0, 20, source=1, keep=40, save_to=2)
    assert prefixes.held == [[], system + a, b]
    prompt = system + a + [1, 2, 3]  # a's next turn takes row 1 whole ...
    taken = prefixes.place(prompt, [0], prefixes.match(prompt, [0]))
    assert taken == Placement(0, 120, source=1)  # (the slot held nothing to keep)
    assert prefixes.held == [[], system + a, b]  # ... and row 1 still holds it (nothing swapped in)


@pytest.mark.parametrize(("chunk", "abort"), [(512, False), (8, False), (8, True)])
def test_requests_arriving_together_encode_their_shared_prefix_once(tok, chunk, abort):
    # four prompts sharing a long start, submitted at once: the first encodes it, the others wait
    # for it (a step per chunk) and copy it from that busy slot; aborting the first lets them go
    model = build_tiny_model("llama", tok, seed=3)
    shared = tok("a shared system prompt: answer in one word. " * 2)["input_ids"]
    prompts = [shared + tok(t)["input_ids"] for t in TEXTS[:4]]
    runs = {}
    for reuse in (True, False):
        sched = Scheduler(
            model, tok.mask_token_id, policy="fixed:3", max_batch=4, eos_ids=[], k_max=4,
            prefill_chunk=chunk, prefix_caching=reuse, adaptive=False,
        )  # fmt: skip
        reqs = [Request(str(i), p, 8) for i, p in enumerate(prompts)]
        if abort:
            for r in reqs:
                sched.submit(r)
            sched.step()
            assert (sched.num_running, sched.num_waiting) == ((1, 3) if reuse else (4, 0))
            sched.abort("0")
            out = _drain(sched, [])
        else:
            out = _drain(sched, reqs)
        runs[reuse] = (out, sched.computed_tokens)
        sched.close()
    (out, cost), (plain, plain_cost) = runs[True], runs[False]
    for i, p in enumerate(prompts[1:] if abort else prompts, start=1 if abort else 0):
        toks = out[str(i)][0]
        _assert_same(model, [p], [toks], [_greedy_alone(model, p, 8, [])], f"{chunk}/{i}")
        assert toks == plain[str(i)][0]
    # the first (after an abort: the next) encodes the shared start, the others copy it: all of
    # it, or (a chunk at a time) what it had encoded once less than MIN_REUSE more was to come
    first = 1 if abort else 0
    cached = [out[str(i)][1] for i in range(first, 4)]
    want = [min(len(shared), len(p) - 2) for p in prompts[first + 1 :]]
    assert cached[0] == 0 and len(cached) == len(want) + 1
    for got, full in zip(cached[1:], want):
        assert (got == full) if chunk >= len(shared) else (full - MIN_REUSE < got <= full)
    assert cost < plain_cost - (len(want) - 1) * len(shared)


def test_float16_requests_arriving_together_do_not_copy_an_unjudged_overflow(tok):
    # in float16 a prompt entry that overflowed is written as zero and judged a step later: a
    # request that copied it from the busy slot encoding it would decode from the zero, silently;
    # so float16 engines copy nothing from busy slots, and every such request ends as "error"
    model = _overflowing(tok, "Z")
    bad = tok("a long shared start with Z that overflows, then more " * 2)["input_ids"]
    prompts = [bad + tok(t)["input_ids"] for t in TEXTS[:3]]
    sched = Scheduler(
        model, tok.mask_token_id, policy="ar", max_batch=3, eos_ids=[], k_max=4, prefill_chunk=8
    )  # (the first prompt takes several steps to encode: the others could copy it meanwhile)
    finals = {}
    for r in [Request(str(i), p, 4) for i, p in enumerate(prompts)]:
        sched.submit(r)
    while sched.has_work():
        for ev in sched.step():
            if ev.finished:
                finals[ev.request_id] = (ev.finish_reason, ev.cached)
    sched.close()
    assert finals == {str(i): ("error", 0) for i in range(3)}


def test_a_prefix_pool_needs_prefix_caching(tok):
    """Pool rows only keep prefixes for reuse: asking for them with reuse off (or fewer than
    none) is one error, not rows allocated for nothing."""
    from fluid_npu.errors import ConfigError

    model = build_tiny_model("llama", tok, seed=0)
    for kwargs in ({"prefix_slots": -1}, {"prefix_slots": 2, "prefix_caching": False}):
        with pytest.raises(ConfigError, match="prefix_slots must be 0 or more, and 0 without"):
            Scheduler(model, tok.mask_token_id, max_batch=1, max_len=64, **kwargs)
    assert Scheduler(model, tok.mask_token_id, max_batch=1, max_len=64, prefix_slots=2).kv.slots > 1


def test_a_cache_salt_reuses_only_entries_of_its_own_salt(tok):
    """vLLM's ``cache_salt``: a prompt finds only what requests of the same salt left (unsalted
    ones share among themselves) — in a free slot, a pool row or a slot still encoding — so its
    time to first token tells nothing of another tenant's prompts; outputs never change."""
    model = build_tiny_model("llama", tok, seed=3)
    shared = tok("a shared system prompt: answer in one word. " * 2)["input_ids"]
    prompts = [shared + tok(t)["input_ids"] for t in TEXTS[:3]]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=1, eos_ids=[],
                      k_max=4, prefix_slots=1, adaptive=False)  # fmt: skip
    found = {}
    for rid, p, salt in (("a", prompts[0], "t1"), ("b", prompts[1], "t2"), ("c", prompts[2], "t1"),
                         ("d", prompts[1], None), ("e", prompts[2], None)):  # fmt: skip
        toks, found[rid] = _drain(sched, [Request(rid, p, 4, cache_salt=salt)])[rid]
        assert toks == _greedy_alone(model, p, 4, []), rid
    assert found["a"] == found["b"] == found["d"] == 0  # nothing of their own salt held yet
    assert found["c"] == found["e"] == len(shared)  # t1's from a (the pool), None's from d
    sched.close()
    # arriving together: a request waits for (and copies from) a slot still encoding only when
    # that slot's request has its salt
    for salts, copied in ((("x", "x"), True), (("x", "y"), False)):
        sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=2, eos_ids=[],
                          k_max=4, prefill_chunk=8, adaptive=False)  # fmt: skip
        reqs = [Request(str(i), p, 4, cache_salt=s) for i, (p, s) in enumerate(zip(prompts, salts))]
        for r in reqs:
            sched.submit(r)
        sched.step()
        assert sched.num_waiting == (1 if copied else 0), salts  # (another salt: no wait)
        out = _drain(sched, [])
        assert (out["1"][1] > 0) == copied, salts
        sched.close()
    # compaction swaps the salts with the rows' contents
    prefixes = SlotPrefixes(2)
    prefixes.place(prompts[0], [0, 1], salt="t1")
    prefixes.release(0, prompts[0])
    prefixes.place(prompts[1], [1], salt="t2")  # row 1 runs a t2 request ...
    prefixes.move(0, 1)  # ... moved down into row 0, whose t1 tokens go up to row 1
    assert prefixes.salt == ["t2", "t1"] and prefixes.held[1] == prompts[0]
    assert prefixes.match(prompts[2], [1], salt="t1") == (1, len(shared))
    assert prefixes.match(prompts[2], [1], salt="t2") == (-1, 0)
