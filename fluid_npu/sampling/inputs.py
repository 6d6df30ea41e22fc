"""The sampler's inputs, checked: prompts, MASK id, EOS / pad ids, context limits, compute dtype,
attention back end.

Shared by the public API (``api.py``), the decode engine (``scheduler.py``) and the CLI; every
problem is one ``FluidError`` naming it and the fix.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fluid_npu.config import ATTN_BACKENDS
from fluid_npu.errors import ConfigError, DataError
from fluid_npu.model.mask_token import resolve_mask_token


class PromptError(DataError):
    """A prompt is empty or does not fit the model's context."""


DTYPES = {
    "auto": None,  # the checkpoint's own dtype
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}  # fmt: skip (vLLM's names: float, half)


def parse_dtype(name: str | torch.dtype | None, flag: str = "--dtype") -> torch.dtype | None:
    """``auto`` (None: the checkpoint's dtype), ``float32``, ``bfloat16`` or ``float16``
    (``flag``: what the error calls the setting)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise ConfigError(
            f"{flag} {name!r} is not a compute dtype; choose auto, float32, bfloat16 or float16"
        )
    return DTYPES[key]


def as_count(name: str, value: Any) -> int:
    """``value`` as a whole number of tokens (an integral float, as transformers takes, too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a whole number of tokens, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not float(value).is_integer():
        raise ConfigError(f"{name} must be a whole number of tokens, got {value!r}")
    return int(value)


def mask_id_of(model: PreTrainedModel, source: PreTrainedTokenizerBase | int | None) -> int:
    # (a FluidForCausalLM has transformers' model methods too; its draft budgets tell it apart)
    if not hasattr(model, "get_input_embeddings") or hasattr(model, "draft_budgets"):
        raise ConfigError(
            f"generate takes the transformers model, got {type(model).__name__}; for a "
            "FluidForCausalLM call its own .generate(...) (or pass its .model)"
        )
    if _token_id(source):  # (a Python / numpy integer, a 0-d integer tensor)
        mask_id = int(source)
    elif source is None:
        raise ConfigError("generate needs the tokenizer (or the MASK token id) of the FLUID model")
    else:
        mask_id = resolve_mask_token(source, allow_new=False).id
    vocab = model.get_input_embeddings().weight.shape[0]
    if not 0 <= mask_id < vocab:
        raise ConfigError(f"MASK token id {mask_id} is outside the model's vocabulary ({vocab})")
    return int(mask_id)


def as_batch(
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | Sequence[Sequence[int]] | None,
    pad: int,
    eos_ids: Sequence[int] = (),
    infer_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``input_ids`` as a 2-D tensor and its attention mask, as transformers reads them.

    Token-id lists of different lengths are the prompts themselves (left-padded here); a mask
    given with lists or a tensor (a tensor, a list or an array, as a tokenizer returns it) is
    used and must have the ids' shape. Without a mask (and with ``infer_mask``: the model has a
    pad id of its own, or one was given), a batch that holds the pad id is padded where it holds
    it — unless the pad id is an EOS id — as transformers' ``generate`` infers it.
    """
    if isinstance(input_ids, Mapping):  # (a tokenizer's whole output, a BatchEncoding)
        raise PromptError(
            "input_ids got a mapping (a tokenizer's whole output?); unpack it: "
            "generate(**tokenizer(texts, return_tensors='pt', padding=True))"
        )
    if isinstance(input_ids, str | bytes):
        raise PromptError(
            "input_ids got text; tokenize it first: tokenizer(text, return_tensors='pt')"
        )
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() not in (1, 2):
            raise PromptError(
                f"input_ids has {input_ids.dim()} dimensions {tuple(input_ids.shape)}; give one "
                "prompt [L] or a batch [B, L] of token ids"
            )
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise PromptError(
                f"input_ids are {input_ids.dtype}; token ids are integers (the tokenizer's "
                "input_ids, e.g. torch.long)"
            )
        ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
    else:
        flat = list(input_ids)
        if flat and all(_token_id(t) for t in flat):  # one prompt as a flat list of ids
            flat = [flat]
        rows = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in flat]
        if not all(_token_id(t) for r in rows for t in r):
            raise PromptError(
                "input_ids must be one prompt or a batch of prompts of integer token ids (the "
                "tokenizer's input_ids); a row holds something else"
            )
        width = max((len(r) for r in rows), default=0)
        if attention_mask is None or any(len(r) != width for r in rows):
            if attention_mask is not None:
                raise PromptError(
                    "input_ids rows of different lengths come with an attention_mask; give "
                    "either padded rows with their mask or unpadded rows without one"
                )
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                if r:
                    ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                    mask[i, width - len(r) :] = 1
            return ids, mask
        ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), width)
    if attention_mask is None:
        if not infer_mask or not bool((ids == pad).any()):
            return ids.long(), None
        if pad in set(eos_ids):
            warnings.warn(
                f"input_ids hold the pad id {pad}, which is also an EOS id, and no attention_mask "
                "was given: the padding cannot be told from the prompt, so it is read as prompt "
                "tokens; pass the attention_mask the tokenizer returned",
                stacklevel=3,
            )
            return ids.long(), None
        return ids.long(), ids.ne(pad).long()
    mask = torch.as_tensor(attention_mask)
    if mask.dim() == 1:
        mask = mask.reshape(1, -1)
    if tuple(mask.shape) != tuple(ids.shape):
        raise PromptError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}; "
            "give the mask the tokenizer returned with these ids"
        )
    return ids.long(), mask.to(ids.device)


def _token_id(t: Any) -> bool:
    """Whether ``t`` is one integer token id (a Python / numpy integer or a 0-d integer tensor)."""
    if isinstance(t, torch.Tensor):
        return t.dim() == 0 and not (
            t.is_floating_point() or t.is_complex() or t.dtype == torch.bool
        )
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def eos_and_pad(
    model: PreTrainedModel, eos: int | Sequence[int] | None = None, pad: int | None = None
) -> tuple[list[int], int]:
    """EOS ids and pad id: as given, else the generation config's; pad falls back to EOS, then 0."""
    gen = getattr(model, "generation_config", None)
    if eos is None:
        eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, torch.Tensor):  # (transformers takes a tensor of ids)
        eos = eos.tolist()
    eos = [] if eos is None else [eos] if _token_id(eos) else eos
    if isinstance(eos, (str, bytes)) or not all(_token_id(t) for t in eos):
        raise ConfigError(f"eos_token_id takes a token id or a list of them, got {eos!r}")
    eos_ids = [int(t) for t in eos]
    if pad is None:
        pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    if not _token_id(pad):
        raise ConfigError(f"pad_token_id takes a token id, got {pad!r}")
    return eos_ids, int(pad)


def serving_eos(model: PreTrainedModel, tokenizer: Any) -> list[int]:
    """Where ``fluid serve`` and ``fluid generate`` end an output: the generation config's EOS ids
    and the tokenizer's own EOS token, as vLLM ends one (a chat checkpoint whose template closes a
    turn with a token its generation config does not list, e.g. ``<|eot_id|>``, still stops).
    The Python ``generate`` keeps transformers' rule: the generation config's ids only."""
    eos_ids, _ = eos_and_pad(model)
    own = getattr(tokenizer, "eos_token_id", None)
    if isinstance(own, int) and own not in eos_ids:
        eos_ids.append(own)
    return eos_ids


def sliding_window(cfg: Any) -> int | None:
    """The model's sliding attention window (positions), or None when it attends to everything
    (no window, windows switched off, or — by ``layer_types`` — no layer that slides)."""
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return None
    kinds = getattr(cfg, "layer_types", None)
    if kinds is not None and "sliding_attention" not in kinds:
        return None
    return int(window)


def check_context(
    model: PreTrainedModel,
    lengths: list[int],
    max_new_tokens: int,
    k_max: int,
    names: Sequence[str] | None = None,
) -> None:
    """Prompts must fit ``max_position_embeddings − max_new_tokens``; no sliding windows crossed.

    ``names``: what each prompt is called in an error (default ``prompt <row>``)."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    limit = getattr(cfg, "max_position_embeddings", None)
    for row, n in enumerate(lengths):
        name = f"prompt {row}" if names is None else names[row]
        if n == 0:
            raise PromptError(f"{name} is empty; give at least one token")
        if limit is not None and n > limit - max_new_tokens:
            room = (
                f"this prompt leaves room for at most {limit - n} new tokens"
                if n < limit
                else "this prompt alone fills the context"
            )
            raise PromptError(
                f"{name} has {n} tokens and max_new_tokens is {max_new_tokens}: "
                f"{n + max_new_tokens} positions, but the model's context holds {limit}; shorten "
                f"the prompt or lower max_new_tokens ({room})"
            )
    window = sliding_window(cfg)
    if window is not None and max(lengths) + max_new_tokens + k_max > window:
        raise ConfigError(
            f"this model uses sliding-window attention ({window} positions), which the sampler's "
            f"visibility rule does not model: prompt + max_new_tokens + the {k_max} draft slots "
            f"must stay within the window (at most {window - k_max} tokens of prompt and new "
            f"ones, {max(lengths) + max_new_tokens} asked); lower max_new_tokens or the horizon "
            "(k_max, a fixed:K policy, or ar)"
        )


def check_request(
    req: Any,
    model: PreTrainedModel,
    *,
    block: int,
    max_len: int,
    by_priority: bool,
    has_tokenizer: bool,
) -> None:
    """A ``Request`` the engine is given (``Scheduler.submit``), checked against the model, the
    engine's ``max_len`` and ``block`` (its draft slots), its scheduling policy and whether it
    can read text; each problem is one ``PromptError`` / ``ConfigError`` naming the request."""
    if not req.prompt:
        raise PromptError(f"request {req.request_id!r}: the prompt is empty; give some tokens")
    if not isinstance(req.priority, int) or isinstance(req.priority, bool):
        raise ConfigError(
            f"request {req.request_id!r}: priority must be an integer, got {req.priority!r}"
        )
    if req.priority and not by_priority:
        raise ConfigError(
            f"request {req.request_id!r}: priority {req.priority} needs "
            "Scheduler(scheduling_policy='priority')"
        )
    from fluid_npu.sampling.rules import SamplingParams

    if req.sampling is not None and not isinstance(req.sampling, SamplingParams):
        kind = type(req.sampling)
        raise ConfigError(
            f"request {req.request_id!r}: sampling is a {kind.__module__}.{kind.__qualname__}; "
            "the engine takes fluid_npu.sampling.rules.SamplingParams (vLLM's SamplingParams "
            "goes to fluid_npu.sampling.llm.LLM.generate)"
        )
    if req.max_new_tokens < 1:
        raise ConfigError(
            f"request {req.request_id!r}: max_new_tokens must be at least 1, "
            f"got {req.max_new_tokens}"
        )
    check_context(
        model,
        [len(req.prompt)],
        req.max_new_tokens,
        block,
        [f"request {req.request_id!r}"],
    )
    if len(req.prompt) + req.max_new_tokens > max_len:
        raise PromptError(
            f"request {req.request_id!r}: prompt ({len(req.prompt)} tokens) + max_new_tokens "
            f"({req.max_new_tokens}) exceeds the engine's max_len {max_len}; shorten "
            "the prompt or lower max_new_tokens"
        )
    vocab = model.get_input_embeddings().weight.shape[0]
    if min(req.prompt) < 0 or max(req.prompt) >= vocab:
        raise PromptError(
            f"request {req.request_id!r}: token ids must lie in [0, {vocab}) (the vocabulary)"
        )
    sp = req.sampling
    top = max(sp.top_logprobs, sp.prompt_logprobs or 0) if sp is not None else 0
    if top > vocab:
        raise ConfigError(
            f"request {req.request_id!r}: {top} alternatives asked for each token's "
            f"log-probability, more than the vocabulary's {vocab} tokens"
        )
    biased = [t for t, _ in (sp.logit_bias if sp is not None else ())]
    allowed = sp.allowed_token_ids if sp is not None else ()
    banned = [t for w in (sp.bad_words if sp is not None else ()) for t in w]
    for name, ids in (("logit_bias", biased), ("allowed_token_ids", allowed),
                      ("bad_words", banned)):  # fmt: skip
        if ids and max(ids) >= vocab:
            raise ConfigError(
                f"request {req.request_id!r}: {name} token {max(ids)} is outside the "
                f"vocabulary [0, {vocab})"
            )
    if req.stop and not has_tokenizer:
        raise ConfigError(
            f"request {req.request_id!r} has stop strings but the Scheduler has no tokenizer "
            "to read the text with; pass Scheduler(..., tokenizer=...)"
        )
    if any(not isinstance(x, str) or not x for x in req.stop):
        raise ConfigError(f"request {req.request_id!r}: stop strings must be non-empty text")
    for x in req.stop:  # (the engine matches them as UTF-8: a lone surrogate has none, and
        # failing there would stop every request in the batch)
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"request {req.request_id!r}: stop string {x!r} holds an unpaired UTF-16 "
                "surrogate, which no text can contain; give the character whole"
            ) from None


def truncated_prompt(
    ids: list[int], keep: int | None, context: int, ends: tuple[int, int] = (0, 0)
) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: the prompt's last ``keep`` tokens (-1: the whole
    ``context``'s worth, which leaves a longer prompt no room to generate, as in vLLM; None: the
    prompt whole); ``keep`` above the context is a ``ConfigError`` (``fluid serve`` and ``LLM``).

    ``ends``: how many of ``ids``' first and last tokens are the special tokens the tokenizer adds
    to a text (``special_ends``). They are kept and the text between them is cut to the rest, as
    vLLM cuts a text prompt (the tokenizer's own left truncation): a BOS stays first. A ``keep``
    that leaves no room for text between them is a ``ConfigError``."""
    if keep is None:
        return ids
    if keep > context:
        raise ConfigError(
            f"truncate_prompt_tokens={keep} is more than the context of {context} tokens "
            "(--max-len / max_model_len); ask for fewer, leaving room for the completion"
        )
    keep = context if keep == -1 else keep
    if len(ids) <= keep:
        return ids
    head, tail = ends
    if keep <= head + tail:
        raise ConfigError(
            f"truncate_prompt_tokens={keep} leaves no room for the prompt's text beside the "
            f"{head + tail} special token(s) the tokenizer adds to it; keep more, or send the "
            "prompt without them (add_special_tokens=false, or as token ids)"
        )
    body = keep - head - tail
    return ids[:head] + ids[len(ids) - tail - body : len(ids) - tail] + ids[len(ids) - tail :]


def text_specials(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after every text it encodes (a BOS, say,
    or a BOS and an EOS): a probe text encoded with and without them, the bare ids found inside;
    none when it cannot tell."""
    try:
        bare = [int(t) for t in tokenizer("a", add_special_tokens=False)["input_ids"]]
        full = [int(t) for t in tokenizer("a", add_special_tokens=True)["input_ids"]]
    except Exception:  # (a tokenizer that refuses the probe: no ends we can tell)
        return [], []
    for head in range(len(full) - len(bare) + 1):
        if bare and full[head : head + len(bare)] == bare:
            return full[:head], full[head + len(bare) :]
    return [], []


def special_ends(added: tuple[list[int], list[int]], ids: list[int]) -> tuple[int, int]:
    """How many of ``ids``' (a text encoded with special tokens) first and last tokens are the
    ones the tokenizer adds before and after every text (``added``: ``text_specials``); 0 for an
    end where they are not there."""
    head, tail = added
    h = len(head) if ids[: len(head)] == head else 0
    t = (
        len(tail)
        if tail and len(ids) - h >= len(tail) and ids[len(ids) - len(tail) :] == tail
        else 0
    )
    return (h, t)


def check_attn_backend(
    backend: str | None,
    loops: Sequence[str],
    flag: str = "attn_backend",
    fix: str = "loop='reference'",
) -> None:
    """A ``ConfigError`` for an ``attn_backend`` that names no back end, or that is given where
    only the decode engine runs (``loop='fused'``: it attends over its slot cache itself, so the
    setting would have no effect)."""
    if backend is None:
        return
    if backend not in ATTN_BACKENDS:
        raise ConfigError(f"{flag} {backend!r} is not one of {', '.join(ATTN_BACKENDS)}")
    if "fused" in loops:
        raise ConfigError(
            f"{flag} chooses the reference loop's attention; the decode engine (the fused loop) "
            f"runs its own over the slot cache: leave {flag} out, or use {fix}"
        )
