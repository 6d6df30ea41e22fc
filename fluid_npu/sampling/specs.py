"""vLLM's ``structured_outputs`` object, checked — what ``fluid serve``'s field
(``serve/structured.py``) and ``fluid generate --structured-outputs`` both read — and that flag's
grammar.

One of ``json`` (a schema, an object or its text), ``json_object: true``, ``regex``, ``choice`` (a
list of texts) or ``grammar`` (EBNF), and ``disable_any_whitespace``; ``disable_fallback`` and
``disable_additional_properties`` are what happens anyway (one backend, and a schema's objects take
only the properties it lists); a null field is "not given"; anything else is a ``GrammarError``
naming it.
"""

from __future__ import annotations

from typing import Any

from fluid_npu.config_values import json_object
from fluid_npu.errors import ConfigError
from fluid_npu.sampling.grammar import KINDS, Grammar, GrammarCompiler, GrammarError

AS_IS = ("disable_fallback", "disable_additional_properties")
SHAPES = {  # what each key holds
    "json": (dict | str, "a JSON schema (an object, or its text)"),
    "json_object": (bool, "true"),
    "regex": (str, "a regular expression"),
    "choice": (list, "a list of texts"),
    "grammar": (str, "an EBNF grammar with a root rule"),
}


def structured_spec(given: dict[str, Any]) -> tuple[str, Any, bool]:
    """``(kind, spec, any_whitespace)`` of a ``structured_outputs`` object."""
    given = {k: v for k, v in given.items() if v is not None}  # (null: not given, as in vLLM)
    extra = set(given) - {*KINDS, "disable_any_whitespace", *AS_IS}
    if extra:
        raise GrammarError(
            f"structured_outputs has {sorted(extra)}; it takes one of {', '.join(KINDS)} and "
            f"disable_any_whitespace, {', '.join(AS_IS)} (whitespace_pattern and structural_tag "
            "are not supported)"
        )
    if any(not isinstance(given.get(k, False), bool | None) for k in AS_IS):
        raise GrammarError(f"structured_outputs' {' and '.join(AS_IS)} are true or false")
    chosen = [k for k in KINDS if given.get(k) not in (None, False)]
    if len(chosen) != 1:
        raise GrammarError(f"structured_outputs takes exactly one of {', '.join(KINDS)}")
    kind = chosen[0]
    shape, what = SHAPES[kind]
    flat = given.get("disable_any_whitespace", False)
    if not isinstance(given[kind], shape) or not isinstance(flat, bool | None):
        raise GrammarError(f"structured_outputs.{kind} must be {what}")
    return kind, given[kind], not flat


def json_object_flag(text: str | None, flag: str) -> dict[str, Any] | None:
    """A flag's JSON object (None: not given); anything else is a ``ConfigError`` naming it."""
    return None if text is None else json_object(text, flag, '{"regex": "[0-9]+"}')


def flag_grammar(given: dict[str, Any] | None, tokenizer: Any, model: Any) -> Grammar | None:
    """``--structured-outputs`` (a ``structured_outputs`` object) compiled for ``model``'s
    logits (None: not given); a malformed or uncompilable one is a ``ConfigError`` naming the
    flag."""
    if given is None:
        return None
    vocab = model.get_output_embeddings().weight.shape[0]
    try:
        kind, spec, free = structured_spec(given)
        return GrammarCompiler(tokenizer, vocab).compile(kind, spec, any_whitespace=free)
    except ConfigError as exc:
        raise ConfigError(f"--structured-outputs: {exc}") from None
