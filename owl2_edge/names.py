"""The one table of names that the converter and the runtime must agree on.

Every GGUF key, tensor name, manifest field, ONNX input/output name, the image slot id and the
prompt template is written here once; everything else looks them up. (gguf-py's constants.py
keeps llama.cpp's names the same way.)
"""

# --- Prompt and tokenization (owl2-architecture.md §7) -----------------------------------------

# The id that stands for "one image goes here" in a token list, as upstream's
# tokenizer_image_token returns it. It is never embedded: the splice replaces it by the image's
# n_visual embeddings.
IMAGE_TOKEN_ID = -200
# The text a prompt uses to mark an image's place.
IMAGE_PLACEHOLDER = "<|image|>"

# Template conv_mplug_owl2 (TWO_NO_SYS): no system prompt is ever emitted.
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
USER_SEP = " "          # after a user turn
ASSISTANT_SEP = "</s>"  # after a finished assistant turn
STOP_STRING = "</s>"

# Modality of a position in the spliced sequence: index into every multiway pair.
TEXT_ROUTE = 0
VISUAL_ROUTE = 1

# --- Model folder (design.md §2) -----------------------------------------------------------------

MANIFEST_FILE = "owl2.json"
MANIFEST_FORMAT = "owl2-edge-model"
MANIFEST_VERSION = 1


def base_gguf_file(quant: str) -> str:
    return f"decoder-{quant}.gguf"


def mam_gguf_file(quant: str) -> str:
    return f"mam-{quant}.gguf"


def vision_onnx_file(variant: str) -> str:
    return f"vision-{variant}.onnx"


# --- Vision ONNX graph ---------------------------------------------------------------------------

ONNX_INPUT = "pixel_values"    # float32 [N, 3, S, S]
ONNX_OUTPUT = "image_embeds"   # float32 [N, n_visual, n_embd]
VISION_VARIANTS = ("fp32", "fp16")

# --- GGUF keys -----------------------------------------------------------------------------------

KEY_ARCHITECTURE = "general.architecture"
KEY_GENERAL_TYPE = "general.type"
KEY_ADAPTER_TYPE = "adapter.type"
KEY_PAIR_ID = "owl2.pair_id"
# Written into the sidecar so that a loader can check it against the base before reading tensors.
KEY_MAM_BLOCK_COUNT = "owl2.block_count"
KEY_MAM_EMBEDDING_LENGTH = "owl2.embedding_length"
KEY_MAM_KV_WIDTH = "owl2.kv_width"

ARCHITECTURE = "llama"
ADAPTER_GENERAL_TYPE = "adapter"
MAM_ADAPTER_TYPE = "owl2-mam"

# --- GGUF tensor names (llama.cpp's names for the LLaMA architecture) ----------------------------

TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"


def blk(i: int, part: str) -> str:
    return f"blk.{i}.{part}.weight"


# Per-layer parts shared by both routes (stored only in the base file).
SHARED_LAYER_PARTS = ("attn_q", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Per-layer parts that MAM doubles: the base file holds the text route under these names, the
# sidecar holds the visual route under the very same names.
ROUTED_LAYER_PARTS = ("attn_norm", "attn_k", "attn_v", "ffn_norm")
# The routed norms stay float32 whatever the quantization (llama.cpp keeps 1-D tensors f32).
ROUTED_NORM_PARTS = ("attn_norm", "ffn_norm")
