"""The FastAPI application: OpenAI routes that translate requests into scheduler requests and
scheduler events into responses. No model code lives here; the ``Worker`` owns the model.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``),
``GET /v1/models``, ``GET /health`` (503 while draining or after an engine failure) and
``GET /metrics`` (Prometheus text). With an API key every ``/v1`` route needs
``Authorization: Bearer KEY`` (401 otherwise); ``/health`` and ``/metrics`` stay open, as in vLLM.

A request is checked before it touches the engine: body size and JSON, fields (``protocol``),
model name (404), prompt + ``max_tokens`` against the context (400), then capacity — when the
requests in flight already fill the batch and ``max_queue`` waiting places, the answer is 429 with
``Retry-After``. A client that disconnects (streaming or not) has its request aborted, which frees
its slot before the scheduler's next step.

Prompts are tokenized (and chat templates rendered) on one thread beside the event loop, as vLLM
does: a long text (a 4 MiB body tokenizes for seconds) never stalls the other requests' streams,
and one thread keeps a flood of them to one core, away from the engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluid_npu.errors import FluidError
from fluid_npu.sampling.detok import Detokenizer
from fluid_npu.sampling.rules import SamplingParams
from fluid_npu.serve import protocol
from fluid_npu.serve.metrics import ServerMetrics
from fluid_npu.serve.protocol import APIError
from fluid_npu.serve.responses import DONE, LogprobEntry, Shape, usage
from fluid_npu.serve.text import TokenText, chat_ids, completion_ids
from fluid_npu.serve.worker import Stream, Worker

MAX_BODY_BYTES = 4 << 20
RETRY_AFTER_S = 1


@dataclass
class ServeConfig:
    model_name: str
    max_len: int  # prompt + new tokens, per request
    max_batch: int
    max_queue: int | None = None  # waiting places beyond the batch; None: unbounded
    api_key: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # shown by /health: policy, device, ...
    # what a request that leaves temperature / top_p / top_k / min_p out gets
    defaults: protocol.SamplingDefaults = field(default_factory=protocol.SamplingDefaults)


# a request whose numbers came out NaN / inf (the engine ends it, the others go on)
NUMERIC_FAILURE = (
    "the model's activations overflowed to NaN or inf on this request's tokens, so nothing more "
    "could be decoded (float16 overflows where bfloat16 does not: serve with --dtype bfloat16)"
)


class _Generation:
    """One admitted request: reads its events, detokenizes, applies stop strings, counts."""

    def __init__(
        self,
        worker: Worker,
        metrics: ServerMetrics,
        stream: Stream,
        detok: Detokenizer,
        logprobs: bool = False,
    ) -> None:
        self.worker, self.metrics, self.stream, self.detok = worker, metrics, stream, detok
        self.finish_reason: str | None = None
        self.forwards = 0
        self.logprobs: list[LogprobEntry] | None = [] if logprobs else None
        self._last: float | None = None  # when tokens last arrived ...
        self._first = 0.0  # ... and first
        self._tokens = 0  # tokens delivered

    async def deltas(self) -> AsyncIterator[tuple[str, list[LogprobEntry] | None]]:
        """Text deltas and their tokens' log-probabilities until the request ends
        (``finish_reason`` is then set)."""
        while self.finish_reason is None:
            item = await self.stream.queue.get()
            if isinstance(item, BaseException):
                self.finish_reason = "error"
                raise APIError(f"the engine failed: {item}", status=500, type="server_error")
            self._timing(len(item.tokens))
            self.forwards = item.forwards
            used = self.detok.tokens_used
            text = self.detok.add(item.tokens)
            entries = self._entries(item, self.detok.tokens_used - used)
            if self.detok.stopped:
                self.finish_reason = "stop"
                if not item.finished:
                    self.worker.abort(self.stream.request_id)
            elif item.finished and item.finish_reason == "error":
                self.finish_reason = "error"
                raise APIError(NUMERIC_FAILURE, status=500, type="server_error")
            elif item.finished:
                self.finish_reason = item.finish_reason or "stop"
                text += self.detok.flush()
            if text or entries:
                yield text, entries

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

    def _timing(self, n: int) -> None:
        """Time to first token, then one inter-token gap per delivery of tokens (a step's)."""
        if not n:
            return
        now = time.monotonic()
        if self._last is None:
            self.metrics.ttft.observe(now - self.stream.submitted_at)
            self._first = now
        else:
            self.metrics.itl.observe(now - self._last)
        self._last = now
        self._tokens += n

    def usage(self) -> dict[str, Any]:
        return usage(self.stream.prompt_tokens, self.detok.tokens_used, self.forwards)

    def close(self, endpoint: str) -> None:
        """Account for the request; abort it in the engine if it did not finish."""
        if self.finish_reason is None:
            self.worker.abort(self.stream.request_id)
            self.finish_reason = "abort"
        self.worker.finished()
        m = self.metrics
        m.requests.labels(endpoint=endpoint, finish_reason=self.finish_reason).inc()
        m.e2e.observe(time.monotonic() - self.stream.submitted_at)
        if self._tokens >= 2 and self._last is not None:
            m.tpot.observe((self._last - self._first) / (self._tokens - 1))
        if self.forwards:
            m.tpf.observe(self.detok.tokens_used / self.forwards)


class _ClosingStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (done, disconnect, cancel)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _read_json(request: Request) -> Any:
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise APIError(f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"the request body is not valid JSON ({exc})") from None
    except RecursionError:  # json.loads recurses once per level of nesting
        raise APIError("the request body nests too deeply to be a request") from None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(worker: Worker, tokenizer: Any, config: ServeConfig) -> FastAPI:
    """The server's ASGI application around a (not yet started) ``Worker``."""
    metrics = ServerMetrics(config.model_name)
    worker.on_step, worker.on_failure = metrics.on_step, metrics.on_failure
    words = TokenText(tokenizer)  # log-probability tokens' text and bytes
    # prompts are tokenized here, off the event loop (the module docstring); the thread starts
    # with the first request
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fluid-tokenize")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start(asyncio.get_running_loop())
        banner = getattr(app.state, "banner", None)
        if banner:
            print(banner, file=sys.stderr, flush=True)
        yield
        worker.stop()
        tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="fluid serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        endpoint = request.url.path
        if endpoint in ("/v1/completions", "/v1/chat/completions"):
            metrics.refused(endpoint, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # routing errors (404 unknown path, 405 wrong method) in the OpenAI shape too
        body = protocol.error_body(
            f"{exc.detail}: {request.method} {request.url.path}", "invalid_request_error"
        )
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        body = protocol.error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compared as bytes (compare_digest refuses non-ASCII str): the header's raw bytes (ASGI
        # servers hand them over decoded as latin-1) against the key's UTF-8
        key, given_key = config.api_key.encode(), token.strip().encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_key, key):
            raise APIError(
                "a valid API key is required: send 'Authorization: Bearer KEY'",
                status=401,
                code="invalid_api_key",
            )

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise APIError(
                f"the model {name!r} is not served here; this server serves {config.model_name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )

    def check_length(prompt: list[int], sampling: protocol.Sampling, param: str) -> int:
        room = config.max_len - len(prompt)
        if room < 1:
            raise APIError(
                f"the prompt has {len(prompt)} tokens; this server's context holds "
                f"{config.max_len} tokens including the completion",
                param=param,
            )
        if sampling.max_tokens is None:
            return room
        if sampling.max_tokens > room:
            name = sampling.max_tokens_field
            raise APIError(
                f"{name}={sampling.max_tokens} with a {len(prompt)}-token prompt exceeds the "
                f"context of {config.max_len} tokens; ask for at most {room}",
                param=name,
            )
        return sampling.max_tokens

    def check_capacity() -> None:
        if config.max_queue is None:
            return
        if worker.outstanding >= config.max_batch + config.max_queue:
            raise APIError(
                f"the server is at capacity ({config.max_batch} running, {config.max_queue} "
                "queued); retry later",
                status=429,
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    async def generate(
        request: Request,
        endpoint: str,
        shape: Shape,
        ids: list[int],
        s: protocol.Sampling,
        arrived: float,
    ) -> Response:
        max_new = check_length(ids, s, "messages" if shape.chat else "prompt")
        try:
            params = SamplingParams(**config.defaults.fill(s.params))
        except FluidError as exc:  # the engine's own check, beyond what protocol.py checks
            raise APIError(str(exc)) from None
        check_capacity()
        stream = await worker.submit(
            shape.id,
            ids,
            max_new_tokens=max_new,
            eos_ids=[] if s.ignore_eos else None,
            sampling=params,
            stop=tuple(s.stop),
            arrived=arrived,
        )
        metrics.prompt_tokens.inc(len(ids))
        eos = [] if s.ignore_eos else worker.scheduler.eos_ids  # (the request's: it ends there)
        detok = Detokenizer(tokenizer, s.stop, prompt=ids, eos_ids=eos)
        if detok.spelled_context:  # the output's leading space is kept: offsets count it
            shape.strip = 0
        gen = _Generation(worker, metrics, stream, detok, s.params["logprobs"])
        if s.stream:
            return _ClosingStream(_events(gen, shape, s), lambda: gen.close(endpoint))
        pieces: list[str] = []

        async def collect() -> None:
            async for text, _ in gen.deltas():
                pieces.append(text)

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
            gen.close(endpoint)
        if not work.done() or work.cancelled():  # the client is gone: nobody reads an answer
            return Response(status_code=499)
        try:
            work.result()  # an engine failure raises its APIError here
        except APIError as exc:  # counted once, by close (finish_reason "error"), not as a refusal
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        answer = shape.full("".join(pieces), gen.finish_reason, gen.usage(), gen.logprobs)
        return JSONResponse(answer)

    async def answer(request: Request, chat: bool) -> Response:
        arrived = time.monotonic()
        authorize(request)
        body = await _read_json(request)
        req = protocol.parse_chat(body) if chat else protocol.parse_completion(body)
        check_model(req.sampling.model)
        loop = asyncio.get_running_loop()
        if isinstance(req, protocol.ChatRequest):
            ids = await loop.run_in_executor(tokenizing, chat_ids, tokenizer, req.messages)
            shape = Shape(True, f"chatcmpl-{uuid.uuid4().hex}", config.model_name, words)
        else:
            ids = await loop.run_in_executor(tokenizing, completion_ids, tokenizer, req.prompt)
            shape = Shape(False, f"cmpl-{uuid.uuid4().hex}", config.model_name, words)
        return await generate(request, request.url.path, shape, ids, req.sampling, arrived)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await answer(request, chat=True)

    card = {
        "id": config.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "fluid-npu",
        "max_model_len": config.max_len,
    }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict[str, Any]:
        authorize(request)
        check_model(model)
        return card

    @app.get("/health")
    async def health() -> JSONResponse:
        if not worker.alive:
            return JSONResponse({"status": "engine failed", "error": str(worker.error)}, 503)
        if worker.draining:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ok", "model": config.model_name, "info": config.info})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _events(gen: _Generation, shape: Shape, s: protocol.Sampling) -> AsyncIterator[str]:
    """The server-sent events of one streamed request."""
    if shape.chat:
        yield shape.chunk("", role=True)
    try:
        async for text, entries in gen.deltas():
            yield shape.chunk(text, logprobs=entries)
    except APIError as exc:  # the engine failed mid-stream: say so in the stream, then end it
        yield f"data: {json.dumps(exc.body())}\n\n"
        return
    use = gen.usage()  # once: in its own chunk when asked for (OpenAI's), else in the last one
    last = None if s.include_usage else use
    yield shape.chunk(None if shape.chat else "", gen.finish_reason, last)
    if s.include_usage:
        yield shape.usage_chunk(use)
    yield DONE
