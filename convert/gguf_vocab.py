"""tokenizer.model (sentencepiece) -> llama.cpp's `tokenizer.ggml.*` keys.

The base GGUF carries the whole vocabulary so that llama.cpp's own SPM tokenizer (the runtime's
Tokenizer, any llama.cpp tool) reproduces the slow LlamaTokenizer's ids. The keys mirror what
llama.cpp's convert_hf_to_gguf writes for a sentencepiece LLaMA: model "llama", every piece with
its score and type, the special ids, add_bos true / add_eos false (the release's
tokenizer_config.json), and the normalizer's dummy prefix as add_space_prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from owl2_edge.errors import CheckpointError

TOKENIZER_MODEL_NAME = "llama"  # llama.cpp's name for its sentencepiece (SPM) tokenizer
TOKENIZER_PRE = "default"


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[bytes]
    scores: list[float]
    token_types: list[int]  # gguf.TokenType values
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int | None
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    # The release's tokenizer_config.json: a BOS on every encode, never an EOS.
    add_bos: bool = True
    add_eos: bool = False

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def write_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(TOKENIZER_MODEL_NAME)
        writer.add_tokenizer_pre(TOKENIZER_PRE)
        writer.add_token_list(self.tokens)
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        writer.add_unk_token_id(self.unk_id)
        if self.pad_id is not None:
            writer.add_pad_token_id(self.pad_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_remove_extra_whitespaces(self.remove_extra_whitespaces)


def read_sentencepiece_vocab(path: str | Path) -> GGUFVocab:
    """Every piece of a sentencepiece tokenizer.model, in id order, as llama.cpp stores it."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    path = Path(path)
    try:
        data = path.read_bytes()
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(data)
        sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # protobuf and sentencepiece raise assorted types for a damaged file
        raise CheckpointError(f"{path}: not a readable sentencepiece model ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if proto.trainer_spec.model_type not in (sp_pb2.TrainerSpec.BPE, sp_pb2.TrainerSpec.UNIGRAM):
        raise CheckpointError(f"{path}: sentencepiece model type "
                              f"{proto.trainer_spec.model_type} is not a LLaMA tokenizer")

    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        types.append(_token_type(sp, proto, i))

    def special(i: int, what: str) -> int:
        if i < 0:
            raise CheckpointError(f"{path}: the tokenizer has no {what} token")
        return i

    norm = proto.normalizer_spec
    return GGUFVocab(
        tokens=tokens, scores=scores, token_types=types,
        bos_id=special(sp.bos_id(), "BOS"), eos_id=special(sp.eos_id(), "EOS"),
        unk_id=special(sp.unk_id(), "unknown"),
        pad_id=sp.pad_id() if sp.pad_id() >= 0 else None,
        add_space_prefix=bool(norm.add_dummy_prefix),
        remove_extra_whitespaces=bool(norm.remove_extra_whitespaces),
    )


def _token_type(sp, proto, i: int) -> int:
    if sp.is_unknown(i):
        return int(gguf.TokenType.UNKNOWN)
    if sp.is_control(i):
        return int(gguf.TokenType.CONTROL)
    if sp.is_unused(i):
        return int(gguf.TokenType.UNUSED)
    if sp.is_byte(i):
        return int(gguf.TokenType.BYTE)
    # The processor has no is_user_defined; the proto says it.
    if proto.pieces[i].type == proto.pieces[i].USER_DEFINED:
        return int(gguf.TokenType.USER_DEFINED)
    return int(gguf.TokenType.NORMAL)
