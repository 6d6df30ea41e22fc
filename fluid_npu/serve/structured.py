"""Structured outputs in ``fluid serve``: the request fields that hold a model's output to a
grammar, checked here and compiled for the engine (``sampling/grammar.py``), as vLLM serves them.

* ``response_format`` (the OpenAI API's): ``{"type": "text"}`` (no constraint),
  ``{"type": "json_object"}`` (any JSON object; with a ``schema`` beside it, as some providers'
  clients send one, JSON that follows it) or ``{"type": "json_schema", "json_schema": {"name",
  "schema", "strict"?, "description"?}}`` (JSON that follows the schema — what the openai
  client's ``chat.completions.parse(response_format=SomeModel)`` sends); null fields are "not
  given";
* ``structured_outputs`` (vLLM's): one of ``json`` (a schema), ``regex``, ``choice`` (a list of
  texts, one of which is the whole output), ``grammar`` (EBNF with a ``root`` rule) or
  ``json_object: true``, and ``disable_any_whitespace`` (JSON without free whitespace);
  ``disable_fallback`` and ``disable_additional_properties`` are what this server does anyway;
  vLLM's older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` fields
  (and ``guided_decoding_backend`` ``"xgrammar"`` or ``"auto"``) are read as these keys;
* ``tool_choice: "required"`` or a named function (``tools.py``): the answer is the calls,
  decoded under the schema of a list of calls, or of the named function's arguments.

Both routes take the first two (vLLM's completions route takes them too); a request gives at
most one of the three. A spec is compiled off the event loop, in a thread of its own, and
compiled specs are cached (up to 512 MiB, as vLLM bounds it), so a schema sent again costs
nothing; one that does not compile, or accepts no text, is a 400 naming its field. The grammar
ends with EOS, so ``ignore_eos`` is refused with it.

The engine masks what each step verifies for a constrained request (``grammar.py``), so its
tokens are AR decoding under the grammar. With ``--reasoning-parser``, a chat's grammar holds the
answer: the model reasons freely and the grammar starts after the closing marker (as vLLM's
reasoning-aware structured outputs do), or at the first token when the prompt closed the block.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.grammar import KINDS, Grammar, GrammarCompiler, GrammarError
from fluid_npu.sampling.specs import structured_spec
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.reasoning import ReasoningParser


class StructuredFields(BaseModel):
    """The request fields that hold an output to a grammar (both routes; ``protocol.py``)."""

    response_format: dict[str, Any] | None = None  # (vLLM's completions take it too)
    structured_outputs: dict[str, Any] | None = None  # vLLM's
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names of its keys
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None


@dataclass(frozen=True)
class Constraint:
    """A checked, not yet compiled, grammar spec (``grammar.KINDS``) and the request field it
    came from (the 400's ``param`` when it does not compile)."""

    kind: str
    spec: Any
    field: str
    any_whitespace: bool = True


def _response_format(given: dict[str, Any]) -> Constraint | None:
    given = {k: v for k, v in given.items() if v is not None}  # (null: not given)
    kind = given.get("type")
    if kind == "text" and set(given) == {"type"}:
        return None
    if kind == "json_object" and set(given) == {"type"}:
        return Constraint("json_object", None, "response_format")
    if (
        kind == "json_object"
        and set(given) == {"type", "schema"}
        and isinstance(given["schema"], dict)
    ):
        # (how some providers' clients send a schema: held to it, not dropped)
        return Constraint("json", given["schema"], "response_format")
    if kind == "json_schema" and set(given) == {"type", "json_schema"}:
        js = given["json_schema"]
        known = {"name", "schema", "strict", "description"}
        if (
            isinstance(js, dict)
            and set(js) <= known
            and isinstance(js.get("name"), str)
            and isinstance(js.get("schema"), dict)
            and isinstance(js.get("strict", False), bool | None)
        ):
            return Constraint("json", js["schema"], "response_format")
        raise APIError(
            'response_format.json_schema must be {"name": text, "schema": a JSON schema object, '
            '"strict"?: bool, "description"?: text}',
            param="response_format",
        )
    raise APIError(
        'response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
        '"json_schema", "json_schema": {"name": ..., "schema": {...}}}',
        param="response_format",
    )


# the request fields vLLM had before structured_outputs, as its keys (guided_decoding_backend:
# which backend, of which this server has one)
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}  # fmt: skip
# guided_decoding_backend "xgrammar:option,...": what each did in vLLM is what happens here (the
# first turns free whitespace off)
BACKEND_OPTIONS = ("disable-any-whitespace", "no-fallback", "disable-additional-properties")


def body_constraint(body: Any) -> Constraint | None:
    """The constraint a checked request body asks for: its ``response_format``, its
    ``structured_outputs`` or, read as that, its older ``guided_*`` fields (None: the output is
    free); a malformed one, or two at once, a 400 naming the field."""
    given = {key: getattr(body, name) for name, key in GUIDED.items()
             if getattr(body, name) is not None}  # fmt: skip
    backend, _, options = (body.guided_decoding_backend or "auto").partition(":")
    chosen = set(filter(None, options.split(",")))
    if backend not in ("auto", "xgrammar") or chosen - set(BACKEND_OPTIONS):
        raise APIError(
            f"guided_decoding_backend {body.guided_decoding_backend!r}: this server decodes with "
            f"xgrammar ('auto'), options {', '.join(BACKEND_OPTIONS)} after a colon",
            param="guided_decoding_backend",
        )
    if given and "disable-any-whitespace" in chosen:
        given["disable_any_whitespace"] = True
    if not given:
        return request_constraint(body.response_format, body.structured_outputs)
    field = next(name for name, key in GUIDED.items() if key in given)
    others = body.structured_outputs is not None or body.response_format is not None
    if len(set(given) & set(KINDS)) > 1 or others:
        raise APIError(
            f"{field} and another field constrain the output; give one (structured_outputs)",
            param=field,
        )
    return request_constraint(None, given, field)


def _structured_outputs(given: dict[str, Any], where: str) -> Constraint:
    try:
        kind, spec, free = structured_spec(given)
    except GrammarError as exc:
        raise APIError(str(exc), param=where) from None
    return Constraint(kind, spec, where, any_whitespace=free)


def request_constraint(
    response_format: dict[str, Any] | None,
    structured_outputs: dict[str, Any] | None,
    where: str = "structured_outputs",
) -> Constraint | None:
    """The constraint a request's ``response_format`` / ``structured_outputs`` (given as
    ``where``) ask for (None: the output is free); a malformed one, or both, a 400 naming the
    field."""
    found = None if response_format is None else _response_format(response_format)
    if structured_outputs is not None:
        if found is not None:
            raise APIError(
                "response_format and structured_outputs both constrain the output; give one",
                param="structured_outputs",
            )
        found = _structured_outputs(structured_outputs, where)
    return found


def grammar_after(
    parser: ReasoningParser | None,
    grammar: Grammar | None,
    prompt: Sequence[int],
    continuing: bool = False,
) -> int | None:
    """The token a chat's grammar starts after (``Request.grammar_after``): the reasoning
    parser's closing marker, so the model reasons freely and the grammar holds the answer — unless
    the prompt closed the block already (``enable_thinking: false``: all answer). A chat that
    continues its final message (``continuing``) continues its answer, held from the first
    token, unless that message stopped inside its reasoning."""
    if parser is None or grammar is None:
        return None
    if continuing:
        return parser.end if parser.opened(prompt) else None
    return None if parser.closed(prompt) else parser.end


def with_eos(constraint: Constraint | None, body: Any) -> Constraint | None:
    """``constraint``, which a request's ``ignore_eos`` cannot go with: a grammar ends with EOS."""
    if constraint is not None and body.ignore_eos:
        raise APIError(
            f"ignore_eos cannot go with {constraint.field}: the output's grammar ends with the "
            "EOS token",
            param="ignore_eos",
        )
    return constraint


# grammars a server compiles at once (app.py's pool): as vLLM sizes its pool, half the cores
# (rounded up), and here at least 2 (one slow schema holds up no other) and at most 8
COMPILE_THREADS = max(2, min((len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count() or 1) + 1, 16) // 2)  # fmt: skip


class Grammars:
    """A server's grammar compiler, made at the first constrained request (xgrammar's tokenizer
    tables cost a moment for a large vocabulary, and a server that gets none pays nothing)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> Grammar:
        """``constraint`` compiled (call it off the event loop); a spec that does not compile, or
        a server without xgrammar, is a 400 naming the request's field."""
        try:
            with self._lock:
                if self._compiler is None:
                    self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
                compiler = self._compiler
            return compiler.compile(
                constraint.kind, constraint.spec, any_whitespace=constraint.any_whitespace
            )
        except GrammarError as exc:
            raise APIError(str(exc), param=constraint.field) from None
        except ConfigError as exc:  # xgrammar is not installed
            raise APIError(f"this server cannot constrain its output: {exc}",
                           param=constraint.field) from None  # fmt: skip
