"""How the lm-eval model ``fluid`` (``harness.py``) reads a ``generate_until`` request as lm-eval's
``hf`` model reads it: the generation kwargs turned into the sampler's settings
(``generation_settings``), and the new tokens turned into the text a task scores
(``generation_text``: a reasoning model's thinking removed, then the cut at ``until``).

Imported by ``harness.py`` only, after it has checked that lm-eval is installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text

from fluid_npu.errors import ConfigError

# generation kwargs: applied as transformers applies them; read when sampling (ignored by greedy
# decoding, as in transformers without do_sample); at their neutral value only
APPLIED = ("repetition_penalty", "min_new_tokens")
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "seed")
GREEDY_IGNORES = (*SAMPLING, "typical_p")
NEUTRAL = {"num_beams": 1, "num_return_sequences": 1, "use_cache": True}


def generation_settings(
    given: dict[str, Any] | None, max_gen_toks: int, generation_config: Any = None
) -> tuple[list[str], int, dict[str, Any]]:
    """A request's ``until`` strings, token budget and the settings the sampler applies;
    ``generation_config``: the model's, whose top_k / top_p / min_p apply where a sampling
    request leaves them unset (as transformers)."""
    kwargs = dict(normalize_gen_kwargs(dict(given or {}), max_gen_toks))
    until = [str(u) for u in kwargs.pop("until") or []]
    max_gen = int(kwargs.pop("max_gen_toks"))
    applied = {name: kwargs.pop(name) for name in APPLIED if name in kwargs}
    # as hf decides it (normalize_gen_kwargs): a temperature above 0 without do_sample samples
    if kwargs.pop("do_sample", False):
        applied["do_sample"] = True
        applied.update((name, kwargs.pop(name)) for name in SAMPLING if name in kwargs)
        for name in ("top_k", "top_p", "min_p"):
            if name not in applied and getattr(generation_config, name, None) is not None:
                applied[name] = getattr(generation_config, name)
        if kwargs.get("typical_p", 1.0) == 1.0:  # (off; the sampler has no typical sampling)
            kwargs.pop("typical_p", None)
    else:
        for name in GREEDY_IGNORES:
            kwargs.pop(name, None)
    for name, neutral in NEUTRAL.items():
        if kwargs.get(name, neutral) == neutral:
            kwargs.pop(name, None)
    if "max_length" in kwargs:
        raise ConfigError(
            "generation_kwargs max_length (prompt + generation) is not read by the fluid "
            "model; bound the generation with max_gen_toks"
        )
    if kwargs:
        raise ConfigError(
            f"generation_kwargs {', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))}: "
            "the fluid model does not do these; it takes until, max_gen_toks (or "
            "max_new_tokens), do_sample, temperature, top_k, top_p, min_p, seed, "
            "repetition_penalty and min_new_tokens"
        )
    return until, max_gen, applied


def generation_text(
    tokens: Sequence[int], tokenizer: Any, until: list[str], think_end_token: str | int | None
) -> str:
    """The text a task scores, as lm-eval's ``hf`` model makes it: with ``think_end_token`` (a
    token id, or a text) everything up to its last occurrence removed, then the text cut at each
    ``until`` string in the order given (``postprocess_generated_text``)."""
    tokens = list(tokens)
    if isinstance(think_end_token, int):
        ends = [i for i, t in enumerate(tokens) if t == think_end_token]
        tokens = tokens[ends[-1] + 1 :] if ends else tokens
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if isinstance(think_end_token, int):
        text = text.lstrip()
    marker = think_end_token if isinstance(think_end_token, str) else None
    return postprocess_generated_text(text, until, marker)
