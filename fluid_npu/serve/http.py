"""HTTP plumbing ``fluid serve``'s app and its data-parallel front share: the bearer-key check,
request bodies read with a size bound, work that stops when its client disconnects, and a
streaming response that runs a callback however it ends (done, disconnect, cancel), and the
handlers that answer every error as the OpenAI API writes one; a request's id (vLLM's
``X-Request-Id``: a client's own id names its answer) and, with ``--enable-request-id-headers``,
that id on every response.

A client's ``X-Request-Id`` becomes the answer's id (``chatcmpl-ID``, ``cmpl-ID``, ``resp_ID``, as
vLLM names them) and the engine's, so the request log and a gateway's traces meet; without one the
id is random. An id the engine is still running is a 400 naming the header (the engine keeps one
request per id), as is one over 256 characters or holding spaces or control characters."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import uuid
from collections.abc import AsyncIterable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fluid_npu.serve.errors import APIError, error_body

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BODY_BYTES = 4 << 20
MAX_REQUEST_ID = 256
REQUEST_ID = "x-request-id"


class ClosingStream(StreamingResponse):
    """A server-sent-events response that runs ``on_close`` however it ends."""

    def __init__(self, content: AsyncIterable[str | bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def read_body(request: Request) -> bytes:
    """The request's body; over ``MAX_BODY_BYTES`` it is a 400 (read no further); not sent as
    JSON, a 415 (``check_json_media``)."""
    check_json_media(request)
    parts, size = [], 0
    async for part in request.stream():
        parts.append(part)
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise APIError(f"the request body is over {MAX_BODY_BYTES} bytes")
    return b"".join(parts)


def route_path(request: Request) -> str:
    """The route a request reached, as the server names it (``/v1/completions``), whatever
    ``--root-path`` prefixes it with (uvicorn puts the prefix in front of the scope's path):
    metrics, logs and the data-parallel front's relay use this one."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or request.scope.get("path", request.url.path)


def check_json_media(request: Request) -> None:
    """A 415 for a body not sent as ``application/json`` (vLLM's rule): a form or ``text/plain``
    post — which any web page can send to a local server without asking — runs nothing."""
    given = request.headers.get("content-type", "")
    if given.split(";")[0].strip().lower() != "application/json":
        raise APIError(
            f"the request body must be sent as Content-Type: application/json, got "
            f"{given or 'no Content-Type'} (curl: -H 'Content-Type: application/json')",
            status=415,
        )


BIG_BODY_BYTES = 1 << 18  # a body this large is checked off the event loop (read_parsed)
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \ud800-\udfff escape (alone or paired)


async def read_json(request: Request) -> Any:
    """The request's body as JSON (parsed on a worker thread when over ``BIG_BODY_BYTES``); a 400
    saying why where it is not, or where a text in it holds an unpaired UTF-16 surrogate (valid
    JSON, but no text: the engine matches and writes text as UTF-8)."""
    body = await read_body(request)
    request.state.body_bytes = len(body)
    if len(body) > BIG_BODY_BYTES:
        return await asyncio.get_running_loop().run_in_executor(None, parse_json, body)
    return parse_json(body)


def parse_json(body: bytes) -> Any:
    """``read_json``'s reading of a body: UTF-8 only (JSON over HTTP is; ``json.loads`` would
    read UTF-16 too, and bytes of a surrogate, which no text holds), then the surrogate escapes
    (``\\ud800`` alone), found at C speed first and walked for their field only when one is."""
    try:
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise APIError(f"the request body is not UTF-8 text ({exc})") from None
    except ValueError as exc:  # (not JSON, or an integer past Python's 4300 digits)
        raise APIError(f"the request body is not valid JSON ({exc})") from None
    except RecursionError:  # json.loads recurses once per level of nesting
        raise APIError("the request body nests too deeply to be a request") from None
    if _SURROGATE.search(body) and not _encodes(json.dumps(value, ensure_ascii=False)):
        where = lone_surrogate(value)
        raise APIError(
            f"{where or 'the body'} holds an unpaired UTF-16 surrogate (a \\ud800-\\udfff "
            "escape without its pair), which no text can contain; send the character whole",
            param=where or None,
        )
    return value


async def read_parsed(request: Request, parse: Callable[..., T], *args: Any) -> T:
    """``parse(body, *args)`` of the request's JSON body (``read_json``): on a worker thread for
    a body over ``BIG_BODY_BYTES`` (checking 100,000 chat messages takes pydantic seconds, which
    on the event loop stalled every stream), here for the rest."""
    value = await read_json(request)
    if request.state.body_bytes > BIG_BODY_BYTES:
        return await asyncio.get_running_loop().run_in_executor(None, parse, value, *args)
    return parse(value, *args)


async def answered(build: Callable[[], Response], heavy: bool) -> Response:
    """``build()``, on a worker thread where ``heavy`` (an answer of log-probabilities can take
    seconds to build and write; the thread gives the event loop back every few ms, so the other
    streams go on)."""
    if heavy:
        return await asyncio.get_running_loop().run_in_executor(None, build)
    return build()


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where in ``value`` (a parsed JSON body) a text holds an unpaired surrogate, as a field
    path (``stop[0]``, ``messages[1].content``; a key's path for a bad key), else None."""
    stack = [(value, path)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            if not _encodes(item):
                return at
        elif isinstance(item, dict):
            for key, sub in item.items():
                name = f"{at}.{key}" if at else str(key)
                if not _encodes(str(key)):
                    return at or "a key"
                stack.append((sub, name))
        elif isinstance(item, list):
            stack.extend((sub, f"{at}[{i}]") for i, sub in enumerate(item))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_key(given: str, key: str | None) -> None:
    """A 401 unless ``given`` (an Authorization header) is ``Bearer KEY`` (any, without a key)."""
    if key is None:
        return
    scheme, _, token = given.partition(" ")
    # compared as bytes (compare_digest refuses non-ASCII str): the header's raw bytes (ASGI
    # servers hand them over decoded as latin-1) against the key's UTF-8
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode("latin-1", "replace"), key.encode()
    ):
        raise APIError(
            "a valid API key is required: send 'Authorization: Bearer KEY'",
            status=401,
            code="invalid_api_key",
        )


class ClientGone(Exception):
    """The client left before its request reached the engine: answered 499, which nobody reads
    (nginx's "client closed request", as the routes answer a client gone mid-decode)."""


async def until_disconnect(request: Request) -> None:
    """Returns when the client has gone."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def while_connected(request: Request, work: asyncio.Future) -> bool:
    """Wait for ``work`` or the client's disconnect, whichever comes first: True when ``work``
    finished, False when the client left (``work`` is then cancelled)."""
    gone = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            # (read its end, so asyncio does not report an exception nobody retrieved)
            work.add_done_callback(lambda done: done.cancelled() or done.exception())
    return work.done() and not work.cancelled()


def openai_errors(app: FastAPI, refused: Callable[[Request, APIError], None] | None = None) -> None:
    """Answer every error of ``app`` as an OpenAI-style body: ``APIError`` (``refused`` sees each
    first), routing errors (404 unknown path, 405 wrong method) and anything else (500)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if refused is not None:
            refused(request, exc)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(
            f"{exc.detail}: {request.method} {request.scope.get('path', request.url.path)}",
            "invalid_request_error",
        )
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)  # (only what a middleware outside _CatchAll raises)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        return _internal_error(exc)

    # (Starlette answers the handler above outside every middleware added later — CORS, request
    # ids — so a bug's 500 would reach a browser without them: this, added first, is innermost)
    app.add_middleware(_CatchAll)


def _internal_error(exc: BaseException) -> JSONResponse:
    body = error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")
    return JSONResponse(body, status_code=500)


class _CatchAll:
    """ASGI middleware: an exception before the response started is a 500 OpenAI error body; a
    client that disconnects while its body is read gets nothing (an info line, not an error)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False

        async def sending(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except ClientDisconnect:  # the client left while it sent its request: nobody to answer
            if started:
                raise
            logger.info("a client left before its request was read: %s %s", scope.get("method"),
                        scope.get("path"))  # fmt: skip
        except Exception as exc:
            if started or scope["type"] != "http":
                raise
            logger.exception("a request failed: %s %s", scope.get("method"), scope.get("path"))
            await _internal_error(exc)(scope, receive, send)


def _well_formed(given: str) -> bool:
    return (
        0 < len(given) <= MAX_REQUEST_ID
        and given.isprintable()
        and given.isascii()
        and (" " not in given)
    )


def id_in_use(rid: str, param: str = "X-Request-Id") -> APIError:
    """The 400 of a request whose id names one still running (one request per id); ``param``:
    where the id came from (the header, or vLLM's ``request_id`` field)."""
    return APIError(
        f"request id {rid!r} belongs to a request still running; send another {param} (or none)",
        param=param,
    )


def request_id(request: Request) -> str:
    """The request's id: its ``X-Request-Id`` (checked), else a random one; kept on the request's
    state for the response header."""
    given = request.headers.get(REQUEST_ID)
    if given is not None and not _well_formed(given):
        raise APIError(
            f"the X-Request-Id header must be 1-{MAX_REQUEST_ID} visible ASCII characters without "
            "spaces; send another or leave it out",
            param="X-Request-Id",
        )
    request.state.request_id = given or uuid.uuid4().hex
    request.state.id_param = "X-Request-Id"  # (where it came from, for id_in_use)
    return request.state.request_id


def body_request_id(request: Request, given: str | None) -> str:
    """vLLM's ``request_id`` body field: the request's id where no ``X-Request-Id`` header gave
    one (the header wins, as in vLLM); ``request_id`` must have run first."""
    if given is None or request.headers.get(REQUEST_ID) is not None:
        return request.state.request_id
    if not _well_formed(given):
        raise APIError(
            f"request_id must be 1-{MAX_REQUEST_ID} visible ASCII characters without spaces; "
            "send another or leave it out",
            param="request_id",
        )
    request.state.request_id, request.state.id_param = given, "request_id"
    return given


class RequestIdHeader:
    """ASGI middleware (``--enable-request-id-headers``): every response carries
    ``X-Request-Id`` — the id its route gave the request, else the client's, else a new one —
    unless it already has one (a rank's, relayed by the data-parallel front)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == REQUEST_ID.encode() for k, _ in headers):
                    given = dict(scope.get("headers", [])).get(REQUEST_ID.encode(), b"")
                    rid = scope.get("state", {}).get("request_id")
                    if not rid:  # (a route that never read it: the client's, if well formed)
                        text = given.decode("latin-1")
                        rid = text if _well_formed(text) else uuid.uuid4().hex
                    value = rid.encode()
                    headers.append((REQUEST_ID.encode(), value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)
