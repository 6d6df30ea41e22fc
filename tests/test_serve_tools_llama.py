"""``--tool-call-parser llama3_json``: a Llama 3.x answer that is nothing but calls — JSON objects
``{"name", "parameters"}`` separated by ``;``, after an optional ``<|python_tag|>`` — comes back as
``tool_calls``; any other answer is text, streamed from its first characters on."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from test_serve_http import client, serving
from test_serve_tools import TOOLS, USER, ReasoningScheduler, arguments

from fluid_npu.model.tiny import build_tiny_tokenizer
from fluid_npu.serve.tools import PARSERS, ToolCallText

LLAMA3 = PARSERS["llama3_json"]
PARIS = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
OSLO = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'


@pytest.mark.parametrize(
    "text, content, calls",
    [
        (PARIS, "", [("get_weather", {"city": "Paris"})]),
        ("\n " + PARIS, "", [("get_weather", {"city": "Paris"})]),
        ("<|python_tag|>" + PARIS, "", [("get_weather", {"city": "Paris"})]),
        (PARIS + "; " + OSLO, "", [("get_weather", {"city": "Paris"}),
                                   ("get_weather", {"city": "Oslo"})]),
        ("It is sunny.", "It is sunny.", []),
        ("<|python", "<|python", []),  # (the marker's start, then the end: text)
        ("Sure: " + PARIS, "Sure: " + PARIS, []),  # (not the whole answer: text, as vLLM's)
        (PARIS[:-1], PARIS[:-1], []),  # cut inside the JSON
        (PARIS + " and more", PARIS + " and more", []),
        ('{"a": 1}', '{"a": 1}', []),  # JSON that is no call
    ],
)  # fmt: skip
def test_a_llama_answer_is_calls_or_text_however_it_is_streamed(text, content, calls):
    rng = random.Random(0)
    cuts = [sorted(rng.sample(range(1, len(text)), min(4, len(text) - 1))) for _ in range(10)]
    splits = [[text], list(text)] + [
        [text[a:b] for a, b in itertools.pairwise([0, *cut, len(text)])] for cut in cuts
    ]
    for pieces in splits:
        reader = ToolCallText(LLAMA3)
        passed = "".join(reader.add(p) for p in pieces)
        rest, found = reader.finish()
        assert passed + rest == content and arguments(found) == calls, pieces
        if not text.lstrip().startswith(("{", "<|python_tag|>"[: len(text.lstrip())])):
            assert passed == text  # (text from its first characters on, nothing held)


def test_llama_calls_over_the_wire():
    tok = build_tiny_tokenizer(mask_token=True)
    from test_serve_tools import TEMPLATE

    tok.chat_template = TEMPLATE
    sched = ReasoningScheduler()
    sched.output = tok(PARIS + "; " + OSLO, add_special_tokens=False)["input_ids"]
    with serving(sched, tokenizer=tok, tool_call_parser="llama3_json") as (url, _, _):
        c = client(url)
        out = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and message.content is None
        cities = [json.loads(t.function.arguments)["city"] for t in message.tool_calls]
        assert cities == ["Paris", "Oslo"]
        chunks = list(c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                                stream=True))  # fmt: skip
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert not "".join(d.content or "" for d in deltas)
        assert [t.function.arguments for d in deltas for t in d.tool_calls or []] == [
            t.function.arguments for t in message.tool_calls]  # fmt: skip


def test_the_python_tag_a_tokenizer_makes_special_is_read():
    """Llama 3's ``<|python_tag|>`` is a special token: written out for the parser (the call is
    read), left out of a ``tool_choice: none`` answer as every special token is."""
    from test_serve_tools import TEMPLATE

    tok = build_tiny_tokenizer(mask_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|python_tag|>"]})
    tok.chat_template = TEMPLATE
    sched = ReasoningScheduler()
    tag = tok.convert_tokens_to_ids("<|python_tag|>")
    sched.output = [tag, *tok(PARIS, add_special_tokens=False)["input_ids"]]
    with serving(sched, tokenizer=tok, tool_call_parser="llama3_json") as (url, _, _):
        c = client(url)
        out = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS)
        (call,) = out.choices[0].message.tool_calls
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        text = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                         tool_choice="none")  # fmt: skip
        assert text.choices[0].message.content == PARIS
