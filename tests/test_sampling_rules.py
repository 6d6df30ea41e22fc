"""Sampling that stays exact: the engine's output distribution is AR sampling's.

The statistical test is sized so it neither passes by luck nor fails by chance: with ``N`` seeded
requests over a support of ``S`` sequences, the total variation (TV) between the empirical and the
exact distribution has mean at most ``0.5 * sqrt(S / N)`` and exceeds it by ``t`` with probability
at most ``exp(-2 N t²)`` (McDiarmid: one sample moves TV by at most ``1/N``). With N = 3000, S ≤ 32
and t = 0.04 the bound is 0.092 and a correct sampler fails with probability < 1e-4; the same
samples judged against a slightly different temperature's distribution exceed it (the test has
power), and transformers' own ``do_sample=True`` at the same count is held to the same bound.
The drafts really go through the rejection rule: some are accepted, some rejected.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
from test_sampling_lossless import chain_model

from fluid_npu.errors import ConfigError
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling.grammar import GrammarCompiler, allowed_tokens
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.rules import SamplingParams, filtered_probs, uniform
from fluid_npu.sampling.scheduler import Request, Scheduler

T, MIN_P, LENGTH, N = 8.0, 0.2, 3, 3000


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


def _exact(
    model, prompt: list[int], temperature: float, grammar=None, length: int = LENGTH,
    top_k: int = 0, min_p: float = MIN_P,
) -> dict[tuple[int, ...], float]:  # fmt: skip
    """The exact distribution of the first ``length`` tokens under AR sampling (enumerated); with
    a grammar, its mask on the logits first."""
    out: dict[tuple[int, ...], float] = {(): 1.0}
    one = torch.ones(1)
    for _ in range(length):
        grown = {}
        for prefix, prob in out.items():
            with torch.inference_mode():
                logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1]
            if grammar is not None:
                matcher = grammar.matcher([0])
                assert all(matcher.accept_token(t) for t in prefix)
                allowed = allowed_tokens([matcher], logits.shape[-1])[0]
                logits = logits.masked_fill(~allowed, -torch.inf)
            k = one.long() * top_k
            p = filtered_probs(logits[None], one * temperature, k, one, one * min_p)[0]
            for t in p.nonzero().flatten().tolist():
                grown[(*prefix, t)] = prob * float(p[t])
        out = grown
    return out


def _tv(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]) -> float:
    emp = collections.Counter(samples)
    keys = set(emp) | set(exact)
    return 0.5 * sum(abs(emp[k] / len(samples) - exact.get(k, 0.0)) for k in keys)


def _sampled(model, tok, prompt: list[int], policy: str, loop: str):
    """N seeded samples of LENGTH tokens (seeds 1..N) and the accept histogram of the run."""
    if loop == "reference":
        from fluid_npu.sampling import generate

        out = generate(
            model,
            tok,
            torch.tensor([prompt] * N),
            policy=policy,
            loop="reference",
            max_new_tokens=LENGTH,
            eos_token_id=[],
            k_max=8,
            do_sample=True,
            temperature=T,
            top_k=0,
            min_p=MIN_P,
            seed=1,
        )
        return [tuple(t) for t in out.new_tokens], out.stats.accept_hist
    sched = Scheduler(
        model, tok.mask_token_id, policy=policy, max_batch=64, eos_ids=[], k_max=8, max_len=32
    )
    params = [SamplingParams(temperature=T, min_p=MIN_P, seed=s) for s in range(1, N + 1)]
    res = run_requests(
        sched, [Request(str(i), prompt, LENGTH, sampling=p) for i, p in enumerate(params)]
    )
    return [tuple(res[str(i)][0]) for i in range(N)], sched.accept_hist


@pytest.mark.slow
@pytest.mark.parametrize(
    ("policy", "loop"), [("fixed:4", "fused"), ("entropy:6", "fused"), ("fixed:3", "reference")]
)
def test_sampled_outputs_follow_the_ar_distribution(tok, policy, loop):
    model = chain_model(tok, attn_scale=4.0)  # its drafts are often right, so accepts happen
    prompt = tok("hello p")["input_ids"]
    exact = _exact(model, prompt, T)
    assert 8 <= len(exact) <= 32
    bound = 0.5 * math.sqrt(len(exact) / N) + 0.04
    ours, hist = _sampled(model, tok, prompt, policy, loop)
    tv = _tv(ours, exact)
    verifies = sum(hist.values())
    accepted = sum(c for a, c in hist.items() if a > 0)
    print(
        f"{loop}/{policy}: TV {tv:.4f} (bound {bound:.4f}); verifies that accepted a draft "
        f"{accepted}/{verifies} = {accepted / verifies:.3f}; accept histogram {dict(hist)}"
    )
    assert tv <= bound
    assert 0.05 < accepted / verifies < 0.95  # the rejection rule is really exercised
    assert _tv(ours, _exact(model, prompt, 6.0)) > bound  # the test can tell a wrong sampler
    if (policy, loop) != ("fixed:4", "fused"):
        return
    # transformers' own sampler, same count, same bound (once)
    model.generation_config.eos_token_id = None
    torch.manual_seed(0)
    with torch.inference_mode():
        hf = model.generate(
            torch.tensor([prompt] * N),
            attention_mask=torch.ones(N, len(prompt), dtype=torch.long),
            do_sample=True,
            temperature=T,
            top_k=0,
            top_p=1.0,
            min_p=MIN_P,
            max_new_tokens=LENGTH,
            pad_token_id=tok.pad_token_id,
        )
    hf_tv = _tv([tuple(r) for r in hf[:, len(prompt) :].tolist()], exact)
    print(f"transformers do_sample TV {hf_tv:.4f}")
    assert hf_tv <= bound


@pytest.mark.slow
def test_sampling_under_a_grammar_follows_the_masked_ar_distribution(tok):
    """A sampling row under a grammar drafts: its model drafts up to and with the first one the
    grammar refuses, which the rejection rule turns down (probability 0 under the mask) before
    drawing from the residual. The draws are exactly AR sampling under the grammar (the same
    bound and power check as above), and drafts are both accepted and turned down."""
    model = chain_model(tok, attn_scale=4.0)
    prompt = tok("hello p")["input_ids"]
    grammar = GrammarCompiler(tok, model.config.vocab_size).compile("regex", "[a-z*]{2}[e-s]")
    exact = _exact(model, prompt, T, grammar)
    assert 8 <= len(exact) <= 128  # (the mask lifts tokens over min_p: a wider support)
    bound = 0.5 * math.sqrt(len(exact) / N) + 0.04
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=64, k_max=8,
                      max_len=32, eos_ids=[tok.eos_token_id], tokenizer=tok)  # fmt: skip
    params = [SamplingParams(temperature=T, min_p=MIN_P, seed=s) for s in range(1, N + 1)]
    reqs = [Request(str(i), prompt, LENGTH, sampling=p, grammar=grammar)
            for i, p in enumerate(params)]  # fmt: skip
    res = run_requests(sched, reqs)
    ours = [tuple(res[str(i)][0]) for i in range(N)]
    tv = _tv(ours, exact)
    hist = sched.accept_hist
    verifies, accepted = sum(hist.values()), sum(c for a, c in hist.items() if a > 0)
    print(f"grammar: TV {tv:.4f} (bound {bound:.4f}); accepted {accepted}/{verifies}")
    assert tv <= bound
    assert 0.05 < accepted / verifies < 0.95
    assert _tv(ours, _exact(model, prompt, T)) > bound  # the grammar really changed the outputs


@pytest.mark.slow
def test_keeping_the_refused_draft_is_what_makes_grammar_sampling_exact(tok, monkeypatch):
    """A random model whose draft distribution is spread (not peaked on the refused token, as the
    chain model's is): with the refused draft kept the draws meet the bound, and a sampler that
    drops it instead (drawing from p where the residual belongs) is far outside it."""
    from fluid_npu.sampling import constrained
    from fluid_npu.sampling.grammar import valid_prefix

    model = build_tiny_model("llama", tok, seed=7)
    grammar = GrammarCompiler(tok, model.config.vocab_size).compile("regex", "[a-z]{2}")
    prompt = tok("xx")["input_ids"]
    n, temperature, top_k = 4000, 2.0, 3
    exact = _exact(model, prompt, temperature, grammar, length=2, top_k=top_k, min_p=0.0)
    bound = 0.5 * math.sqrt(len(exact) / n) + 0.04

    def tv_of_engine() -> float:
        sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", k_max=3, max_batch=64,
                          eos_ids=[tok.eos_token_id], tokenizer=tok, max_len=32)  # fmt: skip
        reqs = [Request(str(i), prompt, 2, grammar=grammar, sampling=SamplingParams(
            temperature=temperature, top_k=top_k, seed=i + 1)) for i in range(n)]  # fmt: skip
        res = run_requests(sched, reqs)
        return _tv([tuple(res[str(i)][0]) for i in range(n)], exact)

    kept = tv_of_engine()
    keep_rows = constrained.ConstrainedMixin._constrained_rows

    def dropping(self, hi):  # the rule this test must tell from the right one
        rows, drafts, armed = keep_rows(self, hi)
        for d, i in zip(drafts, rows):
            if not self.slots[i].params.greedy:
                del d[valid_prefix(self.slots[i].matcher, d) :]
        return rows, drafts, armed

    monkeypatch.setattr(constrained.ConstrainedMixin, "_constrained_rows", dropping)
    dropped = tv_of_engine()
    print(f"grammar, spread drafts: TV kept {kept:.4f}, dropped {dropped:.4f} (bound {bound:.4f})")
    assert kept <= bound < dropped


def test_a_seed_gives_the_same_tokens_alone_or_in_any_batch(tok):
    model = chain_model(tok, attn_scale=4.0)
    prompts = [tok(t)["input_ids"] for t in ("hello p", "abc", "xx", "ijk")]
    params = SamplingParams(temperature=T, min_p=MIN_P, seed=1234)

    def run(batch: int, order: list[int]) -> dict[int, list[int]]:
        sched = Scheduler(
            model,
            tok.mask_token_id,
            policy="entropy",
            max_batch=batch,
            eos_ids=[],
            k_max=8,
            max_len=64,
        )
        res = run_requests(sched, [Request(str(i), prompts[i], 12, sampling=params) for i in order])
        return {i: res[str(i)][0] for i in order}

    alone = {i: run(1, [i])[i] for i in range(4)}
    assert run(4, [0, 1, 2, 3]) == alone
    assert run(2, [3, 1, 0, 2]) == alone
    other = SamplingParams(temperature=T, min_p=MIN_P, seed=99)
    sched = Scheduler(model, tok.mask_token_id, policy="entropy", max_batch=1, eos_ids=[], k_max=8)
    differs = run_requests(sched, [Request("x", prompts[0], 12, sampling=other)])["x"][0]
    assert differs != alone[0]  # the seed matters


def test_a_seeded_request_ignores_what_ran_in_its_slot_before(tok):
    """With two candidate blocks per row, the first step after a prefill holds both of a new
    row's blocks whatever the step before it held (it once held only as many as the previous
    request left): a seed's tokens are the same on a fresh engine and after another request."""
    model = build_tiny_model("llama", tok, seed=3)
    kw = dict(policy="fixed:3", k_max=3, anchors=2, adaptive=False, max_batch=1, eos_ids=[])
    prompt = [11, 88, 125, 216, 217]

    def tokens(seed: int, before: list[int] | None) -> list[int]:
        reqs = [] if before is None else [
            Request("o", before, 2, sampling=SamplingParams(temperature=1.0, top_k=5, seed=480))
        ]  # fmt: skip
        params = SamplingParams(temperature=1.0, top_k=5, min_p=0.05, seed=seed)
        reqs.append(Request("r", prompt, 7, sampling=params))
        return run_requests(Scheduler(model, tok.mask_token_id, **kw), reqs)["r"].tokens

    for seed in range(60):  # (with the narrower first step, 3 of these 60 seeds differed)
        assert tokens(seed, [74]) == tokens(seed, None), seed


def test_each_draft_is_drawn_for_the_position_it_is_tested_at_and_never_reused(tok, monkeypatch):
    """The random number behind a sampled draft is keyed by the position the draft guesses (the
    one its accept test is keyed by) and the block's anchor: a position drafted again from a
    later anchor draws afresh (the rejection rule needs drafts independent of what was seen)."""
    from fluid_npu.sampling import sampled, step
    from fluid_npu.sampling.rules import ACCEPT, DRAFT

    calls: list[tuple[int, list[int], list[int] | None]] = []

    def spy(seed, position, purpose, anchor=None):
        pos = position.flatten().tolist()
        at = None if anchor is None else anchor.expand_as(position).flatten().tolist()
        calls.append((purpose, pos, at))
        return uniform(seed, position, purpose, anchor)

    monkeypatch.setattr(step, "uniform", spy)  # the drafts' numbers ...
    monkeypatch.setattr(sampled, "uniform", spy)  # ... and their accept tests'
    model = build_tiny_model("llama", tok, seed=3)
    tested = redrafted = 0
    for seed in range(1, 13):
        calls.clear()
        sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", k_max=3, anchors=1,
                          max_batch=1, eos_ids=[], adaptive=False)  # fmt: skip
        params = SamplingParams(temperature=1.0, seed=seed)
        run_requests(sched, [Request("r", [11, 88, 125, 216, 217], 24, sampling=params)])
        drafted: list[int] = []
        keys: list[tuple[int, int]] = []
        for purpose, pos, at in calls:
            if purpose == DRAFT:
                drafted = pos
                keys += list(zip(pos, at))
            elif purpose == ACCEPT:  # the pending drafts: the last block drawn
                assert pos == drafted[: len(pos)], (seed, pos, drafted)
                tested += len(pos)
        assert len(set(keys)) == len(keys), seed  # no (position, anchor) drawn twice
        redrafted += len(keys) - len({p for p, _ in keys})
    assert tested > 50 and redrafted > 0  # drafts were tested, and some positions drafted again


def test_requests_admitted_together_keep_their_own_settings(tok):
    """Requests admitted in one step (their settings written for all of them at once) each
    decode with their own EOS ids, token budget, temperature, top-k and seed: the same tokens and
    finish reasons as each decoded alone."""
    model = chain_model(tok, attn_scale=4.0)
    prompts = [tok(t)["input_ids"] for t in ("hello p", "abc", "xx", "ijk")]
    greedy_alone = run_requests(
        Scheduler(model, tok.mask_token_id, policy="entropy", max_batch=1, eos_ids=[], k_max=8),
        [Request("g", prompts[0], 12)],
    )["g"][0]
    reqs = [
        Request("0", prompts[0], 12, eos_ids=[greedy_alone[5]]),  # stops on its 6th token
        Request("1", prompts[1], 7, sampling=SamplingParams(temperature=T, min_p=MIN_P, seed=5)),
        Request("2", prompts[2], 12, sampling=SamplingParams(temperature=0.7, top_k=3, seed=9)),
        Request("3", prompts[3], 3),
    ]

    def run(batch: int, group: list[Request]) -> dict[str, tuple[list[int], str]]:
        sched = Scheduler(
            model, tok.mask_token_id, policy="entropy", max_batch=batch, eos_ids=[], k_max=8
        )
        res = run_requests(sched, group)
        return {rid: (f.tokens, f.final.finish_reason) for rid, f in res.items()}

    alone = {}
    for r in reqs:
        alone.update(run(1, [r]))
    assert run(4, reqs) == alone
    assert alone["0"] == (greedy_alone[:6], "stop")
    assert len(alone["1"][0]) == 7 and len(alone["3"][0]) == 3


def test_greedy_logprobs_are_the_models(tok):
    model = build_tiny_model("llama", tok, seed=3)
    prompt = tok("hello world")["input_ids"]
    params = SamplingParams(logprobs=True, top_logprobs=3)
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=2, eos_ids=[], k_max=4)
    sched.submit(Request("a", prompt, 6, sampling=params))
    sched.submit(Request("b", prompt, 6))  # no logprobs asked: none returned
    tokens, lps, tops = [], [], []
    while sched.has_work():
        for ev in sched.step():
            if ev.request_id == "b":
                assert ev.logprobs is None and ev.top_logprobs is None
                continue
            tokens += ev.tokens
            lps += ev.logprobs
            tops += ev.top_logprobs
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    ref = logits.log_softmax(-1)
    for i, t in enumerate(tokens):
        assert lps[i] == pytest.approx(float(ref[i, t]), abs=1e-4)
        best = ref[i].topk(3)
        assert [tid for tid, _ in tops[i]] == best.indices.tolist()
        assert tops[i][0][0] == t  # greedy: the committed token is the best one
        assert [v for _, v in tops[i]] == pytest.approx(best.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "modules"])
def test_prompt_logprobs_are_the_models_whatever_the_chunks_and_batch(tok, lean):
    """``prompt_logprobs``: every prompt token after the first with its log-probability under the
    model (its own distribution, whatever the request's temperature) and its best alternatives,
    read from the prefill — equal to one plain forward however the prompt is cut into chunks,
    beside requests that ask nothing (in the same forwards) and a one-token prompt (nothing to
    score); only the request's first event carries them, and its output is unchanged."""
    model = build_tiny_model("llama", tok, seed=3)
    long = tok("the quick brown fox jumps over the lazy dog and then it ran away")["input_ids"]
    short = tok("hello world")["input_ids"]
    with torch.inference_mode():
        plain = {len(p): model(torch.tensor([p])).logits[0, :-1].float() for p in (long, short)}
    asks = {
        "long": (long, SamplingParams(prompt_logprobs=3)),
        "hot": (short, SamplingParams(prompt_logprobs=0, temperature=0.7, seed=1)),
        "quiet": (long, SamplingParams()),
        "one": (long[:1], SamplingParams(prompt_logprobs=2)),
    }
    for chunk in (512, 4):
        sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=4, eos_ids=[],
                          k_max=4, prefill_chunk=chunk, lean=lean)  # fmt: skip
        for rid, (p, sp) in asks.items():
            sched.submit(Request(rid, p, 5, sampling=sp))
        firsts: dict[str, list] = {}
        while sched.has_work():
            for ev in sched.step():
                if ev.request_id not in firsts:
                    firsts[ev.request_id] = ev.prompt_logprobs
                else:
                    assert ev.prompt_logprobs is None  # the first event only
        for rid in ("long", "hot"):
            prompt, params = asks[rid]
            ref = plain[len(prompt)].log_softmax(-1)  # (raw: a score, not a sampling setting)
            got = firsts[rid]
            assert len(got) == len(prompt) - 1
            for j, (lp, top, rank) in enumerate(got):
                assert lp == pytest.approx(float(ref[j, prompt[j + 1]]), abs=1e-4)
                assert rank == int((ref[j] >= ref[j, prompt[j + 1]]).sum())  # (vLLM's count)
                best = ref[j].topk(params.prompt_logprobs or 1)
                assert [t for t, _ in top] == best.indices.tolist()[: len(top)]
                assert len(top) == params.prompt_logprobs
                assert [v for _, v in top] == pytest.approx(best.values.tolist()[: len(top)],
                                                            abs=1e-4)  # fmt: skip
        assert firsts["quiet"] is None and firsts["one"] == []
        assert run_requests(
            Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=1, eos_ids=[],
                      k_max=4, lean=lean), [Request("x", long, 5)]
        )["x"].tokens == run_requests(
            Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=1, eos_ids=[],
                      k_max=4, lean=lean), [Request("x", long, 5, sampling=asks["long"][1])]
        )["x"].tokens  # fmt: skip


@torch.no_grad()
def _penalised_ar(model, prompt: list[int], n: int, rep=1.0, presence=0.0, frequency=0.0):
    """Plain AR decoding with the penalties' formulas (penalties.py), one token a forward."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1].float()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(seq)] = True
        count = torch.zeros_like(logits)
        for t in out:
            count[t] += 1
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - frequency * count - presence * (count > 0).float()
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


def test_penalties_are_the_penalised_ar_models_with_drafts_accepted(tok):
    """Repetition (transformers'), presence and frequency (OpenAI's) penalties: every committed
    token is the argmax of the penalised AR distribution — position j of a verify sees the drafts
    before it — on the chain model, whose drafts are accepted and whose "*" run the penalties
    break; beside unpenalised requests in the same batch, which keep their plain output."""
    model = chain_model(tok, attn_scale=4.0)
    cases = [dict(repetition_penalty=5.0), dict(frequency_penalty=1.5),
             dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.7)]  # fmt: skip
    for settings in cases:
        sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=3, eos_ids=[],
                          k_max=4, adaptive=False)  # fmt: skip
        prompts = {"xx": tok("xx")["input_ids"], "hello p": tok("hello p")["input_ids"]}
        reqs = [Request(f"pen {t}", p, 16, sampling=SamplingParams(**settings))
                for t, p in prompts.items()]  # fmt: skip
        reqs += [Request(f"plain {t}", p, 16) for t, p in prompts.items()]
        out = run_requests(sched, reqs)
        for text, prompt in prompts.items():
            want = _penalised_ar(model, prompt, 16, settings.get("repetition_penalty", 1.0),
                                 settings.get("presence_penalty", 0.0),
                                 settings.get("frequency_penalty", 0.0))  # fmt: skip
            assert out[f"pen {text}"].tokens == want, (settings, text)
            assert out[f"plain {text}"].tokens == _penalised_ar(model, prompt, 16)
        xx = out["pen xx"]
        assert xx.tokens != _penalised_ar(model, prompts["xx"], 16)  # the penalty changed it ...
        assert xx.final.forwards < 16  # ... while drafts were accepted
    # a penalised request that moves down a slot when the one below it ends keeps its counts
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=2, eos_ids=[],
                      k_max=4, adaptive=False)  # fmt: skip
    xx = tok("xx")["input_ids"]
    pen = Request("pen", xx, 16, sampling=SamplingParams(**cases[0]))
    out = run_requests(sched, [Request("short", xx, 2), pen])
    assert out["pen"].tokens == _penalised_ar(model, xx, 16, cases[0]["repetition_penalty"])


def test_logit_bias_is_added_before_the_penalties_at_every_verified_position(tok):
    """OpenAI's ``logit_bias``: each committed token is the argmax of the AR logits plus the
    bias, then penalised — on the chain model with drafts accepted, beside a plain request."""

    @torch.no_grad()
    def biased_ar(model, prompt, n, bias, rep):
        seq, out = list(prompt), []
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            for t, b in bias:
                logits[t] += b
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[torch.tensor(seq)] = True
            logits = torch.where(seen, torch.where(logits < 0, logits * rep, logits / rep), logits)
            out.append(int(logits.argmax()))
            seq.append(out[-1])
        return out

    model = chain_model(tok, attn_scale=4.0)
    xx = tok("xx")["input_ids"]
    plain = _penalised_ar(model, xx, 12)
    star = tok.convert_tokens_to_ids("*")
    for bias, rep in ((((plain[1], -100.0),), 1.0), (((star, -3.0), (65, 2.0)), 1.0),
                      (((plain[2], -100.0),), 2.0)):  # fmt: skip
        sched = Scheduler(model, tok.mask_token_id, policy="fixed:4", max_batch=2, eos_ids=[],
                          k_max=4, adaptive=False)  # fmt: skip
        params = SamplingParams(logit_bias=bias, repetition_penalty=rep)
        out = run_requests(sched, [Request("a", xx, 12, sampling=params), Request("b", xx, 12)])
        want = biased_ar(model, xx, 12, bias, rep)
        assert out["a"].tokens == want and out["b"].tokens == plain
        assert want != plain or out["a"].final.forwards < 12  # changed, or drafts accepted
    with pytest.raises(ConfigError, match="logit_bias token 99999 is outside the vocabulary"):
        sched.submit(Request("c", xx, 4, sampling=SamplingParams(logit_bias=((99999, 1.0),))))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_repetition_penalty_equals_transformers_generate(tok, arch):
    """``repetition_penalty`` through ``generate`` and a checkpoint's ``generation_config``
    (Qwen2.5-Instruct ships 1.05) decodes as transformers' greedy ``generate`` with it."""
    from transformers import GenerationConfig

    from fluid_npu.sampling import generate
    from fluid_npu.sampling.pretrained import FluidForCausalLM

    model = build_tiny_model(arch, tok, seed=3)
    prompts = [tok(t)["input_ids"] for t in ("hello there", "abc", "the quick brown fox")]
    fluid = FluidForCausalLM(model, tok, tok.mask_token_id)
    config = GenerationConfig(repetition_penalty=1.3, max_new_tokens=24)
    for prompt in prompts:
        ids = torch.tensor([prompt])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=24, min_new_tokens=24, repetition_penalty=1.3,
                              eos_token_id=None, pad_token_id=tok.pad_token_id)  # fmt: skip
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=24, min_new_tokens=24, eos_token_id=None,
                               pad_token_id=tok.pad_token_id)  # fmt: skip
        assert not torch.equal(want, plain)  # the penalty matters here
        got = fluid.generate(ids, policy="fixed:3", generation_config=config, eos_token_id=None)
        assert got.tolist() == want.tolist()
        assert generate(model, tok, ids, policy="ar", max_new_tokens=24, eos_token_id=[],
                        repetition_penalty=1.3).sequences.tolist() == want.tolist()  # fmt: skip


def test_min_new_tokens_keeps_eos_out_as_transformers_does(tok):
    """``min_new_tokens`` (vLLM's ``min_tokens``): no EOS before that many new tokens, also where
    the EOS sits inside a run of accepted drafts (the chain model ends "ijk" with "lm" + EOS);
    equal to transformers' ``generate(min_new_tokens=...)``, through ``generate`` and a
    ``generation_config``."""
    from transformers import GenerationConfig

    from fluid_npu.sampling import generate
    from fluid_npu.sampling.pretrained import FluidForCausalLM

    model = chain_model(tok, attn_scale=4.0)
    eos = tok.eos_token_id
    for text in ("ijk", "abc"):
        ids = torch.tensor([tok(text)["input_ids"]])
        for least in (0, 3, 11):
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=12, min_new_tokens=least, eos_token_id=eos,
                                pad_token_id=tok.pad_token_id)  # fmt: skip
            want = hf[0, ids.shape[1] :].tolist()
            want = want[: want.index(eos) + 1] if eos in want else want
            got = generate(model, tok, ids, policy="fixed:4", max_new_tokens=12, eos_token_id=eos,
                           min_new_tokens=least, engine_kwargs={"adaptive": False})  # fmt: skip
            assert got.new_tokens[0] == want, (text, least)
            assert least == 0 or eos not in want[:least]
    fluid = FluidForCausalLM(model, tok, tok.mask_token_id)
    ids = torch.tensor([tok("ijk")["input_ids"]])
    out = fluid.generate(ids, policy="fixed:4", generation_config=GenerationConfig(
        min_new_tokens=5, max_new_tokens=8))  # fmt: skip
    assert out.shape[1] - ids.shape[1] == 8 and eos not in out[0, ids.shape[1] :].tolist()[:5]
    # within one verify step: position j is new token produced + j (here the chain model's drafts
    # are never EOS, so the placement is checked on the adjustment itself)
    from fluid_npu.sampling.penalties import Penalties

    pen = Penalties(2, 10, torch.device("cpu"))
    pen.admit(0, [1, 2], SamplingParams(min_tokens=3))
    pen.admit(1, [1], SamplingParams(min_tokens=1))
    got = pen.apply(torch.zeros(2, 4, 10), torch.zeros(2, 3, dtype=torch.long),
                    torch.tensor([3, 3]), torch.tensor([0, 1]), produced=torch.tensor([1, 0]),
                    eos=torch.tensor([[7, -1], [7, 8]]))  # fmt: skip
    blocked = torch.isinf(got)
    assert blocked[0, :, 7].tolist() == [True, True, False, False]  # tokens 2 and 3 of 3
    assert blocked[1, :, 7].tolist() == blocked[1, :, 8].tolist() == [True, False, False, False]
    assert blocked.sum() == 4  # nothing else (the -1 padding touches no token)


def test_penalised_sampling_draws_the_same_alone_or_in_a_batch(tok):
    model = build_tiny_model("llama", tok, seed=3)
    prompt = tok("hello world")["input_ids"]
    params = SamplingParams(temperature=0.9, seed=4, repetition_penalty=1.4, presence_penalty=0.3)
    alone = run_requests(
        Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=1, eos_ids=[], k_max=4),
        [Request("a", prompt, 20, sampling=params)],
    )["a"].tokens
    others = [Request(f"o{i}", tok(t)["input_ids"], 20, sampling=SamplingParams(temperature=0.7))
              for i, t in enumerate(("abc", "the quick brown fox"))]  # fmt: skip
    batch = run_requests(
        Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=3, eos_ids=[], k_max=4),
        [others[0], Request("a", prompt, 20, sampling=params), others[1]],
    )["a"].tokens
    assert batch == alone


def test_bad_settings_name_the_field():
    for kwargs, words in (
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.01}, "min_p"),
        ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "logprobs=True"),
        ({"seed": 1 << 64}, "seed"),  # int64 tensors hold the seeds: one past them is refused
        ({"seed": -(1 << 63) - 1}, "seed"),
        ({"top_k": 1 << 63}, "top_k"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 1e39}, "repetition_penalty"),  # (float32 per slot: overflow)
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"temperature": float("inf")}, "temperature"),
        ({"logit_bias": ((5, 101.0),)}, "logit_bias"),
        ({"logit_bias": ((5, 1.0), (5, 2.0))}, "twice"),
        ({"logit_bias": ((5.7, 1.0),)}, "integer token ids"),
        ({"logit_bias": ((True, 1.0),)}, "integer token ids"),
        ({"logit_bias": (5,)}, "integer token ids"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logit_bias": tuple((i, 1.0) for i in range(301))}, "at most 300"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ):
        with pytest.raises(ConfigError, match=words):
            SamplingParams(**kwargs)
    # the ends of the range are fine, and a temperature too small to divide by decodes greedily
    assert SamplingParams(seed=-(1 << 63), top_k=(1 << 63) - 1).seed == -(1 << 63)
    assert SamplingParams(logit_bias={7: -100, 3: 2}).logit_bias == ((3, 2.0), (7, -100.0))
    tiny = SamplingParams(temperature=1e-40)
    assert tiny.greedy and tiny.temperature == 0.0
    assert not SamplingParams(temperature=1e-4).greedy


def test_seeds_at_the_ends_of_the_int64_range_decode(tok):
    """The engine writes seeds into int64 tensors on its own thread: every seed the checks let
    through must decode (a server request with a huge seed once stopped the engine for all)."""
    model = build_tiny_model("llama", tok, seed=3)
    prompt = tok("hello world")["input_ids"]
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=2, eos_ids=[], k_max=4)
    reqs = [
        Request(str(n), prompt, 5, sampling=SamplingParams(temperature=0.8, top_k=top_k, seed=s))
        for n, (s, top_k) in enumerate([((1 << 63) - 1, (1 << 63) - 1), (-(1 << 63), 0)])
    ]
    res = run_requests(sched, reqs)
    assert [len(res[r.request_id].tokens) for r in reqs] == [5, 5]


def test_uniforms_are_uniform_and_keyed():
    pos = torch.arange(20000)
    u = uniform(torch.tensor(7), pos, 0)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003
    assert torch.equal(u, uniform(torch.tensor(7), pos, 0))  # a pure function of its key
    other = uniform(torch.tensor(7), pos, 1)
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.03  # streams independent
    for far in (7 + (1 << 31), 7 + (1 << 40), 7 - (1 << 62)):  # every bit of the seed counts
        assert not torch.equal(u, uniform(torch.tensor(far), pos, 0)), far


@pytest.mark.parametrize("policy", ["ar", "fixed:4"])  # one token a step, several a step
def test_stop_strings_cut_as_transformers_does(tok, policy):
    model = chain_model(tok, attn_scale=4.0)
    prompt = tok("abc")["input_ids"]  # the chain continues d e f g h ...
    stops = ["fg", "zz"]
    sched = Scheduler(
        model, tok.mask_token_id, policy=policy, max_batch=2, eos_ids=[], k_max=8, tokenizer=tok
    )
    res = run_requests(sched, [Request("s", prompt, 20, stop=stops), Request("n", prompt, 20)])
    ours, event = res["s"].tokens, res["s"].final
    assert event.finish_reason == "stop" and tok.decode(ours).endswith("fg")
    assert len(res["n"][0]) == 20  # the other request is not stopped
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        hf = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=20,
            stop_strings=stops,
            tokenizer=tok,
            pad_token_id=tok.pad_token_id,
            eos_token_id=None,
        )
    assert ours == hf[0, len(prompt) :].tolist()


@pytest.mark.parametrize("step_tokens", [1, 3])
def test_stop_strings_made_of_multi_byte_characters_cut_at_the_completing_token(tok, step_tokens):
    """Byte-level tokens: a character takes several tokens (its text reads U+FFFD until the
    last), and a stop string of several such characters more tokens than it has characters; the
    engine cuts at the token that completes the stop string however the steps fall."""
    from fluid_npu.sampling.requests import Slot

    model = build_tiny_model("llama", tok, seed=3)
    sched = Scheduler(model, tok.mask_token_id, policy="ar", max_batch=1, tokenizer=tok)
    for stop in ("é", "日本語", "日本語中文字", "😀😀😀😀"):
        head = tok("ab" + stop, add_special_tokens=False)["input_ids"]
        stream = head + tok("cd", add_special_tokens=False)["input_ids"]
        slot = Slot(Request("0", [1], 100, stop=[stop]), [1])
        cut = None
        for i in range(0, len(stream), step_tokens):  # the tokens each step commits
            toks = stream[i : i + step_tokens]
            n = sched._stop_cut(slot, toks)
            if n is not None:
                cut = len(slot.new) + n
                break
            slot.new.extend(toks)
        assert cut == len(head), (stop, cut, len(head))
        assert tok.decode(stream[:cut]).endswith(stop)


def test_stop_strings_match_the_text_as_returned_special_tokens_skipped(tok):
    """A special token (here the MASK) is no text: a stop string does not match its spelling,
    and one that spans it matches as the returned text reads (the server's, vLLM's)."""
    from fluid_npu.sampling.requests import Slot

    model = build_tiny_model("llama", tok, seed=3)
    sched = Scheduler(model, tok.mask_token_id, policy="ar", max_batch=1, tokenizer=tok)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    stream = ids("ab") + [tok.mask_token_id] * 12 + ids("cd")
    for stop, cut in (("mask", None), ("<", None), ("bc", len(stream) - 1)):
        slot = Slot(Request("0", [1], 100, stop=[stop]), [1])
        found = None
        for t in stream:  # one token a step, as an AR step commits
            if sched._stop_cut(slot, [t]) is not None:
                found = len(slot.new) + 1
                break
            slot.new.append(t)
        assert found == cut, (stop, found)


def test_stop_strings_need_a_tokenizer(tok):
    model = build_tiny_model("llama", tok, seed=3)
    sched = Scheduler(model, tok.mask_token_id, policy="ar", max_batch=1)
    with pytest.raises(ConfigError, match="tokenizer"):
        sched.submit(Request("a", [1, 2], 4, stop=["x"]))


def test_generate_api_takes_transformers_sampling_settings(tok):
    from transformers import GenerationConfig

    from fluid_npu.sampling import generate
    from fluid_npu.sampling.pretrained import FluidForCausalLM

    model = chain_model(tok, attn_scale=4.0)
    ids = torch.tensor([tok("hello p")["input_ids"]] * 2)
    kw = dict(policy="fixed:4", max_new_tokens=8, eos_token_id=[], k_max=8)
    a = generate(model, tok, ids, do_sample=True, temperature=T, min_p=MIN_P, seed=7, **kw)
    b = generate(model, tok, ids[:1], do_sample=True, temperature=T, min_p=MIN_P, seed=7, **kw)
    c = generate(model, tok, ids[1:], do_sample=True, temperature=T, min_p=MIN_P, seed=8, **kw)
    assert a.new_tokens == [b.new_tokens[0], c.new_tokens[0]]  # row r is seeded seed + r
    greedy = generate(model, tok, ids[:1], temperature=T, **kw)  # do_sample=False: greedy
    assert greedy.new_tokens == generate(model, tok, ids[:1], **kw).new_tokens
    # min_p 1 (vLLM's and transformers' upper bound) keeps only the most likely token: sampling
    # with it, at any seed, is the greedy output
    for seed in (1, 2):
        top = generate(
            model, tok, ids[:1], do_sample=True, temperature=1.0, min_p=1.0, seed=seed, **kw
        )
        assert top.new_tokens == greedy.new_tokens
    one = torch.ones(1)
    probs = filtered_probs(torch.tensor([[0.5, 2.0, 2.0, -1.0]]), one, 0 * one.long(), one, one)
    assert probs.tolist() == [[0.0, 0.5, 0.5, 0.0]]  # (ties with the top stay)
    out = generate(model, tok, ids[:1], logprobs=True, top_logprobs=2, stop_strings="rs", **kw)
    assert out.finish_reasons == ["stop"] and tok.decode(out.new_tokens[0]).endswith("rs")
    assert len(out.logprobs[0]) == len(out.new_tokens[0]) == len(out.top_logprobs[0])
    with pytest.raises(ConfigError, match="fused loop"):
        generate(model, tok, ids[:1], loop="reference", stop_strings="x", **kw)
    fluid = FluidForCausalLM(model, tok, tok.mask_token_id)
    config = GenerationConfig(do_sample=True, temperature=T, top_k=0, min_p=MIN_P, max_new_tokens=8)
    seq = fluid.generate(
        ids[:1], generation_config=config, seed=7, eos_token_id=[], k_max=8, policy="fixed:4"
    )
    assert seq[0, ids.shape[1] :].tolist() == b.new_tokens[0]


def test_generate_is_a_drop_in_for_transformers_generate(tok):
    # what a transformers user relies on: settings the engine does not do are refused by name
    # (a GenerationConfig's too), sampling without top_k keeps transformers' 50, an unseeded call
    # follows torch's global generator, max_length must leave room, an explicit eos None is "no
    # EOS", and ids that are not one prompt or a batch of integer ids are refused
    from transformers import GenerationConfig

    from fluid_npu.sampling import generate
    from fluid_npu.sampling.inputs import PromptError
    from fluid_npu.sampling.pretrained import FluidForCausalLM

    model = build_tiny_model("llama", tok, seed=3)
    fluid = FluidForCausalLM(model, tok, tok.mask_token_id)
    ids = torch.tensor([tok("hello world")["input_ids"]])
    for bad, name in (
        (GenerationConfig(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
        (GenerationConfig(num_beams=2), "num_beams"),
        (GenerationConfig(do_sample=True, num_return_sequences=2), "num_return_sequences"),
        (GenerationConfig(encoder_repetition_penalty=1.2), "encoder_repetition_penalty"),
    ):
        with pytest.raises(ConfigError, match=name):
            fluid.generate(ids, generation_config=bad, max_new_tokens=4)
    with pytest.raises(ConfigError, match="max_length 5 leaves no room"):
        fluid.generate(ids, max_length=5)
    # no length asked for and a prompt that fills the context: named so (was "max_new_tokens is
    # 20", the default, which the caller never passed)
    full = ids[:, :1].expand(1, model.config.max_position_embeddings)
    with pytest.raises(PromptError, match=r"fills the model's context \(\d+ positions\): no room"):
        fluid.generate(full)
    for bad_ids in (ids[None], ids.float(), [[104.9, 101.2]], [[[5, 6]], [[7, 8]]]):
        with pytest.raises(PromptError, match="input_ids"):
            fluid.generate(bad_ids, max_new_tokens=2)
    # the model's own generation config (what save_pretrained writes) is accepted as it is
    assert fluid.generate(ids, generation_config=model.generation_config, max_new_tokens=3).shape[
        1
    ] == (ids.shape[1] + 3)

    # nearly flat distributions (a hot temperature): without top_k every token could come; with
    # transformers' default only the 50 most likely at the first step
    many = ids.expand(64, -1)
    with torch.inference_mode():
        top50 = set(model(input_ids=ids).logits[0, -1].topk(50).indices.tolist())
    kw = dict(max_new_tokens=1, eos_token_id=[], policy="ar")
    first = fluid.generate(many, do_sample=True, temperature=50.0, seed=1, **kw)[:, -1].tolist()
    assert set(first) <= top50 and len(set(first)) > 10
    wide = generate(model, tok, many, do_sample=True, temperature=50.0, top_k=0, seed=1, **kw)
    assert not {t[0] for t in wide.new_tokens} <= top50  # top_k=0 turns it off

    # unseeded sampling: torch.manual_seed reproduces a call, and calls differ
    kw = dict(max_new_tokens=6, eos_token_id=[], policy="ar", do_sample=True, temperature=5.0)
    torch.manual_seed(0)
    one = fluid.generate(ids.expand(4, -1), **kw)
    two = fluid.generate(ids.expand(4, -1), **kw)
    torch.manual_seed(0)
    again = fluid.generate(ids.expand(4, -1), **kw)
    assert torch.equal(one, again) and not torch.equal(one, two)

    # eos_token_id=None given: no EOS (transformers); not given: the model's
    chain = FluidForCausalLM(chain_model(tok, attn_scale=4.0), tok, tok.mask_token_id)
    abc = torch.tensor([tok("abc")["input_ids"]])  # ... l, m, then EOS
    stops = chain.generate(abc, max_new_tokens=20, policy="ar")
    assert stops[0, -1].item() == tok.eos_token_id and stops.shape[1] < abc.shape[1] + 20
    assert chain.generate(abc, max_new_tokens=20, policy="ar", eos_token_id=None).shape[1] == (
        abc.shape[1] + 20
    )


def test_a_stop_string_may_begin_in_the_prompt_as_transformers_reads_it(tok):
    # transformers' stop_strings read the whole sequence: "cd" after the prompt "abc" stops at the
    # first new token "d"; the OpenAI API (the server) matches stop strings in the output only
    from fluid_npu.sampling import generate

    model = chain_model(tok, attn_scale=4.0)
    prompt = tok("abc")["input_ids"]
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        hf = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
            stop_strings=["cd"], tokenizer=tok, pad_token_id=tok.pad_token_id, eos_token_id=None,
        )  # fmt: skip
    want = hf[0, len(prompt) :].tolist()
    assert tok.decode(want) == "d"
    out = generate(
        model, tok, ids, policy="fixed:4", max_new_tokens=10, eos_token_id=[], stop_strings="cd"
    )
    assert out.new_tokens == [want] and out.finish_reasons == ["stop"]
    sched = Scheduler(model, tok.mask_token_id, policy="ar", eos_ids=[], tokenizer=tok)
    served = run_requests(sched, [Request("s", prompt, 10, stop=["cd"])])["s"]
    assert len(served.tokens) == 10 and served.final.finish_reason == "length"
    # lm-eval's until, fluid eval and fluid generate --stop match in the output only
    out = generate(model, tok, ids, policy="ar", max_new_tokens=10, eos_token_id=[],
                   stop_strings="cd", stop_in_prompt=False)  # fmt: skip
    assert len(out.new_tokens[0]) == 10 and out.finish_reasons == ["length"]
