"""vLLM's ``LLM`` surface beyond what the FLUID engine does, so a ``vllm.LLM`` script gets an
answer for every argument it passes rather than a bare ``TypeError``.

* ``check_vllm_keywords``: vLLM constructor keywords. At the value that changes nothing here (the
  default, or ``tokenizer=`` the model's own directory) one is accepted; a scheduler / memory /
  logging setting of vLLM's own engine, which changes no output, is accepted and named in one
  warning; any other value is a ``ConfigError`` naming the keyword and what to do instead. A
  name vLLM does not take stays Python's ``TypeError``.
* ``VLLMOtherTasks``: ``beam_search``, the pooling methods (``encode`` / ``embed`` /
  ``classify`` / ``score`` / ``reward``) and sleep mode, refused with what to use instead.
* ``TokensPrompt`` / ``TextPrompt``: vLLM's prompt dicts (``vllm.inputs``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypedDict

from fluid_npu.errors import ConfigError


class TextPrompt(TypedDict):
    """vLLM's ``TextPrompt``: ``{"prompt": text}``."""

    prompt: str


class TokensPrompt(TypedDict):
    """vLLM's ``TokensPrompt``: ``{"prompt_token_ids": [...]}``."""

    prompt_token_ids: list[int]


def _is(*values: Any) -> Callable[[Any], bool]:
    return lambda v: any(v is x or (type(v) is type(x) and v == x) for x in values)


_NOTHING = "nothing is downloaded: the model is a local directory"


def _no_compilation(value: Any) -> bool:
    """vLLM's ``compilation_config`` at "none": None, 0, or a dict of ``level`` / ``mode`` 0."""
    if isinstance(value, Mapping):
        return set(value) <= {"level", "mode"} and all(v == 0 for v in value.values())
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 0)


# keyword -> (the values that change nothing here, what to do instead of another value)
_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task": (_is("auto", "generate"), "this LLM generates text"),
    "runner": (_is("auto", "generate"), "this LLM generates text"),
    "tokenizer_mode": (_is("auto", "hf"), "the model's own (fast) tokenizer is used"),
    "skip_tokenizer_init": (_is(False), "the tokenizer (with its MASK token) is always loaded"),
    "quantization": (
        _is(None),
        "weights load in the dtype= you give (auto: the checkpoint's); there are no quantized "
        "kernels here",
    ),
    "revision": (_is(None), _NOTHING),
    "tokenizer_revision": (_is(None), _NOTHING),
    "code_revision": (_is(None), _NOTHING),
    "download_dir": (_is(None), _NOTHING),
    "hf_token": (_is(None, False), _NOTHING),
    "load_format": (_is("auto", "safetensors"), "weights load as transformers loads them"),
    "hf_overrides": (lambda v: not v, "edit the model's config.json instead"),
    "cpu_offload_gb": (_is(0, 0.0), "the weights stay on one device"),
    "pipeline_parallel_size": (_is(1), "one device holds the model"),
    "data_parallel_size": (_is(1), "one device holds the model; fluid serve --data-parallel-size "
                           "runs replicas"),
    "distributed_executor_backend": (_is(None, "mp", "uni"), "one process decodes"),
    "kv_cache_dtype": (_is("auto"), "the KV cache holds the model's dtype"),
    "enable_lora": (_is(False, None), "the Stage I adapter merges at load: LLM(model, "
                    "adapter=DIR)"),
    "speculative_config": (lambda v: not v, "FLUID drafts with the model itself (policy=, "
                           "khead=): there is no draft model"),
    "compilation_config": (lambda v: _no_compilation(v), "enforce_eager=False compiles the "
                           "decode step"),
    "enable_sleep_mode": (_is(False), "the model stays loaded"),
    "mm_processor_kwargs": (lambda v: not v, "this LLM reads text"),
    "allowed_local_media_path": (lambda v: not v, "this LLM reads text"),
    "limit_mm_per_prompt": (lambda v: not v, "this LLM reads text"),
    "override_pooler_config": (_is(None), "this LLM generates text"),
    "pooler_config": (_is(None), "this LLM generates text"),
    "worker_cls": (_is("auto", None), "one process decodes"),
    "worker_extension_cls": (_is("", None), "one process decodes"),
    "guided_decoding_backend": (_is("auto", "xgrammar", None), "structured outputs use xgrammar"),
    "model_impl": (_is("auto", "transformers"), "the model loads with transformers (its "
                   "decoders run through the engine's own forward)"),
    "config_format": (_is("auto", "hf"), "the model's config.json is read"),
    "logits_processors": (lambda v: not v, "a custom logits processor cannot see the drafts a "
                          "step verifies; use SamplingParams' logit_bias, allowed_token_ids, "
                          "bad_words or structured_outputs"),
}  # fmt: skip
# keywords the LLM reads itself (check_vllm_keywords returns them)
_READ = {"tokenizer", "generation_config", "override_generation_config", "served_model_name"}
# vLLM's own scheduler / memory / logging settings: they change no output, and this engine has no
# counterpart (its slots, prefill chunks and cache are its own), so they are accepted and named
_ENGINE_ONLY = {
    "swap_space", "max_num_batched_tokens", "enable_chunked_prefill", "block_size",
    "max_seq_len_to_capture", "disable_custom_all_reduce", "disable_async_output_proc",
    "disable_log_stats", "preemption_mode", "num_scheduler_steps", "max_loras", "max_lora_rank",
    "max_cpu_loras", "enable_prefix_caching_hash_algo", "async_scheduling", "cuda_graph_sizes",
    "long_prefill_token_threshold", "max_num_partial_prefills", "seed_everything",
}  # fmt: skip


def check_vllm_keywords(
    given: Mapping[str, Any], model: str | Path, adapter: str | Path | None = None
) -> dict[str, Any]:
    """Check ``LLM(**given)``'s vLLM keywords (module docstring); returns what the LLM reads
    of them: ``generation_config`` (``"auto"``: the model's, ``"vllm"``: vLLM's defaults, or a
    folder holding a ``generation_config.json``), ``override_generation_config`` (checked, {}
    when not given) and ``served_model_name`` (the metrics' model name; None: the model's path)."""
    from fluid_npu.sampling.generation_defaults import check_override

    unknown = sorted(set(given) - set(_NEUTRAL) - _ENGINE_ONLY - _READ)
    if unknown:
        raise TypeError(f"LLM.__init__() got an unexpected keyword argument {unknown[0]!r}")
    tokenizer = given.get("tokenizer")
    own = {Path(d).resolve() for d in (model, adapter) if d is not None}  # (an adapter's own)
    if tokenizer is not None and Path(tokenizer).resolve() not in own:
        raise ConfigError(
            f"tokenizer={str(tokenizer)!r}: the tokenizer is the model's own (it holds the MASK "
            "token Stage I trained with); leave tokenizer out"
        )
    for name, value in given.items():
        if name in _NEUTRAL and not _NEUTRAL[name][0](value):
            raise ConfigError(f"LLM({name}={value!r}) is not supported: {_NEUTRAL[name][1]}")
    ignored = sorted(set(given) & _ENGINE_ONLY)
    if ignored:
        warnings.warn(
            f"LLM({', '.join(ignored)}): vLLM's own scheduler / memory / logging settings, with "
            "no counterpart in this engine (its slots, prefill chunks and KV cache are its own); "
            "they change nothing here",
            stacklevel=3,
        )
    names = given.get("served_model_name")
    if isinstance(names, list | tuple):  # (vLLM's: several names, the first one reported)
        names = names[0] if names else None
    if names is not None and (not isinstance(names, str) or not names.strip()):
        raise ConfigError(f"served_model_name takes a non-empty name, got {names!r}")
    override = given.get("override_generation_config")
    return {
        "generation_config": given.get("generation_config", "auto"),
        "override_generation_config": check_override(
            override or {}, "LLM(override_generation_config=...)"
        ),
        "served_model_name": names,
    }


def check_sizes(max_num_seqs: Any, max_model_len: Any, model: Any = None) -> None:
    """``LLM(max_num_seqs=, max_model_len=)``: None or a whole number of at least 1 (and, once
    ``model`` is loaded, a length within its context), each error naming the keyword."""
    for name, value in (("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len)):
        whole = isinstance(value, int) and not isinstance(value, bool)
        if value is not None and not (whole and value >= 1):
            raise ConfigError(f"LLM({name}={value!r}): give a whole number of at least 1, or None")
    if model is None or max_model_len is None:
        return
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and max_model_len > limit:
        raise ConfigError(
            f"LLM(max_model_len={max_model_len}) is over the model's context ({limit} "
            f"positions); use at most {limit}, or leave it out"
        )


def by_prompt(message: str, ids: Sequence[str]) -> str:
    """An engine error about request ``"R-C"`` (copy C of the prompt whose request id is
    ``ids[n]``) as the LLM's caller knows it: prompt n; the engine's ``Scheduler(...)`` setting
    as the ``LLM(...)`` keyword."""
    index = {rid: n for n, rid in enumerate(ids)}

    def name(match: re.Match) -> str:
        n = index.get(match.group(1))
        return match.group(0) if n is None else f"prompt {n}"

    message = re.sub(r"request '([^'-]+)-\d+'", name, message)
    return message.replace("Scheduler(scheduling_policy='priority')",
                           "LLM(scheduling_policy=\"priority\")")  # fmt: skip


def check_logprobs_cap(params: Any, cap: int | None, n: int) -> None:
    """vLLM's ``max_logprobs``: a request asking for more alternatives (or -1, all) is refused."""
    if cap is None or cap < 0:
        return
    for name in ("logprobs", "prompt_logprobs"):
        asked = getattr(params, name)
        if asked is not None and (asked < 0 or asked > cap):
            raise ConfigError(
                f"prompt {n}: {name}={asked} is more than LLM(max_logprobs={cap}) allows; ask "
                f"for at most {cap}, or raise max_logprobs (-1: no cap)"
            )


def engine_switches(
    enforce_eager: bool | None, engine_kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``engine_kwargs`` with vLLM's ``enforce_eager`` as the engine's ``compile`` switch (the
    two contradicting each other: a ``ConfigError``)."""
    switches = dict(engine_kwargs or {})
    if enforce_eager is not None and switches.setdefault("compile", not enforce_eager) == (
        enforce_eager
    ):
        raise ConfigError(
            f"enforce_eager={enforce_eager} and engine_kwargs compile={switches['compile']} "
            "contradict each other; give one"
        )
    return switches


def no_lora(lora_request: Any) -> None:
    """``generate`` / ``chat``'s ``lora_request``: None only."""
    if lora_request is not None:
        raise ConfigError(
            "lora_request is not supported: this LLM serves one model, its Stage I adapter "
            "merged at load (LLM(model, adapter=...)); leave lora_request out"
        )


def check_text_chat(content_format: str, mm_processor_kwargs: Any) -> None:
    """``chat``'s vLLM options for other content: text parts are joined into one text."""
    if content_format not in ("auto", "string") or mm_processor_kwargs:
        raise ConfigError(
            "chat() reads text: chat_template_content_format 'auto' or 'string' (text parts "
            "joined into one text), and no mm_processor_kwargs"
        )


def default_params(config: Any, override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``SamplingParams`` a ``GenerationConfig`` (or None) sets, ``override`` (vLLM's
    ``override_generation_config``) over it, as vLLM reads them: the server's decoding defaults
    (``SamplingDefaults``), and ``max_new_tokens`` as ``max_tokens``."""
    from dataclasses import asdict

    from fluid_npu.sampling.generation_defaults import SamplingDefaults, setting

    given = asdict(SamplingDefaults.of(config, override))
    if setting(config, override, "max_new_tokens") is not None:
        given["max_tokens"] = int(setting(config, override, "max_new_tokens"))
    return given


class _Bar:
    """vLLM's progress bar: a prompt counts once all its ``n`` completions have ended."""

    def __init__(self, bar: Any, copies: list[int]) -> None:
        self.bar, self.left = bar, list(copies)
        self.owner = [k for k, n in enumerate(copies) for _ in range(n)]

    def tick(self, index: int) -> None:
        self.left[self.owner[index]] -= 1
        if not self.left[self.owner[index]]:
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def progress_bar(use_tqdm: bool | Callable[..., Any], copies: list[int]) -> _Bar | None:
    """``use_tqdm`` (True, False, or vLLM's tqdm-like class) over prompts of ``copies``
    completions each."""
    if not use_tqdm:
        return None
    from tqdm.auto import tqdm

    make = use_tqdm if callable(use_tqdm) else tqdm
    return _Bar(make(total=len(copies), desc="Processed prompts", unit="prompt"), copies)


def _refusal(what: str, instead: str) -> Callable[..., NoReturn]:
    """A method refusing ``what`` (a vLLM task this LLM does not do), saying what to use."""

    def method(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
        raise ConfigError(
            f"{what} is not supported by this LLM (a FLUID model generating text): {instead}"
        )

    method.__name__ = what
    return method


_POOLING = "for hidden states or logits load FluidForCausalLM and call it (fluid(ids).logits)"


class VLLMOtherTasks:
    """vLLM ``LLM`` methods for other tasks, each refused with what to use instead."""

    beam_search = _refusal(
        "beam_search", "decoding is greedy (lossless) or exact sampling; use generate() with "
        "SamplingParams(n=..., temperature=...)",
    )  # fmt: skip
    encode = _refusal("encode", _POOLING)
    embed = _refusal("embed", _POOLING)
    classify = _refusal("classify", _POOLING)
    reward = _refusal("reward", _POOLING)
    score = _refusal(
        "score", "for a text's log-probabilities use generate() with "
        "SamplingParams(prompt_logprobs=0, max_tokens=1)",
    )  # fmt: skip
    sleep = _refusal("sleep", "delete the LLM to free its memory")
    wake_up = _refusal("wake_up", "the model never sleeps here")
