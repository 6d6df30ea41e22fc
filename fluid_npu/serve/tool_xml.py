"""Qwen3-Coder's XML tool calls (``--tool-call-parser qwen3_coder``, vLLM's name; ``qwen3_xml``
too): inside ``<tool_call>`` … ``</tool_call>`` one call written

    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    …
    </function>

— what Qwen3-Coder's chat template writes for a call (a string value as it is, any other as JSON)
and the model learned to write back. Each value is text, typed by the offered function's JSON
schema for that argument, as vLLM's parser types it: a string stays text; an integer, a number,
a boolean (``true`` / ``false``, any case) or ``null`` / ``None`` (where the type is not a string,
or the schema allows null) becomes one; an object or array is read as JSON, or as a Python literal
(a model trained on a template that wrote Python's ``repr``); a value that does not read as its type
stays text (vLLM makes a boolean that is neither ``False``), and so does one JSON cannot write (a
set, bytes, infinity). An argument the function does not declare, or a function not offered, keeps
its text. A parameter whose ``</parameter>`` is missing ends where the next one starts on a line
of its own, or at ``</function>``, as vLLM reads it; a block that is not such a call (no
``</function>``, text between the parameters, a name with spaces) leaves the whole answer text,
where vLLM drops that call and keeps the others.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

_CALL = re.compile(r"\s*<function=([^>\n]+)>\n?(.*?)</function>\s*", re.DOTALL)
# a parameter's value ends at its </parameter>, or where the next parameter starts on a line of
# its own, or at the call's end (a model that left </parameter> out: vLLM reads it so too)
_PARAMETER = re.compile(
    r"<parameter=([^>\n]+)>\n?(.*?)(?:\n?</parameter>|(?=\n<parameter=)|\n?\Z)\s*", re.DOTALL
)
_STRINGS = ("string", "str", "text", "varchar", "char", "enum")


def schemas(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The offered functions' argument schemas by function name (``properties`` of each)."""
    out = {}
    for tool in tools or ():
        fn = tool.get("function") or {}
        params = fn.get("parameters") or {}
        props = params.get("properties") if isinstance(params, dict) else None
        out[fn.get("name")] = props if isinstance(props, dict) else {}
    return out


def xml_call(block: str, functions: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """One ``<function=NAME>…</function>`` call as ``{"name", "arguments"}``, its values typed by
    ``functions[NAME]`` (``schemas``); None when ``block`` is anything else (text around the call,
    no closing ``</function>``, text between the parameters, an argument given twice)."""
    whole = _CALL.fullmatch(block)
    if whole is None:
        return None
    name, body = whole.group(1).strip(), whole.group(2)
    props = functions.get(name, {})
    arguments: dict[str, Any] = {}
    at = len(body) - len(body.lstrip())
    while at < len(body):  # (each parameter where the last ended: text between them is no call)
        found = _PARAMETER.match(body, at)
        key = found.group(1).strip() if found else None
        if found is None or key in arguments:
            return None
        arguments[key] = _typed(found.group(2), props.get(key))
        at = found.end()
    if not name or len(name.split()) != 1:  # (no name, or text: "get weather", "{{ name }}")
        return None
    return {"name": name, "arguments": arguments}


def _typed(value: str, schema: Any) -> Any:
    """``value`` as the argument's ``schema`` types it (the module docstring)."""
    if not isinstance(schema, dict):
        return value
    kind, nullable = _kind(schema)
    if nullable and value.strip().lower() in ("null", "none"):
        return None
    if kind in _STRINGS:
        return value
    text = value.strip()
    if text.lower() in ("null", "none"):
        return None
    if kind.startswith(("int", "uint", "long", "short", "unsigned")):
        return _or_text(int, text, value)
    if kind.startswith(("num", "float", "double")):
        number = _or_text(float, text, value)
        if not isinstance(number, float) or not math.isfinite(number):  # (JSON has no inf)
            return value
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind in ("boolean", "bool", "binary"):
        return {"true": True, "false": False}.get(text.lower(), value)
    for read in (json.loads, ast.literal_eval):  # (a Python literal: a template's str() of it)
        try:
            given = read(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        try:  # only what JSON writes (not a set, bytes, a complex number, inf)
            json.dumps(given, allow_nan=False)
        except (ValueError, TypeError, RecursionError):
            return value
        return given
    return value


def _kind(schema: dict[str, Any]) -> tuple[str, bool]:
    """The argument's type (the first that is not null, of a list or an ``anyOf``) and whether
    null is allowed."""
    given, union = schema.get("type"), schema.get("anyOf")
    options = list(given) if isinstance(given, list) else [given] if given is not None else []
    if isinstance(union, list):
        options += [o.get("type") for o in union if isinstance(o, dict)]
    names = [str(o).strip().lower() for o in options if o is not None]
    kinds = [n for n in names if n != "null"]
    return (kinds[0] if kinds else "string" if not names else "null"), "null" in names


def _or_text(convert: Any, text: str, value: str) -> Any:
    try:
        return convert(text)
    except (ValueError, OverflowError):
        return value
