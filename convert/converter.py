"""`owl2 convert`: a Hugging Face mPLUG-Owl2 checkpoint folder -> an owl2-edge model folder.

Everything is written into a hidden temporary folder beside the target and renamed into place
only at the end, so an error or Ctrl-C never leaves a half-written model folder behind.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Callable

from owl2_edge import names
from owl2_edge.errors import CheckpointError
from owl2_edge.model_dir import (DecoderSpec, ImageSpec, Manifest, check_output_folder,
                                 staged_folder, vision_data_files)

# progress(stage, done, total): one call per unit of work, for a progress bar.
Progress = Callable[[str, int, int], None]


def convert(hf_dir: str | Path, out_dir: str | Path, quant: str = "Q4_K_M",
            vision: tuple[str, ...] = names.DEFAULT_VISION_VARIANTS, force: bool = False,
            progress: Progress | None = None, importance=None, pair_id: str | None = None
            ) -> Manifest:
    """importance: an owl2_edge.tools.imatrix.ImportanceMatrix for the decoder's quantizers. pair_id:
    the id tying the two GGUF files together (default: a new random one)."""
    # Imported here so that `import owl2_edge.convert.converter` stays cheap for the CLI's --help.
    from owl2_edge.convert.checkpoint import Checkpoint
    from owl2_edge.convert.gguf_pair import check_quant, write_gguf_pair
    from owl2_edge.vision_variants import check_variants

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    quant = check_quant(quant)
    vision = check_variants(vision)  # each file once, in the order asked
    check_output_folder(out_dir, force)
    report = progress or (lambda stage, done, total: None)

    from owl2_edge.convert.hub import is_hub_id, resolve_checkpoint
    source = str(hf_dir) if is_hub_id(str(hf_dir)) else str(hf_dir.resolve())
    ckpt = Checkpoint.open(resolve_checkpoint(hf_dir))
    cfg = ckpt.config
    with staged_folder(out_dir) as work:
        pair_id = pair_id or uuid.uuid4().hex
        base_path, mam_path = write_gguf_pair(
            ckpt, work, quant, pair_id,
            progress=lambda done, total: report("decoder", done, total), importance=importance)

        vision_files = _write_vision(ckpt, work, vision, report)

        p, t = cfg.preprocess, cfg.text
        manifest = Manifest(
            decoder_file=Path(base_path).name,
            mam_file=Path(mam_path).name,
            vision_files=vision_files,
            vision_data_files=vision_data_files(work, vision_files),
            quant=quant,
            pair_id=pair_id,
            n_visual=cfg.n_visual,
            image=ImageSpec(size=p.image_size, mean=p.image_mean, std=p.image_std,
                            pad_color=p.pad_color),
            decoder=DecoderSpec(n_vocab=t.vocab_size, n_embd=t.hidden_size, n_layer=t.num_layers,
                                n_ctx_train=t.max_position_embeddings, bos_id=t.bos_token_id,
                                eos_id=t.eos_token_id),
            source=source,
        ).recorded(work)  # each file's size and digests, checked at every load
        manifest.write(work)
    return manifest


def _write_vision(ckpt, work: Path, vision: tuple[str, ...], report: Progress) -> dict[str, str]:
    """The vision files asked for, in `work`: the fp32 graph exported from the reference, every
    other variant derived from it (owl2_edge/vision_variants.py, as `owl2 quantize` does). The
    fp32 file is exported under a temporary name when it was not asked for, and removed."""
    from owl2_edge.convert.reference import Owl2Vision
    from owl2_edge.convert.vision_onnx import export_vision_onnx
    from owl2_edge.vision_variants import derive_variant

    report("vision", 0, len(vision))
    fp32 = work / (names.vision_onnx_file("fp32") if "fp32" in vision else ".vision-fp32.tmp.onnx")
    vision_model = Owl2Vision.from_checkpoint(ckpt)
    export_vision_onnx(vision_model, fp32)
    del vision_model  # ~1.5 GB at the release's size: not held while the variants are made
    files = {}
    for i, variant in enumerate(vision):
        files[variant] = names.vision_onnx_file(variant)
        if variant != "fp32":
            derive_variant(fp32, variant, work / files[variant])
        report("vision", i + 1, len(vision))
    if "fp32" not in vision:
        fp32.unlink()
        (work / names.vision_data_file(fp32.name)).unlink()
    return files


__all__ = ["convert", "CheckpointError"]
