"""``fluid serve`` pieces without a server: request checks (one 400 naming the field), prompt and
chat encoding, the incremental detokenizer with stop strings, response bodies."""

from __future__ import annotations

import json

import pytest
from sentencepiece_like import byte_fallback_tokenizer

from fluid_npu.model.tiny import build_tiny_tokenizer
from fluid_npu.sampling.detok import Detokenizer
from fluid_npu.sampling.prompts import encode_prompt
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.protocol import parse_chat, parse_completion
from fluid_npu.serve.responses import Shape, usage
from fluid_npu.serve.text import TokenText, chat_ids, completion_ids

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
    assert req.prompts == ["hi"]
    s = req.sampling
    assert s.max_tokens == 16  # OpenAI's completions default
    assert s.stop == [] and not s.stream
    left_out = dict(temperature=None, top_p=None, top_k=None, min_p=None, seed=None,
                    repetition_penalty=None, presence_penalty=0.0,
                    frequency_penalty=0.0, logit_bias=(), min_tokens=0,
                    allowed_token_ids=())  # fmt: skip
    assert s.params == {**left_out, "logprobs": False, "top_logprobs": 0, "prompt_logprobs": None}
    assert not s.echo
    s = parse_completion(
        {"prompt": "hi", "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 3,
         "logprobs": 0, "repetition_penalty": 1.1, "presence_penalty": -0.5,
         "frequency_penalty": 2}
    ).sampling  # fmt: skip
    assert s.params == dict(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=3, logprobs=True,
                            top_logprobs=0, prompt_logprobs=None, repetition_penalty=1.1,
                            presence_penalty=-0.5, frequency_penalty=2.0,
                            logit_bias=(), min_tokens=0, allowed_token_ids=())  # fmt: skip
    # (logprobs 0: the chosen tokens' only)
    assert (
        parse_completion({"prompt": "hi", "top_k": -1}).sampling.params["top_k"] == 0
    )  # vLLM's off
    s = parse_chat({"messages": USER, "logprobs": True, "top_logprobs": 3}).sampling
    assert s.params["logprobs"] and s.params["top_logprobs"] == 3
    req = parse_completion(
        {"prompt": [[5, 6]], "max_tokens": 3, "stop": "x", "seed": 7, "stream": True,
         "stream_options": {"include_usage": True}, "ignore_eos": True}
    )  # fmt: skip
    assert req.prompts == [[5, 6]] and req.sampling.max_tokens == 3
    assert req.sampling.stop == ["x"] and req.sampling.include_usage and req.sampling.ignore_eos


def test_completion_prompt_lists_and_echo():
    """Several prompts are one choice each, in order (a text list or a token-id list); echo asks
    for the prompt's log-probabilities with as many alternatives as ``logprobs``; max_tokens 0 is
    the prompt scored alone (lm-evaluation-harness's loglikelihood request)."""
    req = parse_completion({"prompt": ["a b", "c"], "max_tokens": 2})
    assert req.prompts == ["a b", "c"] and not req.sampling.echo
    assert parse_completion({"prompt": [[1, 2], [3]]}).prompts == [[1, 2], [3]]
    scored = parse_completion(
        {"prompt": [[1, 2, 3]], "echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0}
    )  # fmt: skip
    s = scored.sampling
    assert s.echo and s.max_tokens == 0
    assert s.params["logprobs"] and s.params["top_logprobs"] == 1
    assert s.params["prompt_logprobs"] == 1
    bias = parse_completion({"prompt": "x", "logit_bias": {"7": -100, "3": 2.5}}).sampling
    assert bias.params["logit_bias"] == ((3, 2.5), (7, -100.0))
    six = ["\n\n", "Question:", "</s>", "<|im_end|>", "###", "Q:"]  # a task's until + EOS
    assert parse_completion({"prompt": "x", "stop": six}).sampling.stop == six
    plain_echo = parse_completion({"prompt": "x", "echo": True}).sampling  # no logprobs asked
    assert plain_echo.echo and plain_echo.params["prompt_logprobs"] is None
    assert plain_echo.max_tokens == 16


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": "a", "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"prompt": "a", "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "a", "top_k": -2}, "top_k", "greater than or equal to -1"),
        ({"prompt": "a", "min_p": 1.01}, "min_p", "less than or equal to 1"),
        ({"prompt": "a", "n": 65}, "n", "less than or equal to 64"),
        ({"prompt": "a", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": ["a"] * 17, "n": 64}, "n", "1088 completions (17 prompts x n=64)"),
        ({"prompt": [[5]] * 1025}, "prompt", "at most 1024 per request"),
        ({"prompt": "a", "best_of": 3}, "best_of", "1 or absent"),
        ({"prompt": "a", "logprobs": -1}, "logprobs", "greater than or equal to 0"),
        ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
        ({"prompt": "a", "frequency_penalty": -2.1}, "frequency_penalty", "greater than or equal"),
        ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"prompt": "a", "repetition_penalty": 1e39}, "repetition_penalty", "less than or equal"),
        ({"prompt": "a", "repetition_penalty": float("inf")}, "repetition_penalty", "finite"),
        ({"prompt": "a", "logit_bias": {"x": 1.0}}, "logit_bias", "token ids (as strings"),
        ({"prompt": "a", "logit_bias": {"²": 1.0}}, "logit_bias", "strings of digits"),  # not int()
        ({"prompt": "a", "logit_bias": {"1" * 5000: 1.0}}, "logit_bias", "strings of digits"),
        ({"prompt": "a", "logit_bias": {"5": 1.0, "05": 2.0}}, "logit_bias", "token 5 twice"),
        ({"prompt": "a", "min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
        ({"prompt": "a", "logit_bias": {"5": 101}}, "logit_bias", "in [-100, 100]"),
        (
            {"prompt": "a", "logit_bias": {str(i): 1 for i in range(301)}},
            "logit_bias",
            "at most 300",
        ),
        ({"prompt": "a", "stop": [f"s{i}" for i in range(65)]}, "stop", "up to 64"),
        ({"prompt": "a", "stop": [""]}, "stop", "non-empty"),
        ({"prompt": "a", "stop": ["ok", "é" * 513]}, "stop", "at most 1024 bytes of UTF-8"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens", "echo: true"),
        ({"prompt": "a", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
        ({"prompt": "a", "max_tokens": "5"}, "max_tokens", "valid integer"),
        ({"prompt": "a", "frobnicate": 1}, "frobnicate", "unknown field 'frobnicate'"),
        ({"prompt": []}, "prompt", "empty"),  # (a text: empty where it encodes to no tokens)
        ({"prompt": [[1], []]}, "prompt", "prompt[1] is empty"),
        ({"prompt": [[1], [2, -3]]}, "prompt", "prompt[1]: token ids must be non-negative"),
        ({"prompt": ["a", [1]]}, "prompt", "valid string"),
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
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),  # no tool_call_id
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "nick": "bob"}]}, "messages[0].nick"),
        ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": USER, "logprobs": True, "top_logprobs": -2}, "top_logprobs"),
        ({"messages": USER, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": USER, "response_format": {"type": "xml"}}, "response_format"),
        ({"messages": USER, "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
        ("not an object", None),
        ({"messages": USER * 2049}, "messages"),  # (OpenAI's bounds, checked before the items)
        ({"messages": USER, "tools": [{"type": "function", "function": {"name": f"f{i}"}}
                                      for i in range(129)]}, "tools"),
    ],
)  # fmt: skip
def test_chat_errors_name_the_field(body, param):
    err = _err(parse_chat, body)
    if param is not None:
        assert err.param is not None and err.param.startswith(param)
    if isinstance(body, dict) and param in ("messages", "tools") and len(body[param]) > 128:
        assert f"at most {2048 if param == 'messages' else 128}" in err.message, err.message


def test_fields_the_openai_api_allows_as_null_or_extra_are_accepted():
    # null is the OpenAI API's "not given" for stream; a message may name its participant
    assert not parse_completion({"prompt": "a", "stream": None, "ignore_eos": None}).sampling.stream
    named = parse_chat({"messages": [{"role": "user", "content": "x", "name": "bob"}]})
    assert named.messages == [{"role": "user", "content": "x", "name": "bob"}]  # to the template
    for field in ("seed", "top_k"):  # beyond int64: refused here, never reaching the engine
        err = _err(parse_completion, {"prompt": "a", field: 1 << 64})
        assert err.param == field
    err = _err(parse_chat, {"messages": [{"role": "user", "content": "x", "nick": "b"}]})
    assert (
        "accepts content, name, reasoning, reasoning_content, role, tool_call_id, tool_calls"
        in (err.message)
    )  # a message's fields (not the output ones a client may send back as null)


def test_chat_parts_and_default_length():
    req = parse_chat(
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": [{"type": "text", "text": "a"},
                                                   {"type": "text", "text": "b"}]}],
         "max_completion_tokens": 5}
    )  # fmt: skip
    assert req.messages[1] == {"role": "user", "content": "a\nb"}  # one part per line, as vLLM
    for part in ({"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": 5}):
        err = _err(parse_chat, {"messages": [{"role": "user", "content": [part]}]})
        assert err.param == "messages[0].content" and "text parts" in err.message
    assert req.sampling.max_tokens == 5
    assert parse_chat({"messages": [{"role": "user", "content": "x"}]}).sampling.max_tokens is None


def test_left_out_settings_take_the_models_generation_config_else_openais():
    from transformers import GenerationConfig

    from fluid_npu.serve.protocol import SamplingDefaults

    left_out = parse_completion({"prompt": "a", "top_p": 0.5}).sampling.params
    openai = SamplingDefaults.of(None).fill(left_out)
    assert (openai["temperature"], openai["top_p"], openai["top_k"]) == (1.0, 0.5, 0)
    assert SamplingDefaults.of(GenerationConfig()) == SamplingDefaults()  # nothing set: OpenAI's
    model = SamplingDefaults.of(GenerationConfig(do_sample=True, temperature=0.6, top_k=20))
    filled = model.fill(left_out)
    assert (filled["temperature"], filled["top_p"], filled["top_k"]) == (0.6, 0.5, 20)
    asked = parse_completion({"prompt": "a", "temperature": 0}).sampling.params
    assert model.fill(asked)["temperature"] == 0.0  # what the request says wins


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


def test_every_chat_path_encodes_a_conversation_as_training_does():
    """openPangu's tokenizer prepends BOS to text and its chat template does not write it (its
    model card reads ``tokenizer(apply_chat_template(..., tokenize=False))``): Stage I / II data,
    ``fluid eval --chat``, ``fluid generate`` (``--chat`` and ``messages`` lines) and the server's
    chat route all give the model that BOS, once; a template that writes BOS itself (Llama 3)
    gets no second one, and a tokenizer without BOS gets none."""
    from fluid_npu.data.auto_template import get_template
    from fluid_npu.data.templates import Conversation
    from fluid_npu.eval.tasks import encode_question

    adds = build_tiny_tokenizer(mask_token=True)
    adds.add_bos_token = True
    bos = adds.bos_token_id
    user = [{"role": "user", "content": "hi"}]
    turns = Conversation([("user", "hi"), ("assistant", "ok")])
    trained = get_template("auto", adds).encode(adds, turns)
    served = chat_ids(adds, user)
    assert served == trained.input_ids[: trained.spans[0][0]]  # the training prompt, exactly
    assert served[0] == bos and served.count(bos) == 1
    assert encode_prompt(adds, {"messages": user}).ids == served
    assert encode_prompt(adds, {"prompt": "hi"}, chat=True).ids == served
    assert encode_question(adds, "hi", chat=True) == served
    chatml = adds.chat_template
    adds.chat_template = "{{ bos_token }}" + chatml
    assert chat_ids(adds, user) == served  # written by the template: still one
    adds.chat_template = " {{ bos_token }}" + chatml  # (after a space: still the template's)
    assert chat_ids(adds, user).count(bos) == 1
    plain = build_tiny_tokenizer(mask_token=True)  # adds no BOS to text
    assert bos not in chat_ids(plain, user) and chat_ids(plain, user) == served[1:]


def test_a_conversation_encodes_offline_as_the_chat_route_encodes_it(tok):
    """A ``messages`` line of ``fluid generate`` / ``fluid bench sampler`` is what the server's
    chat route renders for the same messages: text parts joined one per line, names kept."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok", "name": "bot"},
        {"role": "user", "content": "again"},
    ]
    served = chat_ids(tok, parse_chat({"messages": messages}).messages)
    assert encode_prompt(tok, {"messages": messages}).ids == served
    assert "<|im_start|>user\na\nb<|im_end|>" in tok.decode(served)
    # the roles a line may give are the chat route's
    from typing import get_args

    from fluid_npu.sampling.prompts import CHAT_ROLES
    from fluid_npu.serve.protocol import Message

    assert get_args(Message.model_fields["role"].annotation) == CHAT_ROLES


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


@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback"])
def test_detokenizer_never_streams_a_replacement_character(tok, kind):
    """Multi-byte characters split over tokens: a byte-fallback tokenizer spells a whole run of
    byte tokens as U+FFFDs (complete characters in it too) until the run ends; streamed a token
    or a few at a time, with or without stop strings, the text is the whole decode's, and no
    piece carries a U+FFFD."""
    tk = tok if kind == "byte_level" else byte_fallback_tokenizer()
    for answer in ("hi 😀 €, 日本", "a😀😀b €€ x", "日本語 🎉!"):
        ids = [*_ids(tk, answer), tk.eos_token_id]
        whole = tk.decode(ids, skip_special_tokens=True)
        assert "\ufffd" not in whole
        for step in (1, 2, 3):
            for stop in ([], ["!"], ["本語"], ["😀"]):
                d = Detokenizer(tk, stop)
                pieces = [d.add(ids[i : i + step]) for i in range(0, len(ids), step)]
                pieces.append(d.flush())
                assert not any("\ufffd" in p for p in pieces), (answer, step, stop, pieces)
                cut = min((whole.index(x) for x in stop if x in whole), default=len(whole))
                assert "".join(pieces) == whole[:cut], (answer, step, stop)


def test_detokenizer_spells_the_output_as_it_reads_after_its_prompt():
    """SentencePiece drops the leading space of a text: the output's first space (after the
    prompt) and a space after a skipped special token mid-output are kept, as vLLM keeps them."""
    from fluid_npu.sampling.detok import output_text
    from fluid_npu.sampling.stops import stop_cut

    tk = byte_fallback_tokenizer()
    prompt, whole = _ids(tk, "the capital is"), _ids(tk, "the capital is paris. i like it")
    out = whole[len(prompt) :]
    assert tk.decode(out) == "paris. i like it"  # decoded alone: the space is gone
    assert output_text(tk, prompt, out) == " paris. i like it" == tk.decode(whole)[14:]
    dot = out.index(tk.convert_tokens_to_ids("."))
    mixed = [*out[: dot + 1], tk.bos_token_id, *out[dot + 1 :]]  # a special token mid-output
    for step in (1, 2, 3):
        d = Detokenizer(tk, prompt=prompt)
        pieces = [d.add(mixed[i : i + step]) for i in range(0, len(mixed), step)]
        assert "".join(pieces) + d.flush() == " paris. i like it", step
    # an EOS that is no special token ends the text unspelled, and is counted
    d = Detokenizer(tk, prompt=prompt, eos_ids=[out[dot]])
    assert d.add(out[: dot + 1]) + d.flush() == " paris" and d.tokens_used == dot + 1
    # a stop string may begin at the output's first space, never in the prompt
    d = Detokenizer(tk, stop=[" paris"], prompt=prompt)
    assert d.add(out) + d.flush() == "" and d.stopped
    tail = prompt[-4:]
    special = frozenset(tk.all_special_ids)
    cut = stop_cut(tk, special, tail, out, [" paris"], context=len(tail))
    assert cut == len(" paris")  # (one token a character: through the token spelling "s")
    assert stop_cut(tk, special, tail, out, ["is paris"], context=len(tail)) is None


@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback"])
def test_logprob_tokens_carry_their_own_bytes(tok, kind):
    tk = tok if kind == "byte_level" else byte_fallback_tokenizer()
    words = TokenText(tk)
    assert (words.byte_level, words.byte_fallback) == (kind == "byte_level", kind != "byte_level")
    ids = _ids(tk, "héllo 😀 日本")
    text = tk.decode(ids)
    assert b"".join(words.bytes(t) for t in ids).decode().strip() == text
    parts = [words.text(t) for t in ids]
    assert any(p.startswith("bytes:\\x") for p in parts)  # part of a character: its bytes
    assert len({p for p in parts if p.startswith("bytes:")}) > 3  # distinct, not all U+FFFD
    # chat: the bytes join into the text; completions: offsets count the returned text's
    # characters (a token inside a character points at it; the EOS the text skips adds none)
    entries = [(t, -0.5, [(t, -0.5)]) for t in [*ids, tk.eos_token_id]]
    chat = Shape(True, "c", "m", words).logprobs(entries)["content"]
    assert bytes(b for e in chat for b in e["bytes"]).decode().strip().startswith(text)
    comp = Shape(False, "c", "m", words).logprobs(entries)
    offsets = comp["text_offset"]
    assert offsets == sorted(offsets) and len(set(offsets)) < len(offsets)
    first = ids.index(next(t for t in ids if words.text(t).startswith("bytes:")))
    assert text[offsets[first]] == "é" and offsets[first + 1] == offsets[first]
    assert offsets[-1] == len(text)  # the EOS after the whole text


def test_log_probabilities_that_are_not_finite_stay_json(tok):
    words = TokenText(tok)
    for chat in (True, False):
        body = Shape(chat, "c", "m", words).logprobs([(5, float("-inf"), [(5, float("nan"))])])
        json.dumps(body, allow_nan=False)  # no Infinity / NaN: a JSON parser takes it
        assert "-9999.0" in json.dumps(body)


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
                   "prompt_tokens_details": {"cached_tokens": 0},
                   "forwards": 3, "tpf": 2.0}  # fmt: skip
    assert usage(4, 6, 3, 2)["prompt_tokens_details"] == {"cached_tokens": 2}
    chat = Shape(True, "chatcmpl-1", "m")
    body = chat.answer([chat.choice("hi", "stop")], use)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    first = json.loads(chat.chunk("", role=True).removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = json.loads(chat.chunk(None, "length", use).removeprefix("data: "))
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": "length", "stop_reason": None}  # fmt: skip
    ended = json.loads(chat.chunk(None, "stop", stop_reason="\n\n").removeprefix("data: "))
    assert ended["choices"][0]["stop_reason"] == "\n\n"  # vLLM's: the stop string that ended it
    assert "stop_reason" not in first["choices"][0]  # (only where it ends)
    assert chat.choice("hi", "stop", stop_reason=7)["stop_reason"] == 7
    assert last["usage"] == use
    comp = Shape(False, "cmpl-1", "m")
    assert json.loads(comp.usage_chunk(use)[6:])["choices"] == []
    assert comp.answer([comp.choice("x", "length")], use)["choices"][0]["text"] == "x"


class _FailingScheduler:
    """Takes one request, then fails its step once a second request is queued behind it."""

    def __init__(self) -> None:
        import threading

        self.taken: list[str] = []
        self.stepping = threading.Event()
        self.release = threading.Event()

    def submit(self, req) -> None:
        self.taken.append(req.request_id)

    def abort(self, request_id: str) -> None:
        pass

    def has_work(self) -> bool:
        return bool(self.taken)

    def step(self):
        self.stepping.set()
        self.release.wait()
        raise RuntimeError("device lost")


def test_requests_queued_behind_a_failing_step_are_answered():
    """A request submitted while the step that kills the engine runs gets a 500, not a hang."""
    import asyncio

    from fluid_npu.serve.worker import Worker

    async def scenario() -> tuple[BaseException, BaseException]:
        sched = _FailingScheduler()
        worker = Worker(sched)
        worker.start(asyncio.get_running_loop())
        first = await worker.submit("a", [1, 2], max_new_tokens=3)
        await asyncio.to_thread(sched.stepping.wait)
        second = asyncio.ensure_future(worker.submit("b", [1, 2], max_new_tokens=3))
        await asyncio.sleep(0)  # "b" is in the inbox while the step runs
        sched.release.set()
        failed = await first.queue.get()
        try:
            await asyncio.wait_for(second, timeout=60)  # a hang would never answer
        except APIError as exc:
            return failed, exc
        raise AssertionError("the queued request was accepted by a dead engine")

    failed, refused = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError) and "device lost" in str(failed)
    assert refused.status == 500 and "device lost" in str(refused)


def test_a_submission_that_reaches_a_dead_engine_late_is_refused_not_lost(monkeypatch):
    """A large request takes a while to build its scheduler requests: the engine may die between
    ``submit_many``'s first check and its command reaching the inbox. The closed inbox refuses it
    (500) instead of leaving it to wait forever."""
    import asyncio

    from fluid_npu.serve.worker import Worker

    async def scenario() -> BaseException:
        sched = _FailingScheduler()
        worker = Worker(sched)
        worker.start(asyncio.get_running_loop())
        first = await worker.submit("a", [1, 2], max_new_tokens=3)
        await asyncio.to_thread(sched.stepping.wait)
        sched.release.set()
        await first.queue.get()  # the engine failed ...
        await asyncio.to_thread(worker._thread.join, 60)  # ... and its thread ended
        monkeypatch.setattr(Worker, "alive", property(lambda self: True))  # (the stale check)
        before = worker.outstanding
        late = asyncio.ensure_future(worker.submit_many([("b", [1, 2], {}), ("c", [3], {})],
                                                        max_new_tokens=3))  # fmt: skip
        try:
            await asyncio.wait_for(late, timeout=60)  # a lost command would never answer
        except APIError as exc:
            assert worker.outstanding == before and worker.inbox.empty()
            return exc
        raise AssertionError("a dead engine accepted the request")

    refused = asyncio.run(scenario())
    assert refused.status == 500 and "device lost" in str(refused)


class _Gated:
    """A real scheduler whose ``step`` waits for ``gate`` (``at_gate`` is set while it waits)."""

    def __init__(self, scheduler) -> None:
        import threading

        self.scheduler = scheduler
        self.gate, self.at_gate = threading.Event(), threading.Event()
        self.gate.set()

    def __getattr__(self, name: str):
        return getattr(self.scheduler, name)

    def step(self):
        self.at_gate.set()
        assert self.gate.wait(60), "the test left the gate closed"
        self.at_gate.clear()
        return self.scheduler.step()


def test_an_id_reused_right_after_its_request_was_abandoned_gets_its_own_tokens():
    """A client that drops a request and sends a new one under the same id at once (a gateway's
    retry) frees the id before the engine has retired the first: the first's "abort" event,
    emitted at the next step, must not end the new request, which decodes as it would alone."""
    import asyncio

    from fluid_npu.model.tiny import build_tiny_model
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import Request, Scheduler
    from fluid_npu.serve.worker import Worker

    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, seed=3)
    first, again = tok("the cat sat on")["input_ids"], tok("a dog ran")["input_ids"]
    alone = run_requests(Scheduler(model, tok.mask_token_id, policy="ar", max_batch=2),
                         [Request("x", again, 6, eos_ids=[])])["x"].tokens  # fmt: skip

    async def scenario() -> tuple[list, list, _Gated]:
        sched = _Gated(Scheduler(model, tok.mask_token_id, policy="ar", max_batch=2))
        worker = Worker(sched)
        worker.start(asyncio.get_running_loop())
        try:
            old = await worker.submit("x", first, max_new_tokens=40, eos_ids=[])
            assert (await old.queue.get()).tokens  # it runs
            sched.gate.clear()
            await asyncio.to_thread(sched.at_gate.wait, 60)  # the engine waits inside a step
            worker.abort("x")  # the client left (Generation.close) ...
            new = asyncio.ensure_future(worker.submit("x", again, max_new_tokens=6, eos_ids=[]))
            while worker.inbox.qsize() < 2:  # ... and came back under its id before the step
                await asyncio.sleep(0.001)
            sched.gate.set()
            stream = await new
            events = [await asyncio.wait_for(stream.queue.get(), 60)]
            while not events[-1].finished:
                events.append(await asyncio.wait_for(stream.queue.get(), 60))
            olds = []
            while not old.queue.empty():
                olds.append(old.queue.get_nowait())
            return events, olds, sched
        finally:
            worker.stop()

    events, olds, sched = asyncio.run(scenario())
    assert events[-1].finish_reason == "length"
    assert [t for ev in events for t in ev.tokens] == alone
    assert not any(ev.finished for ev in olds)  # (its abort event went nowhere)
    assert not sched.has_work() and sched.num_running == 0


def test_bench_report_survives_an_ar_run_whose_requests_all_failed():
    """Every ``ar`` request failing leaves no ratio to report (None), not a crash after the run."""
    from types import SimpleNamespace

    from fluid_npu.serve.bench_report import build_report, table

    keys = ("num_requests", "rate", "concurrency", "max_tokens", "ignore_eos", "chat", "warmup")
    s = SimpleNamespace(
        command="c", prompts="p", server_args=[], rounds=1, seed=0, **{k: 0 for k in keys}
    )
    quiet = {"p50": None, "p90": None, "p99": None}

    def result(rate: float, failed: int) -> dict:
        return {"output_tokens_per_s": rate, "texts": [None] * failed, "failed": failed, "tpf": 1.0,
                "ttft_ms": quiet, "itl_ms": quiet, "tpot_ms": quiet}  # fmt: skip

    report = build_report(s, {"khead": result(100.0, 0), "ar": result(0.0, 4)}, 4)
    assert report["throughput_vs_ar"] == {"khead": None}
    # some requests failed on one side: the two did not serve the same requests, no ratio
    for failed in ({"khead": 1, "ar": 0}, {"khead": 0, "ar": 1}):
        runs = {name: result(100.0, n) for name, n in failed.items()}
        assert build_report(s, runs, 4)["throughput_vs_ar"] == {"khead": None}
    same = build_report(s, {n: result(100.0, 0) for n in ("khead", "ar")}, 4)
    assert same["throughput_vs_ar"] == {"khead": 1.0}
    assert report["goal"]["best"] is None and not report["goal"]["met"]
    assert "| khead | 100.0 | — |" in table(report)


def test_bench_engine_figures_per_rank_and_none_from_a_server_without_them():
    """The engine's figures are the counters' growth over the load: behind a data-parallel front
    the ranks' series add up and the busy share is each rank's; a server whose ``/metrics`` lacks
    them (another implementation) or answers none gets no figures, not made-up ones."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from fluid_npu.serve.bench_engine import PHASES, SERIES, engine_view, scrape

    def snap(steps: float, busy: float, rows: float, cpu: float, engines: int = 1) -> dict:
        values = (steps, busy, steps, rows, cpu)
        return {"totals": dict(zip(SERIES, values, strict=True)), "engines": engines}

    view = engine_view(snap(10, 1.0, 30, 0.5), snap(110, 3.0, 630, 2.0, engines=2), wall=2.0)
    assert view == {"steps": 100, "step_ms": 20.0, "busy_share": 0.5, "requests_per_step": 6.0,
                    "engine_cpu_share": 0.75, "first_token": None}  # fmt: skip
    assert engine_view(snap(5, 1, 5, 1), snap(5, 1, 5, 1), wall=1.0) is None  # no step ran
    assert engine_view(None, snap(5, 1, 5, 1), wall=1.0) is None
    # with the first token's phases (means over the requests of the load): where TTFT went
    phased = [snap(10, 1.0, 30, 0.5), snap(110, 3.0, 630, 2.0)]
    for at, (ttft, queue, step, n) in zip(phased, ((1.0, 0.1, 0.5, 10), (3.0, 0.3, 1.5, 110))):
        at["phases"] = True
        at["totals"].update(zip(PHASES, (ttft, n, queue, n, step, n), strict=True))
    assert engine_view(*phased, wall=2.0)["first_token"] == {
        "server_ttft_ms": 20.0, "to_engine_ms": 8.0, "queue_ms": 2.0, "first_step_ms": 10.0
    }  # fmt: skip
    # phases counted over other requests than the first tokens (an aborted one): no split
    phased[1]["totals"][PHASES[3]] += 1
    assert engine_view(*phased, wall=2.0)["first_token"] is None
    phased[1]["totals"][PHASES[3]] -= 1
    phased[0]["phases"] = False  # (a server that lacked them at the first scrape: none)
    assert engine_view(*phased, wall=2.0)["first_token"] is None

    pages = {"/metrics": (200, b"# HELP x_total a counter\n# TYPE x_total counter\nx_total 1.0\n")}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # (http.server's name)
            status, body = pages.get(self.path, (404, b"no"))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert scrape(url, {}) is None  # metrics, but not these
        pages["/metrics"] = (200, b"fluid_step_seconds_count 3.0\n")
        assert scrape(url, {}) is None  # some of them only

        def lines(keys: tuple[str, ...], values: tuple[float, ...]) -> str:  # two ranks' series
            pairs = zip(keys, values, strict=True)
            return "".join(f'{k}{{rank="{r}"}} {v}\n' for k, v in pairs for r in (0, 1))

        ranks = lines(SERIES, (2.0, 0.5, 2.0, 6.0, 0.4))
        pages["/metrics"] = (200, ranks.encode())
        got = scrape(url, {})  # two ranks, their series summed; no phases: the view stands
        assert got["engines"] == 2 and got["phases"] is False
        assert got["totals"]["fluid_step_requests_sum"] == 12.0
        phases = lines(PHASES, (0.2, 4, 0.04, 4, 0.1, 4))
        pages["/metrics"] = (200, (ranks + phases).encode())
        got = scrape(url, {})
        assert got["phases"] is True
        assert got["totals"]["fluid_time_to_first_token_seconds_sum"] == pytest.approx(0.4)
        assert got["totals"]["fluid_request_prefill_time_seconds_count"] == 8
        del pages["/metrics"]
        assert scrape(url, {}) is None  # a 404
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_load_freezes_the_heap_and_gives_it_back(monkeypatch):
    """The load generator's start-up objects leave the collector's scans for the load and come
    back after it (a process that called it, a test run's included, collects as before);
    ``FLUID_GC_FREEZE=0`` leaves the collector alone, as it leaves a server's."""
    import gc

    from fluid_npu.host import GC_FREEZE_ENV, freeze_heap, frozen_heap

    assert gc.get_freeze_count() == 0, "a test froze this process's heap and left it frozen"
    kept = [[i] for i in range(1000)]  # alive now: frozen with everything else
    with frozen_heap():
        assert gc.get_freeze_count() >= len(kept)
    assert gc.get_freeze_count() == 0
    monkeypatch.setenv(GC_FREEZE_ENV, "0")
    with frozen_heap():
        assert gc.get_freeze_count() == 0
    assert freeze_heap() == 0 and len(kept) == 1000


def test_check_lossless_judges_each_divergence_in_fp32():
    """``fluid bench serve --check-lossless``: an output that differs from ``ar``'s where the
    fp32 model sees two equal logits is a near-tie; one that took a worse token is a mismatch;
    the model is loaded only when something differs."""
    import torch

    from fluid_npu.model.tiny import build_tiny_model
    from fluid_npu.serve.bench_lossless import judge

    tok = build_tiny_tokenizer(mask_token=True)
    model = build_tiny_model("llama", tok, seed=3).float().eval()
    p1, p2, p3 = (tok(t)["input_ids"] for t in ("hello world", "the quick", "a b c"))
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([p3])).logits[0, -1].argmax())
        twin = next(t for t in range(10, 40) if t != first)
        model.lm_head.weight[twin] = model.lm_head.weight[first]  # two tokens, one logit

    @torch.no_grad()
    def decode(prompt: list[int], n: int, second_at: int | None = None) -> list[int]:
        ids: list[int] = []
        for k in range(n):
            logits = model(input_ids=torch.tensor([[*prompt, *ids]])).logits[0, -1]
            ids.append(int(torch.topk(logits, 2).indices[1 if k == second_at else 0]))
        return ids

    ar3 = decode(p3, 4)
    assert ar3[0] in (first, twin)
    other = [twin if ar3[0] == first else first, *ar3[1:]]
    ids = {
        "ar": [(p1, decode(p1, 5)), (p2, decode(p2, 5)), (p3, ar3), (p1, [1])],
        "entropy": [(p1, decode(p1, 5)), (p2, decode(p2, 5, second_at=2)), (p3, other), None],
    }
    results = {n: {"machine": {"server": {"dtype": "bfloat16"}}} for n in ids}
    loads = []
    verdict = judge(results, ids, lambda: loads.append(1) or model)["entropy"]
    assert loads == [1]
    assert (verdict["checked"], verdict["differ"], verdict["near_ties"], verdict["mismatches"]) == (
        3,
        2,
        1,
        1,
    )
    assert [(d["request"], d["index"], d["tie"]) for d in verdict["divergences"]] == [
        (1, 2, False),
        (2, 0, True),
    ]
    assert verdict["divergences"][1]["gap"] == 0.0
    same = {"ar": ids["ar"][:1], "entropy": ids["entropy"][:1]}
    quiet = judge(results, same, lambda: pytest.fail("nothing differs: no model to load"))
    assert quiet["entropy"]["checked"] == 1 and quiet["entropy"]["differ"] == 0


def test_a_submission_sent_as_the_engine_process_fails_is_refused():
    """The engine's process fails while a submission is on its way to it: no answer will come,
    so the submission is refused (500) rather than left waiting forever."""
    import asyncio
    import threading

    from fluid_npu.sampling.requests import Request
    from fluid_npu.serve.engine_process import EngineProcess
    from fluid_npu.serve.settings import ServeSettings
    from fluid_npu.serve.worker import Stream, _Submit

    async def run() -> None:
        worker = EngineProcess(ServeSettings(model="m"))
        worker.loop = asyncio.get_running_loop()

        class Gone:  # the pipe of a process that died as the submission went in
            def send(self, message: object) -> None:
                worker.error = RuntimeError("the engine's process exited (status -9)")
                raise BrokenPipeError

        worker._commands = Gone()  # type: ignore[assignment]
        accepted = worker.loop.create_future()
        worker.inbox.put(_Submit([Request("a", [1, 2], 4)], [Stream("a", 2)], accepted))
        sender = threading.Thread(target=worker._send_commands)
        sender.start()
        with pytest.raises(APIError, match="status -9") as info:
            await asyncio.wait_for(accepted, 30)
        assert info.value.status == 500
        sender.join(30)
        assert not sender.is_alive()

    asyncio.run(run())


def test_a_request_the_engine_finished_is_never_aborted_by_its_id():
    """Once the engine's last event for a request reached the loop its id is free (a gateway may
    retry under it at once), so a reader that goes away afterwards — or stops at a stop string —
    must not abort by that id: the abort would end the new request instead."""
    from fluid_npu.serve.generation import Generation
    from fluid_npu.serve.metrics import ServerMetrics
    from fluid_npu.serve.worker import Stream

    class Engine:  # what Generation calls on its worker
        def __init__(self) -> None:
            self.aborted: list[str] = []

        def abort(self, request_id: str) -> None:
            self.aborted.append(request_id)

        def release(self, stream: Stream) -> None:
            stream.held = False

    tok = build_tiny_tokenizer()
    for finished_first in (False, True):
        engine, stream = Engine(), Stream("dup", 3)
        if finished_first:  # (the engine's last event delivered, the reader not there yet)
            engine.release(stream)
        gen = Generation(engine, ServerMetrics("m"), stream, Detokenizer(tok))  # type: ignore[arg-type]
        gen.close("completions")  # the client went away before reading to the end
        assert gen.finish_reason == "abort" and not stream.held
        assert engine.aborted == ([] if finished_first else ["dup"])


def test_a_client_leaving_as_its_request_is_taken_frees_its_place_once():
    """A client cancelled while its submission is being accepted, after the engine's last event
    for it already released its place: the place is given back once (the capacity count stays
    right), and no abort goes out under an id that is free again."""
    import asyncio

    from fluid_npu.serve.worker import Worker

    async def run() -> None:
        worker = Worker(None)
        worker._thread = type("T", (), {"is_alive": lambda self: True})()  # (no engine thread)
        task = asyncio.ensure_future(worker.submit("dup", [1, 2, 3], max_new_tokens=4))
        await asyncio.sleep(0)
        submitted = worker.inbox.get_nowait()
        assert worker.outstanding == 1
        worker._deliver([(submitted.streams[0], type("Ev", (), {"finished": True})())])
        assert worker.outstanding == 0  # (the engine finished it: its place is free)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert worker.outstanding == 0
        assert worker.inbox.empty()  # no abort under the free id

    asyncio.run(run())


def test_a_request_that_cannot_cross_to_the_engine_process_fails_alone(monkeypatch):
    """One request that cannot be pickled on the server's side, or unpickled on the engine's (a
    grammar that cannot be rebuilt there), is refused; the ones after it go through, and the
    engine goes on."""
    import asyncio
    import pickle
    import threading

    from fluid_npu.sampling import grammar as grammars
    from fluid_npu.sampling.grammar import Grammar
    from fluid_npu.sampling.requests import Request
    from fluid_npu.serve import engine_process

    monkeypatch.setattr(grammars, "_RECEIVER", {})  # (no tables in this process)
    from fluid_npu.serve.settings import ServeSettings
    from fluid_npu.serve.worker import Stream, _Submit

    class Pipe:
        def __init__(self) -> None:
            self.sent: list[tuple] = []

        def send(self, message: tuple) -> None:
            self.sent.append(message)

    async def serve_side() -> None:  # the sender thread
        worker = engine_process.EngineProcess(ServeSettings(model="m"))
        worker.loop = asyncio.get_running_loop()
        worker._commands = pipe = Pipe()  # type: ignore[assignment]
        odd = Request("odd", [1], 4, grammar=Grammar(object(), 8, "regex"))  # (no serialised form)
        bad, good = worker.loop.create_future(), worker.loop.create_future()
        worker.inbox.put(_Submit([odd], [Stream("odd", 1)], bad))
        worker.inbox.put(_Submit([Request("ok", [1], 4)], [Stream("ok", 1)], good))
        worker.inbox.put(("wake", None))
        sender = threading.Thread(target=worker._send_commands)
        sender.start()
        with pytest.raises(APIError, match="the engine cannot take the request: AttributeError"):
            await asyncio.wait_for(bad, 30)
        sender.join(30)
        assert [m[0] for m in pipe.sent] == ["submit", "stop"]
        assert pickle.loads(pipe.sent[0][2])[0].request_id == "ok"

    asyncio.run(serve_side())

    class Scheduler:
        def __init__(self) -> None:
            self.submitted: list[str] = []

        def submit(self, req: Request) -> None:
            self.submitted.append(req.request_id)

    # the engine's side: a grammar no tables here can rebuild
    grammar_blob = pickle.dumps([Request("g", [1], 4, grammar=_FakeSerialized())])
    plain_blob = pickle.dumps([Request("p", [1], 4)])
    replies, sched = Pipe(), Scheduler()
    loop = engine_process._EngineLoop(sched, None, replies)  # type: ignore[arg-type]
    loop._apply("submit", [1, grammar_blob])
    loop._apply("submit", [2, plain_blob])
    assert (
        replies.sent[0][:3] == ("refused", 1, "request")
        and "engine's process" in replies.sent[0][3]
    )
    assert replies.sent[1] == ("taken", 2) and sched.submitted == ["p"] and loop.live == {"p"}


class _FakeSerialized:
    """Pickles as a grammar would (``grammar._received``), for a process without the tables."""

    def __reduce__(self) -> tuple:
        from fluid_npu.sampling.grammar import _received

        return _received, ("{}", 8, "regex")


def test_a_frozen_heap_goes_back_to_the_collector_at_exit():
    """A server's frozen heap is unfrozen when its process exits, so the interpreter's last
    collection sees those objects (left frozen, triton's extension reported each as leaked on
    every server stop)."""
    import subprocess
    import sys

    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('frozen at exit', gc.get_freeze_count()))\n"
            "from fluid_npu.host import freeze_heap\n"
            "assert freeze_heap() > 1000\n"
            "freeze_heap()\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "frozen at exit 0"


def test_detokenizer_work_grows_linearly_and_matches_the_whole_decode(tok):
    """A long output streamed a token at a time: the same text as one decode of all of it (stop
    strings applied the same way), with the tokens decoded in all growing linearly, not
    quadratically (the event loop serves every client)."""
    import random

    words = ["héllo", "wörld", "one", "two.", "three", "a", "b", "c"]
    rng = random.Random(0)
    ids = _ids(tok, " ".join(rng.choice(words) for _ in range(150)))
    decoded = []

    class Counting:
        def decode(self, t, **kw):
            decoded.append(len(t))
            return tok.decode(t, **kw)

    whole = tok.decode(ids, skip_special_tokens=True)
    for stop in ([], ["two. three"]):
        decoded.clear()
        d = Detokenizer(Counting(), stop=stop)
        out = "".join(d.add([t]) for t in ids) + d.flush()
        assert out == (whole.split(stop[0])[0] if stop else whole)
        assert sum(decoded) <= 8 * d.tokens_used, (sum(decoded), d.tokens_used)


def test_reasoning_parsers_need_their_markers_as_single_tokens():
    """``--reasoning-parser openpangu`` reads ``[unused16]`` / ``[unused17]`` (special tokens,
    so left out of any text) as one token each; a tokenizer without a parser's markers, or an
    unknown parser, is one clear error at start-up."""
    from fluid_npu.errors import ConfigError
    from fluid_npu.serve.reasoning import ReasoningText, reasoning_parser

    pangu = build_tiny_tokenizer(mask_token=True)
    pangu.add_tokens(["[unused16]", "[unused17]"], special_tokens=True)
    parser = reasoning_parser("openpangu", pangu)
    assert [parser.start, parser.end] == pangu.convert_tokens_to_ids(["[unused16]", "[unused17]"])
    with pytest.raises(ConfigError, match="'<think>' is not one token"):
        reasoning_parser("qwen3", pangu)
    with pytest.raises(ConfigError, match="is not one of deepseek_r1, openpangu, qwen3"):
        reasoning_parser("r1", pangu)
    ids = pangu("x", add_special_tokens=False)["input_ids"]
    assert parser.opened([*ids, parser.start, *ids]) and not parser.opened(
        [parser.start, parser.end]
    )
    words = pangu("ok then", add_special_tokens=False)["input_ids"]
    split = ReasoningText(pangu, parser, None, prompt=ids, eos_ids=())
    answer = split.add([parser.start, *words[:2]])
    assert answer == "" and split.reasoning_delta == pangu.decode(words[:2])
    answer = split.add([*words[2:], parser.end, *words])
    assert answer == "ok then" and split.reasoning_delta == pangu.decode(words[2:])
    assert split.tokens_used == 2 + 2 * len(words)
    # a character split by the closing marker stays split: each part decodes apart, as the
    # engine reads stop strings (no byte of the reasoning completes the answer's)
    smile = pangu("😀", add_special_tokens=False)["input_ids"]
    assert len(smile) > 1
    split = ReasoningText(pangu, parser, None, prompt=ids, eos_ids=())
    answer = split.add([parser.start, smile[0], parser.end, *smile[1:], *words])
    answer += split.flush()
    assert split.reasoning_delta == pangu.decode(smile[:1]) and answer.endswith("ok then")
    assert answer == pangu.decode([*smile[1:], *words])


def test_a_large_body_is_checked_off_the_event_loop():
    """A body over BIG_BODY_BYTES is parsed and checked on a worker thread (100,000 chat
    messages took pydantic seconds on the event loop, stalling every stream); a small one here,
    without the thread hop."""
    import asyncio
    import threading

    from starlette.requests import Request

    from fluid_npu.serve.http import BIG_BODY_BYTES, read_parsed

    async def where_parsed(size: int) -> tuple[bool, int]:
        body = json.dumps({"prompt": "a" * size}).encode()

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")]}  # fmt: skip
        here = threading.get_ident()
        return await read_parsed(
            Request(scope, receive),
            lambda v, k: (threading.get_ident() != here, len(v[k])),
            "prompt",
        )

    assert asyncio.run(where_parsed(BIG_BODY_BYTES)) == (True, BIG_BODY_BYTES)
    assert asyncio.run(where_parsed(1000)) == (False, 1000)
    # the JSON itself, and the search for a lone surrogate, off the loop too
    from fluid_npu.serve import http

    seen = []
    real = http.parse_json
    try:
        http.parse_json = lambda body: seen.append(threading.get_ident()) or real(body)
        asyncio.run(where_parsed(BIG_BODY_BYTES))
        here = threading.get_ident()
        asyncio.run(where_parsed(10))
    finally:
        http.parse_json = real
    assert seen[0] != here and seen[1] == here
