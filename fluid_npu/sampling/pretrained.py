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

from fluid_npu.model.khead import KHead
from fluid_npu.sampling.api import GENERATION_KEYS, GenerateOutput, generate
from fluid_npu.sampling.drafting import DraftBudget
from fluid_npu.sampling.inputs import parse_dtype
from fluid_npu.sampling.stats import GenerateStats


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
    ) -> FluidForCausalLM:
        """Base model (+ Stage I adapter, merged) (+ K-head); mismatches are CheckpointErrors.

        ``dtype``: ``auto`` / None (the checkpoint's), ``float32``, ``bfloat16``, ``float16`` or a
        ``torch.dtype``: the dtype the model computes in.
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
        ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``stop_strings``) plus ``seed``, and a
        ``generation_config`` (a ``transformers.GenerationConfig``) supplies any of them, and
        ``max_new_tokens`` / ``max_length`` / ``eos_token_id`` / ``pad_token_id``, that are not
        passed explicitly. ``max_length`` counts the prompt, as in transformers (``max_new_tokens``
        wins when both are set); without either, 64 new tokens.
        """
        max_length = kwargs.pop("max_length", None)
        if generation_config is not None:
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
            max_new_tokens = max(1, int(max_length) - int(width))
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
