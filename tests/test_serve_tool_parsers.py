"""``--tool-call-parser llama3_json`` and ``mistral`` (``hermes`` and ``pangu``:
``test_serve_tools.py``).

A Llama 3.x answer that is nothing but calls — JSON objects ``{"name", "parameters"}`` separated
by ``;``, after an optional ``<|python_tag|>`` — comes back as ``tool_calls``; any other answer is
text, streamed from its first characters on. A Mistral answer's JSON list after ``[TOOL_CALLS]``,
or its calls written ``[TOOL_CALLS]name[ARGS]{...}``, come back as calls whose ids a Mistral
template takes back (nine letters and digits)."""

from __future__ import annotations

import copy
import itertools
import json
import random
import re

import pytest
from test_serve_http import client, serving
from test_serve_tools import TOOLS, USER, ReasoningScheduler, arguments

from fluid_npu.model.tiny import build_tiny_tokenizer
from fluid_npu.serve.tool_text import PARSERS, ToolCallText

LLAMA3 = PARSERS["llama3_json"]
MISTRAL = PARSERS["mistral"]
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
        ("Sure: " + PARIS, "Sure: " + PARIS, []),  # (not the whole answer: text)
        (PARIS + ";", "", [("get_weather", {"city": "Paris"})]),  # (a last ';': vLLM reads it)
        ("<|python_tag|>[" + PARIS + "]", "<|python_tag|>[" + PARIS + "]", []),  # (objects only)
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
        # no call after the special tag (Llama 3.1's built-in tools): the tag stays out of the
        # text, as with tool_choice none
        sched.output = [tag, *tok("brave_search.call(query='x')", add_special_tokens=False)[
            "input_ids"]]  # fmt: skip
        for stream in (False, True):
            answer = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                               stream=stream)  # fmt: skip
            content = ("".join(ch.choices[0].delta.content or "" for ch in answer if ch.choices)
                       if stream else answer.choices[0].message.content)  # fmt: skip
            assert content == "brave_search.call(query='x')", stream


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("[TOOL_CALLS] [" + PARIS + ", " + OSLO + "]", "", [("get_weather", {"city": "Paris"}),
                                                          ("get_weather", {"city": "Oslo"})]),
        ("Checking.[TOOL_CALLS]" + PARIS, "Checking.", [("get_weather", {"city": "Paris"})]),
        ("[TOOL_CALLS] [" + PARIS[:-3], "[TOOL_CALLS] [" + PARIS[:-3], []),  # cut: text
        ("It is sunny.", "It is sunny.", []),
        # the later form (Small 3.2, Magistral, Devstral): one call per marker, name[ARGS]{...}
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [("get_weather",
                                                                {"city": "Paris"})]),
        ('Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',
         "Checking.", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
        ('[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Oslo"}', "",
         [("get_weather", {"city": "Oslo"})]),  # (version 11: the model's id is not kept)
        ('[TOOL_CALLS]get_weather{"city": "Oslo"}', "", [("get_weather", {"city": "Oslo"})]),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Pa', '[TOOL_CALLS]get_weather[ARGS]{"city": "Pa',
         []),  # cut inside the arguments: text
        ('[TOOL_CALLS] [ARGS]{"city": "Oslo"}', '[TOOL_CALLS] [ARGS]{"city": "Oslo"}', []),  # no
        # name; any other is read (vLLM's rule: a tool's name is any text)
        ('[TOOL_CALLS]weather:get[ARGS]{}', "", [("weather:get", {})]),
        ('[TOOL_CALLS]get_weather[ARGS]["Oslo"]', '[TOOL_CALLS]get_weather[ARGS]["Oslo"]', []),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"} done', '[TOOL_CALLS]get_weather[ARGS]'
         '{"city": "Oslo"} done', []),  # text after the call
    ],
)  # fmt: skip
def test_a_mistral_answer_splits_into_content_and_calls(text, content, calls):
    for pieces in ([text], list(text)):
        reader = ToolCallText(MISTRAL)
        passed = "".join(reader.add(p) for p in pieces)
        rest, found = reader.finish()
        assert passed + rest == content and arguments(found) == calls, pieces
        assert all(re.fullmatch("[A-Za-z0-9]{9}", c["id"]) for c in found)


def test_special_markers_are_read_in_any_delta_and_left_out_of_text():
    """Markers a tokenizer makes special tokens (written out for the parser): a whole answer in
    one delta (a step commits many tokens) is still its calls; outside a call they are left out
    of the content however the deltas cut them (a stop string makes the detokenizer hold text
    back, so a delta may end inside one)."""
    special = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")
    answer = '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Oslo"}'
    for text, content, calls in [
        (answer, "", [("get_weather", {"city": "Oslo"})]),
        ("Checking." + answer, "Checking.", [("get_weather", {"city": "Oslo"})]),
        ("get_weather[ARGS] is a tool[CALL_ID]", "get_weather is a tool", []),
        ("[AR is no marker", "[AR is no marker", []),
    ]:
        for cut in range(len(text) + 1):
            reader = ToolCallText(MISTRAL, special=special)
            passed = reader.add(text[:cut]) + reader.add(text[cut:])
            rest, found = reader.finish()
            assert (passed + rest, arguments(found)) == (content, calls), (text, cut)
    # an answer that ends in the start of a special marker's text keeps it (the model's own "["),
    # unless a stop string ended it there: then that is the marker's text, cut, and left out
    for stopped, content in ((False, "it is ["), (True, "it is ")):
        reader = ToolCallText(MISTRAL, special=special)
        passed = reader.add("it is [")
        rest, found = reader.finish(stopped=stopped)
        assert (passed + rest, found) == (content, []), stopped


# Mistral's rules: ids of nine letters and digits, calls written after [TOOL_CALLS]
NINE = (
    "{% for m in messages %}{% for c in m.tool_calls or [] %}"
    "{% if c.id | length != 9 %}{{ raise_exception('ids must be 9 characters') }}{% endif %}"
    "{% endfor %}{% if m.role == 'tool' and m.tool_call_id | length != 9 %}"
    "{{ raise_exception('ids must be 9 characters') }}{% endif %}"
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}{% for c in m.tool_calls or [] %}[TOOL_CALLS]"
    "{{ c.function | tojson }}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_mistral_calls_come_back_in_a_conversation():
    """The calls' ids are ones a Mistral template takes back: the conversation with the call and
    its result is rendered again (the next turn), where vLLM's long ids would be refused."""
    tok = build_tiny_tokenizer(mask_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    tok.chat_template = NINE
    sched = ReasoningScheduler()
    sched.max_len = 4000  # (byte-level tokens: the tools, twice)
    marker = tok.convert_tokens_to_ids("[TOOL_CALLS]")
    sched.output = [marker, *tok("[" + PARIS + "]", add_special_tokens=False)["input_ids"]]
    with serving(sched, tokenizer=tok, tool_call_parser="mistral") as (url, _, _):
        c = client(url)
        out = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS)
        (call,) = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and len(call.id) == 9
        back = [*USER, out.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "content": "sunny", "tool_call_id": call.id}]  # fmt: skip
        sched.output = tok("It is sunny.", add_special_tokens=False)["input_ids"]
        again = c.chat.completions.create(model="tiny", messages=back, tools=TOOLS)
        assert again.choices[0].message.content == "It is sunny."
        # a call tool_choice forces is one such template takes back too
        forced = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
        sched.output = tok(forced, add_special_tokens=False)["input_ids"]
        out = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                        tool_choice="required")  # fmt: skip
        (call,) = out.choices[0].message.tool_calls
        assert re.fullmatch("[A-Za-z0-9]{9}", call.id), call.id


# Mistral Small 3.2's form: [TOOL_CALLS]name[CALL_ID]id[ARGS]{...} per call, every marker special
SMALL32 = (
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}"
    "{% for c in m.tool_calls %}{% if c.id | length != 9 %}"
    "{{ raise_exception('ids must be 9 characters') }}{% endif %}[TOOL_CALLS]"
    "{{ c.function.name }}[CALL_ID]{{ c.id }}[ARGS]{{ c.function.arguments | tojson }}"
    "{% endfor %}</s>{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.tool_call_id }}[TOOL_CONTENT]"
    "{{ m.content }}[/TOOL_RESULTS]{% else %}[INST]{{ m.content }}[/INST]{% endif %}{% endfor %}"
)


def test_mistral_calls_in_the_later_form_over_the_wire():
    """A tokenizer whose ``[TOOL_CALLS]``, ``[CALL_ID]`` and ``[ARGS]`` are special tokens: the
    answer's markers are written out for the parser, two calls come back (whole, streamed too)
    with ids the template takes back in the next turn; an answer without a call leaves the
    markers out of its text."""
    tok = build_tiny_tokenizer(mask_token=True)
    markers = ["[TOOL_CALLS]", "[CALL_ID]", "[ARGS]", "[TOOL_RESULTS]", "[TOOL_CONTENT]",
               "[/TOOL_RESULTS]", "[INST]", "[/INST]"]  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": markers})
    tok.chat_template = SMALL32
    call, cid, args = (tok.convert_tokens_to_ids(m) for m in markers[:3])

    def text(t: str) -> list[int]:
        return tok(t, add_special_tokens=False)["input_ids"]

    sched = ReasoningScheduler()
    sched.max_len = 4000
    sched.output = [call, *text("get_weather"), cid, *text("a1B2c3D4e"), args,
                    *text('{"city": "Paris"}'), call, *text("get_weather"), args,
                    *text('{"city": "Oslo"}')]  # fmt: skip
    with serving(sched, tokenizer=tok, tool_call_parser="mistral") as (url, _, _):
        c = client(url)
        out = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and message.content is None
        calls = arguments([t.model_dump() for t in message.tool_calls])
        assert calls == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
        assert all(re.fullmatch("[A-Za-z0-9]{9}", t.id) for t in message.tool_calls)
        streamed = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                             stream=True)  # fmt: skip
        deltas = [d for ch in streamed if ch.choices for d in ch.choices[0].delta.tool_calls or []]
        assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == (
            arguments([t.model_dump() for t in message.tool_calls])
        )
        back = [*USER, message.model_dump(exclude_none=True)] + [
            {"role": "tool", "content": "sunny", "tool_call_id": t.id} for t in message.tool_calls
        ]
        sched.output = text("It is sunny.")
        again = c.chat.completions.create(model="tiny", messages=back, tools=TOOLS)
        assert again.choices[0].message.content == "It is sunny."
        # no call: the special markers stay out of the text, as every special token does
        sched.output = [*text("get_weather"), args, *text("is a tool")]
        plain = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS)
        assert plain.choices[0].message.content == "get_weatheris a tool"


# Qwen3-Coder's (and Qwen3.5's) XML calls: values typed by the offered function's schema
XML = PARSERS["qwen3_coder"]
PROPERTIES = {
    "city": {"type": "string"}, "nights": {"type": "integer"}, "budget": {"type": "number"},
    "late": {"type": "boolean"}, "guests": {"type": "array"}, "prefs": {"type": "object"},
    "note": {"type": ["string", "null"]},
    "floor": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    "rooms": {"type": ["integer", "null"], "anyOf": [{"type": "integer"}]},
}  # fmt: skip
TYPED = [{"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "properties": PROPERTIES}}}]  # fmt: skip


def xml_call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


@pytest.mark.parametrize(
    "text, content, calls",
    [
        (xml_call("book", city="Paris", nights="3", budget="99.5", late="True", guests='["a", "b"]',
                  prefs="{'view': 'sea'}", note="None", floor="null"),
         "", [("book", {"city": "Paris", "nights": 3, "budget": 99.5, "late": True,
                        "guests": ["a", "b"], "prefs": {"view": "sea"}, "note": None,
                        "floor": None})]),
        # a string keeps its text (lines, spaces, 'null', digits); an undeclared argument too
        (xml_call("book", city="  New\nYork ", note="null", other="42"), "",
         [("book", {"city": "  New\nYork ", "note": None, "other": "42"})]),
        (xml_call("book", city="007"), "", [("book", {"city": "007"})]),
        # a value that is not of its type stays text; a number without a fraction is an integer
        (xml_call("book", nights="three", budget="100.0", late="maybe"), "",
         [("book", {"nights": "three", "budget": 100, "late": "maybe"})]),
        (xml_call("book", budget="inf"), "", [("book", {"budget": "inf"})]),
        # a function not offered: every value its text
        (xml_call("other", n="1"), "", [("other", {"n": "1"})]),
        ("Let me book.\n\n" + xml_call("book", city="Oslo") + "\n" + xml_call("book", city="Rome"),
         "Let me book.\n\n", [("book", {"city": "Oslo"}), ("book", {"city": "Rome"})]),
        (xml_call("book"), "", [("book", {})]),
        # what JSON cannot write stays text (a set, bytes, too deep); a huge number stays a float
        (xml_call("book", prefs="{1, 2}", guests="[b'x']", budget="1e300"), "",
         [("book", {"prefs": "{1, 2}", "guests": "[b'x']", "budget": 1e300})]),
        (xml_call("book", guests="[" * 5000 + "]" * 5000), "",
         [("book", {"guests": "[" * 5000 + "]" * 5000})]),
        (xml_call("book", rooms="2"), "", [("book", {"rooms": 2})]),
        # a </parameter> left out: the value ends where the next parameter starts (vLLM's reading)
        ("<tool_call>\n<function=book>\n<parameter=city>\nOslo\n<parameter=nights>\n2\n"
         "</function>\n</tool_call>", "", [("book", {"city": "Oslo", "nights": 2})]),
        # not a call: the whole answer stays text
        (xml_call("book", city="Oslo")[:-25], xml_call("book", city="Oslo")[:-25], []),
        ("<tool_call>\n<function=book>\nsay hi\n</function>\n</tool_call>",
         "<tool_call>\n<function=book>\nsay hi\n</function>\n</tool_call>", []),
        ('<tool_call>\n{"name": "book", "arguments": {}}\n</tool_call>',
         '<tool_call>\n{"name": "book", "arguments": {}}\n</tool_call>', []),
        (xml_call("{{ name }}"), xml_call("{{ name }}"), []),  # (a name with spaces: no call)
        (xml_call("book", city="a") + "\n" + xml_call("book", city="a", city2="b")[:-30],
         xml_call("book", city="a") + "\n" + xml_call("book", city="a", city2="b")[:-30], []),
    ],
)  # fmt: skip
def test_an_xml_answer_is_typed_by_the_functions_schema(text, content, calls):
    schema = copy.deepcopy(TYPED)
    for pieces in ([text], list(text)):
        reader = ToolCallText(XML, tools=TYPED)
        passed = "".join(reader.add(p) for p in pieces)
        rest, found = reader.finish()
        assert passed + rest == content and arguments(found) == calls, pieces
    assert schema == TYPED  # (the request's tools are read, never changed)


# Qwen3.5's chat template, cut down: tools in the system turn, calls written as XML (a string
# as it is, anything else as JSON), results in a user turn
QWEN35 = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}{% if m.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n<function={{ c.function.name }}>\n"
    "{% for k, v in c.function.arguments | items %}<parameter={{ k }}>\n"
    "{{ v if v is string else v | tojson }}\n</parameter>\n{% endfor %}</function>\n</tool_call>"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_xml_calls_over_the_wire_come_back_in_the_conversation():
    """--tool-call-parser qwen3_coder: the calls typed by the request's tools, streamed chunks
    equal to the whole answer, and the conversation with the calls and their results renders
    them back as the model wrote them."""
    tok = build_tiny_tokenizer(mask_token=True)
    tok.chat_template = QWEN35
    sched = ReasoningScheduler()
    sched.max_len = 4000
    answer = xml_call("book", city="Paris", nights="3") + "\n" + xml_call("book", city="Rome")
    sched.output = tok(answer, add_special_tokens=False)["input_ids"]
    with serving(sched, tokenizer=tok, tool_call_parser="qwen3_coder") as (url, _, _):
        c = client(url)
        out = c.chat.completions.create(model="tiny", messages=USER, tools=TYPED)
        message = out.choices[0].message
        calls = arguments([t.model_dump() for t in message.tool_calls])
        assert calls == [("book", {"city": "Paris", "nights": 3}), ("book", {"city": "Rome"})]
        assert out.choices[0].finish_reason == "tool_calls" and message.content is None
        streamed = c.chat.completions.create(model="tiny", messages=USER, tools=TYPED,
                                             stream=True)  # fmt: skip
        deltas = [d for ch in streamed if ch.choices for d in ch.choices[0].delta.tool_calls or []]
        assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == calls
        back = [*USER, message.model_dump(exclude_none=True)] + [
            {"role": "tool", "content": "booked", "tool_call_id": t.id} for t in message.tool_calls
        ]
        sched.output = tok("Booked.", add_special_tokens=False)["input_ids"]
        again = c.chat.completions.create(model="tiny", messages=back, tools=TYPED)
        assert again.choices[0].message.content == "Booked."
        prompt = tok.decode(sched.requests[-1].prompt)  # (the calls as the model wrote them)
        assert xml_call("book", city="Paris", nights="3") in prompt
        assert xml_call("book", city="Rome") in prompt
