"""`owl2 convert`: a Hugging Face mPLUG-Owl2 checkpoint folder -> an owl2-edge model folder.

Everything is written into a hidden temporary folder beside the target and renamed into place
only at the end, so an error or Ctrl-C never leaves a half-written model folder behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from owl2_edge import names
from owl2_edge.errors import CheckpointError
from owl2_edge.model_dir import DecoderSpec, ImageSpec, Manifest

# progress(stage, done, total): one call per unit of work, for a progress bar.
Progress = Callable[[str, int, int], None]


def convert(hf_dir: str | Path, out_dir: str | Path, quant: str = "Q4_K_M",
            vision: tuple[str, ...] = ("fp32",), force: bool = False,
            progress: Progress | None = None) -> Manifest:
    # Imported here so that `import owl2_edge.convert.converter` stays cheap for the CLI's --help.
    from owl2_edge.convert.checkpoint import Checkpoint
    from owl2_edge.convert.gguf_pair import check_quant, write_gguf_pair
    from owl2_edge.convert.hf_layout import abstractor_shapes, vision_shapes
    from owl2_edge.convert.reference import Owl2Vision
    from owl2_edge.convert.vision_onnx import export_vision_onnx

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    quant = check_quant(quant)
    for variant in vision:
        if variant not in names.VISION_VARIANTS:
            raise ValueError(f"unknown vision variant {variant!r}; choose from "
                             f"{', '.join(names.VISION_VARIANTS)}")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir}: already exists and is not empty (use --force to replace it)")
    report = progress or (lambda stage, done, total: None)

    ckpt = Checkpoint.open(hf_dir)
    cfg = ckpt.config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        pair_id = uuid.uuid4().hex
        base_path, mam_path = write_gguf_pair(
            ckpt, work, quant, pair_id,
            progress=lambda done, total: report("decoder", done, total))

        report("vision", 0, len(vision))
        vision_model = Owl2Vision.from_state_dict(cfg, ckpt.load([*vision_shapes(cfg), *abstractor_shapes(cfg)]))
        vision_files = {}
        for i, variant in enumerate(vision):
            vision_files[variant] = names.vision_onnx_file(variant)
            export_vision_onnx(vision_model, work / vision_files[variant], variant=variant)
            report("vision", i + 1, len(vision))
        del vision_model

        p, t = cfg.preprocess, cfg.text
        manifest = Manifest(
            decoder_file=Path(base_path).name,
            mam_file=Path(mam_path).name,
            vision_files=vision_files,
            quant=quant,
            pair_id=pair_id,
            n_visual=cfg.n_visual,
            image=ImageSpec(size=p.image_size, mean=p.image_mean, std=p.image_std,
                            pad_color=p.pad_color),
            decoder=DecoderSpec(n_vocab=t.vocab_size, n_embd=t.hidden_size, n_layer=t.num_layers,
                                n_ctx_train=t.max_position_embeddings, bos_id=t.bos_token_id,
                                eos_id=t.eos_token_id),
            source=str(hf_dir.resolve()),
        )
        manifest.write(work)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
        return manifest
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


__all__ = ["convert", "CheckpointError"]
