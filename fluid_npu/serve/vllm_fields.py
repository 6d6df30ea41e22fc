"""vLLM's request fields beside the sampling ones, on both ``fluid serve`` routes (completions and
chat), typed as vLLM's OpenAI server takes them:

* ``add_special_tokens`` — completions (default true): a text prompt is encoded with the
  tokenizer's special tokens (its BOS), or without them where false (a prompt already holding
  them, e.g. a chat rendered by the client); token-id prompts are taken as given. Chat: false
  only (the default, as vLLM's): a conversation is encoded as training encodes it — the
  template's tokens, and the tokenizer's BOS first where the template writes none;
* ``request_id`` — the request's id where no ``X-Request-Id`` header gives one (the header wins,
  as in vLLM): the response's ``id`` (``cmpl-…`` / ``chatcmpl-…``), the logs and the
  one-request-per-id rule;
* ``cache_salt`` — a prompt reuses only cache entries that requests of the same salt wrote
  (``sampling/reuse.py``): tenants that each send their own salt cannot learn from timing what
  the others' prompts held (a non-empty string);
* ``use_beam_search`` and ``length_penalty`` — beam search, accepted at its neutral value only
  (false, 1.0): this server decodes one sequence per choice.

``include_reasoning`` (chat, ``protocol.ChatBody``): false drops a reasoning parser's part from the
answer (``reasoning`` / ``reasoning_content`` null, no reasoning deltas), as vLLM does.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from fluid_npu.serve.errors import APIError


class VllmFields(BaseModel):
    """The fields of the module docstring (``protocol._Common`` takes them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    add_special_tokens: bool | None = None
    request_id: str | None = None
    cache_salt: str | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None


def check_vllm_fields(body: VllmFields, chat: bool) -> bool:
    """A 400 naming a field of ``body`` at a value this server does not do; else whether a
    completion's text prompts get the tokenizer's special tokens."""
    if body.use_beam_search:
        raise APIError("use_beam_search=true is not supported: this server decodes one "
                       "sequence per choice; leave it out or send false",
                       param="use_beam_search")  # fmt: skip
    if body.length_penalty not in (None, 1.0):
        raise APIError(f"length_penalty={body.length_penalty} ranks beams, which this server "
                       "does not search; leave it out or send 1.0",
                       param="length_penalty")  # fmt: skip
    if body.cache_salt == "":
        raise APIError("cache_salt must be a non-empty string (or left out)", param="cache_salt")
    if chat and body.add_special_tokens:
        raise APIError(
            "add_special_tokens=true is not supported on chat: a conversation is encoded as "
            "training encodes it (the chat template's tokens, the tokenizer's BOS first where the "
            "template writes none); leave it out or send false",
            param="add_special_tokens",
        )
    return body.add_special_tokens is not False
