"""The OpenAI Responses API on ``fluid serve`` (``/v1/responses``: ``serve/responses_request.py``,
``serve/responses_output.py``): a request decodes as the chat request it maps to (the same prompt
tokens, the same text), streamed events add up to the non-streamed response, items carry a
conversation's turns, calls and reasoning back, and what a stateless text server cannot do is a 400
naming the field. Driven by the official ``openai`` client against the scripted schedulers of
``test_serve_http.py``; ``test_serve_live.py`` runs it on the real engine."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel
from test_serve_http import TOK, ReasoningScheduler, ScriptedScheduler, _until, client, serving
from test_serve_tools import CALL, TEMPLATE, TOOLS

from fluid_npu.model.tiny import build_tiny_tokenizer
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.responses import Shape
from fluid_npu.serve.responses_output import ResponseOutput
from fluid_npu.serve.responses_request import parse_responses

USER = [{"role": "user", "content": "Weather in Paris?"}]
FLAT = [{"type": "function", **TOOLS[0]["function"]}]  # the Responses API's function tool


def raw_events(url: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A streamed response's server-sent events as (event name, data) pairs."""
    events, name = [], None
    with httpx.stream("POST", f"{url}/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
    return events


def test_a_response_is_the_chat_answer_streamed_or_not():
    """Text input with instructions decodes the prompt chat renders for a system and a user
    message, with the same answer and usage; the stream's events are named by their type,
    numbered from 0 and add up to the response; a cut answer is incomplete; logprobs are chat's;
    the response repeats the request's settings (the decoding defaults filled in)."""
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, worker):
        c = client(url)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        chat = c.chat.completions.create(model="tiny", messages=messages, temperature=0)
        chat_prompt = sched.requests[-1].prompt
        r = c.responses.create(
            model="tiny", instructions="Be brief.", input="Hi", temperature=0, metadata={"run": "7"}
        )
        assert sched.requests[-1].prompt == chat_prompt
        assert r.status == "completed" and r.completed_at and r.id.startswith("resp_")
        [message] = r.output
        assert message.type == "message" and message.role == "assistant"
        assert message.status == "completed" and message.id.startswith("msg_")
        assert r.output_text == chat.choices[0].message.content
        u = r.usage
        assert (u.input_tokens, u.output_tokens) == (
            chat.usage.prompt_tokens,
            chat.usage.completion_tokens,
        )
        assert u.total_tokens == u.input_tokens + u.output_tokens
        assert u.output_tokens_details.reasoning_tokens == 0
        assert u.model_extra["forwards"] == chat.usage.model_extra["forwards"]
        assert (r.metadata, r.instructions, r.temperature, r.top_p) == (
            {"run": "7"},
            "Be brief.",
            0.0,
            1.0,
        )
        assert (r.tool_choice, r.tools, r.store, r.text.format.type) == ("none", [], False, "text")
        default = c.responses.create(model="tiny", input="Hi")
        assert default.temperature == 1.0  # (the server's default, as decoded)
        # streamed: the client's accumulator gets the same response
        body = {"model": "tiny", "instructions": "Be brief.", "input": "Hi", "temperature": 0}
        with c.responses.stream(**body) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_response()
        assert final.output_text == r.output_text and final.usage == r.usage
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert kinds[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        events = raw_events(url, body)
        assert [name for name, _ in events] == [data["type"] for _, data in events] == kinds
        assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
        deltas = [d for _, d in events if d["type"] == "response.output_text.delta"]
        assert "".join(d["delta"] for d in deltas) == r.output_text
        assert events[0][1]["response"]["status"] == "in_progress"
        # cut by max_output_tokens: incomplete, streamed or not
        cut = c.responses.create(model="tiny", input="Hi", max_output_tokens=3)
        assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
        assert cut.output[0].status == "incomplete" and cut.usage.output_tokens == 3
        assert raw_events(url, {"input": "Hi", "max_output_tokens": 3})[-1][0] == (
            "response.incomplete"
        )
        # log-probabilities: chat's entries, in the text part and its deltas
        lp = c.chat.completions.create(
            model="tiny", messages=messages[1:], logprobs=True, top_logprobs=2, max_tokens=5
        )
        out = c.responses.create(
            model="tiny",
            input="Hi",
            top_logprobs=2,
            max_output_tokens=5,
            include=["message.output_text.logprobs"],
        )
        got = [e.model_dump() for e in out.output[0].content[0].logprobs]
        assert got == [e.model_dump() for e in lp.choices[0].logprobs.content]
        streamed = raw_events(url, {"input": "Hi", "top_logprobs": 2, "max_output_tokens": 5})
        assert [
            e
            for _, d in streamed
            if d["type"] == "response.output_text.delta"
            for e in d["logprobs"]
        ] == got
        # a client that leaves mid-stream frees its request
        sched.gate.clear()
        body = {"input": "Hi", "stream": True, "max_output_tokens": 200}
        with httpx.stream("POST", f"{url}/v1/responses", json=body) as gone:
            assert next(line for line in gone.iter_lines() if line.startswith("data: "))
        # (the steps wait until the server has seen the client go: else, on a busy host, the 200
        # tokens can all be made before the abort reaches the engine)
        _until(lambda: worker.inbox.qsize() >= 1, "the abort to reach the engine")
        sched.gate.set()
        _until(lambda: sched.requests[-1].request_id in sched.aborted, "the abort")


def test_items_carry_a_conversation():
    """A list of items (messages as texts or parts, an earlier response's output sent back) is
    the conversation chat renders for the same turns."""
    sched = ScriptedScheduler()
    with serving(sched) as (url, _, _):
        c = client(url)
        first = c.responses.create(model="tiny", input="Hi", max_output_tokens=6)
        turns = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": first.output_text},
            {"role": "developer", "content": "Short."},
            {"role": "user", "content": "More"},
        ]
        c.chat.completions.create(model="tiny", messages=turns, max_tokens=4)
        chat_prompt = sched.requests[-1].prompt
        items = [
            {"role": "user", "content": "Hi"},
            *[o.model_dump() for o in first.output],
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "Short."}],
            },
            {"role": "user", "content": [{"type": "input_text", "text": "More"}]},
        ]
        c.responses.create(model="tiny", input=items, max_output_tokens=4)
        assert sched.requests[-1].prompt == chat_prompt


def test_calls_and_their_results_as_items():
    """``--tool-call-parser``: the answer's text before a call is a message, each call a
    ``function_call`` item (streamed: its arguments in a delta); the flat function tools reach
    the template as chat's; the calls and their outputs sent back as items render as chat's
    assistant turn and tool message; a named ``tool_choice`` forces that call."""
    tok = build_tiny_tokenizer(mask_token=True)
    tok.chat_template = TEMPLATE
    sched = ReasoningScheduler()
    sched.output = tok("Let me look." + CALL, add_special_tokens=False)["input_ids"]
    with serving(sched, tokenizer=tok, tool_call_parser="hermes") as (url, _, _):
        c = client(url)
        chat = c.chat.completions.create(model="tiny", messages=USER, tools=TOOLS)
        chat_prompt = sched.requests[-1].prompt
        r = c.responses.create(model="tiny", input=USER[0]["content"], tools=FLAT)
        assert sched.requests[-1].prompt == chat_prompt
        message, call = r.output
        assert message.content[0].text == "Let me look." and call.type == "function_call"
        assert call.id.startswith("fc_") and call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Paris"} and call.status == "completed"
        assert r.status == "completed" and r.tools[0].name == "get_weather"
        with c.responses.stream(model="tiny", input=USER, tools=FLAT) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_response()
        assert [o.type for o in final.output] == ["message", "function_call"]
        assert final.output[1].arguments == call.arguments
        assert "response.function_call_arguments.delta" in kinds
        # the message's log-probabilities are its text's tokens, however the steps (1-3 tokens)
        # fall against the call's markup
        saved = sched.output
        for lead in ("Let me look.", "Let me loo.", "Let me lo.", "Hm"):
            sched.output = tok(lead + CALL, add_special_tokens=False)["input_ids"]
            for stream in (False, True):
                body = {"input": USER, "tools": FLAT, "top_logprobs": 1}
                if stream:
                    out = raw_events(url, body)[-1][1]["response"]["output"]
                else:
                    out = c.responses.create(model="tiny", **body).model_dump()["output"]
                assert [o["type"] for o in out] == ["message", "function_call"]
                spelled = [e["token"] for e in out[0]["content"][0]["logprobs"]]
                assert "".join(spelled) == lead, (lead, stream)
        sched.output = saved
        none = c.responses.create(
            model="tiny", input=USER, tools=[], tool_choice="auto", include=[]
        )
        assert none.output_text == tok.decode(sched.output)
        # the next turn: the calls and the tool's output
        chat_call = chat.choices[0].message.tool_calls[0]
        turns = [
            *USER,
            chat.choices[0].message,
            {"role": "tool", "tool_call_id": chat_call.id, "content": "sunny"},
        ]
        c.chat.completions.create(model="tiny", messages=turns, tools=TOOLS, max_tokens=3)
        chat_prompt = tok.decode(sched.requests[-1].prompt)
        items = [
            *USER,
            *[o.model_dump(exclude_none=True) for o in r.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ]
        c.responses.create(model="tiny", input=items, tools=FLAT, max_output_tokens=3)
        rendered = tok.decode(sched.requests[-1].prompt)
        assert rendered == chat_prompt.replace(chat_call.id, call.call_id)
    named = parse_responses(
        {"input": "x", "tools": FLAT, "tool_choice": {"type": "function", "name": "get_weather"}}
    )
    assert named.chat.tools.forced == "get_weather" and named.chat.sampling.constraint
    assert named.settings["tool_choice"] == {"type": "function", "name": "get_weather"}


def test_reasoning_comes_as_its_own_item():
    """``--reasoning-parser``: the reasoning is a ``reasoning`` item before the message, its
    tokens (markers included) counted in ``reasoning_tokens``; streamed as reasoning deltas; a
    reasoning item sent back is the next assistant turn's ``reasoning``."""
    tok = build_tiny_tokenizer(mask_token=True)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    thought = tok("Two and two: 4.", add_special_tokens=False)["input_ids"]
    sched = ReasoningScheduler()
    sched.output = [start, *thought, end, *tok(" It is 4.", add_special_tokens=False)["input_ids"]]
    with serving(sched, tokenizer=tok, reasoning_parser="qwen3") as (url, _, _):
        c = client(url)
        r = c.responses.create(model="tiny", input="2+2?")
        reasoning, message = r.output
        assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
        assert reasoning.content[0].text == "Two and two: 4." and reasoning.summary == []
        assert message.content[0].text == " It is 4."  # (as chat returns it)
        assert r.usage.output_tokens_details.reasoning_tokens == len(thought) + 2
        assert r.usage.output_tokens == len(sched.output) + 1  # (the EOS)
        events = raw_events(url, {"input": "2+2?"})
        said = "".join(
            d["delta"] for _, d in events if d["type"] == "response.reasoning_text.delta"
        )
        assert said == "Two and two: 4."
        final = events[-1][1]["response"]
        assert [o["type"] for o in final["output"]] == ["reasoning", "message"]
        assert final["usage"] == r.usage.model_dump(exclude_none=True)
        # log-probabilities: the answer's tokens (and the EOS) only, in the one message
        lp = c.responses.create(model="tiny", input="2+2?", top_logprobs=1)
        assert [o.type for o in lp.output] == ["reasoning", "message"]
        answer = len(sched.output) - len(thought) - 2
        assert len(lp.output[1].content[0].logprobs) == answer + 1
        streamed = raw_events(url, {"input": "2+2?", "top_logprobs": 1})
        assert [o["type"] for o in streamed[-1][1]["response"]["output"]] == [
            "reasoning",
            "message",
        ]
    # sent back: a reasoning item is the next assistant turn's; one that no assistant item
    # follows is a turn of its own; successive ones are joined
    # nothing after the reasoning but the EOS: an empty message holds its log-probability
    sched.output = [start, *thought, end]
    with serving(sched, tokenizer=tok, reasoning_parser="qwen3") as (url, _, _):
        bare = client(url).responses.create(model="tiny", input="2+2?", top_logprobs=1)
        assert [o.type for o in bare.output] == ["reasoning", "message"]
        assert bare.output_text == "" and len(bare.output[1].content[0].logprobs) == 1
    back = parse_responses(
        {
            "input": [
                {"role": "user", "content": "2+2?"},
                *[o.model_dump() for o in r.output],
                {"role": "user", "content": "and 3+3?"},
            ]
        }
    )
    turn = back.chat.messages[1]
    assert turn["role"] == "assistant" and turn["reasoning"] == "Two and two: 4."

    def thinking(text: str) -> dict[str, Any]:
        return {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text",
                                                                 "text": text}]}  # fmt: skip

    user = {"role": "user", "content": "q"}
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    turns = parse_responses(
        {"input": [user, thinking("cut"), user, thinking("a"), thinking("b"), call, thinking("z")]}
    ).chat.messages
    assert [(m["role"], m.get("reasoning")) for m in turns] == [
        ("user", None), ("assistant", "cut"), ("user", None), ("assistant", "a\nb"),
        ("assistant", "z"),
    ]  # fmt: skip
    assert turns[3]["tool_calls"][0]["id"] == "c1"


class Weather(BaseModel):
    city: str
    degrees: int


def test_a_json_schema_format_is_decoded_and_parsed():
    """``text.format`` json_schema (what ``responses.parse(text_format=Model)`` sends) holds the
    output to the schema, and the client parses it into the model."""
    sched = ReasoningScheduler()
    sched.output = TOK('{"city": "Paris", "degrees": 21}', add_special_tokens=False)["input_ids"]
    with serving(sched) as (url, _, _):
        parsed = client(url).responses.parse(model="tiny", input="Paris?", text_format=Weather)
        assert parsed.output_parsed == Weather(city="Paris", degrees=21)
        assert sched.requests[-1].grammar is not None
        assert parsed.text.format.type == "json_schema" and parsed.text.format.name == "Weather"


BAD = [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"truncation": "auto"}, "truncation"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "name": "f", "extra": 1}]}, "tools[0].extra"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "input[0].content[0]",
    ),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": []}, "input"),
    ({"mystery": 1}, "mystery"),
    ({"max_output_tokens": 5000}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
    ({"top_logprobs": -1}, "top_logprobs"),
    ({"metadata": {str(k): "v" for k in range(17)}}, "metadata"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": FLAT, "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
    ({"input": {"role": "user"}}, "input"),
    ({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    (
        {
            "input": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {**{"type": "function_call", "call_id": "c", "name": "f"}, "arguments": "{"},
            ]
        },
        "input",
    ),  # (no tools)
    # as the OpenAI API bounds them, before each item is checked (100,000 took seconds)
    ({"input": [{"role": "user", "content": "a"}] * 2049}, "input"),
    ({"tools": [{"type": "function", "name": f"f{i}"} for i in range(129)]}, "tools"),
]


def test_the_input_bound_leaves_room_for_instructions():
    # instructions become one message more than the input's 2,048 items: not refused as 2,049
    req = parse_responses(
        {"input": [{"role": "user", "content": "a"}] * 2048, "instructions": "be brief"}
    )
    assert len(req.chat.messages) == 2049


@pytest.mark.parametrize("extra, param", BAD)
def test_what_cannot_be_honoured_is_a_400_naming_it(extra, param):
    try:
        parse_responses({"input": "hi", **extra})
    except APIError as exc:
        assert exc.status == 400 and exc.param == param, exc.message
        assert param.split("[")[0].split(".")[0] in exc.message or param == "input"
        assert "messages" not in exc.message and "response_format" not in exc.message
        if extra.get("input") and "arguments" in str(extra):  # (the call's item, merged or not)
            assert exc.message.startswith("input[2].arguments"), exc.message
    else:  # (checked against the context when the server admits it)
        assert param == "max_output_tokens"


def test_the_server_answers_errors_as_the_other_routes():
    """Over the wire: 400s with the field (a chat check's renamed), the context limit under
    ``max_output_tokens``, 404 for another model, 401 without the key."""
    with serving(ScriptedScheduler(max_len=64), api_key="k") as (url, _, _):
        c = client(url, "k")
        with pytest.raises(openai.BadRequestError) as info:
            c.responses.create(model="tiny", input="hi", max_output_tokens=5000)
        assert info.value.body["param"] == "max_output_tokens"
        with pytest.raises(openai.BadRequestError) as info:  # chat's check, the item's name
            c.responses.create(
                model="tiny",
                input=[
                    {"role": "user", "content": "hi"},
                    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{"},
                ],
            )
        assert info.value.body["param"] == "input"
        assert info.value.body["message"].startswith("input[1].arguments")
        with pytest.raises(openai.BadRequestError) as info:  # the context: the prompt alone
            c.responses.create(model="tiny", input="long " * 64)
        assert info.value.body["param"] == "input"
        with pytest.raises(openai.BadRequestError) as info:  # a schema xgrammar refuses
            c.responses.create(
                model="tiny",
                input="hi",
                text={
                    "format": {
                        "type": "json_schema",
                        "name": "n",
                        "schema": {"type": "number", "multipleOf": 3},
                    }
                },
            )
        assert info.value.body["param"].startswith("text.format")
        assert "response_format" not in info.value.body["message"]
        with pytest.raises(openai.BadRequestError) as info:
            c.responses.create(model="tiny", input="hi", store=True)
        assert info.value.body["param"] == "store"
        with pytest.raises(openai.NotFoundError):
            c.responses.create(model="other", input="hi")
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").responses.create(model="tiny", input="hi")
        assert c.responses.create(model="tiny", input="hi", max_output_tokens=4).output_text


def test_a_response_the_server_stopped_has_failed():
    """A request the drain's deadline aborted is not a completed answer: ``response.failed``."""
    out = ResponseOutput("resp_1", "tiny", {}, Shape(True, "resp_1", "tiny"))
    out.start()
    out.add("partial")
    use = {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}
    events = out.finish("abort", use)
    assert [e["type"] for e in events][-2:] == ["response.output_item.done", "response.failed"]
    body = out.response()
    assert body["status"] == "failed" and "shutting down" in body["error"]["message"]
    assert body["output"][0]["status"] == "incomplete" and body["usage"] == use


def test_input_tokens_are_counted_and_nothing_is_kept():
    """``responses.input_tokens.count`` gives the prompt's length as a response would render it
    (tools and instructions included); fetching, listing, cancelling or deleting a response is a
    404 that says nothing is kept; both behind the key."""
    tok = build_tiny_tokenizer(mask_token=True)
    tok.chat_template = TEMPLATE
    sched = ReasoningScheduler()
    sched.output = tok("Sunny.", add_special_tokens=False)["input_ids"]
    with serving(sched, tokenizer=tok, tool_call_parser="hermes", api_key="k") as (url, _, _):
        c = client(url, "k")
        body = {"input": USER, "instructions": "Be brief.", "tools": FLAT}
        counted = c.responses.input_tokens.count(model="tiny", **body)
        assert counted.object == "response.input_tokens"
        made = c.responses.create(model="tiny", **body)
        assert counted.input_tokens == made.usage.input_tokens == len(sched.requests[-1].prompt)
        assert c.responses.input_tokens.count(input="Hi").input_tokens < counted.input_tokens
        for call in (
            lambda: c.responses.retrieve(made.id),
            lambda: c.responses.delete(made.id),
            lambda: c.responses.cancel(made.id),
            lambda: c.responses.input_items.list(made.id),
        ):
            with pytest.raises(openai.NotFoundError) as info:
                call()
            assert info.value.body["code"] == "response_not_found"
            assert "keeps no responses" in info.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").responses.retrieve(made.id)
        with pytest.raises(openai.BadRequestError) as bad:
            c.responses.input_tokens.count(input="Hi", previous_response_id="resp_1")
        assert bad.value.body["param"] == "previous_response_id"
