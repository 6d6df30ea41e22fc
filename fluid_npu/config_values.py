"""A configuration value checked against a type annotation: ``config.py``'s typed keys, and
``transformers.TrainingArguments`` keys passed through where their type is a plain one.

A value of the wrong type is a ``ConfigError`` naming the key, the type and the fix; the few safe
conversions (an int for a float, a float written as text, as YAML 1.1 reads "2e-4") are made.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from fluid_npu.errors import ConfigError


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation, converting the few safe cases (int → float)."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(
            f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})"
        )
    if origin is list:
        (inner,) = typing.get_args(hint) or (Any,)
        if isinstance(value, list):
            return [coerce(key, v, inner) for v in value]
        raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(
        f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__}); "
        f"fix the value in the YAML or the {key}=... override"
    )


def pass_through(key: str, value: Any, hint: Any) -> Any:
    """A TrainingArguments value checked against its field's type where that is plain (bool,
    int, float, str, or one of them or None), so ``adam_beta1: abc`` is an error naming the key,
    not a failure deep in the optimizer; a float written as text (YAML 1.1's "2e-4") is read as
    one; other values (enums, dicts, lists) go to transformers as they are."""
    plain = {bool, int, float, str, type(None)}
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = set(typing.get_args(hint)) if union else {hint}
    if value is None or not options <= plain:  # (null: left out)
        return value
    checked = coerce(key, value, hint)
    return checked if isinstance(value, str) else value


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def json_object(text: str, flag: str, example: str) -> dict[str, Any]:
    """A flag's JSON object text as a dict; anything else is a ``ConfigError`` naming ``flag``
    and showing ``example``."""
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{flag} takes a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} takes a JSON object, e.g. '{example}'")
    return value
