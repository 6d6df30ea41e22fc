"""The OpenAI Responses API's answers: the response object and its stream of events, built from
one chat generation's deltas (``generation.Generation.deltas``).

``ResponseOutput`` keeps a response's ``output`` items as the deltas come: a ``reasoning`` item
(``--reasoning-parser``: the reasoning's text as one ``reasoning_text`` part; no summary), a
``message`` with one ``output_text`` part (the answer before any call, with its tokens'
``logprobs`` when asked for — not the reasoning's), and one ``function_call`` item per call.
Each step returns the stream events that the OpenAI client's ``responses.stream`` accumulates,
so a streamed and a non-streamed answer come from the same code and add up to the same output:

``response.created``, ``response.in_progress``; per item ``response.output_item.added``, its
part's ``response.content_part.added``, the deltas (``response.reasoning_text.delta``,
``response.output_text.delta`` with its ``logprobs``, ``response.function_call_arguments.delta``),
their ``.done`` events, ``response.content_part.done`` and ``response.output_item.done``; last
``response.completed``, or ``response.incomplete`` (``incomplete_details.reason``
``max_output_tokens``) when the limit cut the answer, or ``response.failed`` with the error when
the engine failed on the request or the server stopped it (its drain's deadline). Events are
numbered by ``sequence_number`` from 0 and sent as ``event: TYPE`` / ``data: JSON``, as the
OpenAI API sends them (no ``[DONE]``).

``usage``: ``input_tokens`` (``cached_tokens``: found in a slot's cache), ``output_tokens``
(``reasoning_tokens`` among them: the reasoning with its markers), ``total_tokens``, and the
request's ``forwards`` / ``tpf`` as on the other routes.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fluid_npu.serve.errors import APIError
from fluid_npu.serve.generation import Delta, Generation
from fluid_npu.serve.http import ClosingStream, answered, while_connected
from fluid_npu.serve.responses import LogprobEntry, Shape

Event = dict[str, Any]


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_usage(use: dict[str, Any], reasoning_tokens: int) -> dict[str, Any]:
    """A generation's usage (``responses.usage``) in the Responses API's names."""
    return {
        "input_tokens": use["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": use["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": use["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": use["total_tokens"],
        "forwards": use["forwards"],
        "tpf": use["tpf"],
    }


class ResponseOutput:
    """One response: its object (``response()``) and the events that build it (module docstring).
    ``shape``: the request's chat shape, which writes log-probabilities (the Responses API's
    entries are chat's); ``settings``: the request's, as the object repeats them."""

    def __init__(self, rid: str, model: str, settings: dict[str, Any], shape: Shape) -> None:
        self.id, self.model, self.settings, self.shape = rid, model, settings, shape
        self.created = int(time.time())
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item text goes to now (reasoning, message)
        self.seq = 0
        self.status = "in_progress"
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self.completed: int | None = None  # when it completed
        # the answer's tokens' log-probabilities whose text has not come yet (held back by the
        # detokenizer, or a tool call's markup: dropped when the calls come), and the bytes of
        # the message's text against those of the tokens whose entries it holds
        self.pending: list[LogprobEntry] = []
        self.written = self.covered = 0

    def response(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "completed_at": self.completed,
            "status": self.status,
            "model": self.model,
            "output": copy.deepcopy(self.items),
            "usage": self.usage,
            "error": self.error,
            "incomplete_details": self.incomplete,
            **self.settings,
        }

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def start(self) -> list[Event]:
        return [self._event(kind, response=self.response())
                for kind in ("response.created", "response.in_progress")]  # fmt: skip

    def add(
        self,
        text: str,
        entries: list[LogprobEntry] | None = None,
        reasoning: str = "",
        calls: list[dict[str, Any]] | None = None,
    ) -> list[Event]:
        """The events of one delivery: reasoning text, answer text (``entries``: the answer's
        tokens' log-probabilities, which join the message with its next text), the answer's
        tool calls."""
        events = self._write("reasoning", reasoning, None) if reasoning else []
        self.pending += entries or ()
        if text:
            self.written += len(text.encode())
            events += self._write("message", text, self._spelled())
        if calls:
            self.pending = []  # (the calls' own tokens)
        for call in calls or ():
            events += self._close("completed") + self._call(call)
        return events

    def _spelled(self) -> list[LogprobEntry]:
        """The pending entries of the tokens the message's text has reached (a token that starts
        before its end; a decoder's dropped leading spaces allowed for): a step may commit the
        answer's last text with the first tokens of a call's markup, which stay pending."""
        words = self.shape.tokens
        out = []
        while self.pending and (words is None or self.covered < self.written + words.strip_start):
            tok = self.pending[0][0]
            if words is not None and tok not in words.special:
                self.covered += len(words.bytes(tok))
            out.append(self.pending.pop(0))
        return out

    def _write(self, kind: str, text: str, entries: list[LogprobEntry] | None) -> list[Event]:
        events = []
        if self.open is None or self.open["type"] != kind:
            events += self._close("completed") + self._begin(kind)
        item, at = self.open, len(self.items) - 1
        assert item is not None
        part = item["content"][0]
        part["text"] += text
        if kind == "reasoning":
            events.append(self._event("response.reasoning_text.delta", item_id=item["id"],
                                      output_index=at, content_index=0, delta=text))  # fmt: skip
            return events
        logprobs = (self.shape.logprobs(entries) or {}).get("content", []) if entries else []
        part["logprobs"] += logprobs
        events.append(self._event("response.output_text.delta", item_id=item["id"],
                                  output_index=at, content_index=0, delta=text,
                                  logprobs=logprobs))  # fmt: skip
        return events

    def _begin(self, kind: str) -> list[Event]:
        if kind == "reasoning":
            item = {"type": "reasoning", "id": _id("rs"), "summary": [], "content": [],
                    "status": "in_progress"}  # fmt: skip
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            item = {"type": "message", "id": _id("msg"), "role": "assistant",
                    "status": "in_progress", "content": []}  # fmt: skip
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.items.append(item)
        self.open, at = item, len(self.items) - 1
        added = self._event("response.output_item.added", output_index=at,
                            item=copy.deepcopy(item))  # fmt: skip
        item["content"].append(part)
        return [added, self._event("response.content_part.added", item_id=item["id"],
                                   output_index=at, content_index=0,
                                   part=copy.deepcopy(part))]  # fmt: skip

    def _close(self, status: str) -> list[Event]:
        item, self.open = self.open, None
        if item is None:
            return []
        at, part = len(self.items) - 1, item["content"][0]
        if item["type"] == "reasoning":
            done = self._event("response.reasoning_text.done", item_id=item["id"],
                               output_index=at, content_index=0, text=part["text"])  # fmt: skip
        else:
            done = self._event("response.output_text.done", item_id=item["id"], output_index=at,
                               content_index=0, text=part["text"],
                               logprobs=copy.deepcopy(part["logprobs"]))  # fmt: skip
        item["status"] = status
        return [done,
                self._event("response.content_part.done", item_id=item["id"], output_index=at,
                            content_index=0, part=copy.deepcopy(part)),
                self._event("response.output_item.done", output_index=at,
                            item=copy.deepcopy(item))]  # fmt: skip

    def _call(self, call: dict[str, Any]) -> list[Event]:
        fn = call["function"]
        item = {"type": "function_call", "id": _id("fc"), "call_id": call["id"],
                "name": fn["name"], "arguments": "", "status": "in_progress"}  # fmt: skip
        self.items.append(item)
        at = len(self.items) - 1
        events = [self._event("response.output_item.added", output_index=at,
                              item=copy.deepcopy(item)),
                  self._event("response.function_call_arguments.delta", item_id=item["id"],
                              output_index=at, delta=fn["arguments"])]  # fmt: skip
        item.update(arguments=fn["arguments"], status="completed")
        return [
            *events,
            self._event("response.function_call_arguments.done", item_id=item["id"],
                        output_index=at, name=fn["name"], arguments=fn["arguments"]),
            self._event("response.output_item.done", output_index=at, item=copy.deepcopy(item)),
        ]  # fmt: skip

    def finish(self, finish_reason: str | None, usage: dict[str, Any]) -> list[Event]:
        """The last events: the open item closed, the usage, the response's end — failed when
        the server stopped it (``abort``: the drain's deadline). The last tokens'
        log-probabilities join the message; an answer with no text (nothing decoded after the
        reasoning, or an EOS at once) still gets its empty message, unless the limit cut the
        output before it."""
        self.usage = usage
        if finish_reason == "abort":
            return self.fail(APIError("the server stopped this response before it ended (it is "
                                      "shutting down); send the request again", status=503,
                                      type="server_error"))  # fmt: skip
        cut = finish_reason == "length"
        events = []
        answered = any(item["type"] != "reasoning" for item in self.items)
        writing = self.open is not None and self.open["type"] == "message"
        if (writing and self.pending) or (not answered and (self.pending or not cut)):
            events += self._write("message", "", self.pending)  # (the rest: no call came)
        self.pending = []
        events += self._close("incomplete" if cut else "completed")
        self.status = "incomplete" if cut else "completed"
        self.incomplete = {"reason": "max_output_tokens"} if cut else None
        self.completed = None if cut else int(time.time())
        return [*events, self._event(f"response.{self.status}", response=self.response())]

    def fail(self, error: APIError) -> list[Event]:
        """The end of a response the engine failed on: ``response.failed`` with the error."""
        events = self._close("incomplete")
        self.status = "failed"
        self.error = {"code": error.code or error.type, "message": error.message}
        return [*events, self._event("response.failed", response=self.response())]


def sse_event(event: Event) -> str:
    """One server-sent event, named by its type as the OpenAI API names them."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def _usage(gen: Generation) -> dict[str, Any]:
    return response_usage(gen.usage(), getattr(gen.detok, "reasoning_tokens", 0))


async def deliveries(gen: Generation) -> AsyncIterator[Delta]:
    """A generation's deltas with the log-probabilities of the answer's tokens only (a delivery's
    first tokens may be reasoning: as many as it added to ``reasoning_tokens``)."""
    before = 0
    async for text, entries, reasoning, calls in gen.deltas():
        now = getattr(gen.detok, "reasoning_tokens", 0)
        yield text, None if entries is None else entries[now - before :], reasoning, calls
        before = now


async def _events(out: ResponseOutput, gen: Generation) -> AsyncIterator[str]:
    for event in out.start():
        yield sse_event(event)
    try:
        async for text, entries, reasoning, calls in deliveries(gen):
            for event in out.add(text, entries, reasoning, calls):
                yield sse_event(event)
    except APIError as exc:  # the engine failed mid-stream: the response fails, the stream ends
        for event in out.fail(exc):
            yield sse_event(event)
        return
    except Exception as exc:  # a bug: the stream still ends, with the error in it
        failed = APIError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                          type="server_error")  # fmt: skip
        for event in out.fail(failed):
            yield sse_event(event)
        return
    for event in out.finish(gen.finish_reason, _usage(gen)):
        yield sse_event(event)


async def answer(
    request: Request, out: ResponseOutput, gen: Generation, stream: bool, endpoint: str
) -> Response:
    """The response to one admitted request: streamed as events, or the object once it ended
    (a client gone before that: 499, the request aborted; an engine failure: its error)."""
    if stream:
        return ClosingStream(_events(out, gen), lambda: gen.close(endpoint))

    async def collect() -> None:
        async for text, entries, reasoning, calls in deliveries(gen):
            out.add(text, entries, reasoning, calls)

    work = asyncio.ensure_future(collect())
    try:
        finished = await while_connected(request, work)
    finally:
        gen.close(endpoint)
    if not finished:
        return Response(status_code=499)
    try:
        work.result()
    except APIError as exc:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def build() -> JSONResponse:
        out.finish(gen.finish_reason, _usage(gen))
        return JSONResponse(out.response())

    return await answered(build, gen.logprobs is not None)


def not_stored(rid: str) -> APIError:
    """The 404 of a route that reads, cancels or deletes a stored response."""
    return APIError(
        f"no response {rid[:80]!r} is kept here: this server keeps no responses (as vLLM without "
        "its store), so none can be fetched, listed, cancelled or deleted; a stream is the way "
        "to follow a response as it decodes",
        status=404,
        param="response_id",
        code="response_not_found",
    )


def not_kept_routes(app: FastAPI, authorize: Callable[[Request], None]) -> None:
    """The routes that would read, list, cancel or delete a stored response: each a 404 behind
    the key (a server's and the data-parallel front's alike)."""

    @app.api_route("/v1/responses/{rid}", methods=["GET", "DELETE"])
    @app.get("/v1/responses/{rid}/input_items")
    @app.post("/v1/responses/{rid}/cancel")
    async def not_kept(request: Request, rid: str) -> Response:
        authorize(request)
        raise not_stored(rid)
