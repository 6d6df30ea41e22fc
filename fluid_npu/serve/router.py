"""``fluid serve --data-parallel-size N``: one address in front of N engine ranks.

Each rank is a whole ``fluid serve`` process (its own engine, KV cache and prefix cache) on its own
accelerator — ``ASCEND_RT_VISIBLE_DEVICES`` / ``CUDA_VISIBLE_DEVICES`` name one device per rank,
taken in order from those already visible — or, on a CPU, on its share of the cores. The ranks
listen on 127.0.0.1 behind a key of their own; the front process answers the clients (its own
``--host`` / ``--port`` / ``--api-key``) and relays each request whole to one rank, streaming
included, so every answer is exactly what that rank gives alone (vLLM's ``--data-parallel-size``,
with processes, as vLLM runs its engine cores).

Routing (``Router``): a request goes to the rank whose recent requests share the longest start
with it — a conversation's next turn to the rank whose slots still hold the turn before it, a
shared system prompt to a rank that has it — when that start is at least ``MIN_SHARED`` characters
and the rank is not ``slack`` (its ``--max-batch``) requests busier than the least busy one;
otherwise to the least busy rank. A rank that answers 429 (its queue full) or cannot be reached
passes the request to the next one; the client sees 429 only when every rank is full.

``/health`` is 200 while every rank is (its ``info`` lists them), 503 otherwise; ``/metrics`` is
every rank's metrics with a ``rank`` label, and the router's own (``fluid_dp_requests_total`` by
rank and whether affinity chose it); ``/v1/models`` and the tokenizer routes are answered by a live
rank. SIGTERM drains: the front stops accepting, each rank finishes its requests (their answers
still relayed) and exits, then the front exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fluid_npu.serve.errors import APIError, error_body

MIN_SHARED = 64  # characters a request must share with a rank's recent ones to follow them
KEY_CHARS = 8192  # of a request's text compared (a longer shared start says nothing more)
RECENT = 256  # requests remembered per rank
RELAYED = ("content-type", "retry-after")  # a rank's response headers the client gets


def shared_start(a: str, b: str) -> int:
    """The length of the longest common prefix of ``a`` and ``b`` (slices compared in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def routing_key(path: str, body: Any) -> str:
    """The text a request's prompt starts with, as far as routing compares it: a chat's tools
    and messages (a next turn extends the previous turn's), a completion's prompt."""
    if not isinstance(body, dict):
        return ""
    if path.endswith("/chat/completions"):
        given = [body.get("tools"), body.get("messages")]
    else:
        prompt = body.get("prompt")
        given = prompt[0] if isinstance(prompt, list) and prompt and not isinstance(
            prompt[0], int) else prompt  # fmt: skip
    try:
        text = given if isinstance(given, str) else json.dumps(given, ensure_ascii=False)
    except (TypeError, ValueError):
        return ""
    return text[:KEY_CHARS]


class Router:
    """Which rank takes a request (the module docstring); counts requests in flight per rank."""

    def __init__(self, ranks: int, slack: int) -> None:
        self.slack = slack
        self.busy = [0] * ranks  # requests in flight
        self.routed = [0] * ranks  # requests sent so far (ties go to the one sent fewer)
        self.recent: list[deque[str]] = [deque(maxlen=RECENT) for _ in range(ranks)]

    def pick(self, key: str, skip: set[int] = frozenset()) -> tuple[int, bool] | None:
        """The rank for a request (and whether its shared start chose it); None: no rank left."""
        ranks = [r for r in range(len(self.busy)) if r not in skip]
        if not ranks:
            return None
        least = min(self.busy[r] for r in ranks)
        best, longest = None, MIN_SHARED - 1
        if len(key) >= MIN_SHARED:
            for r in ranks:
                if self.busy[r] > least + self.slack:
                    continue
                shared = max((shared_start(key, k) for k in self.recent[r]), default=0)
                if shared > longest:
                    best, longest = r, shared
        if best is not None:
            return best, True
        return min(ranks, key=lambda r: (self.busy[r], self.routed[r])), False

    def start(self, rank: int, key: str) -> None:
        self.busy[rank] += 1
        self.routed[rank] += 1
        if key:
            self.recent[rank].append(key)

    def end(self, rank: int) -> None:
        self.busy[rank] -= 1


def merge_metrics(texts: list[str]) -> bytes:
    """The ranks' Prometheus texts as one, each sample labelled with its ``rank``."""
    families: dict[str, Metric] = {}
    for rank, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            merged.samples += [
                Sample(s.name, {**s.labels, "rank": str(rank)}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            ]

    class Ranks:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry()
    registry.register(Ranks())  # type: ignore[arg-type]
    return generate_latest(registry)


@dataclass
class Front:
    """What the front app needs: the ranks' URLs and key, the router, the client-facing key."""

    urls: list[str]
    rank_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    api_key: str | None = None
    slack: int = 8
    alive: Callable[[int], bool] = lambda rank: True  # whether a rank's process still runs
    draining: threading.Event = field(default_factory=threading.Event)


def create_front(front: Front) -> FastAPI:
    """The ASGI app in front of the ranks."""
    from fluid_npu.serve.http import ClosingStream, check_key, read_body, while_connected

    router = Router(len(front.urls), front.slack)
    registry = CollectorRegistry()
    routed = Counter(
        "fluid_dp_requests",
        "Requests relayed to a rank, and whether a shared start chose it",
        ["rank", "affinity"],
        registry=registry,
    )
    inner = {"authorization": f"Bearer {front.rank_key}"}
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), headers=inner)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="fluid serve (data parallel)", lifespan=lifespan, docs_url=None,
                  redoc_url=None)  # fmt: skip
    app.state.router = router

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def authorize(request: Request) -> None:
        check_key(request.headers.get("authorization", ""), front.api_key)

    def answer(resp: httpx.Response, content: bytes) -> Response:
        headers = {k: v for k, v in resp.headers.items() if k.lower() in RELAYED}
        return Response(content, status_code=resp.status_code, headers=headers)

    async def relay(request: Request) -> Response:
        """A generation request to its rank, the answer back as the rank gives it."""
        authorize(request)
        if front.draining.is_set():
            raise APIError("the server is shutting down", status=503, type="server_error")
        raw = await read_body(request)
        try:
            key = routing_key(request.url.path, json.loads(raw))
        except (ValueError, RecursionError):
            key = ""  # (the rank answers the malformed body)
        tried: set[int] = set()
        while True:
            picked = router.pick(key, tried | {r for r in range(len(front.urls))
                                               if not front.alive(r)})  # fmt: skip
            if picked is None:
                raise APIError(
                    "every engine rank is at capacity or down; retry later", status=429 if tried
                    else 503, type="rate_limit_error" if tried else "server_error",
                    headers={"Retry-After": "1"})  # fmt: skip
            rank, affine = picked
            sent = client.build_request("POST", front.urls[rank] + request.url.path, content=raw,
                                        headers={"content-type": "application/json"})  # fmt: skip
            router.start(rank, key)
            # a whole answer's headers come only with it: the client may leave while it waits
            sending = asyncio.ensure_future(client.send(sent, stream=True))
            try:
                if not await while_connected(request, sending):
                    router.end(rank)  # (the send cancelled: the rank sees its connection close)
                    return Response(status_code=499)
                resp = sending.result()
            except httpx.TransportError:
                router.end(rank)
                tried.add(rank)
                continue
            if resp.status_code == 429:
                await resp.aclose()
                router.end(rank)
                tried.add(rank)
                continue
            routed.labels(rank=str(rank), affinity=str(affine).lower()).inc()
            if resp.headers.get("content-type", "").startswith("text/event-stream"):
                return ClosingStream(_chunks(resp), lambda r=rank, s=resp: _closed(r, s))
            work = asyncio.ensure_future(resp.aread())
            try:  # (a client that leaves: the rank sees its connection close, and aborts)
                finished = await while_connected(request, work)
            finally:
                await resp.aclose()
                router.end(rank)
            return answer(resp, work.result()) if finished else Response(status_code=499)

    closing: set[asyncio.Future] = set()

    async def _chunks(resp: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        finally:  # (a client that left: the rank sees its stream close, and aborts)
            await resp.aclose()

    def _closed(rank: int, resp: httpx.Response) -> None:
        router.end(rank)
        if not resp.is_closed:  # a client gone before the first chunk
            task = asyncio.ensure_future(resp.aclose())
            closing.add(task)
            task.add_done_callback(closing.discard)

    app.post("/v1/completions")(relay)
    app.post("/v1/chat/completions")(relay)

    async def forward(request: Request, method: str) -> Response:
        """A request any rank answers alike (models, tokenizer routes): the first live one."""
        authorize(request)
        raw = await read_body(request) if method == "POST" else None
        headers = {"content-type": "application/json"}
        for rank, base in enumerate(front.urls):
            if not front.alive(rank):
                continue
            try:
                resp = await client.request(method, base + request.url.path, content=raw,
                                            headers=headers)  # fmt: skip
            except httpx.TransportError:
                continue
            return answer(resp, resp.content)
        raise APIError("no engine rank is up", status=503, type="server_error")

    async def forward_get(request: Request) -> Response:
        return await forward(request, "GET")

    async def forward_post(request: Request) -> Response:
        return await forward(request, "POST")

    for path in ("/v1/models", "/v1/models/{model:path}", "/tokenizer_info"):
        app.get(path)(forward_get)
    for path in ("/tokenize", "/detokenize"):
        app.post(path)(forward_post)

    async def every_rank(path: str) -> list[httpx.Response | None]:
        async def one(base: str) -> httpx.Response | None:
            try:
                return await client.get(base + path, timeout=10.0)
            except httpx.TransportError:
                return None

        return list(await asyncio.gather(*(one(base) for base in front.urls)))

    @app.get("/health")
    async def health() -> JSONResponse:
        answers = await every_rank("/health")
        ranks = [r.json() if r is not None and r.status_code in (200, 503) else {"status": "down"}
                 for r in answers]  # fmt: skip
        if front.draining.is_set():
            return JSONResponse({"status": "draining", "ranks": ranks}, 503)
        ok = all(r.get("status") == "ok" for r in ranks)
        body = {"status": "ok" if ok else "degraded", "ranks": ranks}
        if ok:
            info = {**ranks[0].get("info", {}), "data_parallel_size": len(ranks)}
            body.update(model=ranks[0].get("model"), info=info)
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        texts = [r.text if r is not None and r.status_code == 200 else ""
                 for r in await every_rank("/metrics")]  # fmt: skip
        return Response(merge_metrics(texts) + generate_latest(registry),
                        media_type=CONTENT_TYPE_LATEST)  # fmt: skip

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        body = error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(body, status_code=500)

    return app
