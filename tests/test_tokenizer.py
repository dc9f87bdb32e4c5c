"""The runtime tokenizer (llama.cpp's, on the base GGUF's vocabulary) against the reference's
chunk-wise sentencepiece tokenization (docs/architecture.md §7)."""

from __future__ import annotations

import pytest

# Everything here compares with the converter's output or the PyTorch reference.
pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import subprocess
import sys

import sentencepiece as spm

from owl2_edge.convert.gguf_pair import write_gguf_pair
from owl2_edge.convert.reference_io import tokenize as reference_tokenize
from owl2_edge.errors import DecoderError, ModelFolderError
from owl2_edge.names import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID
from owl2_edge.tokenizer import Tokenizer

IMG = IMAGE_PLACEHOLDER

PROMPTS = {
    "one image": f"USER: {IMG}Describe the image. ASSISTANT:",
    "two adjacent images": f"USER: {IMG}{IMG}Compare them. ASSISTANT:",
    "images mid-prompt": f"USER: Look{IMG}here and {IMG} there ASSISTANT:",
    "image at start": f"{IMG}What is this?",
    "image at start and mid": f"{IMG}A cat{IMG}A dog",
    "only an image": IMG,
    "multi-turn": (f"USER: {IMG}What is this? ASSISTANT: A striped banner.</s>"
                   "USER: Is it colorful? ASSISTANT:"),
    "eos at end and twice": "x</s></s> y</s>",
    "digits": "Price 12345 and 3.50 dollars, 2024-01-02",
    "utf-8": "café naïve Zürich déjà vu 你好 世界 東京 🦉 😀 Ελλάδα Москва",
    "leading and trailing spaces": "   leading and trailing   ",
    "whitespace kinds": "tab\there\nnew line\r\n  indented",
    "empty question": f"USER: {IMG} ASSISTANT:",
    "eval template": f"USER: {IMG}What colour? Answer the question using a single word or "
                     "phrase. ASSISTANT: ",
    "text only": "USER: What is the capital of France? ASSISTANT:",
    "single space": " ",
    "empty": "",
}


@pytest.fixture(scope="module")
def base_gguf(tiny_ckpt, tmp_path_factory):
    base, _ = write_gguf_pair(tiny_ckpt, tmp_path_factory.mktemp("tok-pair"), "F32",
                              pair_id="tokenizer-test")
    return base


@pytest.fixture(scope="module")
def tok(base_gguf):
    with Tokenizer(base_gguf) as t:
        yield t


@pytest.fixture(scope="module")
def sp(tiny_ckpt):
    return spm.SentencePieceProcessor(model_file=str(tiny_ckpt.tokenizer_model))


@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_ids_equal_the_reference_chunkwise_tokenization(tok, sp, prompt):
    assert tok.tokenize(prompt) == reference_tokenize(sp, prompt, bos_id=sp.bos_id())


def test_special_ids_and_size_are_the_sentencepiece_models(tok, sp):
    assert (tok.bos_id, tok.eos_id, tok.n_vocab) == (sp.bos_id(), sp.eos_id(), sp.get_piece_size())


def test_text_around_an_image_is_tokenized_chunk_by_chunk(tok, sp):
    """Would fail if the prompt were tokenized in one piece: "USER: " before the image must end
    in a standalone "▁", and the text after it must start with a "▁"-prefixed piece."""
    ids = tok.tokenize(f"USER: {IMG}Describe")
    slot = ids.index(IMAGE_TOKEN_ID)
    assert ids[slot - 1] == sp.piece_to_id("▁")
    assert sp.id_to_piece(ids[slot + 1]).startswith("▁")
    whole = tok.tokenize("USER: Describe")
    assert [i for i in ids if i != IMAGE_TOKEN_ID] != whole


def test_only_the_first_chunks_bos_is_kept(tok):
    ids = tok.tokenize(f"USER: {IMG}one{IMG}two")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids.count(IMAGE_TOKEN_ID) == 2


def test_prompt_starting_with_an_image_gets_its_bos_after_the_image(tok):
    assert tok.tokenize(f"{IMG}Hi")[:2] == [IMAGE_TOKEN_ID, tok.bos_id]


def test_eos_in_text_is_the_special_token_and_restarts_the_space_prefix(tok):
    ids = tok.tokenize("A banner.</s>USER")
    after = ids[ids.index(tok.eos_id) + 1]
    assert tok.token_to_bytes(after).startswith(b" ")


@pytest.mark.parametrize("text", ["hello world", "  two leading spaces", "café 你好 🦉 😀",
                                  "12345 apples", "line\nbreak", "trailing  "])
def test_detokenize_round_trips_like_sentencepiece(tok, sp, text):
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text == sp.decode(ids)


def test_detokenize_drops_control_tokens_unless_asked(tok):
    ids = tok.tokenize("A.</s>B")
    assert tok.detokenize(ids) == "A. B"
    assert "</s>" in tok.detokenize(ids, special=True)


def test_byte_fallback_pieces_join_into_utf8(tok, sp):
    ids = tok.tokenize("🦉")[1:]  # without BOS
    assert any(sp.is_byte(i) for i in ids)
    assert b"".join(tok.token_to_bytes(i) for i in ids) == " 🦉".encode()


def test_control_tokens_have_no_bytes(tok):
    assert tok.token_to_bytes(tok.bos_id) == b""
    assert tok.token_to_bytes(tok.eos_id) == b""
    assert tok.token_to_bytes(tok.eos_id, special=True) == b"</s>"


@pytest.mark.parametrize("bad", [IMAGE_TOKEN_ID, -1, 512, 10**12])
def test_ids_outside_the_vocabulary_are_refused_not_fatal(tok, bad):
    with pytest.raises(DecoderError, match="not in the vocabulary"):
        tok.detokenize([1, bad])
    with pytest.raises(DecoderError):
        tok.token_to_bytes(bad)


def test_missing_file_is_a_model_folder_error(tmp_path):
    with pytest.raises(ModelFolderError, match="missing") as e:
        Tokenizer(tmp_path / "decoder-Q4_K_M.gguf")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all" * 50])
def test_unreadable_file_is_a_model_folder_error(tmp_path, content):
    path = tmp_path / "decoder.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFolderError, match="not a readable") as e:
        Tokenizer(path)
    assert "\n" not in str(e.value)


def test_truncated_base_is_a_model_folder_error(base_gguf, tmp_path):
    path = tmp_path / "decoder.gguf"
    path.write_bytes(base_gguf.read_bytes()[:4000])
    with pytest.raises(ModelFolderError):
        Tokenizer(path)


def test_a_gguf_without_vocabulary_is_refused(tiny_ckpt, tmp_path):
    _, mam = write_gguf_pair(tiny_ckpt, tmp_path, "F32", pair_id="x")
    with pytest.raises(ModelFolderError, match="tokenizer.ggml.model"):
        Tokenizer(mam)


def test_closed_tokenizer_refuses_work(base_gguf):
    t = Tokenizer(base_gguf)
    t.close()
    t.close()  # twice is fine
    with pytest.raises(DecoderError, match="closed"):
        t.tokenize("hi")


def test_runtime_tokenizer_needs_neither_torch_nor_sentencepiece(base_gguf):
    code = ("import sys; from owl2_edge.tokenizer import Tokenizer; "
            f"t = Tokenizer({str(base_gguf)!r}); t.tokenize('hi <|image|> there'); "
            "bad = {'torch', 'sentencepiece'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_token_covers_more_characters_than_max_token_bytes(tok, sp):
    """The bound behind Owl2.check_prompt_size: a prompt of C characters needs at least
    C / max_token_bytes tokens, whatever it holds (the longest pieces, special tokens' text,
    a literal "▁", byte fallback, spaces)."""
    import random
    L = tok.max_token_bytes
    assert L == max(len(tok.token_to_bytes(t, special=True)) for t in range(tok.n_vocab))
    pieces = [sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.get_piece_size())]
    longest = sorted(pieces, key=len)[-20:]
    rng = random.Random(0)
    alphabet = [*pieces, *longest * 20, "</s>", "<s>", "<unk>", "\u2581", " ", "  ", "é", "🦉"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        assert len(tok.tokenize(text)) * L >= len(text), text
    for prompt in PROMPTS.values():
        chars = len(prompt) - prompt.count(IMG) * len(IMG)
        assert len(tok.tokenize(prompt)) * L >= chars
