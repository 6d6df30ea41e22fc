"""Running ``fluid serve``: bind the port, load the model, build the scheduler, serve, drain.

The port is bound first (a taken port fails before minutes of model loading), on 127.0.0.1 unless
``--host`` says otherwise. The engine loads in a process of its own (``engine_process.py``; with
``--no-engine-process`` in a thread of this one, ``worker.py``), which the app's lifespan sets
going; uvicorn serves the FastAPI app on that socket. SIGTERM (or the first Ctrl-C) drains: the
listening socket closes, new requests on open connections get 503, requests in flight run to their
end — those still running ``drain_timeout`` seconds later are aborted (their streams end with
``finish_reason: "abort"``) — and the process exits with status 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict
from types import FrameType
from typing import Any

import uvicorn

from fluid_npu.errors import ConfigError
from fluid_npu.host import freeze_heap
from fluid_npu.sampling.generation_defaults import generation_defaults  # noqa: F401 (the tests')
from fluid_npu.serve.app import ServeConfig, create_app
from fluid_npu.serve.engine_process import EngineProcess
from fluid_npu.serve.loading import build_scheduler, engine_defaults
from fluid_npu.serve.network import Network, ServerClosingTLS
from fluid_npu.serve.settings import (  # (imported from here by dp.py, batch.py, the tests)
    ServeSettings,
    model_aliases,
    served_name,
    served_names,
)
from fluid_npu.serve.worker import Worker

logger = logging.getLogger(__name__)

GRACE_S = 5.0  # uvicorn's own limit beyond the drain, for connections that will not close


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a taken port or a bad host is a ``ConfigError``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} cannot be resolved ({exc})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class DrainingServer(ServerClosingTLS):
    """uvicorn's ``Server`` whose SIGTERM drains the engine and ends with status 0."""

    def __init__(self, config: uvicorn.Config, worker: Worker, drain_timeout: float) -> None:
        super().__init__(config)
        self.worker = worker
        self.drain_timeout = drain_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.worker.draining
        if first:
            print(
                f"fluid: draining (up to {self.drain_timeout:g} s for requests in flight)",
                file=sys.stderr,
                flush=True,
            )
            self.worker.drain(self.drain_timeout)
        super().handle_exit(sig, frame)
        # a drain is a clean exit: uvicorn must not re-raise the signal (a second Ctrl-C, which
        # forces the exit, still ends as an interrupt)
        if sig == signal.SIGTERM or (first and sig == signal.SIGINT):
            self._captured_signals = [s for s in self._captured_signals if s != sig]


def run_draining(server: uvicorn.Server, sock: socket.socket) -> None:
    """``server.run`` on ``sock``, a SIGTERM that comes after its drain ignored: uvicorn puts
    back the handler it found when it stops (here a no-op instead of the default, which would
    kill the process in its last steps), and from then on SIGTERM is ignored outright (Python's
    exit puts its own handlers back to the default). A second SIGTERM is common: a rank of
    ``--data-parallel-size`` gets one from its front and one from a service manager that signals
    every process of the service. A second Ctrl-C still forces the exit, as an interrupt."""
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


PARENT_ENV = "FLUID_PARENT_PID"  # a rank of --data-parallel-size: its front's process id


def watch_parent() -> None:
    """A rank of ``--data-parallel-size`` (``$FLUID_PARENT_PID`` set) drains and exits when its
    front is gone, killed without a chance to stop it (its devices are freed, not orphaned)."""
    given = os.environ.pop(PARENT_ENV, "")  # (not handed on to anything this process starts)
    if not given.isdigit():
        return
    parent = int(given)
    if parent != os.getppid():
        try:
            os.kill(parent, 0)  # still there: someone else's process, not a front
            return
        except ProcessLookupError:  # the front is already gone: nothing to serve for
            raise ConfigError(f"the data-parallel front (process {parent}) has exited") from None
        except PermissionError:
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="fluid-parent-watch", daemon=True).start()


def log_to_stderr(name: str) -> None:
    """Send the INFO lines of the logger ``name`` (the request log, the front's routing) to
    stderr, each as ``fluid: ...``."""
    log = logging.getLogger(name)
    if any(getattr(h, "fluid", False) for h in log.handlers):
        return  # (set up already: a second call adds no second line per record)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fluid: %(message)s"))
    handler.fluid = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def address(sock: socket.socket, network: Network) -> str:
    """The URL a server on ``sock`` answers at (an IPv6 address in brackets)."""
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    return f"{network.scheme}://{where}:{port}"


def load_engine(settings: ServeSettings) -> tuple[Worker, Any, ServeConfig]:
    """Load the model and build what ``create_app`` takes: ``(worker, tokenizer, config)`` — the
    engine in a process of its own, or with ``--no-engine-process`` in a thread of this one."""
    if settings.engine_process:
        worker: Worker = EngineProcess(settings)
        ready = worker.launch()  # (the model loads there; what the server needs comes back)
        settings.max_batch = ready.max_batch
        tokenizer, max_len, info = ready.tokenizer, ready.max_len, ready.info
        defaults, vocab_size = ready.defaults, ready.vocab_size
    else:
        scheduler, tokenizer, max_len, info = build_scheduler(settings)
        defaults, vocab_size = engine_defaults(settings, scheduler.model)
        worker = Worker(scheduler)
    info["default_sampling"] = asdict(defaults)
    info["engine_process"] = settings.engine_process
    config = ServeConfig(
        model_name=served_name(settings),
        other_names=served_names(settings)[1:],
        aliases=model_aliases(settings),
        root=settings.model,
        max_len=max_len,
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        api_key=settings.api_key,
        info=info,
        defaults=defaults,
        vocab_size=vocab_size,
        template_kwargs=settings.template_kwargs(),
        trust_request_chat_template=settings.trust_request_chat_template,
        reasoning_parser=settings.reasoning_parser,
        tool_call_parser=settings.tool_call_parser,
        request_id_headers=settings.enable_request_id_headers,
        tokens_as_ids=settings.return_tokens_as_token_ids,
        max_logprobs=settings.max_logprobs,
    )
    return worker, tokenizer, config


def serve(settings: ServeSettings) -> int:
    """Run the server until SIGTERM / Ctrl-C; returns the exit status."""
    settings.check()
    if settings.enable_log_requests:
        log_to_stderr("fluid_npu.serve.requests")
    watch_parent()
    sock = bind(settings.host, settings.port)
    try:
        worker, tokenizer, config = load_engine(settings)
        name, info, max_len = config.model_name, config.info, config.max_len
        app = create_app(worker, tokenizer, config)
        settings.network.add_cors(app)
        info["gc_frozen_objects"] = freeze_heap()  # (/health's info: the dict itself)
        app.state.banner = (
            f"fluid: serving {name!r} on {address(sock, settings.network)}/v1 (policy "
            f"{info['policy']}, max batch {settings.max_batch}, context {max_len} "
            f"({info['max_len_reason']}), KV cache {info['kv_cache_gib']:.2f} GiB)"
        )
        uv_config = uvicorn.Config(
            app,
            log_level=settings.uvicorn_log_level,
            root_path=settings.root_path,
            access_log=False,
            timeout_graceful_shutdown=settings.drain_timeout + GRACE_S,
            lifespan="on",
            **settings.network.uvicorn_options(),
        )
        uv_config.load()  # (as uvicorn's run would: here so /health can say which HTTP parser
        # "auto" chose — httptools when installed, else the pure-Python h11)
        info["http_parser"] = uv_config.http_protocol_class.__name__.removesuffix("Protocol")
        server = DrainingServer(uv_config, worker, settings.drain_timeout)
        try:
            run_draining(server, sock)
        except KeyboardInterrupt:  # a forced quit (a second Ctrl-C): no drain, status 130 at once
            print("fluid: interrupted", file=sys.stderr, flush=True)  # (the engine's thread may
            os._exit(130)  # still be inside a kernel: the interpreter's exit would abort)
    finally:
        sock.close()
    if worker.error is not None:
        print(f"fluid: the engine failed: {worker.error}", file=sys.stderr)
        return 1
    print("fluid: server stopped", file=sys.stderr)
    return 0
