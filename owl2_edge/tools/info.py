"""`owl2 info`: what a model folder holds, read from its manifest and the files themselves."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.table import Table

from owl2_edge import gguf_names
from owl2_edge.errors import ModelFolderError
from owl2_edge.model_dir import Manifest


def gguf_summary(path: Path) -> tuple[str, Counter]:
    """(pair id, count of tensors per ggml type) of one GGUF file."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises bare ValueError/struct errors on bad files
        raise ModelFolderError(f"{path}: not a readable GGUF file ({e})") from None
    field = reader.get_field(gguf_names.KEY_PAIR_ID)
    pair_id = field.contents() if field is not None else ""
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return pair_id, types


def describe(folder: str | Path) -> Table:
    folder = Path(folder)
    manifest = Manifest.load(folder)
    table = Table(title=f"{folder}", show_header=True, header_style="bold")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("contents")
    for role, name in (("decoder", manifest.decoder_file), ("mam", manifest.mam_file)):
        pair_id, types = gguf_summary(folder / name)
        if pair_id != manifest.pair_id:
            raise ModelFolderError(f"{folder / name}: pair id {pair_id!r} does not match the "
                                   f"manifest's {manifest.pair_id!r} (files from different conversions)")
        kinds = ", ".join(f"{n}×{t}" for t, n in sorted(types.items()))
        table.add_row(name, _size(folder / name), f"{role}: {kinds}")
    for variant, name in manifest.vision_files.items():
        table.add_row(name, _size(folder / name), f"vision tower + abstractor, {variant}")
    d = manifest.decoder
    table.caption = (f"quant {manifest.quant} · {d.n_layer} layers · n_embd {d.n_embd} · "
                     f"vocab {d.n_vocab} · context {d.n_ctx_train} · {manifest.n_visual} "
                     f"embeddings per {manifest.image.size}px image")
    return table


def _size(path: Path) -> str:
    n = path.stat().st_size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
