"""Lossless in bf16 too: divergences from transformers' greedy ``generate`` are only near-ties.

Both decoders run in bf16 on the CPU; every first difference is re-scored by a float32 copy of the
model and must be a tie at bf16's resolution (``lossless.compare``). A swapped token that is not
tied must be caught, so the check cannot pass by construction.
"""

from __future__ import annotations

import pytest
import torch

from fluid_npu.errors import NumericalError
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling import generate
from fluid_npu.sampling.lossless import compare, exact_match_rate, hf_greedy, resolution
from fluid_npu.sampling.prompts import left_pad

TEXTS = ("hello world", "a", "the quick brown fox", "lorem ipsum dolor")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


def test_resolution_is_the_dtype_spacing():
    assert resolution(torch.bfloat16, 16.0) == 0.125
    assert resolution(torch.bfloat16, 17.5) == 0.125
    assert resolution(torch.float16, 1.0) == 2.0**-10
    assert resolution(torch.float32, 1.0) == 2.0**-23


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_bf16_divergences_are_near_ties(arch, tok):
    model = build_tiny_model(arch, tok, seed=7).to(torch.bfloat16)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    max_new = 16
    ref_b4 = hf_greedy(model, ids, mask, max_new, [], tok.pad_token_id)
    for policy in ("ar", "fixed:3", "entropy:6"):
        out = generate(
            model, tok, ids, mask, policy=policy, max_new_tokens=max_new, eos_token_id=[]
        )
        diffs = compare(model, prompts, out.new_tokens, ref_b4)
        assert all(d.tie for d in diffs), (arch, policy, diffs)
        assert exact_match_rate(out.new_tokens, ref_b4) == 1 - len(diffs) / len(prompts)
        for p, new in zip(prompts, out.new_tokens):  # batch 1
            one = torch.tensor([p])
            ref_b1 = hf_greedy(model, one, torch.ones_like(one), max_new, [], tok.pad_token_id)
            alone = generate(
                model, tok, one, policy=policy, max_new_tokens=max_new, eos_token_id=[]
            )
            assert all(d.tie for d in compare(model, [p], alone.new_tokens, ref_b1))
            assert all(d.tie for d in compare(model, [p], alone.new_tokens, [new]))


def test_a_real_difference_is_not_excused_in_bf16(tok):
    model = build_tiny_model("llama", tok, seed=3).to(torch.bfloat16)
    p = tok("hello world")["input_ids"]
    ref = hf_greedy(model, torch.tensor([p]), torch.ones(1, len(p)), 4, [], 0)[0]
    with torch.inference_mode():
        logits = model.float()(input_ids=torch.tensor([p])).logits[0, -1]
    model.to(torch.bfloat16)
    worst = int(logits.argmin())  # the least likely token: no tie with the argmax
    diffs = compare(model, [p], [[worst, *ref[1:]]], [ref])
    assert len(diffs) == 1 and not diffs[0].tie and diffs[0].gap > diffs[0].tolerance > 0


def test_one_fp32_copy_serves_every_check_of_a_run(tok, monkeypatch):
    """``fluid eval`` / ``bench`` judge every policy with one scorer: a bf16 model is copied to
    fp32 once for the run, not once per policy that diverges (a 7B model's copy is ~28 GB)."""
    from fluid_npu.sampling import lossless

    model = build_tiny_model("llama", tok, seed=3).to(torch.bfloat16)
    copies = []
    original = lossless.copy.deepcopy

    def deepcopy(x, *rest):
        copies.extend([1] if x is model else [])
        return original(x, *rest)

    monkeypatch.setattr(lossless.copy, "deepcopy", deepcopy)
    p = tok("hello world")["input_ids"]
    ref = hf_greedy(model, torch.tensor([p]), torch.ones(1, len(p)), 4, [], 0)[0]
    other = (ref[0] + 1) % model.config.vocab_size
    scorer = lossless.fp32_scorer(model)
    for _policy in range(3):
        assert len(compare(model, [p], [[other, *ref[1:]]], [ref], scorer=scorer)) == 1
    assert len(copies) == 1


def _overflowing(tok, on: str) -> torch.nn.Module:
    """A float16 tiny Llama where the token ``on`` has a massive activation: its residual passes
    65504 in layer 0 (inf in float16, in transformers as in the engine); other tokens stay
    finite."""
    model = build_tiny_model("llama", tok, seed=5)
    z = tok.convert_tokens_to_ids(on)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[z] = 0.0
        emb[z, 0] = 30000.0
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[0, 0] = 30.0
        mlp.up_proj.weight[0, 0] = 30.0
        mlp.down_proj.weight[:, 0] = 2.0
    return model.to(torch.float16)


def _engine(model, tok, prompts, policy, max_new=12, **sampling):
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.rules import SamplingParams
    from fluid_npu.sampling.scheduler import Request, Scheduler

    params = SamplingParams(**sampling) if sampling else None
    sched = Scheduler(model, tok.mask_token_id, policy=policy, max_batch=1, eos_ids=[], k_max=4)
    try:
        reqs = [Request(str(i), p, max_new, sampling=params) for i, p in enumerate(prompts)]
        out = run_requests(sched, reqs)
    finally:
        sched.close()
    return [out[str(i)].tokens for i in range(len(prompts))]


@pytest.mark.parametrize("policy", ["ar", "fixed:4"])
def test_a_float16_overflow_stays_in_its_own_request(policy, tok):
    # the overflowing request ends as "error" (transformers decodes NaN there) and leaves its slot
    # to the next one: nothing of it may leak (a NaN key or value kept in the slot cache poisons
    # every query that merely has it in range)
    from fluid_npu.sampling.scheduler import Request, Scheduler

    model = _overflowing(tok, "Z")
    bad = tok("a long request Z that overflows")["input_ids"]
    good = tok("hello world")["input_ids"]
    with torch.inference_mode():
        assert not model(input_ids=torch.tensor([bad])).logits.isfinite().all()
    ids = torch.tensor([good])
    ref = hf_greedy(model, ids, torch.ones_like(ids), 12, [], tok.pad_token_id)[0]
    assert _engine(model, tok, [good], policy) == [ref]
    sched = Scheduler(model, tok.mask_token_id, policy=policy, max_batch=1, eos_ids=[], k_max=4)
    for rid, p in (("bad", bad), ("good", good)):  # the same slot, one after the other
        sched.submit(Request(rid, p, 12))
    events = []
    while sched.has_work():
        events += sched.step()
    sched.close()
    final = {e.request_id: e for e in events if e.finished}
    assert final["bad"].finish_reason == "error"
    assert [t for e in events if e.request_id == "good" for t in e.tokens] == ref
    with pytest.raises(NumericalError, match=r"request\(s\) \[0\].*overflowed"):
        _engine(model, tok, [bad, good], policy)


def test_a_float16_overflow_on_the_mask_token_leaves_the_committed_tokens_alone(tok):
    # drafts are MASK slots: one that overflows is rejected like any wrong draft, and its keys and
    # values (masked for the main tokens) must not reach them
    model = _overflowing(tok, tok.mask_token)
    good = [tok(t)["input_ids"] for t in TEXTS]
    for p in good:
        ids = torch.tensor([p])
        ref = hf_greedy(model, ids, torch.ones_like(ids), 12, [], tok.pad_token_id)[0]
        assert _engine(model, tok, [p], "fixed:4") == [ref]
        # the reference loop keeps rejected MASK slots in its cache as hidden entries, which
        # still reach every query as 0 * NaN unless stored as zeros (it decoded 0s before)
        out = generate(
            model, tok, ids, policy="fixed:4", loop="reference", max_new_tokens=12,
            eos_token_id=[], k_max=4,
        )  # fmt: skip
        assert out.sequences[0, ids.shape[1] :].tolist() == ref


@pytest.mark.parametrize("policy", ["ar", "fixed:4"])
def test_the_reference_loop_keeps_a_main_tokens_own_overflow_as_transformers_does(policy, tok):
    # only hidden entries (MASK slots, padding) are stored as zeros: a prompt token that overflows
    # poisons its row as in transformers' generate, never turns into plausible other tokens
    model = _overflowing(tok, "Z")
    ids = torch.tensor([tok("a long request Z that overflows")["input_ids"]])
    ref = hf_greedy(model, ids, torch.ones_like(ids), 12, [], tok.pad_token_id)[0]
    out = generate(
        model, tok, ids, policy=policy, loop="reference", max_new_tokens=12, eos_token_id=[],
        k_max=4,
    )  # fmt: skip
    assert out.sequences[0, ids.shape[1] :].tolist() == ref


def test_sampling_from_nan_is_an_error_not_a_token(tok):
    # transformers' sampling refuses NaN / inf probabilities; the engine ends that request (no
    # token drawn from NaN) and run_requests says why, naming the request and the fix
    from fluid_npu.errors import NumericalError

    model = _overflowing(tok, "Z")
    bad = tok("Z")["input_ids"]
    with pytest.raises(NumericalError, match=r"request\(s\) \[0\].*NaN or inf.*bfloat16"):
        _engine(model, tok, [bad], "ar", temperature=0.8, seed=1)
    good = tok("hello world")["input_ids"]  # a finite request samples as before
    assert len(_engine(model, tok, [good], "ar", temperature=0.8, seed=1)[0]) == 12


def test_a_rejected_draft_that_overflows_does_not_fail_the_request(tok):
    # only the distribution a step draws from must be finite: MASK slots that propose the
    # overflowing token (rejected: it is outside the top 10) leave the request as it was
    z, mask, d = tok.convert_tokens_to_ids("Z"), tok.mask_token_id, 5
    model = _overflowing(tok, "Z").float()
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, d] = 0.0
        emb[mask, d] = 40.0  # MASK slots carry a dimension nothing else writes ...
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[d] = 0.0
            layer.mlp.down_proj.weight[d] = 0.0
        head = model.lm_head.weight
        head[z] = 0.0
        head[z, d] = 30.0  # ... which makes them draft "Z"
    model = model.to(torch.float16)
    prompt = tok("hello world")["input_ids"]
    out = _engine(model, tok, [prompt], "fixed:4", temperature=1.0, top_k=10, seed=1)
    assert len(out[0]) == 12 and z not in out[0]
