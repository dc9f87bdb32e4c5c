"""The Python API end to end on a tiny converted model, against the PyTorch reference."""

import pytest

# Everything here compares with the converter's output or the PyTorch reference.
pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import numpy as np
import torch
from PIL import Image

from owl2_edge import names
from owl2_edge.convert.reference_io import preprocess as ref_preprocess
from owl2_edge.convert.reference_io import tokenize as ref_tokenize
from owl2_edge.errors import ContextFullError, ImageError, ModelFolderError
from owl2_edge.owl2 import Owl2
from owl2_edge.errors import PromptError
from owl2_edge.prompt import Turn, render


def picture(seed: int, size=(90, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sp(tiny_ckpt):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=str(tiny_ckpt.tokenizer_model))


def ref_embeds(ref, images, aspect="pad"):
    if not images:
        return None
    pixels = np.stack([ref_preprocess(im, ref.cfg.preprocess, aspect) for im in images])
    return ref.encode_images(torch.from_numpy(pixels))


def ref_answer(ref, sp, prompt, images, n=16):
    ids = ref_tokenize(sp, prompt)
    out = ref.greedy(ids, ref_embeds(ref, images), max_new_tokens=n)
    return [t for t in out if t != ref.cfg.text.eos_token_id]


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_greedy_answer_equals_reference(owl, tiny_ref, sp, n_images):
    images = [picture(i, (90 + 20 * i, 60)) for i in range(n_images)]
    question = "What is in the picture?"
    expected = ref_answer(tiny_ref, sp, render([Turn(question)], n_images), images)
    text = owl.ask(images, question, temperature=0, max_tokens=16)
    assert owl.stats.tokens == expected
    assert text == sp.decode(expected).strip()


def test_multi_turn_chat_equals_reference_and_reuses_the_cache(owl, tiny_ref, sp):
    image = picture(7)
    chat = owl.chat(image)
    first = "".join(chat.send("Describe it.", temperature=0, max_tokens=8))
    # Encoded once: by the chat's read-ahead of its picture, or by the question that took it over.
    assert owl.stats.images_encoded + chat.warming.stats.images_encoded == 1
    second = "".join(chat.send("And the colours?", temperature=0, max_tokens=8))
    stats = owl.stats
    prompt = render([Turn("Describe it.", first.strip()), Turn("And the colours?")], 1)
    assert stats.tokens == ref_answer(tiny_ref, sp, prompt, [image], n=8)
    assert second == sp.decode(stats.tokens).strip()
    # Only what the first turn did not already put in the cache ran again; the image did not.
    assert stats.images_encoded == 0
    assert stats.reused_positions >= owl.manifest.n_visual
    assert stats.evaluated_positions == stats.prompt_positions - stats.reused_positions
    assert stats.evaluated_positions < len(owl.tokenize(prompt)) - 1


def test_second_question_on_same_image_matches_a_fresh_process(owl, tiny_model_dir):
    image = picture(11)
    owl.ask(image, "First question?", temperature=0, max_tokens=4)
    again = owl.ask(image, "Second question?", temperature=0, max_tokens=12)
    stats = owl.stats
    assert stats.images_encoded == 0
    # The template's "USER: " + the image are shared with the first question: not evaluated again.
    n_prompt_text = len(owl.tokenize(render([Turn("Second question?")], 1))) - 1
    assert stats.reused_positions >= owl.manifest.n_visual + 1
    assert stats.evaluated_positions <= n_prompt_text
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=512) as fresh:
        assert fresh.ask(image, "Second question?", temperature=0, max_tokens=12) == again
        assert fresh.stats.tokens == stats.tokens


@pytest.mark.parametrize("prompt", [
    "A long preface before the picture, with many words in it. <|image|> What is it?",
    "<|image|> The picture comes first.",
    "Two of them: <|image|> and then <|image|> compared.",
])
def test_a_load_that_does_not_wait_answers_as_the_reference(tiny_model_dir, tiny_ref, sp, prompt):
    """wait=False: the first question encodes its images while the decoder's weights load, and
    prefills the text before the first image meanwhile; the answer is still the reference's."""
    n_images = prompt.count("<|image|>")
    images = [picture(30 + i) for i in range(n_images)]
    expected = ref_answer(tiny_ref, sp, prompt, images, n=8)
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=512, wait=False) as owl:
        owl.ask(images, prompt, raw=True, temperature=0, max_tokens=8)
        assert owl.stats.tokens == expected
        assert owl.stats.images_encoded == 1  # one vision run for all the images
        assert owl.stats.reused_positions == 0
        assert owl.decoder.ready
        timings = owl.stats.timings
        assert {"load_wait", "vision", "prefill", "first_token", "decode"} <= set(timings)
        # The same prompt again: everything but its last position comes from the cache.
        owl.ask(images, prompt, raw=True, temperature=0, max_tokens=8)
        assert owl.stats.tokens == expected and owl.stats.images_encoded == 0
        assert owl.stats.evaluated_positions == 1


def test_a_new_image_keeps_the_cached_text_before_it(owl):
    """The text before the first image is prefilled while the image is encoded; a prompt whose
    text before the image is already cached evaluates none of it again."""
    owl.ask(picture(40), "Describe it.", temperature=0, max_tokens=2)
    owl.ask(picture(41), "Describe it.", temperature=0, max_tokens=2)
    stats = owl.stats
    n_before_image = owl.tokenize(render([Turn("Describe it.")], 1)).index(names.IMAGE_TOKEN_ID)
    assert stats.images_encoded == 1
    assert stats.reused_positions == n_before_image


@pytest.mark.parametrize("aspect", ["pad", "resize", "crop"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_preprocess_equals_reference(owl, tiny_ref, aspect, mode):
    image = picture(3, (70, 41)).convert(mode)
    ours = owl.preprocess(image, aspect)
    theirs = ref_preprocess(image, tiny_ref.cfg.preprocess, aspect)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_encode_image_equals_reference(owl, tiny_ref):
    image = picture(4)
    np.testing.assert_allclose(owl.encode_image(image), ref_embeds(tiny_ref, [image])[0].numpy(),
                               atol=1e-4)


@pytest.mark.parametrize("prompt", [
    "USER: <|image|>Describe the image. ASSISTANT:",
    "USER: <|image|>What is this? ASSISTANT: A striped banner.</s>USER: Is it 42? ASSISTANT:",
    "USER: Héllo wörld 12345 ASSISTANT:",
])
def test_tokenize_equals_reference(owl, sp, prompt):
    assert owl.tokenize(prompt) == ref_tokenize(sp, prompt)


def test_logits_of_every_position_equal_reference(owl, tiny_ref, sp):
    images = [picture(5), picture(6)]
    prompt = "USER: <|image|>Left, <|image|> right: which? ASSISTANT:"
    ours = owl.logits(prompt, images)
    theirs = tiny_ref.logits(ref_tokenize(sp, prompt), ref_embeds(tiny_ref, images)).numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4


def test_chat_completion_takes_openai_messages_with_data_urls(owl, tiny_ref, sp, tmp_path):
    import base64
    import io
    image = picture(8)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is it?"}]}]
    result = owl.create_chat_completion(messages, temperature=0, max_tokens=8)
    expected = ref_answer(tiny_ref, sp, render([Turn("<|image|>What is it?")], 1), [image], n=8)
    assert result["choices"][0]["message"]["content"] == sp.decode(expected).strip()
    assert result["usage"]["completion_tokens"] == len(expected)
    path = tmp_path / "p.png"
    image.save(path)
    chunks = list(owl.create_chat_completion(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                      {"type": "text", "text": "What is it?"}]}],
        stream=True, temperature=0, max_tokens=8))
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == result["choices"][0]["message"]["content"]  # exactly: one text rule


def test_two_streams_of_one_thread_each_report_their_own_answer(owl):
    """Each stream reads its own answer's finish reason, logprobs and counts, however the
    thread's streams interleave (they once read "this thread's last answer")."""
    def messages(question):
        return [{"role": "user", "content": [{"type": "text", "text": question}]}]
    short = owl.create_chat_completion(messages("Go."), stream=True, temperature=1.5, top_k=0,
                                       seed=3, max_tokens=2, ignore_eos=True, logprobs=True)
    long = owl.create_chat_completion(messages("Come."), stream=True, temperature=1.5, top_k=0,
                                      seed=4, max_tokens=9, ignore_eos=True, logprobs=True)
    first = [next(short), next(short)]   # the role, then the first piece: `short` has started
    rest_of_long = list(long)            # `long` starts and ends meanwhile
    chunks = first + list(short)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert rest_of_long[-1]["choices"][0]["finish_reason"] == "length"
    tokens = [e for c in chunks if c["choices"][0]["logprobs"]
              for e in c["choices"][0]["logprobs"]["content"]]
    long_tokens = [e for c in rest_of_long if c["choices"][0]["logprobs"]
                   for e in c["choices"][0]["logprobs"]["content"]]
    assert len(tokens) == 2 and len(long_tokens) == 9
    # And the pieces' own stats, for stream():
    a = owl.stream(picture(2), "Go.", temperature=0, max_tokens=2, ignore_eos=True)
    b = owl.stream(picture(2), "Come.", temperature=0, max_tokens=5, ignore_eos=True)
    next(a)
    "".join(b)
    "".join(a)
    assert a.stats.generated_tokens == 2 and b.stats.generated_tokens == 5


def test_errors_leave_the_object_usable(owl, tiny_ref, sp, tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ImageError):
        owl.ask(tmp_path / "notes.txt", "What?")
    with pytest.raises(PromptError):
        owl.ask([], "USER: <|image|> ASSISTANT:", raw=True)
    with pytest.raises(ContextFullError):
        owl.ask([], "word " * 600, temperature=0)
    # Usable means right: no cache cell, picture or token of the failed calls is left behind.
    text = owl.ask(picture(1), "Still there?", temperature=0, max_tokens=3)
    expected = ref_answer(tiny_ref, sp, render([Turn("Still there?")], 1), [picture(1)], n=3)
    assert owl.stats.tokens == expected and len(expected) == 3
    assert text == sp.decode(expected).strip()


@pytest.mark.parametrize("field,value,file", [
    ("n_visual", 7, "vision-fp32.onnx"),
    ("image.size", 1234, "vision-fp32.onnx"),
    ("decoder.n_embd", 48, "vision-fp32.onnx"),
    ("decoder.n_layer", 9, "decoder-F32.gguf"),
    ("decoder.n_vocab", 1000, "decoder-F32.gguf"),
    ("decoder.eos_id", 5, "decoder-F32.gguf"),
    ("pair_id", "0f" * 16, "decoder-F32.gguf"),
    ("template", "chatml", None),
])
def test_manifest_facts_are_checked_against_the_files(field, value, file, tiny_model_dir, tmp_path):
    """The manifest repeats what the ONNX and GGUF files carry; a folder where they disagree
    (edited or mixed-up files) is refused at load with both values, not trusted."""
    import json
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    manifest = json.loads((folder / names.MANIFEST_FILE).read_text())
    *path, last = field.split(".")
    target = manifest
    for key in path:
        target = target[key]
    said = target[last]
    target[last] = value
    (folder / names.MANIFEST_FILE).write_text(json.dumps(manifest))
    expected = (rf"{field} is {value} but {file} has {said}" if file else
                rf"template '{value}' is not one this owl2-edge knows")
    with pytest.raises(ModelFolderError, match=expected):
        Owl2.load(folder, device="cpu", n_ctx=256)


def test_ignore_eos_runs_to_max_tokens(owl):
    owl.ask(picture(2), "Go.", temperature=1.5, top_k=0, seed=3, max_tokens=40, ignore_eos=True)
    assert owl.stats.generated_tokens == 40 and owl.stats.finish_reason == "length"
    assert owl.tokenizer.eos_id not in owl.stats.tokens


def test_gpu_logits_equal_reference(tiny_model_dir, tiny_ref, sp):
    from owl2_edge.errors import DecoderError
    try:
        gpu = Owl2.load(tiny_model_dir, device="cuda", kv_type="f32", n_ctx=512)
    except DecoderError as e:
        if "no GPU device" in str(e):
            pytest.skip("the installed ggml has no GPU device")
        raise
    with gpu:
        images = [picture(1), picture(2)]
        prompt = render([Turn("Compare.")], 2)
        ours = gpu.logits(prompt, images)
        assert gpu.decoder.device != "CPU"
        theirs = tiny_ref.logits(ref_tokenize(sp, prompt), ref_embeds(tiny_ref, images)).numpy()
        # The GPU's fused attention reads an f16 cache: the fused kernel's tolerance, not f32's.
        assert np.abs(ours - theirs).max() <= 1e-2
        # The greedy answer, scored by the reference (teacher forcing): at every step the GPU
        # chose a token within the f16 tolerance of the reference's best (a near tie may
        # legitimately go either way, so not necessarily the reference's own argmax).
        text = gpu.ask(images, "Compare.", temperature=0, max_tokens=8)
        tokens = gpu.stats.tokens
        assert 0 < len(tokens) <= 8
        assert text == sp.decode(tokens).strip()
        ids = ref_tokenize(sp, prompt)
        rows = tiny_ref.logits(ids + tokens, ref_embeds(tiny_ref, images)).numpy()
        n_prompt = rows.shape[0] - len(tokens)
        for k, token in enumerate(tokens):
            row = rows[n_prompt - 1 + k]
            assert row[token] >= row.max() - 3e-2, (k, token, int(row.argmax()))
