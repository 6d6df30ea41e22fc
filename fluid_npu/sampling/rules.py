"""Sampling rules of the decode engine: temperature / top-k / top-p / min-p, seeds, exact drafts.

Greedy decoding (temperature 0) commits the AR argmax. With temperature > 0 the engine samples and
stays *exact* — its output distribution is AR sampling's — by speculative rejection sampling
(Leviathan et al. / Chen et al.): a draft ``x`` proposed from the slot's own distribution ``q`` is
accepted with probability ``min(1, p(x) / q(x))`` where ``p`` is the AR distribution at that
position; at the first rejection the token is drawn from ``norm(max(0, p − q))``, and when every
draft is accepted the bonus token from ``p``. ``p`` and ``q`` are both the model's distribution
after the request's temperature, then top-k, then top-p (nucleus), then min-p — the order
transformers applies them in.

**Seeds without generator state.** Every random number is a hash of ``(seed, position, purpose)``
(``uniform``): the accept test of the draft at position ``t``, the draw of the token committed at
``t``, the draft sampled for ``t`` from the block anchored at ``c`` (keyed by ``c`` too: a position
is drafted again from a later anchor when its first draft is rejected or dropped). Each position's
accept test and draw count at most once, each (position, anchor) is drafted at most once, and the
three purposes are independent streams, so the rejection rule's guarantee holds, the same seed
and settings give the same tokens whatever else shares the batch, and nothing is stateful or
synchronised with the host (the step stays capturable).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from fluid_npu.errors import ConfigError

ACCEPT, DRAW, DRAFT = 0, 1, 2  # the purposes of a random number
MAX_TOP_LOGPROBS = 20  # as the OpenAI API allows (fluid serve's default --max-logprobs)
NO_LOGPROB = -9999.0  # what JSON output writes for -inf (JSON has none), as vLLM's server does
MAX_LOGIT_BIAS = 300  # tokens a request may bias (the OpenAI API's limit)
MAX_BAD_WORDS = 256  # token sequences a request may ban (vLLM's 128 words, each two spellings)
MAX_BAD_WORD_LEN = 128  # tokens in one (each position checks the tokens before it against them)
MAX_REPETITION_PENALTY = 1e4  # finite, and far inside float32 (the engine keeps it per slot)
MIN_TEMPERATURE = 1e-5  # a lower temperature decodes greedily (as vLLM treats it)
INT64_MAX = (1 << 63) - 1  # seeds and top_k live in int64 tensors
_M31 = (1 << 31) - 1


def finite_logprob(value: float | None) -> float | None:
    """``value`` as JSON can hold it: a non-finite log-probability or logit is ``NO_LOGPROB``."""
    return value if value is None or math.isfinite(value) else NO_LOGPROB


_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty")  # fmt: skip
_INTS = ("top_k", "top_logprobs", "min_tokens")
_OPTIONAL_INTS = ("seed", "prompt_logprobs")  # (None: not set)


def as_number(name: str, value: Any, kind: type) -> Any:
    """``value`` as a Python ``kind`` (``float``, or ``int``: a whole number, e.g. ``2.0``), from
    any real number type (numpy scalars too); anything else, a bool included, is a ``ConfigError``
    naming ``name``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and kind is int and not isinstance(value, numbers.Integral):
        ok = math.isfinite(value) and float(value).is_integer()
    if not ok:
        raise ConfigError(
            f"{name} must be {'a whole number' if kind is int else 'a number'}, got {value!r}"
        )
    return kind(value)


@dataclass(frozen=True)
class SamplingParams:
    """A request's decoding settings (transformers' / the OpenAI API's meanings).

    ``temperature`` 0 is greedy (so is one below ``MIN_TEMPERATURE``); ``top_k`` 0 and ``top_p``
    1.0 switch those filters off; ``min_p`` 0 too. ``seed`` None draws one from torch's global
    generator when the request is submitted (a given one is any 64-bit signed integer).
    ``logprobs``: return the log-probability of each committed token under the model's own AR
    distribution (what the engine's ``logprobs_mode`` reports), and its ``top_logprobs`` best
    alternatives (0 up to the vocabulary; the server caps them, ``--max-logprobs``).
    ``prompt_logprobs`` (vLLM's): every prompt token after the first with its log-probability
    under the model's own distribution (no temperature: a score), its rank and that many
    alternatives (None: none), read from the prefill's own forwards (what a scorer such as
    lm-evaluation-harness asks a server for with ``echo``). ``repetition_penalty``
    (transformers', 1 = off), ``presence_penalty`` and ``frequency_penalty`` (OpenAI's, 0 = off,
    in [-2, 2]) and ``logit_bias`` (OpenAI's: ``(token, bias)`` pairs, bias in [-100, 100], added
    to the logits first) and ``min_tokens`` (EOS impossible before that many new tokens,
    transformers' ``min_new_tokens``): ``penalties.py``; so is vLLM's ``allowed_token_ids`` (only
    those tokens may be generated: every other one's logit is ``-inf``, before everything else)
    and ``bad_words`` (token sequences never generated: a sequence's last token gets ``-inf``
    wherever the tokens before it end the text so far; vLLM's ``bad_words`` once tokenized, which
    match in the output only, or transformers' ``bad_words_ids`` with ``bad_words_in_prompt``,
    whose sequences may begin in the prompt).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] | Mapping[int, float] = ()
    min_tokens: int = 0
    allowed_token_ids: tuple[int, ...] = ()  # vLLM's: only these may be generated (): any
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never generated
    bad_words_in_prompt: bool = False  # a bad word may begin in the prompt (transformers')

    def __post_init__(self) -> None:
        self._coerce()
        if not 0 <= self.temperature < math.inf:
            raise ConfigError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}"
            )
        if self.temperature < MIN_TEMPERATURE:
            # logits / 1e-40 overflow: below this the distribution is the argmax's (vLLM's rule)
            object.__setattr__(self, "temperature", 0.0)
        if not 0 <= self.top_k <= INT64_MAX:
            raise ConfigError(f"top_k must lie in [0, {INT64_MAX}] (0 = off), got {self.top_k}")
        if self.seed is not None and not -INT64_MAX - 1 <= self.seed <= INT64_MAX:
            raise ConfigError(f"seed must be a 64-bit signed integer, got {self.seed}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:  # (1: only the most likely tokens, as vLLM allows)
            raise ConfigError(f"min_p must lie in [0, 1] (0 = off), got {self.min_p}")
        if self.top_logprobs < 0:  # (at most the vocabulary: checked at submit, inputs.py)
            raise ConfigError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ConfigError("top_logprobs needs logprobs=True")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ConfigError(
                f"repetition_penalty must be > 0 and at most {MAX_REPETITION_PENALTY:g} "
                f"(1 = off), got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ConfigError(f"{name} must lie in [-2, 2] (0 = off), got {value}")
        given = self.logit_bias
        pairs = sorted(given.items()) if isinstance(given, Mapping) else given  # OpenAI's {t: b}
        try:
            pairs = tuple((p[0], float(p[1])) for p in pairs if len(p) == 2)
            ok = len(pairs) == len(given) and all(type(t) is int for t, _ in pairs)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                "logit_bias takes {token id: bias} or (token id, bias) pairs, integer token ids"
            )
        object.__setattr__(self, "logit_bias", pairs)
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ConfigError(
                f"logit_bias holds {len(self.logit_bias)} tokens; at most {MAX_LOGIT_BIAS}"
            )
        for token, bias in self.logit_bias:
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ConfigError(
                    f"logit_bias maps token ids >= 0 to biases in [-100, 100], got {token}: {bias}"
                )
        allowed = self.allowed_token_ids
        if not isinstance(allowed, (tuple, list)) or any(
            not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in allowed
        ):
            raise ConfigError(
                f"allowed_token_ids takes token ids >= 0 (empty: any token), got {allowed!r}"
            )
        object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(allowed))))
        self._check_bad_words()
        banned = {w[0] for w in self.bad_words if len(w) == 1}
        if self.allowed_token_ids and set(self.allowed_token_ids) <= banned:
            raise ConfigError(
                "allowed_token_ids and bad_words leave no token to generate (every allowed token "
                "is a one-token bad word); allow another token or drop a bad word"
            )
        if len({t for t, _ in self.logit_bias}) != len(self.logit_bias):
            raise ConfigError("logit_bias gives a token twice; give each token one bias")
        if not 0 <= self.min_tokens <= INT64_MAX:
            raise ConfigError(f"min_tokens must be >= 0 (0 = off), got {self.min_tokens}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ConfigError(f"prompt_logprobs must be >= 0 (or None), got {self.prompt_logprobs}")

    def _coerce(self) -> None:
        """The numeric settings as Python floats and ints, whatever number type they came as (a
        whole ``temperature=1``, a numpy scalar, ``top_k=2.0``, as transformers takes them): the
        engine's per-row tensors take them as they are. Anything else names the setting."""
        for name in _FLOATS + _INTS + _OPTIONAL_INTS:
            value = getattr(self, name)
            if value is not None or name not in _OPTIONAL_INTS:
                object.__setattr__(
                    self, name, as_number(name, value, float if name in _FLOATS else int)
                )

    def _check_bad_words(self) -> None:
        words = self.bad_words
        ok = isinstance(words, (tuple, list)) and all(
            isinstance(w, (tuple, list)) and w
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in w)
            for w in words
        )  # fmt: skip
        if not ok:
            raise ConfigError(
                f"bad_words takes non-empty sequences of token ids >= 0, got {words!r}"
            )
        if len(words) > MAX_BAD_WORDS or any(len(w) > MAX_BAD_WORD_LEN for w in words):
            raise ConfigError(
                f"bad_words holds {len(words)} sequences of up to "
                f"{max(map(len, words))} tokens; at most {MAX_BAD_WORDS} of up to "
                f"{MAX_BAD_WORD_LEN} tokens each"
            )
        object.__setattr__(self, "bad_words", tuple(dict.fromkeys(tuple(w) for w in words)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def seeded_for(self, copy: int) -> SamplingParams:
        """The settings of row / copy ``copy`` of a batch sharing these: a given seed becomes
        ``seed + copy`` (wrapping in 64 bits), so copy 0 is the single request's output and each
        copy is reproducible alone (``generate``'s rows, the server's ``n``)."""
        if copy == 0 or self.seed is None or self.greedy:
            return self
        wrapped = (self.seed + copy + (1 << 63)) % (1 << 64) - (1 << 63)
        return replace(self, seed=wrapped)

    @property
    def adjusted(self) -> bool:
        """Whether penalties, a logit bias, ``min_tokens``, allowed tokens or bad words adjust
        the AR logits (``penalties.py``)."""
        penalties = (self.repetition_penalty, self.presence_penalty, self.frequency_penalty)
        return (
            penalties != (1.0, 0.0, 0.0)
            or bool(self.logit_bias)
            or self.min_tokens > 0
            or bool(self.allowed_token_ids)
            or bool(self.bad_words)
        )


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (xorshift-multiply rounds; products stay below 2^62: no overflow)."""
    for mul in (0x2C1B3C6D, 0x297A2D39, 0x1B873593):
        x = x & _M31
        x = (x ^ (x >> 16)) * mul
    x = x & _M31
    return x ^ (x >> 15)


def uniform(
    seed: torch.Tensor,
    position: torch.Tensor,
    purpose: int,
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uniforms in (0, 1), float64, one per element of ``position`` (``seed`` broadcast to it).

    ``anchor`` (drafts) keys the number by the block's anchor too: a position drafted again from
    a later anchor (its first draft rejected or dropped) gets a fresh number, so no draft reuses
    one whose draft was already seen (its confidence chose the candidate blocks).
    """
    seed = seed.to(torch.long)
    # every bit of a 64-bit seed counts (_mix reads 31): seeds apart by 2^31 draw apart
    seed = _mix(seed) ^ _mix((seed >> 31) + 0x68E31DA4) ^ (seed >> 62)
    key = _mix(position.to(torch.long) * 3 + purpose + 0x5BD1E995)
    if anchor is not None:
        key = _mix(key ^ _mix(anchor.to(torch.long) + 0x2545F491))
    h1 = _mix(_mix(seed) ^ key)
    h2 = _mix(h1 ^ 0x3C6EF372)
    bits = (h1 << 22) ^ h2  # 53 random bits
    return ((bits & ((1 << 53) - 1)).double() + 0.5) / float(1 << 53)


def kept_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens temperature, top-k, top-p and min-p keep (``[B, ..., V]`` bool; per-row settings
    ``[B]``), and the scores (logits over the temperature) they were chosen by.

    Each filter decides only where it is on (top-k above 0, top-p below 1, min-p above 0), and
    min-p compares log-probabilities, so a token no filter drops is kept however unlikely (its
    probability may underflow to 0 in float32; ``processed`` logprobs still report it). Rows
    with temperature 0 get temperature 1 (their caller decodes them greedily)."""
    shape = (-1,) + (1,) * (logits.dim() - 1)
    t = torch.where(temperature > 0, temperature, 1.0).to(torch.float32).view(shape)
    scores = logits.float() / t
    vocab = scores.shape[-1]
    # top-k: keep scores >= the k-th largest
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).view(shape)
    ordered = scores.sort(dim=-1, descending=True).values
    keep = scores >= ordered.gather(-1, (k - 1).expand(*scores.shape[:-1], 1))
    # top-p: keep the smallest prefix (by probability) whose mass reaches top_p
    p = top_p.to(torch.float32).view(shape)
    sp, idx = scores.masked_fill(~keep, -math.inf).softmax(dim=-1).sort(dim=-1, descending=True)
    drop = (sp.cumsum(dim=-1) - sp >= p) & (p < 1)  # (mass strictly before each token)
    drop[..., 0] = False
    keep &= ~torch.zeros_like(drop).scatter(-1, idx, drop)
    # min-p: drop tokens below min_p x the top probability — p_i / p_top = exp(s_i - s_top), so
    # on the scores themselves (no normalisation, no underflow)
    kept = scores.masked_fill(~keep, -math.inf)
    m = min_p.to(torch.float32).view(shape)
    floor = torch.where(m > 0, m.clamp(min=1e-30).log(), -math.inf) + kept.amax(-1, keepdim=True)
    return keep & (kept >= floor), scores


def filtered_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p (``kept_tokens``); per-row settings
    ``[B]``. ``logits [B, ..., V]``; rows with temperature 0 get temperature 1 (their caller
    decodes them greedily and never reads these); a row holding a NaN logit is all NaN (its
    caller ends the request instead of drawing)."""
    keep, scores = kept_tokens(logits, temperature, top_k, top_p, min_p)
    probs = scores.masked_fill(~keep, -math.inf).softmax(dim=-1)
    # a NaN logit leaves the whole distribution NaN (no filter decides on it): nothing is drawn
    return torch.where(scores.isnan().any(dim=-1, keepdim=True), math.nan, probs)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws from ``probs [..., V]`` with uniforms ``u [...]`` (float64)."""
    cdf = probs.double().cumsum(dim=-1)
    cdf = cdf / cdf[..., -1:]
    pick = torch.searchsorted(cdf, u[..., None].to(cdf.dtype)).squeeze(-1)
    return pick.clamp(max=probs.shape[-1] - 1)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p − q))``, or ``p`` where that is empty (only when p == q, never rejected)."""
    r = (p - q).clamp(min=0.0)
    mass = r.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp(min=1e-30), p)
