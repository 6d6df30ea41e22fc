"""The OpenAI Responses API's requests (``POST /v1/responses``), read as chat requests.

The Responses API is the OpenAI client's newer interface (``client.responses.create`` /
``.stream`` / ``.parse``; the OpenAI Agents SDK speaks it by default). ``fluid serve`` answers it
statelessly, as vLLM does without its response store: a request carries its whole conversation
in ``input``, and nothing is kept after the answer. A Responses body becomes a chat body that
``protocol.parse_chat`` checks, so the two routes accept, render and decode a conversation alike:

* ``input``: a text (one user message) or a list of items — messages (``role`` user / system /
  developer / assistant, ``content`` a text or a list of ``input_text`` / ``output_text`` /
  ``refusal`` parts), ``function_call`` items (an assistant turn's calls; consecutive ones, and
  the assistant message just before them, are one turn), ``function_call_output`` items (a
  ``tool`` message) and ``reasoning`` items (the next assistant turn's ``reasoning``; one that
  no assistant item follows is a turn of its own). An earlier answer's ``output`` items can be
  sent back as they came. ``instructions``: a system message first. ``tools: []`` is no tools.
* ``max_output_tokens`` → ``max_completion_tokens``; ``text.format`` → ``response_format``
  (``text``, ``json_object``, ``json_schema``); ``tools`` (Responses' flat function tools) and
  ``tool_choice`` (``{"type": "function", "name"}``) → chat's nested ones; ``top_logprobs`` or
  ``include: ["message.output_text.logprobs"]`` → ``logprobs``; ``temperature``, ``top_p``,
  ``parallel_tool_calls``, ``user``, ``stream`` as they are; vLLM's decoding extensions
  (``top_k``, ``min_p``, ``seed``, ``stop``, penalties, ``logit_bias``, ``min_tokens``,
  ``ignore_eos``, ``skip_special_tokens``, ``include_stop_str_in_output``,
  ``chat_template_kwargs``, ``priority``, ``cache_salt``, ``request_id`` — the response's id
  ``resp_<id>`` where no ``X-Request-Id`` header gives one) as on chat.
* Accepted as tags and repeated in the response: ``metadata`` (up to 16 string pairs),
  ``safety_identifier``, ``prompt_cache_key`` (prefixes are reused without it),
  ``prompt_cache_retention: "in_memory"`` (how this server keeps them), ``service_tier``
  ``auto`` / ``default``, ``max_tool_calls`` (it bounds hosted-tool calls, which this server never
  makes).
* A 400 naming the field for what a stateless text server cannot do: ``store: true``,
  ``previous_response_id``, ``conversation``, ``background: true``, ``prompt`` (stored
  templates), ``truncation: "auto"``, ``reasoning`` settings, a ``text.verbosity`` other than
  ``medium``, hosted tools (web search, file search, MCP, ...), ``include`` values other than the
  logprobs one, image / file / audio parts, ``item_reference`` items, encrypted reasoning, and
  ``stream_options.include_obfuscation: true``.

An error the chat checks raise names the Responses field (``input[2]`` for the message or call it
made of that item, ``max_output_tokens``, ``text.format``), those of the route's later checks
(the context, a schema that does not compile) too: ``ResponsesRequest.came``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fluid_npu.serve.errors import APIError
from fluid_npu.serve.protocol import ChatRequest, check_chat_lists, parse_chat, validate
from fluid_npu.serve.tools import ToolParser

LOGPROBS = "message.output_text.logprobs"  # the one ``include`` value this server fills
# fields handed to the chat route under their own name (its checks name them alike)
PASSED = ("model", "temperature", "top_p", "stream", "parallel_tool_calls", "user", "top_k",
          "min_p", "seed", "stop", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "logit_bias", "min_tokens", "chat_template_kwargs", "priority", "ignore_eos",
          "skip_special_tokens", "include_stop_str_in_output", "cache_salt",
          "request_id")  # fmt: skip
MAX_METADATA = 16  # pairs, as the OpenAI API allows (keys up to 64 characters, values 512)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Strict):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class StreamOptions(_Strict):
    include_obfuscation: bool | None = None


class ResponsesBody(_Strict):
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    top_logprobs: int | None = Field(default=None, ge=0)  # (at most --max-logprobs)
    include: list[str] | None = None
    stream_options: StreamOptions | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "in-memory", "24h"] | None = None
    # checked by the chat route under the same names
    model: Any = None
    temperature: Any = None
    top_p: Any = None
    stream: Any = None
    parallel_tool_calls: Any = None
    user: Any = None
    top_k: Any = None
    min_p: Any = None
    seed: Any = None
    stop: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    logit_bias: Any = None
    min_tokens: Any = None
    chat_template_kwargs: Any = None
    priority: Any = None
    ignore_eos: Any = None
    skip_special_tokens: Any = None
    include_stop_str_in_output: Any = None
    cache_salt: Any = None
    request_id: Any = None


@dataclass
class ResponsesRequest:
    """A checked Responses request: the chat request it decodes as, and its settings as the
    response object repeats them."""

    chat: ChatRequest
    settings: dict[str, Any]
    came: Origins  # renames the errors the route's later checks raise (the context, a schema)


def _where(loc: tuple[Any, ...]) -> str:
    if loc and loc[0] in ("input", "tool_choice"):  # (what follows: union members' tags)
        return str(loc[0])
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _nested(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    inner = {"text": TextConfig, "reasoning": ReasoningConfig,
             "stream_options": StreamOptions}.get(str(loc[0]))  # fmt: skip
    return TextFormat if inner is TextConfig and len(loc) > 2 else inner


def _refuse(param: str, what: str) -> APIError:
    return APIError(f"{param}: {what}", param=param)


def _check_stateless(req: ResponsesBody) -> None:
    """What a server that keeps nothing and has no hosted features cannot honour."""
    keep = "this server keeps no responses (as vLLM without its store): "
    if req.store:
        raise _refuse("store", keep + "send store: false or leave it out, and the whole "
                      "conversation in input")  # fmt: skip
    for name in ("previous_response_id", "conversation", "prompt"):
        if getattr(req, name) is not None:
            raise _refuse(name, keep + "send the whole conversation in input instead")
    if req.background:
        raise _refuse("background", keep + "background responses cannot be fetched later; "
                      "leave background out (stream: true answers as it decodes)")  # fmt: skip
    if req.truncation == "auto":
        raise _refuse("truncation", "this server never drops input items; send 'disabled' or "
                      "leave it out (a prompt longer than the context is a 400)")  # fmt: skip
    if req.prompt_cache_retention == "24h":
        raise _refuse("prompt_cache_retention", "this server keeps prefixes in memory only, "
                      "while its slots hold them; send 'in_memory' or leave it out")  # fmt: skip
    if req.service_tier not in (None, "auto", "default"):
        raise _refuse("service_tier", "this server has one tier; send 'auto' or 'default'")
    r = req.reasoning
    if r is not None and (r.effort, r.summary, r.generate_summary) != (None, None, None):
        raise _refuse("reasoning", "this server's models take no reasoning effort and write "
                      "no summaries; a chat template's switch goes in chat_template_kwargs "
                      '(e.g. {"enable_thinking": false}), and --reasoning-parser returns the '
                      "reasoning")  # fmt: skip
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        raise _refuse("text.verbosity", "this server cannot set a model's verbosity; send "
                      "'medium' or leave it out")  # fmt: skip
    if req.stream_options is not None:
        if not req.stream:
            raise _refuse("stream_options", "only allowed with stream: true")
        if req.stream_options.include_obfuscation:
            raise _refuse("stream_options.include_obfuscation", "this server does not pad "
                          "stream events; send false or leave it out")  # fmt: skip
    if len(req.metadata or {}) > MAX_METADATA or any(
        len(k) > 64 or len(v) > 512 for k, v in (req.metadata or {}).items()
    ):
        raise _refuse("metadata", f"up to {MAX_METADATA} pairs, keys up to 64 characters and "
                      "values up to 512")  # fmt: skip
    wrong = sorted(set(req.include or ()) - {LOGPROBS})
    if wrong:
        raise _refuse("include", f"{wrong[0]!r} is not something this server returns; it "
                      f"fills {LOGPROBS!r} only")  # fmt: skip


def _parts(content: Any, where: str, kinds: tuple[str, ...]) -> str | list[dict[str, str]]:
    """A message's content as the chat route takes it: a text, or its text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse(f"{where}.content", "a text or a list of content parts")
    out = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            raise _refuse(f"{where}.content[{k}]", f"a part of type {kind!r}; this server reads "
                          f"text only: {', '.join(kinds)} parts")  # fmt: skip
        text = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(text, str):
            raise _refuse(f"{where}.content[{k}]", "a text part needs its text")
        out.append({"type": "text", "text": text})
    return out


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _refuse(f"{where}.{key}", f"a {item.get('type')} item needs {key} as a string")
    return value


MESSAGE_KEYS = {"type", "role", "content", "id", "status", "phase"}  # id / status / phase: output


@dataclass
class Origins:
    """Where each chat message came from in a Responses request (``instructions``, ``input``,
    ``input[3]``), and each call of an assistant turn (its ``function_call`` item), so that an
    error the chat checks raise names the request's own fields."""

    messages: list[str] = field(default_factory=list)
    calls: dict[int, list[str]] = field(default_factory=dict)  # message -> its calls' items

    def rename(self, text: str) -> str:
        def call(m: re.Match) -> str:
            return self.calls[int(m.group(1))][int(m.group(2))]

        text = re.sub(r"messages\[(\d+)\]\.tool_calls\[(\d+)\](?:\.function)?", call, text)
        text = re.sub(r"messages\[(\d+)\]", lambda m: self.messages[int(m.group(1))], text)
        text = re.sub(r"tools\[(\d+)\]\.function", r"tools[\1]", text)
        for old, new in (("max_completion_tokens", "max_output_tokens"),
                         ("response_format.json_schema", "text.format"),
                         ("response_format", "text.format"), ("messages", "input")):  # fmt: skip
            text = text.replace(old, new)
        return text

    def renamed(self, exc: APIError) -> APIError:
        """``exc`` (a chat check's) under the Responses fields' names."""
        exc.message = self.rename(exc.message)
        exc.args = (exc.message,)
        exc.param = None if exc.param is None else self.rename(exc.param)
        return exc


def input_messages(
    given: str | list[Any], instructions: str | None
) -> tuple[list[dict[str, Any]], Origins]:
    """The chat messages of ``input`` (after ``instructions``), and where each came from. A
    reasoning item is the next assistant turn's ``reasoning`` (successive ones joined); one that
    no assistant item follows is an assistant turn of its own (a turn cut in its reasoning)."""
    messages: list[dict[str, Any]] = []
    came = Origins()
    thought: list[str] = []  # reasoning items' text, for the next assistant turn
    at = ""  # where the first of them is

    def add(message: dict[str, Any], where: str) -> None:
        nonlocal thought
        if thought and message["role"] != "assistant":  # the reasoning was a turn of its own
            add({"role": "assistant", "content": None}, at)
        if thought:
            message["reasoning"], thought = "\n".join(thought), []
        messages.append(message)
        came.messages.append(where)

    if instructions is not None:
        add({"role": "system", "content": instructions}, "instructions")
    if isinstance(given, str):
        add({"role": "user", "content": given}, "input")
        return messages, came
    for n, item in enumerate(given):
        where = f"input[{n}]"
        if not isinstance(item, dict):
            raise _refuse(where, "an input item is an object (a message or another item)")
        kind = item.get("type", "message")
        if kind == "message":
            extra = sorted(set(item) - MESSAGE_KEYS)
            if extra:
                raise _refuse(f"{where}.{extra[0]}", "unknown field of a message item")
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _refuse(f"{where}.role", "'user', 'system', 'developer' or 'assistant'")
            kinds = ("output_text", "refusal") if role == "assistant" else ("input_text",)
            add({"role": role, "content": _parts(item.get("content"), where, kinds)}, where)
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function", "function": {
                "name": _string(item, "name", where),
                "arguments": _string(item, "arguments", where)}}  # fmt: skip
            last = messages[-1] if messages else None
            if not thought and last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # the same turn's
            else:
                add({"role": "assistant", "content": None, "tool_calls": [call]}, where)
            came.calls.setdefault(len(messages) - 1, []).append(where)
        elif kind == "function_call_output":
            output = item.get("output")
            content = _parts(output, where, ("input_text",)) if output is not None else None
            if content is None:
                raise _refuse(f"{where}.output", "a function_call_output item needs its output")
            add({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                 "content": content}, where)  # fmt: skip
        elif kind == "reasoning":
            if item.get("encrypted_content") is not None:
                raise _refuse(f"{where}.encrypted_content", "this server encrypts nothing "
                              "and cannot read another's; send the reasoning's text in "
                              "content")  # fmt: skip
            pieces = item.get("content") or item.get("summary") or []
            if not isinstance(pieces, list) or not all(
                isinstance(p, dict) and isinstance(p.get("text"), str) for p in pieces
            ):
                raise _refuse(f"{where}.content", "a reasoning item's parts need their text")
            at = at if thought else where
            thought.append("\n".join(p["text"] for p in pieces))
        elif kind == "item_reference":
            raise _refuse(where, "this server keeps no items to refer to; send the item itself")
        else:
            raise _refuse(f"{where}.type", f"items of type {kind!r} are not supported; this "
                          "server takes message, function_call, function_call_output and "
                          "reasoning items")  # fmt: skip
    if thought:  # the input ends in reasoning: a turn of its own
        add({"role": "assistant", "content": None}, at)
    return messages, came


def _tools(given: list[Any] | None) -> list[Any] | None:
    """Responses' flat function tools as chat's nested ones (none for an empty list, which the
    OpenAI API takes and the Agents SDK sends for an agent without tools)."""
    if not given:
        return None
    out = []
    for n, tool in enumerate(given):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise _refuse(f"tools[{n}]", f"a tool of type {kind!r}: this server runs function "
                          'tools only ({"type": "function", "name", "parameters"})')  # fmt: skip
        extra = sorted(set(tool) - {"type", "name", "description", "parameters", "strict"})
        if extra:
            raise _refuse(f"tools[{n}].{extra[0]}", "unknown field of a function tool")
        out.append({"type": "function", "function": {k: v for k, v in tool.items()
                                                      if k != "type"}})  # fmt: skip
    return out


def _tool_choice(given: str | dict[str, Any] | None, tools: list[Any] | None) -> Any:
    """Responses' ``tool_choice`` as chat's (a named function nested under ``function``)."""
    if given is None:
        return None
    if isinstance(given, str) and given not in ("none", "auto", "required"):
        raise _refuse("tool_choice", f"{given!r} is not 'none', 'auto', 'required' or "
                      '{"type": "function", "name": ...}')  # fmt: skip
    if isinstance(given, str):  # ('auto' with no tools: nothing to choose, as OpenAI takes it)
        return None if given in ("none", "auto") and not tools else given
    if given.get("type") != "function" or not isinstance(given.get("name"), str):
        raise _refuse("tool_choice", "'none', 'auto', 'required' or "
                      '{"type": "function", "name": ...}')  # fmt: skip
    offered = [t.get("name") for t in tools or () if isinstance(t, dict)]
    if given["name"] not in offered:
        raise _refuse("tool_choice", f"names the function {given['name']!r}, which tools does "
                      f"not offer (it offers {offered})")  # fmt: skip
    return {"type": "function", "function": {"name": given["name"]}}


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = None if text is None else text.format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    spec = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict,
            "description": fmt.description}  # fmt: skip
    return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


def parse_responses(body: Any, tool_parser: ToolParser | None = None) -> ResponsesRequest:
    """A checked ``/v1/responses`` request (``tool_parser``: the server's, as for chat)."""
    check_chat_lists(body, "input")
    req: ResponsesBody = validate(ResponsesBody, body, _where, _nested)
    _check_stateless(req)
    messages, came = input_messages(req.input, req.instructions)
    if not messages:
        raise _refuse("input", "empty; give a text or at least one item")
    logprobs = LOGPROBS in (req.include or ()) or bool(req.top_logprobs)
    chat: dict[str, Any] = {k: getattr(req, k) for k in PASSED if getattr(req, k) is not None}
    chat.update(messages=messages, max_completion_tokens=req.max_output_tokens,
                tools=_tools(req.tools), tool_choice=_tool_choice(req.tool_choice, req.tools),
                response_format=_response_format(req.text))  # fmt: skip
    if logprobs:
        chat.update(logprobs=True, top_logprobs=req.top_logprobs or 0)
    try:
        parsed = parse_chat(
            {k: v for k, v in chat.items() if v is not None}, tool_parser, bounded=False
        )  # (its instructions are one message more than the input's items)
    except APIError as exc:
        raise came.renamed(exc) from None
    if req.max_output_tokens is not None:
        parsed.sampling.max_tokens_field = "max_output_tokens"
    text = req.text.model_dump(by_alias=True, exclude_none=True) if req.text else {}
    settings = {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls,
        "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_logprobs": req.top_logprobs or 0,
        "tool_choice": req.tool_choice or ("auto" if req.tools else "none"),
        "tools": req.tools or [],
        "text": {"format": {"type": "text"}, **text},
        "reasoning": {"effort": None, "summary": None},
        "truncation": "disabled",
        "store": False,
        "background": False,
        "previous_response_id": None,
        "service_tier": "default",
        "user": req.user,
        "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key,
        "prompt_cache_retention": req.prompt_cache_retention,
    }
    return ResponsesRequest(parsed, settings, came)
