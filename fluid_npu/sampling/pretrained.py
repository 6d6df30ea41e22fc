"""``FluidForCausalLM``: a FLUID checkpoint loaded for decoding, with transformers' conventions.

``FluidForCausalLM.from_pretrained(model_dir, adapter=None, khead=None)`` loads base + Stage I
adapter (merged for speed) + K-head with their fingerprint checks, and its ``generate(input_ids,
attention_mask=None, max_new_tokens=..., policy=..., loop=...)`` feels like the transformers call
(``do_sample`` / ``temperature`` / ``top_k`` / ``top_p`` / ``generation_config``), with
``last_stats`` holding the statistics of the latest call. Decoding is ``api.generate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fluid_npu.errors import ConfigError
from fluid_npu.model.khead import KHead
from fluid_npu.sampling.api import GENERATION_KEYS, GenerateOutput, generate
from fluid_npu.sampling.drafting import DraftBudget
from fluid_npu.sampling.inputs import parse_dtype
from fluid_npu.sampling.stats import GenerateStats

# GenerationConfig fields the decoding follows (the rest of GENERATION_KEYS' kin), and fields
# that only describe the checkpoint or transformers' own bookkeeping
_FOLLOWED = {"max_new_tokens", "max_length", "eos_token_id", "pad_token_id"}
_INERT = {"bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
          "use_cache", "cache_implementation", "return_legacy_cache"}  # fmt: skip
# settings whose "off" is 1 (a config made from a model's writes some out explicitly); every
# other setting is off when it is None, False, 0 or empty
_OFF_AT_ONE = {"num_beams", "num_beam_groups", "num_return_sequences", "repetition_penalty",
               "encoder_repetition_penalty", "length_penalty", "typical_p"}  # fmt: skip


def _check_generation_config(config: Any) -> None:
    """Refuse a ``GenerationConfig`` setting the engine would otherwise drop silently (every
    field it holds away from transformers' defaults must be one it follows)."""
    diff = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(vars(config))
    unknown = sorted(
        k for k, v in diff.items()
        if k not in _FOLLOWED and k not in _INERT and k not in GENERATION_KEYS
        and v and not (k in _OFF_AT_ONE and v == 1)
    )  # fmt: skip
    if unknown:
        raise ConfigError(
            f"generation_config sets {', '.join(unknown)}, which FLUID decoding does not do "
            f"(it follows {', '.join(sorted({*GENERATION_KEYS, *_FOLLOWED}))}); leave them at "
            "transformers' defaults"
        )


class FluidForCausalLM:
    """A loaded FLUID model with a transformers-style ``generate`` (greedy, lossless, elastic)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        mask_id: int,
        khead: KHead | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.khead = khead
        self.last_stats: GenerateStats | None = None
        self.last_output: GenerateOutput | None = None
        # the decode engine's measured step costs and acceptance, per policy: each generate call
        # continues from what the earlier ones measured (``drafting.py``)
        self.draft_budgets: dict[Any, DraftBudget] = {}

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        adapter: str | Path | None = None,
        khead: str | Path | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        mask_token: str | None = None,
        device: str | torch.device | None = None,
        chat_template: str | None = None,
    ) -> FluidForCausalLM:
        """Base model (+ Stage I adapter, merged) (+ K-head); mismatches are CheckpointErrors.

        ``dtype``: ``auto`` / None (the checkpoint's), ``float32``, ``bfloat16``, ``float16`` or a
        ``torch.dtype``: the dtype the model computes in. ``chat_template``: a Jinja chat template
        (``prompts.read_chat_template``) that replaces the tokenizer's own.
        """
        from fluid_npu.model.adapters import load_fluid
        from fluid_npu.model.khead import load_khead

        dtype = parse_dtype(dtype)
        loaded = load_fluid(model_dir, adapter, dtype=dtype, merge=True, mask_token=mask_token)
        head = None
        if khead is not None:
            head, _ = load_khead(
                khead,
                base_fingerprint=loaded.base_fingerprint,
                adapter_fingerprint=loaded.adapter_fingerprint,
                hidden_size=loaded.model.config.get_text_config().hidden_size,
            )
        model = loaded.model
        if device is not None:
            model = model.to(device)
        if chat_template is not None:
            loaded.tokenizer.chat_template = chat_template
        return cls(model, loaded.tokenizer, loaded.mask.id, head)

    def engine_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with this model's draft budgets added to its ``engine_kwargs``."""
        engine = {"budgets": self.draft_budgets, **(kwargs.get("engine_kwargs") or {})}
        return {**kwargs, "engine_kwargs": engine}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        policy: str | None = None,
        loop: str = "fused",
        generation_config: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Prompt + new tokens ``[B, L]`` like transformers; statistics in ``last_stats``.

        Greedy unless ``do_sample=True``; the sampling keywords are transformers' (``do_sample``,
        ``temperature``, ``top_k`` — 50 when sampling and not given, transformers' default; 0 turns
        it off —, ``top_p``, ``min_p``, ``repetition_penalty``, ``min_new_tokens``,
        ``stop_strings``) plus ``seed``
        (None: drawn from torch's global generator, so ``torch.manual_seed`` reproduces a call as
        in transformers), and a
        ``generation_config`` (a ``transformers.GenerationConfig``) supplies any of them, and
        ``max_new_tokens`` / ``max_length`` / ``eos_token_id`` / ``pad_token_id``, that are not
        passed explicitly; any other setting it holds away from transformers' default (beams,
        ``no_repeat_ngram_size``, ``num_return_sequences``, ...) is refused by name, never dropped.
        ``max_length`` counts the prompt, as in transformers (``max_new_tokens`` wins when both
        are set) and must leave room for a token; without either, 64 new tokens (the checkpoint's
        own ``generation_config`` gives only the EOS and pad ids: FLUID decodes greedily, and the
        lossless check compares with plain greedy decoding). ``eos_token_id=None`` given
        explicitly turns EOS off, as in transformers.
        """
        max_length = kwargs.pop("max_length", None)
        if "eos_token_id" in kwargs and kwargs["eos_token_id"] is None:
            kwargs["eos_token_id"] = []  # transformers: an explicit None stops at no token
        if generation_config is not None:
            _check_generation_config(generation_config)
            for name in (*GENERATION_KEYS, "eos_token_id", "pad_token_id"):
                value = getattr(generation_config, name, None)
                if name not in kwargs and value is not None:
                    kwargs[name] = value
            if max_new_tokens is None:
                max_new_tokens = getattr(generation_config, "max_new_tokens", None)
            if max_length is None:
                max_length = getattr(generation_config, "max_length", None)
        if max_new_tokens is None and max_length is not None:
            width = input_ids.shape[-1] if hasattr(input_ids, "shape") else max(map(len, input_ids))
            if int(max_length) <= int(width):
                raise ConfigError(
                    f"max_length {max_length} leaves no room after the prompt ({width} tokens): "
                    "max_length counts the prompt, as in transformers; give max_new_tokens instead"
                )
            max_new_tokens = int(max_length) - int(width)
        if policy is None:
            policy = "khead" if self.khead is not None else "entropy"
        out = generate(
            self.model,
            self.mask_id,
            input_ids,
            attention_mask,
            policy=policy,
            loop=loop,
            max_new_tokens=64 if max_new_tokens is None else max_new_tokens,
            khead=self.khead,
            tokenizer=kwargs.pop("tokenizer", self.tokenizer),
            **self.engine_kwargs(kwargs),
        )
        self.last_output, self.last_stats = out, out.stats
        return out.sequences
