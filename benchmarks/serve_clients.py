"""What bench_concurrency.py and load_serve.py share: starting a server as a subprocess on a free
loopback port and stopping it by its PID, one HTTP request (plain or streamed as server-sent
events, optionally cancelled after a few chunks) timed as it arrives, generated pictures as
data: URLs, and percentiles.

Only the standard library talks HTTP here (http.client): every socket has a timeout, every
request a deadline, and traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


# -- the server process ----------------------------------------------------------------------------

def free_port() -> int:
    """A port nobody listens on now (the server binds it a moment later; a clash fails loudly)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def serve_options() -> str:
    """`owl2 serve --help` as text, read once: which options this checkout's server has (the
    server is being rewritten while these benchmarks are, so --parallel may or may not exist)."""
    global _HELP
    if _HELP is None:
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
        done = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "serve", "--help"],
                              capture_output=True, text=True, timeout=120, env=env)
        _HELP = done.stdout + done.stderr
    return _HELP


_HELP: str | None = None


def serve_has(option: str) -> bool:
    """Whether `owl2 serve` takes `option` (e.g. "--parallel")."""
    return any(word.strip("│,") == option for word in serve_options().split())


def owl2_serve_argv(model: Path, port: int, threads: int | None = None, ctx: int | None = None,
                    parallel: int | None = None, max_queue: int | None = None,
                    extra: tuple[str, ...] = ()) -> list[str]:
    """The `owl2 serve` command line; --parallel and --max-queue only when given (the caller
    checks serve_has first)."""
    argv = [sys.executable, "-m", "owl2_edge.cli", "serve", "-m", str(model), "--port", str(port)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    if ctx is not None:
        argv += ["--ctx", str(ctx)]
    if parallel is not None:
        argv += ["--parallel", str(parallel)]
    if max_queue is not None:
        argv += ["--max-queue", str(max_queue)]
    return argv + list(extra)


class ServerProcess:
    """A server subprocess: started, waited for until `ready_path` answers 200, stopped by its
    own PID (SIGTERM, then SIGKILL). Its output goes to a log file, never to a pipe: a pipe that
    nobody reads fills up and stalls a chatty server mid-benchmark."""

    def __init__(self, argv: list[str], port: int, ready_path: str = "/health",
                 name: str = "server", env: dict | None = None):
        self.argv, self.port, self.ready_path, self.name = argv, port, ready_path, name
        self.env = env
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout_s: float = 600.0) -> "ServerProcess":
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before "
                                   f"it was ready (log: {self.log.name}):\n{self.log_tail()}")
            try:
                status, _, _ = get(self.port, self.ready_path, timeout_s=2.0)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {timeout_s:.0f} s (log: "
                           f"{self.log.name}):\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int | None:
        """VmRSS of the server process, in KiB (None once it is gone)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM, wait, then SIGKILL: only this process, by its PID."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)

    def discard_log(self) -> None:
        """Remove the log file (kept only where something went wrong)."""
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        try:
            return Path(self.log.name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- one request -----------------------------------------------------------------------------------

@dataclass
class Result:
    """What one request got. `kind` is the one word it is counted under:
    ok, cancelled, http_429, http_4xx, http_5xx, stream_error, connection, lost."""
    kind: str = "ok"
    status: int | None = None
    text: str = ""                      # the answer's text (the streamed pieces joined)
    finish: str | None = None
    tokens: int | None = None           # completion tokens (usage, else counted, see post)
    usage_missing: bool = False         # the server sent no usage, or 0 tokens for a text
    ttft_s: float | None = None         # request sent -> first content chunk (streams)
    gaps_s: list[float] = field(default_factory=list)  # between content chunks (streams)
    latency_s: float = 0.0              # request sent -> answer complete
    chunks: int = 0                     # content chunks that arrived
    retry_after: str | None = None      # the 429's Retry-After header, if any
    error: str | None = None
    server_timings: dict | None = None  # owl2 serve's `timings` object, when it sends one


def get(port: int, path: str, timeout_s: float = 10.0) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def get_json(port: int, path: str, timeout_s: float = 10.0) -> dict | None:
    try:
        status, _, body = get(port, path, timeout_s)
        return json.loads(body) if status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None


def post(port: int, path: str, body: dict, timeout_s: float, cancel_after: int | None = None
         ) -> Result:
    """POST a JSON body; a streamed answer (body["stream"]) is read event by event as it arrives.
    cancel_after: close the connection once that many content chunks came (a client that
    leaves mid-answer). timeout_s bounds the whole request, not only each read: past it the
    request is `lost`. Never raises for what the server or the network does."""
    deadline = time.monotonic() + timeout_s
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    t0 = time.perf_counter()
    result = Result()
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        result.status = response.status
        if response.status != 200:
            result.retry_after = response.getheader("Retry-After")
            result.error = response.read(2000).decode(errors="replace")
            result.kind = ("http_429" if response.status == 429 else
                           "http_5xx" if response.status >= 500 else "http_4xx")
        elif body.get("stream"):
            _read_events(conn, response, result, t0, deadline, cancel_after)
        else:
            _read_whole(response, result)
        if result.kind == "ok" and result.text and not result.tokens:
            # No usage, or usage that says 0 tokens for an answer with text (a server bug, not
            # a reason for a throughput of 0): an answer cut by max_tokens has exactly
            # max_tokens tokens; any other is counted one token a content chunk.
            result.usage_missing = True
            length = result.finish == "length" and body.get("max_tokens")
            result.tokens = body["max_tokens"] if length else max(result.chunks, 1)
    except (TimeoutError, socket.timeout) as e:
        result.kind, result.error = "lost", f"no answer within {timeout_s:g} s ({e})"
    except (OSError, http.client.HTTPException, ValueError) as e:
        result.kind, result.error = "connection", f"{type(e).__name__}: {e}"
    finally:
        conn.close()  # also what a cancelling client does: the server sees the socket close
    result.latency_s = time.perf_counter() - t0
    return result


def _read_whole(response, result: Result) -> None:
    reply = json.loads(response.read())
    choice = reply["choices"][0]
    result.text = choice["message"]["content"] if "message" in choice else choice["text"]
    result.finish = choice.get("finish_reason")
    result.tokens = (reply.get("usage") or {}).get("completion_tokens")
    result.server_timings = reply.get("timings")


def _read_events(conn, response, result: Result, t0: float, deadline: float,
                 cancel_after: int | None) -> None:
    """Server-sent events until [DONE]: each `data:` line is one chunk, timed as it arrives."""
    pieces: list[str] = []
    last = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the stream ran past the request's time limit")
        if conn.sock is not None:
            conn.sock.settimeout(remaining)  # each read also ends at the request's deadline
        line = response.readline()
        if not line:
            raise ConnectionError("the stream ended without [DONE]")
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments (": ping"), event: lines
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        now = time.perf_counter()
        if "error" in event:  # the 200 went out already: the error is the stream's last event
            error = event["error"]
            result.kind = "stream_error"
            result.error = json.dumps(error)[:2000]
            result.status = 500 if error.get("type") == "server_error" else 400
            break
        if event.get("usage"):
            result.tokens = event["usage"].get("completion_tokens")
        if event.get("timings"):
            result.server_timings = event["timings"]
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if "delta" in choice \
                else choice.get("text")
            if choice.get("finish_reason"):
                result.finish = choice["finish_reason"]
            if not text:
                continue
            pieces.append(text)
            result.chunks += 1
            if last is None:
                result.ttft_s = now - t0
            else:
                result.gaps_s.append(now - last)
            last = now
        if cancel_after is not None and result.chunks >= cancel_after:
            result.kind = "cancelled"
            break  # post() closes the connection
    result.text = "".join(pieces)


# -- requests' contents ----------------------------------------------------------------------------

def data_url(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def scene_pictures(n: int, seed: int = 0, size: int = 224) -> list[tuple[str, list]]:
    """n generated pictures of shapes (owl2_edge.scenes, held-out layouts) as data: URLs, each
    with the questions its scene answers."""
    from owl2_edge import scenes
    out = []
    for k in range(n):
        scene = scenes.random_scene(random.Random(seed * 1000 + k), "heldout")
        out.append((data_url(scene.draw(size)), [q.text for q in scene.questions()]))
    return out


def picture_messages(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


# -- numbers ---------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile (0..1); None for no values."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def machine() -> dict:
    """nproc and the CPU's model name, for the report's header."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu}


def fmt(value, digits: int = 1, scale: float = 1.0) -> str:
    """A number for a table cell ('-' for none)."""
    return "-" if value is None else f"{value * scale:.{digits}f}"
