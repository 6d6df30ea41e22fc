"""A conversation's tool turns as a tokenizer's own chat template takes them.

LLaMA-Factory's data write a tool call as a ``function_call`` turn whose content is JSON —
``{"name": ..., "arguments": {...}}`` or a list of such objects — and a tool's answer as an
``observation`` turn (``formatting: openai`` rows reach the same two turns: ``openai_turns``,
which ``formats.py`` calls, joining consecutive results with ``RESULTS_JOIN``). The
named templates write the calls in their model's format (``call_formats.py``) and the results
where their format strings say. A tokenizer's own Jinja
template instead renders tool calls from an assistant message's structured ``tool_calls`` and
answers from ``tool`` messages (Qwen2.5's ``<tool_call>`` tags, Llama 3.1's ``ipython`` turns,
Mistral's ``[TOOL_CALLS]``): handed the JSON as plain assistant text, it writes the call without
its markers, and a model trained on that text never writes a call the server's tool-call parser
reads. So this module builds the messages ``fluid serve`` hands the template for the same
conversation (``sampling/prompts.chat_messages``): the calls checked as the server checks them
(``tooluse.check_tool_calls``: arguments an object), each with an id; one ``tool`` message per
result, answering its call by ``tool_call_id``; the tools in OpenAI's ``{"type": "function",
"function": {...}}`` form, as requests give them.

The ids are ``call00001``, ``call00002``, … in the order of the conversation's calls: nine
alphanumeric characters, the form Mistral's templates require (other templates ignore the id or
write it as given).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fluid_npu.data.call_formats import function_calls
from fluid_npu.data.templates import (
    ASSISTANT,
    FUNCTION,
    OBSERVATION,
    USER,
    Conversation,
    RowError,
)
from fluid_npu.errors import DataError

# how consecutive tool results become one observation turn, as LLaMA-Factory's converter joins
# them (``tool_turns`` splits them again for a tokenizer's template)
RESULTS_JOIN = "\n</tool_response>\n<tool_response>\n"


def openai_turns(messages: list[Any], tags: Mapping[str, str]) -> list[Any]:
    """OpenAI's messages as LLaMA-Factory's ``openai`` formatting reads them: an assistant
    message's ``tool_calls`` become a function-call turn (the calls' ``function`` objects as JSON),
    and consecutive tool results one observation turn, in the order of the calls they answer
    (their ``tool_call_id``s) where every result names one of them."""
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    out: list[Any] = []
    results: list[tuple[Any, Any]] = []  # (tool_call_id, content)
    order: list[Any] = []  # the ids of the last calls
    for message in messages:
        role, content = message.get(role_tag), message.get(content_tag)
        calls = message.get("tool_calls")
        if role in (tags["assistant_tag"], tags["function_tag"]) and calls:
            if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls
            ):
                raise RowError('tool_calls must be a list of {"function": {...}} objects')
            role = tags["function_tag"]
            content = json.dumps([c["function"] for c in calls], ensure_ascii=False)
            order = [c.get("id") for c in calls]
        if role == tags["observation_tag"]:
            results.append((message.get("tool_call_id"), content))
            continue
        if results:
            answered = [i for i, _ in results]
            if sorted(map(str, answered)) == sorted(map(str, order)) and None not in answered:
                place = {str(i): n for n, i in reversed(list(enumerate(order)))}
                results.sort(key=lambda r: place[str(r[0])])
            joined = RESULTS_JOIN.join(str(c) for _, c in results)
            out.append({role_tag: tags["observation_tag"], content_tag: joined})
            results = []
        out.append({**message, role_tag: role, content_tag: content})
    return out  # (tool results at the very end are dropped, as LLaMA-Factory's converter does)


_PLAIN_ROLES = {USER: "user", ASSISTANT: "assistant", OBSERVATION: "tool", FUNCTION: "assistant"}


def hf_messages(
    conversation: Conversation, structured: bool = True
) -> tuple[list[dict[str, Any]], list[int]]:
    """The chat template's messages for ``conversation`` and, for each of its turns, the index of
    the last message it became (an observation answering several calls becomes several).
    ``structured=False``: each turn one message, a call's JSON as the assistant's text (for a
    template that does not write ``tool_calls``)."""
    out: list[dict[str, Any]] = []
    if conversation.system is not None:
        out.append({"role": "system", "content": conversation.system})
    places: list[int] = []
    ids: list[str] = []  # the calls the last function-call turn made
    made = 0
    for turn, (role, content) in enumerate(conversation.messages):
        if not structured:
            out.append({"role": _PLAIN_ROLES[role], "content": content})
        elif role == FUNCTION:
            try:
                checked = function_calls(content, f"function-call turn {turn}", made + 1)
            except DataError as exc:
                raise RowError(str(exc)) from None
            made += len(checked)
            ids = [c["id"] for c in checked]
            out.append({"role": "assistant", "content": "", "tool_calls": checked})
        elif role == OBSERVATION:
            out += _results(content, ids, turn)
            ids = []
        else:
            out.append({"role": _PLAIN_ROLES[role], "content": content})
            ids = []
        places.append(len(out) - 1)
    return out, places


def _results(content: str, ids: list[str], turn: int) -> list[dict[str, Any]]:
    """An observation turn as ``tool`` messages: one per call of the turn before it (results
    joined as ``formatting: openai`` joins them), or one answering the first call (a single
    result for several calls, as LLaMA-Factory's rows often write them)."""
    if not ids:
        raise RowError(
            f"observation turn {turn} answers no function call (the turn before it is not a "
            "function_call); a tool result follows the call it answers"
        )
    results = content.split(RESULTS_JOIN) if len(ids) > 1 else [content]
    if len(results) == 1:
        return [{"role": "tool", "content": content, "tool_call_id": ids[0]}]
    if len(results) != len(ids):
        raise RowError(
            f"observation turn {turn} holds {len(results)} results for {len(ids)} calls; give "
            "one result per call"
        )
    return [{"role": "tool", "content": r, "tool_call_id": i} for r, i in zip(results, ids)]


def hf_tools(tools: str | None) -> list[dict[str, Any]] | None:
    """A conversation's tools (JSON text) as requests give them: a bare function ``{"name": ...,
    "parameters": ...}`` (LLaMA-Factory's rows) wrapped as ``{"type": "function", "function":
    ...}``; entries already in that form, or of another shape, are kept as they are."""
    if not tools:
        return None
    try:
        given = json.loads(tools)
    except (ValueError, RecursionError):
        raise RowError("the tools column is not JSON (a list of functions)") from None
    out = []
    for tool in given if isinstance(given, list) else [given]:
        bare = isinstance(tool, dict) and "name" in tool and "function" not in tool
        out.append({"type": "function", "function": tool} if bare else tool)
    return out
