"""The one table of the runtime's names: what the converter, the runtime and the C++ decoder must
agree on, written once here and looked up everywhere else.

The GGUF side (llama.cpp's keys and tensor names, the decoder's layer parts) is in gguf_names.py,
built on gguf-py's own constants; it is kept apart so that `owl2 ask` never imports gguf-py.
cpp_ext/gen_names_header.py writes both into the C++ header the decoder compiles against.
"""

# --- Prompt and tokenization (docs/architecture.md §7) ------------------------------------------

# The id that stands for "one image goes here" in a token list, as upstream's
# tokenizer_image_token returns it. It is never embedded: the splice replaces it by the image's
# n_visual embeddings.
IMAGE_TOKEN_ID = -200
# The text a prompt uses to mark an image's place.
IMAGE_PLACEHOLDER = "<|image|>"

# Template conv_mplug_owl2 (TWO_NO_SYS): no system prompt is ever emitted.
TEMPLATE_ID = "mplug_owl2"
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
USER_SEP = " "          # after a user turn
ASSISTANT_SEP = "</s>"  # after a finished assistant turn

# Modality of a position in the spliced sequence: index into every multiway pair
# (docs/architecture.md §4.1).
TEXT_ROUTE = 0
VISUAL_ROUTE = 1

# --- Where things run (docs/design.md §5) -------------------------------------------------------

# What device= / --device accept, for the decoder (C++) and the vision model alike.
DEVICES = ("auto", "cpu", "cuda")
# The KV cache's element types.
KV_TYPES = ("f16", "f32", "q8_0")

# --- Model folder (docs/design.md §2) -----------------------------------------------------------

MANIFEST_FILE = "owl2.json"
# Written into both GGUF files and the manifest by one conversion: files of different
# conversions are refused together.
KEY_PAIR_ID = "owl2.pair_id"
MANIFEST_FORMAT = "owl2-edge-model"
MANIFEST_VERSION = 1


def base_gguf_file(quant: str) -> str:
    return f"decoder-{quant}.gguf"


def mam_gguf_file(quant: str) -> str:
    return f"mam-{quant}.gguf"


def vision_onnx_file(variant: str) -> str:
    return f"vision-{variant}.onnx"


def vision_data_file(onnx_file: str) -> str:
    """Where a vision ONNX keeps its weights (owl2_edge/onnx_weights.py): beside it."""
    return f"{onnx_file}.data"


# --- Vision ONNX graph (docs/design.md §2.3) ----------------------------------------------------

ONNX_INPUT = "pixel_values"    # float32 [N, 3, S, S]
ONNX_OUTPUT = "image_embeds"   # float32 [N, n_visual, n_embd]
# Every vision file a model folder may hold (docs/design.md §2.3): "fp32" is exported from the
# reference by convert/vision_onnx.py; the others are derived from that file without torch by
# owl2_edge/vision_variants.py.
VISION_VARIANT_NOTES = {"fp32": "exact", "fp16": "for CUDA", "int8": "fastest on the CPU",
                        "int4": "smallest, least exact"}
VISION_VARIANTS = tuple(VISION_VARIANT_NOTES)
# What `owl2 convert` writes unless told: the CPU's pick and the GPU's (owl2_edge/vision.py's
# preferences; docs/quantize.md has the measurements).
DEFAULT_VISION_VARIANTS = ("int8", "fp16")
