"""``fluid real run`` end to end on a tiny model, in seconds: distill, Stage I, Stage II, gold NLL,
the TPF curve, every decoder against transformers' ``generate``, the report; then reuse.

The tiny base stands in for SmolLM2: a ChatML tokenizer with two special tokens nothing uses (so the
MASK comes from the unused-special rule, as SmolLM2's ``<empty_output>`` does) and a random Llama
initialised widely enough that its greedy answers vary and often end with EOS.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AddedToken

from fluid_npu.cli import main
from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.real.measure import (
    ALWAYS,
    ForwardCounter,
    _fluid_decode,
    chat_ids,
    gold_ids,
    gold_nll,
)

ROWS = [
    {
        "question": f"Tom has {a} pens and buys {b} more. How many?",
        "answer": f"{a}+{b}\n#### {a + b}",
    }
    for a, b in ((3, 4), (5, 6), (7, 1), (2, 9))
]
BUDGET = [
    "--distill-questions", "24", "--distill-tokens", "24", "--stage1-steps", "4",
    "--batch-size", "2", "--save-every", "2", "--stage2-steps", "2", "--curve-prompts", "2",
    "--curve-tokens", "8", "--nll-problems", "4", "--eval-problems", "3",
    "--max-new-tokens", "12", "--threads", "1",
]  # fmt: skip


def tiny_real_base(out):
    tok = build_tiny_tokenizer()
    unused = [
        AddedToken(t, special=True, normalized=False) for t in ("<repo_name>", "<empty_output>")
    ]
    tok.add_tokens(unused, special_tokens=True)
    model = build_tiny_model("llama", tok, seed=0, initializer_range=0.2)
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    data = out / "data"
    data.mkdir(parents=True)
    (data / "gsm8k_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return model, tok


def test_gold_nll_scores_only_the_solution_and_the_turn_end():
    tok = build_tiny_tokenizer()
    model = build_tiny_model("llama", tok, seed=0)
    ids, start = gold_ids(tok, ROWS[0])
    assert tok.decode(ids[start:]) == ROWS[0]["answer"] + "<|im_end|>"
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    x = torch.tensor([ids])
    with torch.inference_mode():
        logp = model(x).logits[0].log_softmax(-1)
    expected = -sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids))) / (len(ids) - start)
    result = gold_nll(model, tok, ROWS[:1])
    assert result["nll"] == pytest.approx(expected, rel=1e-5)
    assert result["tokens"] == len(ids) - start


def test_forward_counter_counts_generate_forwards():
    tok = build_tiny_tokenizer()
    model = build_tiny_model("llama", tok, seed=0)
    x = torch.tensor([[5, 6, 7]])
    with ForwardCounter(model) as fc, torch.inference_mode():
        model.generate(x, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert fc.count == 5  # the prompt's forward yields the first token, then one per token


def test_real_run_end_to_end_then_reuses_every_stage(tmp_path, capsys):
    out = tmp_path / "real"
    tiny_real_base(out)
    argv = ["real", "run", "--out", str(out), *BUDGET]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    f = summary["figures"]
    # the same MASK in Stage I, Stage II and the sampler, from the unused-special rule
    assert f["mask_token"] == {k: "<empty_output>" for k in ("stage1", "stage2", "sampler")}
    assert f["mask_token_same"] and f["lossless"]
    decode = json.loads((out / "eval" / "decode.json").read_text())
    names = set(decode["decoders"])
    policies = ("fixed:4", "entropy", "khead")
    assert names == {"generate", "prompt_lookup", "base generate"} | {
        f"fluid {p}{suffix}" for p in policies for suffix in ("", ALWAYS)
    }
    samples = decode["samples"]
    for name, r in decode["decoders"].items():
        if name != "base generate":
            assert r["identical_to_generate"] == 1.0, name
        assert r["tpf"] > 0 and r["new_tokens"] > 0
        # the decoder's totals are the per-sample scores the report lists, summed
        assert r["correct"] == sum(s[name]["correct"] for s in samples), name
        assert r["accuracy"] == r["correct"] / len(samples) and len(samples) == decode["n"]
        assert r["new_tokens"] == sum(s[name]["new_tokens"] for s in samples), name
    assert decode["decoders"]["generate"]["tpf"] == pytest.approx(1.0)
    assert f["nll_rows"] == len(ROWS) and f["base_nll"] > 0 and f["stage1_nll"] > 0
    assert f["nll_ratio"] == pytest.approx(f["stage1_nll"] / f["base_nll"])
    curve = json.loads((out / "eval" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2, 4]
    assert curve["adaptive"] is False  # the curve shows what the slots draft, budget off
    assert set(summary["goals"]) == {
        "nll_ratio", "lossless", "best_tpf", "tpf_vs_prompt_lookup", "speed_vs_generate"
    }  # fmt: skip
    report = (out / "report.md").read_text()
    for part in (
        "## Goals", "TPF against Stage I steps", "prompt_lookup", "<empty_output>",
        "`always drafting` (the budget off", "the draft budget is off (every step drafts)",
    ):  # fmt: skip
        assert part in report
    for plot in ("loss_curves", "tpf_vs_steps", "decoders"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 0
    assert summary["machine"]["torch_threads"] == 1

    capsys.readouterr()
    assert main(argv) == 0  # everything reused
    assert capsys.readouterr().out.count("done, reused") == 6
    assert main([*argv, "--max-new-tokens", "13"]) == 2  # other settings: one error


def test_fluid_decoders_run_with_the_draft_budget_and_without(tmp_path, monkeypatch):
    """The TPF figures (curve, `always drafting` rows) must show what the slots can draft, which
    the engine's draft budget hides where drafts do not pay: those decodes turn it off."""
    from fluid_npu.real.pipeline import _load_fluid
    from fluid_npu.sampling.scheduler import Scheduler

    out = tmp_path / "real"
    tiny_real_base(out)
    fluid = _load_fluid(out / "base", None)
    seen = []
    init = Scheduler.__init__

    def spy(self, *args, adaptive=True, **kwargs):
        seen.append(adaptive)
        init(self, *args, adaptive=adaptive, **kwargs)

    monkeypatch.setattr(Scheduler, "__init__", spy)
    ids = chat_ids(fluid.tokenizer, ROWS[0]["question"])
    end = fluid.tokenizer.convert_tokens_to_ids("<|im_end|>")  # SmolLM2's pad is its EOS, which
    for config in (fluid.model.config, fluid.model.generation_config):  # every chat turn holds
        config.pad_token_id = config.eos_token_id = end
    assert end in ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on = _fluid_decode(fluid, ids, 8, "fixed:4")
        off = _fluid_decode(fluid, ids, 8, "fixed:4", adaptive=False)
    assert not [w for w in caught if "attention_mask" in str(w.message)]  # (the run's own calls)
    assert seen == [True, False]
    assert on["tokens"] == off["tokens"]  # lossless either way
    # the two keep separate draft budgets: the budget-off decode never feeds the default one
    assert sorted(key[1] for key in fluid.draft_budgets) == [False, True]


def test_real_run_without_prepared_assets_is_one_error(tmp_path, capsys):
    assert main(["real", "run", "--out", str(tmp_path / "none")]) == 2
    assert "fluid real prepare" in capsys.readouterr().err
