"""Tools in a conversation, as a chat template takes them: the functions a request offers
(``check_tools``), an assistant turn's tool calls (``check_tool_calls``) and a tool's answer.

The format is the OpenAI chat API's, which ``fluid serve``'s chat route and ``fluid generate``'s
``messages`` lines (with a ``"tools"`` key beside them) read alike:

* a tool: ``{"type": "function", "function": {"name", "description"?, "parameters"?,
  "strict"?}}`` — handed to the template as given (transformers' ``apply_chat_template(tools=)``
  takes these JSON-schema dicts; Qwen2.5 / Qwen3 / Hermes templates list them in the system turn);
* an assistant message's ``tool_calls``: ``[{"id", "type": "function", "function": {"name",
  "arguments"}}]`` with ``arguments`` a JSON text (as the API returns it) or an object. The
  template gets the arguments as an object, as vLLM hands them over: transformers' templates
  write ``arguments | tojson``, which would quote a text a second time;
* a ``tool`` message: the call's result as ``content`` and the ``tool_call_id`` it answers.

A bad entry is a ``DataError`` naming where it is (``messages[2].tool_calls[0].function
.arguments``) and what it must be.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fluid_npu.errors import DataError

FUNCTION_KEYS = {"name": str, "description": str, "parameters": dict, "strict": bool}


def check_tools(value: Any, where: str) -> list[dict[str, Any]]:
    """The tools a request offers, checked (``where``: how the error names them); a function's
    null fields are left out (OpenAI's "not given")."""
    out = []
    for at, tool in _entries(value, where, '{"type": "function", ...} tools'):
        if (
            not isinstance(tool, dict)
            or set(tool) != {"type", "function"}
            or tool["type"] != "function"
        ):
            raise DataError(f'{at} must be {{"type": "function", "function": {{...}}}}')
        fn = tool["function"]
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f'{at}.function needs a "name" (a non-empty string)')
        fn = {k: v for k, v in fn.items() if v is not None}
        for key, given in fn.items():
            kind = FUNCTION_KEYS.get(key)
            if kind is None:
                raise DataError(
                    f"{at}.function has {key!r}; a function holds {', '.join(FUNCTION_KEYS)}"
                )
            if not isinstance(given, kind):
                raise DataError(f"{at}.function.{key} must be a {_kind(kind)}")
        out.append({"type": "function", "function": fn})
    return out


def check_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool calls as the chat template gets them (arguments an object)."""
    out = []
    for at, call in _entries(value, where, "tool calls"):
        if (
            not isinstance(call, dict)
            or set(call) - {"id", "type", "function", "index"}  # (index: a streamed call's)
            or call.get("type", "function") != "function"
            or not isinstance(call.get("function"), dict)
        ):
            raise DataError(
                f'{at} must be {{"id": ..., "type": "function", "function": {{"name": ..., '
                '"arguments": ...}}'
            )
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise DataError(f"{at}.id must be the call's id (a non-empty string)")
        fn = call["function"]  # (parsed_arguments: what the openai client's helpers add)
        if set(fn) - {"name", "arguments", "parsed_arguments"} or not isinstance(
            fn.get("name"), str
        ):
            raise DataError(f'{at}.function holds "name" (a string) and "arguments"')
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise DataError(f"{at}.function.arguments is not valid JSON ({exc.msg})") from None
            except (ValueError, RecursionError):  # too deep, or an integer past Python's limit
                raise DataError(f"{at}.function.arguments is not JSON this server reads") from None
        if not isinstance(arguments, dict):
            raise DataError(f"{at}.function.arguments must be a JSON object")
        out.append(
            {"id": call["id"], "type": "function",
             "function": {"name": fn["name"], "arguments": arguments}}
        )  # fmt: skip
    return out


def _entries(value: Any, where: str, what: str) -> Iterator[tuple[str, Any]]:
    """``(where[i], entry)`` of a non-empty list; anything else is a ``DataError``."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be a non-empty list of {what}")
    for i, entry in enumerate(value):
        yield f"{where}[{i}]", entry


def _kind(kind: type) -> str:
    return {str: "string", dict: "JSON object", bool: "boolean"}[kind]
