"""``fluid serve``'s request fields beyond decoding, without a server: OpenAI's chat tags and
features (``openai_fields.py``), ``stream_options``, vLLM's stop extras, what counts as an empty
prompt, and completions' ``top_logprobs``."""

from __future__ import annotations

import typing

import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params
from openai.types.chat.chat_completion_stream_options_param import (
    ChatCompletionStreamOptionsParam,
)
from test_serve_unit import USER, _err

from fluid_npu.sampling.inputs import PromptError
from fluid_npu.sampling.prompts import empty_prompt, encode_prompt
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.generation import encode_prompts
from fluid_npu.serve.protocol import (
    ChatBody,
    CompletionBody,
    StreamOptions,
    parse_chat,
    parse_completion,
)
from fluid_npu.serve.responses import Shape
from fluid_npu.serve.text import TokenText, completion_ids


def test_every_field_the_openai_client_sends_is_known():
    """No field of the installed client's ``create`` is an "unknown field" (a 400 before the
    neutral-value checks): chat, completions, stream_options."""
    chat = typing.get_type_hints(chat_params.CompletionCreateParamsBase)
    completion = typing.get_type_hints(completion_params.CompletionCreateParamsBase)
    stream = typing.get_type_hints(ChatCompletionStreamOptionsParam)
    assert set(chat) - set(ChatBody.model_fields) == set()
    assert set(completion) - set(CompletionBody.model_fields) == set()
    assert set(stream) - set(StreamOptions.model_fields) == set()


def test_openai_chat_tags_are_accepted_and_change_nothing():
    plain = parse_chat({"messages": USER}).sampling
    tags = {
        "metadata": {"k" * 64: "v" * 512, **{str(i): "" for i in range(15)}},
        "store": True, "service_tier": "flex", "prompt_cache_key": "abc",
        "prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "explicit", "ttl": "30m"},
        "safety_identifier": "u1", "user": "u1",
        # features at their neutral value (null: the OpenAI client's "not given")
        "modalities": ["text"], "verbosity": "medium", "functions": [], "function_call": "none",
        **dict.fromkeys(("audio", "prediction", "web_search_options", "reasoning_effort",
                         "moderation"))
    }  # fmt: skip
    assert parse_chat({"messages": USER, **tags}).sampling == plain
    assert parse_chat({"messages": USER, **dict.fromkeys(tags)}).sampling == plain


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("modalities", ["text", "audio"], 'send ["text"]'),
        ("verbosity", "low", "verbosity"),
        ("reasoning_effort", "low", "chat_template_kwargs"),
        ("functions", [{"name": "f"}], "as tools"),
        ("function_call", "auto", "tool_choice"),
        ("audio", {"format": "wav", "voice": "alloy"}, "no audio"),
        ("prediction", {"type": "content", "content": "x"}, "predicted output"),
        ("web_search_options", {}, "searches nothing"),
        ("moderation", {"model": "omni-moderation-latest"}, "moderation"),
        ("metadata", {str(i): "v" for i in range(17)}, "up to 16 pairs"),
        ("metadata", {"k" * 65: "v"}, "keys up to 64"),
        ("metadata", {"k": "v" * 513}, "values up to 512"),
        ("metadata", {"k": 1}, "valid string"),
        ("service_tier", "gold", "'auto'"),
        ("store", "yes", "boolean"),
    ],
)
def test_openai_chat_features_are_a_400_naming_them_unless_neutral(field, value, words):
    err = _err(parse_chat, {"messages": USER, field: value})
    assert err.param == field and words in err.message, err.message


def test_stream_options():
    for route in (parse_chat, parse_completion):

        def body(head=({"messages": USER} if route is parse_chat else {"prompt": "a"}), **given):
            return {**head, "stream": True, "stream_options": given}

        s = route(body(include_usage=True, include_obfuscation=False)).sampling
        assert (s.include_usage, s.continuous_usage) == (True, False)
        assert route(body(include_obfuscation=True)).sampling.include_usage is False
        s = route(body(continuous_usage_stats=True)).sampling  # (include_usage on: vLLM's default)
        assert (s.include_usage, s.continuous_usage) == (True, True)
        err = _err(route, body(include_usage=False, continuous_usage_stats=True))
        assert err.param == "stream_options.continuous_usage_stats"
        err = _err(route, body(frobnicate=1))
        assert err.param == "stream_options.frobnicate"  # an unknown one is still refused


def test_vllm_stop_extras():
    extras = {"stop_token_ids": [7, 3, 7], "include_stop_str_in_output": True,
              "skip_special_tokens": True}  # fmt: skip
    s = parse_completion({"prompt": "a", **extras}).sampling
    assert (s.stop_token_ids, s.include_stop) == ((7, 3), True)  # (each id once)
    plain = parse_chat({"messages": USER}).sampling
    assert (plain.stop_token_ids, plain.include_stop) == ((), False)
    for body, param, words in [
        ({"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids", "up to 64"),
        ({"stop_token_ids": [5], "response_format": {"type": "json_object"}}, "stop_token_ids",
         "grammar"),
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output", "boolean"),
    ]:  # fmt: skip
        err = _err(parse_chat, {"messages": USER, **body})
        assert err.param == param and words in err.message, err.message


class _BosTokenizer:
    """A tokenizer that adds a BOS (id 1) before a text's bytes."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [1, *(b + 3 for b in text.encode())]}

    def __len__(self) -> int:
        return 259


def test_a_prompt_is_empty_only_where_it_encodes_to_no_tokens(tokenizer):
    """vLLM's rule: whitespace is a prompt, and ``""`` too where the tokenizer adds a BOS; a
    text of no tokens is a 400 (``fluid generate`` reads a prompts file alike)."""
    tok = tokenizer  # (conftest's tiny tokenizer, with a MASK token)
    for text in (" ", "\n", "  \t", ""):
        assert parse_completion({"prompt": text}).prompts == [text]
    assert completion_ids(tok, " ") == tok(" ")["input_ids"] != []
    assert completion_ids(_BosTokenizer(), "") == [1]
    err = _err(lambda p: completion_ids(tok, p), "")
    assert err.param == "prompt" and "encodes to no tokens" in err.message
    with pytest.raises(APIError, match=r"prompt\[1\]: the prompt is empty: it encodes to no"):
        encode_prompts(tok, ["a", ""])
    assert encode_prompts(tok, ["a", "\n"]) == [tok("a")["input_ids"], tok("\n")["input_ids"]]
    # fluid generate: only ids or messages are empty before a tokenizer reads them
    assert not empty_prompt({"prompt": " "}) and not empty_prompt({"prompt": ""})
    assert empty_prompt({"input_ids": []}) and empty_prompt({"messages": []})
    assert encode_prompt(tok, {"prompt": " "}, where="p").ids == tok(" ")["input_ids"]
    with pytest.raises(PromptError, match="p: the prompt is empty: it encodes to no tokens"):
        encode_prompt(tok, {"prompt": ""}, where="p")


def test_completion_top_logprobs_hold_the_token_and_its_alternatives(tokenizer):
    """OpenAI's "up to logprobs + 1" (as vLLM): each position's token first, then the best
    alternatives; ``logprobs: 0`` the token alone; echo's prompt tokens alike (the first null).
    Chat's ``top_logprobs`` stay the alternatives alone."""
    tok = tokenizer  # (conftest's tiny tokenizer, with a MASK token)
    words = TokenText(tok)
    a, b, c = (tok.convert_tokens_to_ids(x) for x in "abc")
    entries = [(a, None, None), (b, -3.0, [(c, -0.1)]), (c, -0.1, [(c, -0.1), (a, -4.0)]),
               (a, -5.0, [])]  # fmt: skip
    lp = Shape(False, "c", "m", words).logprobs(entries)
    assert lp["top_logprobs"] == [None, {"b": -3.0, "c": -0.1}, {"c": -0.1, "a": -4.0},
                                  {"a": -5.0}]  # fmt: skip
    assert all(t in top for t, top in zip(lp["tokens"][1:], lp["top_logprobs"][1:]))
    chat = Shape(True, "c", "m", words).logprobs(entries[1:])
    alternatives = [[x["token"] for x in e["top_logprobs"]] for e in chat["content"]]
    assert alternatives == [["c"], ["c", "a"], []]
