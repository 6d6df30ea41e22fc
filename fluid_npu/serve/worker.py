"""The engine thread: the one owner of the scheduler (and so of the model), fed through queues.
(How ``fluid serve --no-engine-process`` runs it; by default the engine has a process of its own,
``engine_process.py``, whose ``EngineProcess`` keeps this class's calls and guarantees.)

The scheduler is not thread-safe and its ``step()`` blocks for a whole forward pass, so it lives in
one thread and the asyncio server never touches it:

* ``submit`` (from the event loop) puts the request in the inbox and awaits the scheduler's answer:
  a ``FluidError`` from ``Scheduler.submit`` (empty prompt, too long, duplicate id) comes back as an
  ``APIError`` (400) before any response is started; otherwise a ``Stream`` of ``Event``s.
  ``submit_many`` does the same for a request's prompts together: one command, taken between two
  steps, so they are admitted (and prefilled) in the same step; all of them or, when one is
  refused, none (those taken are aborted before any step runs them). Both count the requests as
  ``outstanding`` before they first wait, so a capacity check just before them holds;
* ``abort`` (a client went away, a stop string matched) is applied before the next step, so the
  slot is free for the step after. Nobody reads that request any more, and its id is free at
  once (a client may send a new request under it straight away, as a gateway retrying does), so
  the "abort" event the engine emits for it at the next step is dropped, never delivered to a
  new request under the same id;
* between steps the thread takes every command waiting in the inbox, then steps while there is
  work, and sleeps on the inbox when there is none;
* ``drain(timeout)`` (SIGTERM) refuses new requests and lets the running ones finish; those still
  running at the deadline are aborted, so their streams end with ``finish_reason: "abort"``;
* a failing ``step()`` (a bug, out of memory) ends every open stream with an error and marks the
  worker dead, which ``/health`` reports; requests still queued then (or at ``stop``) get a 500
  at once instead of waiting forever, and a request whose admission itself fails (other than a
  ``FluidError``) fails alone.

A step's events cross back in one ``loop.call_soon_threadsafe`` call, into one ``asyncio.Queue`` per
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fluid_npu.errors import FluidError
from fluid_npu.sampling.requests import Request
from fluid_npu.serve.errors import APIError

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long the idle thread waits on the inbox before checking its flags
ENGINE_FAILED = "engine_failed"  # the error code of a request refused by a failed engine


@dataclass
class Stream:
    """One submitted request as the event loop sees it: events arrive on ``queue``."""

    request_id: str
    prompt_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # Event | BaseException
    submitted_at: float = field(default_factory=time.monotonic)
    # counted in ``Worker.outstanding`` until the engine's last event for it reaches the loop or
    # its reader closes it, whichever is first (``Worker.release``); then ``on_release`` runs
    held: bool = True
    on_release: Callable[[], None] | None = None

    def when_released(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the stream no longer holds a place — now, if the engine's last event
        already reached the loop: a request can finish before its handler resumes from
        ``submit_many`` (the delivery was queued on the loop ahead of the handler's wake-up)."""
        if self.held:
            self.on_release = fn
        else:
            fn()


@dataclass
class _Submit:
    requests: list[Any]
    streams: list[Stream]
    accepted: asyncio.Future


class Worker:
    """The engine thread around one scheduler; see the module docstring."""

    def __init__(
        self,
        scheduler: Any,
        *,
        on_step: Callable[[Any, list[Any], float, float], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        # (scheduler, events, step seconds, the thread's CPU seconds in it): metrics, in the thread
        self.on_step = on_step
        self.on_failure = on_failure  # the engine failed: nothing runs any more (metrics)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, Stream] = {}  # touched by the engine thread only
        # ids aborted for a reader that is gone: their "abort" events (next step) go nowhere
        self._abandoned = Abandoned()  # (engine thread only)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.draining = False
        self._drain_deadline: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the inbox closes when the thread ends: a submission after that is refused, never lost
        self._inbox_lock = threading.Lock()
        self._closed = False
        self.outstanding = 0  # submitted and not finished (event-loop side)

    # --- event-loop side -------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.Thread(target=self._run, name="fluid-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    async def submit(
        self, request_id: str, prompt: list[int], arrived: float | None = None, **fields: Any
    ) -> Stream:
        """Queue a request (``fields``: the rest of the scheduler's ``Request``); returns its
        ``Stream`` once the scheduler took it, else raises an ``APIError``. ``arrived``: when the
        request reached the server (``time.monotonic``; default now), where its latencies start."""
        return (await self.submit_many([(request_id, prompt, {})], arrived, **fields))[0]

    async def submit_many(
        self,
        prompts: list[tuple[str, list[int], dict[str, Any]]],
        arrived: float | None = None,
        **fields: Any,
    ) -> list[Stream]:
        """Queue one request per ``(request_id, prompt, own fields)``, each with ``fields`` too,
        in one command: admitted together, all or none (the module docstring); their ``Stream``s
        in order."""
        if self.draining:
            raise APIError("the server is shutting down", status=503, type="server_error")
        if not self.alive:
            raise APIError(f"the engine stopped: {self.error}", status=500, type="server_error",
                           code=ENGINE_FAILED)  # fmt: skip
        reqs = [Request(request_id=rid, prompt=prompt, **fields, **own)
                for rid, prompt, own in prompts]  # fmt: skip
        loop = asyncio.get_running_loop()
        streams = [Stream(rid, len(prompt)) for rid, prompt, _ in prompts]
        for stream in streams:
            if arrived is not None:
                stream.submitted_at = arrived
        accepted = loop.create_future()
        with self._inbox_lock:  # (building a large request takes a while: the engine may be gone)
            if self._closed:
                raise _engine_error(self.error)
            self.outstanding += len(reqs)
            self.inbox.put(_Submit(reqs, streams, accepted))
        try:
            await accepted
        except asyncio.CancelledError:  # the client left while the requests were being queued
            for req, stream in zip(reqs, streams):
                if stream.held:  # (not if the engine finished it already: its id may be reused)
                    self.abort(req.request_id)
                self.release(stream)  # (once: a stream its last event released stays released)
            raise
        except BaseException:
            self.outstanding -= len(reqs)
            raise
        return streams

    def release(self, stream: Stream) -> None:
        """``stream`` no longer holds a place (event-loop side, once): the engine delivered its
        last event — a client that stops reading keeps no place, or its id, for a request the
        engine has finished — or its reader closed it (aborted, if it was still running)."""
        if stream.held:
            stream.held = False
            self.outstanding -= 1
            if stream.on_release is not None:
                stream.on_release()
                stream.on_release = None

    def _deliver(self, delivery: list[tuple[Stream, Any]]) -> None:
        for stream, ev in delivery:
            stream.queue.put_nowait(ev)
            if ev.finished:
                self.release(stream)

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def drain(self, timeout: float) -> None:
        """Refuse new requests; abort what still runs ``timeout`` seconds from now."""
        self.draining = True
        self.inbox.put(("drain", time.monotonic() + timeout))

    def stop(self, join_timeout: float = 10.0) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(join_timeout)

    # --- engine thread ---------------------------------------------------------------------
    def _send(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self.loop is not None
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens any more
            self.loop.call_soon_threadsafe(fn, *args)

    def _take_commands(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, item: Any) -> None:
        if isinstance(item, _Submit):
            try:
                submit_all(self.scheduler, item.requests, self._abandoned)
            except Exception as exc:
                refusal = (APIError(str(exc), param="prompt") if isinstance(exc, FluidError)
                           else _engine_error(exc))  # fmt: skip
                self._send(_set_exception, item.accepted, refusal)
                return
            for stream in item.streams:
                self.streams[stream.request_id] = stream
            self._send(_set_result, item.accepted, None)
            return
        kind, value = item
        if kind == "abort" and value in self.streams:
            self._abandon(value)
        elif kind == "drain":
            self._drain_deadline = value

    def _abandon(self, request_id: str) -> None:
        """Abort a request nobody reads any more (``Abandoned``)."""
        self.streams.pop(request_id, None)
        self._abandoned.abort(self.scheduler, request_id)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._take_commands(block=not self.scheduler.has_work())
                if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                    for rid in list(self.streams):
                        self.scheduler.abort(rid)
                    self._drain_deadline = None
                if not self.scheduler.has_work():
                    continue
                start, cpu = time.perf_counter(), time.thread_time()
                events = self.scheduler.step()
                seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
                delivery = []
                for ev in events:
                    rid = ev.request_id
                    if self._abandoned.drops(ev):
                        continue
                    stream = self.streams.get(ev.request_id)
                    if stream is None:
                        continue
                    if ev.finished:
                        del self.streams[ev.request_id]
                    delivery.append((stream, ev))
                if delivery:  # one wake-up of the event loop per step, not one per request
                    self._send(self._deliver, delivery)
                if self.on_step is not None:
                    self.on_step(self.scheduler, events, seconds, cpu)
        except BaseException as exc:  # the engine cannot go on: fail every open request loudly
            logger.exception("the engine thread failed")
            self.error = exc
            for stream in self.streams.values():
                self._send(stream.queue.put_nowait, exc)
            self.streams.clear()
            if self.on_failure is not None:
                self.on_failure()
        finally:  # requests queued but never taken (a failed step, a stop) are answered too
            with self._inbox_lock:
                self._closed = True
            self._refuse_queued(self.error)

    def _refuse_queued(self, exc: BaseException | None) -> None:
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Submit):
                self._send(_set_exception, item.accepted, _engine_error(exc))


class Abandoned:
    """Requests aborted for a reader that is gone: the "abort" event the engine emits for each at
    its next step is dropped — before any event of a new request under the same id."""

    def __init__(self) -> None:
        self._count: Counter[str] = Counter()

    def abort(self, scheduler: Any, request_id: str) -> None:
        if scheduler.abort(request_id):  # (False: not running; no event comes)
            self._count[request_id] += 1

    def drops(self, ev: Any) -> bool:
        """Whether ``ev`` is such an event (then it is counted off)."""
        rid = ev.request_id
        if not (ev.finished and ev.finish_reason == "abort" and self._count[rid]):
            return False
        self._count[rid] -= 1
        if not self._count[rid]:
            del self._count[rid]
        return True


def submit_all(scheduler: Any, requests: list[Any], abandoned: Abandoned) -> None:
    """Every request into ``scheduler``, or none: when one is refused its exception is raised
    (logged first unless a ``FluidError``: a bug in one request's admission fails that request
    only) and those taken are aborted before any step runs them."""
    taken = 0
    try:
        for req in requests:
            scheduler.submit(req)
            taken += 1
    except Exception as exc:
        for req in requests[:taken]:
            abandoned.abort(scheduler, req.request_id)
        if not isinstance(exc, FluidError):
            logger.exception("submitting request %s failed", requests[taken].request_id)
        raise


def _engine_error(exc: BaseException | None) -> APIError:
    why = "it stopped" if exc is None else f"{type(exc).__name__}: {exc}"
    return APIError(f"the engine cannot take the request: {why}", status=500, type="server_error")


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
