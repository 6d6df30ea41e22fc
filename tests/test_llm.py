"""vLLM's offline API on the engine (``sampling/llm.py``): ``LLM(...).generate`` / ``.chat`` with
vLLM's ``SamplingParams``, on the chain model (drafts accepted) saved as a checkpoint — greedy
outputs equal to ``fluid generate``'s, seeded copies reproducible, stop strings and stop tokens
with their ``stop_reason``, log-probabilities against transformers' forward, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from test_serve_live import PROMPTS, model_dir, offline  # noqa: F401 (a fixture)

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.llm import LLM, CompletionOutput, SamplingParams


@pytest.fixture(scope="module")
def llm(model_dir):  # noqa: F811
    return LLM(model_dir, max_num_seqs=4, max_model_len=160, seed=7)


def test_greedy_outputs_equal_fluid_generate(llm, model_dir, tmp_path):  # noqa: F811
    want = offline(model_dir, tmp_path, PROMPTS[:4], 40)
    outs = llm.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS[:4]
    for out, row in zip(outs, want):
        got = out.outputs[0]
        assert (got.text, got.token_ids, got.finish_reason) == (
            row["text"], row["token_ids"], row["finish_reason"])  # fmt: skip
        assert got.cumulative_logprob is None and got.logprobs is None
        assert out.prompt_token_ids == llm.tokenizer(out.prompt)["input_ids"]
    assert max(o.metrics["tpf"] for o in outs) > 1.5  # (the chain model's drafts are accepted)
    ids = llm.generate({"prompt_token_ids": outs[0].prompt_token_ids},
                       SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)  # fmt: skip
    assert ids[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_seeded_copies_stop_strings_and_stop_tokens(llm):
    drawn = SamplingParams(temperature=20.0, seed=11, n=3, max_tokens=24)  # (the chain is peaked)
    three = llm.generate("hello p", drawn, use_tqdm=False)[0].outputs
    assert [o.index for o in three] == [0, 1, 2] and len({o.text for o in three}) > 1
    alone = llm.generate("hello p", SamplingParams(temperature=20.0, seed=12, max_tokens=24),
                         use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert alone.token_ids == three[1].token_ids  # copy j draws with seed + j
    again = llm.generate(["x", "hello p"], drawn, use_tqdm=False)[1].outputs  # (another batch)
    assert [o.token_ids for o in again] == [o.token_ids for o in three]
    # the chain: "abc" -> "defghijklm" then EOS
    plain = llm.generate("abc", SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)
    assert plain[0].outputs[0].text == "defghijklm" and plain[0].outputs[0].stop_reason is None
    cut = SamplingParams(temperature=0, max_tokens=30, stop=["hij", "zz"])
    got = llm.generate("abc", cut, use_tqdm=False)[0].outputs[0]
    assert (got.text, got.finish_reason, got.stop_reason) == ("defg", "stop", "hij")
    assert llm.tokenizer.decode(got.token_ids) == "defghij"  # up to the token that completed it
    kept = SamplingParams(temperature=0, max_tokens=30, stop="hij", include_stop_str_in_output=True)
    assert llm.generate("abc", kept, use_tqdm=False)[0].outputs[0].text == "defghij"
    g = llm.tokenizer.convert_tokens_to_ids("g")
    on_token = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[g])
    got = llm.generate("abc", on_token, use_tqdm=False)[0].outputs[0]
    assert (got.text, got.token_ids[-1], got.stop_reason) == ("def", g, g)
    endless = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    got = llm.generate("abc", endless, use_tqdm=False)[0].outputs[0]
    assert len(got.token_ids) == 20 and got.finish_reason == "length"
    eos = llm.tokenizer.eos_token_id
    assert got.token_ids.index(eos) == 10  # (EOS ends nothing under ignore_eos) ...
    held = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, min_tokens=15)
    got = llm.generate("abc", held, use_tqdm=False)[0].outputs[0]
    assert eos not in got.token_ids[:15]  # ... but min_tokens holds it back, as vLLM


def test_logprobs_and_prompt_logprobs_are_the_models_own(llm):
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2, prompt_logprobs=1)
    out = llm.generate("hello p", params, use_tqdm=False)[0]
    got: CompletionOutput = out.outputs[0]
    ids = out.prompt_token_ids + got.token_ids
    with torch.inference_mode():
        ref = llm.fluid.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    start = len(out.prompt_token_ids)
    for j, (tok, entry) in enumerate(zip(got.token_ids, got.logprobs)):
        row = ref[start - 1 + j]
        assert entry[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4)
        assert entry[tok].rank == 1 and entry[tok].decoded_token == llm.tokenizer.decode([tok])
        assert len(entry) in (2, 3)  # the token and its two alternatives (itself among them)
    assert got.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(got.token_ids, got.logprobs))
    )
    prompt = out.prompt_logprobs
    assert prompt[0] is None and len(prompt) == start
    for j in range(1, start):
        tok = out.prompt_token_ids[j]
        assert prompt[j][tok].logprob == pytest.approx(float(ref[j - 1, tok]), abs=1e-4)
        assert prompt[j][tok].rank == int((ref[j - 1] >= ref[j - 1, tok]).sum())
    assert all(math.isfinite(e[t].logprob) for t, e in zip(got.token_ids, got.logprobs))


def test_a_truncated_text_keeps_its_bos_and_its_text(model_dir, tmp_path):  # noqa: F811
    """``truncate_prompt_tokens`` on a text whose tokenizer adds a BOS keeps the BOS and the
    text's last K - 1 tokens (vLLM's cut: the tokenizer's left truncation); the output's
    ``prompt`` stays the text as given; token ids are cut plainly."""
    import shutil

    from test_serve_token_ids import _bos_tokenizer

    path = tmp_path / "bos"
    shutil.copytree(model_dir, path)
    tok = _bos_tokenizer()
    tok.save_pretrained(path)
    bos_llm = LLM(str(path), max_num_seqs=2, max_model_len=160)
    text = "the quick brown fox"
    ids = tok(text)["input_ids"]
    bos = tok.convert_tokens_to_ids("<s>")
    assert bos_llm.tokenizer(text)["input_ids"] == ids and ids[0] == bos
    cut = SamplingParams(temperature=0, max_tokens=2, truncate_prompt_tokens=4)
    out = bos_llm.generate(text, cut, use_tqdm=False)[0]
    assert out.prompt_token_ids == [bos, *ids[-3:]] and out.prompt == text
    out = bos_llm.generate({"prompt_token_ids": ids}, cut, use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[-4:]
    with pytest.raises(ConfigError, match="no room for the prompt's text"):
        bos_llm.generate(text, SamplingParams(truncate_prompt_tokens=1), use_tqdm=False)


def test_chat_renders_as_the_server_and_refusals_name_the_problem(llm, model_dir):  # noqa: F811
    from fluid_npu.sampling.prompts import chat_template_ids

    talk = [{"role": "user", "content": "abc"}]
    out = llm.chat(talk, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    ids = chat_template_ids(llm.tokenizer, talk)
    assert out.prompt_token_ids == ids
    direct = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=8),
                          use_tqdm=False)[0]  # fmt: skip
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids
    two = llm.chat([talk, talk], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert len(two) == 2 and two[1].outputs[0].text == out.outputs[0].text
    cut = llm.generate("the quick brown fox", SamplingParams(temperature=0, max_tokens=4,
                       truncate_prompt_tokens=3), use_tqdm=False)[0]  # fmt: skip
    assert cut.prompt_token_ids == llm.tokenizer("the quick brown fox")["input_ids"][-3:]
    assert cut.prompt == "the quick brown fox"  # (the text as given, as vLLM's RequestOutput)
    with pytest.raises(TypeError, match="best_of"):
        SamplingParams(best_of=2)
    # more max_tokens than the context leaves: the output ends where it is full (vLLM's offline
    # engine); a prompt that fills it is refused
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    full = llm.generate({"prompt_token_ids": [5, 6, 7]}, long, use_tqdm=False)[0]
    assert len(full.outputs[0].token_ids) == 157 and full.outputs[0].finish_reason == "length"
    assert full.prompt is None  # (token ids given: no prompt text, as vLLM)
    with pytest.raises(
        ConfigError,
        match=r"prompt 0 has 160 tokens and leaves no room.*"
        r"raise LLM\(max_model_len=...\) up to the model's own context \(2048\)",
    ):
        llm.generate({"prompt_token_ids": [5] * 160}, long, use_tqdm=False)
    whole = LLM(model_dir, max_num_seqs=1)  # (its context: the model's own)
    with pytest.raises(ConfigError, match=r"holds 2048 \(max_model_len\): shorten it \(the model"):
        whole.generate({"prompt_token_ids": [5] * 2048}, long, use_tqdm=False)
    with pytest.raises(ConfigError, match="2 sampling_params for 1 prompts"):
        llm.generate("abc", [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(ConfigError, match="bad_words\\[0\\] is empty"):
        SamplingParams(bad_words=[" "])  # (when built, as vLLM checks it)
    for bad in (dict(n=0), dict(max_tokens=0), dict(truncate_prompt_tokens=0), dict(stop=[""])):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)
    banned = SamplingParams(temperature=0, max_tokens=6, bad_words=["ef"])
    text = llm.generate("abc", banned, use_tqdm=False)[0].outputs[0].text
    assert text.startswith("de") and "ef" not in text


def test_structured_outputs_hold_the_text(llm):
    from fluid_npu.sampling.llm import StructuredOutputsParams

    digits = SamplingParams(
        temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex="[0-9]{3}")
    )
    got = llm.generate("abc", digits, use_tqdm=False)[0].outputs[0]
    assert got.text.isdigit() and len(got.text) == 3 and got.finish_reason == "stop"
    pick = SamplingParams(
        temperature=0.8, seed=3, max_tokens=12, structured_outputs={"choice": ["yes", "no"]}
    )
    assert llm.generate("abc", pick, use_tqdm=False)[0].outputs[0].text in ("yes", "no")
    for bad, match in ((dict(ignore_eos=True), "ignore_eos"), (dict(), "exactly one of")):
        spec = {} if not bad else {"regex": "a+"}
        with pytest.raises(ConfigError, match=match):
            llm.generate("abc", SamplingParams(structured_outputs=spec, **bad), use_tqdm=False)


def test_vllm_scripts_numbers_and_bad_inputs(llm, monkeypatch):
    """What vLLM scripts pass (ints for floats, numpy scalars, whole floats for counts) works;
    bad inputs are one ConfigError naming them; an interrupt mid-call leaves the engine clean."""
    import numpy as np

    from fluid_npu.errors import FluidError

    ok = SamplingParams(temperature=1, top_p=1, min_p=np.float32(0.0), seed=2.0, max_tokens=4.0)
    assert (type(ok.temperature), type(ok.max_tokens), ok.seed) == (float, int, 2)
    assert len(llm.generate("abc", ok, use_tqdm=False)[0].outputs[0].token_ids) == 4
    for bad in (dict(logprobs=-2), dict(max_tokens=2.5), dict(temperature="0"),
                dict(allowed_token_ids=[])):  # fmt: skip
        with pytest.raises(ConfigError):
            SamplingParams(**bad)
    greedy = SamplingParams(temperature=0, max_tokens=4)
    for prompt in ({"prompt_token_ids": "123"}, {"prompt_token_ids": [5.7]}, {"prompt": 5},
                   {"prompt": "abc", "multi_modal_data": {}}, 7):  # fmt: skip
        with pytest.raises(ConfigError, match="prompt 0"):
            llm.generate(prompt, greedy, use_tqdm=False)
    with pytest.raises(ConfigError, match="takes a SamplingParams"):
        llm.generate("abc", {"temperature": 0}, use_tqdm=False)
    held = SamplingParams(temperature=0, max_tokens=None, min_tokens=200)  # (EOS held to the end)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, held, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 157 and out.finish_reason == "length"
    for bad, message in (
        (dict(stop=5), "SamplingParams.stop takes a string or a list of them, got 5"),
        (dict(stop_token_ids=5), "SamplingParams.stop_token_ids takes a list of token ids"),
        (dict(stop_token_ids=["5"]), "SamplingParams.stop_token_ids must be a whole number"),
        (dict(bad_words="ab"), "SamplingParams.bad_words takes a list of strings"),
        (dict(logit_bias=[(5, 1.0)]), "SamplingParams.logit_bias takes {token id: bias}"),
        (dict(structured_outputs="yes|no"), "structured_outputs takes StructuredOutputsParams"),
        (dict(top_p=0), "SamplingParams.top_p must lie in \\(0, 1\\]"),
        (dict(temperature=-1), "SamplingParams.temperature must be a finite number >= 0"),
        (dict(top_k=-2), "SamplingParams.top_k must lie in"),
    ):
        with pytest.raises(ConfigError, match=message):
            SamplingParams(**bad)
    # numpy integers inside lists and maps, as in single values
    ids = np.array([llm.tokenizer.convert_tokens_to_ids("d")])
    only = SamplingParams(temperature=0, max_tokens=2, allowed_token_ids=list(ids),
                          logit_bias={ids[0]: 1.0}, stop_token_ids=list(ids + 1))  # fmt: skip
    assert only.allowed_token_ids == [int(ids[0])] and type(only.allowed_token_ids[0]) is int
    out = llm.generate("abc", only, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [int(ids[0])] * 2
    # detokenize=False (vLLM's): the same tokens, no text, no decoded tokens; stop strings refused
    spelt = SamplingParams(temperature=0, max_tokens=5, logprobs=1)
    bare = SamplingParams(temperature=0, max_tokens=5, logprobs=1, detokenize=False)
    want, got = (llm.generate("abc", sp, use_tqdm=False)[0].outputs[0] for sp in (spelt, bare))
    assert got.token_ids == want.token_ids and want.text and got.text == ""
    assert [e[t].logprob for t, e in zip(got.token_ids, got.logprobs)] == [
        e[t].logprob for t, e in zip(want.token_ids, want.logprobs)
    ]
    assert all(lp.decoded_token is None for e in got.logprobs for lp in e.values())
    with pytest.raises(ConfigError, match="stop needs detokenize=True"):
        SamplingParams(stop=["x"], detokenize=False)
    # use_tqdm as vLLM's: a tqdm-like class to draw the bar with
    made = []

    class Bar:
        def __init__(self, **kwargs):
            made.append(kwargs["total"])

        def update(self, n):
            made.append(n)

        def close(self):
            made.append("closed")

    llm.generate(["abc", "de"], greedy, use_tqdm=Bar)
    assert made == [2, 1, 1, "closed"]
    with pytest.raises(ConfigError, match="chat_template_kwargs sets add_generation_prompt"):
        llm.chat([{"role": "user", "content": "hi"}], greedy, use_tqdm=False,
                 chat_template_kwargs={"add_generation_prompt": False})  # fmt: skip
    with pytest.raises(FluidError):
        llm.chat([{"role": "user", "content": "hi"}], greedy, use_tqdm=False,
                 tools=[{"name": "get"}])  # fmt: skip
    every = llm.generate("abc", SamplingParams(temperature=0, max_tokens=2, logprobs=-1),
                         use_tqdm=False)[0].outputs[0]  # fmt: skip
    vocab = llm.fluid.model.get_input_embeddings().weight.shape[0]
    assert all(len(entry) == vocab for entry in every.logprobs)  # -1: the whole vocabulary
    # an interrupt mid-call (Ctrl-C): the engine aborts what it held, the next call is as new
    real, calls = llm.engine.step, []

    def interrupted():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(llm.engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["abc", "hello p", "xx"], greedy, use_tqdm=False)
    monkeypatch.setattr(llm.engine, "step", real)
    assert not llm.engine.has_work()
    after = llm.generate(["abc", "xx"], greedy, use_tqdm=False)
    assert after[0].outputs[0].text == "defg"


def test_a_sampled_tokens_rank_is_its_own(llm):
    """vLLM's ``Logprob.rank`` of every output token (the tokens at least as likely), sampled ones
    outside the alternatives included, against transformers' forward."""
    params = SamplingParams(temperature=20.0, seed=5, max_tokens=8, logprobs=0)
    out = llm.generate("hello p", params, use_tqdm=False)[0]
    got = out.outputs[0]
    ids = out.prompt_token_ids + got.token_ids
    with torch.inference_mode():
        ref = llm.fluid.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    start = len(out.prompt_token_ids)
    ranks = [e[t].rank for t, e in zip(got.token_ids, got.logprobs)]
    want = [int((ref[start - 1 + j] >= ref[start - 1 + j, t]).sum())
            for j, t in enumerate(got.token_ids)]  # fmt: skip
    assert ranks == want and max(ranks) > 1  # (drawn at temperature 20: not always the argmax)


def test_priority_and_lora_request_as_vllm_takes_them(model_dir):  # noqa: F811
    """``generate(priority=[...])`` with ``LLM(scheduling_policy="priority")``: with one slot,
    the lowest value runs first (each output unchanged); ``lora_request`` None only."""
    one = LLM(model_dir, max_num_seqs=1, max_model_len=160, scheduling_policy="priority")
    greedy = SamplingParams(temperature=0, max_tokens=4)
    prompts = ["abc", "xx", "ijk"]
    alone = [one.generate(p, greedy, use_tqdm=False)[0].outputs[0].text for p in prompts]
    finished: list[str] = []
    step = one.engine.step

    def watched():
        events = step()
        finished.extend(ev.request_id.split("-")[0] for ev in events if ev.finished)
        return events

    one.engine.step = watched
    outs = one.generate(prompts, greedy, use_tqdm=False, priority=[5, 1, 3])
    assert [o.outputs[0].text for o in outs] == alone
    which = {o.request_id: k for k, o in enumerate(outs)}
    assert [which[rid] for rid in finished] == [1, 2, 0]  # priorities 1, 3, 5
    with pytest.raises(ConfigError, match="lora_request is not supported"):
        one.generate("abc", greedy, use_tqdm=False, lora_request=object())
    with pytest.raises(ConfigError, match="2 priorities for 3 prompts"):
        one.generate(prompts, greedy, use_tqdm=False, priority=[1, 2])
    with pytest.raises(ConfigError, match="priority"):
        LLM(model_dir, max_num_seqs=1).generate("abc", greedy, use_tqdm=False, priority=[1])


def test_get_metrics_reads_as_vllms(model_dir):  # noqa: F811
    """``llm.get_metrics()`` as vLLM's speculative-decoding example reads it: the drafts
    verified, those accepted and by position (each position accepted only after the one before
    it), and the mean acceptance length 1 + accepted / drafts (above 1: the chain model's drafts
    are accepted), counted over every call."""
    from fluid_npu.sampling.llm import Counter, Gauge, Vector

    llm = LLM(model_dir, max_num_seqs=4, max_model_len=160, engine_kwargs={"adaptive": False})
    greedy = SamplingParams(temperature=0, max_tokens=24)  # (fixed blocks: every step drafts)
    llm.generate(PROMPTS[3:5], greedy, use_tqdm=False)

    def read() -> dict:
        return {m.name: m for m in llm.get_metrics()}

    before = read()
    llm.generate(PROMPTS[:3], greedy, use_tqdm=False)
    got = read()
    assert isinstance(got["vllm:num_requests_running"], Gauge)
    assert got["vllm:num_requests_running"].value == 0 == got["vllm:num_requests_waiting"].value
    drafts, drafted, accepted = (
        got[f"vllm:spec_decode_num_{n}"] for n in ("drafts", "draft_tokens", "accepted_tokens")
    )
    assert all(isinstance(c, Counter) for c in (drafts, drafted, accepted))
    assert drafts.labels == {"model_name": model_dir}
    assert drafts.value > before["vllm:spec_decode_num_drafts"].value  # (counted over calls)
    assert 0 < accepted.value <= drafted.value
    assert 1 + accepted.value / drafts.value > 1.5
    per_pos = got["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert isinstance(per_pos, Vector) and len(per_pos.values) >= llm.engine.k
    assert sum(per_pos.values) == accepted.value and per_pos.values[0] <= drafts.value
    assert per_pos.values == sorted(per_pos.values, reverse=True)


def test_a_full_context_names_why_the_context_is_what_it_is(tmp_path):
    """A prompt that leaves no room is told to raise max_model_len only where that helps: a
    sliding window's context is the window less the draft slots, whatever max_model_len says."""
    from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("mistral", tok, seed=3, sliding_window=64, max_position_embeddings=512)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), max_num_seqs=1)
    full = {"prompt_token_ids": [5] * llm.engine.max_len}
    with pytest.raises(ConfigError, match=r"shorten it \(the sliding attention window of 64") as e:
        llm.generate(full, SamplingParams(max_tokens=2), use_tqdm=False)
    assert "raise LLM(max_model_len" not in str(e.value)
