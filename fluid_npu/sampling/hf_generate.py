"""transformers' ``generate`` conventions ``FluidForCausalLM`` follows: which generation settings
the engine follows, which are inert or at their "off" value, which are refused (and what to use
instead), the prompt's width as ``max_length`` counts it, and a transformers streamer fed as
transformers' assisted decoding feeds it."""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import torch

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.api import GENERATION_KEYS, generate

# GenerationConfig fields the decoding follows (the rest of GENERATION_KEYS' kin), and fields
# that only describe the checkpoint or transformers' own bookkeeping
LENGTHS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length")
FOLLOWED = {*LENGTHS, "eos_token_id", "pad_token_id"}
DEFAULT_NEW_TOKENS = 20  # transformers' when nothing sets a length (its max_length 20, new tokens)
_INERT = {"bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
          "use_cache", "cache_implementation", "return_legacy_cache",
          # assisted decoding's settings: nothing without an assistant_model (refused here)
          "num_assistant_tokens", "num_assistant_tokens_schedule",
          "assistant_confidence_threshold", "assistant_lookbehind",
          "target_lookbehind"}  # fmt: skip
# settings whose "off" is 1 (a config made from a model's writes some out explicitly); every
# other setting is off when it is None, False, 0 or empty
_OFF_AT_ONE = {"num_beams", "num_beam_groups", "num_return_sequences", "repetition_penalty",
               "encoder_repetition_penalty", "length_penalty", "typical_p"}  # fmt: skip
# transformers' own ``generate`` arguments (beside its GenerationConfig fields), and what FLUID
# offers instead where it has something
_HF_ARGUMENTS = {"logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                 "synced_gpus", "assistant_model", "assistant_tokenizer",
                 "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate",
                 "use_model_defaults"}  # fmt: skip
_INSTEAD = {
    "num_return_sequences": "repeat the prompt's row once per sequence (seed row r with seed + r)",
    "return_dict_in_generate": "read last_output (new tokens, finish reasons, log-probabilities)",
    "output_scores": "pass logprobs=True, top_logprobs=N and logprobs_mode='processed_logits' "
    "(the scores the token was chosen from); read last_output.logprobs / top_logprobs",
    "output_logits": "pass logprobs=True, top_logprobs=N and logprobs_mode='raw_logits'; read "
    "last_output.logprobs / top_logprobs",
    "stopping_criteria": "pass stop_strings, eos_token_id or max_new_tokens",
}


def _is_off(name: str, value: Any) -> bool:
    """Whether a transformers generation setting is at a value that changes nothing."""
    if name == "guidance_scale":  # (transformers guides only above 1)
        return value is None or value <= 1
    return name in _INERT or not value or (name in _OFF_AT_ONE and value == 1)


# transformers' "off" for a sampling setting a call gives as None: its generate applies the
# call's keywords last, None included, and adds no processor for a None setting
OFF_WHEN_NONE = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                 "repetition_penalty": 1.0}  # fmt: skip


def explicit_nones(model: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's keywords with each sampling setting given as None at its "off" value, and
    ``pad_token_id=None`` as the first EOS id (transformers pads with it then)."""
    from fluid_npu.sampling.inputs import eos_and_pad

    out = {k: OFF_WHEN_NONE[k] if v is None and k in OFF_WHEN_NONE else v
           for k, v in kwargs.items()}  # fmt: skip
    if "pad_token_id" in out and out["pad_token_id"] is None:
        eos = eos_and_pad(model, out.get("eos_token_id"))[0]
        out["pad_token_id"] = eos[0] if eos else None
    return out


def check_generation_config(config: Any, given: set[str], *, checkpoint: bool) -> None:
    """A ``GenerationConfig`` setting the engine does not do (held away from transformers'
    defaults, and not given by the call itself) is refused by name — or, in the checkpoint's own
    config (which the call did not choose), named in a warning and not applied."""
    diff = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(vars(config))
    unknown = sorted(
        k for k, v in diff.items()
        if k not in FOLLOWED and k not in GENERATION_KEYS and k not in given
        and not _is_off(k, v)
    )  # fmt: skip
    if not unknown:
        return
    follows = ", ".join(sorted({*GENERATION_KEYS, *FOLLOWED}))
    if checkpoint:
        warnings.warn(
            f"the checkpoint's generation_config sets {', '.join(unknown)}, which FLUID decoding "
            f"does not do; they are not applied (it follows {follows}): set them to their "
            "defaults in model.generation_config to decode without this warning",
            stacklevel=3,
        )
        return
    raise ConfigError(
        f"generation_config sets {', '.join(unknown)}, which FLUID decoding does not do (it "
        f"follows {follows}); leave them at transformers' defaults"
    )


@functools.cache
def _known_keywords() -> tuple[frozenset[str], frozenset[str]]:
    """``api.generate``'s own keywords, and the transformers settings that are not (computed
    once)."""
    from transformers import GenerationConfig

    own = frozenset(inspect.signature(generate).parameters)
    return own, frozenset(_HF_ARGUMENTS | set(vars(GenerationConfig())))


def transformers_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the transformers settings ``api.generate`` does not take that are at
    their "off" value; one such setting asking for something is a ``ConfigError`` naming it (a
    name neither knows stays, for ``api.generate``'s own TypeError)."""
    own, known = _known_keywords()
    kept = {}
    for name, value in kwargs.items():
        if name in own or name in FOLLOWED or name not in known:
            kept[name] = value
        elif not _is_off(name, value):
            instead = _INSTEAD.get(name, "leave it out (FLUID decodes greedily or samples exactly)")
            raise ConfigError(
                f"{name}={value!r} is a transformers generation setting FLUID decoding does not "
                f"do; {instead}"
            )
    return kept


def feed_streamer(streamer: Any, inputs: Any) -> Any:
    """``stream(row, tokens)`` feeding a transformers streamer (``put`` / ``end``) the way
    transformers' assisted decoding does: the prompt ``[1, L]`` first (a ``TextStreamer`` with
    ``skip_prompt`` drops it), then each step's committed tokens ``[1, n]``. One prompt only:
    transformers' streamers read one sequence."""
    if not callable(getattr(streamer, "put", None)) or not callable(getattr(streamer, "end", None)):
        raise ConfigError(
            f"streamer takes a transformers streamer (put / end: TextStreamer, "
            f"TextIteratorStreamer, a BaseStreamer), got {type(streamer).__name__}; for a plain "
            "function pass stream=callable(row, tokens)"
        )
    rows = inputs.tolist() if hasattr(inputs, "tolist") else list(inputs)
    if rows and not hasattr(rows[0], "__len__"):
        rows = [rows]  # (one prompt given flat)
    if len(rows) != 1:
        raise ConfigError(
            f"a streamer reads one sequence, as transformers' streamers do; this call has "
            f"{len(rows)} prompts: pass one, or stream=callable(row, tokens) for a batch"
        )
    streamer.put(torch.tensor([list(rows[0])], dtype=torch.long))
    return lambda row, tokens: streamer.put(torch.tensor([tokens], dtype=torch.long))


def prompt_width(inputs: Any) -> int:
    """The prompt's width as transformers counts ``max_length`` / ``min_length`` from it: the
    padded batch's (a list of rows: its longest; a flat list of ids: one row)."""
    if hasattr(inputs, "shape") and len(inputs.shape):
        return int(inputs.shape[-1])
    rows = list(inputs)
    if rows and not hasattr(rows[0], "__len__"):
        return len(rows)  # (one prompt given flat)
    return max((len(r) for r in rows), default=0)


def new_tokens(
    lengths: dict[str, Any], width: int, configured: set[str], context: int | None
) -> int:
    """transformers' length rule: ``max_new_tokens``, else ``max_length`` less the prompt
    (``width`` tokens), else its default of 20 new tokens (at most the ``context``'s room); a
    length from a config (``configured``), not the call, at most the context's room too (a
    checkpoint's ``max_new_tokens`` of the whole context still decodes a prompt)."""
    from fluid_npu.sampling.inputs import PromptError, as_count

    room = None if context is None or context <= width else context - width
    asked = [
        n
        for n in ("max_new_tokens", "max_length")
        if lengths[n] is not None and n not in configured
    ]
    if context is not None and room is None and not asked:  # (a length from a config or the
        # default of 20, named in an error, would be nothing the caller passed)
        raise PromptError(
            f"the prompt has {width} tokens and fills the model's context ({context} positions): "
            "no room for a new token; shorten the prompt"
        )
    if lengths["max_new_tokens"] is not None:
        if "max_new_tokens" in configured and room is not None:
            return min(as_count("max_new_tokens", lengths["max_new_tokens"]), room)
        return lengths["max_new_tokens"]
    if lengths["max_length"] is not None:
        max_length = as_count("max_length", lengths["max_length"])
        if "max_length" in configured and context is not None:
            max_length = min(max_length, context)
        if max_length <= width:
            raise ConfigError(
                f"max_length {max_length} leaves no room after the prompt ({width} tokens): "
                "max_length counts the prompt, as in transformers; give max_new_tokens instead"
            )
        if context is not None and max_length > context:
            raise ConfigError(
                f"max_length {max_length} is past the model's context ({context} positions): "
                f"give max_length <= {context} (it counts the prompt, as in transformers)"
            )
        return max_length - width
    return DEFAULT_NEW_TOKENS if room is None else min(DEFAULT_NEW_TOKENS, room)
