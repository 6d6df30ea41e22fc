"""What a request that leaves a decoding setting out gets: ``SamplingDefaults``, read by
``fluid serve`` (``serve/protocol.py``) and the offline ``LLM`` alike.

OpenAI's defaults (temperature 1, top_p 1, no top-k / min-p, no repetition penalty), or the
model's ``generation_config`` where it sets one, as vLLM's ``--generation-config auto`` (its
default) reads it, with vLLM's ``override_generation_config`` (``--override-generation-config``)
set over it. ``serve/protocol.py`` leaves a setting the request did not give as None; ``fill``
puts the default there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# the generation-config settings vLLM reads as request defaults (max_new_tokens: max_tokens)
OVERRIDABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a decoding setting out gets: OpenAI's defaults (temperature 1,
    top_p 1, no top-k / min-p), or the model's ``generation_config`` where it sets one (vLLM's
    ``--generation-config auto``, its default)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def of(
        cls, generation_config: Any, override: Mapping[str, Any] | None = None
    ) -> SamplingDefaults:
        """The defaults a model's ``GenerationConfig`` (or None) sets, ``override``'s settings
        (``check_override``) over it; the rest stay OpenAI's."""
        given = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = setting(generation_config, override, name)
            if value is not None:
                given[name] = type(getattr(cls, name))(value)  # (the field's type: int or float)
        return cls(**given)

    def fill(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with every setting the request left out (None) taken from these."""
        return {
            k: getattr(self, k) if v is None and hasattr(self, k) else v for k, v in params.items()
        }


def generation_config_of(given: str, model: Any, name: str = "--generation-config") -> Any:
    """The ``GenerationConfig`` vLLM's ``--generation-config`` choice names: the model's own
    (``auto``), none (``vllm``: OpenAI's defaults), or the ``generation_config.json`` in the
    folder ``given``; one that cannot be read is a ``ConfigError`` naming ``name``."""
    if given == "auto":
        return getattr(model, "generation_config", None)
    if given == "vllm":
        return None
    from transformers import GenerationConfig

    from fluid_npu.errors import ConfigError

    try:
        return GenerationConfig.from_pretrained(given, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{name} {given!r}: cannot read it ({exc})") from None


def generation_defaults(
    given: str, model: Any, override: Mapping[str, Any] | None = None
) -> SamplingDefaults:
    """The decoding settings a request that leaves them out gets, as vLLM's
    ``--generation-config`` chooses them (``generation_config_of``) and
    ``--override-generation-config`` overrides them."""
    return SamplingDefaults.of(generation_config_of(given, model), override)


def setting(generation_config: Any, override: Mapping[str, Any] | None, name: str) -> Any:
    """``name``'s value: ``override``'s where it sets it, else the config's (None: unset)."""
    if override and override.get(name) is not None:
        return override[name]
    return getattr(generation_config, name, None)


def check_override(given: Any, name: str, keys: tuple[str, ...] = OVERRIDABLE) -> dict[str, Any]:
    """vLLM's ``override_generation_config`` (a dict, or its JSON text), checked: only the
    settings read as defaults (``keys``), each a finite number; an error names ``name``."""
    from fluid_npu.config_values import json_object
    from fluid_npu.errors import ConfigError

    example = '{"temperature": 0.6}'
    if isinstance(given, str):
        given = json_object(given, name, example)
    if not isinstance(given, Mapping):
        raise ConfigError(f"{name} takes a JSON object, e.g. '{example}'")
    for key, value in given.items():
        if key not in keys:
            raise ConfigError(f"{name}: {key!r} is not a setting it overrides; give some of {keys}")
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is not None and not (number and math.isfinite(value)):
            raise ConfigError(f"{name}: {key} takes a number, got {value!r}")
        if key in ("top_k", "max_new_tokens") and value is not None and value != int(value):
            raise ConfigError(f"{name}: {key} takes a whole number, got {value!r}")
        low, high = _RANGES[key]
        if value is not None and not low <= value <= high:
            raise ConfigError(f"{name}: {key} must lie in [{low}, {high}], got {value!r}")
    out = dict(given)
    if out.get("top_k") == -1:  # (vLLM's "off", as a request's top_k: 0 here)
        out["top_k"] = 0
    return out


# the values each setting may take (repetition_penalty: above 0, as the engine holds it)
_RANGES = {"temperature": (0.0, math.inf), "top_p": (1e-9, 1.0), "top_k": (-1, math.inf),
           "min_p": (0.0, 1.0), "repetition_penalty": (1e-9, math.inf),
           "max_new_tokens": (1, math.inf)}  # fmt: skip
