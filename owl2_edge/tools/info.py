"""`owl2 info`: what a model folder holds, read from its manifest and the files themselves.

The folder is first checked as `owl2 ask` checks it (Owl2.check_folder), so info refuses what
ask refuses, in the same line; `--verify` then reads every byte of every file against the
sha256 its manifest records.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

from rich.table import Table

from owl2_edge import gguf_names
from owl2_edge.checks import display_path
from owl2_edge.errors import ModelFolderError
from owl2_edge.model_dir import Manifest, UnrecordedFolderWarning
from owl2_edge.owl2 import Owl2


def gguf_summary(path: Path) -> tuple[str, Counter]:
    """(pair id, count of tensors per ggml type) of one GGUF file."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
        field = reader.get_field(gguf_names.KEY_PAIR_ID)
        # The value's raw bytes: contents() would decode them, raising on a pair id that is not
        # UTF-8.
        raw = bytes(field.parts[field.data[0]]) if field is not None else b""
        types = Counter(t.tensor_type.name for t in reader.tensors)
    except Exception as e:  # gguf-py raises bare ValueError/struct errors on bad files
        raise ModelFolderError(f"{display_path(path)}: not a readable GGUF file "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''})"
                               ) from None
    try:
        pair_id = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelFolderError(f"{display_path(path)}: {gguf_names.KEY_PAIR_ID} is not UTF-8 "
                               f"text ({raw[:40]!r})") from None
    return pair_id, types


def describe(folder: str | Path) -> Table:
    folder = Path(folder)
    manifest = Owl2.check_folder(folder)
    table = Table(title=f"{folder}", show_header=True, header_style="bold")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("contents")
    for role, name in (("decoder", manifest.decoder_file), ("mam", manifest.mam_file)):
        pair_id, types = gguf_summary(folder / name)
        if pair_id != manifest.pair_id:
            raise ModelFolderError(f"{folder / name}: pair id {pair_id[:100]!r} does not match the "
                                   f"manifest's {manifest.pair_id!r} (files from different conversions)")
        kinds = ", ".join(f"{n}×{t}" for t, n in sorted(types.items()))
        table.add_row(name, _size(folder / name), f"{role}: {kinds}")
    for variant, name in manifest.vision_files.items():
        table.add_row(name, _size(folder / name), f"vision tower + abstractor, {variant}")
        if variant in manifest.vision_data_files:
            data = manifest.vision_data_files[variant]
            table.add_row(data, _size(folder / data), f"weights of {name}")
    d = manifest.decoder
    table.caption = (f"quant {manifest.quant}{_recipe_note(manifest.recipe)} · {d.n_layer} "
                     f"layers · n_embd {d.n_embd} · "
                     f"vocab {d.n_vocab} · context {d.n_ctx_train} · {manifest.n_visual} "
                     f"embeddings per {manifest.image.size}px image")
    return table


def _recipe_note(recipe: dict) -> str:
    """How the manifest says the types were chosen, when not by the quant alone."""
    if not recipe:
        return ""
    chosen = recipe.get("chosen")
    changed = recipe.get("changed")
    parts = []
    if isinstance(changed, dict) and changed:
        parts.append(f"{len(changed)} matrices retyped")
    if isinstance(chosen, dict) and isinstance(chosen.get("target_bytes"), int):
        parts.append(f"chosen by measurement for {chosen['target_bytes']} bytes"
                     + ("" if chosen.get("winner") in (None, "recipe")
                        else ", stock type kept"))
    return f" ({', '.join(parts)})" if parts else ""


def verify(folder: str | Path) -> dict[str, bool | None]:
    """Each file of a folder -> whether all its bytes match the manifest's sha256; None where
    the manifest records none (a folder written before the records were)."""
    folder = Path(folder)
    return Manifest.load(folder).verify(folder)


def record(folder: str | Path) -> int:
    """Write the sizes and sha256 of a folder's files into its manifest, as they are now, for a
    folder written before owl2-edge recorded them; the folder is first checked as a load checks
    it (a swapped vision data file is refused by its graph's extents). Returns the files
    recorded; ModelFolderError when the manifest has records already."""
    folder = Path(folder)
    with warnings.catch_warnings():  # (the note that says to do what this does)
        warnings.simplefilter("ignore", UnrecordedFolderWarning)
        manifest = Owl2.check_folder(folder)
    if manifest.file_records:
        raise ModelFolderError(f"{folder}: its files are recorded already (owl2 info --verify "
                               f"checks them)")
    manifest.recorded(folder).write(folder)
    return len(manifest.files())


def _size(path: Path) -> str:
    n = path.stat().st_size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
