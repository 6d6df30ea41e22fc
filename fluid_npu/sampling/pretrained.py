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

import functools
import inspect
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fluid_npu import device as devices
from fluid_npu.errors import ConfigError
from fluid_npu.model.khead import KHead
from fluid_npu.sampling.api import GENERATION_KEYS, GenerateOutput, generate
from fluid_npu.sampling.drafting import DraftBudget
from fluid_npu.sampling.inputs import as_count, parse_dtype
from fluid_npu.sampling.stats import GenerateStats

# GenerationConfig fields the decoding follows (the rest of GENERATION_KEYS' kin), and fields
# that only describe the checkpoint or transformers' own bookkeeping
_LENGTHS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length")
_FOLLOWED = {*_LENGTHS, "eos_token_id", "pad_token_id"}
DEFAULT_NEW_TOKENS = 20  # transformers' when nothing sets a length (its max_length 20, new tokens)
_INERT = {"bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
          "use_cache", "cache_implementation", "return_legacy_cache"}  # fmt: skip
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
    return name in _INERT or not value or (name in _OFF_AT_ONE and value == 1)


def _check_generation_config(config: Any, given: set[str], *, checkpoint: bool) -> None:
    """A ``GenerationConfig`` setting the engine does not do (held away from transformers'
    defaults, and not given by the call itself) is refused by name — or, in the checkpoint's own
    config (which the call did not choose), named in a warning and not applied."""
    diff = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(vars(config))
    unknown = sorted(
        k for k, v in diff.items()
        if k not in _FOLLOWED and k not in GENERATION_KEYS and k not in given
        and not _is_off(k, v)
    )  # fmt: skip
    if not unknown:
        return
    follows = ", ".join(sorted({*GENERATION_KEYS, *_FOLLOWED}))
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


def _transformers_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the transformers settings ``api.generate`` does not take that are at
    their "off" value; one such setting asking for something is a ``ConfigError`` naming it (a
    name neither knows stays, for ``api.generate``'s own TypeError)."""
    own, known = _known_keywords()
    kept = {}
    for name, value in kwargs.items():
        if name in own or name in _FOLLOWED or name not in known:
            kept[name] = value
        elif not _is_off(name, value):
            instead = _INSTEAD.get(name, "leave it out (FLUID decodes greedily or samples exactly)")
            raise ConfigError(
                f"{name}={value!r} is a transformers generation setting FLUID decoding does not "
                f"do; {instead}"
            )
    return kept


class FluidForCausalLM(torch.nn.Module):
    """A loaded FLUID model with a transformers-style ``generate`` (greedy, lossless, elastic).

    An ``nn.Module`` holding the decoder (``model``) and the K-head (``khead``): ``to`` (a device
    or a dtype), ``eval`` / ``train``, ``parameters``, ``state_dict`` and ``requires_grad_`` reach
    both, and calling it runs the decoder's own forward (``fluid(**tokenizer(text,
    return_tensors="pt")).logits``: the AR logits, as ``AutoModelForCausalLM`` gives them)."""

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
        head = None
        if khead is not None:  # (the strict check: the very backbone the head was trained on)
            head, _ = attach_khead(loaded, khead)
        model = loaded.model
        if device is not None:
            model = model.to(device)
        if template is not None:
            loaded.tokenizer.chat_template = template
        return cls(model, loaded.tokenizer, loaded.mask.id, head)

    def _max_new_tokens(self, lengths: dict[str, Any], width: int) -> int:
        """transformers' length rule: ``max_new_tokens``, else ``max_length`` less the prompt,
        else its default of 20 new tokens (at most the context's room)."""
        if lengths["max_new_tokens"] is not None:
            return lengths["max_new_tokens"]
        context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if lengths["max_length"] is not None:
            max_length = as_count("max_length", lengths["max_length"])
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
        room = DEFAULT_NEW_TOKENS if context is None else min(DEFAULT_NEW_TOKENS, context - width)
        return room if room > 0 else DEFAULT_NEW_TOKENS  # (none left: the prompt's error says so)

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
        silent."""
        return self.model.generation_config

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
        a call as in transformers); a keyword given as None is left out. What a call leaves out
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
        transformers' 20 new tokens (at most what the context has room for).
        ``eos_token_id=None`` given explicitly turns EOS off, as in transformers. ``streamer``: a
        transformers streamer for a one-prompt call: ``put`` the prompt ``[1, L]``, then each
        step's committed tokens ``[1, n]`` (several per step), then ``end()`` (also when decoding
        fails); for a batch pass ``stream=callable(row, tokens)``.
        """
        for name in ("inputs", "input_ids"):  # (by name, as transformers takes them)
            if name in kwargs:
                if inputs is not None:
                    raise ConfigError("give the prompt once: inputs or input_ids, not both")
                inputs = kwargs.pop(name)
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
        kwargs = _transformers_keywords(
            {k: v for k, v in kwargs.items() if v is not None or k == "eos_token_id"}
        )
        if "eos_token_id" in kwargs and kwargs["eos_token_id"] is None:
            kwargs["eos_token_id"] = []  # transformers: an explicit None stops at no token
        # what the call leaves out comes from the config it passes, then from the checkpoint's
        # (transformers fills a passed config's unset fields from model.generation_config)
        lengths: dict[str, Any] = {n: kwargs.pop(n, None) for n in _LENGTHS}
        if max_new_tokens is not None:
            lengths["max_new_tokens"] = max_new_tokens
        for config, own in ((generation_config, False), (checkpoint, True)):
            if config is None:
                continue
            _check_generation_config(config, given, checkpoint=own)
            given |= {k for k, v in config.to_diff_dict().items() if v is not None}
            for name in (*GENERATION_KEYS, "eos_token_id", "pad_token_id"):
                value = getattr(config, name, None)
                if name not in kwargs and name not in _LENGTHS and value is not None:
                    kwargs[name] = value
            for name in _LENGTHS:
                if lengths[name] is None:
                    lengths[name] = getattr(config, name, None)
        width = _prompt_width(inputs)
        max_new_tokens = self._max_new_tokens(lengths, width)
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
            kwargs["stream"] = _feed(streamer, inputs)
        try:
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
        finally:  # (a TextIteratorStreamer's reader stops waiting, whatever happened)
            if streamer is not None:
                streamer.end()
        self.last_output, self.last_stats = out, out.stats
        return out.sequences


def _feed(streamer: Any, inputs: Any) -> Any:
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


def _prompt_width(inputs: Any) -> int:
    """The prompt's width as transformers counts ``max_length`` / ``min_length`` from it: the
    padded batch's (a list of rows: its longest; a flat list of ids: one row)."""
    if hasattr(inputs, "shape") and len(inputs.shape):
        return int(inputs.shape[-1])
    rows = list(inputs)
    if rows and not hasattr(rows[0], "__len__"):
        return len(rows)  # (one prompt given flat)
    return max((len(r) for r in rows), default=0)


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
