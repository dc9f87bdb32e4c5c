"""`owl2 ask` through the real command line: answers equal the reference, bad input gives one line."""

import pytest

# Everything here compares with the converter's output or the PyTorch reference.
pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import json
import shutil
import subprocess
import sys

import numpy as np
import torch
from conftest import like_a_terminal  # noqa: E402
from PIL import Image

from owl2_edge import names
from owl2_edge.convert.reference_io import preprocess as ref_preprocess
from owl2_edge.convert.reference_io import tokenize as ref_tokenize
from owl2_edge.prompt import Turn, render


def owl2(*args, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "owl2_edge.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)).save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def sp(tiny_ckpt):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=str(tiny_ckpt.tokenizer_model))


def reference_greedy(ref, sp, prompt, image_paths, n):
    embeds = None
    if image_paths:
        pixels = []
        for path in image_paths:
            with Image.open(path) as im:
                pixels.append(ref_preprocess(im, ref.cfg.preprocess, "pad"))
        embeds = ref.encode_images(torch.from_numpy(np.stack(pixels)))
    ids = ref_tokenize(sp, prompt)
    return ids, [t for t in ref.greedy(ids, embeds, max_new_tokens=n) if t != ref.cfg.text.eos_token_id]


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_ask_json_greedy_equals_reference(tiny_model_dir, tiny_ref, sp, photo, tmp_path, n_images):
    images = [photo, photo.with_name("second.png")][:n_images]
    if n_images == 2:
        Image.open(photo).rotate(90, expand=True).save(images[1])
    r = owl2("ask", *images, "What is this?", "-m", tiny_model_dir, "--temperature", "0",
             "--max-tokens", "12", "--json", "--kv-type", "f32", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    ids, expected = reference_greedy(tiny_ref, sp, render([Turn("What is this?")], n_images), images, 12)
    assert result["text"] == sp.decode(expected).strip()
    assert result["token_ids"] == expected
    assert result["tokens"] == len(expected)
    assert result["prompt_tokens"] == len(ids) - n_images + n_images * tiny_ref.cfg.n_visual
    assert set(result["timings"]) >= {"load_s", "vision_s", "prefill_s", "decode_s"}


def test_ask_raw_multi_turn_prompt_equals_reference(tiny_model_dir, tiny_ref, sp, photo):
    prompt = render([Turn("<|image|>What is this?", "A striped banner."), Turn("Is it red?")], 1)
    r = owl2("ask", photo, prompt, "--raw", "-m", tiny_model_dir, "--temperature", "0", "-n", "10",
             "--json", "--kv-type", "f32")
    assert r.returncode == 0, r.stderr
    _, expected = reference_greedy(tiny_ref, sp, prompt, [photo], 10)
    assert json.loads(r.stdout)["text"] == sp.decode(expected).strip()


def test_ask_streams_and_reports_timings(tiny_model_dir, photo):
    r = owl2("ask", photo, "Hi?", "-m", tiny_model_dir, "-n", "5", "--seed", "1", "--verbose", "--no-repack")
    assert r.returncode == 0, r.stderr
    assert "prefill" in r.stderr and "tok/s" in r.stderr


def test_model_comes_from_the_environment(tiny_model_dir, photo, monkeypatch):
    r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "ask", str(photo), "Hi?", "-n", "2"],
                       capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OWL2_MODEL": str(tiny_model_dir)})
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def truncated_model(tiny_model_dir, tmp_path_factory):
    bad = tmp_path_factory.mktemp("bad") / "model"
    shutil.copytree(tiny_model_dir, bad)
    manifest = json.loads((bad / names.MANIFEST_FILE).read_text())
    gguf = bad / manifest["decoder_file"]
    gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    return bad


@pytest.mark.parametrize("case", ["not_an_image", "missing_image", "missing_folder", "truncated_gguf",
                                  "too_long", "more_marks_than_images", "bad_option"])
def test_bad_input_gives_one_line_and_nonzero_exit(case, tiny_model_dir, truncated_model, photo, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    model = tiny_model_dir
    args = [photo, "What?"]
    extra = []
    expect = ""
    if case == "not_an_image":
        args, expect = [text, "What?"], "notes.txt"
    elif case == "missing_image":
        args, expect = [tmp_path / "nope.png", "What?"], "nope.png"
    elif case == "missing_folder":
        model, expect = tmp_path / "no-model", "no-model"
    elif case == "truncated_gguf":
        model, expect = truncated_model, ".gguf"
    elif case == "too_long":
        args, extra, expect = [photo, "word " * 300], ["--ctx", "128"], "context"
    elif case == "more_marks_than_images":
        args, extra, expect = [photo, "USER: <|image|><|image|>Two? ASSISTANT:"], ["--raw"], "mark"
    elif case == "bad_option":
        extra, expect = ["--top-p", "0"], "top_p"
    r = owl2("ask", *args, "-m", model, *extra)
    assert r.returncode in (1, 2), r.stdout + r.stderr
    assert expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1, r.stderr


def test_chat_repl_keeps_history_and_takes_commands(tiny_model_dir, photo):
    script = f"Describe it.\n/image {photo}\nAnd now?\n/image /no/such.png\n/clear\nHello\n/exit\n"
    r = owl2("chat", photo, "-m", tiny_model_dir, "-n", "4", "--temperature", "0", stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(">>> ") == 7
    assert "such.png" in r.stderr and "Traceback" not in r.stderr


def test_chat_takes_the_same_options_as_ask_and_answers_alike(tiny_model_dir, photo):
    """ask and chat share their option definitions: sampling, --json and --verbose work in both,
    and the first chat turn answers exactly as ask does."""
    common = ["-m", tiny_model_dir, "--kv-type", "f32", "-n", "6", "--temperature", "0",
              "--min-p", "0.05", "--repeat-penalty", "1.3", "--ignore-eos", "--json", "--verbose"]
    asked = owl2("ask", photo, "What is this?", *common)
    chatted = owl2("chat", photo, *common, stdin="What is this?\n/exit\n")
    assert asked.returncode == 0 and chatted.returncode == 0, asked.stderr + chatted.stderr
    answer = json.loads(asked.stdout)
    (turn,) = [json.loads(line) for line in chatted.stdout.splitlines() if line.strip()]
    assert turn["token_ids"] == answer["token_ids"] and len(answer["token_ids"]) == 6  # --ignore-eos
    assert turn["text"] == answer["text"]
    assert "tok/s" in asked.stderr and "tok/s" in chatted.stderr


def test_ask_and_chat_list_the_same_options():
    from owl2_edge.cli import app
    import typer.main
    group = typer.main.get_group(app)
    options = {name: {o for p in group.commands[name].params for o in p.opts if o.startswith("--")}
               for name in ("ask", "chat")}
    assert options["ask"] - {"--raw", "--no-stream"} == options["chat"] - {"--warm", "--no-warm"}


def test_info_defaults_to_the_model_ask_uses(tiny_model_dir):
    env = {**__import__("os").environ, "OWL2_MODEL": str(tiny_model_dir)}
    for args in ([], ["-m", str(tiny_model_dir)], [str(tiny_model_dir)]):
        r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "info", *args],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert "decoder-F32.gguf" in r.stdout


def test_ctrl_c_stops_generation_with_exit_130_and_no_traceback(tiny_model_dir, photo):
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "-m", "owl2_edge.cli", "ask", str(photo), "Go on.", "-m",
                             str(tiny_model_dir), "--ctx", "200000", "-n", "200000", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=like_a_terminal)
    # Wait until the answer is streaming, then interrupt it as a terminal's Ctrl-C would.
    assert proc.stdout.read(1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, errors = proc.communicate(timeout=60)
    assert proc.returncode == 130, errors
    assert "Traceback" not in errors


def test_usage_errors_exit_2(tiny_model_dir):
    r = owl2("ask", "-m", tiny_model_dir, "--bogus-option", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_stop_strings_end_the_answer_in_the_cli_and_the_api_alike(tiny_model_dir, photo):
    common = (photo, "What is this?", "-m", tiny_model_dir, "--temperature", "0", "-n", "16",
              "--json")
    whole = json.loads(owl2("ask", *common).stdout)
    text = whole["text"]
    assert len(text) >= 6, text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    r = owl2("ask", *common, "--stop", stop, "--stop", "never-said")
    assert r.returncode == 0, r.stderr
    cut = json.loads(r.stdout)
    assert cut["text"] == text[:text.find(stop)].rstrip()
    assert cut["finish_reason"] == "stop"
    # Decoding ended at the token that completed the stop string: a prefix of the whole answer.
    assert cut["token_ids"] == whole["token_ids"][:len(cut["token_ids"])]
    assert len(cut["token_ids"]) < len(whole["token_ids"])
    from owl2_edge.owl2 import Owl2
    with Owl2.load(tiny_model_dir) as owl:
        assert owl.ask(photo, "What is this?", temperature=0, max_tokens=16,
                       stop=[stop]) == cut["text"]
    r = owl2("ask", *common, "--stop", "x" * 501)
    assert r.returncode != 0 and "stop: at most" in r.stderr and "Traceback" not in r.stderr
