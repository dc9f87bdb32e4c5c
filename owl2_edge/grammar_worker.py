"""The child process that turns a client's GBNF grammar into Lark for the server
(docs/structured.md, "Bounds"). The conversion (llguidance's gbnf_to_lark) is Python: run in the
server's own process it holds the interpreter lock for tens of milliseconds per large grammar,
and on the compile thread's lowest OS priority it may hold it while the OS runs other work,
stalling the event loop and the engine behind it. Here it costs the server one core's idle time
at nice 19 and nothing else; llguidance's own compile, which runs without the interpreter lock,
stays in the server.

    python -m owl2_edge.grammar_worker   < one JSON line per grammar: {"text", "field"}
                                         > one JSON line each: {"lark"} or {"error"}

The parent (LarkWorker) kills this process when a conversion passes its time, and starts a new
one for the next grammar. Imports only the standard library and llguidance.
"""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import threading
import time

from owl2_edge.errors import GrammarError

MEMORY_BYTES = 1 << 30  # the child's address space: a 64 KiB grammar's conversion needs far less


def lark_of(text: str, field: str) -> str:
    """GBNF (or Lark, returned as it is) as Lark, after the grammar's bounds are checked
    (constraint_bounds.check_grammar_text): GrammarError naming the field when it breaks one or
    does not convert."""
    from llguidance.gbnf_to_lark import any_to_lark

    from owl2_edge.constraint_bounds import check_grammar_text
    check_grammar_text(text, field)
    try:
        return any_to_lark(text)
    except Exception as e:  # its converter's errors are plain exceptions
        raise GrammarError(f"{field} cannot be compiled: {first_line(e)}", field) from None


def first_line(message) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return " ".join(lines[:3])[:300] if lines else "unknown error"


class LarkWorker:
    """One child converting grammars, one at a time (callers wait their turn), started at first
    use. A conversion past its time, or a child that dies, is a GrammarError naming the field;
    the next conversion starts a new child."""

    def __init__(self):
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None
        self._pending = b""

    def lark(self, text: str, field: str, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        request = json.dumps({"text": text, "field": field}).encode() + b"\n"
        with self._lock:
            for tries_left in (1, 0):
                fresh = self._child is None or self._child.poll() is not None
                try:
                    child = self._started()
                    child.stdin.write(request)
                    child.stdin.flush()
                    line = self._read_line(child, deadline)
                    break
                except TimeoutError:  # (an OSError: first)
                    self._stop()
                    raise GrammarError(f"{field} took longer than {seconds:g} s to compile "
                                       f"(docs/structured.md, bounds)", field) from None
                except (OSError, EOFError):
                    self._stop()
                    if tries_left and not fresh:
                        continue  # it had died before this grammar reached it: once more
                    raise GrammarError(f"{field} could not be converted (its converter "
                                       f"ended)", field) from None
        reply = json.loads(line)
        if "error" in reply:
            raise GrammarError(reply["error"], field)
        return reply["lark"]

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def start(self) -> None:
        with self._lock:
            self._started()

    def _started(self) -> subprocess.Popen:
        if self._child is None or self._child.poll() is not None:
            self._stop()
            self._child = subprocess.Popen([sys.executable, "-m", "owl2_edge.grammar_worker"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=subprocess.DEVNULL)
        return self._child

    def _read_line(self, child: subprocess.Popen, deadline: float) -> bytes:
        fd = child.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line

    def _stop(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            for stream in (self._child.stdin, self._child.stdout):
                stream.close()
        self._child, self._pending = None, b""


def main() -> int:
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    import llguidance.gbnf_to_lark  # noqa: F401  (now, not at the first grammar)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"lark": lark_of(request["text"], request["field"])}
        except GrammarError as e:
            reply = {"error": str(e)}
        except MemoryError:
            reply = {"error": f"{request['field']} cannot be compiled: too large to convert"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
