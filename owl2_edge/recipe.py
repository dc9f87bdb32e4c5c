"""Per-tensor types for the decoder pair: llama.cpp's --tensor-type rule, the sidecar included
(docs/quantize.md, "Per-tensor types").

A tensor is addressed by its GGUF name in the base (blk.3.ffn_down.weight), and in the sidecar
by the same name behind gguf_names.IMATRIX_MAM_PREFIX (owl2.mam.blk.3.attn_v.weight), the names
an importance matrix gives them. An override is PATTERN=TYPE: PATTERN a regular expression
searched in that name (Python's re.search), TYPE a ggml type (Q4_K, q6_k, IQ4_XS, F16, ...). The
first override whose pattern matches decides, as in llama.cpp's tool. Only matrices take
overrides: the norms stay float32, as llama.cpp keeps them and the decoder reads them.

The files stay stock: the base is a llama.cpp GGUF whose tensors have mixed types (llama.cpp's
own mixes are the same), the sidecar a GGUF of the same kind. retype_gguf writes one from a
finished file (whose bytes it copies where the type is unchanged) and the float source (which
it encodes where the type changes, with ggml's routine and the importance matrix, as llama.cpp's
quantizer does).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import gguf
import numpy as np

from owl2_edge import _decoder, gguf_names, quant
from owl2_edge.errors import ArgumentError

T = gguf.GGMLQuantizationType

# The ggml types a matrix may take, from the largest to the smallest (bits per weight).
TENSOR_TYPES: dict[str, T] = {name: T[name] for name in (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0",
    "IQ4_NL", "IQ4_XS", "Q3_K", "IQ3_S", "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS",
    "IQ1_M", "IQ1_S")}
# ggml rounds these only with an importance matrix (it refuses them without one).
NEEDS_IMATRIX = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"})
SIDECAR_PREFIX = gguf_names.IMATRIX_MAM_PREFIX
# The options that are overrides of one tensor each, as llama.cpp's tool has them.
OUTPUT_PATTERN = r"^output\.weight$"
TOKEN_EMBD_PATTERN = r"^token_embd\.weight$"


def type_name(ggml_type: int) -> str:
    return T(int(ggml_type)).name


def check_tensor_type(name: str, option: str = "--tensor-type") -> str:
    canonical = str(name).strip().upper()
    if canonical not in TENSOR_TYPES:
        raise ArgumentError(f"{option}: unknown tensor type {name!r}; choose one of "
                            f"{', '.join(TENSOR_TYPES)}")
    return canonical


@dataclass(frozen=True)
class Override:
    pattern: str
    type: str        # a TENSOR_TYPES name
    option: str = "--tensor-type"

    def matches(self, key: str) -> bool:
        return re.search(self.pattern, key) is not None

    def to_json(self) -> list[str]:
        return [self.pattern, self.type]


def parse_override(text: str, option: str = "--tensor-type") -> Override:
    """'PATTERN=TYPE' (the last '=' splits: a pattern may hold one) -> Override."""
    pattern, sep, type_ = str(text).rpartition("=")
    if not sep or not pattern:
        raise ArgumentError(f"{option}: {text!r} is not PATTERN=TYPE (e.g. 'attn_v=Q6_K')")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ArgumentError(f"{option}: {pattern!r} is not a regular expression ({e})") from None
    return Override(pattern, check_tensor_type(type_, option), option)


def overrides_of(tensor_types: Sequence[str] = (), output_type: str | None = None,
                 token_embedding_type: str | None = None) -> list[Override]:
    """The CLI's three options as one ordered list (the single-tensor ones first: they win)."""
    out = []
    if output_type is not None:
        out.append(Override(OUTPUT_PATTERN, check_tensor_type(output_type, "--output-tensor-type"),
                            "--output-tensor-type"))
    if token_embedding_type is not None:
        out.append(Override(TOKEN_EMBD_PATTERN,
                            check_tensor_type(token_embedding_type, "--token-embedding-type"),
                            "--token-embedding-type"))
    return out + [parse_override(t) for t in tensor_types]


# --- Which type each tensor gets ------------------------------------------------------------------

@dataclass(frozen=True)
class Matrix:
    """A matrix of the pair: its key (sidecar names prefixed), its shape and its current type."""
    key: str
    rows: int
    cols: int
    type: int

    @property
    def sidecar(self) -> bool:
        return self.key.startswith(SIDECAR_PREFIX)

    @property
    def name(self) -> str:
        """Its name inside its own file."""
        return self.key[len(SIDECAR_PREFIX):] if self.sidecar else self.key

    def bytes_at(self, ggml_type: int) -> int:
        return self.rows * _decoder.row_bytes(int(ggml_type), self.cols)

    def fits(self, ggml_type: int) -> bool:
        return self.cols % gguf.GGML_QUANT_SIZES[T(int(ggml_type))][0] == 0


def matrices(base_path: Path, mam_path: Path) -> list[Matrix]:
    """Every matrix of a pair (2-D tensors; the norms are left out), the base's first."""
    out = []
    for path, prefix in ((base_path, ""), (mam_path, SIDECAR_PREFIX)):
        for t in gguf.GGUFReader(path).tensors:
            if len(t.shape) == 2 and int(t.shape[1]) > 1:
                out.append(Matrix(prefix + t.name, int(t.shape[1]), int(t.shape[0]),
                                  int(t.tensor_type)))
    return out


def resolve(pair: Sequence[Matrix], overrides: Sequence[Override],
            importance_keys: set[str] | None) -> dict[str, int]:
    """key -> the type each matrix takes once `overrides` apply (its current type where none
    matches). Refuses a pattern that matches no matrix (a typo would otherwise change nothing), a
    type whose blocks do not fill the matrix's rows, and a type ggml rounds only with an
    importance matrix where the importance matrix has no entry for that matrix."""
    for o in overrides:
        if not any(o.matches(m.key) for m in pair):
            raise ArgumentError(f"{o.option} {o.pattern}={o.type}: the pattern matches no matrix "
                                f"of the decoder (GGUF names such as blk.0.attn_v.weight; the "
                                f"sidecar's begin with {SIDECAR_PREFIX})")
    types = {}
    for m in pair:
        types[m.key] = m.type
        for o in overrides:
            if o.matches(m.key):
                t = TENSOR_TYPES[o.type]
                if not m.fits(t):
                    raise ArgumentError(
                        f"{o.option} {o.pattern}={o.type}: {m.key} has rows of {m.cols} values, "
                        f"not whole {o.type} blocks of {gguf.GGML_QUANT_SIZES[t][0]}")
                if o.type in NEEDS_IMATRIX and (importance_keys is None
                                                or m.key not in importance_keys):
                    raise ArgumentError(
                        f"{o.option} {o.pattern}={o.type}: {o.type} needs an importance matrix "
                        f"with an entry for {m.key} (make one with `owl2 imatrix`, pass --imatrix)")
                types[m.key] = int(t)
                break
    return types


def importance_by_key(importance) -> dict[str, np.ndarray]:
    """An ImportanceMatrix's entries by tensor key (sidecar entries prefixed)."""
    if importance is None:
        return {}
    return {**importance.for_base(),
            **{SIDECAR_PREFIX + k: v for k, v in importance.for_sidecar().items()}}


# --- Writing a file with other types ---------------------------------------------------------------

def retype_gguf(template: Path, source: Path, out: Path, types: Mapping[str, int],
                importance: Mapping[str, np.ndarray] | None = None,
                tick: Callable[[], None] | None = None) -> None:
    """`template` again, each tensor at types[name] (its own type where absent): its keys and
    tensor order are kept, a tensor whose type is unchanged keeps its bytes, any other is encoded
    from `source` (the same file at full precision: F32, F16 or BF16). importance: by the names
    in this file."""
    tpl = gguf.GGUFReader(template)
    src = {t.name: t for t in gguf.GGUFReader(source).tensors}
    plan = []
    for t in tpl.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        new = int(types.get(t.name, t.tensor_type))
        plan.append((t, shape, new))
    arch = tpl.fields[gguf.Keys.General.ARCHITECTURE].contents()
    with contextlib.closing(gguf.GGUFWriter(out, arch)) as writer:
        _copy_keys(tpl, writer)
        for t, shape, new in plan:
            quant.declare(writer, t.name, shape, new)
        quant.write_preamble(writer)
        for t, shape, new in plan:
            if new == int(t.tensor_type):
                data = np.ascontiguousarray(t.data).view(np.uint8)
            else:
                if t.name not in src:
                    raise ArgumentError(f"{source}: no tensor {t.name} to quantize from")
                weights = importance.get(t.name) if importance else None
                data = quant.encode(quant.decode(src[t.name]), t.name, new, weights)
            writer.write_tensor_data(data.reshape(quant.byte_shape(shape, new)))
            if tick is not None:
                tick()


def _copy_keys(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every key of `reader` into `writer`, with its value type (the architecture and the
    file's own counts are the writer's to write)."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
