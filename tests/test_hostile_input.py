"""Hostile input through the runtime's front doors: every case gets the project's own exception
(an Owl2Error; bad arguments an ArgumentError, which is also a ValueError) with a message that
names the problem, never a traceback from numpy, nanobind or json, a hang or an abort; and the
object that raised it keeps working."""

import pytest

# The model folders here are converted from the tiny checkpoint.
pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import json
import os
import shutil
import subprocess
import sys
import threading

import gguf
import numpy as np
from PIL import Image

from owl2_edge import names
from owl2_edge.errors import (ArgumentError, BusyError, DecoderError, ImageError,
                              ModelFolderError, PromptError)
from owl2_edge.load_options import LoadOptions
from owl2_edge.owl2 import Owl2
from owl2_edge.sampling import SamplingParams

GREEDY = dict(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def still_answers(owl, photo, expected=None):
    answer = owl.ask(photo, "What is this?", **GREEDY)
    if expected is not None:
        assert answer == expected
    return answer


def with_manifest(tiny_model_dir, tmp_path, change) -> str:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    path = folder / names.MANIFEST_FILE
    changed = change(path.read_text())
    if isinstance(changed, bytes):
        path.write_bytes(changed)
    else:
        path.write_text(changed)
    return folder


# --- The manifest -------------------------------------------------------------------------------

def _set(field, value):
    def change(text):
        manifest = json.loads(text)
        *path, last = field.split(".")
        target = manifest
        for key in path:
            target = target[key]
        target[last] = value
        return json.dumps(manifest)
    return change


def _raw(field, literal):
    """Write a JSON literal json.dumps would not (Infinity, 1e400) into the field."""
    marker = "__OWL2_RAW__"

    def change(text):
        return _set(field, marker)(text).replace(f'"{marker}"', literal)
    return change


@pytest.mark.parametrize("change,message", [
    (_set("image.size", 1000000), "image.size must be between 14 and 4096, not 1000000"),
    (_set("image.size", 0), "image.size must be between 14 and 4096, not 0"),
    (_set("image.size", -28), "image.size must be between 14 and 4096, not -28"),
    (_raw("image.size", "1e400"), "image.size must be an integer, not inf"),
    (_raw("image.size", "Infinity"), "Infinity is not a number a manifest may hold"),
    (_raw("image.mean", "[0.5, NaN, 0.5]"), "NaN is not a number a manifest may hold"),
    (_set("image.size", 448.0), "image.size must be an integer, not 448.0"),
    (_set("image.size", "448"), "image.size must be an integer, not '448'"),
    (_set("n_visual", 0), "n_visual must be between 1 and 4096, not 0"),
    (_set("n_visual", -1), "n_visual must be between 1 and 4096, not -1"),
    (_set("image.std", [0.3, -0.2, 0.3]), "image.std[1] must be in (0, 10], not -0.2"),
    (_set("image.pad_color", [122, 300, 104]), "image.pad_color[1] must be between 0 and 255, not 300"),
    (_set("decoder.eos_id", 10**9), "decoder.eos_id must be between 0 and"),
    (_set("vision_files", {"int3": "vision-fp32.onnx"}),
     "vision_files variant must be one of " + ", ".join(names.VISION_VARIANTS)),
    (_set("decoder_file", "../decoder-F32.gguf"), "must be a plain name in the folder"),
    (_set("extra", "x"), "extra must be an object, not str"),  # found by the fuzzer
    (lambda text: "[" * 200000 + "]" * 200000, "JSON nested too deeply"),
    (lambda text: '{"a":' * 200000, "JSON nested too deeply"),
    (lambda text: text[: len(text) // 2], "not readable JSON"),
    (lambda text: b"\xff\xfe" + text.encode(), "not UTF-8 text"),
])
def test_a_bad_manifest_is_refused_in_one_line(change, message, tiny_model_dir, tmp_path):
    folder = with_manifest(tiny_model_dir, tmp_path, change)
    with pytest.raises(ModelFolderError) as e:
        Owl2.load(folder, device="cpu", n_ctx=256)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_huge_manifest_is_not_read(tiny_model_dir, tmp_path):
    folder = with_manifest(tiny_model_dir, tmp_path, lambda text: text + " " * (2 << 20))
    with pytest.raises(ModelFolderError, match="larger than a manifest can be"):
        Owl2.load(folder, device="cpu", n_ctx=256)


# --- Files that are not files -------------------------------------------------------------------

def _finishes(call, seconds=20):
    """Run call() in a thread; the error it raised (None if it returned), or fail on a hang."""
    outcome = {}

    def run():
        try:
            call()
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001  (the test inspects it)
            outcome["error"] = e
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{call} hung"
    return outcome["error"]


def test_a_fifo_as_the_image_is_refused_without_blocking(owl, tmp_path, photo):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    error = _finishes(lambda: owl.ask(fifo, "What is this?", **GREEDY))
    assert isinstance(error, ImageError) and "not a regular file" in str(error)
    still_answers(owl, photo)


def test_a_fifo_in_the_model_folder_is_refused_without_blocking(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    manifest = json.loads((folder / names.MANIFEST_FILE).read_text())
    (folder / manifest["mam_file"]).unlink()
    os.mkfifo(folder / manifest["mam_file"])
    error = _finishes(lambda: Owl2.load(folder, device="cpu", n_ctx=256))
    assert isinstance(error, ModelFolderError) and "not a regular file" in str(error)


def test_a_very_long_file_name_is_one_clean_line(owl, photo):
    long_name = "x" * 10000 + ".png"
    with pytest.raises(ImageError, match="file name too long") as e:
        owl.ask(long_name, "What is this?", **GREEDY)
    assert len(str(e.value)) < 300
    with pytest.raises(ModelFolderError) as e:
        Owl2.load(long_name, device="cpu")
    assert len(str(e.value)) < 300
    still_answers(owl, photo)


def test_an_image_file_larger_than_the_limit_is_refused_unread(owl, tmp_path, monkeypatch):
    from owl2_edge import image
    monkeypatch.setattr(image, "MAX_FILE_BYTES", 1000)
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big, compress_level=0)
    with pytest.raises(ImageError, match="more than an image file may hold"):
        owl.ask(big, "What is this?", **GREEDY)
    with pytest.raises(ImageError, match="more than an image may hold"):
        owl.ask(big.read_bytes(), "What is this?", **GREEDY)


def test_a_long_thin_picture_is_refused_before_a_huge_square_canvas(owl, photo):
    """Found by the fuzzer: a 32x65535 GIF made pad mode allocate a 65535² canvas (13 GB)."""
    import io
    buf = io.BytesIO()
    Image.new("P", (32, 65535)).save(buf, "GIF")
    error = _finishes(lambda: owl.ask(buf.getvalue(), "What is this?", **GREEDY))
    assert isinstance(error, ImageError) and "too long and thin to make square" in str(error)
    owl.aspect = "crop"  # the mode that needs no square canvas reads it
    try:
        # ... as the black picture it is: its centre square answers as a black square does
        # (and not as a white one: the comparison tells pictures apart).
        answer = owl.ask(buf.getvalue(), "What is this?", **GREEDY)
        assert owl.stats.generated_tokens == GREEDY["max_tokens"]
        assert answer == owl.ask(Image.new("RGB", (32, 32)), "What is this?", **GREEDY)
        assert answer != owl.ask(Image.new("RGB", (32, 32), "white"), "What is this?", **GREEDY)
    finally:
        owl.aspect = "pad"
    still_answers(owl, photo)


# --- Arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(n_ctx=2**31), "n_ctx must be between 1 and 1048576, not 2147483648"),
    (dict(n_ctx="2048"), "n_ctx must be an integer, not '2048'"),
    (dict(n_ctx=0), "n_ctx must be between 1 and 1048576, not 0"),
    (dict(n_threads=2**40), "n_threads must be between 1 and"),
    (dict(n_threads=10000), "n_threads must be between 1 and"),
    (dict(n_threads=0), "n_threads must be between 1 and"),
    (dict(device="tpu"), "device must be one of auto, cpu, cuda, not 'tpu'"),
    (dict(kv_type="q4_0"), "kv_type must be one of f16, f32, q8_0"),
    (dict(aspect="letterbox"), "aspect must be one of pad, resize, crop"),
    (dict(flash_attn="no"), "flash_attn must be True or False"),
    (dict(path=42), "path must be a path, not int"),
    (dict(n_ktx=512), "unknown option 'n_ktx'"),
    (dict(options={"n_ctx": 512}), "give options=LoadOptions(...) or keyword options, not both"),
    (dict(options=LoadOptions(n_ctx=512), n_ctx=256), "not both"),
])
def test_bad_load_arguments_raise_argument_error_before_loading(kwargs, message, tiny_model_dir):
    kwargs.setdefault("path", tiny_model_dir)
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Owl2.load(**kwargs)


def test_the_decoder_takes_options_or_keywords_not_both(tiny_model_dir):
    from owl2_edge.decoder import Decoder
    from owl2_edge.model_dir import Manifest
    m = Manifest.load(tiny_model_dir)
    files = (tiny_model_dir / m.decoder_file, tiny_model_dir / m.mam_file)
    with pytest.raises(ArgumentError, match="not both"):
        Decoder(*files, LoadOptions(n_ctx=64), n_ctx=32)
    with pytest.raises(ArgumentError, match="unknown option 'aspect'"):
        Decoder(*files, aspect="pad")  # a picture option, not the decoder's
    with Decoder(*files, LoadOptions(n_ctx=64, device="cpu")) as dec:
        assert dec.n_ctx == 64


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_tokens="5"), "max_tokens must be an integer, not '5'"),
    (dict(max_tokens=0), "max_tokens must be between 1 and"),
    (dict(seed=-1), "seed must be between 0 and"),
    (dict(seed=2**70), "seed must be between 0 and"),
    (dict(temperature=float("nan")), "temperature must be a finite number, not nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number, not inf"),
    (dict(repeat_penalty=float("nan")), "repeat_penalty must be a finite number, not nan"),
    (dict(repeat_penalty=float("inf")), "repeat_penalty must be a finite number, not inf"),
    (dict(top_p=0), "top_p must be in (0, 1], not 0"),
    (dict(top_k=1.5), "top_k must be an integer, not 1.5"),
    (dict(tempurature=0.5), "unknown sampling option 'tempurature'"),
])
def test_bad_sampling_arguments_raise_argument_error_and_leave_the_object_usable(
        kwargs, message, owl, photo):
    expected = still_answers(owl, photo)
    with pytest.raises(ArgumentError) as e:
        owl.ask(photo, "What is this?", **{**GREEDY, **kwargs})
    assert message in str(e.value)
    still_answers(owl, photo, expected)


def test_argument_errors_are_value_errors_and_owl2_errors():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


def test_a_lone_surrogate_in_the_question_is_refused(owl, photo):
    bad = "What is \udc80 this?"
    with pytest.raises(ArgumentError, match=r"not valid Unicode: a lone surrogate U\+DC80 at character 8"):
        owl.ask(photo, bad, **GREEDY)
    with pytest.raises(ArgumentError, match="lone surrogate"):
        owl.tokenize(bad)
    chat = owl.chat(photo)
    with pytest.raises(ArgumentError, match="lone surrogate"):
        list(chat.send(bad, **GREEDY))
    still_answers(owl, photo)


@pytest.mark.parametrize("messages,message", [
    ("What is this?", "messages must be a non-empty list"),
    ([], "messages must be a non-empty list"),
    (["What is this?"], "messages[0] must be a dict with 'role' and 'content', not str"),
    ([{"role": "user", "content": ["a part"]}], "a content part must be a dict"),
    ([{"role": "user", "content": [{"type": "text", "text": None}]}], "text must be a string, not NoneType"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "text must be a string, not int"),
    ([{"role": "user", "content": 5}], "content must be a string or a list of parts"),
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"role": "user", "content": [{"type": "video", "url": "x"}]}], "unknown content part type 'video'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 7}}]}], "image_url needs a url"),
])
def test_malformed_chat_messages_raise_prompt_or_image_errors(messages, message, owl, photo):
    with pytest.raises((PromptError, ImageError)) as e:
        owl.create_chat_completion(messages=messages, **GREEDY)
    assert message in str(e.value)
    still_answers(owl, photo)


# --- A damaged weight ---------------------------------------------------------------------------

def test_nan_logits_from_a_damaged_weight_are_a_decoder_error(tiny_model_dir, tmp_path, photo):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    manifest = json.loads((folder / names.MANIFEST_FILE).read_text())
    base = folder / manifest["decoder_file"]
    (output,) = [t for t in gguf.GGUFReader(base).tensors if t.name == "output.weight"]
    assert output.tensor_type == gguf.GGMLQuantizationType.F32
    with open(base, "r+b") as f:
        f.seek(output.data_offset)
        f.write(np.full(64, np.nan, dtype=np.float32).tobytes())
    # Recorded as it is now (as if converted with NaN weights): the manifest's file records
    # would otherwise refuse the changed file before the decoder ran.
    from owl2_edge.model_dir import Manifest
    del manifest["file_records"]
    (folder / names.MANIFEST_FILE).write_text(json.dumps(manifest))
    Manifest.load(folder).recorded(folder).write(folder)
    with Owl2.load(folder, device="cpu", n_ctx=256) as damaged:
        with pytest.raises(DecoderError, match="NaN or infinite logits"):
            damaged.ask(photo, "What is this?", **GREEDY)
        with pytest.raises(DecoderError, match="NaN or infinite logits"):
            damaged.logits("USER: Hi ASSISTANT:")


# --- Two callers on one Owl2 --------------------------------------------------------------------

def test_two_threads_on_one_owl2_each_get_their_own_answer(owl, photo, tmp_path):
    other = tmp_path / "other.png"
    Image.new("RGB", (20, 20), (10, 200, 30)).save(other)
    questions = [(photo, "What is this?"), (other, "Describe the colours.")] * 6
    expected = {q: owl.ask(img, q, **GREEDY) for img, q in questions[:2]}
    results, errors = [None] * len(questions), []

    def ask(i):
        try:
            img, q = questions[i]
            results[i] = owl.ask(img, q, **GREEDY)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == [expected[q] for _, q in questions]


def test_two_streams_read_in_turns_in_one_thread_both_answer_as_alone(owl, photo):
    """The engine answers both at once: neither takes the other's cache."""
    expected_first = owl.ask(photo, "What is this?", **{**GREEDY, "max_tokens": 12})
    expected_second = owl.ask(photo, "Name the colours.", **{**GREEDY, "max_tokens": 12})
    first = owl.stream(photo, "What is this?", **{**GREEDY, "max_tokens": 12})
    second = owl.stream(photo, "Name the colours.", **{**GREEDY, "max_tokens": 12})
    got_first, got_second = [next(first)], [next(second)]
    got_first.extend(first)
    got_second.extend(second)
    assert "".join(got_first).strip() == expected_first
    assert "".join(got_second).strip() == expected_second
    still_answers(owl, photo)


def test_a_call_that_needs_the_whole_cache_refuses_while_its_thread_reads_an_answer(owl, photo):
    """logits() waits for the running answers to end; one of its own thread never would."""
    pieces = owl.stream(photo, "What is this?", **{**GREEDY, "max_tokens": 12})
    next(pieces)
    with pytest.raises(BusyError, match="still being read"):
        owl.logits("What is this?")
    pieces.close()  # cancelled: now it may
    assert owl.logits("What is this?").shape[0] > 0
    still_answers(owl, photo)


def test_two_owl2_objects_in_one_process_both_work(owl, tiny_model_dir, photo):
    expected = still_answers(owl, photo)
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=512) as second:
        assert second.ask(photo, "What is this?", **GREEDY) == expected
        still_answers(owl, photo, expected)


# --- The CLI: one line, exit 1 ------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--threads", "10000"], "n_threads must be between 1 and"),
    (["--temperature", "nan"], "temperature must be a finite number, not nan"),
    (["--seed", "-1"], "seed must be between 0 and"),
    (["--ctx", "2147483648"], "n_ctx must be between 1 and 1048576"),
])
def test_cli_bad_numbers_are_one_line_and_exit_1(args, message, tiny_model_dir, photo):
    r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "ask", str(photo), "Hi", "-m",
                        str(tiny_model_dir), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
