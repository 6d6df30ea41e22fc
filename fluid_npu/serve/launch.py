"""Start and stop a ``fluid serve`` process: what ``fluid bench serve`` and the tests share.

``ServerProcess(args)`` runs ``python -m fluid_npu.cli serve ARGS --host 127.0.0.1 --port FREE``
with its output in a log file, waits (bounded) until ``/health`` answers 200 — a server that exits
first is a ``FluidError`` carrying the tail of its log — and on exit sends SIGTERM (the drain) and
waits for the exit status, killing the process only if it outlives the bound. A server given
``--ssl-certfile`` is polled over https (``verify``: how its certificate is checked).

``stopped_by_signals`` turns SIGINT / SIGTERM into a ``Stopped`` exception while a block runs (the
data-parallel ranks starting, a model loading), so the block's cleanup runs and the command exits
with 128 + the signal's number instead of dying with processes or files left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, TracebackType

import httpx

from fluid_npu.errors import FluidError

POLL_S = 0.2


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One ``fluid serve`` child process on 127.0.0.1 (a context manager)."""

    def __init__(
        self,
        args: list[str],
        *,
        ready_timeout: float = 900.0,
        stop_timeout: float = 120.0,
        env: dict[str, str] | None = None,
        new_session: bool = False,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.port = free_port()
        tls = any(a == "--ssl-certfile" or a.startswith("--ssl-certfile=") for a in args)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.verify = verify  # how its certificate is checked (httpx's verify)
        self.args = [*args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.ready_timeout, self.stop_timeout = ready_timeout, stop_timeout
        self.env = {**os.environ, **(env or {})}
        self.new_session = new_session  # out of the caller's process group (its Ctrl-C)
        self.proc: subprocess.Popen | None = None
        self.terminated = False  # SIGTERM sent
        self.returncode: int | None = None
        self.health: dict = {}  # its /health answer once ready
        # the child writes here for the server's whole life, so no context manager
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="fluid-serve-", suffix=".log", delete=False
        )
        self.log_path = Path(self._log.name)

    def log_tail(self, chars: int = 2000) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def start(self) -> str:
        """Launch and wait for ``/health``; returns the base URL."""
        self.launch()
        return self.ready()

    def launch(self) -> None:
        """Start the process (``ready`` waits for it to answer)."""
        cmd = [sys.executable, "-m", "fluid_npu.cli", "serve", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=self.new_session)  # fmt: skip

    def ready(self) -> str:
        """Wait (bounded) for the launched server's ``/health``; returns the base URL."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FluidError(
                    f"fluid serve exited with status {self.proc.returncode} before it was ready:"
                    f"\n{self.log_tail()}"
                )
            try:
                health = httpx.get(f"{self.url}/health", timeout=5, verify=self.verify)
                if health.status_code == 200:
                    self.health = health.json()  # (its info: what it was sized to)
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
        self.kill()
        raise FluidError(f"fluid serve was not ready after {self.ready_timeout:g} s")

    def terminate(self) -> None:
        """Send SIGTERM (once): the server drains and exits."""
        if self.proc is not None and self.proc.poll() is None and not self.terminated:
            self.terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def wait(self) -> int:
        """The exit status, killing the process if it does not end within ``stop_timeout``."""
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.returncode = self.proc.wait()
        return self.returncode

    def stop(self) -> int:
        self.terminate()
        return self.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Remove the log (after the process has ended)."""
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
        except BaseException:
            self.kill()
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.returncode is None:
            self.stop()
        self.close()


class Stopped(Exception):
    """A run that SIGINT or SIGTERM ended on purpose (``signal``: which)."""

    def __init__(self, sig: int) -> None:
        super().__init__(signal.Signals(sig).name)
        self.signal = sig


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """While the block runs (in the main thread), SIGINT and SIGTERM raise ``Stopped`` there, so
    its cleanup runs (processes stopped, temporary files removed) instead of the process dying."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(sig: int, frame: FrameType | None) -> None:
        raise Stopped(sig)

    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
