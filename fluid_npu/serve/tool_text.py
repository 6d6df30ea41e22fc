"""The tool calls in a model's answer, read as ``fluid serve``'s chat route returns them
(``--tool-call-parser NAME``, as vLLM's): ``ToolCallText`` splits an answer into ``content`` and
``tool_calls``, ``ForcedCalls`` reads an answer ``tool_choice`` forced (``tools.py`` decides which
reader a request gets).

``hermes`` (Hermes 2 Pro / 3, Qwen2.5, Qwen3, QwQ: vLLM's name) reads calls written as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks; ``pangu`` (openPangu:
vllm-ascend's name) reads ``[unused11][{"name": ..., "arguments": {...}}, ...][unused12]``, a
list of calls between two special tokens, which the answer's text writes out for the parser
(``Detokenizer(spelled=...)``; with ``tool_choice: "none"`` they stay out, as every special token
does); ``llama3_json`` (Llama 3.1 / 3.2 / 3.3: vLLM's name) reads an answer that is nothing but
calls — JSON objects ``{"name": ..., "parameters": {...}}`` separated by ``;``, after an optional
``<|python_tag|>`` —, so an answer that starts otherwise is text from its first characters on,
and one that starts with ``{`` is held until it ends; ``mistral`` (vLLM's name) reads both
forms Mistral's models write after ``[TOOL_CALLS]``: a JSON list of calls, to the answer's end
(7B Instruct v0.3, Nemo, Small up to 3.1, Large 2407 / 2411), and one call per marker written
``name[ARGS]{...}`` (Small 3.2, Magistral, Ministral 3, Devstral; ``name[CALL_ID]id[ARGS]{...}``
in the tokenizers of version 11, ``name{...}`` where ``[ARGS]`` was left out), its calls' ids nine
letters and digits (vLLM's, which Mistral's templates require when the calls come back in a
conversation: the id a model wrote after ``[CALL_ID]`` is not kept, as vLLM keeps none);
``qwen3_coder`` (vLLM's name, ``qwen3_xml`` too: Qwen3-Coder, Qwen3.5) reads ``<tool_call>``
blocks holding one XML call, ``<function=NAME>`` with ``<parameter=ARG>value</parameter>``
arguments, typed by the offered functions' schemas (``tool_xml.py``). A marker
that is a special token of the tokenizer is written out for the parser only: an answer that holds
no call leaves it out.

A block may hold one call or a list (``llama3_json``: objects only); arguments written as a JSON
text holding the object, or under ``parameters``, are read too. The answer's text before the first
block is the message's ``content`` (null when empty); each block is a call, returned with an id
(``chatcmpl-tool-…``, as vLLM's) and its arguments as a JSON text, and the choice's
``finish_reason`` is ``"tool_calls"``. A last block cut before its closing marker (``max_tokens``,
a stop string) still counts if its JSON is whole. Text after the first block is not part of the
answer (as in vLLM; ``mistral``'s blocks run to the answer's end, so text after a call's JSON
makes the answer text). When any block is not a JSON object with a string ``name`` and an object
``arguments``, there are no calls and the whole text is the ``content``, so nothing the model wrote
is lost. ``parallel_tool_calls: false`` returns the first call only.

Streamed, ``content`` deltas come as they are decoded up to the first block (a text that may be
the start of its marker is held back until it is not), and the calls come in one chunk when the
answer ends (each ``delta.tool_calls`` entry whole: index, id, type, name, arguments), so a streamed
answer adds up to the non-streamed one exactly. The parse runs on the answer's text as returned
(after ``--reasoning-parser`` took the reasoning apart, after stop strings). A marker that is
neither text that decodes as itself nor one token (so it could not be found in that text) is
refused at start, as is a ``pangu`` marker that is not one token of the model's tokenizer.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Any

from fluid_npu.serve.tool_xml import schemas, xml_call

_ID_CHARS = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolMarkers:
    """The text that opens and closes a tool call block; ``tokens``: each must be one token of
    the model's tokenizer (markers that are not are no model's this parser is for); ``whole``:
    the calls are the whole answer, JSON objects separated by ``;`` that the opening marker may
    precede, and no closing marker (Llama 3's)."""

    start: str
    end: str  # "": the block runs to the answer's end (Mistral's)
    tokens: bool = False
    whole: bool = False
    short_ids: bool = False  # the calls' ids are 9 letters and digits (Mistral templates' rule)
    # markers inside a block: a block that is not JSON is read as "name[CALL_ID]id[ARGS]{...}"
    # (Mistral's later form; written out when the tokenizer has them as special tokens)
    inner: tuple[str, ...] = ()
    xml: bool = False  # a block is Qwen3-Coder's <function=...> call (tool_xml.py)


PARSERS = {  # vLLM's names (vllm-ascend's for openPangu: pangu)
    "hermes": ToolMarkers("<tool_call>", "</tool_call>"),
    "pangu": ToolMarkers("[unused11]", "[unused12]", tokens=True),
    "llama3_json": ToolMarkers("<|python_tag|>", "", whole=True),
    "mistral": ToolMarkers(
        "[TOOL_CALLS]", "", tokens=True, short_ids=True, inner=("[ARGS]", "[CALL_ID]")
    ),
    "qwen3_coder": ToolMarkers("<tool_call>", "</tool_call>", xml=True),
    "qwen3_xml": ToolMarkers("<tool_call>", "</tool_call>", xml=True),  # (vLLM's second name)
}


class ForcedCalls:
    """The reader of an answer decoded as calls (``tool_choice`` ``"required"``: a JSON list of
    ``{"name", "parameters"}``; ``name``: that function's arguments): no ``content`` while it
    runs, the calls at its end (``ToolCallText``'s interface)."""

    def __init__(self, name: str | None, short_ids: bool = False) -> None:
        self.name, self.short_ids = name, short_ids  # (short_ids: ``_call``'s)
        self.finish_reason = "tool_calls" if name is None else None  # (named: "stop" stays)
        self.held = ""

    def add(self, text: str) -> str:
        self.held += text
        return ""

    def finish(self, parse: bool = True, stopped: bool = False) -> tuple[str, list[dict[str, Any]]]:
        given = _json(self.held) if parse else None
        if self.name is not None:  # the arguments as the model wrote them (vLLM's)
            if not isinstance(given, dict) or _text(given) is None:
                return self.held, []
            return "", [_call(self.name, self.held.strip(), self.short_ids)]
        else:
            found = [
                {"name": c["name"], "arguments": c["parameters"]}
                for c in (given if isinstance(given, list) else [])
                if isinstance(c, dict) and isinstance(c.get("parameters"), dict)
            ]
        texts = [_text(c["arguments"]) for c in found]
        if not found or None in texts:  # cut short (max_tokens, a stop string, an abort): text
            return self.held, []
        return "", [_call(c["name"], t, self.short_ids) for c, t in zip(found, texts)]


def _text(arguments: Any) -> str | None:
    """Arguments as JSON text; None for a value JSON cannot write back (a number that read as
    infinite)."""
    try:
        return json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return None


def _call(name: str, arguments: str, short_id: bool = False) -> dict[str, Any]:
    """A tool call as the API returns it: an id (vLLM's form; ``short_id``: nine letters and
    digits, as vLLM's Mistral parser makes them, which Mistral's templates require when the call
    comes back in a conversation), its arguments' JSON text."""
    ident = "".join(secrets.choice(_ID_CHARS) for _ in range(9)) if short_id else None
    return {
        "id": ident or f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


class ToolCallText:
    """An answer's text deltas in, ``content`` deltas out; the calls when it ends (``finish``)."""

    finish_reason = "tool_calls"

    def __init__(
        self,
        markers: ToolMarkers,
        parallel: bool = True,
        special: tuple[str, ...] = (),
        tools: list[dict[str, Any]] | None = None,
    ) -> None:
        """``special``: the markers that are special tokens of the model's tokenizer, written
        out for the parser only: an answer that holds no call leaves them out, as its text leaves
        out every special token; ``tools``: the functions offered (their schemas type the values
        of XML calls)."""
        self.markers, self.parallel, self.special = markers, parallel, special
        self.functions = schemas(tools) if markers.xml else {}
        # the special markers that may come outside a call (pangu's closing one, Mistral's
        # [ARGS]): left out of the content, held back while a delta may end inside one
        self.stray = tuple(m for m in special if m != markers.start)
        # content held back: it may be the start of the opening marker (None: ``whole`` markers,
        # and the answer is text)
        self.pending: str | None = ""
        self.held: str | None = None  # everything from the first opening marker on

    def _plain(self, text: str) -> str:
        for marker in self.stray:
            text = text.replace(marker, "")
        return text

    def add(self, text: str) -> str:
        """Feed an answer's text delta; the ``content`` delta that can be passed on now."""
        if self.held is not None:
            self.held += text
            return ""
        if self.markers.whole:
            return self._add_whole(self._plain(text))
        self.pending += text
        start = self.pending.find(self.markers.start)
        if start >= 0:  # (the markers after it are the calls')
            out, self.held = self._plain(self.pending[:start]), self.pending[start:]
            self.pending = ""
            return out
        self.pending = self._plain(self.pending)
        keep = max(_partial_suffix(self.pending, m) for m in (self.markers.start, *self.stray))
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def _add_whole(self, text: str) -> str:
        """``whole`` markers: the answer is held while it may still be calls (it starts with the
        opening marker or a JSON object, after any whitespace), else passed on from then on."""
        if self.pending is None:  # (decided: text)
            return text
        self.pending += text
        begun = self.pending.lstrip()
        if begun.startswith((self.markers.start, "{")):
            self.held, self.pending = self.pending, ""
            return ""
        if not begun or self.markers.start.startswith(begun):
            return ""
        out, self.pending = self.pending, None
        return out

    def finish(self, parse: bool = True, stopped: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """At the answer's end: the ``content`` still held back and the calls (none: all text;
        ``parse=False``: the answer did not end, and stays text; ``stopped``: a stop string ended
        it, maybe inside a special marker's text)."""
        if self.held is None:
            out, self.pending = self._plain(self.pending or ""), ""
            return self._cut_marker(out) if stopped else out, []
        calls = parse_calls(self.held, self.markers, self.functions) if parse else None
        if calls is None:
            text = self.held
            for marker in self.special:
                text = text.replace(marker, "")
            return self._cut_marker(text) if stopped else text, []
        return "", calls if self.parallel else calls[:1]

    def _cut_marker(self, text: str) -> str:
        """``text``, which a stop string ended, without the start of a special marker it ends in:
        a special token is written whole, so only a stop string found inside its text (written for
        the parser alone) ends one part-way, and none of it is the model's text."""
        cut = max((_partial_suffix(text, m) for m in self.special), default=0)
        return text[: len(text) - cut]


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that ``marker`` starts with."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _json(text: str) -> Any:
    """``text`` as JSON, or None where it is not (nested past Python's recursion limit, or an
    integer of more digits than it converts, included: a model in a loop writes either)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def parse_calls(
    text: str, markers: ToolMarkers, functions: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]] | None:
    """The calls of ``text`` (which starts with an opening marker, or for ``whole`` markers with
    a JSON object), or None when a block is not a call (then nothing is); ``functions``: the
    offered functions' argument schemas (``tool_xml.schemas``), for XML calls."""
    if markers.whole:
        found = _objects(text.lstrip().removeprefix(markers.start))
        return None if found is None else _checked(found)
    if markers.end:
        blocks = re.findall(
            f"{re.escape(markers.start)}(.*?)(?:{re.escape(markers.end)}|\\Z)",
            text,
            flags=re.DOTALL,
        )
    else:  # (each block runs to the next opening marker, the last to the answer's end)
        blocks = text.split(markers.start)[1:]
    found = []
    for block in blocks:  # a call, or a list of them (openPangu and Mistral write a list)
        if markers.xml:
            found.append(xml_call(block, functions or {}))
            continue
        given = _json(block)
        if given is None and markers.inner:
            given = _named_call(block)
        found += given if isinstance(given, list) else [given]
    return _checked(found, markers.short_ids)


def _named_call(block: str) -> dict[str, Any] | None:
    """Mistral's later form of one call, ``name[CALL_ID]id[ARGS]{...}`` (``[CALL_ID]id`` and
    ``[ARGS]`` may be missing: ``name{...}``), as ``{"name", "arguments"}``; None if it is not."""
    head, sep, args = block.partition("[ARGS]")
    if not sep:  # (a tokenizer whose text leaves [ARGS] out: the object starts the arguments)
        at = block.find("{")
        head, args = (block[:at], block[at:]) if at > 0 else ("", "")
    name = head.partition("[CALL_ID]")[0].strip()  # (any name, as vLLM reads it)
    given = _json(args)
    if not name or not isinstance(given, dict):
        return None
    return {"name": name, "arguments": given}


def _objects(text: str) -> list[Any] | None:
    """JSON values one after another, separated by ``;`` (Llama 3's parallel calls), or None
    where ``text`` is anything else."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while True:
        at = len(text) - len(text[at:].lstrip())
        try:
            value, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            return None
        out.append(value)
        rest = text[at:].lstrip()
        if not rest or rest == ";":  # (a last ';' too, as vLLM reads it)
            return out
        if not rest.startswith(";"):
            return None
        at = len(text) - len(rest) + 1


def _checked(found: list[Any], short_ids: bool = False) -> list[dict[str, Any]] | None:
    """The calls ``found`` as the API returns them (``short_ids``: ``_call``'s), or None when
    one is not a call."""
    calls = []
    for call in found:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        if "arguments" not in call and "parameters" in call:  # (Llama 3's name for them)
            call["arguments"] = call.pop("parameters")
        if isinstance(call.get("arguments"), str):  # (some fine-tunes write the object as text)
            call["arguments"] = _json(call["arguments"])
        if not isinstance(call.get("arguments"), dict):
            return None
        text = _text(call["arguments"])
        if text is None:
            return None
        calls.append(_call(call["name"], text, short_ids))
    return calls or None
