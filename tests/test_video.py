"""Clips (owl2_edge/clips.py, docs/video.md): videos and animated pictures recognised by their
content, sampled into frames in time order, each frame an image slot in the form the demo model
was trained on; decoded in a child process under bounds, so that a damaged or hostile clip is
one line (a 400 from the server, which goes on answering); asked about from the API, the CLI,
chat, batch and the server."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owl2_edge import clips, scenes
from owl2_edge.clip_decode import pick_times
from owl2_edge.clips import Clip, ClipBounds, ClipError
from owl2_edge.tools.clip_files import write_gif, write_video
from owl2_edge.tools.demo_image import sample_clip_frames, sample_clip_question

import importlib.util

needs_pyav = pytest.mark.skipif(importlib.util.find_spec("av") is None,
                                reason="videos need PyAV (pip install 'owl2-edge[video]')")


def _owl2(*args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "owl2_edge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> dict[str, Path]:
    """The demo's sample clip (4 frames: the triangle moves down) as GIF, MP4, WebM, MKV, MOV,
    and its frames as PNG files."""
    folder = tmp_path_factory.mktemp("clips")
    frames = sample_clip_frames()
    files = {"gif": folder / "clip.gif"}
    write_gif(frames, files["gif"])
    for suffix in ("mp4", "webm", "mkv", "mov"):
        files[suffix] = folder / f"clip.{suffix}"
        write_video(frames, files[suffix])
    for i, frame in enumerate(frames):
        files[f"frame{i}"] = folder / f"frame{i}.png"
        frame.save(files[f"frame{i}"])
    return files


# --- Recognised by content, sampled in time order -----------------------------------------------

@needs_pyav
def test_clips_are_recognised_by_content_not_by_name(clip_files, tmp_path):
    for suffix in ("mp4", "webm", "mkv", "mov"):
        assert clips.clip_kind(clip_files[suffix]) == "video"
    assert clips.clip_kind(clip_files["gif"]) == "animation"
    assert clips.clip_kind(clip_files["frame0"]) is None  # a still PNG is a picture
    still_gif = tmp_path / "still.gif"
    sample_clip_frames()[0].save(still_gif)
    assert clips.clip_kind(still_gif) is None  # a GIF of one frame is a picture
    # Mislabelled: a video named .png is a video, a picture named .mp4 a picture.
    (tmp_path / "video.png").write_bytes(clip_files["mp4"].read_bytes())
    (tmp_path / "picture.mp4").write_bytes(clip_files["frame0"].read_bytes())
    assert clips.clip_kind(tmp_path / "video.png") == "video"
    assert clips.clip_kind(tmp_path / "picture.mp4") is None
    assert clips.clip_kind(clip_files["mp4"].read_bytes()) == "video"


def test_frames_are_taken_evenly_in_time_each_once():
    # Four frames of 0.5 s: two frames are those shown at 0.5 s and 1.5 s.
    times, ends = [0.0, 0.5, 1.0, 1.5], [0.5, 1.0, 1.5, 2.0]
    assert pick_times(times, ends, 2, None, None) == [1, 3]
    assert pick_times(times, ends, 4, None, None) == [0, 1, 2, 3]
    assert pick_times(times, ends, 8, None, None) == [0, 1, 2, 3]  # never a frame twice
    assert pick_times(times, ends, 2, 1.0, None) == [2, 3]
    assert pick_times(times, ends, 1, 0.0, 1.0) == [1]


@needs_pyav
def test_each_container_gives_the_clip_s_frames_in_order(clip_files):
    originals = [np.asarray(f, dtype=float) for f in sample_clip_frames()]
    for suffix in ("gif", "mp4", "webm", "mkv", "mov"):
        frames = clips.read_frames(Clip(clip_files[suffix]))
        assert len(frames) == 4, suffix
        # Lossy codecs and the GIF palette move pixels a little; the order is the clip's.
        errors = [[np.abs(np.asarray(f, dtype=float) - o).mean() for o in originals]
                  for f in frames]
        assert [int(np.argmin(row)) for row in errors] == [0, 1, 2, 3], suffix
        assert max(min(row) for row in errors) < 8, suffix
    two = clips.read_frames(Clip(clip_files["mp4"], frames=2))
    assert len(two) == 2


@needs_pyav
def test_options_that_sample_a_clip_are_refused_without_one(clip_files):
    with pytest.raises(Exception, match="none of the images is one"):
        clips.sampled([clip_files["frame0"]], frames=2)
    with pytest.raises(Exception, match="must come after start"):
        Clip(clip_files["mp4"], start=2.0, end=1.0)
    with pytest.raises(Exception, match="frames"):
        Clip(clip_files["mp4"], frames=0)
    with pytest.raises(ClipError, match="no frame is shown between 10 s"):
        clips.read_frames(Clip(clip_files["gif"], start=10.0))


@needs_pyav
def test_a_clip_s_mark_becomes_one_mark_per_frame(clip_files):
    prompt, images, n = clips.expand("USER: <|image|><|image|>Go.", [clip_files["frame0"],
                                                                     clip_files["gif"]])
    assert n == 4 and len(images) == 5
    assert prompt == "USER: " + "<|image|>" * 5 + "Go."


# --- Damaged and hostile clips: one line each ---------------------------------------------------

def _hostile(clip_files, tmp_path) -> dict[str, Path]:
    mp4 = clip_files["mp4"].read_bytes()
    files = {}

    def put(name, data):
        files[name] = tmp_path / name
        files[name].write_bytes(data)
    put("truncated.mp4", mp4[:len(mp4) // 2])
    put("header-only.mp4", mp4[:40])
    rng = np.random.default_rng(0)
    put("corrupt.mp4", mp4[:32] + rng.integers(0, 256, len(mp4) - 32, dtype=np.uint8).tobytes())
    put("corrupt.webm", clip_files["webm"].read_bytes()[:48] + b"\x00" * 2000)
    gif = bytearray(clip_files["gif"].read_bytes())
    gif[6:10] = (65535).to_bytes(2, "little") * 2  # a 65,535 x 65,535 logical screen
    put("absurd.gif", bytes(gif))
    return files


@needs_pyav
def test_damaged_and_hostile_clips_are_refused_in_one_line(clip_files, tmp_path):
    for name, path in _hostile(clip_files, tmp_path).items():
        try:
            frames = clips.read_frames(Clip(path))
        except ClipError as e:
            message = str(e)
            assert "\n" not in message and path.name in message, (name, message)
        else:  # a decoder may recover what it can: then whole frames, in order
            assert frames and all(f.mode == "RGB" for f in frames), name


@needs_pyav
def test_empty_and_mislabelled_files_take_the_picture_path_and_its_one_line(demo, tmp_path):
    """A zero-length file and text named .mp4 are no clip (by content): the picture path
    refuses them as it refuses any file that is not a picture, in one line."""
    from owl2_edge.errors import ImageError
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("not a video at all\n")
    for name in ("empty.mp4", "notes.mp4"):
        assert clips.clip_kind(tmp_path / name) is None
        with pytest.raises(ImageError) as e:
            demo.ask(tmp_path / name, "What happens?")
        assert name in str(e.value) and "\n" not in str(e.value)


@needs_pyav
def test_the_bounds_end_a_decode(clip_files, monkeypatch):
    long_frames = [Image.new("RGB", (32, 32), (i % 256, 0, 0)) for i in range(60)]
    path = Path(clip_files["mp4"]).with_name("long.mkv")
    write_video(long_frames, path, fps=30)
    monkeypatch.setattr(clips, "BOUNDS", ClipBounds(decoded_frames=50))
    with pytest.raises(ClipError, match="more than 50 frames"):
        clips.read_frames(Clip(path))
    monkeypatch.setattr(clips, "BOUNDS", ClipBounds(side=100))
    with pytest.raises(ClipError, match="a side may be at most 100"):
        clips.read_frames(Clip(clip_files["webm"]))
    monkeypatch.setattr(clips, "BOUNDS", ClipBounds(seconds=0.01))
    with pytest.raises(ClipError, match="took longer than 0.01 s"):
        clips.read_frames(Clip(clip_files["mov"], frames=3))
    monkeypatch.setattr(clips, "BOUNDS", ClipBounds(frame_pixels=100 * 100))
    small = clips.read_frames(Clip(clip_files["mkv"], frames=3))
    assert all(f.width * f.height <= 100 * 100 for f in small)  # scaled down, aspect kept
    assert small[0].width == small[0].height


@needs_pyav
def test_a_decoder_killed_by_a_signal_is_one_line(clip_files, monkeypatch):
    """A CPU-time limit the child has already passed: the kernel kills it (SIGXCPU), as it
    would a decoder spinning; the caller gets one line and goes on."""
    monkeypatch.setattr(clips, "BOUNDS", ClipBounds(cpu_seconds=0))
    with pytest.raises(ClipError, match="more than 0 s of CPU time") as e:
        clips.read_frames(Clip(clip_files["webm"], frames=3))
    assert "\n" not in str(e.value)
    monkeypatch.setattr(clips, "BOUNDS", ClipBounds())
    assert len(clips.read_frames(Clip(clip_files["webm"], frames=3))) == 3


@needs_pyav
def test_a_decoder_that_runs_out_of_memory_is_one_line(clip_files, monkeypatch):
    monkeypatch.setattr(clips, "BOUNDS", ClipBounds(memory_bytes=64 * 2**20))
    with pytest.raises(ClipError) as e:
        clips.read_frames(Clip(clip_files["webm"], frames=1))
    assert "\n" not in str(e.value) and "clip.webm" in str(e.value)


# --- Asked about: API, CLI, chat, batch ---------------------------------------------------------

@pytest.fixture(scope="module")
def demo(demo_model_dir):
    from owl2_edge.owl2 import Owl2
    with Owl2.load(demo_model_dir, device="cpu") as owl:
        yield owl


@needs_pyav
def test_a_clip_is_its_frames_as_separate_pictures(demo, clip_files):
    """Same frames, same tokens: the GIF's frames (as Pillow reads them) given one by one make
    the very prompt the GIF makes, and the same answer."""
    from owl2_edge.prompt import Turn, render
    question, answer = sample_clip_question()
    gif_frames = clips.read_frames(Clip(clip_files["gif"]))
    one = demo.prepare(render([Turn(question)], n_images=1), [clip_files["gif"]])
    four = demo.prepare(render([Turn(question)], n_images=4), gif_frames)
    assert one.items == four.items
    assert demo.ask(clip_files["gif"], question, temperature=0) == answer
    assert demo.ask(gif_frames, question, temperature=0) == answer
    for suffix in ("mp4", "webm"):
        assert demo.ask(clip_files[suffix], question, temperature=0) == answer, suffix
        assert demo.stats.prompt_positions == one_prompt_positions(demo, one)


def one_prompt_positions(owl, prepared) -> int:
    from owl2_edge.kv_prefix import positions
    return positions(prepared.items, owl.manifest.n_visual)


@needs_pyav
def test_held_out_motion_questions_through_clip_files(demo, tmp_path):
    """The demo's held-out motion questions asked through a GIF and an MP4 of each clip answer
    as its frames do (docs/video.md gives the full benchmark)."""
    examples = [e for e in scenes.clip_examples(12, 4, seed=3) if e.question.kind == "clip_move"]
    right = {"frames": 0, "gif": 0, "mp4": 0}
    for k, ex in enumerate(examples):
        frames = ex.clip.frames(224)
        write_gif(frames, tmp_path / f"{k}.gif")
        write_video(frames, tmp_path / f"{k}.mp4")
        for form, images in (("frames", frames), ("gif", tmp_path / f"{k}.gif"),
                             ("mp4", tmp_path / f"{k}.mp4")):
            right[form] += demo.ask(images, ex.question.text, temperature=0) == ex.question.answer
    assert right["frames"] >= 10, right
    assert abs(right["gif"] - right["frames"]) <= 1 and abs(right["mp4"] - right["frames"]) <= 1, right


@needs_pyav
def test_frames_beyond_the_context_are_refused_by_name(demo_model_dir, clip_files):
    from owl2_edge.errors import ContextFullError
    from owl2_edge.owl2 import Owl2
    long_gif = clip_files["gif"].with_name("long.gif")
    write_gif([Image.new("RGB", (64, 64), (16 * i, 0, 0)) for i in range(16)], long_gif)
    with Owl2.load(demo_model_dir, device="cpu", n_ctx=128) as owl:
        assert 16 * owl.manifest.n_visual >= 128
        with pytest.raises(ContextFullError, match="fewer frames") as e:
            owl.ask(long_gif, "Go.", frames=16)
        assert "16 of them a clip's frames" in str(e.value)
        assert owl.ask(long_gif, "Go.", frames=2, max_tokens=3)  # still usable


@needs_pyav
def test_the_cli_asks_about_a_clip_and_refuses_in_one_line(demo_model_dir, clip_files, tmp_path):
    question, answer = sample_clip_question()
    r = _owl2("ask", "-m", demo_model_dir, clip_files["mp4"], question, "--temperature", 0)
    assert r.returncode == 0 and r.stdout.strip() == answer, r.stderr
    r = _owl2("ask", "-m", demo_model_dir, clip_files["gif"], question, "--temperature", 0,
              "--frames", 2, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["prompt_tokens"] < 60, r.stderr
    r = _owl2("ask", "-m", demo_model_dir, clip_files["frame0"], question, "--frames", 2)
    assert r.returncode == 1 and "none of the images is one" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    bad = _hostile(clip_files, tmp_path)["truncated.mp4"]
    r = _owl2("ask", "-m", demo_model_dir, bad, question)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "truncated.mp4" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@needs_pyav
def test_a_second_question_in_a_new_process_encodes_and_prefills_nothing_again(
        demo_model_dir, clip_files):
    question, _ = sample_clip_question()
    first = _owl2("ask", "-m", demo_model_dir, clip_files["webm"], question, "--json")
    second = _owl2("ask", "-m", demo_model_dir, clip_files["webm"], question, "--json")
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["disk_positions"] == 0
    n_visual = json.loads((Path(demo_model_dir) / "owl2.json").read_text())["n_visual"]
    # Every frame's positions (and the words before them) came from the disk: only the words
    # after the frames were evaluated, and no frame was encoded.
    assert b["disk_positions"] > 4 * n_visual
    assert b["timings"]["vision_s"] == 0
    assert b["text"] == a["text"]


@needs_pyav
def test_chat_takes_a_clip_with_video(demo_model_dir, clip_files):
    question, answer = sample_clip_question()
    r = _owl2("chat", "-m", demo_model_dir, "--temperature", 0,
              input=f"/video {clip_files['mp4']}\n{question}\n/video nothing.mp4\n")
    assert r.returncode == 0, r.stderr
    assert answer in r.stdout
    assert "nothing.mp4" in r.stderr and "Traceback" not in r.stderr


@needs_pyav
def test_batch_rows_name_a_video(demo_model_dir, clip_files, tmp_path):
    question, answer = sample_clip_question()
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"video": str(clip_files["mp4"]), "question": question}) + "\n"
                    + json.dumps({"image": str(clip_files["gif"]), "question": question}) + "\n")
    out = tmp_path / "out.jsonl"
    r = _owl2("batch", "-m", demo_model_dir, "--questions", rows, "-o", out, "--temperature", 0)
    assert r.returncode == 0, r.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["answer"] for a in sorted(answers, key=lambda a: a["index"])] == [answer, answer]
    assert {a["image"] for a in answers} == {str(clip_files["mp4"]), str(clip_files["gif"])}
    # --frames samples each clip (2 frames: fewer positions), and the rows name the files.
    out2 = tmp_path / "out2.jsonl"
    r = _owl2("batch", "-m", demo_model_dir, "--questions", rows, "-o", out2, "--frames", 2)
    assert r.returncode == 0, r.stderr
    two = [json.loads(line) for line in out2.read_text().splitlines()]
    assert all(b["prompt_tokens"] < a["prompt_tokens"] for a, b in zip(
        sorted(answers, key=lambda a: a["index"]), sorted(two, key=lambda a: a["index"])))
    assert {a["image"] for a in two} == {str(clip_files["mp4"]), str(clip_files["gif"])}
    pictures = tmp_path / "p.jsonl"
    pictures.write_text(json.dumps({"image": str(clip_files["frame0"]), "question": "Go."}) + "\n")
    r = _owl2("batch", "-m", demo_model_dir, "--questions", pictures, "-o", tmp_path / "o3.jsonl",
              "--frames", 2)
    assert r.returncode == 1 and "no input is one" in r.stderr


# --- The server ---------------------------------------------------------------------------------

def _post(url: str, body: dict, path="/v1/chat/completions"):
    request = urllib.request.Request(url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _data_url(path: Path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(Path(path).read_bytes()).decode()


@needs_pyav
def test_the_server_takes_video_url_input_video_and_animated_images(demo_server, clip_files,
                                                                    tmp_path):
    question, answer = sample_clip_question()

    def chat(part):
        return {"model": "owl2", "temperature": 0, "max_tokens": 8, "messages": [
            {"role": "user", "content": [part, {"type": "text", "text": question}]}]}
    for part in ({"type": "video_url", "video_url": {"url": _data_url(clip_files["mp4"])}},
                 {"type": "input_video", "input_video": {
                     "data": base64.b64encode(clip_files["webm"].read_bytes()).decode(),
                     "format": "webm"}},
                 {"type": "image_url", "image_url": {"url": _data_url(clip_files["gif"])}}):
        status, body = _post(demo_server.url, chat(part))
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == answer, part["type"]
    # ollama's images: an animated GIF is a clip.
    status, body = _post(demo_server.url, {
        "model": "owl2", "stream": False, "options": {"temperature": 0},
        "messages": [{"role": "user", "content": question,
                      "images": [base64.b64encode(clip_files["gif"].read_bytes()).decode()]}]},
        path="/api/chat")
    assert status == 200 and body["message"]["content"] == answer, body
    # Hostile clips: a 400 naming the part, and the next request answered.
    for name, path in _hostile(clip_files, tmp_path).items():
        status, body = _post(demo_server.url, chat(
            {"type": "video_url", "video_url": {"url": _data_url(path)}}))
        assert status in (200, 400), (name, status, body)
        if status == 400:
            assert "\n" not in body["error"]["message"], body
    status, body = _post(demo_server.url, chat(
        {"type": "input_video", "input_video": {"data": "AAAA", "fps": 2}}))
    assert status == 400 and "input_video.fps" in body["error"]["message"]
    status, body = _post(demo_server.url, chat(
        {"type": "video_url", "video_url": {"url": _data_url(clip_files["mp4"])}}))
    assert status == 200 and body["choices"][0]["message"]["content"] == answer


def test_a_video_without_pyav_says_how_to_add_it(tmp_path):
    """Runs where PyAV is not installed (the runtime-only lane installs no extras)."""
    if importlib.util.find_spec("av") is not None:
        pytest.skip("PyAV is installed here")
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64)
    assert clips.clip_kind(path) == "video"
    with pytest.raises(ClipError, match=r"needs PyAV \(pip install 'owl2-edge\[video\]'"):
        clips.read_frames(Clip(path))


@needs_pyav
def test_decoded_clips_kept_are_bounded_in_bytes(clip_files, monkeypatch):
    """The kept decoded clips stay within their byte bound: a clip over it is not kept."""
    monkeypatch.setattr(clips, "_kept", __import__("collections").OrderedDict())
    monkeypatch.setattr(clips, "_KEPT_BYTES", 4 * 336 * 336 * 3)  # one 4-frame sample clip
    clips.read_frames(Clip(clip_files["gif"]))
    assert len(clips._kept) == 1
    clips.read_frames(Clip(clip_files["mp4"]))  # the two together are over: the older goes
    assert len(clips._kept) == 1 and next(iter(clips._kept))[0][0] == "path"
    assert str(clip_files["mp4"]) in next(iter(clips._kept))[0][1]
