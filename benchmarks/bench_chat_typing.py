"""The first word after Enter in `owl2 chat` (issue 38, docs/api.md "Warming"): the real CLI in a
real terminal (a pseudo-terminal), a new picture given at the start, the question typed
--delay seconds after the `>>>` prompt appears, and the time from Enter to the answer's first
character on the screen. With the picture read ahead (the default) and without (`--no-warm`:
read when the question is sent, as before), alternating, --rounds times each.

    python benchmarks/bench_chat_typing.py -m MODEL_DIR [--delay 20] [--rounds 3] [--threads 2]
    python benchmarks/bench_chat_typing.py --shape 7b --delay 20     # the 7B shape's folder

Each run is a new process with its own empty disk cache (the picture is new to it). Also
reported: the seconds from the command's start to its prompt. A benchmark, not a test: it
asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "What is in the picture?"


def read_until(fd: int, wanted: bytes, timeout: float, seen: bytearray,
               since: int | None = None) -> float:
    """Read the terminal until `wanted` appears in `seen` past index `since` (default: what
    `seen` holds now); the time it did."""
    start = len(seen) if since is None else since
    deadline = time.monotonic() + timeout
    while wanted not in seen[start:]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {wanted!r} within {timeout:g} s; the screen: "
                               f"{bytes(seen[-400:])!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                raise TimeoutError(f"the chat ended; the screen: {bytes(seen[-400:])!r}")
            seen.extend(chunk)
    return time.perf_counter()


def one_run(model: Path, picture: Path, delay: float, warm: bool, threads: int | None,
            timeout: float) -> tuple[float, float]:
    """(seconds from start to the prompt, seconds from Enter to the answer's first character)."""
    argv = [sys.executable, "-m", "owl2_edge.cli", "chat", str(picture), "-m", str(model),
            "--temperature", "0", "-n", "8"]
    argv += [] if warm else ["--no-warm"]
    argv += ["--threads", str(threads)] if threads else []
    env = dict(os.environ, OWL2_CACHE_DIR=tempfile.mkdtemp(prefix="owl2-typing-"))
    leader, follower = pty.openpty()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=env,
                            close_fds=True)
    os.close(follower)
    seen = bytearray()
    try:
        prompt_at = read_until(leader, b">>> ", timeout, seen)
        time.sleep(delay)                                # the user reads and types
        os.write(leader, QUESTION.encode())
        read_until(leader, QUESTION.encode(), timeout, seen)  # the terminal's echo
        enter = time.perf_counter()
        os.write(leader, b"\r")
        read_until(leader, b"\n", timeout, seen)         # the echo of Enter
        after = len(seen)
        while len(seen) == after:                        # the answer's first bytes
            ready, _, _ = select.select([leader], [], [], timeout)
            if not ready:
                raise TimeoutError("no answer")
            seen.extend(os.read(leader, 4096))
        first = time.perf_counter()
        read_until(leader, b">>> ", timeout, seen, after)  # the answer is over
        os.write(leader, b"/exit\r")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return prompt_at - t0, first - enter


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--shape", default=None, help="a benchmark shape's folder (7b) instead")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--delay", type=float, default=20.0,
                    help="seconds between the prompt and Enter (20: a question typed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()
    if args.shape:
        from owl2_edge.tools.bench.shapes import shape_folder
        model = shape_folder(args.shape, args.quant)
    else:
        from owl2_edge.model_dir import default_model_path
        model = args.model or default_model_path()
    import random

    from owl2_edge import scenes
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_no in range(args.rounds):
            for warm in ((True, False) if round_no % 2 == 0 else (False, True)):
                picture = Path(tmp) / f"picture-{round_no}-{warm}.png"  # new to every run
                scenes.random_scene(random.Random(round_no * 2 + warm), "heldout").draw(
                    448).save(picture)
                results[warm].append(one_run(model, picture, args.delay, warm, args.threads,
                                             args.timeout))
                print(f"round {round_no + 1} · {'warm' if warm else 'no warm'}: prompt after "
                      f"{results[warm][-1][0]:.2f} s, first character "
                      f"{results[warm][-1][1]:.2f} s after Enter", flush=True)
    print(f"\n{model}, delay {args.delay:g} s, {args.rounds} rounds, threads "
          f"{args.threads or 'default'}\n")
    print("| chat | prompt after (median s) | first character after Enter (median s) | runs |")
    print("|---|---:|---:|---:|")
    for warm in (False, True):
        runs = results[warm]
        print(f"| {'read ahead (default)' if warm else '--no-warm (as before)'} | "
              f"{statistics.median(r[0] for r in runs):.2f} | "
              f"{statistics.median(r[1] for r in runs):.2f} | "
              f"{', '.join(f'{r[1]:.2f}' for r in runs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
