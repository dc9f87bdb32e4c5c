"""`owl2 bench`'s plan and its rounds: which processes each round starts, in which order, and
what each brings back.

Every measurement is a process of its own (bench/workers.py, or the real `owl2 ask`), so its
peak memory is its own and nothing one engine leaves behind (caches, threads, mapped files)
helps or hinders the next. A round runs every job once; the next round starts one job later in
the list (the order rotates), so that a slow moment of a shared machine falls on all of them
alike, and the report takes medians.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from owl2_edge import names
from owl2_edge.tools.bench import shapes, workers
from owl2_edge.errors import ArgumentError, Owl2Error
from owl2_edge.model_dir import Manifest

# What --only chooses from: the decoder alone, the vision files, asking (ours and stock).
GROUPS = ("decoder", "vision", "ask")
# `owl2 ask`'s answer lengths: one token (start to first token, as one-shot use sees it) and a
# long answer.
ASK_TOKENS = (1, 128)

# The rows, by the name each job's result is filed under (the report reads them by these).
LLAMA_CPP_DECODER, OURS_DECODER = "decoder/llama.cpp", "decoder/ours"
TORCH_VISION = "vision/torch"
STOCK_ASK, OURS_ASK = "ask/stock", "ask/ours"


def vision_row(variant: str) -> str:
    return f"vision/{variant}"


def ask_cli_row(n_tokens: int) -> str:
    return f"ask/ours-cli-{n_tokens}"


def child_env() -> dict:
    """The environment of a job: `python -m` would put the working directory first on the
    module path (Python 3.11+: PYTHONSAFEPATH stops it), and run a source checkout's owl2_edge
    there instead of the installed one."""
    return {**os.environ, "PYTHONSAFEPATH": "1"}


@dataclass(frozen=True)
class Job:
    key: str                  # the row it fills, e.g. "decoder/ours"
    argv: tuple[str, ...]     # the process to start
    # `owl2 ask -n 1`: its exit comes right after its first token, so its wall time is its
    # process start -> first token (its teardown included: in theirs' favour).
    exits_at_first_token: bool = False


@dataclass(frozen=True)
class Plan:
    folder: Path
    threads: int
    device: str
    jobs: tuple[Job, ...]
    skipped: dict[str, str]   # row -> why it does not run


def parse_groups(only: str | None) -> tuple[str, ...]:
    """--only's comma-separated groups (all of them when None)."""
    if only is None:
        return GROUPS
    chosen = tuple(dict.fromkeys(part.strip() for part in only.split(",") if part.strip()))
    unknown = [g for g in chosen if g not in GROUPS]
    if unknown or not chosen:
        raise ArgumentError(f"--only {only!r}: choose from {', '.join(GROUPS)}, comma-separated")
    return chosen


@contextlib.contextmanager
def sample_picture() -> Iterator[Path]:
    """The built-in sample picture saved as a PNG, for `owl2 ask` to read, while the block runs."""
    from owl2_edge.tools.demo_image import sample_image
    with tempfile.TemporaryDirectory(prefix="owl2-bench-") as folder:
        path = Path(folder) / "sample.png"
        sample_image().save(path)
        yield path


def plan(folder: Path, threads: int, device: str, groups: tuple[str, ...], picture: Path) -> Plan:
    """The jobs of one round, in their order: the baseline before ours in each group. `picture`:
    the image `owl2 ask` is asked about (the workers draw the same one themselves)."""
    manifest = Manifest.load(folder)  # a missing or broken folder fails here, in one line
    jobs: list[Job] = []
    skipped: dict[str, str] = {}

    def worker(key: str, kind: str, *extra: str) -> Job:
        return Job(key, (sys.executable, "-m", "owl2_edge.tools.bench.workers", kind, str(folder),
                         "--threads", str(threads), "--device", device, *extra))

    if "decoder" in groups:
        jobs += [worker(LLAMA_CPP_DECODER, "decoder-llama.cpp"),
                 worker(OURS_DECODER, "decoder-ours")]
    if "vision" in groups:
        jobs += [worker(vision_row(v), "vision", "--variant", v)
                 for v in names.VISION_VARIANTS if v in manifest.vision_files]
        why_not = _why_no_torch_row(folder)
        if why_not:
            skipped[TORCH_VISION] = why_not
        else:
            jobs.append(worker(TORCH_VISION, "vision-torch"))
    if "ask" in groups:
        jobs += [worker(STOCK_ASK, "stock"), worker(OURS_ASK, "ask-api")]
        jobs += [Job(ask_cli_row(n), _ask_argv(folder, picture, threads, device, n),
                     exits_at_first_token=n == 1) for n in ASK_TOKENS]
    return Plan(folder, threads, device, tuple(jobs), skipped)


def _why_no_torch_row(folder: Path) -> str | None:
    if shapes.shape_config_file(folder) is None:
        return "the shape is unknown: the PyTorch row runs on folders that --shape builds"
    # Looked up, not imported: the bench's own process stays small (its memory is the floor of
    # the ask rows' peak, see run_job).
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'owl2-edge[convert]')"
    return None


def _ask_argv(folder: Path, picture: Path, threads: int, device: str, n_tokens: int
              ) -> tuple[str, ...]:
    """The real command a user runs."""
    return (sys.executable, "-m", "owl2_edge.cli", "ask", "-m", str(folder), str(picture),
            workers.QUESTION, "--max-tokens", str(n_tokens), "--ignore-eos", "--temperature", "0",
            "--threads", str(threads), "--device", device, "--ctx", str(workers.ASK_N_CTX),
            "--json")


# --- Running ---------------------------------------------------------------------------------

def run_job(job: Job) -> dict:
    """Start the job's process and wait for it: its last stdout line (a JSON object) plus
    wall_s (start to exit), spawned_at (the wall clock at the start) and maxrss_bytes (the
    kernel's peak RSS of the child, from wait4; it is at least this process's own RSS when it
    started the child, which the workers' VmHWM is not)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        spawned_at = time.time()
        t = time.perf_counter()
        child = subprocess.Popen(job.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                 env=child_env())
        _, status, usage = os.wait4(child.pid, 0)
        wall_s = time.perf_counter() - t
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = out.read().decode(errors="replace").strip().splitlines()
        errors = err.read().decode(errors="replace").strip().splitlines()
    if child.returncode or not lines:
        why = errors[-1] if errors else f"exit code {child.returncode}"
        raise Owl2Error(f"bench {job.key} failed: {why}")
    result = json.loads(lines[-1])
    result.update(wall_s=wall_s, spawned_at=spawned_at, maxrss_bytes=usage.ru_maxrss * 1024)
    if "first_token_at" in result:  # the stock pipeline: its process start -> first token
        result["process_first_token_s"] = result["first_token_at"] - spawned_at
    if job.exits_at_first_token:
        result["process_first_token_s"] = wall_s
    return result


# on_job(round (from 1), job, its result)
OnJob = Callable[[int, Job, dict], None]


def run_rounds(bench: Plan, rounds: int, on_job: OnJob | None = None) -> dict[str, list[dict]]:
    """Every job once per round, the order rotated by one each round; {row: [result, ...]}."""
    results: dict[str, list[dict]] = {job.key: [] for job in bench.jobs}
    for r in range(rounds if bench.jobs else 0):
        start = r % len(bench.jobs)
        for job in bench.jobs[start:] + bench.jobs[:start]:
            result = run_job(job)
            results[job.key].append(result)
            if on_job:
                on_job(r + 1, job, result)
    return results
