"""Decoder sizes of every quantization type at the release's 7B shape, without 13 GB of weights.

    python benchmarks/quant_sizes.py WORK_DIR [--types Q4_K_M Q8_0 ...]

llama.cpp's quantizer has a dry run: it decides every tensor's type by its mix rules and reports
the sizes without reading the weights. This writes a base GGUF of the 7B shape (the release's
config: 32 layers, 4096 wide, 32000 tokens) whose header is real and whose data is a sparse hole,
asks for a dry run of each type, and adds the sidecar that owl2-edge would write: each layer's
visual attn_k/attn_v at the type the dry run gave the base's, and two float32 norms. Needs the
converter's packages (for the release config and tensor table).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import gguf
import numpy as np

from owl2_edge import _decoder, gguf_names, quant
from owl2_edge.convert.config import Owl2Config
from owl2_edge.convert.gguf_pair import add_base_kv, base_targets, mam_targets

T = gguf.GGMLQuantizationType
def write_hollow_base(cfg: Owl2Config, path: Path) -> None:
    """The base's header (the keys the quantizer reads, every tensor's F16 info) and a sparse hole
    where the data would be."""
    with contextlib.closing(gguf.GGUFWriter(path, gguf_names.ARCHITECTURE)) as w:
        add_base_kv(w, cfg, None, gguf.LlamaFileType.MOSTLY_F16, pair_id="hollow")
        size = 0
        for tg in base_targets(cfg).values():
            kind = T.F16 if len(tg.shape) > 1 else T.F32
            quant.declare(w, tg.gguf_name, tg.shape, kind)
            size += _bytes(tg.shape, kind) + 64  # alignment, at most
        quant.write_preamble(w)
        w.fout[0].truncate(w.fout[0].tell() + size)


def _bytes(shape, kind) -> int:
    return int(np.prod(quant.byte_shape(shape, int(kind)), dtype=np.int64))


def dry_run(base: Path, qt: quant.QuantType) -> tuple[float, dict[str, str]]:
    """llama.cpp's size for the base (MiB) and each tensor's type name."""
    log = quant.llama_quantize(base, base.with_suffix(".out"), qt, dry_run=True)
    types = {name: _decoder.ggml_type_name(t) for name, t in quant.planned_types_in(log).items()}
    return float(quant.DRY_RUN_QUANT_SIZE.search(log).group(1)), types


def sidecar_mib(cfg: Owl2Config, base_types: dict[str, str], qt: quant.QuantType) -> float:
    total = 0
    for tg in mam_targets(cfg).values():
        if len(tg.shape) == 1:
            total += _bytes(tg.shape, T.F32)
            continue
        name = base_types.get(tg.gguf_name)
        kind = _decoder.ggml_type_from_name(name) if name else T.F16  # kept as it was
        total += _bytes(tg.shape, kind)
    return total / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--types", nargs="*", default=list(quant.QUANT_TYPES))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = Owl2Config()
    base = args.work / "hollow-7b-F16.gguf"
    write_hollow_base(cfg, base)
    print("| type | decoder MiB | sidecar MiB | pair GiB | bits/weight |")
    print("|---|---:|---:|---:|---:|")
    n_params = sum(_bytes(tg.shape, T.F32) / 4 for tg in [*base_targets(cfg).values(),
                                                          *mam_targets(cfg).values()])
    for name in args.types:
        qt = quant.QUANT_TYPES[quant.check_quant(name)]
        try:
            base_mib, types = dry_run(base, qt)
        except RuntimeError as e:
            print(f"| {name} | {e} | | | |", flush=True)
            continue
        mam = sidecar_mib(cfg, types, qt)
        pair = base_mib + mam
        print(f"| {name} | {base_mib:.0f} | {mam:.0f} | {pair / 1024:.2f} | "
              f"{pair * 2**20 * 8 / n_params:.2f} |", flush=True)
    base.unlink()


if __name__ == "__main__":
    sys.exit(main())
