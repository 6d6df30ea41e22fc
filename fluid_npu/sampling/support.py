"""What the decode engine reproduces exactly, checked when an engine is made, the rotary
embedding it pins, and the context it gives a request (``engine_context``: the model's, at most
``DEFAULT_MAX_LEN`` unless asked, and within a sliding window room for the drafts beside it).

The engine runs one forward over a batch's committed tokens, pending drafts and MASK slots, in
chunks for long prompts; transformers' ``generate`` runs a prompt at once and then one token a
step. Everything position-wise is the same in both — except model features whose arithmetic
depends on how a forward is cut:

* **Rotary embeddings that change with a forward's length.** ``dynamic`` RoPE grows its
  frequencies once a forward's largest position passes ``max_position_embeddings``. The engine
  keeps every request within that (``max_len``), so ``generate`` never grows them for the same
  request; but the engine's draft slots sit a block past the committed tokens and would. The
  engine therefore runs the rotary's own arithmetic without the length check, at the original
  frequencies (``PinnedRope``), during its forwards only. ``longrope`` switches every position of a
  forward to other factors once the forward reaches ``original_max_position_embeddings`` — where a
  prompt is cut into chunks or drafts run ahead, the switch falls elsewhere than in ``generate``, so
  such models are refused.
* **Logit soft-capping** (Gemma 2's ``attn_logit_softcapping`` / ``final_logit_softcapping``): the
  engine's slot attention and LM head do not cap, so such models are refused rather than decoded
  differently.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Iterator
from typing import Any

from transformers import PreTrainedModel

from fluid_npu.errors import ConfigError
from fluid_npu.sampling.inputs import sliding_window

_NOTHING = contextlib.nullcontext()
DEFAULT_MAX_LEN = 4096  # an engine's context when not asked for (its cache is sized for it)


def rope_types(rotary: Any) -> set[str]:
    """The rope types a rotary-embedding module uses (one per layer type where it has several)."""
    kind = getattr(rotary, "rope_type", None)
    if kind is None:
        return set()
    return {str(k) for k in kind.values()} if isinstance(kind, dict) else {str(kind)}


def check_engine_support(model: PreTrainedModel) -> None:
    """A ``ConfigError`` naming the feature when the engine cannot reproduce ``generate`` for it."""
    cfg = model.config.get_text_config()
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, name, None) is not None:
            raise ConfigError(
                f"this model caps its logits ({name}={getattr(cfg, name)}, as Gemma 2 does); the "
                "decode engine's attention and LM head do not, so its tokens would not be the "
                "model's own: use a model without soft-capping"
            )
    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    if "longrope" in rope_types(rotary):
        raise ConfigError(
            "this model's rotary embedding is 'longrope' (Phi-3 style), whose frequencies depend "
            "on how long each forward is; the decode engine's chunked prefill and drafts cannot "
            "reproduce transformers' generate with it"
        )


class PinnedRope:
    """The rotary embedding of ``model`` at fixed frequencies during the engine's forwards (see
    the module docstring); nothing to do for rotaries whose frequencies never change."""

    def __init__(self, model: PreTrainedModel) -> None:
        rotary = getattr(model.get_decoder(), "rotary_emb", None)
        self.rotary = rotary if any("dynamic" in t for t in rope_types(rotary)) else None
        if self.rotary is None:
            return
        plain = getattr(type(self.rotary).forward, "__wrapped__", None)
        if plain is None:
            raise ConfigError(
                f"{type(self.rotary).__name__} uses a dynamic rope type but its forward is not "
                "transformers' dynamic_rope_update wrapper; the engine cannot pin its frequencies"
            )
        self._plain = types.MethodType(plain, self.rotary)
        # the frequencies generate uses for a request within the context: the original ones (a
        # longer forward elsewhere may have grown them; generate's own next prefill resets them)
        original = getattr(self.rotary, "original_inv_freq", None)
        if original is not None:
            self.rotary.inv_freq.data = original.to(self.rotary.inv_freq.device).clone()
            self.rotary.max_seq_len_cached = getattr(
                self.rotary, "original_max_seq_len", self.rotary.max_seq_len_cached
            )

    def __call__(self) -> contextlib.AbstractContextManager[None]:
        """A context for one forward (nothing to enter for a rotary that is not dynamic)."""
        return _NOTHING if self.rotary is None else self._pinned()

    @contextlib.contextmanager
    def _pinned(self) -> Iterator[None]:
        saved = self.rotary.__dict__.get("forward")
        self.rotary.forward = self._plain
        try:
            yield
        finally:
            if saved is None:
                del self.rotary.forward
            else:
                self.rotary.forward = saved


def cache_keyword(model: PreTrainedModel) -> str:
    """``cache`` on transformers >= 5.24 (``past_key_values`` is deprecated there), else the old."""
    return _cache_keyword(type(model.get_decoder()).forward)


@functools.lru_cache(maxsize=64)
def _cache_keyword(forward: Any) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def engine_context(
    model: PreTrainedModel, max_len: int | None, k: int
) -> tuple[int, int | None, str]:
    """``(max_len, positions, reason)`` of an engine whose policy drafts ``k`` slots: what a
    request may fill (``max_len`` as asked, else the model's context up to ``DEFAULT_MAX_LEN``;
    within a sliding window, room for the drafts beside it), the model's own context (None: not
    stated) and why ``max_len`` is what it is; a ``max_len`` that does not fit is a
    ``ConfigError``."""
    cfg = model.config.get_text_config()
    limit = getattr(cfg, "max_position_embeddings", None)
    if max_len is not None and limit is not None and max_len > limit:
        raise ConfigError(
            f"max_len {max_len} is over the model's context ({limit} positions); "
            f"use at most {limit}"
        )
    fits = int(max_len or min(limit or DEFAULT_MAX_LEN, DEFAULT_MAX_LEN))
    reason = (
        "as asked" if max_len else
        "the default: the model states no context" if limit is None else
        f"the default cap; the model's own context is {limit}: max_len raises it"
        if limit > DEFAULT_MAX_LEN else "the model's context"
    )  # fmt: skip
    window = sliding_window(cfg)
    if window is not None:  # a request's tokens and drafts stay inside the window
        room = window - k
        if room < 2:
            raise ConfigError(
                f"this model's sliding attention window ({window} positions) leaves no room "
                f"beside the policy's {k} draft slots; use a shorter horizon (k_max, a "
                "fixed:K policy, or ar)"
            )
        if max_len is not None and max_len > room:
            raise ConfigError(
                f"max_len {max_len} does not fit this model's sliding attention window "
                f"({window} positions, {k} of them for drafts); use at most {room}"
            )
        if room < fits:
            fits = room
            reason = (
                f"the sliding attention window of {window} positions less the policy's {k} "
                "draft slots"
            )
    return fits, None if limit is None else int(limit), reason
