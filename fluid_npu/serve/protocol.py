"""The OpenAI request bodies ``fluid serve`` accepts, and its OpenAI-style errors.

``parse_completion`` / ``parse_chat`` turn a decoded JSON body into a checked request or raise one
``APIError`` (HTTP 400 unless said otherwise) whose ``param`` names the offending field, as the
OpenAI API does: ``{"error": {"message", "type", "param", "code"}}``. Nothing is silently ignored:

* a field the server does not know is an error naming it;
* the engine's decoding settings are honoured: ``temperature`` (0 = greedy, the lossless FLUID
  output; above 0 exact speculative sampling), ``top_p``, ``seed`` (the same seed gives the same
  output alone or in any batch in float32; in bfloat16 / float16 a batch's rounding can move a
  draw, docs/engine.md), ``logprobs`` (completions: the number of alternatives;
  chat: ``logprobs`` + ``top_logprobs``; 0–20, or up to vLLM's ``--max-logprobs``:
  ``check_logprobs``), and vLLM's extensions ``top_k`` (0 or -1 = off),
  ``min_p`` and ``ignore_eos`` (decode exactly ``max_tokens`` tokens);
* a decoding setting left out takes the server's default (``sampling/generation_defaults.py``),
  as vLLM does: the model's ``generation_config`` where it sets ``temperature`` / ``top_p`` /
  ``top_k`` / ``min_p`` / ``repetition_penalty``, else the OpenAI API's (temperature 1, top_p 1):
  greedy decoding is ``temperature: 0``;
* ``stop`` (up to 64 non-empty strings: OpenAI takes 4, vLLM any number, and lm-evaluation-harness
  adds the EOS text to a task's own) ends the request in the engine; the text is cut before the
  stop string, as the OpenAI API returns it, or after it with vLLM's
  ``include_stop_str_in_output``; vLLM's ``stop_token_ids`` end it as EOS does (the token counted,
  its text left out unless ``include_stop_str_in_output``; not with a grammar); vLLM's
  ``skip_special_tokens`` (default true: special tokens are no text; false writes them out, in
  the text, the stop-string search, an echoed token-id prompt and ``text_offset`` — but not the
  EOS or stop token that ends the output unless ``include_stop_str_in_output`` (as vLLM), nor a
  reasoning parser's markers);
* ``stream_options``: ``include_usage``, OpenAI's ``include_obfuscation`` (accepted; no padding
  is added) and vLLM's ``continuous_usage_stats`` (every chunk carries its choice's usage so far;
  it turns ``include_usage`` on where left out);
* completions take ``prompt`` as one text or token-id list, or a list of them (each its own
  choice, ``index`` in the order given, as vLLM answers a batch); a prompt is empty, a 400, only
  where it encodes to no tokens (``[]``, or ``""`` with a tokenizer that adds no BOS: as vLLM
  reads it, whitespace is a prompt); ``echo`` returns the prompt before
  the completion, with ``logprobs`` every prompt token's log-probability too (the first one's is
  null), and with ``max_tokens: 0`` the prompt alone — how lm-evaluation-harness scores text
  through a server (``local-completions``);
* ``n`` completions per prompt (up to ``MAX_N``; choice ``index`` = prompt × n + copy, as vLLM
  orders them); copy ``j`` of a seeded request draws with ``seed + j`` (64-bit wrap), so copy 0
  is the ``n: 1`` output and every copy is reproducible; unseeded copies draw their own seeds;
* penalties (``penalties.py``): OpenAI's ``presence_penalty`` / ``frequency_penalty`` ([-2, 2],
  on the output's tokens) and vLLM's ``repetition_penalty`` (transformers', on prompt and output;
  left out: the model's ``generation_config``, as vLLM reads it);
* ``logit_bias`` (OpenAI's: token id -> bias in [-100, 100], up to 300 tokens), added to the
  logits before the penalties; vLLM's ``min_tokens`` (no EOS, stop token or stop string before
  that many tokens, at most ``max_tokens``: ``sampling/stops.py``); vLLM's ``priority`` (where a
  request waits for a slot: lower first, with a server started with ``--scheduling-policy
  priority``; otherwise only 0);
* chat requests take vLLM's rendering fields (``rendering.py``): ``chat_template_kwargs`` (the
  template's variables, over ``--default-chat-template-kwargs``; not the rendering's own
  arguments), ``add_generation_prompt``, ``continue_final_message`` (the last message, the
  assistant's, left open; not with ``add_generation_prompt: true``) and ``chat_template`` (a
  request's own, which the app takes only with ``--trust-request-chat-template``); ``/tokenize``
  takes them for messages and refuses them for a prompt;
* chat requests may offer ``tools`` (``tools.py``: rendered into the prompt; with
  ``tool_choice: "auto"`` and a server started with ``--enable-auto-tool-choice`` the answer's
  calls come back as ``tool_calls``; ``"required"`` or a named function force a call), and carry
  assistant ``tool_calls`` and ``tool`` messages;
* structured outputs (``structured.py``): ``response_format`` (``json_object``, ``json_schema``)
  and vLLM's ``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``), on both routes;
* vLLM's ``prompt_logprobs`` (N; not with ``stream``): every prompt token after the first with
  its log-probability under the model's own distribution, its ``rank`` and ``decoded_token``,
  and N alternatives — a completion choice's own, beside a chat's choices;
* vLLM's ``return_token_ids`` (the prompt's token ids — completions: per choice; chat: beside
  the choices — and each choice's output ``token_ids``, EOS included; streamed: the prompt's in a
  choice's first chunk, each chunk the ids it delivered) and ``return_tokens_as_token_ids`` (a
  log-probability's token written ``token_id:N``, its ``bytes`` still the token's own; the
  server's ``--return-tokens-as-token-ids`` where left out), for clients that must not
  tokenize the text again (agent and RL loops);
* vLLM's ``add_special_tokens``, ``request_id``, ``cache_salt``, ``include_reasoning`` and beam
  search at its neutral value (``vllm_fields.py``);
* vLLM's ``truncate_prompt_tokens`` (K: only the prompt's last K tokens are decoded from — the
  rendered conversation's, for a chat; a text's BOS kept first, as vLLM's cut keeps it —; -1:
  cut to the whole context, which leaves a longer prompt no room to generate, so it is still a
  400, as in vLLM; more than the context is a 400), applied before the context check and counted
  so in ``usage``;
* vLLM's ``allowed_token_ids`` (only those tokens may be generated: every other one's logit is
  ``-inf`` before the bias, penalties and filters; ``sampling/penalties.py``) and ``bad_words``
  (words tokenized as vLLM does — ``token_fields.bad_word_ids``: one or two sequences a word, up
  to ``MAX_BAD_WORDS`` sequences — whose token sequences are never generated, matched in the
  output);
* a field it knows but cannot honour is accepted only at its neutral value: ``best_of`` 1,
  ``suffix`` absent; any other value is an error naming the field and what is supported;
  ``user`` is an opaque end-user tag, accepted; so are OpenAI's chat tags (``metadata``,
  ``store``, ``service_tier``, ``prompt_cache_key``, ``safety_identifier``, ...), and its chat
  features (``modalities``, ``audio``, ``reasoning_effort``, ``functions``, ...) at their neutral
  value only (``openai_fields.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from fluid_npu.sampling.generation_defaults import SamplingDefaults as SamplingDefaults
from fluid_npu.sampling.rules import INT64_MAX, MAX_BAD_WORDS, MAX_REPETITION_PENALTY
from fluid_npu.serve.bodies import Message, StreamOptions, _Strict
from fluid_npu.serve.bodies import validate as validate
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.openai_fields import ChatFields, check_chat_fields
from fluid_npu.serve.rendering import ChatRender, chat_render, conversation
from fluid_npu.serve.structured import Constraint, StructuredFields, body_constraint, with_eos
from fluid_npu.serve.token_fields import MAX_STOP as MAX_STOP
from fluid_npu.serve.token_fields import (
    MAX_STOP_BYTES,
    allowed_ids,
    logit_bias_pairs,
    stop_token_ids,
)
from fluid_npu.serve.tools import ToolParser, ToolSetting, tool_setting
from fluid_npu.serve.vllm_fields import VllmFields, check_vllm_fields

MAX_N = 64  # completions per prompt (each one a request in the batch)
MAX_CHOICES = 1024  # prompts x n per request (each costs the server memory before it runs)
MAX_TOP_LOGPROBS = 20  # as the OpenAI API allows: --max-logprobs' default, as vLLM's
# a chat's messages and tools, as the OpenAI API allows: checking 100,000 messages took pydantic
# seconds, during which no other stream moved (its check holds the interpreter throughout)
MAX_MESSAGES = 2048
MAX_TOOLS = 128
COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI completions default; chat defaults to the context


def check_chat_lists(body: Any, messages: str = "messages") -> None:
    """A 400 naming the field when a chat body's ``messages`` (a Responses body's ``input``) or
    ``tools`` list is longer than the OpenAI API allows, before its items are checked one by one."""
    for name, most in ((messages, MAX_MESSAGES), ("tools", MAX_TOOLS)):
        given = body.get(name) if isinstance(body, dict) else None
        if isinstance(given, list) and len(given) > most:
            raise APIError(
                f"{name} holds {len(given)} items; a request takes at most {most}, as the OpenAI "
                "API does",
                param=name,
            )


class _Common(_Strict, StructuredFields, VllmFields):
    """Fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=INT64_MAX)  # vLLM's; 0 or -1 = off
    min_p: float | None = Field(default=None, ge=0, le=1)  # vLLM's extension; 0 = off
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = None  # null = false, as the OpenAI API allows
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64_MAX - 1, le=INT64_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False
    )  # vLLM's (transformers')
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens may be generated
    # vLLM's: words never generated (tokenized by the app; each may give two sequences)
    bad_words: list[str] | None = Field(default=None, max_length=MAX_BAD_WORDS)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # vLLM's: keep the last K
    user: str | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0, le=INT64_MAX)  # vLLM's: no EOS before it
    # vLLM's: with --scheduling-policy priority, lower starts first
    priority: int | None = Field(default=None, ge=-INT64_MAX - 1, le=INT64_MAX)
    include_stop_str_in_output: bool | None = None  # vLLM's: the text keeps the stop string
    stop_token_ids: list[int] | None = None  # vLLM's: more tokens that end the request as EOS
    skip_special_tokens: bool | None = None  # vLLM's: false writes special tokens in the text
    return_token_ids: bool | None = None  # vLLM's: prompt_token_ids and token_ids returned
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprobs tokens as "token_id:N"
    # vLLM's: each prompt token's logprob, rank and this many alternatives (not streamed)
    prompt_logprobs: int | None = Field(default=None, ge=-1)  # (-1: all; --max-logprobs caps)


class _Rendering(_Strict):
    """How a conversation becomes a prompt (vLLM's chat fields)."""

    add_generation_prompt: bool | None = None  # null: true (the assistant turn opened)
    continue_final_message: bool | None = None  # the last (assistant) message left open
    chat_template: str | None = None  # the request's own (--trust-request-chat-template)
    chat_template_kwargs: dict[str, Any] | None = None  # the template's variables


class CompletionBody(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0: with echo, the prompt scored alone
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0)  # (at most --max-logprobs: check_logprobs)
    best_of: int | None = None
    suffix: str | None = None


class ChatBody(_Common, _Rendering, ChatFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=-1)  # (-1: all; --max-logprobs caps)
    tools: list[Any] | None = None  # checked in tools.tool_setting
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool | None = None  # vLLM's: false drops a reasoning parser's part


@dataclass
class Sampling:
    """What one request asks of the decoder, after the checks."""

    max_tokens: int | None  # None: as many as the context leaves (chat's default)
    # the engine's SamplingParams fields; None: left out (SamplingDefaults.fill gives the default)
    params: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stream: bool | None = None  # null = false, as the OpenAI API allows
    include_usage: bool = False
    continuous_usage: bool = False  # every chunk carries its choice's usage so far (vLLM's)
    ignore_eos: bool | None = None
    stop_token_ids: tuple[int, ...] = ()  # end the request as EOS does (not spelled)
    include_stop: bool = False  # the text keeps the stop string (or stop token) that ended it
    skip_special: bool = True  # special tokens are no text (False: written out, vLLM's)
    return_token_ids: bool = False  # the prompt's and the output's token ids come back too
    tokens_as_ids: bool | None = None  # logprobs' tokens as "token_id:N" (None: the server's)
    prompt_logprobs: int | None = None  # the response's prompt_logprobs: alternatives each
    model: str | None = None
    max_tokens_field: str = "max_tokens"  # the name the request gave its limit under
    max_tokens_default: bool = False  # max_tokens is the completions default, not the request's
    echo: bool = False  # completions: the prompt's text (and log-probabilities) come first
    n: int = 1  # completions of each prompt
    constraint: Constraint | None = None  # the grammar the output follows (structured.py)
    priority: int = 0  # where it waits for a slot (--scheduling-policy priority)
    bad_words: list[str] = field(default_factory=list)  # (token_fields.bad_word_ids: the app's)
    add_special: bool = True  # completions: text prompts get the tokenizer's special tokens
    request_id: str | None = None  # vLLM's: the id where no X-Request-Id header gives one
    cache_salt: str | None = None  # vLLM's: reuses only cache entries of the same salt
    include_reasoning: bool = True  # chat: a reasoning parser's part is returned (vLLM's)
    truncate: int | None = None  # vLLM's truncate_prompt_tokens: keep the prompt's last K (-1: all
    # the context holds), before the context check


@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]  # one choice each, in this order
    sampling: Sampling


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]  # role, content (text) and, where given, name, tool fields
    sampling: Sampling
    render: ChatRender = field(default_factory=ChatRender)
    tools: ToolSetting = field(default_factory=ToolSetting)


def _neutral(body: _Common, name: str, ok: tuple[Any, ...], what: str) -> None:
    value = getattr(body, name)
    if value not in ok:
        raise APIError(
            f"{name}={value!r} is not supported by this server; {name} must be {what}",
            param=name,
        )


def _usage_options(given: StreamOptions | None) -> tuple[bool, bool]:
    """``(include_usage, continuous)`` of a stream: vLLM's ``continuous_usage_stats`` (the usage
    on every chunk) goes with ``include_usage``, which it turns on where left out."""
    if given is None:
        return False, False
    continuous = bool(given.continuous_usage_stats)
    if continuous and given.include_usage is False:
        raise APIError(
            "stream_options.continuous_usage_stats needs include_usage: true (or left out)",
            param="stream_options.continuous_usage_stats",
        )
    return bool(given.include_usage) or continuous, continuous


def _sampling(body: _Common, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> Sampling:
    bias = logit_bias_pairs(body.logit_bias)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP or any(s == "" for s in stop):
        raise APIError(f"stop takes up to {MAX_STOP} non-empty strings", param="stop")
    if any(len(x.encode("utf-8", "surrogatepass")) > MAX_STOP_BYTES for x in stop):
        raise APIError(
            f"a stop string takes at most {MAX_STOP_BYTES} bytes of UTF-8 (each is matched "
            "every step, against that much of the output); give a shorter one",
            param="stop",
        )
    if body.stream_options is not None and not body.stream:
        raise APIError("stream_options is only allowed with stream: true", param="stream_options")
    if body.prompt_logprobs is not None and body.stream:
        raise APIError("prompt_logprobs come with the whole answer, not in a stream (as vLLM); "
                       "leave stream out or send the request without them",
                       param="prompt_logprobs")  # fmt: skip
    if body.truncate_prompt_tokens == 0:
        raise APIError("truncate_prompt_tokens=0 would leave no prompt; give K >= 1 (keep the "
                       "prompt's last K tokens) or -1 (as many as the context holds)",
                       param="truncate_prompt_tokens")  # fmt: skip
    include_usage, continuous = _usage_options(body.stream_options)
    constraint = body_constraint(body)
    stop_ids = stop_token_ids(body.stop_token_ids, constraint)
    params = {  # None: left out, for the server's defaults (SamplingDefaults)
        "temperature": None if body.temperature is None else float(body.temperature),
        "top_p": None if body.top_p is None else float(body.top_p),
        "top_k": None if body.top_k is None else max(body.top_k, 0),  # vLLM's -1: off, as 0
        "min_p": None if body.min_p is None else float(body.min_p),
        "repetition_penalty": (
            None if body.repetition_penalty is None else float(body.repetition_penalty)
        ),
        "presence_penalty": float(body.presence_penalty or 0.0),
        "frequency_penalty": float(body.frequency_penalty or 0.0),
        "logit_bias": bias,
        "allowed_token_ids": allowed_ids(body.allowed_token_ids),
        "min_tokens": body.min_tokens or 0,
        "seed": None if body.seed == -1 else body.seed,  # (vLLM's -1: no seed)
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
        "prompt_logprobs": body.prompt_logprobs,
    }
    return Sampling(
        max_tokens=max_tokens,
        constraint=with_eos(constraint, body),
        params=params,
        stop=stop,
        stream=bool(body.stream),
        include_usage=include_usage,
        continuous_usage=continuous,
        ignore_eos=bool(body.ignore_eos),
        stop_token_ids=stop_ids,
        include_stop=bool(body.include_stop_str_in_output),
        skip_special=body.skip_special_tokens is not False,
        return_token_ids=bool(body.return_token_ids),
        tokens_as_ids=body.return_tokens_as_token_ids,
        prompt_logprobs=body.prompt_logprobs,
        model=body.model,
        n=body.n or 1,
        priority=body.priority or 0,
        bad_words=list(body.bad_words or []),
        truncate=body.truncate_prompt_tokens,
        request_id=body.request_id,
        cache_salt=body.cache_salt,
    )


def parse_completion(body: Any) -> CompletionRequest:
    """A checked ``/v1/completions`` request: its prompts (text or token ids), one choice each."""
    req: CompletionBody = validate(CompletionBody, body)
    prompt = req.prompt
    many = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    prompts: list[str | list[int]] = list(prompt) if many else [prompt]  # type: ignore[arg-type]
    for n, one in enumerate(prompts):
        where = f"prompt[{n}]" if many and len(prompts) > 1 else "prompt"
        if isinstance(one, list) and any(t < 0 for t in one):
            raise APIError(f"{where}: token ids must be non-negative", param="prompt")
        if one == []:  # (a text is refused where it encodes to no tokens: text.completion_ids)
            raise APIError(f"{where} is empty; give some text or token ids", param="prompt")
    add_special = check_vllm_fields(req, chat=False)
    _neutral(req, "best_of", (None, 1), "1 or absent")
    _neutral(req, "suffix", (None,), "absent")
    echo = bool(req.echo)
    if req.max_tokens == 0 and not echo:
        raise APIError(
            "max_tokens=0 asks for no tokens, which only scores the prompt: send it with "
            "echo: true (and logprobs), or ask for at least 1 token",
            param="max_tokens",
        )
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    sampling = _sampling(req, max_tokens, req.logprobs is not None, req.logprobs or 0)
    sampling.echo, sampling.add_special = echo, add_special
    sampling.max_tokens_default = req.max_tokens is None
    if len(prompts) * sampling.n > MAX_CHOICES:
        raise APIError(
            f"the request asks for {len(prompts) * sampling.n} completions ({len(prompts)} "
            f"prompts x n={sampling.n}); this server takes at most {MAX_CHOICES} per request",
            param="n" if sampling.n > 1 else "prompt",
        )
    if echo and req.logprobs is not None:  # the prompt's log-probabilities, as vLLM's echo gives
        asked = sampling.params["prompt_logprobs"]  # (and prompt_logprobs', when both come)
        sampling.params["prompt_logprobs"] = -1 if asked == -1 else max(req.logprobs, asked or 0)
    return CompletionRequest(prompts=prompts, sampling=sampling)


def parse_chat(
    body: Any, tool_parser: ToolParser | None = None, bounded: bool = True
) -> ChatRequest:
    """A checked ``/v1/chat/completions`` request (text messages only); ``tool_parser``: the
    server's (``--enable-auto-tool-choice``), which ``tool_choice: "auto"`` needs."""
    if bounded:  # (False: a Responses request, whose input the same bounds held)
        check_chat_lists(body)
    req: ChatBody = validate(ChatBody, body)
    check_chat_fields(req)
    check_vllm_fields(req, chat=True)
    if req.top_logprobs and not req.logprobs:
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    tools = tool_setting(req.tools, req.tool_choice, req.parallel_tool_calls, tool_parser)
    if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
        raise APIError(
            "max_tokens and max_completion_tokens disagree; give one",
            param="max_completion_tokens",
        )
    # what the template gets (text parts one per line, as vLLM; names kept): the rule
    # ``fluid generate`` applies to a "messages" line, so both render a conversation alike
    messages = conversation(req.messages)
    render = chat_render(req, messages)
    max_tokens = req.max_completion_tokens or req.max_tokens
    sampling = _sampling(req, max_tokens, bool(req.logprobs), req.top_logprobs or 0)
    if req.max_completion_tokens:
        sampling.max_tokens_field = "max_completion_tokens"
    sampling.include_reasoning = req.include_reasoning is not False
    if tools.constraint is not None:  # a call is forced: decoded under its schema
        if sampling.constraint is not None:
            raise APIError(
                f"tool_choice {req.tool_choice!r} holds the answer to a call's schema; it "
                "cannot also follow response_format / structured_outputs",
                param="tool_choice",
            )
        sampling.constraint = with_eos(tools.constraint, req)
        stop_token_ids(req.stop_token_ids, sampling.constraint)
    return ChatRequest(messages=messages, sampling=sampling, render=render, tools=tools)
