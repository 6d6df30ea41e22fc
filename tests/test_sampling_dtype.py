"""Lossless in bf16 too: divergences from transformers' greedy ``generate`` are only near-ties.

Both decoders run in bf16 on the CPU; every first difference is re-scored by a float32 copy of the
model and must be a tie at bf16's resolution (``lossless.compare``). A swapped token that is not
tied must be caught, so the check cannot pass by construction.
"""

from __future__ import annotations

import pytest
import torch

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
