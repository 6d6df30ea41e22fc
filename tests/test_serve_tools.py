"""Tool calling in ``fluid serve`` (``serve/tools.py``, ``data/tooluse.py``): the tools a chat
request offers reach the chat template, a model's ``<tool_call>`` blocks come back as the
message's ``tool_calls`` (streamed or not, the same), conversations carry calls and their results
back to the template, and what the server cannot do is a 400 naming the field. Driven by the
official ``openai`` client against the scripted scheduler of ``test_serve_http.py``, and once
against the real engine."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import httpx
import pytest
from test_serve_http import ReasoningScheduler, chain_scheduler, client, serving

from fluid_npu.data.tooluse import check_tool_calls, check_tools
from fluid_npu.errors import ConfigError, DataError
from fluid_npu.model.tiny import build_tiny_tokenizer
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.tools import PARSERS, ToolCallText, ToolParser, tool_parser, tool_setting

HERMES = PARSERS["hermes"]
READS_HERMES = ToolParser(HERMES, {})  # (bound to a tokenizer that spells its markers as text)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
# a hermes-style template (tools listed in a system turn; calls and results written back)
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content %}{{ m.content }}{% endif %}{% for c in m.tool_calls or [] %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n'
    "</tool_call>{% endfor %}{% if m.role == 'tool' %} ({{ m.tool_call_id }}){% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
USER = [{"role": "user", "content": "Weather in Paris?"}]
DEEP = '<tool_call>\n{"name": "f", "arguments": {"x": ' + "[" * 3000
INF = '<tool_call>{"name": "f", "arguments": {"x": 1e999}}</tool_call>'
HUGE = '<tool_call>{"name": "f", "arguments": {"x": ' + "1" * 5000 + "}}</tool_call>"


def parsed(pieces: list[str], parallel: bool = True) -> tuple[str, list[dict[str, Any]]]:
    """The content and calls of an answer fed as ``pieces``."""
    calls = ToolCallText(HERMES, parallel)
    content = "".join(calls.add(p) for p in pieces)
    rest, found = calls.finish()
    return content + rest, found


def arguments(found: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in found]


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("It is sunny.", "It is sunny.", []),
        ("Let me look." + CALL, "Let me look.", [("get_weather", {"city": "Paris"})]),
        (CALL + "\n" + CALL2, "", [("get_weather", {"city": "Paris"}),
                                   ("get_weather", {"city": "Oslo"})]),
        (CALL + "\nThat is all.", "", [("get_weather", {"city": "Paris"})]),  # (as vLLM)
        (CALL[: -len("</tool_call>")], "", [("get_weather", {"city": "Paris"})]),  # cut, JSON whole
        (CALL[:30], CALL[:30], []),  # cut inside the JSON: not a call, the text as it is
        (INF, INF, []),  # a number JSON cannot write back as arguments: the text as it is
        ("a <tool> b <tool_call", "a <tool> b <tool_call", []),
        ('<tool_call>{"name": "f"}</tool_call>', '<tool_call>{"name": "f"}</tool_call>', []),
        (CALL + '<tool_call>["x"]</tool_call>', CALL + '<tool_call>["x"]</tool_call>', []),
        ("x<tool_call>\n{\"name\": \"g\", \"arguments\": {\"s\": \"é\"}}", "x",
         [("g", {"s": "é"})]),
        ('<tool_call>{"name": "g", "arguments": "{\\"n\\": 1}"}</tool_call>', "",
         [("g", {"n": 1})]),  # the arguments object written as a JSON text
        (DEEP, DEEP, []),  # a model in a loop: nested past Python's recursion limit
        (HUGE, HUGE, []),  # ... or an integer longer than Python converts
    ],
)  # fmt: skip
def test_an_answer_splits_into_content_and_calls_however_it_is_streamed(text, content, calls):
    """Whole, character by character or in random pieces: the same content and calls, and no
    piece of a marker ever passed on as content."""
    rng = random.Random(0)
    cuts = [sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1))) for _ in range(20)]
    splits = [[text], list(text)] + [
        [text[a:b] for a, b in itertools.pairwise([0, *cut, len(text)])] for cut in cuts
    ]
    for pieces in splits:
        got_content, found = parsed(pieces)
        assert got_content == content and arguments(found) == calls, pieces
        streamed = ToolCallText(HERMES)
        passed = "".join(streamed.add(p) for p in pieces)
        assert passed == (content if calls else passed) and "<tool_call>" not in passed
    if calls:
        ids = [c["id"] for c in parsed([text])[1]]
        assert all(i.startswith("chatcmpl-tool-") for i in ids) and len(set(ids)) == len(ids)
        assert arguments(parsed([text], parallel=False)[1]) == calls[:1]
        cut = ToolCallText(HERMES)  # an answer that did not end (aborted): all text, no calls
        assert cut.add(text) + cut.finish(parse=False)[0] == text


def test_what_a_request_asks_of_its_tools():
    assert tool_setting(None, None, None, None).reader() is None  # no tools: plain chat
    none = tool_setting(TOOLS, "none", None, READS_HERMES)
    assert none.tools == TOOLS and none.reader() is None  # rendered, the answer left as text
    auto = tool_setting(TOOLS, None, False, READS_HERMES)  # the OpenAI default with tools: auto
    assert auto.parser == READS_HERMES and not auto.parallel
    for tools, choice, parser, param, says in (
        (TOOLS, None, None, "tool_choice", "--enable-auto-tool-choice and --tool-call-parser"),
        (None, "required", None, "tool_choice", "needs tools to call"),
        (TOOLS, {"type": "function", "function": {"name": "get_time"}}, None,
         "tool_choice", "the tools offered are ['get_weather']"),
        (TOOLS, {"type": "function", "name": "get_weather"}, None, "tool_choice",
         'a named tool_choice is {"type": "function", "function": {"name": ...}}'),
        (TOOLS, "any", READS_HERMES, "tool_choice", "is not 'none', 'auto', 'required' or"),
        (None, "auto", READS_HERMES, "tool_choice", "needs tools"),
        ([{"type": "function", "function": {"name": "f", "params": {}}}], None, READS_HERMES,
         "tools", "tools[0].function has 'params'"),
        ([{"type": "retrieval"}], None, READS_HERMES, "tools",
         'tools[0] must be {"type": "function"'),
        ([], None, READS_HERMES, "tools", "non-empty list"),
    ):  # fmt: skip
        with pytest.raises(APIError) as info:
            tool_setting(tools, choice, None, parser)
        assert info.value.param == param and says in info.value.message, (choice, tools)


def test_conversation_tool_calls_reach_the_template_as_objects():
    call = {"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": '{"a": [1, 2]}'}}  # fmt: skip
    assert check_tool_calls([call], "m")[0]["function"]["arguments"] == {"a": [1, 2]}
    given = {**call, "function": {"name": "f", "arguments": {"a": 1}}}  # an object is kept
    assert check_tool_calls([given], "m")[0]["function"]["arguments"] == {"a": 1}
    shapes = {**call, "index": 0, "function": {**call["function"], "parsed_arguments": None}}
    assert check_tool_calls([shapes], "m") == check_tool_calls([call], "m")  # (client helpers')
    for bad, says in (
        ({**call, "function": {"name": "f", "arguments": "[" * 100000}}, "not JSON this server"),
        ({**call, "function": {"name": "f", "arguments": "1" * 5000}}, "not JSON this server"),
        ({**call, "function": {"name": "f", "arguments": "[1]"}}, "must be a JSON object"),
        ({**call, "id": ""}, ".id must be the call's id"),
        ({**call, "type": "code"}, 'must be {"id"'),
        ({**call, "extra": 1}, 'must be {"id"'),
    ):
        with pytest.raises(DataError, match=".*" + says.replace("(", r"\(").replace("{", r"\{")):
            check_tool_calls([bad], "messages[1].tool_calls")
    with pytest.raises(DataError, match=r"tools\[0\].function.strict must be a boolean"):
        check_tools([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "tools")
    given = [{"type": "function", "function": {"name": "f", "parameters": None, "strict": None}}]
    assert check_tools(given, "tools") == [{"type": "function", "function": {"name": "f"}}]
    assert given[0]["function"]["strict"] is None  # (the caller's dicts untouched)


def test_tool_calls_over_the_wire():
    """``tools`` rendered by the template; the answer's calls in ``message.tool_calls`` with
    ``finish_reason`` ``tool_calls``, streamed chunks adding up to the same; the next turn sends
    the message and the tool's result back; ``tool_choice: "none"`` leaves the text as it is;
    ``parallel_tool_calls: false`` keeps the first call; ``n`` choices each parsed; a block
    that is not a call leaves all text; ``/tokenize`` renders the tools as chat does."""
    tok = build_tiny_tokenizer(mask_token=True)
    tok.chat_template = TEMPLATE

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    sched = ReasoningScheduler()
    sched.output = ids("Let me look." + CALL)
    with serving(sched, tokenizer=tok, tool_call_parser="hermes") as (url, _, _):
        c = client(url)
        out = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=200)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert out.usage.completion_tokens == len(sched.output) + 1  # the EOS counted
        offered = sched.requests[-1].prompt
        assert json.dumps(TOOLS[0]) in tok.decode(offered)
        tokens = httpx.post(f"{url}/tokenize", json={"messages": USER, "tools": TOOLS}).json()
        assert tokens["tokens"] == offered
        chunks = list(c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                                max_tokens=200, stream=True))  # fmt: skip
        deltas = [ch.choices[0] for ch in chunks if ch.choices]
        assert "".join(d.delta.content or "" for d in deltas) == "Let me look."
        [streamed] = [t for d in deltas for t in d.delta.tool_calls or []]
        assert (streamed.index, streamed.function.name) == (0, "get_weather")
        assert streamed.function.arguments == call.function.arguments
        assert [d.finish_reason for d in deltas if d.finish_reason] == ["tool_calls"]
        # the next turn: the message as the client got it, then the tool's result
        turns = [*USER, choice.message,
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]  # fmt: skip
        c.chat.completions.create(model="tiny", messages=turns, tools=TOOLS, max_tokens=5)
        rendered = tok.decode(sched.requests[-1].prompt)
        # the same turn as the client's helpers hand it back: null refusal / audio /
        # function_call / parsed, a call's index and parsed_arguments
        dumped = {**choice.message.model_dump(), "parsed": None}
        dumped["tool_calls"][0].update(index=0)
        dumped["tool_calls"][0]["function"]["parsed_arguments"] = None
        c.chat.completions.create(model="tiny", messages=[*USER, dumped, turns[-1]], tools=TOOLS,
                                  max_tokens=5)  # fmt: skip
        assert tok.decode(sched.requests[-1].prompt) == rendered
        refused = httpx.post(f"{url}/v1/chat/completions", json={
            "messages": [*USER, {**dumped, "refusal": "no"}], "tools": TOOLS})  # fmt: skip
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "messages[1].refusal"
        assert "<|im_start|>assistant\nLet me look." + CALL in rendered  # arguments as an object
        assert f"<|im_start|>tool\nsunny ({call.id})" in rendered
        none = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                         tool_choice="none", max_tokens=200)  # fmt: skip
        assert none.choices[0].message.content == "Let me look." + CALL
        assert none.choices[0].message.tool_calls is None
        assert none.choices[0].finish_reason == "stop"
        sched.output = ids(CALL + "\n" + CALL2)
        both = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, n=2)
        for ch in both.choices:
            assert ch.message.content is None
            cities = [json.loads(t.function.arguments)["city"] for t in ch.message.tool_calls]
            assert cities == ["Paris", "Oslo"]
        chunks = list(c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                                stream=True))  # fmt: skip
        indices = [t.index for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls
                   or []]  # fmt: skip
        assert indices == [0, 1]
        one = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                        parallel_tool_calls=False)  # fmt: skip
        assert len(one.choices[0].message.tool_calls) == 1
        sched.output = ids('<tool_call>\n{"name": "get_weather"}\n</tool_call>')  # no arguments
        text = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS)
        assert text.choices[0].message.content == tok.decode(sched.output)
        assert text.choices[0].finish_reason == "stop" and not text.choices[0].message.tool_calls
        for extra, param in (({"tool_choice": {"type": "function", "function": {"name": "f"}}},
                              "tool_choice"),
                             ({"tools": [{"type": "function"}]}, "tools"),
                             ({"tools": TOOLS, "tool_choice": "auto", "messages": [
                                 {"role": "tool", "content": "x"}]}, "messages")):  # fmt: skip
            bad = httpx.post(f"{url}/v1/chat/completions",
                             json={"messages": USER, "tools": TOOLS, **extra})  # fmt: skip
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, extra
    plain = build_tiny_tokenizer(mask_token=True)  # ChatML, which lists no tools
    with serving(sched, tokenizer=plain, tool_call_parser="hermes") as (url, _, _):
        for path in ("/v1/chat/completions", "/tokenize"):
            bad = httpx.post(f"{url}{path}", json={"messages": USER, "tools": TOOLS})
            error = bad.json()["error"]
            assert bad.status_code == 400 and error["param"] == "tools", path
            assert "the chat template does not use tools" in error["message"]
    with serving(sched, tokenizer=tok) as (url, _, _):  # no --enable-auto-tool-choice
        bad = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER, "tools": TOOLS})
        error = bad.json()["error"]
        assert bad.status_code == 400 and error["param"] == "tool_choice"
        assert "--enable-auto-tool-choice" in error["message"]
        plain = client(url).chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                                    tool_choice="none")  # fmt: skip
        assert plain.choices[0].message.content == tok.decode(sched.output)


def test_reasoning_then_a_call():
    """With a reasoning parser too, the reasoning comes apart and the calls from the answer."""
    tok = build_tiny_tokenizer(mask_token=True)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    tok.chat_template = TEMPLATE
    sched = ReasoningScheduler()
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    sched.output = [start, *tok("Paris: look it up.", add_special_tokens=False)["input_ids"], end,
                    *tok(CALL, add_special_tokens=False)["input_ids"]]  # fmt: skip
    with serving(sched, tokenizer=tok, tool_call_parser="hermes",
                 reasoning_parser="qwen3") as (url, _, _):  # fmt: skip
        c = client(url)
        message = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS).choices[0]
        assert message.finish_reason == "tool_calls"
        assert message.message.model_extra["reasoning"] == "Paris: look it up."
        assert message.message.content is None and len(message.message.tool_calls) == 1
        chunks = list(c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                                stream=True))  # fmt: skip
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert "".join(d.model_extra.get("reasoning") or "" for d in deltas) == "Paris: look it up."
        assert not any(d.content for d in deltas)
        assert sum(len(d.tool_calls or []) for d in deltas) == 1


def test_the_real_engine_returns_a_models_call():
    """The real scheduler (entropy drafting) decoding a constructed chain Llama that answers a
    ``<tool_call>`` block: the call comes back parsed, streamed or not."""
    tok = build_tiny_tokenizer(mask_token=True)
    body = '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    tok.add_tokens(["<tool_call>", body, "</tool_call>"])  # (text, not special tokens)
    tok.chat_template = TEMPLATE
    opening, json_body, closing = tok.convert_tokens_to_ids(["<tool_call>", body, "</tool_call>"])
    newline = tok("\n", add_special_tokens=False)["input_ids"][-1]  # the prompt's last token
    succ = {newline: opening, opening: json_body, json_body: closing, closing: tok.eos_token_id}
    sched = chain_scheduler(tok, succ, newline, max_len=512)
    with serving(sched, tokenizer=tok, tool_call_parser="hermes") as (url, _, _):
        c = client(url)
        for stream in (False, True):
            kwargs = {"model": "tiny", "messages": USER, "tools": TOOLS, "temperature": 0,
                      "max_tokens": 8}  # fmt: skip
            if stream:
                chunks = list(c.chat.completions.create(**kwargs, stream=True))
                calls = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls
                         or []]  # fmt: skip
                finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
            else:
                choice = c.chat.completions.create(**kwargs).choices[0]
                calls, finish = choice.message.tool_calls, choice.finish_reason
            assert finish == "tool_calls" and len(calls) == 1, stream
            assert json.loads(calls[0].function.arguments) == {"city": "Paris"}


def test_markers_a_tokenizer_makes_special_are_written_out_for_the_parser():
    """Markers that decode as text are read there; one special token each is written out in the
    answer's text (``spelled``); a marker the text cannot show, an unknown parser, or a ``pangu``
    marker that is not one token, is refused at start."""
    tok = build_tiny_tokenizer(mask_token=True)
    assert tool_parser("hermes", tok) == READS_HERMES  # byte-level text: the markers show
    special = build_tiny_tokenizer(mask_token=True)
    special.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=True)
    ids = special.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    assert tool_parser("hermes", special).spelled == dict(zip(ids, ["<tool_call>", "</tool_call>"]))
    split = build_tiny_tokenizer(mask_token=True)
    split.add_tokens(["<tool"], special_tokens=True)  # the marker spelled partly by a special
    with pytest.raises(ConfigError, match="spells '<tool_call>' with special tokens"):
        tool_parser("hermes", split)
    with pytest.raises(ConfigError, match="'\\[unused11\\]' is not one token of this model's"):
        tool_parser("pangu", tok)
    with pytest.raises(ConfigError, match="'x' is not one of hermes, llama3_json, mistral, pangu"):
        tool_parser("x", tok)


def test_the_detokenizer_writes_out_the_tokens_it_is_told_to():
    """Fed in any pieces, a detokenizer with ``spelled`` tokens gives the text decoded between
    them and the tokens' own text where they stand; without it they are skipped as before."""
    from fluid_npu.sampling.detok import Detokenizer

    tok = build_tiny_tokenizer(mask_token=True, reserved=13)
    opening, closing = tok.convert_tokens_to_ids(["[unused11]", "[unused12]"])
    words = tok("Checking. [1, 2] done", add_special_tokens=False)["input_ids"]
    out = [*words[:10], opening, *words[10:16], closing, *words[16:]]
    spelled = {opening: "<<", closing: ">>"}
    prompt = tok("hi", add_special_tokens=False)["input_ids"]
    for size in (1, 2, 3, 7, len(out)):
        d = Detokenizer(tok, prompt=prompt, spelled=spelled)
        text = "".join(d.add(out[k : k + size]) for k in range(0, len(out), size)) + d.flush()
        assert text == "Checking. <<[1, 2]>> done", size
    plain = Detokenizer(tok, prompt=prompt)
    assert plain.add(out) + plain.flush() == "Checking. [1, 2] done"


def test_openpangu_calls_between_special_tokens():
    """``--tool-call-parser pangu``: openPangu writes a list of calls between ``[unused11]`` and
    ``[unused12]`` (special tokens): every call comes back, streamed or not; beside
    ``--reasoning-parser openpangu`` the reasoning comes apart first; with ``tool_choice: none``
    the special markers stay out of the text, as any special token."""
    tok = build_tiny_tokenizer(mask_token=True, reserved=18)
    tok.chat_template = TEMPLATE
    opening, closing, think, done = tok.convert_tokens_to_ids(
        ["[unused11]", "[unused12]", "[unused16]", "[unused17]"]
    )
    body = ('[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
            '{"name": "get_weather", "parameters": {"city": "Oslo"}}]')  # fmt: skip

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    sched = ReasoningScheduler()
    answer = [*ids("Checking."), opening, *ids(body), closing]
    for reasoning in (None, "openpangu"):
        sched.output = answer if reasoning is None else [think, *ids("look up"), done, *answer]
        with serving(sched, tokenizer=tok, tool_call_parser="pangu",
                     reasoning_parser=reasoning) as (url, _, _):  # fmt: skip
            c = client(url)
            out = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS)
            message = out.choices[0].message
            assert out.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
            cities = [json.loads(t.function.arguments)["city"] for t in message.tool_calls]
            assert cities == ["Paris", "Oslo"]
            if reasoning is not None:
                assert message.model_extra["reasoning"] == "look up"
            chunks = list(c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                                    stream=True))  # fmt: skip
            deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
            assert "".join(d.content or "" for d in deltas) == "Checking."
            assert [t.function.arguments for d in deltas for t in d.tool_calls or []] == [
                t.function.arguments for t in message.tool_calls]  # fmt: skip
            text = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                             tool_choice="none")  # fmt: skip
            assert text.choices[0].message.content == "Checking." + body
            # a stop string found in a marker's text (written for the parser only) ends the
            # answer there, and no piece of the marker becomes content
            cut = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, stop=["]"])
            assert cut.choices[0].message.content == "Checking.", cut
            assert (cut.choices[0].finish_reason, cut.choices[0].model_extra["stop_reason"]) == (
                "stop", "]")  # fmt: skip
            chunks = list(c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                                    stop=["]"], stream=True))  # fmt: skip
            streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert streamed == "Checking."


def test_a_stream_ends_even_when_its_answer_fails(monkeypatch):
    """A failure while an answer is read (here a broken tool parser) ends the stream with an
    error event, as an engine failure does, instead of leaving the client waiting."""

    def broken(self: ToolCallText, parse: bool = True, stopped: bool = False) -> Any:
        raise RuntimeError("parser broke")

    monkeypatch.setattr(ToolCallText, "finish", broken)
    tok = build_tiny_tokenizer(mask_token=True)
    tok.chat_template = TEMPLATE
    sched = ReasoningScheduler()
    sched.output = tok(CALL, add_special_tokens=False)["input_ids"]
    with serving(sched, tokenizer=tok, tool_call_parser="hermes") as (url, _, _):
        body = {"messages": USER, "tools": TOOLS, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            events = [line for line in r.iter_lines() if line]
        assert events[-1] == "data: [DONE]"  # (after the error, as vLLM ends such a stream)
        last = json.loads(events[-2].removeprefix("data: "))["error"]
        assert last["type"] == "server_error" and "RuntimeError: parser broke" in last["message"]
        whole = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
        assert whole.status_code == 500 and "parser broke" in whole.json()["error"]["message"]


def test_a_template_is_checked_for_tools_once():
    """Whether a template ignores tools costs a second rendering the first time it meets them,
    not on every request (the tokenizing thread is shared by all requests)."""
    from fluid_npu.sampling import prompts

    tok = build_tiny_tokenizer(mask_token=True)
    tok.chat_template = TEMPLATE + "{# once #}"  # (a template no other test has shown)
    renders = []
    real = tok.apply_chat_template

    def counted(*args: Any, **kwargs: Any) -> Any:
        renders.append(kwargs.get("tools"))
        return real(*args, **kwargs)

    tok.apply_chat_template = counted
    first = prompts.chat_template_ids(tok, USER, tools=TOOLS)
    assert renders == [TOOLS, None]  # with the tools, then without: they are used
    assert prompts.chat_template_ids(tok, USER, tools=TOOLS) == first and renders[2:] == [TOOLS]
