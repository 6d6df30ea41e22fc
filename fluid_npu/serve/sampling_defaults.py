"""What a request that leaves a decoding setting out gets: the server's ``SamplingDefaults``.

OpenAI's defaults (temperature 1, top_p 1, no top-k / min-p, no repetition penalty), or the
model's ``generation_config`` where it sets one, as vLLM's ``--generation-config auto`` (its
default) reads it. ``protocol.py`` leaves a setting the request did not give as None; ``fill``
puts the default there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    def of(cls, generation_config: Any) -> SamplingDefaults:
        """The defaults a model's ``GenerationConfig`` (or None) sets; the rest stay OpenAI's."""
        given = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(generation_config, name, None)
            if value is not None:
                given[name] = type(getattr(cls, name))(value)  # (the field's type: int or float)
        return cls(**given)

    def fill(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with every setting the request left out (None) taken from these."""
        return {
            k: getattr(self, k) if v is None and hasattr(self, k) else v for k, v in params.items()
        }
