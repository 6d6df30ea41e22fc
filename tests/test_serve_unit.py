"""``fluid serve`` pieces without a server: request checks (one 400 naming the field), prompt and
chat encoding, the incremental detokenizer with stop strings, response bodies."""

from __future__ import annotations

import json

import pytest

from fluid_npu.model.tiny import build_tiny_tokenizer
from fluid_npu.sampling.prompts import encode_prompt
from fluid_npu.serve.protocol import APIError, parse_chat, parse_completion
from fluid_npu.serve.responses import Shape, usage
from fluid_npu.serve.text import Detokenizer, chat_ids, completion_ids

USER = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(mask_token=True)


def _err(fn, body) -> APIError:
    with pytest.raises(APIError) as info:
        fn(body)
    assert info.value.status == 400
    return info.value


def test_completion_defaults_and_sampling_settings():
    req = parse_completion({"model": "m", "prompt": "hi", "n": 1})
    assert req.prompt == "hi"
    s = req.sampling
    assert s.max_tokens == 16  # OpenAI's completions default
    assert s.stop == [] and not s.stream
    greedy = dict(temperature=0, top_p=1, top_k=0, min_p=0, seed=None, logprobs=False)
    assert s.params == {**greedy, "top_logprobs": 0}
    s = parse_completion(
        {"prompt": "hi", "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 3,
         "logprobs": 0}
    ).sampling  # fmt: skip
    assert s.params == dict(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=3, logprobs=True,
                            top_logprobs=0)  # logprobs 0: the chosen tokens' only  # fmt: skip
    s = parse_chat({"messages": USER, "logprobs": True, "top_logprobs": 3}).sampling
    assert s.params["logprobs"] and s.params["top_logprobs"] == 3
    req = parse_completion(
        {"prompt": [[5, 6]], "max_tokens": 3, "stop": "x", "seed": 7, "stream": True,
         "stream_options": {"include_usage": True}, "ignore_eos": True}
    )  # fmt: skip
    assert req.prompt == [5, 6] and req.sampling.max_tokens == 3
    assert req.sampling.stop == ["x"] and req.sampling.include_usage and req.sampling.ignore_eos


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": "a", "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"prompt": "a", "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "a", "top_k": -1}, "top_k", "greater than or equal to 0"),
        ({"prompt": "a", "min_p": 1.0}, "min_p", "less than 1"),
        ({"prompt": "a", "n": 2}, "n", "one request per completion"),
        ({"prompt": "a", "best_of": 3}, "best_of", "1 or absent"),
        ({"prompt": "a", "logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"prompt": "a", "echo": True}, "echo", "false"),
        ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty", "0 or absent"),
        ({"prompt": "a", "logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
        ({"prompt": "a", "stop": [""]}, "stop", "non-empty"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "a", "max_tokens": "5"}, "max_tokens", "valid integer"),
        ({"prompt": "a", "frobnicate": 1}, "frobnicate", "unknown field 'frobnicate'"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
        ({"prompt": [1, -2]}, "prompt", "non-negative"),
        ({"max_tokens": 3}, "prompt", "required"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ],
)
def test_completion_errors_name_the_field(body, param, words):
    err = _err(parse_completion, body)
    assert err.param == param
    assert words in err.message
    assert err.body()["error"]["param"] == param
    assert err.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0]"),
        ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": USER, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": USER, "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
        ("not an object", None),
    ],
)  # fmt: skip
def test_chat_errors_name_the_field(body, param):
    err = _err(parse_chat, body)
    if param is not None:
        assert err.param is not None and err.param.startswith(param)


def test_chat_parts_and_default_length():
    req = parse_chat(
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": [{"type": "text", "text": "a"},
                                                   {"type": "text", "text": "b"}]}],
         "max_completion_tokens": 5}
    )  # fmt: skip
    assert req.messages[1] == {"role": "user", "content": "ab"}
    assert req.sampling.max_tokens == 5
    assert parse_chat({"messages": [{"role": "user", "content": "x"}]}).sampling.max_tokens is None


def test_prompt_encoding_matches_fluid_generate(tok):
    assert completion_ids(tok, "hello") == encode_prompt(tok, {"prompt": "hello"}).ids
    assert completion_ids(tok, [5, 6, 7]) == [5, 6, 7]
    with pytest.raises(APIError) as info:
        completion_ids(tok, [len(tok) + 3])
    assert info.value.param == "prompt" and "outside the vocabulary" in info.value.message
    one = chat_ids(tok, [{"role": "user", "content": "hi"}])
    assert one == encode_prompt(tok, {"prompt": "hi"}, chat=True).ids
    rendered = tok.decode(chat_ids(tok, [{"role": "system", "content": "s"},
                                         {"role": "user", "content": "u"}]))  # fmt: skip
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>system\ns" in rendered
    plain = build_tiny_tokenizer(mask_token=True, chat_template=False)
    with pytest.raises(APIError, match="no chat template"):
        chat_ids(plain, [{"role": "user", "content": "hi"}])


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_detokenizer_streams_the_decoded_text(tok):
    ids = [*_ids(tok, "héllo wörld"), tok.eos_token_id]
    d = Detokenizer(tok)
    out = "".join(d.add([t]) for t in ids) + d.flush()
    assert out == "héllo wörld" == tok.decode(ids, skip_special_tokens=True)
    d = Detokenizer(tok)
    first = d.add(ids[:2])  # 'h' and the first byte of 'é': the half character is held back
    assert first == "h"
    assert d.tokens_used == 2


def test_detokenizer_stop_strings(tok):
    ids = _ids(tok, "one two. three")
    d = Detokenizer(tok, stop=[". t", "zz"])
    pieces = [d.add(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    assert "".join(pieces) + d.flush() == "one two"  # the stop string itself is not returned
    assert d.stopped
    assert d.tokens_used == len(_ids(tok, "one two. t"))  # up to the token completing the stop
    assert d.add(_ids(tok, "more")) == ""
    d = Detokenizer(tok, stop=["xyz"])  # never matched: everything comes out, the tail at the end
    streamed = d.add(ids)
    assert streamed == "one two. thr" and streamed + d.flush() == "one two. three"


def test_response_shapes():
    use = usage(4, 6, 3)
    assert use == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10,
                   "forwards": 3, "tpf": 2.0}  # fmt: skip
    chat = Shape(True, "chatcmpl-1", "m")
    body = chat.full("hi", "stop", use)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    first = json.loads(chat.chunk("", role=True).removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = json.loads(chat.chunk(None, "length", use).removeprefix("data: "))
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": "length"}  # fmt: skip
    assert last["usage"] == use
    comp = Shape(False, "cmpl-1", "m")
    assert json.loads(comp.usage_chunk(use)[6:])["choices"] == []
    assert comp.full("x", "length", use)["choices"][0]["text"] == "x"
