"""Throughput and latency of `owl2 serve` with C concurrent clients, against the same requests
sent one after another, and optionally against llama-cpp-python's own OpenAI server.

For each client count C (--clients 1,2,4): C clients each send --requests-per-client streamed,
greedy requests of --tokens tokens (ignore_eos, so every answer has that many), all started at
once; then the same C x R requests go one after another from one client (the "sequential"
baseline, on the same server). Reported per C, as medians over --rounds: generated tokens per
wall second, its ratio to sequential, p50/p95 time to first token and p50/p95 gaps between
content chunks (measured from the server-sent events as they arrive), and errors.

Requests: text-only by default, on /v1/completions with a plain prompt, for our server and the
baseline alike (a base LLaMA GGUF has no chat template, so the completions endpoint is the fair
common ground). --images mixes in picture questions (every other request, generated scenes as
data: URLs) on /v1/chat/completions; the baseline is text-only, so --images and --baseline-llama
do not go together. Answers are made to run --tokens long: our server takes ignore_eos, the
baseline takes logit_bias {eos: -1e9} (llama-cpp-python has no ignore_eos); completion tokens
are taken from usage where a server sends it.

The server is started here on a free loopback port (`owl2 serve -m MODEL --port P --threads T
--ctx X`, plus --parallel C when this checkout's `owl2 serve` has that option: then each client
count gets its own server with C slots), warmed up with one short request, and stopped by its
PID. Rounds interleave the servers: ours, baseline, ours, baseline.

    # the demo model, text-only, clients 1,2,4 (default)
    python benchmarks/bench_concurrency.py
    # 8-layer 2048-wide Q4_0 decoder, random weights (built once into ~/.cache/owl2-edge/bench)
    python benchmarks/bench_concurrency.py --shape 8x2048 --clients 1,2,4 --tokens 128
    # the release's 7B shape (built once by owl2_edge.tools.bench.shapes: long, ~16 GB disk)
    python benchmarks/bench_concurrency.py --shape 7b --clients 1,2,4,8 --tokens 128
    # against llama-cpp-python's server on the same base GGUF, 2 interleaved rounds
    python benchmarks/bench_concurrency.py --shape 8x2048 --baseline-llama --rounds 2
    # smoke: python benchmarks/bench_concurrency.py --clients 1,2 --tokens 16 --rounds 1

The baseline needs llama_cpp.server's extras (fastapi, sse-starlette, starlette-context,
pydantic-settings). When the project's venv lacks them, a throwaway venv is made once at
/tmp/llama-server-venv (--system-site-packages, the extras only, the same llama_cpp through a
.pth file); if that fails the report says "baseline unavailable: <why>".

A benchmark, not a test: it asserts nothing about time. --json prints every number instead.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from serve_clients import (ServerProcess, fmt, free_port, machine, owl2_serve_argv, percentile,
                           picture_messages, post, scene_pictures, serve_has)

# Prompts that differ from the first word on (no server can answer one from another's cache).
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three most important ideas in the history of mathematics are",
    "Write a long letter to a friend describing your journey across the mountains:",
    "Here is a detailed recipe for bread, step by step. First,",
    "In the year 2150, the first city on Mars had grown to",
    "A complete guide to keeping bees begins with the hive itself.",
    "Dear diary, today was the strangest day of my life because",
    "The history of the bicycle is longer than most people think:",
]
PICTURES = 4
RUN_IDS = itertools.count(1)  # each run's requests are tagged with its own number (workload)
LLAMA_VENV = Path("/tmp/llama-server-venv")
LLAMA_EXTRAS = ["fastapi", "uvicorn", "sse-starlette", "starlette-context", "pydantic-settings"]
# Positions a request may take besides its answer: a prompt above (~30 tokens) or a picture
# question (65 image positions and the template) with room to spare.
PROMPT_BUDGET, PICTURE_BUDGET = 64, 128


# -- the model -------------------------------------------------------------------------------------

def model_folder(model: Path | None, shape: str | None, quant: str) -> Path:
    """-m, else the built (cached) shape, else the demo model."""
    from owl2_edge.model_dir import default_model_path
    if model is not None and shape is not None:
        sys.exit("give -m MODEL_DIR or --shape, not both")
    if shape is None:
        return model or default_model_path()
    match = re.fullmatch(r"(\d+)x(\d+)", shape)
    if match:
        return custom_shape_folder(int(match[1]), int(match[2]), quant)
    from owl2_edge.tools.bench import shapes  # the named ones: 7b, 1b (tiny for the tests)
    return shapes.shape_folder(shape, quant, progress=_progress)


def custom_shape_config(layers: int, width: int):
    """LAYERSxWIDTH: a LLaMA decoder of that depth and width with LLaMA-2's proportions (heads
    of 128, full multi-head K/V, FFN 2.75 x width rounded up to 256, vocabulary 32000) and the
    tiny test vision tower, whose abstractor still gives an image 65 decoder positions as the
    release's does. Speed depends on shapes and types only, so random weights do."""
    from owl2_edge.convert import tiny
    if width % 256 or width < 256 or layers < 1:
        sys.exit(f"--shape {layers}x{width}: the width must be a multiple of 256 (K-quant "
                 f"blocks; heads of 128)")
    ffn = -(-int(width * 2.75) // 256) * 256
    heads = width // 128
    return tiny.tiny_config(
        text={"vocab_size": 32000, "hidden_size": width, "intermediate_size": ffn,
              "num_layers": layers, "num_heads": heads, "num_kv_heads": heads},
        abstractor={"num_queries": 64})


def custom_shape_folder(layers: int, width: int, quant: str) -> Path:
    """Built once into <bench cache>/<L>x<W>-<quant>/model (as shapes.shape_folder keeps the
    named shapes), with shape.json beside it; rebuilt only when the shape's definition changed."""
    from owl2_edge import names
    from owl2_edge.convert import tiny
    from owl2_edge.convert.converter import convert
    from owl2_edge.model_dir import staged_folder
    from owl2_edge.quant import check_quant
    from owl2_edge.tools.bench import shapes
    quant = check_quant(quant)
    config = custom_shape_config(layers, width)
    described = {"config": config.to_config_dict(), "preprocessor": config.to_preprocessor_dict()}
    entry = shapes.cache_root() / f"{layers}x{width}-{quant}"
    model, shape_file = entry / "model", entry / "shape.json"
    if (model / names.MANIFEST_FILE).is_file() and shape_file.is_file():
        if json.loads(shape_file.read_text()) == described:
            return model
    print(f"building {layers}x{width} {quant} (random weights) into {entry} ...", file=sys.stderr)
    # A hidden folder renamed at the end: an interrupted build is never taken for a cached one.
    with staged_folder(entry) as work:
        tiny.make_tiny_checkpoint(work / "checkpoint", config=config, seed=0)
        convert(work / "checkpoint", work / "model", quant=quant, vision=("fp32",),
                progress=_progress)
        shutil.rmtree(work / "checkpoint")
        (work / "shape.json").write_text(json.dumps(described, indent=1) + "\n")
    return model


def _progress(stage: str, done: int, total: int) -> None:
    if done == total or done == 0:
        print(f"  {stage}: {done}/{total}", file=sys.stderr)


# -- the servers -----------------------------------------------------------------------------------

class Owl2Server:
    """`owl2 serve` on the model folder; with --parallel C where the option exists."""
    name = "owl2 serve"

    def __init__(self, model: Path, threads: int, ctx: int | None, tokens: int, images: bool):
        self.model, self.threads, self.ctx_arg, self.tokens = model, threads, ctx, tokens
        self.images = images
        self.parallel = serve_has("--parallel")

    def ctx(self, clients: int) -> int:
        """--ctx, else room for every slot's prompt and answer, and at least what owl2 serve
        asks of each slot (SLOT_POSITIONS) and its own default (2048)."""
        if self.ctx_arg:
            return self.ctx_arg
        per_slot = max(min_slot_positions(),
                       self.tokens + (PICTURE_BUDGET if self.images else PROMPT_BUDGET))
        slots = clients if self.parallel else 1
        return max(2048, -(-slots * per_slot // 256) * 256)

    def argv(self, port: int, clients: int) -> list[str]:
        return owl2_serve_argv(self.model, port, self.threads, self.ctx(clients),
                               parallel=clients if self.parallel else None,
                               max_queue=max(16, clients * 2))

    def process(self, port: int, clients: int) -> ServerProcess:
        return ServerProcess(self.argv(port, clients), port, "/health", "owl2-serve")

    def extras(self) -> dict:
        return {"ignore_eos": True}


def min_slot_positions() -> int:
    """The fewest positions `owl2 serve` gives one --parallel slot (it refuses a --ctx below
    that times --parallel)."""
    try:
        from owl2_edge.cli import serve
        return int(getattr(serve, "SLOT_POSITIONS", 512))
    except ImportError:
        return 512


class LlamaServer:
    """llama-cpp-python's OpenAI server on the model folder's base GGUF (one request at a time:
    it holds one llama context behind a lock)."""
    name = "llama_cpp.server"
    parallel = False

    def __init__(self, python: str, model: Path, threads: int, ctx: int):
        manifest = json.loads((model / "owl2.json").read_text())
        self.gguf = model / manifest["decoder_file"]  # the base GGUF: stock llama.cpp loads it
        self.eos_id = manifest["decoder"]["eos_id"]
        self.python, self.threads, self._ctx = python, threads, ctx

    def ctx(self, clients: int) -> int:
        return self._ctx

    def argv(self, port: int, clients: int) -> list[str]:
        return [self.python, "-m", "llama_cpp.server", "--model", str(self.gguf),
                "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(self.threads),
                "--n_threads_batch", str(self.threads), "--n_ctx", str(self._ctx),
                # Its default cuts a running answer short whenever another request arrives.
                "--interrupt_requests", "False"]

    def process(self, port: int, clients: int) -> ServerProcess:
        return ServerProcess(self.argv(port, clients), port, "/v1/models", "llama-server")

    def extras(self) -> dict:
        # No ignore_eos in llama-cpp-python: the end token is made impossible instead.
        return {"logit_bias": {str(self.eos_id): -1e9}}


def baseline_python() -> tuple[str | None, str]:
    """A python whose `import llama_cpp.server.app` works (this one, else the throwaway venv,
    made here if needed), or None and why not."""
    probe = "import llama_cpp.server.app"
    if _imports(sys.executable, probe):
        return sys.executable, "the project's venv"
    venv_python = LLAMA_VENV / "bin" / "python"
    if not venv_python.exists():
        try:
            _make_llama_venv()
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"could not make {LLAMA_VENV}: {e}"
    if _imports(str(venv_python), probe):
        return str(venv_python), str(LLAMA_VENV)
    why = subprocess.run([str(venv_python), "-c", probe], capture_output=True, text=True,
                         timeout=120).stderr.strip().splitlines()
    return None, f"{venv_python}: {why[-1] if why else 'import llama_cpp.server failed'}"


def _imports(python: str, code: str) -> bool:
    try:
        return subprocess.run([python, "-c", code], capture_output=True,
                              timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _make_llama_venv() -> None:
    """A venv with llama_cpp.server's extras only; the project's llama_cpp (and everything else
    it has) stays visible through a .pth file placed after the venv's own packages, so the
    project's venv is never written to."""
    print(f"making {LLAMA_VENV} for the baseline's server extras ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(LLAMA_VENV)],
                   check=True, timeout=300)
    python = str(LLAMA_VENV / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                         "['purelib'])"], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()
    Path(site, "zz-owl2-project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", *LLAMA_EXTRAS], check=True,
                   timeout=600)


# -- the requests ----------------------------------------------------------------------------------

def workload(n: int, tokens: int, images: bool, run_id: int) -> list[tuple[str, dict]]:
    """n requests (path, body): prompts in turn; with images, every other one a picture
    question on the chat endpoint. Every request of every run is new to the server: each prompt
    starts with its own tag "(run.request)" and each run draws its own pictures, so no run is
    answered from the prompt or image caches that an earlier run (the concurrent one before the
    sequential one, say) left behind. The runs' requests differ in nothing else."""
    pictures = scene_pictures(PICTURES, seed=1000 + run_id) if images else []
    out = []
    for i in range(n):
        body = {"max_tokens": tokens, "temperature": 0, "stream": True}
        if images and i % 2 == 1:
            url, questions = pictures[(i // 2) % len(pictures)]
            body["messages"] = picture_messages(url, questions[(i // 2) % len(questions)])
            out.append(("/v1/chat/completions", body))
        else:
            prompt = f"({run_id:03d}.{i:03d}) {PROMPTS[i % len(PROMPTS)]}"
            out.append(("/v1/completions", {**body, "prompt": prompt}))
    return out


def with_extras(request: tuple[str, dict], extras: dict) -> tuple[str, dict]:
    return request[0], {**request[1], **extras}


def run_concurrent(port: int, requests: list[tuple[str, dict]], clients: int, timeout_s: float
                   ) -> tuple[list, float]:
    """`clients` threads, each sending its share of the requests one after another, all started
    at the same moment; the results in request order and the wall time of the whole."""
    per_client = len(requests) // clients
    results: list = [None] * len(requests)
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start.wait()
        for i in range(c * per_client, (c + 1) * per_client):
            path, body = requests[i]
            results[i] = post(port, path, body, timeout_s)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def run_sequential(port: int, requests: list[tuple[str, dict]], timeout_s: float
                   ) -> tuple[list, float]:
    t0 = time.perf_counter()
    results = [post(port, path, body, timeout_s) for path, body in requests]
    return results, time.perf_counter() - t0


def summary(results: list, wall_s: float, max_tokens: int) -> dict:
    ok = [r for r in results if r.kind == "ok"]
    tokens = sum(r.tokens or 0 for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [g for r in ok for g in r.gaps_s]
    return {
        "requests": len(results), "errors": len(results) - len(ok),
        "usage_missing": sum(r.usage_missing for r in ok),
        # Answers shorter than asked (ignore_eos not honoured, or cut by the server).
        "short_answers": sum((r.tokens or 0) < max_tokens for r in ok),
        "error_kinds": sorted({f"{r.kind} {r.status}: {(r.error or '')[:200]}"
                               for r in results if r.kind != "ok"}),
        "tokens": tokens, "wall_s": wall_s, "tok_per_s": tokens / wall_s if wall_s else None,
        "tokens_per_request": statistics.mean([r.tokens or 0 for r in ok]) if ok else None,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
        "itl_p50_s": percentile(gaps, 0.5), "itl_p95_s": percentile(gaps, 0.95),
    }


def raw(results: list) -> list[dict]:
    """Each request's numbers for --json (the text left out; gaps in ms, rounded)."""
    out = []
    for r in results:
        row = asdict(r)
        row.pop("text")
        row["gaps_ms"] = [round(g * 1e3, 3) for g in row.pop("gaps_s")]
        out.append(row)
    return out


# -- the rounds ------------------------------------------------------------------------------------

@dataclass
class Run:
    round: int
    server: str
    clients: int
    parallel: int | None
    ctx: int
    concurrent: dict
    sequential: dict


def measure(server, counts: list[int], per_client: int, tokens: int, images: bool,
            timeout_s: float, round_no: int, keep_raw: bool) -> list[Run]:
    """Every client count on this server (a new process only when its command line changes:
    with --parallel, one per client count)."""
    runs, process, command = [], None, None
    try:
        for clients in counts:
            if process is None or server.argv(0, clients) != command:
                if process is not None:
                    process.stop()
                    process.discard_log()
                process = server.process(free_port(), clients).start()
                command = server.argv(0, clients)  # the same but for the port
                warm_up(process.port, tokens, server.extras())
            port = process.port
            n = clients * per_client
            requests = [with_extras(r, server.extras())
                        for r in workload(n, tokens, images, next(RUN_IDS))]
            conc, conc_wall = run_concurrent(port, requests, clients, timeout_s)
            requests = [with_extras(r, server.extras())
                        for r in workload(n, tokens, images, next(RUN_IDS))]
            seq, seq_wall = run_sequential(port, requests, timeout_s)
            run = Run(round_no, server.name, clients, clients if server.parallel else None,
                      server.ctx(clients), summary(conc, conc_wall, tokens),
                      summary(seq, seq_wall, tokens))
            if keep_raw:
                run.concurrent["raw"], run.sequential["raw"] = raw(conc), raw(seq)
            runs.append(run)
            if not process.alive():
                # Counted as an error of this run; the next client count starts a new server.
                run.concurrent["errors"] += 1
                run.concurrent["error_kinds"].append(f"server exited (log: {process.log.name}): "
                                                     + process.log_tail(500))
                process = None
            print(f"round {round_no} · {server.name} · {clients} client(s): "
                  f"{fmt(run.concurrent['tok_per_s'])} tok/s vs sequential "
                  f"{fmt(run.sequential['tok_per_s'])}, errors {run.concurrent['errors']}"
                  f"+{run.sequential['errors']}", file=sys.stderr)
    finally:
        if process is not None:
            process.stop()
            process.discard_log()
    return runs


def warm_up(port: int, tokens: int, extras: dict) -> None:
    """One answer as long as the measured ones, not measured: pages the weights in, lets the
    server allocate what an answer of that length needs."""
    result = post(port, "/v1/completions", {"prompt": "Hello", "max_tokens": tokens,
                                            "temperature": 0, "stream": True, **extras}, 1200)
    if result.kind != "ok":
        print(f"warm-up request failed: {result.kind} {result.status} {result.error}",
              file=sys.stderr)


def table(runs: list[Run]) -> list[dict]:
    """One row per (server, client count): medians over rounds; errors summed."""
    rows = []
    for key in dict.fromkeys((r.server, r.clients) for r in runs):
        group = [r for r in runs if (r.server, r.clients) == key]

        def median(part: str, name: str):
            values = [getattr(r, part)[name] for r in group if getattr(r, part)[name] is not None]
            return statistics.median(values) if values else None

        ratios = [r.concurrent["tok_per_s"] / r.sequential["tok_per_s"] for r in group
                  if r.concurrent["tok_per_s"] and r.sequential["tok_per_s"]]
        rows.append({
            "server": key[0], "clients": key[1], "parallel": group[0].parallel,
            "rounds": len(group), "tok_per_s": median("concurrent", "tok_per_s"),
            "ratio_to_sequential": statistics.median(ratios) if ratios else None,
            "sequential_tok_per_s": median("sequential", "tok_per_s"),
            "ttft_p50_s": median("concurrent", "ttft_p50_s"),
            "ttft_p95_s": median("concurrent", "ttft_p95_s"),
            "itl_p50_s": median("concurrent", "itl_p50_s"),
            "itl_p95_s": median("concurrent", "itl_p95_s"),
            "tokens_per_request": median("concurrent", "tokens_per_request"),
            "errors": sum(r.concurrent["errors"] + r.sequential["errors"] for r in group),
            "usage_missing": sum(r.concurrent["usage_missing"] + r.sequential["usage_missing"]
                                 for r in group),
            "short_answers": sum(r.concurrent["short_answers"] + r.sequential["short_answers"]
                                 for r in group),
        })
    return rows


def markdown(header: dict, rows: list[dict], notes: list[str]) -> str:
    lines = [f"machine: {header['nproc']} CPUs ({header['cpu']}), threads {header['threads']}, "
             f"shape {header['shape']}, model {header['model']} ({header['quant']}), "
             f"{header['tokens']} tokens a request, {header['requests_per_client']} request(s) a "
             f"client, {header['rounds']} round(s), {header['requests']}", ""]
    lines += ["| server | clients | --parallel | tok/s | × sequential | sequential tok/s | "
              "TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | tokens/req | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['parallel'] or '-'} | {fmt(r['tok_per_s'])} | "
            f"{fmt(r['ratio_to_sequential'], 2)} | {fmt(r['sequential_tok_per_s'])} | "
            f"{fmt(r['ttft_p50_s'], 1, 1e3)} | {fmt(r['ttft_p95_s'], 1, 1e3)} | "
            f"{fmt(r['itl_p50_s'], 2, 1e3)} | {fmt(r['itl_p95_s'], 2, 1e3)} | "
            f"{fmt(r['tokens_per_request'], 0)} | {r['errors']} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def row_notes(rows: list[dict]) -> list[str]:
    """What the numbers alone do not say: answers without usage, answers cut short."""
    missing = {r["server"] for r in rows if r["usage_missing"]}
    notes = [f"{server}: some answers came without usage (or with 0 completion tokens): their "
             f"tokens are max_tokens when cut by length, else one per chunk"
             for server in sorted(missing)]
    return notes + [f"{r['server']}, {r['clients']} client(s): {r['short_answers']} answer(s) "
                    f"shorter than max_tokens" for r in rows if r["short_answers"]]


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"--clients {text!r}: comma-separated numbers, e.g. 1,2,4")
    if not counts or any(c < 1 or c > 256 for c in counts):
        sys.exit(f"--clients {text!r}: each between 1 and 256")
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, default=None,
                    help="model folder (default: $OWL2_MODEL, then the demo model)")
    ap.add_argument("--shape", default=None,
                    help="LAYERSxWIDTH (e.g. 8x2048) or a named shape (7b, 1b): random weights, "
                         "built once into the bench cache")
    ap.add_argument("--quant", default="Q4_0", help="with --shape: the decoder's type (Q4_0)")
    ap.add_argument("--clients", default="1,2,4", help="client counts (1,2,4; 1,2,4,8 for 7B)")
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens of every answer")
    ap.add_argument("--threads", type=int, default=None,
                    help="server threads (default: owl2's physical-core count)")
    ap.add_argument("--ctx", type=int, default=None,
                    help="context positions (default: 2048, more when --parallel slots need it)")
    ap.add_argument("--images", action="store_true", help="every other request a picture question")
    ap.add_argument("--baseline-llama", action="store_true",
                    help="also llama-cpp-python's server on the base GGUF, interleaved")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200.0,
                    help="one request's whole time limit, seconds")
    ap.add_argument("--json", action="store_true", help="every number (per request too) as JSON")
    args = ap.parse_args()
    counts = parse_counts(args.clients)
    if args.images and args.baseline_llama:
        sys.exit("--images and --baseline-llama: the baseline is text-only; run them separately")
    if args.tokens < 1 or args.requests_per_client < 1 or args.rounds < 1:
        sys.exit("--tokens, --requests-per-client and --rounds must be at least 1")

    from owl2_edge import _decoder
    folder = model_folder(args.model, args.shape, args.quant)
    threads = args.threads or _decoder.default_n_threads()
    ours = Owl2Server(folder, threads, args.ctx, args.tokens, args.images)
    servers, notes = [ours], []
    if not ours.parallel:
        notes.append("owl2 serve has no --parallel in this checkout: it answers one request at a "
                     "time and queues the rest")
    if args.baseline_llama:
        python, where = baseline_python()
        if python is None:
            notes.append(f"baseline unavailable: {where}")
        else:
            servers.append(LlamaServer(python, folder, threads, ours.ctx(max(counts))))
            notes.append(f"baseline: llama_cpp.server from {where}, /v1/completions, "
                         f"logit_bias {{eos: -1e9}} in place of ignore_eos")
    notes.append("text requests: /v1/completions with a plain prompt; picture questions: "
                 "/v1/chat/completions" if args.images else
                 "requests: /v1/completions with a plain prompt (text-only), streamed, greedy")
    notes.append("ITL: gaps between content chunks as they arrive; TTFT: request sent -> first "
                 "content chunk; tok/s: completion tokens of all answers / wall time of the batch")

    runs: list[Run] = []
    try:
        for round_no in range(1, args.rounds + 1):
            for server in servers:  # interleaved: ours, baseline, ours, baseline
                runs += measure(server, counts, args.requests_per_client, args.tokens,
                                args.images, args.timeout, round_no, args.json)
    except RuntimeError as e:  # a server that did not start: its log's tail says why
        print(f"bench_concurrency stopped: {e}", file=sys.stderr)
        return 2
    header = {**machine(), "threads": threads, "shape": args.shape or "-",
              "model": str(folder), "quant": _quant(folder), "tokens": args.tokens,
              "requests_per_client": args.requests_per_client, "rounds": args.rounds,
              "requests": "text and pictures" if args.images else "text only"}
    rows = table(runs)
    notes += row_notes(rows)
    if args.json:
        print(json.dumps({"header": header, "table": rows, "notes": notes,
                          "runs": [asdict(r) for r in runs]}))
    else:
        print(markdown(header, rows, notes))
    return 0


def _quant(folder: Path) -> str:
    try:
        return json.loads((folder / "owl2.json").read_text()).get("quant", "?")
    except (OSError, ValueError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
