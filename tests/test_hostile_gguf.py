"""Hostile GGUF files against the native side (cpp_ext/): each one refused with one clean line,
never an abort, a UnicodeDecodeError or ggml's log on stderr.

The vocabulary check (_decoder.check_vocab) runs before llama.cpp's tokenizer sees the base GGUF:
the vocabularies below that abort llama.cpp (llama-cpp-python 0.3.36) are loaded by stock
llama.cpp in a child process to show the abort, then refused by check_vocab in this one.
"""

from __future__ import annotations

import pytest

# The files are rewritten from the converter's output.
pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import math
import os
import re
import resource
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from owl2_edge import _decoder, gguf_names, names
from owl2_edge.convert.gguf_pair import write_gguf_pair
from owl2_edge.decoder import Decoder
from owl2_edge.errors import ArgumentError, DecoderError

VT = gguf.GGUFValueType
TOKENS = gguf.Keys.Tokenizer.LIST
SCORES = gguf.Keys.Tokenizer.SCORES
TOKEN_TYPE = gguf.Keys.Tokenizer.TOKEN_TYPE
MODEL = gguf.Keys.Tokenizer.MODEL

# --- a GGUF rewriter --------------------------------------------------------------------------------
# gguf-py's GGUFWriter refuses empty arrays (one of the hostile cases) and re-encodes strings, so
# files are written here byte by byte: GGUFReader reads the good file, the metadata is edited as
# {key: (type, value, element type)} with strings as raw bytes, and the tensors keep their data.

_PACK = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
         VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d"}

Metadata = dict  # key -> (VT, value, element VT or None)
Tensors = list   # [name bytes, ggml shape, ggml type, data bytes]


def _read(path: Path) -> tuple[Metadata, Tensors]:
    reader = gguf.GGUFReader(path)
    kv: Metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header, not a key
            continue
        vtype = VT(field.types[0])
        if vtype == VT.ARRAY:
            sub = VT(field.types[-1])
            value = [bytes(field.parts[i]) for i in field.data] if sub == VT.STRING else field.contents()
            kv[key] = (vtype, value, sub)
        else:
            kv[key] = (vtype, bytes(field.parts[-1]) if vtype == VT.STRING else field.contents(), None)
    raw = path.read_bytes()
    tensors = [[t.name.encode(), [int(n) for n in t.shape], int(t.tensor_type),
                raw[t.data_offset:t.data_offset + t.n_bytes]] for t in reader.tensors]
    return kv, tensors


def _value(vtype: VT, value, sub: VT | None = None) -> bytes:
    if vtype == VT.STRING:
        data = value.encode() if isinstance(value, str) else value
        return struct.pack("<Q", len(data)) + data
    if vtype == VT.ARRAY:
        return struct.pack("<IQ", sub, len(value)) + b"".join(_value(sub, x) for x in value)
    return struct.pack("<" + _PACK[vtype], value)


def rewrite(src: Path, dst: Path, edit: Callable[[Metadata, Tensors], None]) -> Path:
    """dst = src with edit(metadata, tensors) applied (GGUF v3, 32-byte alignment)."""
    kv, tensors = _read(src)
    edit(kv, tensors)
    align = 32
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for key, (vtype, value, sub) in kv.items():
        out += _value(VT.STRING, key) + struct.pack("<I", vtype) + _value(vtype, value, sub)
    offset = 0
    for name, shape, ttype, data in tensors:
        out += _value(VT.STRING, name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", n) for n in shape) + struct.pack("<IQ", ttype, offset)
        offset += -(-len(data) // align) * align
    out += bytes(-len(out) % align)
    for *_, data in tensors:
        out += data + bytes(-len(data) % align)
    dst.write_bytes(bytes(out))
    return dst


# Edits, composable.

def set_key(key: str, vtype: VT, value, sub: VT | None = None):
    def edit(kv, tensors):
        kv[key] = (vtype, value, sub)
    return edit


def drop_key(key: str):
    def edit(kv, tensors):
        del kv[key]
    return edit


def change_array(key: str, change: Callable[[list], list]):
    def edit(kv, tensors):
        vtype, value, sub = kv[key]
        kv[key] = (vtype, change(list(value)), sub)
    return edit


def put(i: int, x):
    def change(values: list) -> list:
        values[i] = x
        return values
    return change


def copy_item(src: int, dst: int):
    def change(values: list) -> list:
        values[dst] = values[src]
        return values
    return change


def each(*edits):
    def edit(kv, tensors):
        for e in edits:
            e(kv, tensors)
    return edit


def first(n: int):
    """Keep the first n tokens (with their scores and types)."""
    return each(*(change_array(k, lambda v: v[:n]) for k in (TOKENS, SCORES, TOKEN_TYPE)))


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tiny_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    return write_gguf_pair(tiny_ckpt, tmp_path_factory.mktemp("hostile-pair"), "F32", "tiny-pair")


def open_decoder(base: Path, mam: Path, **kw) -> Decoder:
    return Decoder(base, mam, n_ctx=64, kv_type="f32", device="cpu", **kw)


def refused_message(call) -> str:
    """The message of the NativeDecoderError `call` raises: one line, text Python could decode."""
    with pytest.raises(_decoder.NativeDecoderError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and "\r" not in message
    return message


# --- the vocabulary ---------------------------------------------------------------------------------
# Token ids in the tiny vocabulary: 0 <unk>, 1 <s>, 2 </s>, 3..258 the byte tokens <0x00>..<0xFF>
# (type BYTE), then the sentencepiece pieces. 300 and 400 are ordinary pieces.

# (edit, what check_vocab says after "decoder GGUF <path>: ")
VOCAB_CASES = {
    "duplicate token": (change_array(TOKENS, copy_item(300, 400)),
                        r"tokenizer\.ggml\.tokens has a duplicate token at 400 \(same as 300\)"),
    "duplicate byte token": (change_array(TOKENS, copy_item(12, 57)),
                             r"tokenizer\.ggml\.tokens has a duplicate token at 57 \(same as 12\)"),
    "tokenizer model bert": (set_key(MODEL, VT.STRING, b"bert"),
                             r"tokenizer\.ggml\.model is 'bert', expected 'llama'"),
    "tokenizer model none": (set_key(MODEL, VT.STRING, b"none"),
                             r"tokenizer\.ggml\.model is 'none', expected 'llama'"),
    "tokenizer model gpt2": (set_key(MODEL, VT.STRING, b"gpt2"),
                             r"tokenizer\.ggml\.model is 'gpt2', expected 'llama'"),
    "tokenizer model not a string": (set_key(MODEL, VT.UINT32, 1),
                                     r"key tokenizer\.ggml\.model is not a string"),
    "tokenizer model missing": (drop_key(MODEL), r"missing key tokenizer\.ggml\.model"),
    "empty token list": (each(*(set_key(k, VT.ARRAY, [], t) for k, t in
                                ((TOKENS, VT.STRING), (SCORES, VT.FLOAT32), (TOKEN_TYPE, VT.INT32)))),
                         r"tokenizer\.ggml\.tokens is empty"),
    "every token empty": (change_array(TOKENS, lambda v: [b""] * len(v)),
                          r"tokenizer\.ggml\.tokens has an empty token at 0"),
    "one empty token": (change_array(TOKENS, put(300, b"")),
                        r"tokenizer\.ggml\.tokens has an empty token at 300"),
    "no byte tokens": (first(4),
                       r"tokenizer\.ggml\.tokens has no token for the byte <0x01>"),
    "byte token replaced by a piece": (change_array(TOKENS, put(3 + 0xE4, "一一".encode())),
                                       r"tokenizer\.ggml\.tokens has a byte token '一一' at 231 that is not <0xHH>"),
    "byte token missing": (each(change_array(TOKENS, put(3 + 0xE4, "一一".encode())),
                                change_array(TOKEN_TYPE, put(3 + 0xE4, int(gguf.TokenType.NORMAL)))),
                           r"tokenizer\.ggml\.tokens has no token for the byte <0xE4>"),
    "token not UTF-8": (change_array(TOKENS, put(300, b"ab\xff")),
                        r"tokenizer\.ggml\.tokens has a token that is not valid UTF-8 at 300 \('ab\\xFF'\)"),
    "token truncated UTF-8": (change_array(TOKENS, put(300, b"ab\xe4\xb8")),
                              r"not valid UTF-8 at 300"),
    "token overlong UTF-8": (change_array(TOKENS, put(300, b"\xc0\xaf")), r"not valid UTF-8 at 300"),
    "token UTF-8 surrogate": (change_array(TOKENS, put(300, b"\xed\xa0\x80")), r"not valid UTF-8 at 300"),
    "control token not UTF-8": (change_array(TOKENS, put(1, b"<s\xff>")), r"not valid UTF-8 at 1 "),
    "tokens missing": (drop_key(TOKENS), r"missing key tokenizer\.ggml\.tokens"),
    "tokens of u8": (set_key(TOKENS, VT.ARRAY, [1, 2, 3], VT.UINT8),
                     r"key tokenizer\.ggml\.tokens is an array of u8, expected an array of str"),
    "tokens a string": (set_key(TOKENS, VT.STRING, b"abc"),
                        r"key tokenizer\.ggml\.tokens is str, expected an array of str"),
    "fewer scores": (change_array(SCORES, lambda v: v[:-1]),
                     r"tokenizer\.ggml\.scores has 511 entries for 512 tokens"),
    "more scores": (change_array(SCORES, lambda v: v + [0.0]),
                    r"tokenizer\.ggml\.scores has 513 entries for 512 tokens"),
    "scores of i32": (set_key(SCORES, VT.ARRAY, [0] * 512, VT.INT32),
                      r"key tokenizer\.ggml\.scores is an array of i32, expected an array of f32"),
    "score NaN": (change_array(SCORES, put(300, math.nan)),
                  r"tokenizer\.ggml\.scores has a score that is not finite at 300"),
    "score inf": (change_array(SCORES, put(300, -math.inf)), r"not finite at 300"),
    "fewer token types": (change_array(TOKEN_TYPE, lambda v: v[:-1]),
                          r"tokenizer\.ggml\.token_type has 511 entries for 512 tokens"),
    "more token types": (change_array(TOKEN_TYPE, lambda v: v + [1]), r"has 513 entries for 512 tokens"),
    "token types of u8": (set_key(TOKEN_TYPE, VT.ARRAY, [1] * 512, VT.UINT8),
                          r"key tokenizer\.ggml\.token_type is an array of u8, expected an array of i32"),
    "token type 99": (change_array(TOKEN_TYPE, put(300, 99)),
                      r"tokenizer\.ggml\.token_type has type 99 at 300, not one of llama\.cpp's token types 1\.\.6"),
    "token type -1": (change_array(TOKEN_TYPE, put(300, -1)), r"has type -1 at 300"),
    "token type undefined": (change_array(TOKEN_TYPE, put(300, 0)), r"has type 0 at 300"),
    "byte type on a piece": (change_array(TOKEN_TYPE, put(300, int(gguf.TokenType.BYTE))),
                             r"tokenizer\.ggml\.tokens has a byte token '.*' at 300 that is not <0xHH>"),
    "bos outside": (set_key(gguf.Keys.Tokenizer.BOS_ID, VT.UINT32, 512),
                    r"tokenizer\.ggml\.bos_token_id = 512 is outside the vocabulary \[0, 512\)"),
    "eos outside": (set_key(gguf.Keys.Tokenizer.EOS_ID, VT.UINT32, 2**32 - 1),
                    r"tokenizer\.ggml\.eos_token_id = 4294967295 is outside the vocabulary"),
    "unk outside": (set_key(gguf.Keys.Tokenizer.UNK_ID, VT.UINT32, 600),
                    r"tokenizer\.ggml\.unknown_token_id = 600 is outside"),
    "sep outside": (set_key(gguf.Keys.Tokenizer.SEP_ID, VT.UINT32, 512),
                    r"tokenizer\.ggml\.seperator_token_id = 512 is outside"),
    "pad outside": (set_key(gguf.Keys.Tokenizer.PAD_ID, VT.UINT32, 512),
                    r"tokenizer\.ggml\.padding_token_id = 512 is outside"),
    "bos negative i32": (set_key(gguf.Keys.Tokenizer.BOS_ID, VT.INT32, -1),
                         r"key tokenizer\.ggml\.bos_token_id is i32, expected u32"),
    "bos a string": (set_key(gguf.Keys.Tokenizer.BOS_ID, VT.STRING, b"1"),
                     r"key tokenizer\.ggml\.bos_token_id is str, expected u32"),
    "architecture gemma": (set_key(gguf_names.KEY_ARCHITECTURE, VT.STRING, b"gemma"),
                           r"general\.architecture is 'gemma', expected 'llama'"),
}

# How llama.cpp (llama-cpp-python 0.3.36) fares with the vocabularies that abort it: at load, or
# at the first tokenize (the Tokenizer's first use), the process gets SIGABRT.
ABORTS_LLAMA_CPP = {
    "duplicate token": "load",             # GGML_ASSERT(id_to_token.size() == token_to_id.size())
    "duplicate byte token": "load",
    "tokenizer model bert": "load",        # GGML_ABORT("fatal error"): a WPM vocab has no byte tokens
    "tokenizer model none": "tokenize",    # GGML_ASSERT(tokenizer && "Tokenizer not initialized...")
    "empty token list": "tokenize",        # GGML_ASSERT(special_bos_id != LLAMA_TOKEN_NULL)
    "every token empty": "tokenize",       # std::out_of_range from byte_to_token: no <0xHH> tokens
    "no byte tokens": "tokenize",          # the same
}

# llama.cpp loads these and quietly uses another id (or none): refused here instead.
REPLACED_BY_LLAMA_CPP = ("bos outside", "pad outside")

# The child: llama.cpp's vocab-only load and one tokenize, as owl2_edge/tokenizer.py does them.
LLAMA_CPP_CHILD = r"""
import sys, llama_cpp
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_default_params()
params.vocab_only = True
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), params)
if not model:
    print("refused", flush=True)
    sys.exit(0)
vocab = llama_cpp.llama_model_get_vocab(model)
print("loaded", llama_cpp.llama_vocab_n_tokens(vocab), llama_cpp.llama_vocab_bos(vocab),
      llama_cpp.llama_vocab_pad(vocab), flush=True)
text = "USER: Hello world, café 你好 ASSISTANT:".encode()
ids = (llama_cpp.llama_token * 256)()
print("tokenized", llama_cpp.llama_tokenize(vocab, text, len(text), ids, 256, True, True), flush=True)
"""


def _no_core_dump() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def python_child() -> list[str]:
    """This Python for a child process; under scripts/sanitize.sh (python -S) the child also skips
    site-packages' .pth files, so that it imports the same (sanitized) owl2_edge."""
    return [sys.executable, *(["-S"] if sys.flags.no_site else [])]


def run_stock_llama_cpp(path: Path) -> subprocess.CompletedProcess:
    # GGML_NO_BACKTRACE: ggml's abort would otherwise start gdb for a backtrace (seconds).
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    return subprocess.run([*python_child(), "-c", LLAMA_CPP_CHILD, str(path)], capture_output=True,
                          text=True, errors="replace", env=env, timeout=120, preexec_fn=_no_core_dump)


@pytest.fixture(scope="module")
def bad_vocab(pair, tmp_path_factory):
    """case name -> a base GGUF with that vocabulary (written once)."""
    root = tmp_path_factory.mktemp("bad-vocab")
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in cache:
            cache[case] = rewrite(pair[0], root / (re.sub(r"\W+", "-", case) + ".gguf"), VOCAB_CASES[case][0])
        return cache[case]
    return get


def test_check_vocab_accepts_the_converters_vocabulary(pair):
    base, _ = pair
    n_tokens = len(gguf.GGUFReader(base).fields[TOKENS].data)
    assert _decoder.check_vocab(str(base)) == n_tokens == 512
    with open_decoder(*pair) as dec:
        assert dec.n_vocab == n_tokens


def test_check_vocab_accepts_a_rewritten_copy(pair, tmp_path):
    """The rewriter itself changes nothing the check or the decoder sees."""
    copy = rewrite(pair[0], tmp_path / "copy.gguf", lambda kv, tensors: None)
    assert _decoder.check_vocab(str(copy)) == 512
    with open_decoder(copy, pair[1]) as dec:
        assert np.isfinite(dec.eval_tokens([1, 5, 6])).all()


@pytest.mark.parametrize("case", list(VOCAB_CASES))
def test_check_vocab_refuses(case, bad_vocab):
    path = bad_vocab(case)
    message = refused_message(lambda: _decoder.check_vocab(str(path)))
    prefix = f"decoder GGUF {path}: "
    assert message.startswith(prefix), message
    assert re.search(VOCAB_CASES[case][1], message[len(prefix):]), message


@pytest.mark.parametrize("case", list(ABORTS_LLAMA_CPP))
def test_vocabularies_that_abort_llama_cpp_are_refused_first(case, bad_vocab):
    path = bad_vocab(case)
    child = run_stock_llama_cpp(path)
    assert child.returncode in (-signal.SIGABRT, 128 + signal.SIGABRT), (child.returncode, child.stdout)
    # Where it aborts: while loading, or at the first tokenize after a load that "succeeded".
    assert ("loaded" in child.stdout) == (ABORTS_LLAMA_CPP[case] == "tokenize"), child.stdout
    assert "tokenized" not in child.stdout
    refused_message(lambda: _decoder.check_vocab(str(path)))


@pytest.mark.parametrize("case", REPLACED_BY_LLAMA_CPP)
def test_special_ids_llama_cpp_would_replace_are_refused(case, bad_vocab):
    path = bad_vocab(case)
    child = run_stock_llama_cpp(path)
    assert child.returncode == 0 and "tokenized" in child.stdout, child.stdout
    n_vocab, bos, pad = (int(x) for x in child.stdout.split("loaded", 1)[1].split()[:3])
    assert n_vocab == 512 and 0 <= bos < 512 and pad == -1  # bos 512 became 1, pad 512 none at all
    refused_message(lambda: _decoder.check_vocab(str(path)))


def test_token_embd_rows_must_match_the_tokens(pair, tmp_path):
    """A base whose token list is longer than its embedding table: the tokenizer would give ids
    the decoder does not have."""
    def grow(kv, tensors):
        for key, extra in ((TOKENS, [b"extra-piece"]), (SCORES, [0.0]), (TOKEN_TYPE, [1])):
            vtype, value, sub = kv[key]
            kv[key] = (vtype, list(value) + extra, sub)
    path = rewrite(pair[0], tmp_path / "grown.gguf", grow)
    message = refused_message(lambda: _decoder.check_vocab(str(path)))
    assert "tokenizer.ggml.tokens has 513 tokens but tensor token_embd.weight has 512 rows" in message


def test_check_vocab_of_files_that_are_no_vocabulary(pair, tmp_path):
    _, mam = pair
    assert "missing key tokenizer.ggml.model" in refused_message(lambda: _decoder.check_vocab(str(mam)))
    assert "cannot open" in refused_message(lambda: _decoder.check_vocab(str(tmp_path / "nope.gguf")))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00\xffnot a gguf" * 100)
    message = refused_message(lambda: _decoder.check_vocab(str(junk)))
    # ggml's own first error line says why, quoted as valid UTF-8.
    assert "not a readable GGUF file (invalid magic characters" in message


# --- text from the file in messages -----------------------------------------------------------------

def _sidecar_with(pair, tmp_path, edit) -> Path:
    return rewrite(pair[1], tmp_path / "mam-edited.gguf", edit)


@pytest.mark.parametrize("value", [b"\xff\xfe", b"tiny-\xc0\xafpair", b"ab\xed\xa0\x80"])
def test_sidecar_pair_id_that_is_not_utf8_is_refused_cleanly(value, pair, tmp_path):
    mam = _sidecar_with(pair, tmp_path, set_key(gguf_names.KEY_PAIR_ID, VT.STRING, value))
    with pytest.raises(DecoderError, match=r"MAM GGUF .*: key owl2\.pair_id is not valid UTF-8 \('.*\\x") as e:
        open_decoder(pair[0], mam)
    assert "\n" not in str(e.value)


def test_architecture_that_is_not_utf8_is_refused_cleanly(pair, tmp_path):
    base = rewrite(pair[0], tmp_path / "base.gguf",
                   set_key(gguf_names.KEY_ARCHITECTURE, VT.STRING, b"ll\xffama"))
    with pytest.raises(DecoderError, match=r"decoder GGUF .*: key general\.architecture is not valid UTF-8"):
        open_decoder(base, pair[1])
    message = refused_message(lambda: _decoder.check_vocab(str(base)))
    assert "general.architecture is not valid UTF-8 ('ll\\xFFama')" in message


def test_quoted_file_text_is_one_capped_line(pair, tmp_path):
    """A pair id of 10000 characters with newlines: the message quotes at most ~200 bytes of it,
    control characters escaped."""
    long_id = ("line one\nline two\t" + "é" * 5000).encode()
    mam = _sidecar_with(pair, tmp_path, set_key(gguf_names.KEY_PAIR_ID, VT.STRING, long_id))
    with pytest.raises(DecoderError, match="belongs to another decoder") as e:
        open_decoder(pair[0], mam)
    message = str(e.value)
    assert "\n" not in message and "line one\\x0Aline two\\x09" in message
    assert "..." in message and len(message.encode()) < 600


def test_tensor_name_that_is_not_utf8_is_refused_cleanly(pair, tmp_path):
    def extra_tensor(kv, tensors):
        name, shape, ttype, data = tensors[0]
        tensors.append([b"blk.0.\xff\xfe.weight", shape, ttype, data])
    mam = _sidecar_with(pair, tmp_path, extra_tensor)
    with pytest.raises(DecoderError, match=r"MAM GGUF .*: unexpected tensor blk\.0\.\\xFF\\xFE\.weight"):
        open_decoder(pair[0], mam)


# --- hyper-parameters -------------------------------------------------------------------------------

@pytest.mark.parametrize("key,vtype,value,shown", [
    (gguf_names.KEY_RMS_EPS, VT.FLOAT32, math.inf, "inf"),
    (gguf_names.KEY_RMS_EPS, VT.FLOAT32, math.nan, "nan"),
    (gguf_names.KEY_RMS_EPS, VT.FLOAT32, 1.0, "1"),
    (gguf_names.KEY_RMS_EPS, VT.FLOAT32, 0.0, "0"),
    (gguf_names.KEY_RMS_EPS, VT.FLOAT32, -1e-6, "-1e-06"),
    (gguf_names.KEY_RMS_EPS, VT.FLOAT64, 1e300, "1e+300"),   # finite in f64, inf as the float used
    (gguf_names.KEY_ROPE_FREQ_BASE, VT.FLOAT32, math.inf, "inf"),
    (gguf_names.KEY_ROPE_FREQ_BASE, VT.FLOAT32, -math.nan, "nan"),
    (gguf_names.KEY_ROPE_FREQ_BASE, VT.FLOAT32, 0.0, "0"),
    (gguf_names.KEY_ROPE_FREQ_BASE, VT.FLOAT64, -1e4, "-10000"),
])
def test_hparams_must_be_finite_and_sane(key, vtype, value, shown, pair, tmp_path):
    base = rewrite(pair[0], tmp_path / "base.gguf", set_key(key, vtype, value))
    with pytest.raises(DecoderError, match=rf"decoder GGUF .*: {re.escape(key)} = -?{re.escape(shown)} is not a finite number in"):
        open_decoder(base, pair[1])


# --- threads ----------------------------------------------------------------------------------------

def test_thread_counts_are_bounded(pair):
    limit = _decoder.max_n_threads()
    assert 1 <= limit <= 512  # GGML_MAX_N_THREADS
    assert limit <= 4 * (os.cpu_count() or 128)
    for n in (limit + 1, 100_000):
        # The native decoder refuses it on its own, and the Python wrapper before it.
        with pytest.raises(_decoder.NativeDecoderError, match=rf"n_threads = {n} is more than this machine can use \(at most {limit}\)"):
            _decoder.Decoder(*map(str, pair), n_ctx=64, n_threads=n, device="cpu")
        with pytest.raises(ArgumentError, match=rf"n_threads must be between 1 and {limit}, not {n}"):
            open_decoder(*pair, n_threads=n)
        with pytest.raises(ValueError, match=rf"n_threads = {n} is more than"):
            _decoder.quantize(np.zeros((4, 32), np.float32), _decoder.ggml_type_from_name("q8_0"), n_threads=n)
    with open_decoder(*pair, n_threads=min(limit, 4)) as dec:
        assert dec.n_threads == min(limit, 4)


# --- nothing on stderr ------------------------------------------------------------------------------

STDERR_CHILD = r"""
import sys
from owl2_edge import _decoder
print(_decoder.__file__)
from owl2_edge.decoder import Decoder
from owl2_edge.errors import DecoderError
base, mam, *bad = sys.argv[1:]
for path in bad:
    for what, call in (("decoder", lambda: Decoder(path, mam, n_ctx=64, device="cpu")),
                       ("sidecar", lambda: Decoder(base, path, n_ctx=64, device="cpu")),
                       ("vocab", lambda: _decoder.check_vocab(path))):
        try:
            call()
            print(what, path, "accepted")
        except (DecoderError, _decoder.NativeDecoderError) as e:
            print(what, path, "refused:", e)
"""


def test_bad_files_print_nothing_on_stderr(pair, bad_vocab, tmp_path):
    """ggml logs its own error lines (gguf_init_from_file_impl: ...) before a bad file fails: they
    are captured, and only our one-line error remains (caught and printed to stdout here)."""
    base, mam = pair
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(base.read_bytes()[:5000])
    bad_header = tmp_path / "bad-header.gguf"
    bad_header.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 2**40))  # 2^40 keys in 24 bytes
    not_utf8 = _sidecar_with(pair, tmp_path, set_key(gguf_names.KEY_PAIR_ID, VT.STRING, b"\xff"))
    files = [junk, cut, bad_header, not_utf8, bad_vocab("duplicate token"), bad_vocab("empty token list")]
    child = subprocess.run([*python_child(), "-c", STDERR_CHILD, str(base), str(mam), *map(str, files)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    assert child.stderr == ""
    extension, *lines = child.stdout.splitlines()
    assert extension == _decoder.__file__  # the extension under test (the sanitized one, under sanitize.sh)
    assert len(lines) == 3 * len(files)
    assert all(" refused: " in line for line in lines if "duplicate" not in line and "empty-token" not in line)
    assert "invalid magic characters" in child.stdout and "failed to read" in child.stdout


# --- random damage ----------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["base", "mam"])
def test_random_damage_to_the_metadata_is_refused_or_loads(which, pair, tmp_path):
    """A few random bytes changed in the header, metadata or tensor table (seeded; 300 files):
    each one loads or is refused with a one-line error, never takes the process down. Run under
    scripts/sanitize.sh, this is also a small fuzz of the parsing with ASan and UBSan watching."""
    base, mam = pair
    good = (base if which == "base" else mam).read_bytes()
    head = gguf.GGUFReader(base if which == "base" else mam).tensors[0].data_offset
    rng = np.random.default_rng(7)
    damaged = tmp_path / f"damaged-{which}.gguf"
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(300):
        data = bytearray(good)
        for at in rng.integers(0, head, rng.integers(1, 5)):
            data[at] = rng.integers(0, 256)
        damaged.write_bytes(bytes(data))
        calls = [lambda: open_decoder(damaged, mam) if which == "base" else open_decoder(base, damaged)]
        if which == "base":
            calls.append(lambda: _decoder.check_vocab(str(damaged)))
        for call in calls:
            try:
                result = call()
                if isinstance(result, Decoder):
                    result.close()
                outcomes["loaded"] += 1
            except (DecoderError, _decoder.NativeDecoderError) as e:
                assert "\n" not in str(e)
                outcomes["refused"] += 1
    assert outcomes["refused"] > 0


def test_a_path_with_a_nul_is_refused_not_truncated(pair):
    base, _ = pair
    message = refused_message(lambda: _decoder.check_vocab(str(base) + "\0.txt"))
    assert "the path has a NUL character" in message and "\\x00" in message


# --- through Owl2.load and the CLI ----------------------------------------------------------------

@pytest.mark.parametrize("case", list(ABORTS_LLAMA_CPP))
@pytest.mark.parametrize("command", ["ask", "chat"])
def test_the_cli_refuses_a_vocabulary_that_would_abort_in_one_line(case, command, tiny_model_dir,
                                                                  tmp_path):
    """The vocabularies that abort stock llama.cpp, in a real model folder: Owl2.load, and so
    every command that answers, refuses them in one line with exit 1 before llama.cpp sees them."""
    import json
    import shutil
    import subprocess
    import sys
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    manifest = json.loads((folder / names.MANIFEST_FILE).read_text())
    base = folder / manifest["decoder_file"]
    rewrite(base, tmp_path / "bad.gguf", VOCAB_CASES[case][0]).replace(base)
    # Recorded as it is now (as if converted so): the manifest's file records would otherwise
    # refuse the changed file before the vocabulary check ran.
    from owl2_edge.model_dir import Manifest
    del manifest["file_records"]
    (folder / names.MANIFEST_FILE).write_text(json.dumps(manifest))
    Manifest.load(folder).recorded(folder).write(folder)
    args = ["ask", "Hi?"] if command == "ask" else ["chat"]
    r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", *args, "-m", str(folder), "-n", "2"],
                       input="Hi\n/exit\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "tokenizer.ggml" in lines[0], r.stderr[-2000:]
