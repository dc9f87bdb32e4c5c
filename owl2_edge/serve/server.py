"""Running the app with uvicorn: on a socket bound first (so a port in use fails in one line
before the model loads, and port 0 gets a free one), in the foreground for `owl2 serve`, or on a
background thread for tests and scripts."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from typing import Iterator

import uvicorn

# A stream still running at Ctrl-C gets this long to end before uvicorn cancels it (and its
# answer is closed, docs/design.md §13).
GRACEFUL_SECONDS = 3


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (OSError if it cannot be had, with the system's own
    message: socket.create_server would wrap it in one that repeats the address)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own bind
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(app) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACEFUL_SECONDS)
    return uvicorn.Server(config)


def serve(app, sock: socket.socket) -> None:
    """Serve until Ctrl-C (KeyboardInterrupt once stopped) or SIGTERM (SystemExit(0) once
    stopped). uvicorn handles both signals itself, then raises them again with the handlers it
    found: SIGTERM's is this one, so that a service manager's stop exits 0."""
    previous = signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        _server(app).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_quietly(signum, frame):
    raise SystemExit(0)


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """The app served on a background thread while the block runs; its base URL."""
    sock = bind(host, port)
    server = _server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="owl2-serve")
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread ended before it started")
            thread.join(0.01)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
