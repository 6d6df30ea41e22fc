"""``fluid serve --data-parallel-size N``: one address in front of N engine ranks.

Each rank is a whole ``fluid serve`` process (its own engine, KV cache and prefix cache) on its own
accelerator — ``ASCEND_RT_VISIBLE_DEVICES`` / ``CUDA_VISIBLE_DEVICES`` name one device per rank,
taken in order from those already visible — or, on a CPU, on its share of the cores. The ranks
listen on 127.0.0.1 behind a key of their own; the front process answers the clients (its own
``--host`` / ``--port`` / ``--api-key``) and relays each request whole to one rank, streaming
included, so every answer is exactly what that rank gives alone (vLLM's ``--data-parallel-size``,
with processes, as vLLM runs its engine cores).

Routing: ``routing.py`` (the rank holding a request's start, else the least busy).

A request is sent to another rank only when it cannot have started on the first: the rank could
not be reached, answered 429 (its queue full: the client sees a 429 only when every rank's is),
or refused it because its engine had failed or it is shutting down (it is then out of the
rotation until its ``/health`` is 200 again; the front polls it every ``HEALTH_S`` seconds, and
says on stderr when a rank goes down or comes back). A rank that fails while answering ends the
request with an error: a 502, or in a stream an error event. ``/health`` is 200 while every rank
is (their answers under ``ranks``), 503 otherwise; ``/metrics`` is every rank's metrics with a
``rank`` label, and the router's own (``fluid_dp_requests_total`` by rank and whether a shared
start chose it); ``/v1/models`` and the tokenizer routes are answered by a live rank. With
``--enable-log-requests`` the front writes each request's id and rank (``routing_log``). The
front checks a request's ``X-Request-Id``, makes one where the client sent none, passes it to the
rank and keeps one running request per id across the ranks; ``GET /version`` is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fluid_npu import __version__
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.http import (
    ClosingStream,
    body_request_id,
    check_key,
    id_in_use,
    openai_errors,
    read_body,
    request_id,
    route_path,
    while_connected,
)
from fluid_npu.serve.probes import probe_routes
from fluid_npu.serve.responses_output import not_kept_routes
from fluid_npu.serve.routing import Router, routing_key, routing_salt
from fluid_npu.serve.worker import ENGINE_FAILED

routing_log = logging.getLogger("fluid_npu.serve.routing")  # --enable-log-requests: the front's
HEALTH_S = 2.0  # how often the front asks each rank's /health
RELAYED = ("content-type", "retry-after", "x-request-id")  # a rank's headers the client gets


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
    log_tail: Callable[[int], str] = lambda rank: ""  # the end of a rank's output
    draining: threading.Event = field(default_factory=threading.Event)


def create_front(front: Front) -> FastAPI:
    """The ASGI app in front of the ranks."""
    n = len(front.urls)
    router = Router(n, front.slack)
    healthy = [True] * n  # by the last /health poll (or an engine_failed refusal)
    registry = CollectorRegistry()
    routed = Counter(
        "fluid_dp_requests",
        "Requests relayed to a rank, and whether a shared start chose it",
        ["rank", "affinity"],
        registry=registry,
    )
    inner = {"authorization": f"Bearer {front.rank_key}"}
    # requests: no bound of their own on connections (each rank bounds its queue); the health and
    # metrics polls on a pool of their own, so a full one never holds them up
    # (idle connections expire before a rank's own keep-alive of 5 s closes them under a send)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=10.0), headers=inner,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64 * n,
                            keepalive_expiry=4.0))  # fmt: skip
    control = httpx.AsyncClient(timeout=10.0, headers=inner)

    def usable(rank: int) -> bool:
        return healthy[rank] and front.alive(rank)

    def mark(rank: int, ok: bool, why: str) -> None:
        changed, healthy[rank] = healthy[rank] != ok, ok
        if changed and not front.draining.is_set():  # (quiet while shutting down)
            tail = "" if ok or front.alive(rank) else f"; its output ends:\n{front.log_tail(rank)}"
            with contextlib.suppress(OSError, ValueError):  # (a closed stderr)
                print(f"fluid: rank {rank} is {'back' if ok else 'down'} ({why}){tail}",
                      file=sys.stderr, flush=True)  # fmt: skip

    async def health_of(rank: int) -> dict[str, Any]:
        if not front.alive(rank):
            return {"status": "exited"}
        try:
            resp = await control.get(front.urls[rank] + "/health")
            state = resp.json() if resp.status_code in (200, 503) else None
        except (httpx.TransportError, ValueError):
            state = None
        return state if isinstance(state, dict) else {"status": "down"}

    async def poll() -> None:
        while True:
            try:
                for rank, state in enumerate(await asyncio.gather(*map(health_of, range(n)))):
                    mark(rank, state.get("status") == "ok", str(state.get("status")))
            except Exception as exc:  # (a bug here must not stop the polling: ranks come back)
                with contextlib.suppress(OSError, ValueError):
                    print(f"fluid: polling the ranks' health failed: {exc!r}", file=sys.stderr)
            await asyncio.sleep(HEALTH_S)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        polling = asyncio.ensure_future(poll())
        try:
            yield
        finally:  # (an in-process front, run-batch's, that is cancelled closes its clients too)
            polling.cancel()
            await client.aclose()
            await control.aclose()

    app = FastAPI(title="fluid serve (data parallel)", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)  # fmt: skip
    app.state.router = router
    openai_errors(app, lambda request, exc: routing_log.info(  # (refused at the front)
        "%s %s refused: %d", route_path(request), getattr(request.state, "request_id", "-"),
        exc.status))  # fmt: skip

    def authorize(request: Request) -> None:
        check_key(request.headers.get("authorization", ""), front.api_key)

    def answer(resp: httpx.Response, content: bytes) -> Response:
        headers = {k: v for k, v in resp.headers.items() if k.lower() in RELAYED}
        return Response(content, status_code=resp.status_code, headers=headers)

    running: set[str] = set()  # the ids of the requests relayed and not yet answered

    async def relay(request: Request) -> Response:
        """A generation request to its rank, the answer back as the rank gives it."""
        authorize(request)
        if front.draining.is_set():
            raise APIError("the server is shutting down", status=503, type="server_error")
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None  # (the rank answers the malformed body)
        key, salt = routing_key(route_path(request), body), routing_salt(body)
        rid = request_id(request)  # the client's (checked here), else one made here for the rank
        given = body.get("request_id") if isinstance(body, dict) else None
        if isinstance(given, str):  # (vLLM's body field, where no header gives one)
            rid = body_request_id(request, given)
        if rid in running:  # (each rank keeps one request per id; so does the front, across them)
            raise id_in_use(rid, request.state.id_param)
        running.add(rid)
        streaming = False
        try:
            out = await _relay(request, raw, key, rid, salt)
            streaming = isinstance(out, ClosingStream)
            return out
        finally:
            if not streaming:  # (a stream lets its id go when it closes)
                running.discard(rid)

    async def _relay(
        request: Request, raw: bytes, key: str, rid: str, salt: str | None
    ) -> Response:
        tried: set[int] = set()
        full: Response | None = None  # the last 429 a rank gave
        while True:
            picked = router.pick(key, tried | {r for r in range(n) if not usable(r)}, salt)
            if picked is None:
                if full is not None:
                    routing_log.info(
                        "%s %s refused: 429 (every rank full)", route_path(request), rid
                    )
                    return full
                raise APIError("no engine rank is up; retry later", status=503,
                               type="server_error", headers={"Retry-After": "1"})  # fmt: skip
            rank, affine = picked
            tried.add(rank)
            headers = {"content-type": "application/json", "x-request-id": rid}  # (its name)
            sent = client.build_request("POST", front.urls[rank] + route_path(request), content=raw,
                                        headers=headers)  # fmt: skip
            router.start(rank)
            # a whole answer's headers come only with it: the client may leave while it waits
            sending = asyncio.ensure_future(client.send(sent, stream=True))
            try:
                if not await while_connected(request, sending):
                    router.end(rank)  # (the send cancelled: the rank sees its connection close)
                    return Response(status_code=499)
                resp = sending.result()
            except (httpx.ConnectError, httpx.ConnectTimeout):  # never delivered: the next rank
                router.end(rank)
                continue
            except httpx.TransportError as exc:  # it may have run: not sent again
                router.end(rank)
                raise _failed(rank, exc) from None
            if resp.status_code in (429, 500, 503):
                content = await resp.aread()
                await resp.aclose()
                router.end(rank)
                if resp.status_code == 429:
                    full = answer(resp, content)
                    continue
                if resp.status_code == 503:  # draining: refused before it ran
                    mark(rank, False, "it is shutting down")
                    continue
                code = _error_code(content)
                if code == ENGINE_FAILED:  # refused before it ran: the next rank
                    mark(rank, False, "its engine failed")
                    continue
                if code is None:  # not the rank's own error: it went down while answering
                    raise _failed(rank)
                routing_log.info("%s %s -> rank %d: %d", route_path(request), rid, rank,
                                 resp.status_code)  # fmt: skip
                return answer(resp, content)
            routed.labels(rank=str(rank), affinity=str(affine).lower()).inc()
            routing_log.info("%s %s -> rank %d%s: %d", route_path(request), rid, rank,
                             " (its start)" if affine else "", resp.status_code)  # fmt: skip
            if resp.status_code < 400:  # (a refused request leaves nothing in the rank's cache)
                router.remember(rank, key, salt)
            if resp.headers.get("content-type", "").startswith("text/event-stream"):
                done = not route_path(request).endswith("/responses")  # (no [DONE] there)
                return ClosingStream(_chunks(rank, resp, done),
                                     lambda r=rank, s=resp: _closed(r, s, rid))  # fmt: skip
            work = asyncio.ensure_future(resp.aread())
            try:  # (a client that leaves: the rank sees its connection close, and aborts)
                finished = await while_connected(request, work)
                content = work.result() if finished else b""
            except httpx.TransportError as exc:
                raise _failed(rank, exc) from None
            finally:
                await resp.aclose()
                router.end(rank)
            return answer(resp, content) if finished else Response(status_code=499)

    closing: set[asyncio.Future] = set()

    async def _chunks(rank: int, resp: httpx.Response, done: bool) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        except httpx.TransportError as exc:  # the rank died mid-stream: say so, then end (with
            # [DONE] after it, as vLLM ends such a stream, where the route's streams end so)
            end = "data: [DONE]\n\n" if done else ""
            yield f"\n\ndata: {json.dumps(_failed(rank, exc).body())}\n\n{end}".encode()
        finally:  # (a client that left: the rank sees its stream close, and aborts)
            await resp.aclose()

    def _closed(rank: int, resp: httpx.Response, rid: str) -> None:
        router.end(rank)
        running.discard(rid)
        if not resp.is_closed:  # a client gone before the first chunk
            task = asyncio.ensure_future(resp.aclose())
            closing.add(task)
            task.add_done_callback(closing.discard)

    app.post("/v1/completions")(relay)
    app.post("/v1/chat/completions")(relay)
    app.post("/v1/responses")(relay)
    app.post("/v1/responses/input_tokens")(relay)
    not_kept_routes(app, authorize)  # (as every rank answers: none keeps responses)

    async def forward(request: Request, path: str, method: str = "GET") -> Response:
        """A request any rank answers alike (models, tokenizer routes): the first usable one."""
        authorize(request)
        raw = await read_body(request) if method == "POST" else None
        headers = {"content-type": "application/json"}
        for rank in sorted(range(n), key=lambda r: not usable(r)):
            try:
                resp = await control.request(method, front.urls[rank] + path, content=raw,
                                             headers=headers)  # fmt: skip
            except httpx.TransportError:
                continue
            return answer(resp, resp.content)
        raise APIError("no engine rank is up", status=503, type="server_error")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await forward(request, "/v1/models")

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> Response:
        return await forward(request, "/v1/models/" + quote(model, safe=""))  # (one segment)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> Response:
        return await forward(request, "/tokenizer_info")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await forward(request, "/tokenize", "POST")

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await forward(request, "/detokenize", "POST")

    @app.get("/version")  # (the front's and its ranks': one package)
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/health")
    async def health() -> JSONResponse:
        ranks = list(await asyncio.gather(*map(health_of, range(n))))
        if front.draining.is_set():
            return JSONResponse({"status": "draining", "ranks": ranks}, 503)
        ok = all(r.get("status") == "ok" for r in ranks)
        body = {"status": "ok" if ok else "degraded", "ranks": ranks}
        if ok:
            info = {**ranks[0].get("info", {}), "data_parallel_size": n}
            body.update(model=ranks[0].get("model"), info=info)
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        async def one(base: str) -> str:
            try:
                resp = await control.get(base + "/metrics")
            except httpx.TransportError:
                return ""
            return resp.text if resp.status_code == 200 else ""

        texts = await asyncio.gather(*map(one, front.urls))
        return Response(merge_metrics(list(texts)) + generate_latest(registry),
                        media_type=CONTENT_TYPE_LATEST)  # fmt: skip

    probe_routes(app, health, lambda: len(running))  # (the requests relayed, not yet answered)
    return app


def _failed(rank: int, exc: Exception | None = None) -> APIError:
    """The 502 of a request whose rank went down while answering it (never sent again)."""
    why = "" if exc is None else f" ({exc!r})"
    return APIError(f"engine rank {rank} failed while answering{why}", status=502,
                    type="server_error")  # fmt: skip


def _error_code(content: bytes) -> str | None:
    """The code of a rank's OpenAI-style error body ("" without one; None: not such a body)."""
    try:
        return json.loads(content)["error"].get("code") or ""
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
