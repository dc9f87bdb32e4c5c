"""What `owl2 bench` prints: the median of each measure over the rounds, the ratios issue 13
asks for, peak memory against what was loaded, and the machine it ran on.

Every ratio is a speed-up of owl2-edge, ours' speed over theirs: a rate (tokens or positions
per second) ours / theirs, a time theirs / ours. Above 1, ours is faster.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

from owl2_edge.tools.bench.runner import (ASK_TOKENS, LLAMA_CPP_DECODER, OURS_ASK, OURS_DECODER,
                                    STOCK_ASK, Plan, ask_cli_row, vision_row)
from owl2_edge.tools.bench.workers import DECODE, TEXT_PREFILL
from owl2_edge.model_dir import Manifest


@dataclass(frozen=True)
class Ratio:
    key: str
    measure: str
    ours: tuple[str, str]       # (row, metric)
    theirs: tuple[str, str]
    is_rate: bool               # a rate (higher is better) or seconds (lower is better)


RATIOS = (
    Ratio("decode", "decode tok/s", (OURS_DECODER, "decode_tok_s"),
          (LLAMA_CPP_DECODER, "decode_tok_s"), True),
    Ratio("text_prefill", "text prefill tok/s", (OURS_DECODER, "text_prefill_tok_s"),
          (LLAMA_CPP_DECODER, "text_prefill_tok_s"), True),
    # llama.cpp cannot take the image: it prefills as many text positions.
    Ratio("image_prefill", "image prefill pos/s", (OURS_DECODER, "image_prefill_pos_s"),
          (LLAMA_CPP_DECODER, "image_prefill_pos_s"), True),
    Ratio("first_token_new_image", "1st token, new image s", (OURS_ASK, "first_token_s"),
          (STOCK_ASK, "first_token_s"), False),
    Ratio("second_question", "2nd question, same image s", (OURS_ASK, "second_token_s"),
          (STOCK_ASK, "second_token_s"), False),
    Ratio("one_shot_process", "one-shot: start to 1st token s",
          (ask_cli_row(1), "process_first_token_s"), (STOCK_ASK, "process_first_token_s"), False),
)
AGAINST = {LLAMA_CPP_DECODER: "llama.cpp", STOCK_ASK: "stock pipeline"}

# The `owl2 ask` processes load what the ask-api worker loads (same folder, device and
# context): their memory is compared with its files and cache.
LOADS_LIKE = {ask_cli_row(n): OURS_ASK for n in ASK_TOKENS}


# --- Summaries ---------------------------------------------------------------------------------

def medians(runs: list[dict]) -> dict:
    """Per measure, the median over the rounds (numbers) or the first round's value (others)."""
    row = {}
    for key, value in runs[0].items():
        numbers = [r[key] for r in runs if isinstance(r.get(key), (int, float))
                   and not isinstance(r.get(key), bool)]
        row[key] = statistics.median(numbers) if len(numbers) == len(runs) else value
    return row


def peak_rss(row: dict) -> int:
    """The worker's own high-water mark, or (`owl2 ask` itself) the kernel's count from wait4."""
    return row.get("peak_rss_bytes") or row["maxrss_bytes"]


def memory(rows: dict[str, dict]) -> dict[str, dict]:
    """Per row with known loads: peak RSS, the files it loaded, its KV cache, and the ratio of
    the peak to files + cache (about 1: the files are held once)."""
    out = {}
    for key, row in rows.items():
        loads = rows.get(LOADS_LIKE.get(key, key), {})
        if "files_bytes" not in loads:
            continue
        loaded = loads["files_bytes"] + loads.get("kv_bytes", 0)
        out[key] = {"peak_rss_bytes": peak_rss(row), "files_bytes": loads["files_bytes"],
                    "kv_bytes": loads.get("kv_bytes", 0),
                    "peak_over_files_kv": peak_rss(row) / loaded}
    return out


def ratios(rows: dict[str, dict]) -> dict[str, dict]:
    """The ratios whose two rows both ran."""
    out = {}
    for ratio in RATIOS:
        (our_row, our_metric), (their_row, their_metric) = ratio.ours, ratio.theirs
        if our_row not in rows or their_row not in rows:
            continue
        ours, theirs = rows[our_row][our_metric], rows[their_row][their_metric]
        out[ratio.key] = {"measure": ratio.measure, "ours": ours, "theirs": theirs,
                          "against": AGAINST[their_row],
                          "speedup": ours / theirs if ratio.is_rate else theirs / ours}
    return out


def machine(threads: int) -> dict:
    from owl2_edge import _decoder
    return {"cpu": _cpu_model(), "cpus": os.cpu_count(),
            "physical_cores": _decoder.default_n_threads(), "threads": threads,
            "system": f"{platform.system()} {platform.machine()}", "versions": _versions()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for package in ("owl2-edge", "llama-cpp-python", "onnxruntime", "onnxruntime-gpu"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def summary(bench: Plan, runs: dict[str, list[dict]], rounds: int, shape: str | None) -> dict:
    """The whole result, as --json prints it."""
    m = Manifest.load(bench.folder)
    rows = {key: medians(results) for key, results in runs.items() if results}
    return {
        "machine": machine(bench.threads),
        "model": {"folder": str(bench.folder), "shape": shape, "quant": m.quant,
                  "device": bench.device, "n_layer": m.decoder.n_layer,
                  "n_embd": m.decoder.n_embd, "n_visual": m.n_visual,
                  "image_size": m.image.size, "vision_files": m.vision_files},
        "rounds": rounds, "rows": rows, "ratios": ratios(rows), "memory": memory(rows),
        "skipped": bench.skipped, "runs": runs,
    }


# --- The tables ------------------------------------------------------------------------------

ASK_LABELS = {STOCK_ASK: "stock", OURS_ASK: "ours (API)",
              **{ask_cli_row(n): f"owl2 ask -n {n}" for n in ASK_TOKENS}}


def tables(result: dict) -> list:
    """Rich renderables: the setting, one table per group that ran, memory, the ratios."""
    from rich.text import Text

    mc, model = result["machine"], result["model"]
    out: list = [Text(
        f"{mc['cpu']}, {mc['cpus']} CPUs ({mc['physical_cores']} cores), {mc['threads']} "
        f"thread(s), {model['device']} · {model['folder']} ({model['shape'] or 'model folder'}, "
        f"decoder {model['quant']}) · median of {result['rounds']} round(s)")]
    for part in (_decoder_table, _vision_table, _ask_table, _memory_table, _ratio_table):
        table = part(result)
        if table is not None:
            out.append(table)
    out += [Text(f"{key}: not run: {why}") for key, why in result["skipped"].items()]
    return out


def _decoder_table(result: dict):
    from rich.table import Table
    rows = result["rows"]
    keys = [k for k in (LLAMA_CPP_DECODER, OURS_DECODER) if k in rows]
    if not keys:
        return None
    table = Table("decoder", "load s", "text prefill tok/s", "image prefill pos/s",
                  "decode tok/s", title="the decoder alone",
                  caption=_positions(rows[keys[0]]))
    for key in keys:
        r = rows[key]
        table.add_row(key.split("/")[1], _num(r["load_s"]), _num(r["text_prefill_tok_s"]),
                      _num(r["image_prefill_pos_s"]), _num(r["decode_tok_s"]))
    return table


def _vision_table(result: dict):
    from rich.table import Table
    rows = result["rows"]
    keys = [k for k in rows if k.startswith(vision_row(""))]
    if not keys:
        return None
    table = Table("vision", "runs on", "load s", "s / image", "images / s", "peak RSS",
                  title="vision, one image")
    for key in keys:
        r = rows[key]
        table.add_row(key.split("/")[1], r["provider"].replace("ExecutionProvider", ""),
                      _num(r["load_s"]), _num(r["image_s"]), _num(r["images_per_s"]),
                      _size(peak_rss(r)))
    return table


def _ask_table(result: dict):
    from rich.table import Table
    rows = result["rows"]
    keys = [k for k in ASK_LABELS if k in rows]
    if not keys:
        return None
    table = Table("pipeline", "load s", "1st token s", "2nd question s", "start to 1st s",
                  "wall s", title="asking about the sample picture",
                  caption="1st token: a new image, after load; 2nd question: the same image; "
                          "start to 1st: from the process's start; stock = ONNX Runtime + "
                          "llama.cpp by hand")
    for key in keys:
        r = rows[key]
        # A worker's wall time holds both questions and more: only `owl2 ask`'s is shown.
        wall = r["wall_s"] if key in LOADS_LIKE else None
        table.add_row(ASK_LABELS[key], _num(r.get("load_s")), _num(r.get("first_token_s")),
                      _num(r.get("second_token_s")), _num(r.get("process_first_token_s")),
                      _num(wall))
    return table


def _memory_table(result: dict):
    from rich.table import Table
    if not result["memory"]:
        return None
    table = Table("process", "peak RSS", "files", "KV cache", "peak / (files + KV)",
                  title="memory against what was loaded")
    for key, m in result["memory"].items():
        table.add_row(ASK_LABELS.get(key, key), _size(m["peak_rss_bytes"]),
                      _size(m["files_bytes"]), _size(m["kv_bytes"]),
                      f"{m['peak_over_files_kv']:.2f}")
    return table


def _ratio_table(result: dict):
    from rich.table import Table
    if not result["ratios"]:
        return None
    table = Table("measure", "against", "ours", "theirs", "x", title="ours against theirs",
                  caption="x: ours' speed over theirs (above 1: ours is faster)")
    for ratio in result["ratios"].values():
        table.add_row(ratio["measure"], ratio["against"], _num(ratio["ours"]),
                      _num(ratio["theirs"]), f"[bold]{ratio['speedup']:.2f}[/]")
    return table


def _positions(row: dict) -> str:
    return (f"text prefill: {TEXT_PREFILL} tokens; image prefill: {row['image_prefill_positions']} "
            f"positions (llama.cpp: as many text positions); decode: {DECODE} tokens")


def _num(value) -> str:
    """Three significant digits or so: 0.00312, 0.0312, 3.12, 31.2, 312."""
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{_num(n_bytes / 2**20)} MiB"
