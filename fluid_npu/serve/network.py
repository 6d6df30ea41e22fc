"""How ``fluid serve`` meets clients past a script on the same machine: browser pages of other
origins (CORS) and TLS, under vLLM's flag names.

* ``--allowed-origins '["https://app.example"]'`` (a JSON list; ``'["*"]'``: any page) lets
  browser pages of those origins call the server and read its answers; ``--allowed-methods`` and
  ``--allowed-headers`` (JSON lists, default every one) and ``--allow-credentials`` go with it.
  Without it no page of another origin may read an answer. vLLM allows every origin unless told
  otherwise; here that is opt-in, because the server answers without a key unless it is given one,
  so with every origin allowed any page the user opens could use the model.
* ``--ssl-keyfile KEY --ssl-certfile CERT`` serve HTTPS (the data-parallel front does; its ranks
  stay on the loopback); ``--ssl-ca-certs FILE`` with ``--ssl-cert-reqs 2`` (1: optional) asks
  clients for certificates that file signed. The files are read at start: a missing one, or a key
  that does not match its certificate, is one error naming the flag, before the model loads.
  A client that keeps an idle TLS connection open no longer holds a stopping server back 30 s
  (``ServerClosingTLS``): on Linux its connection ends ``TLS_CLOSE_S`` after the client
  acknowledged its last byte, while a client still reading a response gets all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from fluid_npu.errors import ConfigError

CERT_REQS = (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED)  # 0, 1, 2 as vLLM takes them
TLS_CLOSE_S = 1.0  # how long a stopping TLS connection with nothing left to deliver is kept


def json_list(flag: str, text: str) -> list[str]:
    """A flag's JSON list of strings (``'["*"]'``), or a ``ConfigError`` naming the flag."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{flag} takes a JSON list of strings, e.g. '[\"*\"]'; got {text!r}")
    return value


@dataclass
class Network:
    """The server's CORS and TLS settings (the module docstring)."""

    allowed_origins: list[str] | None = None  # None: no CORS headers at all
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = 0

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"

    def check(self) -> None:
        """The flags taken together, and the TLS files loaded once; one ``ConfigError`` each."""
        if self.allowed_origins is None and (
            self.allow_credentials or self.allowed_methods != ["*"] or self.allowed_headers != ["*"]
        ):
            raise ConfigError(
                "--allowed-methods, --allowed-headers and --allow-credentials shape the answers "
                "to pages of the --allowed-origins; give --allowed-origins too"
            )
        if self.allow_credentials and self.allowed_origins == ["*"]:
            raise ConfigError(
                "--allow-credentials with --allowed-origins '[\"*\"]' would let any page send the "
                "user's credentials; list the origins instead"
            )
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ConfigError("--ssl-keyfile and --ssl-certfile go together: give both")
        if self.ssl_cert_reqs not in range(len(CERT_REQS)):
            raise ConfigError(
                f"--ssl-cert-reqs is 0 (no client certificate), 1 (optional) or 2 (required), "
                f"got {self.ssl_cert_reqs}"
            )
        if self.ssl_certfile is None:
            if self.ssl_ca_certs is not None or self.ssl_cert_reqs:
                raise ConfigError(
                    "--ssl-ca-certs and --ssl-cert-reqs need --ssl-keyfile and --ssl-certfile"
                )
            return
        if self.ssl_cert_reqs and self.ssl_ca_certs is None:
            raise ConfigError(
                "--ssl-cert-reqs asks clients for certificates; --ssl-ca-certs names who signs them"
            )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        asked = []

        def passphrase() -> bytes:  # (asked only of an encrypted key; never on the terminal)
            asked.append(True)
            return b""

        try:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password=passphrase)
        except (OSError, ssl.SSLError) as exc:
            if asked:
                raise ConfigError(
                    f"--ssl-keyfile {self.ssl_keyfile!r} is encrypted with a passphrase; give "
                    "it unencrypted (openssl pkey -in KEY -out PLAIN_KEY), readable only by the "
                    "server's user"
                ) from None
            raise ConfigError(
                f"--ssl-certfile {self.ssl_certfile!r} / --ssl-keyfile {self.ssl_keyfile!r}: "
                f"cannot load them ({_reason(exc)}); give a PEM certificate and its own key"
            ) from None
        if self.ssl_ca_certs is not None:
            try:
                context.load_verify_locations(self.ssl_ca_certs)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"--ssl-ca-certs {self.ssl_ca_certs!r}: cannot load it ({_reason(exc)})"
                ) from None

    def add_cors(self, app: FastAPI) -> None:
        """Answer browser pages of the allowed origins (preflights included) on ``app``."""
        if self.allowed_origins is not None:
            app.add_middleware(
                CORSMiddleware,
                allow_origins=self.allowed_origins,
                allow_methods=self.allowed_methods,
                allow_headers=self.allowed_headers,
                allow_credentials=self.allow_credentials,
                expose_headers=["X-Request-Id"],  # (page scripts may read it)
            )

    def uvicorn_options(self) -> dict[str, Any]:
        """What ``uvicorn.Config`` takes for TLS (nothing without it)."""
        if self.ssl_certfile is None:
            return {}
        return {
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_ca_certs": self.ssl_ca_certs,
            "ssl_cert_reqs": CERT_REQS[self.ssl_cert_reqs],
        }


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)


class ServerClosingTLS(uvicorn.Server):
    """uvicorn's ``Server``, whose stop does not wait on idle TLS clients.

    Stopping, uvicorn closes every idle connection and waits until each is gone. Closing a TLS
    connection sends close_notify, and the event loop then waits up to 30 s for the client's; a
    client that keeps an idle connection in its pool (the ``openai`` client, a browser) never
    reads it, so such clients held the exit back 30 s — past the drain bound, and past a service
    manager's stop timeout. While this server stops, a TLS connection that is closing and has had
    nothing left to deliver for ``TLS_CLOSE_S`` — its TLS layer's buffer empty and every byte the
    kernel sent acknowledged by the client (close_notify included), all that time — is shut down
    at the socket (TLS 1.3 does not require waiting for the client's close_notify). A client
    still reading a response keeps its connection until the drain's bound; so does every
    connection where the system does not tell what its kernel holds (Linux does). A plain-HTTP
    connection closes at once and is left alone.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        cutter = None
        if self.config.is_ssl:
            # each socket taken now, while every transport still gives it (asyncio's forgets its
            # TLS layer when closed twice: uvicorn's keep-alive timeout, then this stop)
            held = {c: at for c in self.server_state.connections if (at := _socket_of(c))}
            cutter = asyncio.create_task(self._cut_idle(held))
        try:
            await super().shutdown(sockets)
        finally:
            if cutter is not None:
                cutter.cancel()

    async def _cut_idle(self, held: dict[Any, tuple[int, Any]]) -> None:
        loop = asyncio.get_running_loop()
        quiet: dict[Any, float] = {}  # connection -> since when it has had nothing to deliver
        while True:
            now = loop.time()
            for conn in list(self.server_state.connections):
                if conn not in held and (at := _socket_of(conn)):  # (its handshake ended since)
                    held[conn] = at
                if conn not in held or not _all_delivered(conn.transport, held[conn][0]):
                    quiet.pop(conn, None)
                elif now - quiet.setdefault(conn, now) >= TLS_CLOSE_S:
                    _shut(*held.pop(conn))
            await asyncio.sleep(0.1)


def _socket_of(conn: Any) -> tuple[int, Any] | None:
    """A connection's socket descriptor and peer (asyncio's and uvloop's transports give both)."""
    try:
        info = conn.transport.get_extra_info
        return int(info("socket").fileno()), info("peername")
    except (AttributeError, OSError, ValueError):
        return None


def _all_delivered(transport: Any, fd: int) -> bool:
    """The connection is closing, its TLS layer holds no byte, and the kernel holds none the
    client has not acknowledged. (Were the event loop holding bytes for it, the kernel's queue
    would not stay empty: the loop writes them as soon as the socket takes more.)"""
    if not transport.is_closing():
        return False
    with contextlib.suppress(AttributeError):  # (a transport closed twice: the kernel answers)
        if transport.get_write_buffer_size():
            return False
    return _kernel_queue(fd) == 0


def _kernel_queue(fd: int) -> int | None:
    """Bytes of ``fd``'s socket the kernel has not had acknowledged (Linux's ``SIOCOUTQ``); None
    where the system does not say, or the descriptor is gone."""
    if not sys.platform.startswith("linux"):
        return None
    import fcntl
    import struct
    import termios

    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return None


def _shut(fd: int, peer: Any) -> None:
    """End the connection on ``fd`` at the socket — if ``fd`` is still that connection's (its
    peer the same) — and leave the descriptor to the event loop, which sees the end and closes
    its side."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # (closed meanwhile, or no longer a socket)
        return
    try:
        if sock.getpeername() == peer:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()
