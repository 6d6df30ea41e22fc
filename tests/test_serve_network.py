"""``fluid serve`` past the loopback (``serve/network.py``): browser origins (CORS) and HTTPS under
vLLM's flag names — answers over TLS checked against the server's certificate, preflights and
answers carrying the allowed origin and no other, a client's ``X-Request-Id`` naming its answer and
coming back as a header (``--enable-request-id-headers``), and each bad flag one error before the
model loads. ``tests/data/tls`` holds a self-signed certificate for 127.0.0.1 (valid until 2126)
and its key (also encrypted, passphrase "fluid-test"), made for these tests only."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_serve_http import _until
from test_serve_live import model_dir  # noqa: F401  (a fixture: the constructed chain model)

from fluid_npu.cli import main
from fluid_npu.serve.launch import ServerProcess

TLS = Path(__file__).parent / "data" / "tls"
CERT, KEY = str(TLS / "cert.pem"), str(TLS / "key.pem")
PAGE = "http://page.example"
STOP_S = 15.0  # a TLS server's stop with idle clients: well under asyncio's 30 s close wait


def trusting() -> ssl.SSLContext:
    """A client context that trusts the test certificate (and nothing else)."""
    return ssl.create_default_context(cafile=CERT)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_network_flags_are_one_error_each(capsys, tmp_path):
    serve = ["serve", "--model", "m"]
    assert "--allowed-origins takes a JSON list" in _error(capsys, [*serve, "--allowed-origins",
                                                                      "*"])  # fmt: skip
    msg = _error(capsys, [*serve, "--allow-credentials"])
    assert "give --allowed-origins too" in msg
    msg = _error(capsys, [*serve, "--allowed-origins", '["*"]', "--allow-credentials"])
    assert "list the origins instead" in msg
    assert "go together" in _error(capsys, [*serve, "--ssl-keyfile", KEY])
    assert "0 (no client certificate)" in _error(
        capsys, [*serve, "--ssl-keyfile", KEY, "--ssl-certfile", CERT, "--ssl-cert-reqs", "5"]
    )
    msg = _error(capsys, [*serve, "--ssl-keyfile", KEY, "--ssl-certfile", CERT,
                          "--ssl-cert-reqs", "2"])  # fmt: skip
    assert "--ssl-ca-certs names who signs them" in msg
    assert "need --ssl-keyfile" in _error(capsys, [*serve, "--ssl-ca-certs", CERT])
    msg = _error(capsys, [*serve, "--ssl-keyfile", CERT, "--ssl-certfile", CERT])
    assert "cannot load them" in msg and "its own key" in msg
    encrypted = str(TLS / "encrypted-key.pem")  # (key.pem under the passphrase "fluid-test")
    msg = _error(capsys, [*serve, "--ssl-keyfile", encrypted, "--ssl-certfile", CERT])
    assert "is encrypted with a passphrase" in msg and "openssl pkey" in msg
    missing = str(tmp_path / "none.pem")
    assert "cannot load them" in _error(capsys, [*serve, "--ssl-keyfile", KEY, "--ssl-certfile",
                                                missing])  # fmt: skip


def _check_cors_and_tls(url: str) -> None:
    assert url.startswith("https://")
    with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused ...
        httpx.get(f"{url}/health", timeout=10)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):  # ... nor plain HTTP
        httpx.get(url.replace("https://", "http://") + "/health", timeout=10)
    with httpx.Client(verify=trusting(), timeout=60) as http:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", http_client=http, max_retries=0)
        out = c.completions.create(model="model", prompt="abc", max_tokens=8, temperature=0)
        assert out.choices[0].text and out.usage.completion_tokens == 8
        ask = {"Origin": PAGE, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "content-type, authorization"}  # fmt: skip
        pre = http.options(f"{url}/v1/chat/completions", headers=ask)
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == PAGE
        body = {"prompt": "abc", "max_tokens": 4, "temperature": 0}
        r = http.post(f"{url}/v1/completions", json=body, headers={"Origin": PAGE})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == PAGE
        traced = http.post(f"{url}/v1/completions", json=body, headers={"X-Request-Id": "t-1"})
        assert traced.json()["id"] == "cmpl-t-1" and traced.headers["x-request-id"] == "t-1"
        refused = http.post(f"{url}/v1/completions", json={**body, "n": 0})
        assert refused.status_code == 400 and refused.headers["x-request-id"]
        other = http.post(f"{url}/v1/completions", json=body, headers={"Origin": "http://evil"})
        assert "access-control-allow-origin" not in other.headers  # (the browser hides it)
        denied = http.options(f"{url}/v1/completions", headers={**ask, "Origin": "http://evil"})
        assert denied.status_code == 400


def test_https_and_allowed_origins(model_dir):  # noqa: F811
    """One engine (``test_serve_dp.py`` checks the data-parallel front, whose ranks stay plain
    HTTP on the loopback)."""
    args = ["--model", model_dir, "--max-batch", "2", "--max-len", "64", "--ssl-keyfile", KEY,
            "--ssl-certfile", CERT, "--allowed-origins", f'["{PAGE}"]',
            "--enable-request-id-headers"]  # fmt: skip
    # a client whose pool keeps an idle connection while the server stops: closing it, asyncio
    # waits up to 30 s for the client's close_notify, which it never reads; the server must not
    # (a stop past STOP_S is killed, and its status is not 0)
    with (
        httpx.Client(verify=trusting()) as idle,
        ServerProcess(args, verify=trusting(), stop_timeout=STOP_S) as server,
    ):
        _check_cors_and_tls(server.url)
        assert idle.get(f"{server.url}/health").status_code == 200
        log = server.log_tail()
    assert server.returncode == 0, log
    assert f"on {server.url}/v1" in log  # the banner names the https address


BIG = 4 << 20  # a response larger than a 64 KiB socket buffer on each side holds


async def _tiny_app(scope, receive, send):  # (ASGI: "/" answers "ok", "/big" BIG bytes)
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b"x" * BIG if scope["path"] == "/big" else b"ok"
    if scope["path"] in ("/big", "/slow"):  # (still answering when the stop begins)
        await asyncio.sleep(0.5 if scope["path"] == "/big" else 2.0)
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _tls_client(port: int, path: str | None) -> ssl.SSLSocket | socket.socket:
    """A client of the TLS server on ``port`` that asked for ``path`` (None: connected, no TLS
    handshake yet), with a 64 KiB receive buffer."""
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    if path is None:
        return raw
    conn = trusting().wrap_socket(raw, server_hostname="127.0.0.1")
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return conn


def _read_slowly(conn: ssl.SSLSocket, chunk: int, pause: float, send_at: float | None) -> int:
    """Read a response slowly (sending a pipelined request once, ``send_at`` s in); the length of
    its body."""
    got, start = b"", time.monotonic()
    while data := conn.recv(chunk):
        got += data
        time.sleep(pause)
        if send_at is not None and time.monotonic() - start > send_at:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            send_at = None
    return len(got.partition(b"\r\n\r\n")[2].split(b"HTTP/1.1")[0])


@pytest.mark.parametrize(("loop", "http"), [("asyncio", "h11"), ("uvloop", "httptools")])
def test_a_tls_stop_ends_idle_connections_but_lets_slow_readers_finish(loop, http):
    """Idle pooled clients never answer a TLS close, which held a stopping server 30 s; they are
    ended promptly — one idle past the keep-alive timeout (asyncio's transport, closed twice,
    forgets its TLS layer), one whose handshake ends after the stop began — while clients still
    reading a response get all of it: one whose tail waits in the server process, one whose tail
    waits in the kernel and which sends more meanwhile (data reaching a socket shut for reading
    makes the kernel reset the connection, dropping what it held)."""
    import uvicorn

    from fluid_npu.serve.network import ServerClosingTLS

    small, large = socket.socket(), socket.socket()
    small.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)  # (its accepted sockets too)
    for listener in (small, large):
        listener.bind(("127.0.0.1", 0))
    port, kernel_port = small.getsockname()[1], large.getsockname()[1]
    config = uvicorn.Config(_tiny_app, ssl_keyfile=KEY, ssl_certfile=CERT, loop=loop, http=http,
                            timeout_keep_alive=1, timeout_graceful_shutdown=60,
                            log_level="warning")  # fmt: skip
    server = ServerClosingTLS(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [small, large]})
    thread.start()
    idle: list[socket.socket] = []
    busy = late = socket.socket()  # (replaced below; closed at the end either way)
    slow: list[socket.socket] = []
    try:
        _until(lambda: server.started)
        idle += [_tls_client(port, "/") for _ in range(2)]
        assert all(c.recv(1000).startswith(b"HTTP/1.1 200") for c in idle)
        time.sleep(1.5)  # the first one's keep-alive timeout closes it
        idle.append(_tls_client(port, "/"))
        assert idle[-1].recv(1000).startswith(b"HTTP/1.1 200")
        busy, late = _tls_client(port, "/slow"), _tls_client(kernel_port, None)
        slow += [_tls_client(port, "/big"), _tls_client(kernel_port, "/big")]
        time.sleep(0.3)
        server.should_exit = True  # (what SIGTERM sets)
        time.sleep(0.3)
        late = trusting().wrap_socket(late, server_hostname="127.0.0.1")
        late.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert late.recv(1000).startswith(b"HTTP/1.1 200")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            in_process = pool.submit(_read_slowly, slow[0], 1 << 16, 0.02, None)  # ~3 MB/s
            in_kernel = pool.submit(_read_slowly, slow[1], 1 << 14, 0.01, 2.5)  # ~1.6 MB/s
            assert [in_process.result(), in_kernel.result()] == [BIG, BIG]
        assert busy.recv(1000).startswith(b"HTTP/1.1 200")
        thread.join(STOP_S)  # (without the cut: 30 s)
        assert not thread.is_alive()
    finally:
        server.should_exit = server.force_exit = True
        thread.join()
        for conn in [*idle, busy, late, *slow]:
            conn.close()
