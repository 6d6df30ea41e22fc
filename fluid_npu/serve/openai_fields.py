"""The OpenAI chat fields that set nothing this server decodes: tags it accepts, and features it
accepts only at their neutral value.

The OpenAI client sends these with ``chat.completions.create`` (``openai/types/chat/
completion_create_params.py`` names and types them); ``protocol.ChatBody`` takes them, typed as
there, and ``check_chat_fields`` applies the project's rule — nothing that would change the answer
is silently ignored:

* tags that leave the output as it is, accepted and not used: ``metadata`` (OpenAI's limits: up to
  16 pairs of strings, keys up to 64 characters, values up to 512), ``store`` (nothing is kept:
  the answer is the same), ``service_tier``, ``prompt_cache_key`` (a prompt's prefix is reused
  without it), ``prompt_cache_retention``, ``prompt_cache_options``, ``safety_identifier``;
* features that would change the output, accepted only where they ask for what the server does
  anyway — ``modalities`` ``["text"]``, ``verbosity`` ``"medium"`` (OpenAI's default),
  ``functions`` ``[]`` and ``function_call`` ``"none"`` (the deprecated function calling; ``tools``
  is this server's), and null ``audio``, ``prediction``, ``web_search_options``,
  ``reasoning_effort`` and ``moderation``. Anything else is a 400 naming the field and what this
  server supports.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from fluid_npu.serve.errors import APIError

MAX_METADATA = 16  # pairs, as the OpenAI API allows (keys up to 64 characters, values 512)
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]  # reasoning_effort


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PromptCacheOptions(_Strict):
    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


class ChatFields(_Strict):
    """The OpenAI chat fields of the module docstring, typed as the OpenAI client types them."""

    # tags: accepted, the output as without them
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    safety_identifier: str | None = None
    # features: accepted at their neutral value only (NEUTRAL)
    modalities: list[Literal["text", "audio"]] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    reasoning_effort: Effort | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None


# field -> (the values that ask for nothing this server does not do, what to send instead)
NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "modalities": ((None, ["text"]), 'this server writes text only; send ["text"] or leave it out'),
    "verbosity": ((None, "medium"), "this server cannot set a model's verbosity; send 'medium' "
                  "or leave it out"),
    "reasoning_effort": ((None,), "this server sets no reasoning effort; a chat template's "
                         "switch goes in chat_template_kwargs (e.g. {\"reasoning_effort\": "
                         "\"low\"} or {\"enable_thinking\": false}); leave it out"),
    "functions": ((None, []), "the deprecated function calling is not served; offer the "
                  "functions as tools"),
    "function_call": ((None, "none"), "the deprecated function calling is not served; use "
                      "tool_choice with tools"),
    "audio": ((None,), "this server writes no audio; leave it out"),
    "prediction": ((None,), "this server takes no predicted output; leave it out"),
    "web_search_options": ((None,), "this server searches nothing; leave it out"),
    "moderation": ((None,), "this server runs no moderation; leave it out"),
}  # fmt: skip


def check_chat_fields(body: ChatFields) -> None:
    """A 400 naming the first field of ``body`` that asks for what this server does not do."""
    for name, (ok, instead) in NEUTRAL.items():
        value = getattr(body, name)
        if value not in ok:
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise APIError(f"{name}={shown} is not supported: {instead}", param=name)
    tags = body.metadata or {}
    if len(tags) > MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in tags.items()):
        raise APIError(
            f"metadata holds up to {MAX_METADATA} pairs of strings, keys up to 64 characters "
            "and values up to 512",
            param="metadata",
        )
