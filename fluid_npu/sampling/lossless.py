"""The golden check: the sampler's tokens against transformers' greedy ``generate``.

The sampler is lossless by construction — every committed token is the AR argmax — so any
difference from ``model.generate(do_sample=False)`` can only be floating-point noise picking the
other side of a near-tie (the sampler's forwards batch several tokens, so sums run in another
order). ``compare`` finds each row's first differing token and re-scores it **in fp32** (a float32
copy of the model when it computes in a lower precision) with a fresh full forward of the shared
prefix. It is a numerical tie — reported, tolerated — only when the two candidates' fp32 logits
are closer than ``TIE_ULPS`` units of the compute dtype's resolution at their magnitude
(``resolution``: the spacing of representable numbers there; bf16 at a logit of 16: 0.125) and
neither is below the maximum by more. Anything else is a real mismatch. After a first difference a
row's continuations legitimately diverge, so only that one is judged.

So a bf16 run is not excused by bf16 noise alone: the fp32 model must agree that the two tokens
are indistinguishable at bf16's resolution (one "lossless" peer matched plain decoding on 45 % of
prompts in bf16 and on 100 % in fp32 — this check tells the two cases apart).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel

TIE_ULPS = 2  # resolution units two logits may differ by and still be a tie


def resolution(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of ``dtype``'s representable numbers at ``magnitude`` (its ulp there)."""
    info = torch.finfo(dtype)
    mag = max(abs(float(magnitude)), info.tiny)
    return info.eps * 2.0 ** math.floor(math.log2(mag))


@dataclass(frozen=True)
class Difference:
    row: int
    index: int  # position among the new tokens
    ours: int | None  # None: our row ended before this token
    theirs: int | None
    gap: float  # fp32 |logit(ours) − logit(theirs)| at the shared prefix (inf if a row ended)
    tie: bool
    tolerance: float = 0.0  # the gap allowed: TIE_ULPS resolution units of the compute dtype

    def to_dict(self) -> dict:
        """As JSON takes it: a row that ended first has no gap (``None``, not ``Infinity``)."""
        out = asdict(self)
        if not math.isfinite(self.gap):
            out["gap"] = None
        return out


def cut_at_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The tokens up to and including the first EOS."""
    out = []
    for t in tokens:
        out.append(int(t))
        if int(t) in eos_ids:
            break
    return out


def special_ids_only(config: GenerationConfig) -> GenerationConfig:
    """``config`` with nothing but its special token ids (no decoding setting)."""
    keep = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    return GenerationConfig(**{k: getattr(config, k, None) for k in keep})


@contextlib.contextmanager
def plain_generation(model: PreTrainedModel) -> Iterator[None]:
    """transformers' ``generate`` as plain decoding while inside: the checkpoint's own
    ``generation_config`` (Qwen2.5-Instruct ships ``repetition_penalty`` 1.05; others
    ``no_repeat_ngram_size``, ``suppress_tokens``, ...) fills every setting a call leaves out, so
    it is swapped for one that keeps only the special token ids — the reference is then the
    model's own argmax, as every token the sampler commits is."""
    saved = model.generation_config
    model.generation_config = special_ids_only(saved)
    try:
        yield
    finally:
        model.generation_config = saved


@torch.inference_mode()
def hf_greedy(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    cache_implementation: str | None = None,
) -> list[list[int]]:
    """transformers' greedy ``generate`` on a left-padded batch; new tokens per row, cut at EOS.

    Plain greedy decoding whatever the checkpoint's ``generation_config`` asks for
    (``plain_generation``). ``cache_implementation="static"``: transformers' static cache, which
    it also compiles on the devices where it auto-compiles (CUDA and others; not the CPU).
    """
    extra = {} if cache_implementation is None else {"cache_implementation": cache_implementation}
    with plain_generation(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            eos_token_id=list(eos_ids) if eos_ids else None,
            pad_token_id=pad_id,
            **extra,
        )
    new = out[:, input_ids.shape[1] :].tolist()
    return [cut_at_eos(row, eos_ids) for row in new]


def fp32_scorer(model: PreTrainedModel) -> Callable[[], PreTrainedModel]:
    """A getter of ``model`` itself when it computes in float32, else of a float32 copy (made at
    the first call, then kept): pass one to every ``compare`` of a run, so a bf16 model is copied
    at most once however many policies diverge."""
    if next(model.parameters()).dtype == torch.float32:
        return lambda: model
    return functools.cache(lambda: copy.deepcopy(model).float().eval())


@torch.inference_mode()
def compare(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    ours: Sequence[Sequence[int]],
    theirs: Sequence[Sequence[int]],
    ulps: float = TIE_ULPS,
    scorer: Callable[[], PreTrainedModel] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> list[Difference]:
    """Every row's first difference between ``ours`` and ``theirs`` (see the module docstring);
    ``scorer``: the run's ``fp32_scorer(model)``, else one of this call's own. ``compute_dtype``:
    the dtype the tokens were computed in, when not ``model``'s (a float32 copy scoring a bf16
    server's outputs), whose resolution sets the tolerance."""
    diffs = []
    dtype = compute_dtype or next(model.parameters()).dtype
    dev = next(model.parameters()).device
    scorer = scorer or fp32_scorer(model)
    for row, (prompt, a, b) in enumerate(zip(prompts, ours, theirs)):
        a, b = list(a), list(b)
        if a == b:
            continue
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        mine = a[i] if i < len(a) else None
        other = b[i] if i < len(b) else None
        gap, tie, tol = float("inf"), False, 0.0
        if mine is not None and other is not None:
            ids = torch.tensor([[*map(int, prompt), *b[:i]]], device=dev)
            logits = scorer()(input_ids=ids).logits[0, -1].float()
            top = logits.max()
            gap = float((logits[mine] - logits[other]).abs())
            tol = ulps * resolution(dtype, max(abs(float(logits[mine])), abs(float(logits[other]))))
            tie = (
                gap <= tol
                and float(top - logits[mine]) <= tol
                and float(top - logits[other]) <= tol
            )
        diffs.append(Difference(row, i, mine, other, gap, tie, tol))
    return diffs


def exact_match_rate(ours: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]]) -> float:
    """Fraction of rows token-identical to the reference (ties count as differences here)."""
    if not ours:
        return 1.0
    return sum(list(a) == list(b) for a, b in zip(ours, theirs)) / len(ours)
