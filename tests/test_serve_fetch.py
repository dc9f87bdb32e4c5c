"""Remote images for `owl2 serve --allow-remote-images` (owl2_edge/serve/fetch.py): which
addresses a download may reach, that the check comes before any connection and holds across
redirects and DNS changes, and that a download's deadline is a deadline.

No packet leaves the machine: names resolve through stub resolvers, every connection goes
through a spy that refuses any address outside 127.0.0.0/8 and ::1 (and records what was
tried), and the servers that answer are on 127.0.0.1, allowed with --allow-network's setting.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pytest

from owl2_edge.serve.fetch import (DownloadFailed, Fetcher, TooLarge, parse_networks, refusal,
                                   system_connector, system_resolver)

LOOPBACK_ONLY = parse_networks(["127.0.0.1"])


class ConnectSpy:
    """A connector that records every address it is asked for and connects only to loopback
    ones: for any other it refuses as a closed port would, without sending a packet (the tests
    then check what it was asked for)."""

    def __init__(self):
        self.tried: list[tuple[str, int]] = []

    def __call__(self, address, timeout):
        self.tried.append(address)
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise ConnectionRefusedError(f"the spy connects to loopback only, not {address}")
        return system_connector(address, timeout)


def stub_resolver(table: dict[str, list[str]], fallback=None):
    calls = []

    def resolve(host, port):
        calls.append(host)
        if host in table:
            return table[host]
        if fallback is not None:
            return fallback(host, port)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    resolve.calls = calls
    return resolve


def numeric_or_localhost(host, port):
    """The system resolver, for IP literals and localhost only (answered on this machine)."""
    assert host.rstrip(".") == "localhost" or _looks_numeric(host), host
    return system_resolver(host, port)


def _looks_numeric(host: str) -> bool:
    return all(c in "0123456789abcdefxABCDEFX.:[]" for c in host)


class LoopbackServer:
    """A TCP server on 127.0.0.1 that runs `handler(conn)` for each connection on its own
    thread. .url: http://127.0.0.1:PORT"""

    def __init__(self, handler):
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self._stop = threading.Event()

    def __enter__(self):
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.sock.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        with conn:
            try:
                conn.settimeout(30)
                conn.recv(65536)  # the request
                self.handler(conn)
            except OSError:
                pass


def reply(status: int, body: bytes = b"", headers: dict | None = None):
    def handler(conn):
        lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return handler


def fetcher(**kw) -> Fetcher:
    kw.setdefault("connect", ConnectSpy())
    return Fetcher(kw.pop("max_bytes", 1 << 20), kw.pop("timeout_s", 5.0), **kw)


# -- which addresses ---------------------------------------------------------------------------------

REFUSED = [
    "127.0.0.1", "127.1.2.3", "0.0.0.0", "10.0.0.1", "172.16.0.1", "172.31.255.255",
    "192.168.1.1", "100.64.0.1", "169.254.169.254", "224.0.0.251", "239.255.255.250",
    "255.255.255.255", "240.0.0.1", "198.18.0.1", "192.0.2.7",
    "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd00:ec2::254", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
    "2002:7f00:1::1", "2002:a00:1::", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",
    "2001:db8::1", "2001::1",
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111",
           "2001:4860:4860::8888", "::ffff:8.8.8.8", "2002:808:808::1"]


@pytest.mark.parametrize("address", REFUSED)
def test_loopback_private_link_local_multicast_and_reserved_addresses_are_refused(address):
    assert refusal(address) is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address):
    assert refusal(address) is None


def test_allowed_networks_open_exactly_what_they_name():
    home = parse_networks(["192.168.1.0/24", "127.0.0.1", "fd00::/8"])
    assert refusal("192.168.1.20", home) is None
    assert refusal("::ffff:192.168.1.20", home) is None  # the same host, mapped
    assert refusal("127.0.0.1", home) is None and refusal("fd00::5", home) is None
    assert refusal("192.168.2.1", home) and refusal("127.0.0.2", home)
    assert refusal("::1", home) and refusal("10.0.0.1", home)
    with pytest.raises(ValueError, match="not an IP network"):
        parse_networks(["192.168.1.0/33"])
    with pytest.raises(ValueError, match="not an IP network"):
        parse_networks(["example.com"])


# -- the check comes before any connection --------------------------------------------------------

NAMES = {
    "loopback.test": ["127.0.0.1"], "loopback6.test": ["::1"], "mapped.test": ["::ffff:127.0.0.1"],
    "router.test": ["192.168.1.1"], "metadata.test": ["169.254.169.254"],
    "corp.test": ["10.20.30.40"], "ula.test": ["fd12:3456::1"], "link6.test": ["fe80::1"],
    "zero.test": ["0.0.0.0"], "multicast.test": ["224.0.0.1"],
    # one public address and one private: the name is refused as a whole
    "mixed.test": ["93.184.215.14", "10.0.0.1"],
}


@pytest.mark.parametrize("name", list(NAMES))
def test_a_name_that_resolves_to_a_refused_address_is_refused_before_connecting(name):
    spy = ConnectSpy()
    f = fetcher(resolve=stub_resolver(NAMES), connect=spy)
    with pytest.raises(DownloadFailed):
        f.fetch(f"http://{name}/cat.png")
    with pytest.raises(DownloadFailed):
        f.fetch(f"https://{name}:8443/cat.png")
    assert spy.tried == []


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/x.png", "http://127.1/x.png", "http://2130706433/x.png",
    "http://0x7f.0.0.1/x.png", "http://0177.0.0.1/x.png", "http://[::1]:9/x.png",
    "http://[::ffff:127.0.0.1]/x.png", "http://[0:0:0:0:0:ffff:7f00:1]/x.png",
    "http://localhost:9/x.png", "http://LOCALHOST./x.png", "http://0.0.0.0:9/x.png",
    "http://[::]:9/x.png", "http://169.254.169.254/latest/meta-data/",
    "http://user:pw@127.0.0.1:9/x.png",
])
def test_loopback_and_private_addresses_in_any_spelling_are_refused_before_connecting(url):
    spy = ConnectSpy()
    with pytest.raises(DownloadFailed):
        fetcher(resolve=numeric_or_localhost, connect=spy).fetch(url)
    assert spy.tried == []


@pytest.mark.parametrize("url", ["ftp://example.test/x.png", "file:///etc/passwd", "http:///x",
                                 "http://[::1/x", "http://host.test:99999/x", "gopher://a/b"])
def test_urls_that_are_not_http_are_refused(url):
    spy = ConnectSpy()
    with pytest.raises(DownloadFailed):
        fetcher(resolve=stub_resolver({"host.test": ["8.8.8.8"]}), connect=spy).fetch(url)
    assert spy.tried == []


def test_the_connection_goes_to_the_address_that_was_checked():
    """DNS rebinding: the name is resolved once per hop, and the connection is made to that
    address, not to whatever the name resolves to a moment later."""
    answers = iter([["93.184.215.14"], ["127.0.0.1"]])
    resolve = stub_resolver({}, fallback=lambda host, port: next(answers))
    spy = ConnectSpy()
    with pytest.raises(DownloadFailed):
        # The spy refuses the public address (no packet is sent): what it was asked for counts.
        fetcher(resolve=resolve, connect=spy).fetch("http://rebind.test/x.png")
    assert resolve.calls == ["rebind.test"] and spy.tried == [("93.184.215.14", 80)]


def test_the_host_header_carries_the_name_and_the_body_comes_back():
    seen = {}

    def handler(conn):
        seen["request"] = b""
        reply(200, b"PNGDATA", {"Content-Type": "image/png"})(conn)

    with LoopbackServer(handler) as server:
        spy = ConnectSpy()
        f = fetcher(resolve=stub_resolver({"images.test": ["127.0.0.1"]}), connect=spy,
                    allow_networks=LOOPBACK_ONLY)
        assert f.fetch(f"http://images.test:{server.port}/a.png") == b"PNGDATA"
        assert spy.tried == [("127.0.0.1", server.port)]


def test_redirects_are_checked_at_every_hop(tmp_path):
    """A public (here: allowed) server that redirects into the network is refused at the
    redirect, before connecting there."""
    targets = ["http://127.0.0.2:{port}/x.png", "http://[::1]:{port}/x.png",
               "http://10.0.0.1/x.png", "http://metadata.test/latest/", "file:///etc/passwd",
               "ftp://127.0.0.1/x"]
    for target in targets:
        with LoopbackServer(lambda conn: None) as server:
            location = target.format(port=server.port)
            server.handler = reply(302, headers={"Location": location})
            spy = ConnectSpy()
            f = fetcher(resolve=stub_resolver(NAMES | {"metadata.test": ["169.254.169.254"]},
                                              fallback=numeric_or_localhost),
                        connect=spy, allow_networks=LOOPBACK_ONLY)
            with pytest.raises(DownloadFailed):
                f.fetch(server.url + "/start.png")
            assert spy.tried == [("127.0.0.1", server.port)], (location, spy.tried)


def test_redirects_that_stay_allowed_are_followed_a_bounded_number_of_times():
    with LoopbackServer(lambda conn: None) as server:
        hops = []

        def handler(conn):
            hops.append(1)
            if len(hops) < 3:
                reply(301, headers={"Location": f"/hop{len(hops)}"})(conn)
            else:
                reply(200, b"IMAGE")(conn)
        server.handler = handler
        f = fetcher(resolve=numeric_or_localhost, allow_networks=LOOPBACK_ONLY)
        assert f.fetch(server.url + "/start") == b"IMAGE" and len(hops) == 3

        server.handler = reply(302, headers={"Location": "/again"})
        with pytest.raises(DownloadFailed, match="redirects"):
            f.fetch(server.url + "/loop")


def test_sizes_over_the_limit_are_refused_declared_or_not():
    with LoopbackServer(reply(200, b"x" * 2000)) as server:
        f = fetcher(max_bytes=1000, resolve=numeric_or_localhost, allow_networks=LOOPBACK_ONLY)
        with pytest.raises(TooLarge):
            f.fetch(server.url + "/big")

    def undeclared(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 5000)
    with LoopbackServer(undeclared) as server:
        with pytest.raises(TooLarge):
            f.fetch(server.url + "/big")


def test_http_errors_and_closed_ports_are_download_failures():
    f = fetcher(resolve=numeric_or_localhost, allow_networks=LOOPBACK_ONLY)
    with LoopbackServer(reply(404, b"no")) as server:
        with pytest.raises(DownloadFailed, match="404"):
            f.fetch(server.url + "/missing.png")
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(DownloadFailed):
        f.fetch(f"http://127.0.0.1:{port}/x.png")


# -- deadlines ------------------------------------------------------------------------------------

TIMEOUT = 1.0


def drip_body(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(200):
        conn.sendall(b"x")
        time.sleep(0.1)


def drip_headers(conn):
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 200:
        conn.sendall(bytes([byte]))
        time.sleep(0.1)


def silent(conn):
    time.sleep(30)


def status_then_drip(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    for i in range(200):
        conn.sendall(f"X-Slow-{i}: y\r\n".encode())
        time.sleep(0.1)


@pytest.mark.parametrize("handler", [drip_body, drip_headers, silent, status_then_drip],
                         ids=lambda h: h.__name__)
def test_a_slow_server_cannot_hold_a_download_past_its_deadline(handler):
    with LoopbackServer(handler) as server:
        f = fetcher(timeout_s=TIMEOUT, resolve=numeric_or_localhost,
                    allow_networks=LOOPBACK_ONLY)
        start = time.monotonic()
        with pytest.raises(DownloadFailed, match="took more than"):
            f.fetch(server.url + "/slow.png")
        assert time.monotonic() - start < TIMEOUT + 1.0


def test_a_name_lookup_that_hangs_does_not_hold_the_download():
    def slow_resolver(host, port):
        time.sleep(5)
        return ["8.8.8.8"]
    spy = ConnectSpy()
    f = fetcher(timeout_s=TIMEOUT, resolve=slow_resolver, connect=spy)
    start = time.monotonic()
    with pytest.raises(DownloadFailed):
        f.fetch("http://slow-dns.test/x.png")
    assert time.monotonic() - start < TIMEOUT + 1.0 and spy.tried == []


def test_an_earlier_request_deadline_wins():
    with LoopbackServer(drip_body) as server:
        f = fetcher(timeout_s=30, resolve=numeric_or_localhost, allow_networks=LOOPBACK_ONLY)
        start = time.monotonic()
        with pytest.raises(DownloadFailed):
            f.fetch(server.url + "/slow.png", deadline=start + TIMEOUT)
        assert time.monotonic() - start < TIMEOUT + 1.0
