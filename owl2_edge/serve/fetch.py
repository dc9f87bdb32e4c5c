"""Downloading one http(s) image for `owl2 serve --allow-remote-images`, without letting the
server become a way into its user's network (docs/serve-safety.md).

A server on a laptop that fetches any URL a client names is a port scanner for whoever can
reach it: `http://192.168.1.1/`, `http://127.0.0.1:22/`, a cloud metadata address, a public
name that resolves to any of these, or a public URL that redirects to one. So each hop:

1. the host is resolved here (within the deadline), and every address it resolves to must be a
   public one: loopback, private, link-local, shared, multicast, reserved and unspecified
   addresses are refused, IPv4 and IPv6, the IPv4 inside an IPv6 form included, unless the
   user names their network with `--allow-network`;
2. the connection goes to the address that was checked (pinned: a name cannot resolve to
   another address between the check and the connection), with the name kept for the Host
   header and TLS;
3. a redirect is a new hop, checked the same way (at most MAX_REDIRECTS, http(s) only).

The whole download, from the name lookup to the last byte, has one deadline: a watchdog shuts
the connection down when it passes, however slowly the other side sends. Every refused or
failed download gives the client the same message (DownloadFailed), so that a refused address,
a closed port and an open one cannot be told apart; the server's log has the reason.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Callable, Sequence

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> the addresses to try, as socket.getaddrinfo's sockaddr tuples' first item.
Resolver = Callable[[str, int], Sequence[str]]
Connector = Callable[[tuple[str, int], float], socket.socket]

MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
# IPv6 forms that carry an IPv4 address a packet may end up at (NAT64's well-known prefix;
# 6to4 and IPv4-mapped addresses ipaddress reads out itself).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class DownloadFailed(Exception):
    """Any refused or failed download. str(): the reason, for the server's log only."""


class TooLarge(Exception):
    """The image is larger than the byte limit (said to the client: the limit is public)."""


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def system_connector(address: tuple[str, int], timeout: float) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def parse_networks(values: Sequence[str]) -> tuple[IpNetwork, ...]:
    """`--allow-network` values: CIDR networks or single addresses (ValueError names a bad
    one)."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP network (such as 192.168.1.0/24, "
                             f"10.0.0.7 or fd00::/8)") from None
    return tuple(networks)


def refusal(address: str, allowed: Sequence[IpNetwork] = ()) -> str | None:
    """Why a download must not connect to `address` (None: it may): only public addresses, or
    ones in a network the user allowed."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone: fe80::1%eth0
    except ValueError:
        return f"{address!r} is not an IP address"
    # The same host in another form: ::ffff:127.0.0.1 is 127.0.0.1 (Python 3.11 would call the
    # mapped form neither loopback nor private).
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in allowed):
        return None
    for inner in _embedded_ipv4(ip):
        why = refusal(str(inner), allowed)
        if why:
            return f"{ip} carries {inner}: {why}"
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is a link-local address"
    if ip.is_multicast:
        return f"{ip} is a multicast address"
    if ip.is_unspecified or ip.is_reserved:
        return f"{ip} is a reserved address"
    if not ip.is_global:  # private, shared (100.64/10), documentation, benchmarking...
        return f"{ip} is a private address"
    return None


def _embedded_ipv4(ip: IpAddress) -> list[ipaddress.IPv4Address]:
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    inner = [ip.sixtofour] if ip.sixtofour else []
    if ip.teredo:
        inner.append(ip.teredo[1])  # the client's address; the server's is public by design
    if ip in _NAT64:
        inner.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return inner


class Fetcher:
    """Downloads within a byte limit and a deadline, to public addresses (and `allow_networks`).
    `resolve` and `connect` are the system's; tests give stubs, so that no packet leaves the
    machine to see a refusal."""

    def __init__(self, max_bytes: int, timeout_s: float, allow_networks: Sequence[IpNetwork] = (),
                 resolve: Resolver = system_resolver, connect: Connector = system_connector,
                 tls: ssl.SSLContext | None = None):
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        self.allow_networks = tuple(allow_networks)
        self.resolve, self.connect = resolve, connect
        self.tls = tls or ssl.create_default_context()
        # Name lookups run here so that one that hangs can be given up at the deadline
        # (getaddrinfo cannot be interrupted); a few threads, as downloads are few.
        self._lookups = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="owl2-dns")

    def fetch(self, url: str, deadline: float | None = None) -> bytes:
        """The body of `url` (http or https), following redirects. `deadline`: a
        time.monotonic() time, when the request's own comes before this download's."""
        own = time.monotonic() + self.timeout_s
        with _Watchdog(own if deadline is None else min(own, deadline)) as watch:
            try:
                for _ in range(MAX_REDIRECTS + 1):
                    body, location = self._hop(url, watch)
                    if location is None:
                        return body
                    url = urllib.parse.urljoin(url, location)
                raise DownloadFailed(f"more than {MAX_REDIRECTS} redirects")
            except (DownloadFailed, TooLarge):
                if watch.expired:
                    raise DownloadFailed(f"took more than {self.timeout_s:g} s") from None
                raise
            except (OSError, ValueError, http.client.HTTPException) as e:
                if watch.expired:
                    raise DownloadFailed(f"took more than {self.timeout_s:g} s") from None
                raise DownloadFailed(f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)

    # -- one hop ---------------------------------------------------------------------------------

    def _hop(self, url: str, watch: "_Watchdog") -> tuple[bytes, str | None]:
        """(the body, None), or (b"", where a redirect leads)."""
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise DownloadFailed(f"not an http(s) URL: {scheme or 'no'} scheme")
        host = parts.hostname
        if not host:
            raise DownloadFailed("no host in the URL")
        port = parts.port or (443 if scheme == "https" else 80)
        address = self._checked_address(host, port, watch)
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn = _PinnedConnection(host, port, address, self, watch, scheme == "https")
        try:
            conn.request("GET", path, headers={"User-Agent": "owl2-edge", "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise DownloadFailed(f"HTTP {response.status} without a Location")
                return b"", location
            if response.status != 200:
                raise DownloadFailed(f"HTTP {response.status}")
            declared = response.getheader("Content-Length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise TooLarge()
            data = bytearray()
            while chunk := response.read1(_CHUNK):
                data += chunk
                if len(data) > self.max_bytes:
                    raise TooLarge()
                watch.check()
            watch.check()
            return bytes(data), None
        finally:
            watch.forget()
            conn.close()

    def _checked_address(self, host: str, port: int, watch: "_Watchdog") -> str:
        """The address to connect to: every one the host resolves to must pass `refusal`."""
        lookup = self._lookups.submit(self.resolve, host, port)
        try:
            addresses = lookup.result(timeout=watch.remaining())
        except concurrent.futures.TimeoutError:
            watch.expired = True
            raise DownloadFailed("the name lookup did not end in time") from None
        except (OSError, UnicodeError) as e:
            raise DownloadFailed(f"cannot resolve {host!r}: {e}") from None
        if not addresses:
            raise DownloadFailed(f"{host!r} resolves to no address")
        for address in addresses:
            why = refusal(address, self.allow_networks)
            if why:
                raise DownloadFailed(f"{host!r} resolves to {address}: {why} "
                                     f"(owl2 serve --allow-network to allow it)")
        return addresses[0]


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to `address`, which was checked, whatever `host` resolves to now.
    The name still goes in the Host header and is what the TLS certificate must match."""

    def __init__(self, host: str, port: int, address: str, fetcher: Fetcher,
                 watch: "_Watchdog", tls: bool):
        super().__init__(host, port, timeout=watch.remaining())
        self._address, self._fetcher, self._watch, self._tls = address, fetcher, watch, tls

    def connect(self) -> None:
        sock = self._fetcher.connect((self._address, self.port), self._watch.remaining())
        self._watch.guard(sock)
        if self._tls:
            try:
                sock = self._fetcher.tls.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                self._watch.forget()
                sock.close()
                raise
        self.sock = sock


class _Watchdog:
    """One download's deadline. The socket's own timeout bounds each wait, not their sum (a
    server that sends a byte every few seconds would hold a download for ever); at the deadline
    this shuts the guarded connection down, which ends any read blocked on it at once."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self._lock = threading.Lock()
        self._sock: tuple[int, int] | None = None  # the connection's (descriptor, family)
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self.forget()

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.expired = True
            raise DownloadFailed("out of time")
        return left

    def check(self) -> None:
        self.remaining()

    def guard(self, sock: socket.socket) -> None:
        """Watch this TCP connection (before TLS wraps it: the descriptor stays the same)."""
        with self._lock:
            self._sock = (sock.fileno(), sock.family)
        if self.expired:
            self._fire()

    def forget(self) -> None:
        # Before the socket is closed: its descriptor may be reused at once after.
        with self._lock:
            self._sock = None

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is None:
                return
            # shutdown() acts on the connection, not on a descriptor: done through a duplicate
            # (the download's own socket objects stay untouched, TLS included), it wakes a read
            # blocked in the download's thread at once. The lock keeps the descriptor open.
            try:
                with socket.fromfd(*self._sock, socket.SOCK_STREAM) as duplicate:
                    duplicate.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
