"""Structured outputs in ``fluid serve`` (``serve/structured.py``, ``serve/tools.py``): the fields a
client holds an answer to a grammar with — ``response_format``, vLLM's ``structured_outputs``,
``tool_choice: "required"`` / a named function — checked (a 400 naming the field), compiled and
decoded by the real engine, driven by the official ``openai`` client (``chat.completions.parse``
with a pydantic model included)."""

from __future__ import annotations

import json
import re
import sys
import threading
from typing import Literal

import openai
import pytest
from pydantic import BaseModel
from test_serve_http import client, serving, thinking_chain
from test_serve_tools import TEMPLATE, TOOLS, USER

from fluid_npu.model.tiny import build_tiny_model, build_tiny_tokenizer
from fluid_npu.sampling.grammar import GrammarCompiler
from fluid_npu.sampling.offline import run_requests
from fluid_npu.sampling.scheduler import Request, Scheduler
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.protocol import parse_chat, parse_completion
from fluid_npu.serve.structured import Constraint, Grammars, request_constraint
from fluid_npu.serve.tools import ForcedCalls, tool_setting

CITY = [{"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                   "required": ["city"]},
}}, {"type": "function", "function": {"name": "get_time"}}]  # fmt: skip


OBJECT = {"type": "object"}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


class Color(BaseModel):
    color: Literal["red", "green", "blue"]
    ok: bool


@pytest.mark.parametrize(
    ("fields", "kind", "spec"),
    [
        ({"response_format": {"type": "text"}}, None, None),
        ({"response_format": {"type": "json_object"}}, "json_object", None),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "c", "schema": {"type": "object"}, "strict": True}}}, "json", OBJECT),
        ({"structured_outputs": {"regex": "a+"}}, "regex", "a+"),
        ({"structured_outputs": {"choice": ["x", "y"]}}, "choice", ["x", "y"]),
        ({"structured_outputs": {"json": '{"type": "string"}'}}, "json", '{"type": "string"}'),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar", 'root ::= "a"'),
        ({"structured_outputs": {"regex": "a", "disable_fallback": True,
                                 "disable_additional_properties": False}}, "regex", "a"),
        ({"guided_json": OBJECT, "guided_decoding_backend": "xgrammar"}, "json", OBJECT),
        ({"guided_regex": "a+"}, "regex", "a+"),  # (vLLM's older fields)
        ({"response_format": {"type": "json_object", "schema": OBJECT}}, "json", OBJECT),
        ({"response_format": {"type": "text", "json_schema": None}}, None, None),  # null: absent
        ({"structured_outputs": {"regex": "a", "whitespace_pattern": None}}, "regex", "a"),
        ({"guided_choice": ["x", "y"]}, "choice", ["x", "y"]),
        ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"'),
    ],
)  # fmt: skip
def test_what_a_request_holds_its_output_to(fields, kind, spec):
    for parse, body in ((parse_chat, {"messages": USER}), (parse_completion, {"prompt": "a"})):
        c = parse({**body, **fields}).sampling.constraint
        assert (c and (c.kind, c.spec)) == ((kind, spec) if kind else None), parse
    flat = request_constraint(None, {"json": {}, "disable_any_whitespace": True})
    assert flat is not None and not flat.any_whitespace
    old = parse_chat(
        {
            "messages": USER,
            "guided_json": OBJECT,
            "guided_decoding_backend": "xgrammar:disable-any-whitespace,no-fallback",
        }
    )
    assert not old.sampling.constraint.any_whitespace  # (vLLM's backend options of before)


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"response_format": {"type": "xml"}}, "response_format", '{"type": "json_object"}'),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "c"}}},
         "response_format", '"schema": a JSON schema object'),
        ({"response_format": {"type": "json_object", "schema": 5}}, "response_format", "must be"),
        ({"guided_regex": "a", "guided_decoding_backend": "xgrammar:fast"},
         "guided_decoding_backend", "options disable-any-whitespace"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
         "exactly one of"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one of"),
        ({"structured_outputs": {"regex": 5}}, "structured_outputs", "regex must be a regular"),
        ({"structured_outputs": {"json_schema": {}}}, "structured_outputs", "['json_schema']"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
         "structured_outputs", "give one"),
        ({"structured_outputs": {"regex": "a"}, "ignore_eos": True}, "ignore_eos", "ends with"),
        ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs",
         "whitespace_pattern and structural_tag are not supported"),
        ({"structured_outputs": {"regex": "a", "disable_fallback": 1}}, "structured_outputs",
         "true or false"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex", "another field"),
        ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice",
         "give one"),
        ({"guided_regex": "a", "guided_decoding_backend": "outlines"},
         "guided_decoding_backend", "decodes with xgrammar"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice", "cannot also follow"),
        ({"tools": TOOLS, "tool_choice": "required", "ignore_eos": True}, "ignore_eos",
         "tool_choice"),
    ],
)  # fmt: skip
def test_malformed_constraints_are_400s_naming_the_field(fields, param, says):
    with pytest.raises(APIError) as info:
        parse_chat({"messages": USER, **fields})
    assert info.value.param == param and says in info.value.message, info.value.message


def test_forced_calls_are_decoded_under_the_calls_schema_and_read_back():
    required = tool_setting(CITY, "required", None, None)
    c = required.constraint
    assert c.kind == "json" and c.field == "tool_choice" and c.spec["minItems"] == 1
    names = [item["properties"]["name"]["enum"] for item in c.spec["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]] and "maxItems" not in c.spec
    one = tool_setting(CITY, "required", False, None).constraint
    assert one.spec["maxItems"] == 1  # parallel_tool_calls: false
    named = tool_setting(CITY, {"type": "function", "function": {"name": "get_time"}}, None, None)
    assert named.constraint.spec == {"type": "object"}  # a function without parameters
    assert named.reader().name == "get_time" and named.parser is None

    def read(reader: ForcedCalls, text: str, parse: bool = True):
        assert reader.add(text[:5]) == "" and reader.add(text[5:]) == ""  # no content while it runs
        rest, calls = reader.finish(parse)
        return rest, [(x["function"]["name"], json.loads(x["function"]["arguments"]))
                      for x in calls]  # fmt: skip

    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", ' \
           '"parameters": {}}]'  # fmt: skip
    assert read(required.reader(), text) == ("", [("get_weather", {"city": "Oslo"}),
                                                  ("get_time", {})])  # fmt: skip
    assert required.reader().finish_reason == "tool_calls" and named.reader().finish_reason is None
    assert read(named.reader(), '{"tz": "UTC"}') == ("", [("get_time", {"tz": "UTC"})])
    assert read(named.reader(), '{"tz": "UT') == ('{"tz": "UT', [])  # cut short: the text
    assert read(required.reader(), text, parse=False) == (text, [])  # aborted: the text


@pytest.fixture(scope="module")
def engine():
    """A real Scheduler (entropy drafting) over a random tiny Llama, with a tools template."""
    tok = build_tiny_tokenizer(mask_token=True)
    tok.chat_template = TEMPLATE
    model = build_tiny_model("llama", tok, seed=7)
    sched = Scheduler(model, tok.mask_token_id, policy="entropy", max_batch=4, max_len=512,
                      eos_ids=[tok.eos_token_id], tokenizer=tok)  # fmt: skip
    sched.max_batch, sched.gate = 4, threading.Event()  # (what serving() reads and opens)
    # a random model's argmax may pick free whitespace forever: the tests bias it away
    spaces = tok.convert_tokens_to_ids(["Ġ", "Ċ", "ĉ", "č"])
    return tok, model, sched, {str(t): -100 for t in spaces}


def test_structured_outputs_over_the_wire(engine):
    tok, model, sched, no_spaces = engine
    greedy = {"model": "tiny", "temperature": 0, "logit_bias": no_spaces}
    with serving(sched, tokenizer=tok) as (url, _, _):
        c = client(url)
        got = c.chat.completions.parse(messages=USER, response_format=Color, max_tokens=60,
                                       **greedy)  # fmt: skip
        choice = got.choices[0]
        assert isinstance(choice.message.parsed, Color) and choice.finish_reason == "stop"
        assert choice.message.content == choice.message.parsed.model_dump_json()
        answer = c.chat.completions.create(
            messages=USER, max_tokens=60, response_format={"type": "json_object"}, **greedy
        )
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
        text = c.completions.create(
            prompt="abc",
            max_tokens=20,
            **greedy,
            extra_body={"structured_outputs": {"regex": r"\d{3}-[a-z]{2}"}},
        )
        assert re.fullmatch(r"\d{3}-[a-z]{2}", text.choices[0].text)
        # the server decodes what the engine does offline with the same grammar
        prompt = tok("abc")["input_ids"]
        grammar = GrammarCompiler(tok, model.config.vocab_size).compile("regex", r"\d{3}-[a-z]{2}")
        alone = run_requests(sched_copy(model, tok), [Request("a", prompt, 20, grammar=grammar,
                             sampling=None)])["a"][0]  # fmt: skip
        assert tok.decode(alone[:-1]) == text.choices[0].text
        for stream in (False, True):
            kwargs = dict(
                messages=USER,
                max_tokens=20,
                **greedy,
                extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}},
            )
            if stream:
                chunks = c.chat.completions.create(**kwargs, stream=True)
                said = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            else:
                said = c.chat.completions.create(**kwargs).choices[0].message.content
            assert said in ("alpha", "beta"), said
        for body, param, says in (
            ({"structured_outputs": {"regex": "(a"}}, "structured_outputs",
             "regular expression does not compile"),
            ({"guided_regex": "(a"}, "guided_regex", "regular expression does not compile"),
            ({"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "nonsense"}}}}, "response_format",
             "JSON schema does not compile: Unsupported type"),
        ):  # fmt: skip
            with pytest.raises(openai.BadRequestError) as info:
                c.chat.completions.create(messages=USER, model="tiny", max_tokens=5,
                                          extra_body=body)  # fmt: skip
            error = info.value.body
            assert error["param"] == param and says in error["message"], error
        # a prompt past the context is refused before its grammar compiles (one with
        # tool_choice required compiled every tool's schema first: seconds and gigabytes)
        for route, field in ((c.completions.create, "prompt"),
                             (c.chat.completions.create, "messages")):  # fmt: skip
            prompt = {"prompt": [5] * 600} if field == "prompt" else {
                "messages": [{"role": "user", "content": "a " * 600}]}  # fmt: skip
            with pytest.raises(openai.BadRequestError) as info:
                route(model="tiny", max_tokens=5, **prompt,
                      extra_body={"structured_outputs": {"regex": "(a"}})  # fmt: skip
            assert info.value.body["param"] == field, info.value.body
        # so is a bad setting: the sampling and log-probability checks come before the compile
        for body, param in (({"min_tokens": 9}, "min_tokens"),
                            ({"logprobs": True, "top_logprobs": 500}, "top_logprobs"),
                            ({"logit_bias": {"999999": 1}}, "logit_bias")):  # fmt: skip
            with pytest.raises(openai.BadRequestError) as info:
                c.chat.completions.create(messages=USER, model="tiny", max_tokens=5, extra_body={
                    **body, "structured_outputs": {"regex": "(a"}})  # fmt: skip
            assert info.value.body["param"] == param, info.value.body


def test_a_slow_grammar_holds_up_no_other_structured_request(engine, monkeypatch):
    """A schema that takes long to compile (a 15,000-entry choice: 46 s on one thread) holds
    up only its own request: another structured request compiles beside it and is answered."""
    tok, _, sched, no_spaces = engine
    slow, started = threading.Event(), threading.Event()
    real = Grammars.compile

    def compile(self, constraint):
        if constraint.spec == "slow":
            started.set()
            assert slow.wait(120), "the slow compile was never let go"
        return real(self, constraint)

    monkeypatch.setattr(Grammars, "compile", compile)
    greedy = {"model": "tiny", "temperature": 0, "logit_bias": no_spaces, "max_tokens": 8}
    with serving(sched, tokenizer=tok) as (url, _, _):
        c = client(url)
        held = threading.Thread(
            target=lambda: c.completions.create(
                prompt="a", extra_body={"structured_outputs": {"regex": "slow"}}, **greedy
            )
        )
        held.start()
        try:
            assert started.wait(60)
            quick = c.with_options(timeout=60, max_retries=0).completions.create(
                prompt="a", **greedy, extra_body={"structured_outputs": {"regex": "ab"}}
            )
            assert quick.choices[0].text == "ab" and held.is_alive()
        finally:
            slow.set()
            held.join(60)


def sched_copy(model, tok) -> Scheduler:
    return Scheduler(model, tok.mask_token_id, policy="entropy", max_batch=2, max_len=512,
                     eos_ids=[tok.eos_token_id], tokenizer=tok)  # fmt: skip


def test_forced_tool_calls_over_the_wire(engine):
    """``tool_choice: "required"`` / a named function: the answer is a call, streamed or not,
    without ``--enable-auto-tool-choice``; ``"required"`` ends with ``tool_calls``, a named
    call with ``stop`` (as the OpenAI API and vLLM)."""
    tok, _, sched, no_spaces = engine
    with serving(sched, tokenizer=tok) as (url, _, _):
        c = client(url)
        for choice, finish in (("required", "tool_calls"), (NAMED, "stop")):
            kwargs = {"model": "tiny", "messages": USER, "tools": CITY, "tool_choice": choice,
                      "max_tokens": 80, "temperature": 0, "logit_bias": no_spaces}  # fmt: skip
            answer = c.chat.completions.create(**kwargs).choices[0]
            calls = answer.message.tool_calls
            assert answer.finish_reason == finish and answer.message.content is None, answer
            assert calls and calls[0].id.startswith("chatcmpl-tool-")
            if choice != "required":
                assert [x.function.name for x in calls] == ["get_weather"]
            for x in calls:
                args = json.loads(x.function.arguments)
                assert x.function.name == "get_time" or args["city"] in ("Paris", "Oslo")
            chunks = [ch for ch in c.chat.completions.create(**kwargs, stream=True) if ch.choices]
            streamed = [t for ch in chunks for t in ch.choices[0].delta.tool_calls or []]
            assert chunks[-1].choices[0].finish_reason == finish
            assert [(t.function.name, t.function.arguments) for t in streamed] == [
                (x.function.name, x.function.arguments) for x in calls]  # fmt: skip


def test_with_a_reasoning_parser_the_grammar_holds_the_answer():
    """``--reasoning-parser``: the model reasons freely and the grammar starts after the closing
    marker (a constructed chain Llama thinks ``x y`` then would answer ``z m``; under the choice
    ``ok`` it answers ``ok``), streamed or not; a prompt that closed the block already makes the
    grammar start at the first token; a free answer is unchanged."""
    tok, sched, end = thinking_chain()
    seen = []
    submit = sched.submit
    sched.submit = lambda req: (seen.append(req), submit(req))[1]  # (what the engine got)
    opened = "{% for m in messages %}{{ m['content'] }}{% endfor %}<think>"
    closed = opened + "</think>"
    choice = {"structured_outputs": {"choice": ["ok"]}}
    with serving(sched, tokenizer=tok, reasoning_parser="qwen3",
                 trust_request_chat_template=True) as (url, _, _):  # fmt: skip
        c = client(url)
        for stream in (False, True):
            kwargs = {"model": "tiny", "messages": USER, "max_tokens": 12, "temperature": 0,
                      "extra_body": {"chat_template": opened, **choice}}  # fmt: skip
            if stream:
                chunks = [ch for ch in c.chat.completions.create(**kwargs, stream=True)
                          if ch.choices]  # fmt: skip
                thought = "".join(getattr(ch.choices[0].delta, "reasoning", None) or ""
                                  for ch in chunks)  # fmt: skip
                said = "".join(ch.choices[0].delta.content or "" for ch in chunks)
            else:
                message = c.chat.completions.create(**kwargs).choices[0].message
                thought, said = message.reasoning, message.content
            assert (thought, said) == ("xy", "ok"), stream
            assert seen[-1].grammar_after == end
        free = c.chat.completions.create(
            model="tiny",
            messages=USER,
            max_tokens=12,
            temperature=0,
            extra_body={"chat_template": opened},
        )
        assert (free.choices[0].message.reasoning, free.choices[0].message.content) == ("xy", "zm")
        # a closed block: all answer, the grammar from the first token (the chain model would
        # answer "z m"; the grammar makes it "ok")
        shut = c.chat.completions.create(
            model="tiny",
            messages=USER,
            max_tokens=12,
            temperature=0,
            extra_body={"chat_template": closed, **choice},
        )
        assert shut.choices[0].message.content == "ok" and seen[-1].grammar_after is None
        shut = c.chat.completions.create(  # ... with whitespace after it, as Qwen3's template
            model="tiny", messages=USER, max_tokens=12, temperature=0,
            extra_body={"chat_template": closed + "\n\n", **choice})  # fmt: skip
        assert seen[-1].grammar_after is None
        # a block a previous turn closed (its reasoning kept, as templates keep it in a tool
        # loop), the new turn not opened by the template: the turn may reason first
        history = ("{% for m in messages %}{{ m['content'] }}{% endfor %}<think>a</think>b"
                   "<|im_end|>")  # fmt: skip
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=2, temperature=0,
                                  extra_body={"chat_template": history, **choice})  # fmt: skip
        assert seen[-1].grammar_after == end
        # a chat that continues its final message continues its answer: held from the first
        # token, unless that message stopped inside its reasoning
        plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        for partial, after in (("<think>a</think>b", None), ("b", None), ("<think>a", end)):
            c.chat.completions.create(model="tiny", max_tokens=2, temperature=0, messages=[
                *USER, {"role": "assistant", "content": partial}], extra_body={
                "chat_template": plain, "continue_final_message": True,
                "add_generation_prompt": False, **choice})  # fmt: skip
            assert seen[-1].grammar_after == after, partial


def test_a_server_without_xgrammar_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # (import xgrammar raises ImportError)
    grammars = Grammars(build_tiny_tokenizer(), 300, [1])
    with pytest.raises(APIError) as info:
        grammars.compile(Constraint("regex", "a+", "structured_outputs"))
    assert info.value.param == "structured_outputs" and info.value.status == 400
    assert "pip install 'fluid-npu[serve]'" in info.value.message


def test_forced_call_schemas_keep_references_and_object_arguments():
    """A tool made from a nested pydantic model (its ``$defs``) and one with ``parameters: {}``:
    under ``"required"`` the definitions move to the list's root, where their references point,
    and arguments are always an object (OpenAI's rule), never any JSON value."""

    class Inner(BaseModel):
        city: str

    class Outer(BaseModel):
        where: Inner

    tools = [openai.pydantic_function_tool(Outer, name="go"),
             {"type": "function", "function": {"name": "ping", "parameters": {}}}]  # fmt: skip
    assert "$defs" in tools[0]["function"]["parameters"]
    tok = build_tiny_tokenizer(mask_token=True)
    compiler = GrammarCompiler(tok, len(tok))

    def takes(setting, text: str) -> bool:
        c = setting.constraint
        matcher = compiler.compile(c.kind, c.spec).matcher([tok.eos_token_id])
        return matcher.accept_string(text) and matcher.is_completed()

    required = tool_setting(tools, "required", None, None)
    assert "$defs" in required.constraint.spec  # (gathered at the root)
    assert takes(required, '[{"name": "go", "parameters": {"where": {"city": "Oslo"}}}, '
                           '{"name": "ping", "parameters": {}}]')  # fmt: skip
    assert not takes(required, '[{"name": "go", "parameters": {"where": 5}}]')
    assert not takes(required, '[{"name": "ping", "parameters": 666}]')
    ping = tool_setting(tools, {"type": "function", "function": {"name": "ping"}}, None, None)
    assert takes(ping, "{}") and not takes(ping, "666")
    clash = [tools[0], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "$defs": {"Inner": {"type": "integer"}}}}}]  # fmt: skip
    with pytest.raises(APIError, match="define \\$defs 'Inner' differently"):
        _ = tool_setting(clash, "required", None, None).constraint


def test_forced_arguments_are_the_models_text_and_always_valid_json():
    named = tool_setting(CITY, {"type": "function", "function": {"name": "get_time"}}, None, None)
    reader = named.reader()
    reader.add(' {"at": 1e5} ')
    _, calls = reader.finish()
    assert calls[0]["function"]["arguments"] == '{"at": 1e5}'  # as written (vLLM's)
    for reader, text in ((named.reader(), '{"at": 1e999}'),
                         (tool_setting(CITY, "required", None, None).reader(),
                          '[{"name": "get_time", "parameters": {"at": 1e999}}]')):  # fmt: skip
        reader.add(text)  # a number JSON cannot write back (infinite): the text, no calls
        assert reader.finish() == (text, [])


def test_a_client_gone_while_its_grammar_waits_costs_no_compile(engine, monkeypatch):
    """Every compile thread busy, a structured request queues for one; its client leaves: the
    compile never runs (its place goes to the next request), and the others are answered."""
    import httpx

    import fluid_npu.serve.app as app_module
    from fluid_npu.serve.structured import COMPILE_THREADS

    tok, _, sched, no_spaces = engine
    slow, started, compiled, gone = threading.Event(), threading.Semaphore(0), [], []
    real = Grammars.compile

    def compile(self, constraint):
        compiled.append(constraint.spec)
        if constraint.spec.startswith("slow"):
            started.release()
            assert slow.wait(120), "the slow compiles were never let go"
        return real(self, constraint)

    watched = app_module.while_connected

    async def noticed(request, work):
        stayed = await watched(request, work)
        gone.append(not stayed)
        return stayed

    monkeypatch.setattr(Grammars, "compile", compile)
    monkeypatch.setattr(app_module, "while_connected", noticed)
    greedy = {"model": "tiny", "temperature": 0, "logit_bias": no_spaces, "max_tokens": 8}
    with serving(sched, tokenizer=tok) as (url, _, _):
        c = client(url)
        held = [threading.Thread(target=lambda n=n: c.completions.create(
            prompt="a", extra_body={"structured_outputs": {"regex": f"slow{n}"}}, **greedy))
            for n in range(COMPILE_THREADS)]  # fmt: skip
        for t in held:
            t.start()
        try:
            for _ in held:
                assert started.acquire(timeout=60)  # every compile thread holds a slow one
            body = {"prompt": "a", "structured_outputs": {"regex": "left"}, **greedy}
            with pytest.raises(httpx.ReadTimeout):  # the client leaves while its compile waits
                httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
            for _ in range(400):
                if gone:
                    break
                threading.Event().wait(0.05)
            assert gone == [True]  # the server saw it go
        finally:
            slow.set()
            for t in held:
                t.join(60)
        ab = {"structured_outputs": {"regex": "ab"}}
        assert c.completions.create(prompt="a", **greedy, extra_body=ab).choices[0].text == "ab"
    assert "left" not in compiled and "ab" in compiled
