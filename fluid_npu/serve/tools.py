"""Tool calling in ``fluid serve``'s chat route: which requests get their tool calls parsed
(``tool_choice``), and the calls parsed out of a model's answer (``ToolCallText``), as vLLM's
``--enable-auto-tool-choice --tool-call-parser NAME`` does.

A request offers functions in ``tools`` (rendered into the prompt by the chat template:
``data/tooluse.py``) and says what the model may do with them in ``tool_choice``:

* ``"none"`` — the answer is text, returned as it is (the tools are still in the prompt);
* ``"auto"`` (the default when tools are given, as in the OpenAI API) — the model decides; the
  server parses its calls out of the text, which needs ``--enable-auto-tool-choice`` and a
  ``--tool-call-parser`` (a 400 naming them otherwise, as vLLM answers);
* ``"required"`` or a named function (``{"type": "function", "function": {"name": ...}}``) —
  the model must call: its output is decoded under a JSON schema (``structured.py``, as vLLM's
  guided decoding does), a list of ``{"name", "parameters"}`` calls of the offered functions (one
  at most with ``parallel_tool_calls: false``) or the named function's arguments, and read back
  as ``tool_calls`` (``ForcedCalls``). Neither needs ``--enable-auto-tool-choice``. As in vLLM and
  the OpenAI API, a named call's ``finish_reason`` stays ``"stop"``; ``"required"`` gives
  ``"tool_calls"``. An output cut short (``max_tokens``) is not JSON and comes back as
  ``content``.

How an answer's calls are read, parser by parser: ``tool_text.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluid_npu.data.tooluse import check_tools
from fluid_npu.errors import ConfigError, DataError
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.structured import Constraint
from fluid_npu.serve.tool_text import PARSERS, ForcedCalls, ToolCallText, ToolMarkers


def _arguments(fn: dict[str, Any]) -> dict[str, Any]:
    """The schema of a function's arguments: always an object (OpenAI's rule), so a function
    that declares none, or ``{}``, takes one with any fields."""
    params = fn.get("parameters") or {}
    return params if params.get("type") == "object" else {**params, "type": "object"}


@dataclass(frozen=True)
class ToolParser:
    """A parser bound to a tokenizer: its markers, and those the tokenizer calls special tokens
    (which the text would leave out) by id, to be written out in an answer's text."""

    markers: ToolMarkers
    spelled: dict[int, str]


def check_tool_parser_name(name: str) -> ToolMarkers:
    """The markers of the parser ``name``; an unknown one is a ``ConfigError`` naming the flag."""
    if name not in PARSERS:
        raise ConfigError(f"--tool-call-parser {name!r} is not one of {', '.join(sorted(PARSERS))}")
    return PARSERS[name]


def tool_parser(name: str, tokenizer: Any) -> ToolParser:
    """The parser ``name`` for ``tokenizer``: a marker is read in the answer's text, written out
    there when the tokenizer makes it one special token; a marker that is neither text that
    survives decoding nor one token (or not one token where the parser needs it) is a
    ``ConfigError`` naming ``--tool-call-parser``."""
    markers = check_tool_parser_name(name)
    spelled = {}
    for marker in (*(m for m in (markers.start, markers.end) if m), *markers.inner):
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=True) != marker:
            spelled[int(ids[0])] = marker  # one special token: written out in the answer
        elif marker in markers.inner:  # (a tokenizer without it: its models write no such form)
            continue
        elif markers.tokens and len(ids) != 1:
            raise ConfigError(
                f"--tool-call-parser {name}: {marker!r} is not one token of this model's "
                "tokenizer, so this is not a model that parser is for"
            )
        elif tokenizer.decode(ids, skip_special_tokens=True) != marker:
            raise ConfigError(
                f"--tool-call-parser {name}: this tokenizer spells {marker!r} with special "
                "tokens, which the returned text leaves out, so its calls could not be found"
            )
    return ToolParser(markers, spelled)


@dataclass(frozen=True)
class ToolSetting:
    """What a chat request asked of its tools, checked: the tools (for the template), the parser
    its answer's calls are read with (``tool_choice`` ``auto``; None: the answer stays text) and
    whether more than one call may come."""

    tools: list[dict[str, Any]] | None = None
    parser: ToolParser | None = None
    parallel: bool = True
    forced: str | None = None  # "required", or the function named in tool_choice
    short_ids: bool = False  # the server's parser gives nine-character ids (Mistral's): these too

    def reader(self) -> ToolCallText | ForcedCalls | None:
        """A fresh reader of one answer's calls (None: the answer stays text)."""
        if self.forced is not None:
            return ForcedCalls(None if self.forced == "required" else self.forced, self.short_ids)
        if self.parser is None:
            return None
        special = tuple(self.parser.spelled.values())
        return ToolCallText(self.parser.markers, self.parallel, special, self.tools)

    @property
    def constraint(self) -> Constraint | None:
        """The schema a forced call is decoded under (None: not forced): the named function's
        arguments, or a list of ``{"name", "parameters"}`` calls of the offered functions, their
        ``$defs`` gathered at the list's root, where their ``#/$defs/...`` references point."""
        if self.forced is None or self.tools is None:
            return None
        fns = {t["function"]["name"]: t["function"] for t in self.tools}
        if self.forced != "required":
            return Constraint("json", _arguments(fns[self.forced]), "tool_choice")
        calls, defs = [], {}
        for name, fn in fns.items():
            params = dict(_arguments(fn))
            for key in ("$defs", "definitions"):
                for ref, sub in (params.pop(key, None) or {}).items():
                    if defs.setdefault(key, {}).setdefault(ref, sub) != sub:
                        raise APIError(
                            f"tool_choice 'required': two tools define {key} {ref!r} "
                            "differently; rename one",
                            param="tool_choice",
                        )
            item = {"name": {"type": "string", "enum": [name]}, "parameters": params}
            calls.append({"type": "object", "properties": item, "required": list(item)})
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **defs}
        if not self.parallel:
            schema["maxItems"] = 1
        return Constraint("json", schema, "tool_choice")

    @property
    def spelled(self) -> dict[int, str]:
        """The special tokens an answer whose calls are read writes out (its markers)."""
        return {} if self.parser is None else self.parser.spelled


def tool_setting(
    tools: Any, choice: Any, parallel: bool | None, parser: ToolParser | None
) -> ToolSetting:
    """A request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` against the server's
    ``parser`` (None: no ``--enable-auto-tool-choice``); a 400 naming the field otherwise."""
    checked = None
    if tools is not None:
        try:
            checked = check_tools(tools, "tools")
        except DataError as exc:
            raise APIError(str(exc), param="tools") from None
    if choice is None:
        choice = "auto" if checked else "none"  # the OpenAI API's default
    if isinstance(choice, dict) or choice == "required":
        name = _named(choice) if isinstance(choice, dict) else None
        offered = [t["function"]["name"] for t in checked or ()]
        if not offered or (name is not None and name not in offered):
            raise APIError(
                f"tool_choice {choice!r} needs tools to call"
                + (f"; the tools offered are {offered}" if offered else ""),
                param="tool_choice",
            )
        short = parser is not None and parser.markers.short_ids  # (the model's template's rule)
        return ToolSetting(checked, None, parallel is not False, name or "required", short)
    if choice not in ("none", "auto"):
        raise APIError(
            f"tool_choice={choice!r} is not 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if choice == "auto" and checked is None:
        raise APIError("tool_choice 'auto' needs tools to choose from", param="tool_choice")
    if choice == "auto" and parser is None:
        raise APIError(
            "tool_choice 'auto' (the default when tools are given) needs a server started with "
            "--enable-auto-tool-choice and --tool-call-parser; send tool_choice: 'none' to have "
            "the tools in the prompt and the answer as text",
            param="tool_choice",
        )
    return ToolSetting(checked, parser if choice == "auto" else None, parallel is not False)


def _named(choice: dict[str, Any]) -> str:
    fn = choice.get("function")
    if (
        set(choice) != {"type", "function"}
        or choice["type"] != "function"
        or not isinstance(fn, dict)
        or set(fn) != {"name"}
        or not isinstance(fn["name"], str)
    ):
        raise APIError(
            'a named tool_choice is {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    return fn["name"]
