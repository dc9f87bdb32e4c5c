"""What hostile constraints cost another client of `owl2 serve` (issue 36, docs/structured.md,
"Bounds"): a victim's time to first token with the server idle, against the same while
attackers keep sending constraints that are refused (each bound of BOUNDS broken) or that
compile slowly within the bounds (999 alternatives, a 3,000-value enum, each made unique so that
the compile cache never helps).

The server runs as a subprocess on loopback (`owl2 serve --port 0 --parallel 4`: more slots
than clients, so that what is measured is the constraints' cost, not a wait for a slot; the
attackers' allowed requests ask for one token). The victim
sends --requests streamed, greedy requests one after another and times each first content
chunk; phases alternate idle, loaded, attacked (--rounds times), so that the machine's drift
falls on all three. The attackers are processes of their own (a real attacker's work is not
in the victim's process). Two controls: "loaded", the same attackers send ordinary requests (no
constraint, one token): on 2 cores any other client's work takes CPU from the victim, constraint
or not; "refused", they send the very bodies of the attack, each refused for an ordinary field
(`stream` not a flag, checked before the constraint is read): what receiving, parsing and
refusing a body costs, with the constraint's own work taken out. Reported: p50 and p95 time to
first token per phase, attacked against idle and against each control, and the attackers'
requests by status (every one must be 200 or 400: a 5xx is counted as a finding).

    python benchmarks/bench_hostile_constraints.py [-m MODEL_DIR] [--requests 40] [--rounds 2]
                                                   [--attacker-nice 0] [--only all]

A benchmark, not a test: it asserts nothing about time. Traffic goes to 127.0.0.1 only, bounded
by --requests and --rounds. Default model: the demo model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import multiprocessing
import time
import urllib.error
import urllib.request

from owl2_edge.model_dir import default_model_path


def hostile_bodies(k: int, only: str = "all") -> list[dict]:
    """The k-th attacker request's constraints: every bound broken once, and two compiles that
    are slow but allowed (unique per k); `only` "refused" or "allowed" keeps one kind."""
    many = " | ".join(f'"w{i}x{k}"' for i in range(999))
    refused = [
        {"grammar": "root ::= " + " | ".join(f'"w{i}"' for i in range(20000))},
        {"grammar": "root ::= " + " | ".join(f'"v{i}"' for i in range(3000))},
        {"grammar": 'root ::= "a"{1000000}'},
        {"json_schema": {"type": "string", "pattern": "^a{1000000}$"}},
        {"json_schema": {"$ref": "#"}},
        {"json_schema": {"type": "string", "minLength": 10**9}},
    ]
    allowed = [
        {"grammar": f"root ::= {many}"},
        {"json_schema": {"enum": [f"e{i}-{k}" for i in range(3000)]}},
    ]
    return {"all": refused + allowed, "refused": refused, "allowed": allowed}[only]


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, str]:
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def attack(url: str, phase: str, worker: int, n_attackers: int, stop, ready, reports,
           nice: int = 0, only: str = "all") -> None:
    """One attacker, in its own process (so that its requests' JSON work does not hold the
    measuring process's GIL): once started (`ready` released: a process's start-up must not
    fall on the victim's first requests), hostile bodies in the attacked phase, ordinary ones
    in the loaded phase, until `stop`; then its replies by status on `reports`. `nice`: its own
    OS priority (19 stands in for an attacker on another machine: its client's work then takes
    only what the server and the victim leave, and what the server does for it still counts)."""
    os.nice(nice)
    statuses: dict[int, int] = {}
    k = worker
    hostile_bodies(k, only)  # built once before the phase: the bodies of the first round are ready
    ready.release()
    while not stop.is_set():
        if phase == "loaded":
            bodies = [{}] * 8
        else:
            bodies = hostile_bodies(k, only)
            if phase == "refused":  # the same bodies, refused before the constraint is read
                bodies = [{**fields, "stream": "not a flag"} for fields in bodies]
        for fields in bodies:
            status, _ = post(url, {"model": "owl2", "max_tokens": 1,
                                   "messages": [{"role": "user", "content": "Go."}], **fields})
            statuses[status] = statuses.get(status, 0) + 1
            if stop.is_set():
                break
        k += n_attackers
    reports.put(statuses)


def first_token_seconds(url: str, tokens: int) -> float:
    body = {"model": "owl2", "stream": True, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "messages": [{"role": "user", "content": "Tell me a story."}]}
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(request, timeout=120) as r:
        for line in r:
            if first is None and line.startswith(b"data: {") and b'"content"' in line:
                first = time.perf_counter() - start
    return first if first is not None else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--requests", type=int, default=40, help="victim requests per phase")
    parser.add_argument("--rounds", type=int, default=2, help="idle/attacked pairs")
    parser.add_argument("--attackers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attacker-nice", type=int, default=0,
                        help="the attacker processes' OS priority (19: as if on another machine)")
    parser.add_argument("--only", choices=("all", "refused", "allowed"), default="all",
                        help="the hostile constraints sent: all, or only those refused or allowed")
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    proc = subprocess.Popen([sys.executable, "-m", "owl2_edge.cli", "serve", "-m", model,
                             "--port", "0", "--threads", str(args.threads), "--parallel", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    statuses: dict[int, int] = {}
    spawn = multiprocessing.get_context("spawn")
    reports = spawn.Queue()
    try:
        url = proc.stdout.readline().split()[2].rstrip("/")
        first_token_seconds(url, args.tokens)  # warm up
        phases: dict[str, list[float]] = {"idle": [], "loaded": [], "refused": [],
                                          "attacked": []}
        for _ in range(args.rounds):
            for phase in phases:
                stop, ready = spawn.Event(), spawn.Semaphore(0)
                attackers = [spawn.Process(target=attack, daemon=True,
                                           args=(url, phase, w, args.attackers, stop, ready,
                                                 reports, args.attacker_nice, args.only))
                             for w in range(args.attackers if phase != "idle" else 0)]
                for p in attackers:
                    p.start()
                for _ in attackers:
                    ready.acquire()
                time.sleep(0.5)  # the attack under way
                phases[phase] += [first_token_seconds(url, args.tokens)
                                  for _ in range(args.requests)]
                stop.set()
                for _ in attackers:
                    for status, n in reports.get(timeout=300).items():
                        statuses[status] = statuses.get(status, 0) + n
                for p in attackers:
                    p.join(60)

        def pct(values, q):
            values = sorted(values)
            return values[min(len(values) - 1, int(q * len(values)))]
        props = json.loads(urllib.request.urlopen(url + "/props", timeout=60).read())
        print(f"owl2 serve on {props['model']['id']}, {args.threads} threads, parallel 4; "
              f"{args.attackers} attackers at nice {args.attacker_nice} ({args.only}); {args.rounds} x {args.requests} victim requests "
              f"per phase")
        print("| phase | p50 first token | p95 first token |")
        print("|---|---:|---:|")
        for phase, values in phases.items():
            print(f"| {phase} | {statistics.median(values) * 1e3:.1f} ms | "
                  f"{pct(values, 0.95) * 1e3:.1f} ms |")
        for base in ("idle", "loaded", "refused"):
            print(f"attacked / {base}: p95 "
                  f"{pct(phases['attacked'], .95) / pct(phases[base], .95):.2f}, p50 "
                  f"{statistics.median(phases['attacked']) / statistics.median(phases[base]):.2f}")
        print(f"attackers' replies by status: {dict(sorted(statuses.items()))}")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
