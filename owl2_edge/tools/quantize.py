"""`owl2 quantize`: a model folder -> the same model at another type, without torch or the
checkpoint (docs/design.md §11).

    quantize_folder("owl2-f16", "owl2-q4km", "Q4_K_M", importance=ImportanceMatrix.read(...))

The base GGUF goes through llama.cpp's own quantizer, exactly as `owl2 convert` sends its F16
base, so quantizing an F16 folder gives convert's bytes. The sidecar is read back to float32
and written again with the finished base's types, tensor by tensor (owl2_edge/quant.py). The
vision variants asked for are copied from the source folder when it has them, else derived from
its fp32 file (owl2_edge/vision_variants.py).

A folder already quantized is refused unless allow_requantize: its rounding errors would be
rounded again (llama.cpp's rule). Like convert, everything is written into a hidden folder
beside the output and renamed into place at the end.

Both folders are checked as `Owl2.load` checks them (Owl2.check_folder): the source before any
of its files is read here, the finished output before it is renamed into place, so quantize
refuses what `owl2 ask` refuses, in the same line, and never writes a folder that cannot load.
The new manifest records each file's size and digests (model_dir.file_record).
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from owl2_edge import gguf_names, names, quant, recipe
from owl2_edge.checks import display_path
from owl2_edge.errors import ArgumentError, ModelFolderError, Owl2Error
from owl2_edge.model_dir import Manifest, check_output_folder, staged_folder, vision_data_files
from owl2_edge.owl2 import Owl2

# progress(stage, done, total), as convert's.
Progress = Callable[[str, int, int], None]


def quantize_folder(src: str | os.PathLike, out: str | os.PathLike, quant_type: str,
                    vision: Sequence[str] | None = None, importance=None,
                    allow_requantize: bool = False, force: bool = False,
                    progress: Progress | None = None,
                    overrides: Sequence[recipe.Override] = (),
                    chosen: dict | None = None) -> Manifest:
    """Write `src` at `quant_type` into `out`; returns the new manifest. vision: the variants to
    write (None: the ones `src` has). importance: an owl2_edge.tools.imatrix.ImportanceMatrix.
    overrides: per-tensor types on top of quant_type's mix (owl2_edge/recipe.py); chosen: what
    chose them (tools/choose.py), recorded in the manifest's recipe."""
    src, out = Path(src), Path(out)
    qt = quant.QUANT_TYPES[quant.check_quant(quant_type)]
    quant.check_imatrix_need(qt.name, importance)
    overrides = list(overrides)
    # The folder is checked as `owl2 ask` checks it before gguf-py or llama.cpp's quantizer
    # reads a byte: neither is made to refuse damaged files (IndexError, SIGFPE, abort).
    manifest = Owl2.check_folder(src)
    if manifest.quant not in quant.FLOAT_TYPES and not allow_requantize:
        raise ArgumentError(
            f"{display_path(src)} is already {manifest.quant}: quantizing it again would round "
            f"its rounding errors once more. Start from an F16, BF16 or F32 folder (owl2 convert "
            f"--quant F16), or pass --allow-requantize")
    variants = _vision_plan(manifest, vision)
    if out.exists() and out.resolve() == src.resolve():
        raise ArgumentError("the output folder is the source folder; choose another one")
    check_output_folder(out, force)
    report = progress or (lambda stage, done, total: None)

    if overrides:  # a pattern that matches nothing is refused before any work
        recipe.resolve(recipe.matrices(src / manifest.decoder_file, src / manifest.mam_file),
                       overrides, None if importance is None
                       else set(recipe.importance_by_key(importance)))

    with staged_folder(out) as work:
        base_file, mam_file = quantize_decoder(src, manifest, work, qt, importance,
                                                allow_requantize, report)
        changed = _apply_overrides(src, manifest, work, base_file, mam_file, overrides,
                                   importance, report) if overrides else {}
        vision_files = _write_vision(src, manifest, work, variants, report)
        new = replace(manifest, decoder_file=base_file, mam_file=mam_file,
                      vision_files=vision_files, quant=qt.name, source=str(src.resolve()),
                      vision_data_files=_vision_data(manifest, work, vision_files),
                      recipe=_recipe_record(overrides, changed, chosen)).recorded(work)
        new.write(work)
        try:  # never a folder that load() refuses under the output's name
            Owl2.check_folder(work)
        except Owl2Error as e:
            raise ModelFolderError(f"the quantized folder does not load, so {display_path(out)} "
                                   f"was not written: {e}") from None
    return new


# --- The decoder pair -------------------------------------------------------------------------------

def quantize_decoder(src: Path, manifest: Manifest, work: Path, qt: quant.QuantType, importance,
                      allow_requantize: bool, report: Progress) -> tuple[str, str]:
    import gguf

    base_name, mam_name = names.base_gguf_file(qt.name), names.mam_gguf_file(qt.name)
    mam_path = src / manifest.mam_file
    try:
        mam_reader = gguf.GGUFReader(mam_path)
    except _GGUF_PY_ERRORS as e:
        raise _unreadable(mam_path, e) from None
    n_layer = manifest.decoder.n_layer
    total = 1 + n_layer
    report("decoder", 0, total)
    with quant.written_atomically(work / base_name) as part:
        quant.llama_quantize(src / manifest.decoder_file, part, qt,
                             importance.for_base() if importance else None, allow_requantize)
    report("decoder", 1, total)

    done = 1

    def tick() -> None:
        nonlocal done
        done += 1
        report("decoder", done, total)

    try:
        tensors = [(t.name, tuple(int(d) for d in reversed(t.shape))) for t in mam_reader.tensors]
        header = quant.SidecarHeader(
            n_layer=_uint(mam_reader, gguf_names.KEY_MAM_BLOCK_COUNT, mam_path),
            n_embd=_uint(mam_reader, gguf_names.KEY_MAM_EMBEDDING_LENGTH, mam_path),
            kv_width=_uint(mam_reader, gguf_names.KEY_MAM_KV_WIDTH, mam_path),
            pair_id=_pair_id(mam_reader, mam_path))
        with quant.written_atomically(work / mam_name) as part:
            quant.write_sidecar(part, header, tensors, _layers(mam_reader, n_layer),
                                quant.read_tensor_types(work / base_name),
                                importance.for_sidecar() if importance else None, tick)
    except Owl2Error:
        raise
    except _GGUF_PY_ERRORS as e:
        raise _unreadable(mam_path, e) from None
    return base_name, mam_name


def _apply_overrides(src: Path, manifest: Manifest, work: Path, base_file: str, mam_file: str,
                     overrides: list[recipe.Override], importance, report: Progress
                     ) -> dict[str, str]:
    """Rewrite the finished pair with the overrides' types, each changed matrix encoded from the
    source's full-precision values; returns key -> new type name of the matrices that changed."""
    pair = recipe.matrices(work / base_file, work / mam_file)
    by_key = recipe.importance_by_key(importance)
    types = recipe.resolve(pair, overrides, None if importance is None else set(by_key))
    changed = {m.key: recipe.type_name(types[m.key]) for m in pair if types[m.key] != m.type}
    report("overrides", 0, 2)
    for i, (name, sidecar) in enumerate(((base_file, False), (mam_file, True))):
        mine = {m.name: types[m.key] for m in pair if m.sidecar == sidecar}
        weights = None if importance is None else (
            importance.for_sidecar() if sidecar else importance.for_base())
        source = src / (manifest.mam_file if sidecar else manifest.decoder_file)
        with quant.written_atomically(work / name) as part:
            recipe.retype_gguf(work / name, source, part, mine, weights)
        report("overrides", i + 1, 2)
    return changed


def _recipe_record(overrides: list[recipe.Override], changed: dict[str, str],
                   chosen: dict | None) -> dict:
    if not overrides and not chosen:
        return {}
    out = {"tensor_types": [o.to_json() for o in overrides], "changed": changed}
    if chosen:
        out["chosen"] = chosen
    return out


# What gguf-py raises on a file it cannot follow (it checks little itself). The native loader
# has refused such files before this point (Owl2.check_folder); these stay a backstop should the
# two readers ever disagree, so no traceback reaches the user.
_GGUF_PY_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError,
                   struct.error)


def _unreadable(path: Path, e: Exception) -> ModelFolderError:
    return ModelFolderError(f"{display_path(path)}: gguf-py cannot read it "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''})")


def _layers(reader, n_layer: int) -> Iterator[list[np.ndarray]]:
    """The sidecar's tensors as float32, one decoder layer at a time (its file order)."""
    per_layer = len(gguf_names.ROUTED_LAYER_PARTS)
    if len(reader.tensors) != per_layer * n_layer:
        raise ModelFolderError(f"the MAM GGUF holds {len(reader.tensors)} tensors, not "
                               f"{per_layer} for each of {n_layer} layers")
    for i in range(n_layer):
        yield [quant.decode(t) for t in reader.tensors[i * per_layer:(i + 1) * per_layer]]


def _uint(reader, key: str, path: Path) -> int:
    f = reader.fields.get(key)
    if f is None:
        raise ModelFolderError(f"{display_path(path)}: no {key}")
    return int(f.contents())


def _pair_id(reader, path: Path) -> str:
    # The base keeps its pair id through llama.cpp's quantizer (it copies every key); the new
    # sidecar takes the same one, so the pair still matches.
    f = reader.fields.get(gguf_names.KEY_PAIR_ID)
    if f is None:
        raise ModelFolderError(f"{display_path(path)}: no {gguf_names.KEY_PAIR_ID}")
    return str(f.contents())


# --- The vision model -------------------------------------------------------------------------------

def _vision_plan(manifest: Manifest, vision: Sequence[str] | None) -> list[str]:
    from owl2_edge.vision_variants import check_variants
    variants = list(manifest.vision_files) if vision is None else list(check_variants(vision))
    for v in variants:
        if v not in manifest.vision_files and "fp32" not in manifest.vision_files:
            raise ArgumentError(f"the source folder has no {v} vision model and no fp32 one to "
                                f"make it from")
    return variants


def _vision_data(manifest: Manifest, work: Path, files: dict[str, str]) -> dict[str, str]:
    """The new folder's data files: a copied variant's keeps the source's name, a derived one's
    is named after its ONNX."""
    derived = vision_data_files(work, files)
    return {v: manifest.vision_data_files.get(v, derived.get(v)) for v in files
            if v in manifest.vision_data_files or v in derived}


def _write_vision(src: Path, manifest: Manifest, work: Path, variants: list[str],
                  report: Progress) -> dict[str, str]:
    files = {}
    report("vision", 0, len(variants))
    for i, variant in enumerate(variants):
        files[variant] = names.vision_onnx_file(variant)
        if variant in manifest.vision_files:
            shutil.copyfile(src / manifest.vision_files[variant], work / files[variant])
            if variant in manifest.vision_data_files:  # under its own name: the graph names it
                data = manifest.vision_data_files[variant]
                shutil.copyfile(src / data, work / data)
        else:
            from owl2_edge.vision_variants import derive_variant
            derive_variant(src / manifest.vision_files["fp32"], variant, work / files[variant])
        report("vision", i + 1, len(variants))
    return files
