"""The model's dimensions, read from a checkpoint's config.json and preprocessor_config.json.

This is the only place dimensions live: the reference, the checkpoint reader, the tiny-checkpoint
generator and the GGUF/ONNX writers all take an Owl2Config. Keys missing from a config file take
upstream's class defaults (as transformers' PretrainedConfig would), so the 7B release and a tiny
test checkpoint go through the same code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from owl2_edge.errors import CheckpointError

MODEL_TYPE = "mplug_owl2"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"

# CLIP's normalisation, the release's preprocessor values.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_width(self) -> int:
        return self.head_dim * self.num_kv_heads


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Patches plus the prepended cls token."""
        return self.grid_size * self.grid_size + 1


@dataclass(frozen=True)
class AbstractorConfig:
    num_queries: int = 64
    hidden_size: int = 1024
    num_layers: int = 6
    num_heads: int = 16
    intermediate_size: int = 2816
    # Only ffn_ln uses this; norm1/normk/norm2 use PyTorch's default 1e-5 (docs/architecture.md §3).
    ffn_ln_eps: float = 1e-6
    encoder_hidden_size: int = 1024
    grid_size: int = 32


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 448
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """Upstream's expand2square colour: int(mean*255), truncated -> (122, 116, 104)."""
        return tuple(int(m * 255) for m in self.image_mean)


@dataclass(frozen=True)
class Owl2Config:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    @property
    def n_visual(self) -> int:
        """Embeddings one image puts into the LLM: the queries plus vit_eos."""
        return self.abstractor.num_queries + 1

    # -- reading ---------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, hf_dir: str | Path) -> "Owl2Config":
        hf_dir = Path(hf_dir)
        config = _read_json(hf_dir / CONFIG_FILE, required=True)
        preprocessor = _read_json(hf_dir / PREPROCESSOR_FILE, required=False)
        return cls.from_dicts(config, preprocessor, source=str(hf_dir / CONFIG_FILE))

    @classmethod
    def from_dicts(cls, config: dict, preprocessor: dict | None = None,
                   source: str = CONFIG_FILE) -> "Owl2Config":
        def fail(why: str) -> CheckpointError:
            return CheckpointError(f"{source}: {why}")

        if config.get("model_type") != MODEL_TYPE:
            raise fail(f"not an mPLUG-Owl2 config (model_type is {config.get('model_type')!r}, "
                       f"expected {MODEL_TYPE!r})")
        visual = config.get("visual_config")
        if not isinstance(visual, dict) or not isinstance(visual.get("visual_model"), dict) \
                or not isinstance(visual.get("visual_abstractor"), dict):
            raise fail("visual_config with visual_model and visual_abstractor is missing")
        if config.get("rope_scaling"):
            raise fail(f"rope_scaling {config['rope_scaling']!r} is not supported")
        if config.get("tie_word_embeddings"):
            raise fail("tied word embeddings are not supported (the release has a separate lm_head)")
        if config.get("hidden_act", "silu") != "silu":
            raise fail(f"hidden_act {config['hidden_act']!r} is not supported (expected 'silu')")
        vm, va = visual["visual_model"], visual["visual_abstractor"]
        if vm.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise fail(f"visual_model.hidden_act {vm['hidden_act']!r} is not supported")

        t, v, a = TextConfig(), VisionConfig(), AbstractorConfig()
        try:
            num_heads = int(config.get("num_attention_heads", t.num_heads))
            text = TextConfig(
                vocab_size=int(config.get("vocab_size", t.vocab_size)),
                hidden_size=int(config.get("hidden_size", t.hidden_size)),
                intermediate_size=int(config.get("intermediate_size", t.intermediate_size)),
                num_layers=int(config.get("num_hidden_layers", t.num_layers)),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                rms_norm_eps=float(config.get("rms_norm_eps", t.rms_norm_eps)),
                rope_theta=float(config.get("rope_theta", t.rope_theta)),
                max_position_embeddings=int(config.get("max_position_embeddings",
                                                       t.max_position_embeddings)),
                bos_token_id=int(config.get("bos_token_id", t.bos_token_id)),
                eos_token_id=int(config.get("eos_token_id", t.eos_token_id)),
            )
            vision = VisionConfig(
                hidden_size=int(vm.get("hidden_size", v.hidden_size)),
                intermediate_size=int(vm.get("intermediate_size", v.intermediate_size)),
                num_layers=int(vm.get("num_hidden_layers", v.num_layers)),
                num_heads=int(vm.get("num_attention_heads", v.num_heads)),
                image_size=int(vm.get("image_size", v.image_size)),
                patch_size=int(vm.get("patch_size", v.patch_size)),
                layer_norm_eps=float(vm.get("layer_norm_eps", v.layer_norm_eps)),
            )
            abstractor = AbstractorConfig(
                num_queries=int(va.get("num_learnable_queries", a.num_queries)),
                hidden_size=int(va.get("hidden_size", a.hidden_size)),
                num_layers=int(va.get("num_hidden_layers", a.num_layers)),
                num_heads=int(va.get("num_attention_heads", a.num_heads)),
                intermediate_size=int(va.get("intermediate_size", a.intermediate_size)),
                ffn_ln_eps=float(va.get("layer_norm_eps", a.ffn_ln_eps)),
                encoder_hidden_size=int(va.get("encoder_hidden_size", a.encoder_hidden_size)),
                grid_size=int(va.get("grid_size") or a.grid_size),
            )
            preprocess = _preprocess_from_dict(preprocessor or {}, vision.image_size)
        except (TypeError, ValueError) as e:
            raise fail(f"a dimension is not a number ({e})") from None

        for name, whole, parts in (("hidden_size", text.hidden_size, text.num_heads),
                                   ("visual_model.hidden_size", vision.hidden_size, vision.num_heads),
                                   ("visual_abstractor.hidden_size", abstractor.hidden_size,
                                    abstractor.num_heads)):
            if parts <= 0 or whole <= 0 or whole % parts:
                raise fail(f"{name} {whole} does not split into {parts} heads")
        if text.num_heads % text.num_kv_heads:
            raise fail(f"num_attention_heads {text.num_heads} is not a multiple of "
                       f"num_key_value_heads {text.num_kv_heads}")
        if text.head_dim % 2:
            raise fail(f"head dimension {text.head_dim} is odd; RoPE needs it even")
        if vision.image_size % vision.patch_size:
            raise fail(f"image_size {vision.image_size} is not a multiple of patch_size "
                       f"{vision.patch_size}")
        if abstractor.grid_size != vision.grid_size:
            raise fail(f"visual_abstractor.grid_size {abstractor.grid_size} does not match the "
                       f"vision grid {vision.image_size}/{vision.patch_size} = {vision.grid_size}")
        if abstractor.encoder_hidden_size != vision.hidden_size:
            raise fail("visual_abstractor.encoder_hidden_size does not match visual_model.hidden_size")
        if abstractor.hidden_size % 4 or vision.hidden_size % 4:
            raise fail("the abstractor's sin-cos tables need hidden sizes divisible by 4")
        if preprocess.image_size != vision.image_size:
            raise fail(f"preprocessor size {preprocess.image_size} differs from the vision "
                       f"tower's image_size {vision.image_size}")
        return cls(text=text, vision=vision, abstractor=abstractor, preprocess=preprocess)

    # -- writing (the tiny-checkpoint generator) -------------------------------------------------

    def to_config_dict(self) -> dict:
        """config.json as the upstream converter writes it (LLaMA keys + nested visual_config)."""
        t, v, a = self.text, self.vision, self.abstractor
        return {
            "architectures": ["MPLUGOwl2LlamaForCausalLM"],
            "model_type": MODEL_TYPE,
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": t.max_position_embeddings,
            "initializer_range": 0.02,
            "rms_norm_eps": t.rms_norm_eps,
            "use_cache": True,
            "pad_token_id": None,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "pretraining_tp": 1,
            "tie_word_embeddings": False,
            "rope_theta": t.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.32.0",
            "visual_config": {
                "visual_model": {
                    "model_type": "mplug_owl_vision_model",
                    "hidden_size": v.hidden_size,
                    "intermediate_size": v.intermediate_size,
                    "projection_dim": 768,
                    "num_hidden_layers": v.num_layers,
                    "num_attention_heads": v.num_heads,
                    "num_channels": 3,
                    "image_size": v.image_size,
                    "patch_size": v.patch_size,
                    "hidden_act": "quick_gelu",
                    "layer_norm_eps": v.layer_norm_eps,
                    "attention_dropout": 0.0,
                    "initializer_range": 0.02,
                    "initializer_factor": 1.0,
                    "use_flash_attn": False,
                },
                "visual_abstractor": {
                    "model_type": "mplug_owl_visual_abstract",
                    "num_learnable_queries": a.num_queries,
                    "hidden_size": a.hidden_size,
                    "num_hidden_layers": a.num_layers,
                    "num_attention_heads": a.num_heads,
                    "intermediate_size": a.intermediate_size,
                    "attention_probs_dropout_prob": 0.0,
                    "initializer_range": 0.02,
                    "layer_norm_eps": a.ffn_ln_eps,
                    "encoder_hidden_size": a.encoder_hidden_size,
                    "grid_size": a.grid_size,
                },
            },
        }

    def to_preprocessor_dict(self) -> dict:
        p = self.preprocess
        return {
            "crop_size": p.image_size,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": list(p.image_mean),
            "image_std": list(p.image_std),
            "resample": 3,
            "size": p.image_size,
        }


def _preprocess_from_dict(d: dict, default_size: int) -> PreprocessConfig:
    size = d.get("crop_size", d.get("size", default_size))
    if isinstance(size, dict):  # newer processors write {"height": .., "width": ..} / {"shortest_edge": ..}
        size = size.get("height", size.get("shortest_edge", default_size))
    mean = tuple(float(x) for x in d.get("image_mean", CLIP_MEAN))
    std = tuple(float(x) for x in d.get("image_std", CLIP_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError("image_mean/image_std must be three numbers, std positive")
    return PreprocessConfig(image_size=int(size), image_mean=mean, image_std=std)


def _read_json(path: Path, required: bool) -> dict | None:
    if not path.exists():
        if required:
            raise CheckpointError(f"{path}: missing (is this a Hugging Face mPLUG-Owl2 folder?)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
