"""A bounded load test of `owl2 serve` on loopback: N requests from C concurrent clients, mixed
picture questions, follow-up turns and text-only questions, through the official `openai` client.

Every answer is checked: the same requests are first sent one at a time (greedy, temperature 0),
and each concurrent answer must equal its one-at-a-time answer. The server answers one request
at a time (docs/design.md §13), so concurrency shows up as queue wait, which the report gives
beside the latency (p50 / p95), with the errors and the server's cache counters.

    python benchmarks/bench_serve.py [-m MODEL_DIR] [--requests 40] [--clients 4] [--threads 2]

A benchmark, not a test: it asserts nothing about time. Default model: the demo model.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from owl2_edge import scenes
from owl2_edge.model_dir import default_model_path

QUESTIONS = ["What color is the circle?", "How many shapes are there?",
             "What shape is on the left?", "What color is the square?"]
TEXT_ONLY = ["Write one word about owls.", "Say hello."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def workload(n: int, seed: int = 0) -> list[list[dict]]:
    """n message lists: a question about one of 8 generated pictures (half), a follow-up turn
    about a picture after a fixed earlier answer (a quarter: its prefix is shared with other
    requests), a text-only question (a quarter)."""
    rng = random.Random(seed)
    pictures = [data_url(scenes.random_scene(random.Random(seed * 100 + k), "heldout").draw(224))
                for k in range(8)]
    out = []
    for i in range(n):
        image = {"type": "image_url", "image_url": {"url": rng.choice(pictures)}}
        kind = i % 4
        if kind in (0, 1):
            out.append([{"role": "user", "content": [image, {"type": "text",
                                                              "text": rng.choice(QUESTIONS)}]}])
        elif kind == 2:
            out.append([{"role": "user", "content": [image, {"type": "text", "text": QUESTIONS[1]}]},
                        {"role": "assistant", "content": "Two."},
                        {"role": "user", "content": rng.choice(QUESTIONS)}])
        else:
            out.append([{"role": "user", "content": rng.choice(TEXT_ONLY)}])
    return out


def ask(client, messages: list[dict]) -> dict:
    t = time.perf_counter()
    reply = client.chat.completions.create(model="owl2", messages=messages, temperature=0,
                                           max_tokens=16)
    latency = time.perf_counter() - t
    extra = reply.model_extra or {}
    timings = extra.get("timings") or {}
    return {"text": reply.choices[0].message.content, "latency_s": latency,
            "queue_s": (timings.get("queue_ms") or 0.0) / 1000, "timings": timings}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from openai import OpenAI

    folder = args.model or default_model_path()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "owl2_edge.cli", "serve", "-m", str(folder),
                               "--port", str(port), "--threads", str(args.threads),
                               "--max-queue", str(args.requests)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"the server stopped: {server.stderr.read()[-2000:]}")
                time.sleep(0.1)
        client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        work = workload(args.requests)
        expected = [ask(client, messages)["text"] for messages in work]  # one at a time
        metrics_before = json.loads(urllib.request.urlopen(base + "/metrics").read())
        t = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(lambda m: _safe(ask, client, m), work))
        wall = time.perf_counter() - t
        metrics_after = json.loads(urllib.request.urlopen(base + "/metrics").read())
    finally:
        server.terminate()
        server.wait(timeout=30)

    ok = [r for r in results if "error" not in r]
    correct = sum(r.get("text") == e for r, e in zip(results, expected))
    latencies = [r["latency_s"] for r in ok]
    queue = [r["queue_s"] for r in ok]
    summary = {
        "model": str(folder), "requests": len(work), "clients": args.clients,
        "threads": args.threads, "errors": len(results) - len(ok), "correct": correct,
        "wall_s": round(wall, 2), "requests_per_s": round(len(work) / wall, 2),
        "latency_p50_s": round(percentile(latencies, 0.5), 3),
        "latency_p95_s": round(percentile(latencies, 0.95), 3),
        "queue_p50_s": round(percentile(queue, 0.5), 3),
        "queue_p95_s": round(percentile(queue, 0.95), 3),
        "service_mean_s": round(statistics.mean(l - q for l, q in zip(latencies, queue)), 3),
        "metrics_delta": {k: v - metrics_before.get(k, 0) for k, v in metrics_after.items()
                          if isinstance(v, (int, float)) and isinstance(metrics_before.get(k, 0),
                                                                        (int, float))},
    }
    print(json.dumps(summary, indent=None if args.json else 2))


def _safe(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 (every failure is counted, none stops the run)
        return {"error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    main()
