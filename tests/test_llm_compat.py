"""vLLM's ``LLM`` surface beyond the engine (``sampling/llm_compat.py``): the constructor keywords
a vLLM script passes — accepted where they change nothing, warned about where they tune vLLM's own
engine, refused by name otherwise —, the model's generation config read as vLLM reads it,
``max_logprobs``, ``chat``'s vLLM options, numpy token ids, and the other tasks' methods."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from test_llm import llm  # noqa: F401 (a fixture)
from test_serve_live import model_dir  # noqa: F401 (a fixture)

from fluid_npu.errors import ConfigError, DataError
from fluid_npu.sampling.llm import LLM, SamplingParams, TokensPrompt

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def test_vllm_constructor_keywords_get_an_answer(model_dir, llm):  # noqa: F811
    # what a vLLM script passes at values that change nothing: the same outputs, no warning
    neutral = dict(
        tokenizer=str(model_dir), tokenizer_mode="auto", revision=None, quantization=None,
        kv_cache_dtype="auto", enable_lora=False, pipeline_parallel_size=1, hf_overrides=None,
        speculative_config=None, compilation_config={"level": 0}, generation_config="auto",
        model_impl="auto", config_format="hf", logits_processors=None, dtype="float",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = LLM(model_dir, max_num_seqs=2, max_model_len=160, **neutral)
    want = llm.generate(["abc", "hello p"], GREEDY, use_tqdm=False)
    got = plain.generate(["abc", "hello p"], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    # vLLM's own scheduler / memory settings: accepted, named in one warning
    with pytest.warns(UserWarning, match="max_num_batched_tokens, swap_space.*change nothing"):
        LLM(model_dir, max_num_seqs=1, max_model_len=160, swap_space=4,
            max_num_batched_tokens=8192)  # fmt: skip
    # a value that would change something here: refused by name, before the model loads
    for kwargs, words in (
        ({"tokenizer": "gpt2"}, "tokenizer='gpt2': the tokenizer is the model's own"),
        ({"quantization": "awq"}, "quantization='awq'"),
        ({"enable_lora": True}, "adapter=DIR"),
        ({"speculative_config": {"method": "eagle"}}, "no draft model"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
        ({"compilation_config": {"level": 3}}, "enforce_eager=False"),
        ({"pipeline_parallel_size": 2}, "one device"),
        ({"revision": "main"}, "nothing is downloaded"),
        ({"generation_config": "/some/dir"}, "generation_config '/some/dir': cannot read it"),
        ({"logits_processors": [object]}, "logits_processor.*logit_bias"),
        ({"model_impl": "vllm"}, "model_impl='vllm'"),
        ({"override_generation_config": {"do_sample": True}}, "'do_sample' is not a setting"),
        ({"override_generation_config": {"temperature": "hot"}}, "temperature takes a number"),
        ({"served_model_name": ""}, "served_model_name takes a non-empty name"),
        ({"max_model_len": -1}, r"LLM\(max_model_len=-1\): give a whole number"),
        ({"max_model_len": "64"}, r"LLM\(max_model_len='64'\)"),
        ({"max_num_seqs": 2.5}, r"LLM\(max_num_seqs=2.5\)"),
    ):
        with pytest.raises(ConfigError, match=words):
            LLM("/no/such/model", **kwargs)
    from fluid_npu.sampling.llm_compat import check_vllm_keywords

    # tokenizer= the adapter's own folder (what loads with an adapter) is the model's own too
    read = check_vllm_keywords({"tokenizer": "a/adapter"}, "a/base", "a/adapter")
    assert read["generation_config"] == "auto"
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_num_seq'"):
        LLM(model_dir, max_num_seq=2)  # (a misspelling stays Python's TypeError)


def test_generation_config_as_vllm_reads_it(model_dir, tmp_path):  # noqa: F811
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    (copy / "generation_config.json").write_text(
        json.dumps({"max_new_tokens": 3, "temperature": 0.5, "top_k": 7})
    )
    auto = LLM(copy, max_num_seqs=1, max_model_len=160).get_default_sampling_params()
    assert (auto.max_tokens, auto.temperature, auto.top_k) == (3, 0.5, 7)
    own = LLM(copy, max_num_seqs=1, max_model_len=160, generation_config="vllm")
    assert own.get_default_sampling_params() == SamplingParams()
    # or a folder's generation_config.json (vLLM's third choice), read as the server reads it
    (tmp_path / "gc").mkdir()
    (tmp_path / "gc" / "generation_config.json").write_text(json.dumps({"temperature": 0.2}))
    folder = LLM(copy, max_num_seqs=1, max_model_len=160, generation_config=str(tmp_path / "gc"))
    assert folder.get_default_sampling_params() == SamplingParams(temperature=0.2)
    # override_generation_config: set over the chosen config, "vllm" included (as vLLM's);
    # served_model_name: the metrics' model_name
    over = {"temperature": 0.3, "max_new_tokens": 5}
    both = LLM(copy, max_num_seqs=1, max_model_len=160, override_generation_config=over,
               served_model_name=["mine", "other"])  # fmt: skip
    got = both.get_default_sampling_params()
    assert (got.max_tokens, got.temperature, got.top_k) == (5, 0.3, 7)
    assert {m.labels["model_name"] for m in both.get_metrics()} == {"mine"}
    bare = LLM(copy, max_num_seqs=1, max_model_len=160, generation_config="vllm",
               override_generation_config={"top_p": 0.5})  # fmt: skip
    assert bare.get_default_sampling_params() == SamplingParams(top_p=0.5)


def test_max_logprobs_chat_options_numpy_ids_and_other_tasks(llm, model_dir):  # noqa: F811
    capped = LLM(model_dir, max_num_seqs=1, max_model_len=160, max_logprobs=2)
    two = capped.generate("abc", SamplingParams(temperature=0, max_tokens=3, logprobs=2),
                          use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert all(len(entry) >= 2 for entry in two.logprobs)
    for asked in (dict(logprobs=3), dict(logprobs=-1), dict(prompt_logprobs=5)):
        with pytest.raises(ConfigError, match=r"max_logprobs=2"):
            capped.generate("abc", SamplingParams(max_tokens=3, **asked), use_tqdm=False)
    # chat(): vLLM's lora_request None and the "string" content format (text parts joined)
    talk = [{"role": "user", "content": [{"type": "text", "text": "abc"}]}]
    want = llm.chat(talk, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    got = llm.chat(talk, GREEDY, use_tqdm=False, lora_request=None,
                   chat_template_content_format="string")[0].outputs[0].token_ids  # fmt: skip
    assert got == want
    with pytest.raises(ConfigError, match="chat_template_content_format"):
        llm.chat(talk, GREEDY, use_tqdm=False, chat_template_content_format="openai")
    with pytest.raises(ConfigError, match="lora_request"):
        llm.chat(talk, GREEDY, use_tqdm=False, lora_request=object())
    with pytest.raises(DataError, match=r"conversation 0: messages\[0\] has role 'bot'; a "):
        llm.chat([{"role": "bot", "content": "x"}], GREEDY, use_tqdm=False)
    # token ids as numpy integers, in vLLM's TokensPrompt
    ids = llm.tokenizer("abc")["input_ids"]
    first = llm.generate(TokensPrompt(prompt_token_ids=ids), GREEDY, use_tqdm=False)
    again = llm.generate({"prompt_token_ids": list(np.array(ids))}, GREEDY, use_tqdm=False)
    assert again[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    for method, words in (
        (llm.beam_search, "beam_search.*SamplingParams"), (llm.embed, "embed.*fluid\\(ids\\)"),
        (llm.score, "prompt_logprobs"), (llm.sleep, "sleep"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            method(["abc"])


def test_vllm_spellings_of_params_and_errors_that_name_the_prompt(llm):  # noqa: F811
    """vLLM's ``seed=-1`` (no seed), ``logprobs=True`` (one), a structured-outputs spec checked
    when built; an engine's refusal of a request names the prompt as given, and the ``LLM``
    keyword to change, not the engine's request id or setting."""
    assert SamplingParams(seed=-1).seed is None
    assert (SamplingParams(logprobs=True).logprobs, SamplingParams(prompt_logprobs=True)
            .prompt_logprobs) == (1, 1)  # fmt: skip
    hot = SamplingParams(temperature=5.0, seed=-1, max_tokens=8)
    outs = {tuple(llm.generate("abc", hot, use_tqdm=False)[0].outputs[0].token_ids)
            for _ in range(4)}  # fmt: skip
    assert len(outs) > 1  # (random each call, as without a seed)
    from fluid_npu.sampling.llm import StructuredOutputsParams

    for kinds in ({}, {"regex": "a", "choice": ["b"]}):
        with pytest.raises(ConfigError, match="exactly one of"):
            StructuredOutputsParams(**kinds)
    vocab = llm.fluid.model.get_input_embeddings().weight.shape[0]
    far = SamplingParams(max_tokens=2, logit_bias={vocab + 5: 1.0})
    with pytest.raises(ConfigError) as err:
        llm.generate(["abc", "hello p"], [SamplingParams(max_tokens=2), far], use_tqdm=False)
    assert "prompt 1" in str(err.value) and "request '" not in str(err.value)
    with pytest.raises(ConfigError, match=r'needs LLM\(scheduling_policy="priority"\)'):
        llm.generate("abc", SamplingParams(max_tokens=2), priority=[1], use_tqdm=False)
