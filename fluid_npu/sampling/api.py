"""The sampler's public API: ``generate`` on any FLUID model (the transformers-style wrapper
``FluidForCausalLM`` is ``pretrained.py``).

``generate(model, tokenizer_or_mask_id, input_ids, ...)`` checks its input (one ``FluidError`` per
problem: empty prompt, prompt too long for the context, bad horizon, no MASK token), runs the
chosen loop (``fused`` or ``reference``) under the chosen horizon policy and returns the sequences
like transformers' ``generate`` (prompt as given + new tokens, padded after EOS), the new tokens per
row and the call's ``GenerateStats``. Greedy decoding is the contract: every token equals
``model.generate(do_sample=False)``'s, up to numerical near-ties; with ``do_sample=True`` the output
distribution is AR sampling's exactly (``rules.py``). The fused loop runs on the decode engine
(``scheduler.py``); the published reference loop on its first engine (``engine.py``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fluid_npu import device as devices
from fluid_npu.config import ATTN_BACKENDS
from fluid_npu.errors import ConfigError
from fluid_npu.model.attention import DENSE_IMPLS, FLUID, attention_kind, configure_attention
from fluid_npu.model.khead import KHead
from fluid_npu.sampling.engine import Engine, StreamFn, split_prompts
from fluid_npu.sampling.fused import DEFAULT_ANCHORS, DEFAULT_COVERAGE
from fluid_npu.sampling.grammar import Grammar
from fluid_npu.sampling.inputs import (
    PromptError,
    as_batch,
    as_count,
    check_attn_backend,
    check_context,
    eos_and_pad,
    mask_id_of,
)
from fluid_npu.sampling.policies import block_bound, parse_policy
from fluid_npu.sampling.reference import DEFAULT_MAX_REFINE, DEFAULT_REFINE_THRESHOLD, run_reference
from fluid_npu.sampling.rules import SamplingParams
from fluid_npu.sampling.stats import GenerateStats

LOOPS = ("fused", "reference")
GENERATION_KEYS = (
    "do_sample", "temperature", "top_k", "top_p", "min_p", "stop_strings", "repetition_penalty",
    "min_new_tokens", "bad_words_ids",
)  # fmt: skip
TRANSFORMERS_TOP_K = 50  # transformers' top_k when sampling without one
# Measured on CPU: for the sampler's short cached calls the model's own SDPA with a dense bool mask
# is as fast as or faster than the registered "fluid" attention (blocked / reference back ends).
DEFAULT_ATTN = "sdpa"


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, prompt width + longest new], transformers' layout
    new_tokens: list[list[int]]  # per row, EOS included when it was generated
    stats: GenerateStats
    finish_reasons: list[str] | None = None  # per row: "stop" (EOS / stop string) or "length"
    logprobs: list[list[float]] | None = None  # per row and token, when asked for
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None


@contextlib.contextmanager
def attention(model: PreTrainedModel, backend: str | None) -> Iterator[None]:
    """Run the sampler's forwards with ``backend``, restoring the model's attention afterwards.

    ``None`` keeps a model already on ``sdpa`` / ``eager`` / the ``fluid`` attention and switches
    any other implementation (flash, flex: they take no FLUID mask) to ``DEFAULT_ATTN``.
    """
    kind = attention_kind(model)
    current = getattr(model.config, "fluid_attn_backend", "auto") if kind == FLUID else kind
    if backend is None:
        backend = current if kind in (*DENSE_IMPLS, FLUID) else DEFAULT_ATTN
    if backend == current:
        yield
        return
    old_backend = model.config.__dict__.get("fluid_attn_backend")
    try:  # (with the device: a back end that cannot run there is refused before a forward)
        configure_attention(model, backend, model.device.type)
    except ValueError as exc:
        raise ConfigError(f"{exc}; choose one of {', '.join(ATTN_BACKENDS)}") from None
    try:
        yield
    finally:
        model.set_attn_implementation(kind)
        if old_backend is None:
            model.config.__dict__.pop("fluid_attn_backend", None)
        else:
            model.config.fluid_attn_backend = old_backend


def generate(
    model: PreTrainedModel,
    tokenizer_or_mask_id: PreTrainedTokenizerBase | int | None,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    *,
    policy: str = "entropy",
    loop: str = "fused",
    max_new_tokens: int = 64,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    khead: KHead | None = None,
    k_max: int | None = None,
    k_min: int = 1,
    anchors: int = DEFAULT_ANCHORS,
    coverage: float = DEFAULT_COVERAGE,
    refine_threshold: float = DEFAULT_REFINE_THRESHOLD,
    max_refine: int = DEFAULT_MAX_REFINE,
    attn_backend: str | None = None,
    stream: StreamFn | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    min_new_tokens: int = 0,
    bad_words_ids: Sequence[Sequence[int]] | None = None,
    seed: int | None = None,
    stop_strings: Sequence[str] | str | None = None,
    stop_in_prompt: bool = True,
    logprobs: bool = False,
    top_logprobs: int = 0,
    logprobs_mode: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    grammar: Grammar | None = None,
) -> GenerateOutput:
    """Lossless elastic decoding of a batch of prompts (see the module docstring).

    ``eos_token_id`` / ``pad_token_id`` default to the model's generation config (as transformers);
    pass ``eos_token_id=[]`` to decode exactly ``max_new_tokens``. ``k_max`` defaults to the
    K-head's (else 16). ``anchors``: the most candidate accept lengths that get a draft block in
    the fused loop, taken until they hold ``coverage`` of the estimated probability.
    ``stream(row, tokens)`` is called as tokens are committed. The fused loop runs on the decode
    engine (``Scheduler``: static KV cache, fixed-shape steps) with every prompt in its own slot;
    ``engine_kwargs`` go to the ``Scheduler`` (``max_batch`` < the number of prompts refills
    slots as rows finish, ``compile``, ``prefill_chunk``, ``adaptive``, ``budgets``: a dict that
    keeps the drafting budget across calls, as ``FluidForCausalLM`` does). ``attn_backend`` applies
    to the reference loop; the engine runs its own attention over the slot cache.

    Sampling (fused loop), transformers' conventions: ``do_sample=False`` is greedy whatever the
    other settings; with ``do_sample=True``, ``temperature`` / ``top_k`` (None: 50, transformers'
    default; 0 = off) / ``top_p``
    (1.0 = off) / ``min_p`` apply in that order and the output distribution is exactly AR
    sampling's (``rules.py``). ``repetition_penalty`` (1.0 = off) applies before them, greedy
    or not, as transformers applies it, and ``min_new_tokens`` keeps EOS out before that many
    new tokens (``penalties.py``); ``bad_words_ids`` are token sequences never generated (as
    transformers' ``NoBadWordsLogitsProcessor``: a sequence may begin in the prompt, and a
    one-token sequence that is an EOS id is dropped). ``seed`` seeds row ``r`` with
    ``seed + r``, wrapping in 64 bits (None: each row's seed drawn from torch's global generator, so
    ``torch.manual_seed`` reproduces a call and calls differ, as in transformers), so a row's
    tokens do not depend on the batch.
    ``stop_strings`` end a row on its committed text (cut as transformers cuts; needs the
    tokenizer, given as the second argument or ``tokenizer=``; with ``stop_in_prompt`` — the
    default, transformers' reading — a stop string may begin in the prompt, without it only in
    the output, as the OpenAI API, vLLM and lm-eval's ``until`` match). The text matched is the
    decoded text with special tokens skipped, as vLLM reads it — unlike transformers, which also
    matches a special token's own spelling (``"s"`` in ``<s>``); ``logprobs`` /
    ``top_logprobs`` return the committed tokens' log-probabilities under the model's own AR
    distribution; ``logprobs_mode`` (vLLM's ``--logprobs-mode``: ``raw_logprobs``, the default,
    ``processed_logprobs`` — the distribution the token was chosen from, after the penalties,
    temperature and filters —, ``raw_logits`` or ``processed_logits``) says otherwise.
    ``grammar`` (``grammar.GrammarCompiler(...).compile(...)``) holds every row's output to it
    (structured outputs; the fused loop).
    """
    if loop not in LOOPS:
        raise ConfigError(f"unknown sampler loop {loop!r}; choose fused or reference")
    check_attn_backend(attn_backend, [loop])
    max_new_tokens = as_count("max_new_tokens", max_new_tokens)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if anchors < 1 or max_refine < 0 or not 0.0 < refine_threshold <= 1.0 or coverage <= 0:
        raise ConfigError(
            "anchors must be >= 1, max_refine >= 0, refine_threshold in (0, 1], coverage > 0"
        )
    mask_id = mask_id_of(model, tokenizer_or_mask_id)
    eos_ids, pad_id = eos_and_pad(model, eos_token_id, pad_token_id)
    pol = parse_policy(
        policy, k_max=block_bound(k_max, khead), k_min=k_min, has_khead=khead is not None
    )
    # a mask is inferred from the pad id only where one exists (given, or the model's), as in
    # transformers: eos_and_pad's last fallback, 0, is no pad id
    model_pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    has_pad = pad_token_id is not None or model_pad is not None
    ids, mask = as_batch(input_ids, attention_mask, pad_id, eos_ids, has_pad)
    prompts = split_prompts(ids, mask)
    if not prompts:
        raise PromptError("no prompts given")
    check_context(model, [len(p) for p in prompts], max_new_tokens, pol.block_len)
    vocab = model.get_input_embeddings().weight.shape[0]
    flat = torch.cat(prompts)
    if bool(((flat < 0) | (flat >= vocab)).any()):  # (one device read; the row only on a failure)
        row = next(r for r, p in enumerate(prompts) if int(p.min()) < 0 or int(p.max()) >= vocab)
        raise PromptError(f"prompt {row}: token ids must lie in [0, {vocab}) (the vocabulary)")
    stats = GenerateStats(policy=pol.name, loop=loop, batch_size=len(prompts))
    dev = next(model.parameters()).device
    if khead is not None:
        khead = khead.to(dev)
    if tokenizer is None and isinstance(tokenizer_or_mask_id, PreTrainedTokenizerBase):
        tokenizer = tokenizer_or_mask_id
    stops = _stop_strings(stop_strings)
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise ConfigError(
            f"tokenizer must be a loaded tokenizer (AutoTokenizer.from_pretrained(...)), got "
            f"{tokenizer!r}"
        )
    # None is "not given", as in transformers 5's GenerationConfig: its defaults
    temperature = 1.0 if temperature is None else temperature
    top_p = 1.0 if top_p is None else top_p
    min_p = 0.0 if min_p is None else min_p
    repetition_penalty = 1.0 if repetition_penalty is None else repetition_penalty
    params = SamplingParams(
        temperature=temperature if do_sample else 0.0,
        top_k=(TRANSFORMERS_TOP_K if top_k is None else top_k) if do_sample else 0,
        top_p=top_p if do_sample else 1.0,
        min_p=min_p if do_sample else 0.0,
        repetition_penalty=repetition_penalty,
        min_tokens=min_new_tokens or 0,
        bad_words=_bad_words(bad_words_ids, eos_ids),
        bad_words_in_prompt=True,
        seed=seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    if do_sample and temperature == 0.0:
        raise ConfigError("do_sample=True needs temperature > 0 (or do_sample=False for greedy)")
    fused_only = stops or logprobs or logprobs_mode or params.adjusted or grammar is not None
    if loop != "fused" and fused_only:
        raise ConfigError(
            "stop strings, logprobs (and logprobs_mode), repetition_penalty, min_new_tokens, "
            "bad_words_ids and a grammar run on the fused loop (the decode engine); use "
            "loop='fused'"
        )
    start = time.perf_counter()
    if loop == "fused":
        engine = dict(engine_kwargs or {})
        given = engine.setdefault("logprobs_mode", logprobs_mode)
        if logprobs_mode is not None and given != logprobs_mode:
            raise ConfigError(
                f"logprobs_mode {logprobs_mode!r} and engine_kwargs' {given!r} differ; give one"
            )
        if engine["logprobs_mode"] is None:
            del engine["logprobs_mode"]
        if stops:
            engine["tokenizer"] = tokenizer
        with eval_mode(model, khead):  # (no dropout: each token is the model's own)
            return _generate_fused(
                model,
                mask_id,
                ids,
                prompts,
                pol,
                khead,
                stats,
                eos_ids,
                pad_id,
                max_new_tokens,
                anchors=anchors,
                coverage=coverage,
                stream=stream,
                start=start,
                params=params,
                stops=stops,
                stop_in_prompt=stop_in_prompt,
                grammar=grammar,
                **engine,
            )
    with attention(model, attn_backend), torch.inference_mode(), eval_mode(model, khead):
        eng = Engine(
            model,
            [p.to(dev) for p in prompts],
            mask_id=mask_id,
            max_new_tokens=max_new_tokens,
            eos_ids=eos_ids,
            pad_id=pad_id,
            stats=stats,
            stream=stream,
        )
        eng.prefill()
        run_reference(
            eng,
            pol,
            khead,
            refine_threshold=refine_threshold,
            max_refine=max_refine,
            sampling=params,
        )
        devices.synchronize(dev)
    stats.wall_s = time.perf_counter() - start
    eng.finish()
    new = eng.new_tokens()
    return GenerateOutput(_sequences(ids, new, pad_id), new, stats)


def _stop_strings(given: Sequence[str] | str | None) -> list[str]:
    """``stop_strings`` as a list (one string, a list of them, or None: none)."""
    stops = [given] if isinstance(given, str) else given
    if stops is None:
        return []
    if not isinstance(stops, Sequence) or not all(isinstance(t, str) for t in stops):
        raise ConfigError(f"stop_strings takes a string or a list of strings, got {given!r}")
    return list(stops)


def _bad_words(
    given: Sequence[Sequence[int]] | None, eos_ids: Sequence[int]
) -> tuple[tuple[int, ...], ...]:
    """transformers' ``bad_words_ids`` as the engine's ``bad_words``: a list of token-id lists
    (None or empty: none); a one-token list that is an EOS id is dropped, as transformers does."""
    if given is None:
        return ()
    if isinstance(given, torch.Tensor):
        given = given.tolist()
    if not isinstance(given, (list, tuple)) or any(not isinstance(w, (list, tuple)) for w in given):
        raise ConfigError(f"bad_words_ids takes a list of token-id lists, got {given!r}")
    words = [tuple(t.item() if hasattr(t, "item") else t for t in w) for w in given]
    return tuple(w for w in words if not (len(w) == 1 and w[0] in eos_ids))


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """``modules`` (and every submodule) in eval mode — no dropout — for the block; each one's
    own mode restored after (a model a user put in train mode decodes as in eval)."""
    modes = [(m, m.training) for top in modules if top is not None for m in top.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def _generate_fused(
    model: PreTrainedModel,
    mask_id: int,
    ids: torch.Tensor,
    prompts: list[torch.Tensor],
    pol: Any,
    khead: KHead | None,
    stats: GenerateStats,
    eos_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    *,
    anchors: int,
    coverage: float,
    stream: StreamFn | None,
    start: float,
    params: SamplingParams,
    stops: list[str],
    stop_in_prompt: bool,
    grammar: Grammar | None = None,
    **engine: Any,
) -> GenerateOutput:
    from fluid_npu.sampling.offline import run_requests
    from fluid_npu.sampling.scheduler import PREFILL_CHUNK, Request, Scheduler

    lengths = [len(p) for p in prompts]
    engine.setdefault("max_batch", len(prompts))
    engine.setdefault("max_len", max(lengths) + max_new_tokens)
    # no chunk is wider than the longest prompt: the slot cache (zero-filled per call) is sized by
    # max_len plus the widest forward, so a known short batch does not pay for 512-token chunks
    engine.setdefault("prefill_chunk", max(1, min(PREFILL_CHUNK, max(lengths) - 1)))
    sched = Scheduler(
        model,
        mask_id,
        policy=pol,
        khead=khead,
        eos_ids=eos_ids,
        pad_id=pad_id,
        anchors=anchors,
        coverage=coverage,
        **engine,
    )
    try:
        reqs = [
            Request(
                str(i),
                p.tolist(),
                max_new_tokens,
                sampling=params.seeded_for(i),
                stop=stops,
                stop_in_prompt=stop_in_prompt,
                grammar=grammar,
            )
            for i, p in enumerate(prompts)
        ]
        results = run_requests(sched, reqs, stream)
        devices.synchronize(sched.device)
    finally:
        sched.close()
    stats.wall_s = time.perf_counter() - start
    new = [results[str(i)][0] for i in range(len(prompts))]
    stats.prefill_forwards = sched.prefill_forwards
    stats.decode_forwards = sched.decode_forwards
    stats.computed_tokens = sched.computed_tokens
    stats.cached_tokens = sched.prefixes.hits
    stats.accept_hist.update(sched.accept_hist)
    stats.k_hist.update(sched.k_hist)
    stats.new_tokens = [len(t) for t in new]
    stats.row_forwards = [results[str(i)][1].forwards for i in range(len(prompts))]
    stats.finalize()
    done = [results[str(i)] for i in range(len(prompts))]
    return GenerateOutput(
        _sequences(ids, new, pad_id),
        new,
        stats,
        finish_reasons=[d.final.finish_reason for d in done],
        logprobs=[d.logprobs for d in done] if params.logprobs else None,
        top_logprobs=[d.top_logprobs for d in done] if params.top_logprobs else None,
    )


def _sequences(ids: torch.Tensor, new: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(t) for t in new)
    tail = torch.full((len(new), width), pad_id, dtype=torch.long)
    for row, toks in enumerate(new):
        tail[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    return torch.cat([ids, tail.to(ids.device)], dim=1)
