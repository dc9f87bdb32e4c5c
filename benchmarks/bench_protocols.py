"""What each protocol of `owl2 serve` costs on top of the answer (issue 41, docs/clients.md): the
same question, with the same picture, through /v1/chat/completions, ollama's /api/chat and
OpenAI's /v1/responses, timed from the request to the whole answer.

The three routes build the same prompt, so after one warm-up request each all three reuse the
same cached picture and prefix: what differs between them is only the protocol's own work
(reading the body, rendering the answer). Requests go one at a time,
greedy, at most --tokens long (the demo's short answers: where a protocol's own cost shows
most), the three routes in a rotating order inside each round so that drift falls on all of
them; --rounds rounds of --requests each. Every answer's text must be the same on the three routes (a mismatch stops
the benchmark).

    python benchmarks/bench_protocols.py [-m MODEL_DIR] [--rounds 5] [--requests 20]

Reported: median and mean latency per route and its ratio to /v1/chat/completions. A
benchmark, not a test: it asserts nothing about time. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_clients import (HOST, ServerProcess, free_port, machine,  # noqa: E402
                           owl2_serve_argv, scene_pictures)

ROUTES = ("/v1/chat/completions", "/api/chat", "/v1/responses")


def bodies(url: str, question: str, tokens: int) -> dict[str, dict]:
    """The one question as each route takes it."""
    image = {"type": "image_url", "image_url": {"url": url}}
    return {
        "/v1/chat/completions": {
            "model": "owl2", "temperature": 0, "max_tokens": tokens, "messages": [{"role": "user", "content": [
                image, {"type": "text", "text": question}]}]},
        "/api/chat": {
            "model": "owl2", "stream": False,
            "options": {"temperature": 0, "num_predict": tokens},
            "messages": [{"role": "user", "content": question,
                          "images": [url.split(",", 1)[1]]}]},
        "/v1/responses": {
            "model": "owl2", "temperature": 0, "max_output_tokens": tokens,
            "stream": False, "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": url},
                {"type": "input_text", "text": question}]}]},
    }


def answer_text(route: str, raw: bytes) -> str:
    """The answer's text from a route's JSON."""
    obj = json.loads(raw)
    if route == "/api/chat":
        return obj["message"]["content"]
    if route == "/v1/responses":
        return obj["output"][0]["content"][0]["text"]
    return obj["choices"][0]["message"]["content"]


def timed(port: int, route: str, body: dict) -> tuple[float, str]:
    """One request on its own connection, from sending to the last byte: (seconds, text)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        t0 = time.perf_counter()
        conn.request("POST", route, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        seconds = time.perf_counter() - t0
    finally:
        conn.close()
    if response.status != 200:
        raise SystemExit(f"{route}: HTTP {response.status}: {raw[:300]!r}")
    return seconds, answer_text(route, raw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None,
                    help="model folder (default: the demo model, converted)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=20, help="per route and round")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from owl2_edge.model_dir import default_model_path
    model = args.model or default_model_path()
    port = free_port()
    url, questions = scene_pictures(1, seed=11)[0]
    question = questions[0]
    asked = bodies(url, question, args.tokens)
    times: dict[str, list[float]] = {route: [] for route in ROUTES}
    with ServerProcess(owl2_serve_argv(model, port, threads=args.threads, parallel=1),
                       port):
        # Warm: the picture encoded and prefilled once, for all three.
        texts = {route: timed(port, route, asked[route])[1] for route in ROUTES}
        if len(set(texts.values())) != 1:
            raise SystemExit(f"the routes answered differently: {texts}")
        for round_no in range(args.rounds):
            order = ROUTES[round_no % 3:] + ROUTES[:round_no % 3]
            for _ in range(args.requests):
                for route in order:
                    seconds, text = timed(port, route, asked[route])
                    if text != texts[route]:
                        raise SystemExit(f"{route} answered {text!r}, before {texts[route]!r}")
                    times[route].append(seconds)
    base = statistics.median(times[ROUTES[0]])
    print(f"# bench_protocols: {model.name}, {machine()['cpu']} ({machine()['nproc']} cores), "
          f"{args.rounds} rounds x {args.requests} requests per route, at most {args.tokens} "
          f"tokens, answer {texts[ROUTES[0]]!r}")
    print("| route | median ms | mean ms | × chat (median) |")
    print("|---|---|---|---|")
    for route in ROUTES:
        median = statistics.median(times[route])
        print(f"| {route} | {median * 1e3:.2f} | {statistics.fmean(times[route]) * 1e3:.2f} | "
              f"{median / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
