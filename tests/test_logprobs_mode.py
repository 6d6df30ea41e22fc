"""What a request's logprobs hold under each ``logprobs_mode`` (vLLM's ``--logprobs-mode``).

Every committed token's reported value and its best alternatives are checked against transformers'
own forward over the prompt and the output so far, processed by transformers' own logits
processors (repetition penalty, temperature, top-k) for the ``processed_*`` modes: ``raw_*`` is the
model's distribution whatever the request's settings, ``processed_*`` the one the token was chosen
from — for a greedy row the penalty alone (no temperature, no filters, as vLLM).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_grammar import model, tok  # noqa: F401  (the tiny Llama and its tokenizer)
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.api import generate
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.requests import LOGPROBS_MODES
from fluid_npu.sampling.rules import SamplingParams, filtered_probs, kept_tokens
from fluid_npu.sampling.scheduler import Request, Scheduler

PENALTY, TEMPERATURE, TOP_K, N_TOP = 1.3, 0.7, 2, 3  # N_TOP > TOP_K: one alternative is dropped


def _reference(model, prompt, tokens, mode, sampled):  # noqa: F811
    """Per output position: what ``mode`` reports, from transformers' forward and processors."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    out = []
    for i, row in enumerate(logits):
        scores = row[None]
        if mode.startswith("processed"):
            seen = torch.tensor([prompt + tokens[:i]])
            steps = [RepetitionPenaltyLogitsProcessor(PENALTY)]
            if sampled:
                steps += [TemperatureLogitsWarper(TEMPERATURE), TopKLogitsWarper(TOP_K)]
            scores = LogitsProcessorList(steps)(seen, scores)
        out.append(scores[0] if mode.endswith("logits") else scores[0].log_softmax(-1))
    return out


@pytest.mark.parametrize("mode", LOGPROBS_MODES)
def test_each_mode_reports_its_distribution(tok, model, mode):  # noqa: F811
    prompt = tok("hello world")["input_ids"]
    wants = dict(logprobs=True, top_logprobs=N_TOP, repetition_penalty=PENALTY)
    params = {
        "sampled": SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, seed=4, **wants),
        "greedy": SamplingParams(**wants),
    }
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=2, eos_ids=[],
                      k_max=4, logprobs_mode=mode)  # fmt: skip
    reqs = [Request(name, prompt, 8, sampling=p) for name, p in params.items()]
    done = run_requests(sched, reqs)
    for name, fin in done.items():
        tokens, lps, tops = fin.tokens, fin.logprobs, fin.top_logprobs
        assert len(tokens) == len(lps) == len(tops) == 8
        ref = _reference(model, prompt, tokens, mode, sampled=name == "sampled")
        for i, t in enumerate(tokens):
            assert lps[i] == pytest.approx(float(ref[i][t]), abs=1e-4), (name, i)
            values = [v for _, v in tops[i]]
            best = ref[i].topk(N_TOP)
            assert values == pytest.approx(best.values.tolist(), abs=1e-4), (name, i)
            finite = [tid for tid, v in tops[i] if math.isfinite(v)]
            assert finite == best.indices.tolist()[: len(finite)]
        dropped = [v for top in tops for _, v in top if not math.isfinite(v)]
        # a sampled row's processed top-3 holds the alternative top-k 2 dropped, at -inf
        filtered = name == "sampled" and mode.startswith("processed")
        assert dropped == ([-math.inf] * len(tokens) if filtered else []), name


def test_raw_logprobs_are_the_default_and_the_reference_loop_has_none(tok, model):  # noqa: F811
    assert Scheduler(model, tok.mask_token_id, max_batch=1).logprobs_mode == "raw_logprobs"
    ids = [tok("hello")["input_ids"]]
    # through generate: the same seeded tokens, their logits over the temperature when processed
    got = {}
    for mode in ("raw_logits", "processed_logits"):
        out = generate(model, tok, ids, policy="fixed:3", max_new_tokens=4, logprobs=True,
                       do_sample=True, temperature=0.5, seed=1, logprobs_mode=mode)  # fmt: skip
        got[mode] = (out.new_tokens[0], out.logprobs[0])
    assert got["processed_logits"][0] == got["raw_logits"][0]
    assert got["processed_logits"][1] == pytest.approx([2 * v for v in got["raw_logits"][1]])
    with pytest.raises(ConfigError, match="logprobs_mode 'logits' is not one of raw_logprobs"):
        Scheduler(model, tok.mask_token_id, max_batch=1, logprobs_mode="logits")
    with pytest.raises(ConfigError, match="use loop='fused'"):
        generate(model, tok, ids, loop="reference", logprobs_mode="raw_logits")
    with pytest.raises(ConfigError, match="differ; give one"):
        generate(model, tok, ids, logprobs=True, logprobs_mode="raw_logits",
                 engine_kwargs={"logprobs_mode": "processed_logits"})  # fmt: skip


def test_a_filter_that_is_off_drops_nothing(tok, model):  # noqa: F811
    """Top-p at 1, top-k and min-p at 0 keep every token, however unlikely (float32 mass that
    rounds to 1 and probabilities that underflow used to drop the tail): ``processed`` logprobs
    of a peaked distribution report the tail's own values; a filter that is on still drops."""
    logits = torch.randn(4, 3, 300) * 5
    logits[..., 7] += 60  # (every other token's probability underflows in float32)
    ones, zeros = torch.ones(4), torch.zeros(4)
    keep, scores = kept_tokens(logits, ones, zeros.long(), ones, zeros)
    assert keep.all() and torch.equal(scores, logits)
    keep, _ = kept_tokens(logits, ones, torch.full((4,), 5), torch.full((4,), 0.5), zeros)
    assert keep.sum(-1).eq(1).all()  # (top-p 0.5 keeps the one token holding the mass)
    assert kept_tokens(logits, ones, torch.full((4,), 5), ones, zeros)[0].sum(-1).eq(5).all()
    prompt = tok("hello world")["input_ids"]
    params = SamplingParams(temperature=1.0, seed=2, logit_bias=((7, 40.0),), logprobs=True,
                            top_logprobs=N_TOP)  # fmt: skip
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=1, eos_ids=[],
                      k_max=4, logprobs_mode="processed_logprobs")  # fmt: skip
    fin = run_requests(sched, [Request("b", prompt, 4, sampling=params)])["b"]
    assert fin.tokens == [7] * 4
    with torch.inference_mode():
        ref = model(torch.tensor([prompt + fin.tokens])).logits[0, len(prompt) - 1 : -1].float()
        ref = (ref + 40.0 * (torch.arange(ref.shape[-1]) == 7)).log_softmax(-1)
    for i, top in enumerate(fin.top_logprobs):
        best = ref[i].topk(N_TOP)
        assert [t for t, _ in top] == best.indices.tolist()
        assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-3)
        assert all(math.isfinite(v) for _, v in top)


def test_as_many_alternatives_as_the_vocabulary_and_no_more(tok, model):  # noqa: F811
    """No fixed cap in the engine (the server's is ``--max-logprobs``): every token's
    log-probability comes back when asked, and more than the vocabulary is refused at submit."""
    vocab = model.get_input_embeddings().weight.shape[0]
    prompt = tok("hello")["input_ids"]
    every = SamplingParams(logprobs=True, top_logprobs=vocab, prompt_logprobs=vocab)
    sched = Scheduler(model, tok.mask_token_id, policy="fixed:3", max_batch=1, eos_ids=[], k_max=4)
    fin = run_requests(sched, [Request("all", prompt, 3, sampling=every)])["all"]
    for top in [*fin.top_logprobs, *(alt for _, alt, _ in fin.prompt_logprobs)]:
        assert sorted(t for t, _ in top) == list(range(vocab))
        assert math.fsum(math.exp(v) for _, v in top) == pytest.approx(1.0, abs=1e-4)
    for more in ({"top_logprobs": vocab + 1}, {"top_logprobs": 0, "prompt_logprobs": vocab + 1}):
        params = SamplingParams(logprobs=True, **more)
        with pytest.raises(ConfigError, match=f"more than the vocabulary's {vocab} tokens"):
            sched.submit(Request("x", prompt, 3, sampling=params))


def test_a_nan_logit_leaves_nothing_to_draw():
    """A row with a NaN logit is all NaN after the filters (no filter decides on NaN), so the
    engine ends such a request as an overflow instead of drawing from what is left."""
    logits = torch.tensor([[1.0, float("nan"), 0.5, 0.2], [1.0, 0.3, 0.5, 0.2]])
    ones, zeros = torch.ones(2), torch.zeros(2)
    for k in (0, 3):
        probs = filtered_probs(logits, ones, torch.full((2,), k), ones, zeros)
        assert probs[0].isnan().all() and torch.isfinite(probs[1]).all()
