"""``FluidForCausalLM``: a FLUID checkpoint loaded for decoding, with transformers' conventions.

``FluidForCausalLM.from_pretrained(model_dir, adapter=None, khead=None)`` loads base + Stage I
adapter (merged for speed) + K-head with their fingerprint checks, and its ``generate(inputs,
generation_config=None, **kwargs)`` is called as transformers' is: ``input_ids`` /
``attention_mask`` (positionally or by name, ``**tokenizer(...)`` included), the sampling keywords
(``do_sample`` / ``temperature`` / ``top_k`` / ``top_p`` / ...), and the checkpoint's own
``generation_config`` for whatever a call leaves out; ``last_stats`` holds the statistics of the
latest call. A transformers setting FLUID decoding does not do is refused by name unless it is at
its "off" value (``num_beams=1``, ``use_cache=True``, ``output_scores=False``, ...); one the
checkpoint's own config holds (which the call did not choose) is named in a warning and not applied.
A ``streamer`` (``TextStreamer``, ``TextIteratorStreamer``) gets the prompt, then each step's
committed tokens, then ``end()``, as transformers' assisted decoding feeds it. Decoding is
``api.generate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fluid_npu import device as devices
from fluid_npu.data.template_export import TrainedTemplate
from fluid_npu.errors import ConfigError
from fluid_npu.model.adapters import FluidModelMeta, LoadedFluid
from fluid_npu.model.khead import SAVED_SUBDIR, KHead, KHeadConfig, save_khead, saved_khead
from fluid_npu.model.loading import fingerprint
from fluid_npu.model.mask_token import MaskToken
from fluid_npu.model.merge import (
    DEFAULT_SHARD_SIZE,
    check_output,
    merged_meta,
    save_fluid,
    shard_size,
)
from fluid_npu.sampling.api import GENERATION_KEYS, GenerateOutput, generate
from fluid_npu.sampling.drafting import DraftBudget
from fluid_npu.sampling.hf_generate import (
    LENGTHS,
    check_generation_config,
    explicit_nones,
    feed_streamer,
    new_tokens,
    prompt_width,
    transformers_keywords,
)
from fluid_npu.sampling.inputs import as_count, parse_dtype
from fluid_npu.sampling.stats import GenerateStats


class FluidForCausalLM(torch.nn.Module):
    """A loaded FLUID model with a transformers-style ``generate`` (greedy, lossless, elastic).

    An ``nn.Module`` holding the decoder (``model``) and the K-head (``khead``): ``to`` (a device
    or a dtype), ``eval`` / ``train``, ``parameters``, ``state_dict`` and ``requires_grad_`` reach
    both, and calling it runs the decoder's own forward (``fluid(**tokenizer(text,
    return_tensors="pt")).logits``: the AR logits, as ``AutoModelForCausalLM`` gives them).
    transformers' ``pipeline("text-generation", model=fluid, tokenizer=fluid.tokenizer)`` takes
    it."""

    input_modalities = "text"  # (what transformers' pipelines read of a model)
    output_modalities = ("text",)

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        mask_id: int,
        khead: KHead | None = None,
    ) -> None:
        super().__init__()
        self.train(model.training)  # (the decoder's mode: eval, as from_pretrained leaves it)
        self.model = model
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.khead = khead
        self.khead_config: KHeadConfig | None = None  # (what save_pretrained records the head by)
        # (from_pretrained: the MASK token, base and adapter fingerprints it loaded, the source's
        # fluid_model.json and base path — what save_pretrained records; no second model ref)
        self.source: tuple[MaskToken, str, str | None, FluidModelMeta | None, str | None] | None
        self.source = None
        # (from_pretrained: the checkpoint's trained_chat_template.jinja, which a save carries)
        self.trained_template: TrainedTemplate | None = None
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
        chat_template: str | Path | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        torch_dtype: str | torch.dtype | None = None,
        device_map: str | torch.device | None = None,
    ) -> FluidForCausalLM:
        """Base model (+ Stage I adapter, merged) (+ K-head); mismatches are CheckpointErrors.

        ``dtype``: ``auto`` / None (the checkpoint's), ``float32``, ``bfloat16``, ``float16`` or a
        ``torch.dtype``: the dtype the model computes in (``torch_dtype``, transformers' older
        name, is taken too). ``device``: where it runs (``device_map`` as one device, or
        ``"auto"``: the accelerator this host has, else the CPU; FLUID keeps a model on one
        device, so a per-module map is refused). ``chat_template``: a Jinja chat template or a file
        holding one (``prompts.read_chat_template``), replacing the tokenizer's own.
        ``trust_remote_code`` / ``allow_pickle``: as in transformers, for checkpoints that need
        them (the loader's errors say when).
        """
        from fluid_npu.model.adapters import load_fluid
        from fluid_npu.model.khead import attach_khead
        from fluid_npu.sampling.prompts import read_chat_template

        if torch_dtype is not None:
            if dtype is not None:
                raise ConfigError("give dtype or torch_dtype (its older name), not both")
            dtype = torch_dtype
        device = _one_device(device, device_map)
        devices.check_device(device)
        dtype = parse_dtype(dtype, "dtype")
        template = None
        if chat_template is not None:  # (checked before the weights load)
            template = read_chat_template(str(chat_template), "chat_template")
        loaded = load_fluid(
            model_dir,
            adapter,
            dtype=dtype,
            merge=True,
            mask_token=mask_token,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )
        head = head_config = None
        if khead is None:  # (a directory save_pretrained wrote: its K-head in a subfolder)
            khead = saved_khead(model_dir, adapter)
        if khead is not None:  # (the strict check: the very backbone the head was trained on)
            head, head_config = attach_khead(loaded, khead)
        model = loaded.model
        if device is not None:
            model = model.to(device)
        if template is not None:
            loaded.tokenizer.chat_template = template
        fluid = cls(model, loaded.tokenizer, loaded.mask.id, head)
        fluid.khead_config = head_config
        fluid.trained_template = TrainedTemplate.read(adapter or model_dir, warn=template is None)
        meta = FluidModelMeta.load(adapter or model_dir)  # (the base: the one merged into)
        base = str(model_dir) if adapter is not None or meta is None else meta.base_model
        fingerprints = (loaded.base_fingerprint, loaded.adapter_fingerprint)
        fluid.source = (loaded.mask, *fingerprints, meta, base)
        return fluid

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        max_shard_size: str | int = DEFAULT_SHARD_SIZE,
        safe_serialization: bool = True,
        push_to_hub: bool = False,
    ) -> Path:
        """Write the model whole into ``save_directory`` (new or empty): the decoder in the dtype
        it has now (safetensors shards of at most ``max_shard_size``), the tokenizer (MASK token
        and chat template included; the checkpoint's ``trained_chat_template.jinja`` beside it),
        ``fluid_model.json`` and the K-head in ``khead/`` (a
        subfolder: runtimes that load every ``*.safetensors`` of a model directory, vLLM's among
        them, never read it), so that ``from_pretrained(save_directory)`` gives the same model
        (an adapter arrives merged; a K-head trained on base + adapter still loads) and
        ``AutoModelForCausalLM`` loads the decoder. Written to a staging directory and renamed:
        a failed save leaves nothing."""
        if push_to_hub or not safe_serialization:
            raise ConfigError(
                "save_pretrained writes safetensors to a local directory only; upload it with "
                "huggingface_hub's upload_folder"
            )
        if self.khead is not None and self.khead_config is None:
            raise ConfigError(
                "this model's K-head came without its KHeadConfig (the base it was trained on): "
                "load it with FluidForCausalLM.from_pretrained(..., khead=DIR) to save it whole, "
                "or set .khead_config"
            )
        out = check_output(save_directory, "save_directory")
        size = shard_size(max_shard_size, "max_shard_size")
        if self.source is not None:
            mask, fp, adapter_fp, meta, base = self.source
        else:  # (built from a model in memory: it is its own source)
            token = self.tokenizer.convert_ids_to_tokens(self.mask_id)
            mask, fp = MaskToken(token, self.mask_id, "tokenizer"), fingerprint(self.model)
            adapter_fp = meta = base = None
            config = self.khead_config
            if config is not None and (config.base_fingerprint, config.adapter_fingerprint) != (
                fp,
                None,
            ):  # (its record would not match the saved weights: from_pretrained would refuse it)
                raise ConfigError(
                    "this K-head was trained on another network than the model in memory (its "
                    "base or adapter); save through FluidForCausalLM.from_pretrained(base, "
                    "adapter, khead=DIR), which records what the weights were merged from"
                )
        head, head_config, trained = self.khead, self.khead_config, self.trained_template

        def extra(staging: Path) -> None:
            if head is not None:
                save_khead(head, head_config, staging / SAVED_SUBDIR)
            if trained is not None:  # (the format a named template trained: kept, as merge does)
                trained.save(staging)

        loaded = LoadedFluid(self.model, self.tokenizer, mask, fp, adapter_fp)
        return save_fluid(
            self.model, self.tokenizer, out, merged_meta(loaded, meta, base=base),
            max_shard_size=size, extra=extra,
        )  # fmt: skip

    def engine_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with this model's draft budgets added to its ``engine_kwargs``."""
        engine = {"budgets": self.draft_budgets, **(kwargs.get("engine_kwargs") or {})}
        return {**kwargs, "engine_kwargs": engine}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self) -> Any:
        """The model's ``PretrainedConfig``."""
        return self.model.config

    @property
    def generation_config(self) -> Any:
        """The checkpoint's ``GenerationConfig``: what ``generate`` follows where a call is
        silent (assignable, as a transformers model's)."""
        return self.model.generation_config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.model.generation_config = value

    @classmethod
    def can_generate(cls) -> bool:
        """True: transformers' ``pipeline("text-generation", model=fluid)`` asks."""
        return True

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The decoder's parameter count (transformers' arguments) plus the K-head's."""
        head = self.khead.parameters() if self.khead is not None else ()
        extra = sum(p.numel() for p in head if p.requires_grad or not only_trainable)
        return self.model.num_parameters(only_trainable, exclude_embeddings) + extra

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.model.get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The decoder's forward, as transformers calls it (its ``CausalLMOutputWithPast``)."""
        return self.model(*args, **kwargs)

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        mask_or_config: Any = None,
        /,
        max_new_tokens: int | None = None,
        policy: str | None = None,
        loop: str = "fused",
        generation_config: Any = None,
        *,
        attention_mask: torch.Tensor | None = None,
        streamer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Prompt + new tokens ``[B, L]`` like transformers; statistics in ``last_stats``.

        Called as transformers' ``generate``: ``inputs`` (or ``input_ids=``) and
        ``attention_mask`` (``**tokenizer(texts, return_tensors="pt", padding=True)`` works), a
        ``GenerationConfig`` as the second argument or ``generation_config=``. The sampling
        keywords are transformers' (``do_sample``, ``temperature``, ``top_k`` — 50 when sampling
        and not given, transformers' default; 0 turns it off —, ``top_p``, ``min_p``,
        ``repetition_penalty``, ``min_new_tokens``, ``bad_words_ids``, ``stop_strings``) plus
        ``seed`` (None: drawn from torch's global generator, so ``torch.manual_seed`` reproduces
        a call as in transformers); a sampling keyword or ``pad_token_id`` given as None is
        transformers' "off" (``do_sample`` False, no temperature / top-k / top-p / min-p /
        repetition penalty, padding with the first EOS id), as its ``generate`` reads an explicit
        None, and another keyword given as None is left out. What a call leaves out
        comes from the ``generation_config`` it passes, and what that leaves unset from the
        checkpoint's own (``model.generation_config``), as transformers merges them: an instruct
        checkpoint that sets ``do_sample`` samples; pass ``do_sample=False`` for the lossless
        greedy output. That covers ``max_new_tokens`` / ``max_length`` / ``min_new_tokens`` /
        ``min_length`` / ``eos_token_id`` / ``pad_token_id`` too. A setting FLUID decoding does
        not do (beams, ``no_repeat_ngram_size``, ``num_return_sequences`` > 1, ...) is refused
        by name, never dropped; at its "off" value it is accepted; in the checkpoint's
        own config it is named in a warning and not applied. ``max_length`` / ``min_length``
        count the prompt, as in transformers (``max_new_tokens`` / ``min_new_tokens`` win when
        both are set); ``max_length`` must leave room for a token; with no length anywhere,
        transformers' 20 new tokens (at most what the context has room for); a length that
        comes from a config, not from the call, is capped at the context's room too.
        ``eos_token_id=None`` given explicitly turns EOS off, as in transformers. ``streamer``: a
        transformers streamer for a one-prompt call: ``put`` the prompt ``[1, L]``, then each
        step's committed tokens ``[1, n]`` (several per step), then ``end()`` (also when decoding
        fails or is refused); for a batch pass ``stream=callable(row, tokens)``.
        """
        try:
            return self._generate(
                inputs, mask_or_config, max_new_tokens, policy, loop, generation_config,
                attention_mask, streamer, kwargs,
            )  # fmt: skip
        finally:  # (a TextIteratorStreamer's reader stops waiting, whatever happened, refusals too)
            if callable(getattr(streamer, "end", None)):
                streamer.end()

    def _generate(
        self,
        inputs: Any,
        mask_or_config: Any,
        max_new_tokens: int | None,
        policy: str | None,
        loop: str,
        generation_config: Any,
        attention_mask: torch.Tensor | None,
        streamer: Any,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """``generate``'s work (``generate`` ends the streamer, whatever happens here)."""
        for name in ("inputs", "input_ids"):  # (by name, as transformers takes them)
            if name in kwargs:
                if inputs is not None:
                    raise ConfigError("give the prompt once: inputs or input_ids, not both")
                inputs = kwargs.pop(name)
        if kwargs.get("inputs_embeds") is not None:
            raise ConfigError(
                "inputs_embeds is not supported: FLUID decodes from token ids (its drafts are "
                "MASK tokens in the same sequence); pass input_ids"
            )
        kwargs.pop("inputs_embeds", None)
        if inputs is None:
            raise ConfigError("generate needs the prompt: inputs (or input_ids), token ids [B, L]")
        if hasattr(mask_or_config, "to_diff_dict"):  # transformers' order: (inputs, config)
            if generation_config is not None:
                raise ConfigError("two generation configs given (positionally and by name)")
            generation_config = mask_or_config
        elif mask_or_config is not None:  # (inputs, attention_mask), this class's first order
            if attention_mask is not None:
                raise ConfigError("two attention masks given (positionally and by name)")
            attention_mask = mask_or_config
        if generation_config is not None and not hasattr(generation_config, "to_diff_dict"):
            raise ConfigError(
                f"generation_config takes a transformers GenerationConfig, got "
                f"{type(generation_config).__name__}; pass GenerationConfig(**settings) or the "
                "settings themselves as keywords"
            )
        given = set(kwargs)  # settings the call gives: the configs' say nothing about them
        checkpoint = getattr(self.model, "generation_config", None)
        kwargs = explicit_nones(self.model, kwargs)
        kwargs = transformers_keywords(
            {k: v for k, v in kwargs.items() if v is not None or k == "eos_token_id"}
        )
        if "eos_token_id" in kwargs and kwargs["eos_token_id"] is None:
            kwargs["eos_token_id"] = []  # transformers: an explicit None stops at no token
        # what the call leaves out comes from the config it passes, then from the checkpoint's
        # (transformers fills a passed config's unset fields from model.generation_config)
        lengths: dict[str, Any] = {n: kwargs.pop(n, None) for n in LENGTHS}
        if max_new_tokens is not None:
            lengths["max_new_tokens"] = max_new_tokens
        configured: set[str] = set()  # the lengths a config gave (capped at the context's room)
        for config, own in ((generation_config, False), (checkpoint, True)):
            if config is None:
                continue
            check_generation_config(config, given, checkpoint=own)
            given |= {k for k, v in config.to_diff_dict().items() if v is not None}
            for name in (*GENERATION_KEYS, "eos_token_id", "pad_token_id"):
                value = getattr(config, name, None)
                if name not in kwargs and name not in LENGTHS and value is not None:
                    kwargs[name] = value
            for name in LENGTHS:
                if lengths[name] is None and getattr(config, name, None) is not None:
                    lengths[name] = getattr(config, name)
                    configured.add(name)
        width = prompt_width(inputs)
        context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        max_new_tokens = new_tokens(lengths, width, configured, context)
        if lengths["min_new_tokens"] is None and lengths["min_length"]:
            # min_length counts the prompt, as in transformers (min_new_tokens wins)
            least = as_count("min_length", lengths["min_length"]) - width
            if least > 0:
                kwargs["min_new_tokens"] = least
        elif lengths["min_new_tokens"] is not None:
            kwargs["min_new_tokens"] = lengths["min_new_tokens"]
        if policy is None:
            policy = "khead" if self.khead is not None else "entropy"
        if streamer is not None:
            if kwargs.get("stream") is not None:
                raise ConfigError("give a streamer or stream=callable(row, tokens), not both")
            kwargs["stream"] = feed_streamer(streamer, inputs)
        out = generate(
            self.model,
            self.mask_id,
            inputs,
            attention_mask,
            policy=policy,
            loop=loop,
            max_new_tokens=max_new_tokens,
            khead=self.khead,
            tokenizer=kwargs.pop("tokenizer", self.tokenizer),
            **self.engine_kwargs(kwargs),
        )
        self.last_output, self.last_stats = out, out.stats
        return out.sequences


def _one_device(
    device: str | torch.device | None, device_map: str | torch.device | None
) -> str | torch.device | None:
    """The one device ``from_pretrained`` puts the model on, from ``device`` or ``device_map``."""
    if device_map is None:
        return device
    if device is not None:
        raise ConfigError("give device or device_map, not both")
    if isinstance(device_map, dict):
        raise ConfigError(
            "device_map as a per-module map is not supported: FLUID decodes with the whole model "
            "on one device; pass device='cuda:0' (or device_map='auto')"
        )
    if str(device_map) == "auto":
        return devices.current().device
    return device_map
