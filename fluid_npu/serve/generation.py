"""One request of ``fluid serve`` from its engine events to its response: the text deltas (stop
strings, detokenization), ``echo``, log-probabilities, its metrics, and the server-sent events of
a request's choices (one per prompt) interleaved as they come.

``app.py`` checks a request, submits it (a ``Stream`` per prompt) and hands the streams here; a
``Generation`` reads one stream until its request ends, ``events`` turns a request's generations
into its SSE stream, ``usage`` adds up its choices' usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from fluid_npu.sampling.detok import Detokenizer
from fluid_npu.serve import protocol
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.metrics import ServerMetrics
from fluid_npu.serve.reasoning import ReasoningParser, ReasoningText
from fluid_npu.serve.responses import DONE, LogprobEntry, Shape
from fluid_npu.serve.responses import usage as usage_body
from fluid_npu.serve.text import completion_ids
from fluid_npu.serve.tools import ForcedCalls, ToolCallText
from fluid_npu.serve.worker import Stream, Worker

# one line per choice that ended (``--enable-log-requests``: INFO on stderr), its counts and
# times only: no prompt or output text
request_log = logging.getLogger("fluid_npu.serve.requests")
FIELD = re.compile(r"[A-Za-z_][\w.\[\]-]{0,63}")  # what a refused request's log line may name


def logged_param(exc: APIError) -> str:
    """The field a refusal names, as the request log writes it: a field's path, else ``-`` (an
    unknown field's name is the client's own text, which may hold anything, a newline too)."""
    return exc.param if exc.param and FIELD.fullmatch(exc.param) else "-"


# one delivery of a choice: text, its tokens' log-probabilities, reasoning text, tool calls
Delta = tuple[str, list[LogprobEntry] | None, str, list[dict[str, Any]]]

# a request whose numbers came out NaN / inf (the engine ends it, the others go on)
NUMERIC_FAILURE = (
    "the model's activations overflowed to NaN or inf on this request's tokens, so nothing more "
    "could be decoded (float16 overflows where bfloat16 does not: serve with --dtype bfloat16)"
)


@dataclass
class Echo:
    """A completion that returns its prompt first (``echo``): the prompt's text and token ids,
    and whether any token is generated after it (``max_tokens: 0``: the prompt scored alone)."""

    text: str
    ids: list[int]
    generate: bool
    top: int = 0  # alternatives its log-probabilities show (the request's logprobs N)


class Generation:
    """One admitted request: reads its events, detokenizes, applies stop strings, counts."""

    def __init__(
        self,
        worker: Worker,
        metrics: ServerMetrics,
        stream: Stream,
        detok: Detokenizer | ReasoningText,
        logprobs: bool = False,
        echo: Echo | None = None,
        tools: ToolCallText | ForcedCalls | None = None,
        stop_ids: Collection[int] = (),
    ) -> None:
        self.worker, self.metrics, self.stream, self.detok = worker, metrics, stream, detok
        self.stop_ids = frozenset(stop_ids)  # tokens whose ending it is a stop_reason (vLLM's)
        self.echo = echo
        self.tools = tools  # a chat with tools to call: the answer's calls read out
        self.finish_reason: str | None = None
        self.forwards = 0
        self.cached = 0  # prompt tokens the engine found in a slot's cache
        self.logprobs: list[LogprobEntry] | None = [] if logprobs else None
        self.prompt_lps: list[Any] | None = None  # the engine's prompt logprobs, when asked
        self.token_ids: list[int] = []  # the output's tokens (up to a stop string; EOS counted)
        self._taken = 0  # how many of them take_ids has returned
        self._last: float | None = None  # when the step that gave it tokens last ended ...
        self._first = 0.0  # ... and first (the engine's clock: Event.at)
        self._tokens = 0  # tokens delivered
        self._queued: float | None = None  # when the engine took it, and gave it a slot
        self._admitted: float | None = None
        self.max_tokens = 0  # its limit (vLLM's max_tokens parameter; 0: not counted)
        self.parent: Parent | None = None  # the choices of its prompt (n), counted together

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas, their tokens' log-probabilities, the reasoning's text deltas (with a
        reasoning parser: ``reasoning.ReasoningText``; else empty) and, at the end, the answer's
        tool calls (``tools.ToolCallText``; else none) until the request ends (``finish_reason``
        is then set: ``"tool_calls"`` when calls came); with ``echo`` the prompt's first."""
        while self.finish_reason is None:
            item = await self.stream.queue.get()
            if isinstance(item, BaseException):
                self.finish_reason = "error"
                raise APIError(f"the engine failed: {item}", status=500, type="server_error")
            self.cached = item.cached
            self._queued, self._admitted = item.queued_at, item.admitted_at
            if getattr(item, "prompt_logprobs", None) is not None:  # (a 1-token prompt's: [])
                self.prompt_lps = item.prompt_logprobs
            broke = item.finished and item.finish_reason in ("error", "abort")
            if self.echo is not None and not broke:  # the first event: the prompt comes first
                echo, self.echo = self.echo, None
                yield echo.text, self._prompt_entries(echo, item), "", []
                if not echo.generate:  # scored alone: the token decoded to get here is dropped
                    self._timing(1, item.at)
                    self.finish_reason = "length"
                    if not item.finished:
                        self._abort()
                    return
            self.echo = None  # (a request that overflowed or was aborted echoes nothing)
            self._timing(len(item.tokens), item.at)
            self.forwards = item.forwards
            used = self.detok.tokens_used
            text = self.detok.add(item.tokens)
            entries = self._entries(item, self.detok.tokens_used - used)
            self.token_ids += item.tokens[: self.detok.tokens_used - used]
            if self.detok.stopped:
                self.finish_reason = "stop"
                if not item.finished:
                    self._abort()
            elif item.finished and item.finish_reason == "error":
                self.finish_reason = "error"
                raise APIError(NUMERIC_FAILURE, status=500, type="server_error")
            elif item.finished:
                self.finish_reason = item.finish_reason or "stop"
                text += self.detok.flush()
            reasoning = getattr(self.detok, "reasoning_delta", "")
            calls: list[dict[str, Any]] = []
            if self.tools is not None:
                text = self.tools.add(text)
                if self.finish_reason is not None:  # (an aborted answer stays text)
                    parse = self.finish_reason in ("stop", "length")
                    rest, calls = self.tools.finish(parse, stopped=self.detok.stopped)
                    text += rest
                    if calls and self.tools.finish_reason:  # (a named call's stays "stop")
                        self.finish_reason = self.tools.finish_reason
            if text or entries or reasoning or calls:
                yield text, entries, reasoning, calls

    @property
    def stop_reason(self) -> int | str | None:
        """vLLM's ``stop_reason``: the stop string, or the stop token id, that ended the output;
        None when it ended otherwise (the tokenizer's EOS, a length limit, tool calls)."""
        if self.finish_reason != "stop":
            return None
        if self.detok.stopped:
            return self.detok.matched
        last = self.token_ids[-1] if self.token_ids else None
        return last if last in self.stop_ids else None

    def take_ids(self) -> list[int]:
        """The output's token ids no earlier call returned (a stream's chunk carries them)."""
        ids, self._taken = self.token_ids[self._taken :], len(self.token_ids)
        return ids

    def _prompt_entries(self, echo: Echo, item: Any) -> list[LogprobEntry] | None:
        """The prompt's tokens with their log-probabilities (the first one's null), from the
        request's first event; None when none were asked for."""
        lps = getattr(item, "prompt_logprobs", None)
        if self.logprobs is None or lps is None:
            return None
        out: list[LogprobEntry] = [(echo.ids[0], None, None)]
        out += [(t, float(lp), [(a, float(b)) for a, b in top[:echo.top]])
                for t, (lp, top, _) in zip(echo.ids[1:], lps)]  # fmt: skip
        self.logprobs += out
        return out

    def _entries(self, item: Any, n: int) -> list[LogprobEntry] | None:
        """The log-probabilities of the first ``n`` tokens of an event (those in the output)."""
        if self.logprobs is None or not n:
            return None
        lps = getattr(item, "logprobs", None) or []
        tops = getattr(item, "top_logprobs", None) or [[] for _ in lps]
        out = [(t, float(lp), [(a, float(b)) for a, b in top])
               for t, lp, top in zip(item.tokens[:n], lps, tops)]  # fmt: skip
        self.logprobs += out
        return out

    def _timing(self, n: int, at: float) -> None:
        """Time to first token, then one inter-token gap per delivery of tokens (a step's), from
        when the steps ended (``at``: the engine's clock)."""
        if not n:
            return
        if self._last is None:
            self.metrics.ttft.observe(max(at - self.stream.submitted_at, 0.0))
            self._first = at
        else:
            self.metrics.itl.observe(at - self._last)
        self._last = at
        self._tokens += n

    def usage(self) -> dict[str, Any]:
        return usage_body(
            self.stream.prompt_tokens, self.detok.tokens_used, self.forwards, self.cached
        )

    def _abort(self) -> None:
        """Abort the request in the engine — unless the engine's last event for it has reached
        the loop already (then it holds no place, and its id may name a new request by now: an
        abort by that id would end the new one)."""
        if self.stream.held:
            self.worker.abort(self.stream.request_id)

    def close(self, endpoint: str) -> None:
        """Account for the request; abort it in the engine if it did not finish."""
        if self.finish_reason is None:
            self._abort()
            self.finish_reason = "abort"
        self.worker.release(self.stream)  # (if the engine's last event has not already)
        m = self.metrics
        m.requests.labels(endpoint=endpoint, finish_reason=self.finish_reason).inc()
        e2e = time.monotonic() - self.stream.submitted_at
        m.e2e.observe(e2e)
        m.request_prompt.observe(self.stream.prompt_tokens)
        m.request_generation.observe(self.detok.tokens_used)
        if self.max_tokens:
            m.max_tokens.observe(self.max_tokens)
        if self._last is not None:  # (vLLM's phases, for a request that made a token)
            m.tpot.observe((self._last - self._first) / max(self._tokens - 1, 1))
            m.phases["decode"].observe(self._last - self._first)
            if self._admitted is not None:
                m.phases["prefill"].observe(self._first - self._admitted)
                m.phases["inference"].observe(self._last - self._admitted)
                if self._queued is not None:
                    m.phases["queue"].observe(self._admitted - self._queued)
        if self.parent is not None:
            self.parent.ended(self.detok.tokens_used)
        if self.forwards:
            m.tpf.observe(self.detok.tokens_used / self.forwards)
        if request_log.isEnabledFor(logging.INFO):
            self._log(endpoint, e2e)

    def _log(self, endpoint: str, e2e: float) -> None:
        """The request's line in the request log: its counts and times, no text."""
        use = self.usage()
        first = self._first - self.stream.submitted_at
        request_log.info(
            "%s %s %s prompt=%d cached=%d generated=%d forwards=%d tpf=%.2f ttft=%s e2e=%.0fms",
            self.stream.request_id, endpoint, self.finish_reason, use["prompt_tokens"],
            use["prompt_tokens_details"]["cached_tokens"], use["completion_tokens"],
            use["forwards"], use["tpf"], "-" if self._last is None else f"{first * 1e3:.0f}ms",
            e2e * 1e3,
        )  # fmt: skip


class Parent:
    """The ``n`` choices of one prompt: once all ended, its ``n`` and its longest choice's tokens
    are counted (vLLM's ``request_params_n`` / ``request_max_num_generation_tokens``)."""

    def __init__(self, metrics: ServerMetrics, n: int) -> None:
        self.metrics, self.n, self.left, self.longest = metrics, n, n, 0

    def ended(self, tokens: int) -> None:
        self.left -= 1
        self.longest = max(self.longest, tokens)
        if self.left == 0:
            self.metrics.n.observe(self.n)
            self.metrics.longest.observe(self.longest)


def text_reader(
    tokenizer: Any,
    reasoning: ReasoningParser | None,
    s: protocol.Sampling,
    prompt: list[int],
    eos: Collection[int],
    spelled: Mapping[int, str] | None = None,
) -> Detokenizer | ReasoningText:
    """What turns one choice's tokens into text: the reasoning apart from the answer (a chat on
    a server with a reasoning parser), else the text whole; ``s``: the request's stop strings,
    ``min_tokens``, ``include_stop_str_in_output`` and ``skip_special_tokens``; ``eos``: the
    tokens counted but never spelled; ``spelled``: special tokens the answer writes out (a tool
    parser's markers)."""
    how = {
        "min_tokens": s.params["min_tokens"],
        "include_stop": s.include_stop,
        "skip_special": s.skip_special,
    }
    if reasoning is not None:
        return ReasoningText(tokenizer, reasoning, s.stop, prompt, eos, spelled, **how)
    return Detokenizer(tokenizer, s.stop, prompt=prompt, eos_ids=eos, spelled=spelled, **how)


def encode_prompts(
    tokenizer: Any, given: list[str | list[int]], add_special: bool = True
) -> list[list[int]]:
    """Each completion prompt's token ids (texts with the tokenizer's special tokens unless
    ``add_special`` is false); a bad one is an ``APIError`` that says which."""
    out = []
    for n, prompt in enumerate(given):
        try:
            out.append(completion_ids(tokenizer, prompt, add_special))
        except APIError as exc:
            if len(given) > 1:
                exc.message = f"prompt[{n}]: {exc.message}"
                exc.args = (exc.message,)
            raise
    return out


def prompt_texts(
    tokenizer: Any,
    given: list[str | list[int]],
    prompts: list[list[int]],
    skip_special: bool = True,
) -> list[str]:
    """Each prompt's text: as given, or its token ids decoded (special tokens left out unless
    ``skip_special`` is False)."""
    return [p if isinstance(p, str) else tokenizer.decode(ids, skip_special_tokens=skip_special)
            for p, ids in zip(given, prompts)]  # fmt: skip


def usage(gens: list[Generation], n: int = 1) -> dict[str, Any]:
    """The usage of a request's choices together (``n`` per prompt, whose prompt counts once, as
    vLLM counts it; TPF: their tokens over their forwards)."""
    uses = [gen.usage() for gen in gens]
    prompt = sum(u["prompt_tokens"] for u in uses[::n])
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in uses[::n])
    made, forwards = (sum(u[k] for u in uses) for k in ("completion_tokens", "forwards"))
    return usage_body(prompt, made, forwards, cached)


async def events(
    gens: list[Generation], shapes: list[Shape], s: protocol.Sampling
) -> AsyncIterator[str]:
    """The server-sent events of one streamed request, its choices' chunks as they come."""
    out: asyncio.Queue = asyncio.Queue()  # (choice, chunk text) | (choice, None): it ended

    def so_far(n: int) -> dict[str, Any] | None:  # vLLM's continuous_usage_stats: every chunk's
        return gens[n].usage() if s.continuous_usage else None

    async def run(n: int) -> None:
        gen, shape = gens[n], shapes[n]
        if shape.chat:
            await out.put((n, shape.chunk("", role=True, use=so_far(n))))
        try:
            async for text, entries, reasoning, calls in gen.deltas():
                if reasoning and not (shape.show_reasoning or text or calls or entries):
                    continue  # (include_reasoning: false: nothing left to send; its ids follow)
                await out.put((n, shape.chunk(text, logprobs=entries, reasoning=reasoning,
                                              tool_calls=calls, use=so_far(n),
                                              token_ids=gen.take_ids())))  # fmt: skip
        except APIError as exc:  # the engine failed mid-stream: say so in the stream, then end it
            await out.put((n, exc))
        except Exception as exc:  # a bug: the stream still ends, with the error in it
            await out.put((n, APIError(f"internal error: {type(exc).__name__}: {exc}",
                                       status=500, type="server_error")))  # fmt: skip
        await out.put((n, None))

    tasks = [asyncio.ensure_future(run(n)) for n in range(len(gens))]
    try:
        open_ = len(gens)
        while open_:
            n, item = await out.get()
            if isinstance(item, APIError):  # (then [DONE], as vLLM ends such a stream)
                yield f"data: {json.dumps(item.body())}\n\n"
                yield DONE
                return
            if item is not None:
                yield item
                continue
            open_ -= 1  # choice n ended: its last chunk (the usage once: in the last one ended,
            # or in its own chunk when asked for, as OpenAI's; continuous: the choice's own)
            last = usage(gens, s.n) if not open_ and not s.include_usage else so_far(n)
            yield shapes[n].chunk(None if shapes[n].chat else "", gens[n].finish_reason, last,
                                  token_ids=gens[n].take_ids(),
                                  stop_reason=gens[n].stop_reason)  # fmt: skip
        if s.include_usage:
            yield shapes[0].usage_chunk(usage(gens, s.n))
        yield DONE
    finally:
        for task in tasks:
            task.cancel()
