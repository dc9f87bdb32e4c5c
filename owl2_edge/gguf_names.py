"""The GGUF side of the names: llama.cpp's keys and tensor names (taken from gguf-py, never
retyped), the keys owl2-edge adds for its MAM sidecar, and the table of a decoder layer's parts
that maps the release's tensor names to llama.cpp's (docs/design.md §2).

The converter writes by this table, `owl2 info` reads by it, and cpp_ext/gen_names_header.py
turns it into the C++ header the decoder is compiled against, so the C++ side holds no copy.
The runtime's hot path never imports this module (gguf-py costs a fifth of a second to import).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from owl2_edge import names

_T = gguf.MODEL_TENSOR
_K = gguf.Keys

# --- Keys ------------------------------------------------------------------------------------------

ARCHITECTURE = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]    # "llama"
KEY_ARCHITECTURE = _K.General.ARCHITECTURE
KEY_GENERAL_TYPE = _K.General.TYPE
KEY_ADAPTER_TYPE = _K.Adapter.TYPE
ADAPTER_GENERAL_TYPE = gguf.GGUFType.ADAPTER                   # "adapter"


def _llama_key(template: str) -> str:
    return template.format(arch=ARCHITECTURE)


# The hyper-parameters the decoder reads from the base file, by llama.cpp's names.
KEY_CONTEXT_LENGTH = _llama_key(_K.LLM.CONTEXT_LENGTH)
KEY_EMBEDDING_LENGTH = _llama_key(_K.LLM.EMBEDDING_LENGTH)
KEY_BLOCK_COUNT = _llama_key(_K.LLM.BLOCK_COUNT)
KEY_FEED_FORWARD_LENGTH = _llama_key(_K.LLM.FEED_FORWARD_LENGTH)
KEY_HEAD_COUNT = _llama_key(_K.Attention.HEAD_COUNT)
KEY_HEAD_COUNT_KV = _llama_key(_K.Attention.HEAD_COUNT_KV)
KEY_RMS_EPS = _llama_key(_K.Attention.LAYERNORM_RMS_EPS)
KEY_ROPE_DIMENSION_COUNT = _llama_key(_K.Rope.DIMENSION_COUNT)
KEY_ROPE_FREQ_BASE = _llama_key(_K.Rope.FREQ_BASE)

# The vocabulary's keys, which owl2-edge checks before llama.cpp's tokenizer reads them.
KEY_TOKENIZER_MODEL = _K.Tokenizer.MODEL
KEY_TOKENIZER_TOKENS = _K.Tokenizer.LIST
KEY_TOKENIZER_SCORES = _K.Tokenizer.SCORES
KEY_TOKENIZER_TOKEN_TYPE = _K.Tokenizer.TOKEN_TYPE
# llama.cpp's name for its sentencepiece tokenizer, the one the converter writes.
SPM_TOKENIZER_MODEL = "llama"

# owl2-edge's own keys. The pair id ties a sidecar to the base it was converted with (both files
# carry it); the sidecar repeats the widths so that a loader can check it before any tensor.
MAM_ADAPTER_TYPE = "owl2-mam"
KEY_PAIR_ID = names.KEY_PAIR_ID   # the runtime reads it too, so it lives in names.py
KEY_MAM_BLOCK_COUNT = "owl2.block_count"
KEY_MAM_EMBEDDING_LENGTH = "owl2.embedding_length"
KEY_MAM_KV_WIDTH = "owl2.kv_width"
# The decoder names a sidecar weight as the base's weight of the same name plus this, so the two
# routes' matrices stay apart where one name would mix them (the importance matrix's entries).
VISUAL_WEIGHT_SUFFIX = ".visual"

# --- Importance matrices (llama.cpp's imatrix GGUF, as its llama-imatrix tool writes it) --------

IMATRIX_GENERAL_TYPE = gguf.GGUFType.IMATRIX                   # "imatrix"
KEY_IMATRIX_DATASETS = _K.IMatrix.DATASETS
KEY_IMATRIX_CHUNK_COUNT = _K.IMatrix.CHUNK_COUNT
KEY_IMATRIX_CHUNK_SIZE = _K.IMatrix.CHUNK_SIZE
# Per weight matrix <name>: <name>.in_sum2, float32 [n_per_row, 1], the sum of squared inputs
# per column; <name>.counts, float32 [1, 1], the positions summed.
IMATRIX_SUM_SUFFIX = ".in_sum2"
IMATRIX_COUNT_SUFFIX = ".counts"
# The sidecar's matrices share the base's names; in an imatrix file they carry this prefix, which
# llama.cpp's tools (looking for the base's names) pass over.
IMATRIX_MAM_PREFIX = "owl2.mam."

# --- Tensors ---------------------------------------------------------------------------------------


def _weight(template: str, **fields) -> str:
    return template.format(**fields) + ".weight"


TOKEN_EMBD = _weight(gguf.TENSOR_NAMES[_T.TOKEN_EMBD])
OUTPUT_NORM = _weight(gguf.TENSOR_NAMES[_T.OUTPUT_NORM])
OUTPUT = _weight(gguf.TENSOR_NAMES[_T.OUTPUT])


@dataclass(frozen=True)
class LayerPart:
    """One weight of a decoder layer, on both sides of the conversion.

    tensor:  gguf-py's id of the tensor; `name` is llama.cpp's name inside a layer
             (blk.{i}.<name>.weight), `gguf_name(i)` the full name.
    hf:      the release's module in model.layers.{i}; a routed part has .multiway.{0,1} under it.
    routed:  MAM doubles it: the text route lives in the base GGUF, the visual route in the
             sidecar under the very same tensor name (docs/architecture.md §4.1).
    shape:   PyTorch's shape ([out, in] for a matrix) in dimension names: n_embd, n_embd_kv, n_ff.
    rope_heads: for Q and K, the head count their rows are permuted over for llama.cpp's rope
             (docs/architecture.md §4.2); "" for every other part.
    """
    tensor: gguf.MODEL_TENSOR
    hf: str
    routed: bool
    shape: tuple[str, ...]
    rope_heads: str = ""

    @property
    def name(self) -> str:
        return gguf.TENSOR_NAMES[self.tensor].split(".")[-1]     # "blk.{bid}.attn_q" -> "attn_q"

    def gguf_name(self, i: int) -> str:
        return _weight(gguf.TENSOR_NAMES[self.tensor], bid=i)

    @property
    def is_norm(self) -> bool:
        """A 1-D RMSNorm weight: stays float32 whatever the quantization, like llama.cpp's."""
        return len(self.shape) == 1


# A decoder layer in the order its math runs.
LAYER_PARTS = (
    LayerPart(_T.ATTN_NORM, "input_layernorm", True, ("n_embd",)),
    LayerPart(_T.ATTN_Q, "self_attn.q_proj", False, ("n_embd", "n_embd"), rope_heads="n_head"),
    LayerPart(_T.ATTN_K, "self_attn.k_proj", True, ("n_embd_kv", "n_embd"), rope_heads="n_head_kv"),
    LayerPart(_T.ATTN_V, "self_attn.v_proj", True, ("n_embd_kv", "n_embd")),
    LayerPart(_T.ATTN_OUT, "self_attn.o_proj", False, ("n_embd", "n_embd")),
    LayerPart(_T.FFN_NORM, "post_attention_layernorm", True, ("n_embd",)),
    LayerPart(_T.FFN_GATE, "mlp.gate_proj", False, ("n_ff", "n_embd")),
    LayerPart(_T.FFN_UP, "mlp.up_proj", False, ("n_ff", "n_embd")),
    LayerPart(_T.FFN_DOWN, "mlp.down_proj", False, ("n_embd", "n_ff")),
)
SHARED_LAYER_PARTS = tuple(p for p in LAYER_PARTS if not p.routed)
ROUTED_LAYER_PARTS = tuple(p for p in LAYER_PARTS if p.routed)
LAYER_PART_BY_NAME = {p.name: p for p in LAYER_PARTS}


# A layer tensor's name as a printf format (layer index, part name), for the C++ side.
LAYER_TENSOR_FORMAT = LAYER_PARTS[0].gguf_name(0).replace(".0.", ".%d.", 1).replace(
    LAYER_PARTS[0].name, "%s", 1)


def blk(i: int, part: str | LayerPart) -> str:
    """The GGUF tensor name of one part of layer i: blk.{i}.attn_k.weight."""
    if not isinstance(part, LayerPart):
        if part not in LAYER_PART_BY_NAME:
            raise ValueError(f"unknown decoder layer part {part!r}")
        part = LAYER_PART_BY_NAME[part]
    return part.gguf_name(i)
