"""The token-level fields of a completion or chat request, checked: OpenAI's ``logit_bias``, vLLM's
``allowed_token_ids``, ``stop_token_ids`` and ``bad_words`` (tokenized as vLLM tokenizes them), and
how many log-probability alternatives a request may ask for (vLLM's ``--max-logprobs``). Each bad
value is one ``APIError`` naming its field; bounds that need the model's vocabulary are checked by
the app (``app.py``), which knows it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.penalties import bad_word_sequences
from fluid_npu.sampling.rules import MAX_LOGIT_BIAS
from fluid_npu.serve.errors import APIError

if TYPE_CHECKING:
    from fluid_npu.serve.structured import Constraint

MAX_STOP = 64  # stop strings / stop token ids: each is matched every step; a bound, not OpenAI's 4
# a stop string's UTF-8 bytes: the engine decodes a window of the output that long every step
# (stops.py), so one request's 60 KB stop doubled every other request's step time
MAX_STOP_BYTES = 1024


def logit_bias_pairs(given: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (token id as a string -> bias in [-100, 100], up to 300) as the
    engine's ``(token, bias)`` pairs."""
    if not given:
        return ()
    if len(given) > MAX_LOGIT_BIAS:
        raise APIError(
            f"logit_bias holds {len(given)} tokens; at most {MAX_LOGIT_BIAS}", param="logit_bias"
        )
    pairs: dict[int, float] = {}
    for key, value in given.items():
        digits = key.isascii() and key.isdigit() and len(key) <= 20  # (int64 has 19 digits)
        if not digits or not -100 <= value <= 100:
            raise APIError(
                f"logit_bias maps token ids (as strings of digits) to biases in [-100, 100]; "
                f"got {key[:40]!r}: {value}",
                param="logit_bias",
            )
        if int(key) in pairs:
            raise APIError(f"logit_bias gives token {int(key)} twice", param="logit_bias")
        pairs[int(key)] = float(value)
    return tuple(sorted(pairs.items()))


def allowed_ids(ids: list[int] | None) -> tuple[int, ...]:
    """vLLM's ``allowed_token_ids``: a non-empty list of token ids (the vocabulary's bound is the
    app's check); none given: any token."""
    if ids is None:
        return ()
    if not ids or min(ids) < 0:
        raise APIError(
            "allowed_token_ids takes a non-empty list of token ids >= 0 (leave it out for any "
            "token)",
            param="allowed_token_ids",
        )
    return tuple(ids)


def bad_word_ids(tokenizer: Any, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """vLLM's ``bad_words`` as token sequences (``sampling.penalties.bad_word_sequences``: as vLLM
    tokenizes them); a bad one is a 400 naming ``bad_words``."""
    try:
        return bad_word_sequences(tokenizer, words)
    except ConfigError as exc:
        raise APIError(str(exc), param="bad_words") from None


def stop_token_ids(given: list[int] | None, constraint: Constraint | None) -> tuple[int, ...]:
    """vLLM's ``stop_token_ids``: up to ``MAX_STOP`` token ids (in the vocabulary: ``app.py``
    checks) that end the request as EOS does; not with a grammar, which decides where it ends."""
    ids = tuple(dict.fromkeys(given or ()))
    if len(ids) > MAX_STOP or any(t < 0 for t in ids):
        raise APIError(f"stop_token_ids takes up to {MAX_STOP} token ids (>= 0)",
                       param="stop_token_ids")  # fmt: skip
    if ids and constraint is not None:
        raise APIError(
            f"stop_token_ids cannot go with {constraint.field}: the output's grammar decides "
            "where it ends",
            param="stop_token_ids",
        )
    return ids


def check_logprobs(s: Any, chat: bool, cap: int, vocab: int) -> None:
    """vLLM's ``--max-logprobs``: the alternatives a request asks for (``logprobs`` /
    ``top_logprobs``, ``prompt_logprobs``, an echo's) are at most ``cap`` (-1: the vocabulary);
    -1 asks for the whole vocabulary (as vLLM reads it), which this resolves to ``vocab``.
    ``s`` is the request's ``protocol.Sampling`` (typed loosely: protocol imports this module)."""
    limit = vocab if cap < 0 else min(cap, vocab)
    for key, name in (("top_logprobs", "top_logprobs" if chat else "logprobs"),
                      ("prompt_logprobs", "prompt_logprobs")):  # fmt: skip
        given = s.params[key]
        if given == -1:
            s.params[key] = vocab
            if key == "prompt_logprobs" and s.prompt_logprobs == -1:
                s.prompt_logprobs = vocab
        if (s.params[key] or 0) > limit:
            why = "--max-logprobs sets it" if limit < vocab else "the vocabulary's size"
            raise APIError(
                f"{name}={given} asks for more alternatives than this server returns ({limit}; "
                f"{why}); ask for fewer",
                param=name,
            )
