"""A conversation's tool turns as a tokenizer's own chat template takes them.

LLaMA-Factory's data write a tool call as a ``function_call`` turn whose content is JSON —
``{"name": ..., "arguments": {...}}`` or a list of such objects — and a tool's answer as an
``observation`` turn (``formatting: openai`` rows reach the same two turns, ``formats.py``). The
named templates write those texts where their format strings say. A tokenizer's own Jinja
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
from typing import Any

from fluid_npu.data.templates import (
    ASSISTANT,
    FUNCTION,
    OBSERVATION,
    USER,
    Conversation,
    RowError,
)
from fluid_npu.errors import DataError

# how ``formatting: openai`` joins consecutive tool results into one observation turn (as
# LLaMA-Factory's converter does); split back into one ``tool`` message per result here
RESULTS_JOIN = "\n</tool_response>\n<tool_response>\n"


def hf_messages(conversation: Conversation) -> tuple[list[dict[str, Any]], list[int]]:
    """The chat template's messages for ``conversation`` and, for each of its turns, the index of
    the last message it became (an observation answering several calls becomes several)."""
    from fluid_npu.sampling.tooluse import check_tool_calls

    out: list[dict[str, Any]] = []
    if conversation.system is not None:
        out.append({"role": "system", "content": conversation.system})
    places: list[int] = []
    ids: list[str] = []  # the calls the last function-call turn made
    made = 0
    for turn, (role, content) in enumerate(conversation.messages):
        if role == FUNCTION:
            calls = _calls(content, turn, made)
            try:
                checked = check_tool_calls(calls, f"function-call turn {turn}")
            except DataError as exc:
                raise RowError(str(exc)) from None
            made += len(checked)
            ids = [c["id"] for c in checked]
            out.append({"role": "assistant", "content": "", "tool_calls": checked})
        elif role == OBSERVATION:
            results = content.split(RESULTS_JOIN) if len(ids) > 1 else [content]
            if len(results) != len(ids):  # one answer to several calls, or no call before it
                results = [content]
            for i, result in enumerate(results):
                message = {"role": "tool", "content": result}
                if i < len(ids):
                    message["tool_call_id"] = ids[i]
                out.append(message)
            ids = []
        else:
            out.append({"role": {USER: "user", ASSISTANT: "assistant"}[role], "content": content})
            ids = []
        places.append(len(out) - 1)
    return out, places


def hf_tools(tools: str | None) -> list[dict[str, Any]] | None:
    """A conversation's tools (JSON text) as requests give them: a bare function ``{"name": ...,
    "parameters": ...}`` (LLaMA-Factory's rows) wrapped as ``{"type": "function", "function":
    ...}``; entries already in that form, or of another shape, are kept as they are."""
    if not tools:
        return None
    given = json.loads(tools)
    out = []
    for tool in given if isinstance(given, list) else [given]:
        bare = isinstance(tool, dict) and "name" in tool and "function" not in tool
        out.append({"type": "function", "function": tool} if bare else tool)
    return out


def _calls(content: str, turn: int, made: int) -> list[dict[str, Any]]:
    """A function-call turn's JSON as OpenAI tool calls with ids (not yet checked)."""
    where = f"function-call turn {turn}"
    try:
        given = json.loads(content)
    except (ValueError, RecursionError):
        raise RowError(
            f'{where} is not JSON: its content must be {{"name": ..., "arguments": {{...}}}} or '
            "a list of such calls (LLaMA-Factory's function_call format)"
        ) from None
    calls = given if isinstance(given, list) else [given]
    out = []
    for i, call in enumerate(calls):
        if not isinstance(call, dict) or set(call) - {"name", "arguments"}:
            raise RowError(
                f'{where}: call {i} must be {{"name": ..., "arguments": {{...}}}} (has '
                f"{sorted(call) if isinstance(call, dict) else type(call).__name__})"
            )
        out.append({"id": f"call{made + i + 1:05d}", "type": "function", "function": call})
    return out
