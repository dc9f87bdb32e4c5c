"""A soak test of `owl2 serve`: many clients for minutes, every answer checked against its own
question, the server's memory watched.

The server is started here on a free loopback port (the demo model by default; --parallel and
--max-queue are passed through when given, --parallel only if this checkout's server has it).
First every distinct request of the mix is sent once, alone (greedy, temperature 0), and its
answer kept as the expected one. Then --clients clients loop for --duration seconds, each
picking requests at random (seeded) from the mix: picture questions (generated scenes as data:
URLs) and text-only questions on /v1/chat/completions, plain prompts on /v1/completions, each
streamed or not; about --cancel of them (10%) are streams that the client closes after the
first content chunk or two. A completed answer that is not cancelled must equal its expected
one, or it is counted as mismatched (answers mixed up between requests, or changed by load).

Counted: sent, answered ok, matched, mismatched, cancelled, 429 (and those without a
Retry-After header), other 4xx, 5xx (an error event inside a 200 stream counts by its type),
connection errors, lost (no answer within --timeout). A client that gets a 429 waits what
Retry-After says (at most 5 s; 1 s without one). The server's RSS (/proc/PID/status VmRSS) is
sampled every --rss-every seconds; the report gives it after warm-up (at --warmup of the
duration: 20%), at the end, and the growth between them in %.

    python benchmarks/load_serve.py                          # 64 clients, 300 s, demo model
    python benchmarks/load_serve.py --clients 64 --duration 300 --parallel 4 --max-queue 64
    python benchmarks/load_serve.py --clients 8 --duration 30   # smoke
    python benchmarks/load_serve.py --json                   # the summary as one JSON object

Exit status: 0 when all is well; 1 when any answer was mismatched or lost, any 5xx came, any 429
lacked Retry-After, the server exited, or nothing was answered; 2 when the run could not start
(the server did not come up, or a request failed when sent alone). Traffic goes to 127.0.0.1
only, bounded in time: --duration, then at most --timeout for the requests still running.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from serve_clients import (ServerProcess, fmt, free_port, get_json, machine, owl2_serve_argv,
                           percentile, picture_messages, post, scene_pictures, serve_has)

TEXT_QUESTIONS = ["Say hello.", "Write one word about owls.", "What is a circle?"]
PROMPTS = ["Once upon a time", "The owl looked at the", "Red, green, blue,"]
PICTURES, QUESTIONS_PER_PICTURE = 6, 2
RETRY_AFTER_CAP_S, RETRY_AFTER_DEFAULT_S = 5.0, 1.0
# Kinds that make the run fail (see the exit status).
FAILING = ("mismatched", "lost", "http_5xx", "429_without_retry_after", "server_exited")


@dataclass(frozen=True)
class Request:
    name: str
    path: str
    body: dict = field(hash=False)

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def request_mix(seed: int, max_tokens: int) -> list[Request]:
    """Every distinct request of the mix, each in a streamed and a plain form: questions about
    generated pictures, text-only chat questions, and plain prompts that run to max_tokens
    (ignore_eos: long enough streams to cancel mid-answer)."""
    base = {"temperature": 0, "max_tokens": max_tokens}
    kinds = []
    for k, (url, questions) in enumerate(scene_pictures(PICTURES, seed=seed)):
        for q, question in enumerate(questions[:QUESTIONS_PER_PICTURE]):
            kinds.append((f"picture{k}-q{q}", "/v1/chat/completions",
                          {"messages": picture_messages(url, question)}))
    for k, question in enumerate(TEXT_QUESTIONS):
        kinds.append((f"text{k}", "/v1/chat/completions",
                      {"messages": [{"role": "user", "content": question}]}))
    for k, prompt in enumerate(PROMPTS):
        kinds.append((f"prompt{k}", "/v1/completions", {"prompt": prompt, "ignore_eos": True}))
    return [Request(f"{name}{'-stream' if stream else ''}", path,
                    {**base, **body, "stream": stream})
            for name, path, body in kinds for stream in (False, True)]


def expected_answers(port: int, mix: list[Request], timeout_s: float) -> dict:
    """Each request sent once, alone: its answer's text and its content chunks (streams)."""
    expected = {}
    for request in mix:
        result = post(port, request.path, request.body, timeout_s)
        if result.kind != "ok":
            raise RuntimeError(f"{request.name} alone: {result.kind} {result.status} "
                               f"{result.error}")
        expected[request.name] = (result.text, result.chunks)
    return expected


# -- the counts ------------------------------------------------------------------------------------

class Tally:
    """What the clients saw, counted under one lock."""

    KINDS = ("sent", "answered_ok", "matched", "mismatched", "cancelled", "http_429",
             "429_without_retry_after", "other_4xx", "http_5xx", "connection_errors", "lost")

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(self.KINDS, 0)
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.samples: dict[str, list] = {}  # a few examples of each problem, for the report

    def add(self, request: Request, result, expected: dict) -> None:
        with self.lock:
            self.counts["sent"] += 1
            kind = self._kind(result)
            if kind == "answered_ok":
                self.counts["answered_ok"] += 1
                self.latencies.append(result.latency_s)
                if result.ttft_s is not None:
                    self.ttfts.append(result.ttft_s)
                want = expected[request.name][0]
                kind = "matched" if result.text == want else "mismatched"
                if kind == "mismatched":
                    self._sample(kind, {"request": request.name, "expected": want[:200],
                                        "got": result.text[:200]})
            elif kind == "http_429" and not result.retry_after:
                self.counts["429_without_retry_after"] += 1
            self.counts[kind] += 1
            if kind not in ("matched", "mismatched", "cancelled"):
                self._sample(kind, {"request": request.name, "status": result.status,
                                    "error": (result.error or "")[:300]})

    @staticmethod
    def _kind(result) -> str:
        if result.kind == "ok":
            return "answered_ok"
        if result.kind == "stream_error":  # an error event inside a 200 stream, by its type
            return "http_5xx" if result.status >= 500 else "other_4xx"
        return {"cancelled": "cancelled", "http_429": "http_429", "http_4xx": "other_4xx",
                "http_5xx": "http_5xx", "connection": "connection_errors",
                "lost": "lost"}[result.kind]

    def _sample(self, kind: str, what: dict) -> None:
        examples = self.samples.setdefault(kind, [])
        if len(examples) < 5:
            examples.append(what)


class RssSampler(threading.Thread):
    """The server's VmRSS every `every` seconds: (seconds since the load began, KiB)."""

    def __init__(self, server: ServerProcess, every: float):
        super().__init__(daemon=True, name="rss-sampler")
        self.server, self.every = server, every
        self.samples: list[tuple[float, int]] = []
        self.t0 = time.monotonic()
        self.stopped = threading.Event()

    def sample(self) -> None:
        rss = self.server.rss_kib()
        if rss is not None:
            self.samples.append((time.monotonic() - self.t0, rss))

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=self.every + 5)
        self.sample()  # the end: after the last request

    def at(self, seconds: float) -> int | None:
        """The first sample at or after `seconds` into the load."""
        later = [rss for t, rss in self.samples if t >= seconds]
        return later[0] if later else None


# -- the load --------------------------------------------------------------------------------------

def client(cid: int, port: int, args, mix: list[Request], cancellable: list[Request],
           expected: dict, tally: Tally, end: float) -> None:
    """One client: requests one after another until the duration is over."""
    rng = random.Random(f"{args.seed}-client-{cid}")  # seeded: the same picks every run
    while time.monotonic() < end:
        cancel_after = None
        if cancellable and rng.random() < args.cancel:
            request, cancel_after = rng.choice(cancellable), rng.choice((1, 2))
        else:
            request = rng.choice(mix)
        result = post(port, request.path, request.body, args.timeout, cancel_after)
        tally.add(request, result, expected)
        if result.kind == "http_429":
            time.sleep(min(_retry_after(result.retry_after), max(0.0, end - time.monotonic()))
                       + rng.uniform(0, 0.25))
        elif result.kind == "connection":
            time.sleep(0.2)  # a server gone or restarting: no tight loop against it


def _retry_after(header: str | None) -> float:
    try:
        return min(RETRY_AFTER_CAP_S, max(0.0, float(header)))
    except (TypeError, ValueError):
        return RETRY_AFTER_DEFAULT_S


def metrics(port: int) -> dict | None:
    """The server's /metrics as JSON (?format=json where /metrics is Prometheus text)."""
    return get_json(port, "/metrics?format=json") or get_json(port, "/metrics")


def run_load(server: ServerProcess, args, mix: list[Request], expected: dict) -> dict:
    # Cancelled: streams whose answer alone came in 3 chunks or more (cancelled after 1 or 2,
    # they end mid-answer).
    cancellable = [r for r in mix if r.stream and expected[r.name][1] >= 3]
    tally = Tally()
    rss = RssSampler(server, args.rss_every)
    rss_before = server.rss_kib()
    metrics_before = metrics(server.port)
    rss.start()
    end = time.monotonic() + args.duration
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients, thread_name_prefix="client") as pool:
        futures = [pool.submit(client, c, server.port, args, mix, cancellable, expected, tally,
                               end) for c in range(args.clients)]
        for f in futures:
            f.result()  # every request has a deadline, so this ends by duration + timeout
    wall = time.perf_counter() - t0
    rss.stop()
    counts = dict(tally.counts)
    counts["server_exited"] = 0 if server.alive() else 1
    warm = rss.at(args.warmup * args.duration)
    end_rss = rss.samples[-1][1] if rss.samples else None
    return {
        "counts": counts, "wall_s": round(wall, 1),
        "answered_per_s": round(counts["answered_ok"] / wall, 2) if wall else None,
        "latency_p50_s": percentile(tally.latencies, 0.5),
        "latency_p95_s": percentile(tally.latencies, 0.95),
        "ttft_p50_s": percentile(tally.ttfts, 0.5), "ttft_p95_s": percentile(tally.ttfts, 0.95),
        "cancellable_requests": len(cancellable),
        "rss_kib": {"before_load": rss_before, "after_warmup": warm, "end": end_rss,
                    "max": max((r for _, r in rss.samples), default=None),
                    "growth_pct": round((end_rss - warm) / warm * 100, 2)
                    if warm and end_rss else None,
                    "samples": [(round(t, 1), r) for t, r in rss.samples]},
        "samples": tally.samples,
        "metrics_before": metrics_before, "metrics_after": metrics(server.port),
    }


# -- the report ------------------------------------------------------------------------------------

def failures(result: dict) -> list[str]:
    counts = result["counts"]
    out = [f"{kind}: {counts[kind]}" for kind in FAILING if counts.get(kind)]
    if not counts["answered_ok"]:
        out.append("nothing was answered")
    return out


def report(header: dict, result: dict) -> str:
    c, rss = result["counts"], result["rss_kib"]

    def mib(kib):
        return fmt(kib / 1024 if kib else None, 1)

    rows = [("sent", c["sent"]), ("answered ok", c["answered_ok"]),
            ("  matched", c["matched"]), ("  mismatched", c["mismatched"]),
            ("cancelled mid-stream", c["cancelled"]),
            ("429", c["http_429"]), ("  429 without Retry-After", c["429_without_retry_after"]),
            ("other 4xx", c["other_4xx"]), ("5xx", c["http_5xx"]),
            ("connection errors", c["connection_errors"]), ("lost (no answer in time)", c["lost"]),
            ("server exited", c["server_exited"])]
    lines = [f"load_serve: {header['clients']} clients, {header['duration_s']} s, model "
             f"{header['model']}, server {' '.join(header['server_flags']) or '(defaults)'}, "
             f"{header['nproc']} CPUs ({header['cpu']}), seed {header['seed']}", "",
             "| what | count |", "|---|---:|"]
    lines += [f"| {name} | {n} |" for name, n in rows]
    lines += ["",
              f"answered {result['answered_per_s']}/s over {result['wall_s']} s; latency of ok "
              f"answers p50 {fmt(result['latency_p50_s'], 3)} s, p95 "
              f"{fmt(result['latency_p95_s'], 3)} s; streams' first content p50 "
              f"{fmt(result['ttft_p50_s'], 3)} s, p95 {fmt(result['ttft_p95_s'], 3)} s",
              f"server RSS: {mib(rss['before_load'])} MiB before the load, "
              f"{mib(rss['after_warmup'])} MiB after warm-up ({header['warmup_pct']}% of the "
              f"duration), {mib(rss['end'])} MiB at the end, max {mib(rss['max'])} MiB; growth "
              f"after warm-up {fmt(rss['growth_pct'], 1)}%"]
    for kind, examples in result["samples"].items():
        lines.append(f"examples of {kind}: " + "; ".join(json.dumps(e) for e in examples[:2]))
    bad = failures(result)
    lines.append("FAIL: " + ", ".join(bad) if bad else "PASS")
    return "\n".join(lines)


def server_flags(args) -> tuple[list[str], list[str]]:
    """The flags passed through to `owl2 serve`, and notes on those it does not have."""
    flags, notes = [], []
    if args.threads is not None:
        flags += ["--threads", str(args.threads)]
    if args.ctx is not None:
        flags += ["--ctx", str(args.ctx)]
    if args.parallel is not None:
        if serve_has("--parallel"):
            flags += ["--parallel", str(args.parallel)]
        else:
            notes.append("owl2 serve has no --parallel in this checkout: not passed")
    if args.max_queue is not None:
        flags += ["--max-queue", str(args.max_queue)]
    return flags, notes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, default=None,
                    help="model folder (default: $OWL2_MODEL, then the demo model)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    ap.add_argument("--parallel", type=int, default=None, help="passed to owl2 serve if it has it")
    ap.add_argument("--max-queue", type=int, default=None, help="passed to owl2 serve")
    ap.add_argument("--threads", type=int, default=None, help="passed to owl2 serve")
    ap.add_argument("--ctx", type=int, default=None, help="passed to owl2 serve")
    ap.add_argument("--max-tokens", type=int, default=24, help="max_tokens of every request")
    ap.add_argument("--cancel", type=float, default=0.10,
                    help="share of requests cancelled mid-stream")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="one request's whole time limit, seconds (past it: lost)")
    ap.add_argument("--rss-every", type=float, default=2.0, help="seconds between RSS samples")
    ap.add_argument("--warmup", type=float, default=0.2,
                    help="share of the duration after which RSS growth is measured")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="the summary as one JSON object")
    args = ap.parse_args()
    if not 1 <= args.clients <= 1024 or args.duration <= 0 or args.timeout <= 0 \
            or not 0 <= args.cancel <= 1 or not 0 <= args.warmup < 1 or args.rss_every <= 0:
        sys.exit("--clients 1..1024, --duration and --timeout > 0, --cancel 0..1, "
                 "--warmup 0..<1, --rss-every > 0")

    from owl2_edge.model_dir import default_model_path
    folder = args.model or default_model_path()
    flags, notes = server_flags(args)
    port = free_port()
    server = ServerProcess(owl2_serve_argv(folder, port, extra=tuple(flags)), port,
                           "/health", "owl2-serve")
    try:
        server.start()
        mix = request_mix(args.seed, args.max_tokens)
        expected = expected_answers(port, mix, args.timeout)
    except RuntimeError as e:
        server.stop()
        print(f"load_serve could not start: {e}\n(server log: {server.log.name})",
              file=sys.stderr)
        return 2
    try:
        result = run_load(server, args, mix, expected)
    finally:
        server.stop()
    header = {**machine(), "model": str(folder), "clients": args.clients,
              "duration_s": args.duration, "server_flags": flags, "seed": args.seed,
              "warmup_pct": round(args.warmup * 100), "distinct_requests": len(mix),
              "max_tokens": args.max_tokens, "cancel": args.cancel, "notes": notes}
    if failures(result):
        notes.append(f"server log: {server.log.name}")
    else:
        server.discard_log()
    if args.json:
        print(json.dumps({"header": header, **result, "failures": failures(result)}))
    else:
        print(report(header, result))
        for note in notes:
            print(f"note: {note}")
    return 1 if failures(result) else 0


if __name__ == "__main__":
    sys.exit(main())
