"""One request at a time: the latency of servers started by given commands, interleaved.

Compares builds of `owl2 serve` (today's against an older checkout, or two option sets) on the
one thing a lone user feels: the wall time of a streamed answer, and its first token. Each
--server is a shell command with {port} in it; the servers run one after another, round after
round (never two at once), each answering the same requests: a picture question and a text-only
question, greedy, --tokens tokens (ignore_eos), after one warm-up request.

    python benchmarks/bench_single_request.py --model DIR \
        --server "owl2 serve -m {model} --port {port} --threads 2 --parallel 1" \
        --server "PYTHONPATH=/tmp/old owl2 serve -m {model} --port {port} --threads 2" \
        --rounds 3 --requests 4

A benchmark, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from owl2_edge import scenes
from owl2_edge.model_dir import default_model_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 900) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server was not ready in time")


def picture_url() -> str:
    image = scenes.random_scene(random.Random(5), "heldout").draw(448)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(port: int, content, tokens: int) -> tuple[float, float]:
    """(wall seconds, first-token seconds) of one streamed chat completion."""
    body = json.dumps({"model": "owl2", "stream": True, "temperature": 0, "max_tokens": tokens,
                       "ignore_eos": True,
                       "messages": [{"role": "user", "content": content}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = None
    with urllib.request.urlopen(request, timeout=1200) as r:
        for line in r:
            if first is None and line.startswith(b"data: {") and b'"content"' in line:
                first = time.perf_counter() - t0
    return time.perf_counter() - t0, first or 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--server", action="append", required=True,
                    help="a shell command starting a server on {port} ({model}: the folder)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=4, help="requests per server per round")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    model = args.model or default_model_path()
    image = picture_url()
    contents = [[{"type": "image_url", "image_url": {"url": image}},
                 {"type": "text", "text": "Describe the picture."}],
                "Write a short story about an owl."]
    walls = {k: [] for k in range(len(args.server))}
    firsts = {k: [] for k in range(len(args.server))}
    for r in range(args.rounds):
        for k, command in enumerate(args.server):
            port = free_port()
            cmd = command.format(port=port, model=shlex.quote(str(model)))
            proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_ready(port, proc)
                ask(port, contents[1], 4)  # warm-up
                for i in range(args.requests):
                    wall, first = ask(port, contents[i % 2], args.tokens)
                    walls[k].append(wall)
                    firsts[k].append(first)
            finally:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(60)
            print(f"round {r + 1} · server {k + 1}: median wall "
                  f"{statistics.median(walls[k][-args.requests:]):.3f} s", file=sys.stderr)
    print(f"model {model}, {args.tokens} tokens a request, {args.rounds} rounds x "
          f"{args.requests} requests, interleaved\n")
    print("| server | median wall s | median first token s | wall ÷ server 1 |")
    print("|---|---:|---:|---:|")
    base = statistics.median(walls[0])
    for k, command in enumerate(args.server):
        print(f"| `{command}` | {statistics.median(walls[k]):.3f} | "
              f"{statistics.median(firsts[k]):.3f} | {statistics.median(walls[k]) / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
