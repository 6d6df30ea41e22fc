"""Running ``fluid serve --data-parallel-size N``: bind the front's port, start the N engine ranks
(each a ``fluid serve`` child process, started together), serve the front (``router.py``) until
SIGTERM, then drain the ranks and exit.

Each rank gets the command's own settings but for its address (127.0.0.1 at a free port), its key
(a random one, in its environment, which only the front sends), the front's process id (a rank
whose front is killed outright drains and exits: ``server.watch_parent``) and its device: one
accelerator per rank (``device.rank_environments``), or on a CPU ``--threads`` (default: the
cores shared out, at least one each). A rank that fails to start stops them all with its log's
tail. SIGTERM (or the first Ctrl-C) closes the front's socket, stops new requests (503), passes
SIGTERM to every rank — each finishes its requests within ``--drain-timeout`` as a lone server
does, while the front still relays their answers — and exits 0 when every rank did; SIGINT or
SIGTERM while the ranks still load stops them and exits with 128 + the signal's number. With
``--seed S`` rank ``i`` is seeded ``S + i``.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import fields, replace
from types import FrameType

import uvicorn

from fluid_npu.errors import FluidError
from fluid_npu.serve.http import RequestIdHeader
from fluid_npu.serve.launch import ServerProcess, Stopped, stopped_by_signals
from fluid_npu.serve.network import ServerClosingTLS
from fluid_npu.serve.router import Front, create_front
from fluid_npu.serve.server import (
    GRACE_S,
    PARENT_ENV,
    ServeSettings,
    address,
    bind,
    log_to_stderr,
    run_draining,
)

# the front's, not the ranks' (a rank's own output goes to its log file)
OWN = {"host", "port", "api_key", "data_parallel_size", "enable_log_requests", "network",
       "root_path"}  # fmt: skip
# settings whose flag is not --name-with-dashes, set when the value is False
NEGATED = {"adaptive": "--no-adaptive-drafting", "prefix_caching": "--no-enable-prefix-caching",
           "engine_process": "--no-engine-process"}  # fmt: skip


def rank_args(settings: ServeSettings, threads: int | None) -> list[str]:
    """The ``fluid serve`` flags a rank runs with (the front's address and key left out)."""
    out: list[str] = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name in OWN or value is None or (f.name == "threads" and threads is not None):
            continue
        if f.name in NEGATED:
            out += [] if value else [NEGATED[f.name]]
        elif isinstance(value, bool):
            out += [f"--{f.name.replace('_', '-')}"] if value else []
        elif isinstance(value, tuple):  # (--served-model-name: several)
            out += [f"--{f.name.replace('_', '-')}", *map(str, value)]
        else:
            out += [f"--{f.name.replace('_', '-')}", str(value)]
    return out + (["--threads", str(threads)] if threads is not None else [])


class FrontServer(ServerClosingTLS):
    """uvicorn's ``Server`` whose SIGTERM drains the ranks too."""

    def __init__(self, config: uvicorn.Config, front: Front, ranks: list[ServerProcess]) -> None:
        super().__init__(config)
        self.front, self.ranks = front, ranks

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.front.draining.is_set()
        if first:
            print("fluid: draining every rank", file=sys.stderr, flush=True)
            self.front.draining.set()
            for rank in self.ranks:
                rank.terminate()
        elif sig == signal.SIGINT:  # a second Ctrl-C: every rank stops now too
            for rank in self.ranks:
                if rank.proc is not None and rank.proc.poll() is None:
                    rank.proc.send_signal(signal.SIGINT)
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM or (first and sig == signal.SIGINT):  # a drain is a clean exit
            self._captured_signals = [s for s in self._captured_signals if s != sig]


class Ranks:
    """The engine ranks of one front (``settings.data_parallel_size`` ``fluid serve`` processes,
    each on its device or its share of the CPU threads): started together, stopped together."""

    def __init__(self, settings: ServeSettings) -> None:
        """Plan the ranks (too few devices is an error here); nothing is started or made yet."""
        from fluid_npu import device

        self.settings, size = settings, settings.data_parallel_size
        kind = device.kind(force=settings.device)  # (the front itself takes no device)
        self.envs = device.rank_environments(kind, size, device.visible_device_count())
        threads = settings.threads
        if kind == "cpu" and threads is None:
            threads = max(1, (os.cpu_count() or 1) // size)
        devices = ", ".join(v for env in self.envs for v in env.values())
        self.placed = f"{threads} CPU threads each" if kind == "cpu" else f"devices {devices}"
        self.key = secrets.token_urlsafe(32)
        self.threads = threads
        # on a CPU the ranks share one memory: each sizes its cache from its share of the share
        fraction = settings.gpu_memory_utilization
        self.fraction = fraction / size if fraction is not None and kind == "cpu" else fraction
        self.procs: list[ServerProcess] = []
        self.ready = False
        self.stopping = False  # (set by stop: a rank not launched by then never is)
        self.lock = threading.Lock()

    def start(self) -> Front:
        """Start every rank (one that fails stops the others and raises; SIGINT or SIGTERM
        meanwhile raises ``Stopped``); the front over them."""
        # each rank in its own session: a terminal's Ctrl-C (to the foreground group) reaches the
        # front, which passes the drain on once; a rank ends when the front does
        own = {"FLUID_API_KEY": self.key, PARENT_ENV: str(os.getpid())}
        stop = self.settings.drain_timeout + 2 * GRACE_S
        self.procs = [
            ServerProcess(self._args(i), env={**env, **own}, new_session=True, stop_timeout=stop)
            for i, env in enumerate(self.envs)
        ]
        with stopped_by_signals():
            _start_all(self.procs, self._launch)
        self.ready = True
        procs = self.procs
        if self.settings.max_batch is None:  # each rank sized its slots (gpu_memory_utilization)
            self.settings.max_batch = min(int(p.health["info"]["max_batch"]) for p in procs)
        return Front(
            urls=[r.url for r in procs],
            rank_key=self.key,
            api_key=self.settings.api_key,
            slack=self.settings.max_batch,
            alive=lambda i: procs[i].proc is not None and procs[i].proc.poll() is None,
            log_tail=lambda i: procs[i].log_tail(),
        )

    def _args(self, i: int) -> list[str]:
        """Rank ``i``'s flags: ``--seed S`` becomes ``S + i``, so ranks given the same unseeded
        request at the same point do not draw the same numbers; on a CPU each rank sizes its
        cache from ``--gpu-memory-utilization`` / N (the ranks share the host's memory)."""
        seed = self.settings.seed
        own = replace(self.settings, gpu_memory_utilization=self.fraction)
        own = own if seed is None else replace(own, seed=seed + i)
        return rank_args(own, self.threads)

    def _launch(self, rank: ServerProcess) -> bool:
        """Launch ``rank`` unless the ranks are being stopped (then False)."""
        with self.lock:
            if self.stopping:
                return False
            rank.launch()
            return True

    def stop(self) -> bool:
        """Drain and stop every rank (all told at once); whether each ended with status 0 (the
        others' output is shown, but for ranks stopped before they were ready)."""
        with self.lock:  # (no rank is launched after this)
            self.stopping = True
        for rank in self.procs:
            rank.terminate()
        codes = [rank.wait() if rank.proc is not None else 1 for rank in self.procs]
        for i, (rank, code) in enumerate(zip(self.procs, codes)):
            expected = not self.ready and code == -signal.SIGTERM  # (stopped while loading)
            if code != 0 and rank.proc is not None and not expected:  # its words, before its
                print(f"fluid: rank {i} ended with status {code}; its output ends:\n"  # log goes
                      f"{rank.log_tail()}", file=sys.stderr)  # fmt: skip
            rank.close()
        return self.ready and not any(codes)


def serve_data_parallel(settings: ServeSettings) -> int:
    """The front and its ranks until SIGTERM / Ctrl-C; returns the exit status."""
    settings.check()
    if settings.enable_log_requests:
        log_to_stderr("fluid_npu.serve.routing")
    ranks = Ranks(settings)  # (too few devices: an error before anything is bound)
    sock = bind(settings.host, settings.port)  # (a taken port fails before the ranks load)
    try:
        try:
            front = ranks.start()
        except Stopped as stopped:  # (stopped while the ranks loaded: the finally stops them)
            print(f"fluid: stopped by {stopped} while the ranks started", file=sys.stderr)
            return 128 + stopped.signal
        print(
            f"fluid: serving on {address(sock, settings.network)}/v1 with "
            f"{settings.data_parallel_size} engine ranks ({ranks.placed})",
            file=sys.stderr,
            flush=True,
        )
        app = create_front(front)
        if settings.enable_request_id_headers:  # (on the front's own answers: 401, 503, ...)
            app.add_middleware(RequestIdHeader)
        settings.network.add_cors(app)
        config = uvicorn.Config(
            app,
            log_level=settings.uvicorn_log_level,
            root_path=settings.root_path,
            access_log=False,
            timeout_graceful_shutdown=settings.drain_timeout + GRACE_S,
            lifespan="on",
            **settings.network.uvicorn_options(),
        )
        run_draining(FrontServer(config, front, ranks.procs), sock)
    finally:
        sock.close()
        ok = ranks.stop()
    if not ok:
        return 1
    print("fluid: server stopped", file=sys.stderr)
    return 0


def _start_all(ranks: list[ServerProcess], launch: Callable[[ServerProcess], bool]) -> None:
    """Start every rank at once (each loads its model: minutes for a 7B one) through ``launch``
    (False: not launched); one that fails stops the others and raises its error."""
    errors: list[BaseException] = []

    def start(rank: ServerProcess) -> None:
        try:
            if launch(rank):
                rank.ready()
        except BaseException as exc:  # (reported below, with the rank's log)
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for rank in ranks:
            rank.kill()
        raise FluidError(f"an engine rank did not start: {errors[0]}")
