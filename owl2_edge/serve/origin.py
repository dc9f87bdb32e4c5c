"""Who may talk to `owl2 serve` from a browser: the Host header and the Origin of each request
(docs/serve-safety.md).

A web page the user happens to open can send requests to a server on their machine. Two doors
are closed here, before any route runs:

- DNS rebinding: a page on attacker.example re-points its own name at 127.0.0.1 and then reads
  the server's answers as same-origin. Its requests carry `Host: attacker.example`, so only
  Host names the server knows are answered: IP literals (a page can only be served from one by
  that address itself), `localhost` and `*.localhost`, and the names given with --host-allow
  (`*` turns the check off).
- Cross-origin requests: a page on another origin may POST a "simple" request (text/plain, no
  preflight) and have it run even though it cannot read the answer. A request whose Origin is
  neither the server's own (the chat page) nor one given with --cors-origin is refused, and
  only those given origins get CORS headers and preflight answers.

Clients outside a browser (curl, the openai package) send no Origin and any Host they like
that the rules above accept.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.parse
from typing import Sequence

from owl2_edge.serve.limits import error_body

_PREFLIGHT_HEADERS = "Authorization, Content-Type"
_METHODS = "GET, POST, OPTIONS"


class BrowserGuard:
    """ASGI middleware: the Host allow-list, the Origin check and CORS."""

    def __init__(self, app, host_allow: Sequence[str] = (), cors_origins: Sequence[str] = ()):
        self.app = app
        self.any_host = "*" in host_allow
        self.hosts = {h.lower().rstrip(".") for h in host_allow if h != "*"}
        self.any_origin = "*" in cors_origins
        self.origins = {o.lower().rstrip("/") for o in cors_origins if o != "*"}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if host is not None and not self.host_allowed(host):
            return await _refuse(send, f"Host {host[:100]!r} is not one this server answers to "
                                       f"(owl2 serve --host-allow NAME)", "host_not_allowed")
        origin = headers.get("origin")
        cors = origin is not None and self.cors_allowed(origin)
        if origin is not None and not cors and not _same_origin(origin, host):
            return await _refuse(send, f"requests from the web page at {origin[:100]!r} are not "
                                       f"allowed (owl2 serve --cors-origin ORIGIN)",
                                 "origin_not_allowed")
        if cors and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return await _preflight(send, origin)
        if not cors:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"access-control-allow-origin", origin.encode("latin-1")),
                                      (b"vary", b"Origin")]
            await send(message)
        await self.app(scope, receive, send_with_cors)

    def host_allowed(self, host: str) -> bool:
        if self.any_host:
            return True
        name = _host_name(host)
        if name is None:
            return False
        if name == "localhost" or name.endswith(".localhost") or name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    def cors_allowed(self, origin: str) -> bool:
        return self.any_origin or origin.lower().rstrip("/") in self.origins


def _host_name(host: str) -> str | None:
    """The name of a Host header's "name[:port]" ("[v6]:port" too), lowercased; None if it is
    not one."""
    try:
        parts = urllib.parse.urlsplit("//" + host)
        name = parts.hostname
        parts.port  # noqa: B018  (raises ValueError for a port that is not one)
    except ValueError:
        return None
    return name.rstrip(".") if name else None


def _same_origin(origin: str, host: str | None) -> bool:
    """The chat page's own requests: its Origin's "name[:port]" is the Host it was served from
    (behind a TLS terminator the scheme differs, the name and port do not)."""
    if host is None:
        return False
    netloc = urllib.parse.urlsplit(origin).netloc
    return bool(netloc) and netloc.lower() == host.lower()


async def _refuse(send, message: str, code: str) -> None:
    body = json.dumps(error_body(403, message, code=code)).encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _preflight(send, origin: str) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-methods", _METHODS.encode()),
        (b"access-control-allow-headers", _PREFLIGHT_HEADERS.encode()),
        (b"access-control-max-age", b"600"),
        (b"vary", b"Origin")]})
    await send({"type": "http.response.body", "body": b""})
