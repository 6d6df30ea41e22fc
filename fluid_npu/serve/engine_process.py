"""The engine (model, scheduler) in a process of its own: how ``fluid serve`` runs it unless
``--no-engine-process`` keeps it in a thread of the server's process (``worker.py``).

With the engine in a thread, one process holds both the HTTP side (parsing, checks, tokenizing,
streaming chunks) and the engine, and Python runs one of them at a time: a request's front work
holds up a step that needs the interpreter between kernels, which on an accelerator is most of a
step. Here, as vLLM's engine core, the engine runs in a child process and the two sides meet
through two pipes:

* ``EngineProcess`` is the server's ``Worker`` (same calls, same guarantees: ``worker.py``): it
  starts the child (``spawn``), which loads the model and sends back what the server needs (the
  tokenizer, the context, the request defaults, ``/health``'s info) or the error that stopped it;
  a sender thread passes submissions, aborts, a drain and the stop on; a receiver thread takes
  each step's events (handed to the event loop in one call) and its figures (the metrics);
* ``engine_main`` runs in the child: between steps it applies every command waiting, then steps
  while there is work. It answers each submission (taken, or refused with the reason), drops the
  "abort" events of requests the server gave up on, and after the drain's deadline aborts what
  still runs. It ignores SIGINT and SIGTERM — the server drains it and then stops it — and exits
  when the server's end of the pipe closes or, even while loading, the server's process is gone.

A failing step, or a child that dies, ends every open stream with an error and marks the engine
failed, as a failing step does in the thread. Grammars cross as xgrammar's serialised form
(``grammar.py``), rebuilt in the child against its own tokenizer tables; a request that cannot
cross (pickled here, rebuilt there) is refused alone.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from fluid_npu.errors import FluidError
from fluid_npu.host import freeze_heap
from fluid_npu.sampling import grammar as grammars
from fluid_npu.serve.errors import APIError
from fluid_npu.serve.loading import build_scheduler, engine_defaults
from fluid_npu.serve.protocol import SamplingDefaults
from fluid_npu.serve.settings import ServeSettings
from fluid_npu.serve.worker import IDLE_WAIT_S, Abandoned, Stream, Worker, _Submit, submit_all

logger = logging.getLogger(__name__)

STOP_WAIT_S = 10.0  # how long a stopped engine may take to finish its step before it is killed


@dataclass
class Ready:
    """What the engine's process sends once its model is loaded."""

    tokenizer: Any
    max_len: int
    max_batch: int
    info: dict[str, Any]
    defaults: SamplingDefaults
    vocab_size: int
    eos_ids: list[int]
    k: int
    scheduling_policy: str


@dataclass
class Prefixes:
    queried: int = 0
    hits: int = 0


@dataclass
class SchedulerView:
    """The scheduler's attributes the server reads (the metrics, the app), as of the last step."""

    eos_ids: list[int]
    k: int
    scheduling_policy: str
    slots_n: int
    num_running: int = 0
    num_waiting: int = 0
    prefixes: Prefixes = field(default_factory=Prefixes)


class EngineProcess(Worker):
    """A ``Worker`` whose scheduler runs in a child process; see the module docstring."""

    def __init__(self, settings: ServeSettings) -> None:
        super().__init__(None)
        self.settings = settings
        self.process: Any = None
        self._commands: Connection | None = None
        self._replies: Connection | None = None
        self._lock = threading.Lock()  # the submissions sent and not yet answered
        self._pending: dict[int, _Submit] = {}
        self._sent = 0
        self._open: dict[str, Stream] = {}  # taken requests' streams (event-loop side only)
        self._threads: list[threading.Thread] = []

    def launch(self) -> Ready:
        """Start the engine's process and wait for its model; its error, if loading failed."""
        ctx = multiprocessing.get_context("spawn")  # (a forked child would inherit the server's)
        commands_r, self._commands = ctx.Pipe(duplex=False)
        self._replies, replies_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=engine_main,
            args=(commands_r, replies_w, self.settings, os.getpid()),
            name="fluid-engine",
        )
        self.process.start()
        atexit.register(self._kill)  # (before multiprocessing's own exit, which would join it)
        commands_r.close()
        replies_w.close()
        if self.settings.trust_remote_code:  # (a tokenizer of the model's own code: its module,
            from transformers.dynamic_module_utils import init_hf_modules  # written by the engine

            init_hf_modules()  # into transformers' module cache, is imported from there here)
        try:
            while not self._replies.poll(0.2):
                if not self.process.is_alive():
                    raise FluidError(
                        f"the engine's process exited (status {self.process.exitcode}) before "
                        "its model was loaded; its error is above"
                    )
            try:
                kind, value = self._replies.recv()
            except (ImportError, AttributeError, pickle.UnpicklingError) as exc:
                raise FluidError(
                    f"the engine's process loaded the model, but what it sent back cannot be "
                    f"read in the server's ({type(exc).__name__}: {exc}); --no-engine-process "
                    "runs the engine in the server's process"
                ) from None
        except BaseException:
            self._kill()
            raise
        if kind == "error":
            self.process.join(STOP_WAIT_S)
            raise value
        ready: Ready = value
        self.scheduler = SchedulerView(
            ready.eos_ids, ready.k, ready.scheduling_policy, slots_n=ready.max_batch
        )
        return ready

    # --- event-loop side -------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        for target, name in ((self._send_commands, "send"), (self._take_replies, "receive")):
            thread = threading.Thread(target=target, name=f"fluid-engine-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def alive(self) -> bool:
        return (
            self.process is not None
            and self.process.is_alive()
            and bool(self._threads)
            and all(t.is_alive() for t in self._threads)
            and self.error is None
        )

    def abort(self, request_id: str) -> None:
        self._open.pop(request_id, None)  # (its events still on their way go nowhere)
        self.inbox.put(("abort", request_id))

    def stop(self, join_timeout: float = STOP_WAIT_S) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))
        if not self._threads and self._commands is not None:  # (never started: it waits on us)
            self._commands.close()
        for thread in self._threads:
            thread.join(join_timeout)
        if self.process is not None:
            self.process.join(join_timeout)
        self._kill()

    def _kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(STOP_WAIT_S)

    def _taken(self, item: _Submit) -> None:
        if item.accepted.cancelled():  # its client left; the abort that follows ends it there
            return
        for stream in item.streams:
            self._open[stream.request_id] = stream
        item.accepted.set_result(None)

    def _events(self, events: list[Any]) -> None:
        for ev in events:
            stream = self._open.get(ev.request_id)
            if stream is None:
                continue
            if ev.finished:
                del self._open[ev.request_id]
            stream.queue.put_nowait(ev)
            if ev.finished:
                self.release(stream)

    def _failed(self, exc: BaseException) -> None:
        for stream in self._open.values():
            stream.queue.put_nowait(exc)
        self._open.clear()

    # --- the two threads -------------------------------------------------------------------
    def _send_commands(self) -> None:
        assert self._commands is not None
        try:
            while self.error is None:
                item = self.inbox.get()
                if isinstance(item, _Submit):
                    try:  # (apart: what does not pickle fails its request, not this thread)
                        payload = pickle.dumps(item.requests, protocol=pickle.HIGHEST_PROTOCOL)
                    except Exception as exc:
                        logger.exception("a request could not be sent to the engine")
                        self._send(_refuse, item.accepted, "engine", f"{type(exc).__name__}: {exc}")
                        continue
                    with self._lock:
                        self._sent += 1
                        self._pending[self._sent] = item
                    self._commands.send(("submit", self._sent, payload))
                    continue
                kind, value = item
                if kind == "wake":  # (stop)
                    self._commands.send(("stop", None))
                    return
                if kind == "drain":  # (the deadline on this clock: the child gets what is left)
                    value = max(0.0, value - time.monotonic())
                self._commands.send((kind, value))
        except (OSError, ValueError) as exc:  # the engine's end is gone: the receiver reports it
            logger.debug("the engine's pipe closed: %s", exc)
        finally:
            with self._inbox_lock:
                self._closed = True
            self._refuse_queued(self.error)
            if self.error is not None:  # (one sent as the engine failed: no answer will come)
                self._refuse_pending(self.error)

    def _refuse_pending(self, exc: BaseException) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for item in pending:
            self._send(_refuse, item.accepted, "engine", str(exc))

    def _take_replies(self) -> None:
        assert self._replies is not None
        try:
            while True:
                kind, *rest = self._replies.recv()
                if kind == "step":
                    self._step(*rest)
                elif kind in ("taken", "refused"):
                    with self._lock:
                        item = self._pending.pop(rest[0], None)
                    if item is None:  # (refused already: the engine had failed)
                        continue
                    if kind == "taken":
                        self._send(self._taken, item)
                    else:
                        self._send(_refuse, item.accepted, rest[1], rest[2])
                elif kind == "failed":
                    raise RuntimeError(rest[0])
                elif kind == "stopped":
                    return
        except BaseException as exc:
            if isinstance(exc, (EOFError, OSError)) and self._stop.is_set():
                return  # (stopped: it finished its step and exited)
            if isinstance(exc, (EOFError, OSError)):
                self.process.join(1.0)
                why = f"the engine's process exited (status {self.process.exitcode})"
                exc = RuntimeError(why)
            logger.error("the engine failed: %s", exc)
            self.error = exc
            self._send(self._failed, exc)
            self._refuse_pending(exc)
            if self.on_failure is not None:
                self.on_failure()
            self.inbox.put(("wake", None))  # (the sender ends too, refusing what waits)

    def _step(self, events: list[Any], dropped: list[int], seconds: float, cpu: float,
              stats: tuple[int, int, int, int]) -> None:  # fmt: skip
        view = self.scheduler
        view.num_running, view.num_waiting, view.prefixes.queried, view.prefixes.hits = stats
        if self.on_step is not None:
            self.on_step(view, events, seconds, cpu)
        skip = set(dropped)
        delivery = [ev for i, ev in enumerate(events) if i not in skip]
        if delivery:  # one wake-up of the event loop per step
            self._send(self._events, delivery)


def _refuse(fut: asyncio.Future, kind: str, message: str) -> None:
    if fut.done():
        return
    if kind == "request":  # (a FluidError: the prompt is empty, too long, ...)
        fut.set_exception(APIError(message, param="prompt"))
    else:  # (worker.py's wording)
        fut.set_exception(APIError(f"the engine cannot take the request: {message}", status=500,
                                   type="server_error"))  # fmt: skip


# --- the engine's process ----------------------------------------------------------------------
def engine_main(
    commands: Connection, replies: Connection, settings: ServeSettings, server: int
) -> None:
    """The child's whole life: load, answer ``ready`` (or the error), run until stopped;
    ``server``: the server's process id (gone: this one ends)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (the server drains, then stops it)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with(server)
    try:
        scheduler, tokenizer, max_len, info = build_scheduler(settings)
        defaults, vocab_size = engine_defaults(settings, scheduler.model)
        grammars.receive_into(tokenizer, vocab_size, list(scheduler.eos_ids))
        info["engine_gc_frozen_objects"] = freeze_heap()
        ready = Ready(
            tokenizer, max_len, settings.max_batch or scheduler.slots_n, info, defaults,
            vocab_size, list(scheduler.eos_ids), getattr(scheduler, "k", 0),
            getattr(scheduler, "scheduling_policy", "fcfs"),
        )  # fmt: skip
    except BaseException as exc:  # (a FluidError says what to fix; anything else as it is)
        if not isinstance(exc, FluidError):
            traceback.print_exc()  # (where it failed, on the server's stderr)
        with contextlib.suppress(OSError):
            replies.send(("error", exc if _portable(exc) else RuntimeError(repr(exc))))
        return
    try:
        replies.send(("ready", ready))
    except OSError:  # (the server is gone)
        return
    threading.Thread(target=_grammar_tables, name="fluid-grammar-tables", daemon=True).start()
    _EngineLoop(scheduler, commands, replies).run()


def _grammar_tables() -> None:
    """The tokenizer tables received grammars need, built now rather than in the step of the
    first constrained request (seconds for a large vocabulary); nothing without xgrammar."""
    with contextlib.suppress(FluidError):
        grammars.receiver_tables()


def _exit_with(parent: int) -> None:
    """End this process once ``parent`` (the server) is gone, even in the middle of loading a
    model (between steps the closed pipe ends it anyway): its device is freed, not orphaned."""

    def watch() -> None:
        while os.getppid() == parent:  # (reparented: the server has exited)
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="fluid-engine-parent-watch", daemon=True).start()


def _portable(exc: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(exc))
        return True
    except Exception:
        return False


class _EngineLoop:
    def __init__(self, scheduler: Any, commands: Connection, replies: Connection) -> None:
        self.scheduler, self.commands, self.replies = scheduler, commands, replies
        self.live: set[str] = set()  # taken and not finished
        self.abandoned = Abandoned()  # aborted for the server: their "abort" events dropped
        self.deadline: float | None = None

    def run(self) -> None:
        s = self.scheduler
        try:
            while self._take_commands(block=not s.has_work()):
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    for rid in list(self.live):
                        s.abort(rid)
                    self.deadline = None
                if not s.has_work():
                    continue
                start, cpu = time.perf_counter(), time.thread_time()
                events = s.step()
                seconds, cpu = time.perf_counter() - start, time.thread_time() - cpu
                dropped = []
                for i, ev in enumerate(events):
                    if self.abandoned.drops(ev):
                        dropped.append(i)
                    elif ev.finished:
                        self.live.discard(ev.request_id)
                stats = (s.num_running, s.num_waiting, s.prefixes.queried, s.prefixes.hits)
                self.replies.send(("step", events, dropped, seconds, cpu, stats))
            self.replies.send(("stopped",))
        except (EOFError, OSError):  # the server is gone: nothing to serve
            return
        except BaseException as exc:
            logger.exception("the engine failed")
            with contextlib.suppress(OSError):  # (the server may be gone as well)
                self.replies.send(("failed", f"{type(exc).__name__}: {exc}"))

    def _take_commands(self, block: bool) -> bool:
        """Apply every command waiting (wait a moment for one when idle); False: stop."""
        if not self.commands.poll(IDLE_WAIT_S if block else 0):
            return True
        while True:
            kind, *rest = self.commands.recv()
            if kind == "stop":
                return False
            self._apply(kind, rest)
            if not self.commands.poll():
                return True

    def _apply(self, kind: str, rest: list[Any]) -> None:
        s = self.scheduler
        if kind == "submit":
            cmd, payload = rest
            try:  # (unpickled here: a grammar that cannot be rebuilt fails its request alone)
                requests = pickle.loads(payload)
                submit_all(s, requests, self.abandoned)
            except Exception as exc:
                kind = "request" if isinstance(exc, FluidError) else "engine"
                why = str(exc) if kind == "request" else f"{type(exc).__name__}: {exc}"
                self.replies.send(("refused", cmd, kind, why))
                return
            self.live.update(req.request_id for req in requests)
            self.replies.send(("taken", cmd))
        elif kind == "abort":
            rid = rest[0]
            if rid in self.live:
                self.live.discard(rid)
                self.abandoned.abort(s, rid)
        elif kind == "drain":
            self.deadline = time.monotonic() + rest[0]
