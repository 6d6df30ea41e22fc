"""A dataset's tool calls: a function-call turn read as calls, and calls written as a model writes
them for a tool-call parser.

LLaMA-Factory's data write a call as a ``function_call`` turn whose content is JSON —
``{"name": ..., "arguments": {...}}`` or a list of such objects (``function_calls`` reads it into
the OpenAI form ``tooluse.check_tool_calls`` checks, arguments an object, ids ``call00001``, …;
OpenAI's own call objects are read too, a call's ``id`` / ``type`` ignored).
The named templates write a turn's calls in their model's own format (``written_calls``), the one
``fluid serve --tool-call-parser NAME`` reads back: ``pangu`` (openPangu: a JSON list between
``[unused11]`` and ``[unused12]``), ``hermes`` (Qwen: each call a ``<tool_call>`` block),
``llama3_json`` (Llama 3.x: ``{"name", "parameters"}`` objects separated by ``; ``). The JSON is
``json.dumps(..., ensure_ascii=False)``, which a Jinja template's ``tojson`` writes too.
"""

from __future__ import annotations

import json
from typing import Any

from fluid_npu.data.tooluse import check_tool_calls
from fluid_npu.errors import DataError


def function_calls(content: str, where: str, first: int = 1) -> list[dict[str, Any]]:
    """A function-call turn's JSON as checked OpenAI tool calls (ids ``call{first:05d}``, …);
    anything else is a ``DataError`` naming ``where`` and the format."""
    try:
        given = json.loads(content)
    except (ValueError, RecursionError):
        raise DataError(
            f'{where} is not JSON: its content must be {{"name": ..., "arguments": {{...}}}} or '
            "a list of such calls (LLaMA-Factory's function_call format)"
        ) from None
    calls = given if isinstance(given, list) else [given]
    out = []
    for i, call in enumerate(calls):
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            call = call["function"]  # (OpenAI's {"id", "type": "function", "function": ...})
        if isinstance(call, dict):
            call = {k: v for k, v in call.items() if k not in ("id", "type")}
        if not isinstance(call, dict) or set(call) - {"name", "arguments"}:
            raise DataError(
                f'{where}: call {i} must be {{"name": ..., "arguments": {{...}}}} (has '
                f"{sorted(call) if isinstance(call, dict) else type(call).__name__})"
            )
        out.append({"id": f"call{first + i:05d}", "type": "function", "function": call})
    return check_tool_calls(out, where)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _pangu(calls: list[dict[str, Any]]) -> str:
    return "[unused11]" + _dumps(calls) + "[unused12]"


def _hermes(calls: list[dict[str, Any]]) -> str:
    return "\n".join(f"<tool_call>\n{_dumps(c)}\n</tool_call>" for c in calls)


def _llama3(calls: list[dict[str, Any]]) -> str:
    return "; ".join(_dumps({"name": c["name"], "parameters": c["arguments"]}) for c in calls)


WRITERS = {"pangu": _pangu, "hermes": _hermes, "llama3_json": _llama3}


def written_calls(parser: str, calls: list[dict[str, Any]]) -> str:
    """``calls`` (OpenAI form) as the text a model writes for ``--tool-call-parser parser``."""
    fns = [c["function"] for c in calls]
    return WRITERS[parser]([{"name": f["name"], "arguments": f["arguments"]} for f in fns])


def tools_text(tools: str) -> str | None:
    """A conversation's tools (JSON text: LLaMA-Factory's bare functions, or OpenAI's
    ``{"type": "function", "function": ...}`` entries) as the named templates list them: the
    functions as one JSON list (None for none: ``[]``, ``{}``, ``null``, as a request without
    tools); a ``DataError`` when it is not JSON."""
    try:
        given = json.loads(tools)
    except (ValueError, RecursionError):
        raise DataError("the tools column is not JSON (a list of functions)") from None
    if not given:
        return None
    listed = given if isinstance(given, list) else [given]
    return _dumps([_function(t) for t in listed])


def _function(tool: Any) -> Any:
    wrapped = isinstance(tool, dict) and tool.get("type") == "function" and "function" in tool
    return tool["function"] if wrapped else tool
