"""What refusing a hostile request costs `owl2 serve`: the time to the refusal and the server's
memory after it, for bodies just under the body limit that cannot fit (docs/serve-safety.md).

The server runs as a subprocess on loopback (`owl2 serve --port 0`); each body is sent
`--repeat` times, one at a time, and the report gives the slowest refusal and the server's RSS
(from /proc) before the first and after the last, once the server has had `--settle` seconds to
give memory back. A good request before and after checks that the server still answers.

    python benchmarks/bench_serve_refusals.py [-m MODEL_DIR] [--repeat 3]

A benchmark, not a test: it asserts nothing. Linux only (RSS from /proc). Default model: the
demo model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from owl2_edge.model_dir import default_model_path

MiB = 2**20


def bodies(max_body_bytes: int) -> dict[str, bytes]:
    """Hostile bodies of about 90% of the body limit."""
    size = int(max_body_bytes * 0.9)
    message = {"role": "user", "content": "hi"}
    return {
        "one long message": json.dumps({"messages": [{"role": "user",
                                                      "content": "word " * (size // 5)}]}),
        "300 long messages": json.dumps({"messages": [{"role": "user", "content": "word " *
                                                       (size // 1500)}] * 300}),
        "non-ASCII, escaped": json.dumps({"messages": [{"role": "user",
                                                        "content": "é€" * (size // 12)}]}),
        "a raw prompt": json.dumps({"prompt": "word " * (size // 5)}),
        "[1,1,...] in a field": '{"messages": [%s], "x": [%s1]}' % (json.dumps(message),
                                                                   "1," * (size // 2)),
        "[{},{},...] in a field": '{"messages": [%s], "x": [%s{}]}' % (json.dumps(message),
                                                                      "{}," * (size // 3)),
        "many small messages": json.dumps({"messages": [message] * (size // 32)}),
    }


def post(url: str, path: str, data: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--settle", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    proc = subprocess.Popen([sys.executable, "-m", "owl2_edge.cli", "serve", "-m", model,
                             "--port", "0", "--threads", str(args.threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().split()[2].rstrip("/")
        props = json.loads(urllib.request.urlopen(url + "/props", timeout=60).read())
        limits = props["limits"]

        def rss() -> float:
            with open(f"/proc/{proc.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB

        good = json.dumps({"messages": [{"role": "user", "content": "Say hello."}],
                           "max_tokens": 4, "temperature": 0}).encode()
        assert post(url, "/v1/chat/completions", good)[0] == 200
        print(f"owl2 serve on {props['model']['id']} (n_ctx {props['model']['n_ctx']}; body "
              f"limit {limits['max_body_bytes'] / MiB:g} MiB; prompts over "
              f"{limits['max_prompt_chars']:,} characters and bodies over "
              f"{limits['max_json_values']:,} JSON values refused unread)")
        print("| body | size | status | code | slowest (fastest) refusal of %d | server RSS before -> after |"
              % args.repeat)
        print("|---|---:|---:|---|---:|---:|")
        for name, text in bodies(limits["max_body_bytes"]).items():
            data = text.encode()
            path = "/v1/completions" if name.startswith("a raw") else "/v1/chat/completions"
            before, times = rss(), []
            for _ in range(args.repeat):
                start = time.perf_counter()
                status, reply = post(url, path, data)
                times.append(time.perf_counter() - start)
            time.sleep(args.settle)
            code = json.loads(reply).get("error", {}).get("code") if status >= 400 else "-"
            print(f"| {name} | {len(data) / MiB:.1f} MiB | {status} | {code} | "
                  f"{max(times):.3f} s ({min(times):.3f} fastest) | {before:.0f} -> {rss():.0f} MB |")
        assert post(url, "/v1/chat/completions", good)[0] == 200
        print(f"a good request after them: answered; server RSS {rss():.0f} MB")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
