"""vLLM's offline-API data classes for ``llm.py``: ``SamplingParams`` (vLLM's fields, names and
defaults, checked and cast as vLLM takes them), ``StructuredOutputsParams``, the outputs
``RequestOutput`` / ``CompletionOutput`` / ``Logprob``, and ``get_metrics``' ``Metric`` /
``Counter`` / ``Vector`` / ``Gauge``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fluid_npu.errors import ConfigError


@dataclass
class StructuredOutputsParams:
    """vLLM's ``StructuredOutputsParams``: exactly one of ``json`` (a schema, a dict or its
    text), ``regex``, ``choice``, ``grammar`` (EBNF) or ``json_object``; ``sampling/specs.py``
    checks it as the server checks its ``structured_outputs`` field."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:  # (checked when built, as vLLM checks it)
        from dataclasses import asdict

        from fluid_npu.sampling.specs import structured_spec

        structured_spec(asdict(self))


@dataclass
class SamplingParams:
    """vLLM's ``SamplingParams`` (the fields of the module docstring, vLLM's defaults)."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only (no text, no stop strings), as vLLM
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):  # (True: one, as vLLM reads it)
            if getattr(self, name) is True:
                setattr(self, name, 1)
        for name in _FLOATS:  # (an int or a numpy scalar is taken as vLLM takes it)
            setattr(self, name, _number(name, getattr(self, name), float))
        for name in _INTS:
            value = getattr(self, name)
            if value is not None or name in ("n", "top_k", "min_tokens"):
                setattr(self, name, _number(name, value, int))
        if self.seed == -1:  # vLLM's "no seed"
            self.seed = None
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and (
            isinstance(self.stop, Mapping)
            or not isinstance(self.stop, Iterable)
            or not all(isinstance(s, str) for s in self.stop)
        ):
            raise ConfigError(
                f"SamplingParams.stop takes a string or a list of them, got {self.stop!r}"
            )
        self.stop = None if self.stop is None else list(self.stop)
        for name in ("stop_token_ids", "allowed_token_ids", "bad_words"):
            given = getattr(self, name)
            if given is not None and (
                isinstance(given, (str, Mapping)) or not isinstance(given, Iterable)
            ):
                what = "strings" if name == "bad_words" else "token ids"
                raise ConfigError(f"SamplingParams.{name} takes a list of {what}, got {given!r}")
        for name in ("stop_token_ids", "allowed_token_ids"):  # (numpy integers as ints)
            if getattr(self, name) is not None:
                setattr(self, name, [_number(name, t, int) for t in getattr(self, name)])
        if self.bad_words is not None and not all(isinstance(w, str) for w in self.bad_words):
            raise ConfigError(
                f"SamplingParams.bad_words takes a list of strings, got {self.bad_words!r}"
            )
        for n, word in enumerate(self.bad_words or ()):  # (checked when built, as vLLM's)
            if not word.strip():
                raise ConfigError(
                    f"SamplingParams.bad_words[{n}] is empty (or only whitespace); give a word "
                    "or leave it out"
                )
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ConfigError(
                    f"SamplingParams.logit_bias takes {{token id: bias}}, got {self.logit_bias!r}"
                )
            self.logit_bias = {
                _number("logit_bias", t, int): _number("logit_bias", b, float)
                for t, b in self.logit_bias.items()
            }
        given = self.structured_outputs
        if given is not None and not isinstance(given, (StructuredOutputsParams, Mapping)):
            raise ConfigError(
                "SamplingParams.structured_outputs takes StructuredOutputsParams(...) or a dict "
                f"such as {{'regex': '[0-9]+'}}, got {given!r}"
            )
        if isinstance(given, Mapping):  # (its keys and kinds checked now, as the class's)
            from fluid_npu.sampling.specs import structured_spec

            structured_spec(dict(given))
        if self.top_k == -1:  # vLLM's "off", as 0
            self.top_k = 0
        if not self.detokenize and self.stop:  # (vLLM refuses it too: stop strings match text)
            raise ConfigError("SamplingParams.stop needs detokenize=True: stop strings match text")
        if self.n < 1:
            raise ConfigError(f"n must be at least 1, got {self.n!r}")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ConfigError("allowed_token_ids is empty; give some token ids (None: any token)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1 (or None), got {self.max_tokens}")
        if any(not s for s in self.stop or []):
            raise ConfigError("stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids or []):
            raise ConfigError("stop_token_ids must be token ids >= 0")
        for name in ("logprobs", "prompt_logprobs"):  # (-1: the whole vocabulary, as vLLM)
            if getattr(self, name) is not None and getattr(self, name) < -1:
                raise ConfigError(f"{name} must be >= 0 or -1 (or None), got {getattr(self, name)}")
        cut = self.truncate_prompt_tokens
        if cut is not None and (cut == 0 or cut < -1):
            raise ConfigError(f"truncate_prompt_tokens must be >= 1 or -1, got {cut}")
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ConfigError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        try:  # the ranges the engine holds them to, checked now, as vLLM checks at construction
            self.engine_params(vocab=1, seed=self.seed, bad_words=())
        except ConfigError as exc:
            raise ConfigError(f"SamplingParams.{exc}") from None

    def structured(self, n: int) -> tuple[str, Any, bool] | None:
        """``structured_outputs`` as the grammar compiler takes it (kind, body, free whitespace);
        None when not given; with ``ignore_eos`` or ``stop_token_ids`` a ``ConfigError`` naming
        prompt ``n``, as the server refuses them."""
        given = self.structured_outputs
        if given is None:
            return None
        from dataclasses import asdict

        from fluid_npu.sampling.specs import structured_spec

        if self.ignore_eos or self.stop_token_ids:
            raise ConfigError(
                f"prompt {n}: structured_outputs cannot go with ignore_eos or stop_token_ids: the "
                "output's grammar decides where it ends (with the EOS token)"
            )
        return structured_spec(asdict(given) if isinstance(given, StructuredOutputsParams)
                               else dict(given))  # fmt: skip

    def engine_params(self, vocab: int, seed: int | None, bad_words: Any) -> Any:
        """The engine's ``rules.SamplingParams`` for these (``vocab``: what -1 logprobs means;
        ``seed``: the request's, drawn where unseeded; ``bad_words``: tokenized)."""
        from fluid_npu.sampling.rules import SamplingParams as EngineParams

        top, asked = (vocab if k == -1 else k for k in (self.logprobs, self.prompt_logprobs))
        return EngineParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            seed=seed, logprobs=self.logprobs is not None, top_logprobs=top or 0,
            prompt_logprobs=asked, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=dict(self.logit_bias or {}), min_tokens=self.min_tokens,
            allowed_token_ids=tuple(self.allowed_token_ids or ()), bad_words=bad_words,
        )  # fmt: skip


_FLOATS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
           "min_p")  # fmt: skip
_INTS = ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
         "truncate_prompt_tokens")  # fmt: skip


def one_each(given: Any, n: int) -> list[SamplingParams]:
    """``generate``'s ``sampling_params`` (one for all, or one per prompt) as one per prompt; a
    wrong kind or count is a ``ConfigError``."""
    params = [given] * n if isinstance(given, SamplingParams) else list(given)
    if not n:
        raise ConfigError("no prompts given")
    if not all(isinstance(p, SamplingParams) for p in params):
        raise ConfigError(
            "sampling_params takes a SamplingParams (or a list of them, one per prompt)"
        )
    if len(params) != n:
        raise ConfigError(f"{len(params)} sampling_params for {n} prompts; give one, or one each")
    return params


def _number(name: str, value: Any, kind: type) -> Any:
    """``value`` as a Python ``kind`` (``rules.as_number``); an error names the field."""
    from fluid_npu.sampling.rules import as_number

    return as_number(f"SamplingParams.{name}", value, kind)


@dataclass
class Logprob:
    """One token's log-probability, its rank among the vocabulary (1: the most likely) where
    known, and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One completion of a prompt (vLLM's fields)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A prompt's completions (vLLM's fields)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens found in the engine's cache (prefix reuse)
    metrics: dict[str, Any] = field(default_factory=dict)  # forwards, TPF


@dataclass
class Metric:
    """vLLM's ``vllm.v1.metrics.reader.Metric``: a named series with labels."""

    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int


@dataclass
class Vector(Metric):
    """An ordered array of counters (vLLM's ``spec_decode_num_accepted_tokens_per_pos``)."""

    values: list[int]


@dataclass
class Gauge(Metric):
    value: float


def engine_metrics(engine: Any, model_name: str) -> list[Metric]:
    """What ``LLM.get_metrics()`` returns, as vLLM's reader does, from the engine's own counts
    (every call so far): the requests running and waiting, and the speculative-decoding counters
    — each request's verify of its drafts in a step is one draft, its accepted drafts counted by
    position (as the verify accepted them, before a stop string or limit cuts the output, as vLLM
    and ``fluid serve`` count them) — from which vLLM's example takes the acceptance rate and mean
    acceptance length."""
    labels = {"model_name": model_name}
    verified, accepted = engine.k_hist, engine.accept_hist  # (per request-step: drafts, accepted)
    longest = max([engine.k, *verified])
    return [
        Gauge("vllm:num_requests_running", dict(labels), float(engine.num_running)),
        Gauge("vllm:num_requests_waiting", dict(labels), float(engine.num_waiting)),
        Counter("vllm:spec_decode_num_drafts", dict(labels),
                sum(n for m, n in verified.items() if m)),
        Counter("vllm:spec_decode_num_draft_tokens", dict(labels),
                sum(m * n for m, n in verified.items())),
        Counter("vllm:spec_decode_num_accepted_tokens", dict(labels),
                sum(a * n for a, n in accepted.items())),
        Vector("vllm:spec_decode_num_accepted_tokens_per_pos", dict(labels),
               [sum(n for a, n in accepted.items() if a > p) for p in range(longest)]),
    ]  # fmt: skip


def logprob_entry(
    tokenizer: Any, token: int, lp: float, top: Any, rank: int | None = None
) -> dict[int, Logprob]:
    """vLLM's per-token logprobs: the token's own ``Logprob``, then its alternatives' (``top``:
    ``(token id, logprob)`` best first; ``rank`` where read, else its place in ``top``); no
    ``decoded_token`` without a tokenizer (``detokenize=False``)."""

    def spelt(t: int) -> str | None:
        return None if tokenizer is None else tokenizer.decode([t])

    order = [t for t, _ in top]
    own = rank if rank is not None else (order.index(token) + 1 if token in order else None)
    out = {int(token): Logprob(lp, own, spelt(token))}
    for k, (t, v) in enumerate(top):
        if int(t) not in out:
            out[int(t)] = Logprob(v, k + 1, spelt(t))
    return out
