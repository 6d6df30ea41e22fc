"""``fluid run-batch``: a file of OpenAI batch requests answered offline by ``fluid serve``'s own
routes, as vLLM's ``run-batch`` answers one (the OpenAI Batch API's file format).

The input is JSONL, one request a line, as the Batch API takes them::

    {"custom_id": "q-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

``url`` is ``/v1/chat/completions``, ``/v1/completions`` or ``/v1/responses`` (lines may mix them);
``body`` is the request as that route takes it, its ``model`` the served name
(``--served-model-name``, else the model folder's name) or left out. Blank lines are skipped. The
whole file is checked before the model loads: a line that is not such an object, a ``custom_id``
given twice, another method or URL, a model that is not the one served — each is one error naming
the line and the fix, and nothing is written.

Each request then goes to the application ``fluid serve`` runs (``app.create_app``), in this
process, through an in-memory ASGI transport: the same checks, chat templates, parsers and answers
as over HTTP, and no port is opened. At most twice ``--max-batch`` requests are in flight, so the
engine's batch stays full while requests join and leave it between steps. With
``--data-parallel-size N`` they go through the front of ``fluid serve -dp N`` (``dp.py``,
``router.py``, in this process) to N engine ranks (child processes, each on its own device; on a
CPU, its share of the threads), twice ``--max-batch`` per rank in flight.

The output is JSONL, one line per request in the input's order::

    {"id": "batch_req_…", "custom_id": "q-1",
     "response": {"status_code": 200, "request_id": "chatcmpl-…", "body": {...}}, "error": null}

``body`` is what the route answered (a chat completion, a completion, a response) and
``request_id`` its id. A request the route refuses keeps its line, with the status (400, 404, ...)
and the OpenAI error body, as the Batch API reports a failed request; ``stream: true`` is such a
400 (a line holds one body). The file is written under a temporary name beside ``-o`` and renamed
once every line is in it, so an interrupted run leaves nothing half-written: SIGINT (Ctrl-C) or
SIGTERM cancels the requests, stops the engine, removes the temporary file and exits with 128 + the
signal's number; a request whose answering raised stops the run the same way, with its error.
The exit status is 0 when every request got its line, 1 when the engine (or a rank) failed: the
requests it left get 5xx lines and the file is still written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import httpx
from fastapi import FastAPI

from fluid_npu.errors import ConfigError, DataError
from fluid_npu.io import check_output_file, open_atomic
from fluid_npu.model.loading import check_model_dir
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.launch import Stopped, stopped_by_signals

if TYPE_CHECKING:
    from fluid_npu.serve.server import ServeSettings

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
FIELDS = ("custom_id", "method", "url", "body")
PROGRESS_S = 10.0  # seconds between two progress lines on stderr
T = TypeVar("T")


@dataclass(frozen=True)
class BatchLine:
    """One request of a batch file: where it is (``line``), its id, route and body."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


def read_batch(path: str | Path, names: tuple[str, ...]) -> list[BatchLine]:
    """The requests of the batch file at ``path``, checked (the module docstring); a
    ``DataError`` naming the line, or a ``ConfigError`` for the file or a model not served
    (``names``: the ids served, the default first, and the accepted aliases)."""
    try:
        with open(path, encoding="utf-8-sig") as fh:  # (a byte-order mark is not a request)
            rows = fh.readlines()
    except OSError as exc:
        raise ConfigError(f"--input-file {str(path)!r}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"--input-file {str(path)!r} is not UTF-8 text ({exc.reason})") from None
    requests: list[BatchLine] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(rows, 1):
        if text.strip():
            request = _request(text, f"{path} line {number}", number, names)
            if request.custom_id in seen:
                raise DataError(
                    f"{path} line {number}: custom_id {request.custom_id!r} is line "
                    f"{seen[request.custom_id]}'s too; each request needs its own"
                )
            seen[request.custom_id] = number
            requests.append(request)
    if not requests:
        raise DataError(f"{path} holds no requests (one JSON object a line)")
    return requests


def _request(text: str, where: str, number: int, names: tuple[str, ...]) -> BatchLine:
    try:
        row = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{where} is not JSON ({exc}); a line is one request object") from None
    if not isinstance(row, dict) or set(row) != set(FIELDS):
        got = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(
            f"{where}: a request is an object with exactly {', '.join(FIELDS)}; got {got}"
        )
    custom_id, method, url, body = (row[k] for k in FIELDS)
    if not isinstance(custom_id, str) or not custom_id:
        raise DataError(f"{where}: custom_id must be a non-empty string, got {custom_id!r}")
    if method != "POST":
        raise DataError(f"{where}: method must be 'POST', got {method!r}")
    if url not in URLS:
        raise DataError(f"{where}: url {url!r} is not one of {', '.join(URLS)}")
    if not isinstance(body, dict):
        raise DataError(f"{where}: body must be the request's JSON object, got {body!r:.60}")
    try:  # (Python's JSON reads a lone UTF-16 surrogate, which no UTF-8 text can carry)
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"{where} holds an unpaired UTF-16 surrogate (a \\ud800-\\udfff escape alone: "
            "half of a character); fix or remove it"
        ) from None
    model = body.get("model")
    if isinstance(model, str) and model and model not in names:
        raise ConfigError(
            f"{where}: model {model!r} is not one served ({', '.join(map(repr, names))}); run with "
            f"--served-model-name {model!r}, or change the file's model"
        )
    return BatchLine(number, custom_id, url, body)


async def _answer(client: httpx.AsyncClient, request: BatchLine) -> dict[str, Any]:
    """The output line of one request."""
    if request.body.get("stream") is True:
        refused = APIError(
            "a batch request is answered with one body; remove stream (or set it false)",
            param="stream",
        )
        status, body = refused.status, refused.body()
    else:
        r = await client.post(request.url, json=request.body)
        status = r.status_code
        try:
            body = r.json()
        except ValueError:  # (every route answers JSON; kept readable if one did not)
            body = {"error": {"message": r.text, "type": "server_error", "code": status}}
    ok = status == 200 and isinstance(body, dict) and isinstance(body.get("id"), str)
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": request.custom_id,
        "response": {
            "status_code": status,
            "request_id": body["id"] if ok else f"req_{uuid.uuid4().hex}",
            "body": body,
        },
        "error": None,
    }


def _completion_tokens(record: dict[str, Any]) -> int:
    body = record["response"]["body"]
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0
    return int(usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0)


@dataclass
class BatchResult:
    """What a batch's answers came to: the lines of each status, the tokens generated."""

    statuses: Counter[int] = field(default_factory=Counter)
    tokens: int = 0


async def answer_batch(
    app: FastAPI, requests: list[BatchLine], out: TextIO, in_flight: int
) -> BatchResult:
    """Answer ``requests`` with ``app`` (its lifespan run around them), at most ``in_flight`` at
    once, writing their lines to ``out`` in the input's order."""
    result = BatchResult()
    done: dict[int, dict[str, Any]] = {}
    written = answered = 0  # lines written in the input's order; requests answered
    start = shown = time.monotonic()
    room = asyncio.Semaphore(in_flight)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # (a 500 is a line too)

    async def one(k: int, request: BatchLine, client: httpx.AsyncClient) -> None:
        nonlocal written, shown, answered
        try:
            done[k] = await _answer(client, request)
            answered += 1
        finally:
            room.release()
        while written in done:
            record = done.pop(written)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            result.statuses[record["response"]["status_code"]] += 1
            result.tokens += _completion_tokens(record)
            written += 1
        now = time.monotonic()
        if now - shown >= PROGRESS_S:
            shown = now
            print(
                f"fluid: run-batch: {answered} of {len(requests)} answered ({written} written "
                f"in order), {result.tokens} tokens written ({result.tokens / (now - start):.1f}"
                "/s)",
                file=sys.stderr,
                flush=True,
            )

    running: set[asyncio.Task] = set()
    failed: list[BaseException] = []

    def ended(task: asyncio.Task) -> None:  # a request that raised stops the run at once
        running.discard(task)
        if not task.cancelled() and task.exception() is not None and not failed:
            failed.append(task.exception())  # type: ignore[arg-type]
            for other in running:
                other.cancel()

    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://fluid-batch", timeout=None) as c,
    ):
        try:
            for k, request in enumerate(requests):
                await room.acquire()
                if failed:
                    break
                task = asyncio.create_task(one(k, request, c))
                running.add(task)
                task.add_done_callback(ended)
            await asyncio.gather(*running, return_exceptions=True)
        finally:  # (cancelled: the requests in flight go too, before the engine stops)
            for task in list(running):
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
    if failed:
        raise failed[0]
    return result


async def _until_signalled(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` (a coroutine); SIGINT or SIGTERM cancels it — its cleanup runs: the engine
    stops, the temporary file goes — and raises ``Stopped``."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    got: list[int] = []

    def stop(sig: int) -> None:
        got.append(sig)
        task.cancel()

    watched = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # (no such handlers here)
            loop.add_signal_handler(sig, stop, sig)
            watched.append(sig)
    try:
        return await task
    except asyncio.CancelledError:
        if got:
            raise Stopped(got[0]) from None
        raise
    finally:
        for sig in watched:
            loop.remove_signal_handler(sig)


def run_batch(settings: ServeSettings, input_file: str, output_file: str) -> int:
    """``fluid run-batch``: check the settings, the output path and the whole input file, load
    the model (or start the data-parallel ranks), answer every request into ``output_file``; the
    exit status."""
    from fluid_npu.serve.server import model_aliases, served_names

    settings.check()
    check_model_dir(settings.model, allow_pickle=True)  # (a wrong path is not a model mismatch)
    if Path(output_file).resolve() == Path(input_file).resolve():
        raise ConfigError("--output-file is the --input-file; write the answers elsewhere")
    requests = read_batch(input_file, (*served_names(settings), *model_aliases(settings)))
    check_output_file(output_file, "--output-file")  # (its folder is made once the input is good)
    start = time.monotonic()
    try:
        if settings.data_parallel_size > 1:
            ok, result = _on_ranks(settings, requests, input_file, output_file)
        else:
            ok, result = _on_one_engine(settings, requests, input_file, output_file)
    except Stopped as stopped:  # (the engine stopped, the temporary file removed)
        print(f"fluid: run-batch stopped by {stopped}; nothing written", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(128 + stopped.signal)  # (as a process killed by it reports; no interpreter
        # teardown under a thread that may still be inside a kernel)
    took = time.monotonic() - start
    counts = ", ".join(f"{n} with {code}" for code, n in sorted(result.statuses.items()))
    print(
        f"fluid: run-batch: {len(requests)} requests answered ({counts}) in {took:.2f} s, "
        f"{result.tokens} tokens generated ({result.tokens / took:.0f}/s); wrote {output_file}",
        file=sys.stderr,
    )
    return 0 if ok else 1


def _banner(requests: list[BatchLine], input_file: str, name: str, settings: ServeSettings) -> str:
    return (
        f"fluid: run-batch: {len(requests)} requests from {input_file} to {name!r} (max batch "
        f"{settings.max_batch}"
    )


def _on_one_engine(
    settings: ServeSettings, requests: list[BatchLine], input_file: str, output_file: str
) -> tuple[bool, BatchResult]:
    """The app of ``fluid serve`` over one engine, in this process."""
    from fluid_npu.serve.app import create_app
    from fluid_npu.serve.server import load_engine, log_to_stderr

    if settings.enable_log_requests:
        log_to_stderr("fluid_npu.serve.requests")
    with stopped_by_signals():  # (loading a 7B model takes minutes)
        worker, tokenizer, config = load_engine(settings)
    app = create_app(worker, tokenizer, config)
    app.state.banner = (
        f"{_banner(requests, input_file, config.model_name, settings)}, policy "
        f"{config.info['policy']}, context {config.max_len})"
    )
    with open_atomic(output_file) as out:
        result = asyncio.run(
            _until_signalled(answer_batch(app, requests, out, 2 * settings.max_batch))
        )
    if worker.error is not None:
        print(f"fluid: the engine failed: {worker.error}", file=sys.stderr)
    return worker.error is None, result


def _on_ranks(
    settings: ServeSettings, requests: list[BatchLine], input_file: str, output_file: str
) -> tuple[bool, BatchResult]:
    """The data-parallel front of ``fluid serve -dp N`` over its N engine ranks (child processes,
    each on its device), the front in this process."""
    from fluid_npu.serve.dp import Ranks
    from fluid_npu.serve.router import create_front
    from fluid_npu.serve.server import log_to_stderr, served_name

    if settings.enable_log_requests:
        log_to_stderr("fluid_npu.serve.routing")
    size = settings.data_parallel_size
    ranks = Ranks(settings)
    try:
        app = create_front(ranks.start())
        print(
            f"{_banner(requests, input_file, served_name(settings), settings)} per rank, "
            f"{size} engine ranks: {ranks.placed})",
            file=sys.stderr,
            flush=True,
        )
        with open_atomic(output_file) as out:
            result = asyncio.run(
                _until_signalled(answer_batch(app, requests, out, 2 * settings.max_batch * size))
            )
    finally:
        ok = ranks.stop()
    return ok, result
