"""The disk cache (owl2_edge/disk_cache.py, engine/disk_prefixes.py; docs/cache.md): entries that
survive the process, checked whole when read, private to the user, bounded, safe with many
processes at once; and a second Owl2 (a new process, as far as caches go) that starts from the
first one's picture prefix and answers exactly as without the cache."""

import hashlib
import json
import multiprocessing
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from owl2_edge.disk_cache import (FORMAT_VERSION, MAGIC, DiskStore, human_size, parse_size)
from owl2_edge.errors import ArgumentError

KEY = json.dumps({"test": "a key", "items": [["t", 1], ["i", "abc"]]})


def _payload(n: int = 1000, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# -- the store ----------------------------------------------------------------------------------


def test_an_entry_comes_back_whole_with_its_meta(tmp_path):
    store = DiskStore(tmp_path / "c")
    parts = [_payload(10), _payload(20, 1)]
    store.put("kv", KEY, {"n_past": 3}, parts)
    entry = store.get("kv", KEY)
    assert entry.meta == {"n_past": 3} and entry.payload == b"".join(parts)
    assert store.get("kv", KEY + "x") is None        # another key
    assert store.get("embeds", KEY) is None          # another kind
    info = store.info()
    assert info["entries"] == 1 and info["kinds"]["kv"]["hits"] == 1
    assert info["kinds"]["kv"]["misses"] == 1 and info["kinds"]["embeds"]["misses"] == 1


def test_the_folder_and_entries_are_private_to_the_user(tmp_path):
    store = DiskStore(tmp_path / "c")
    store.put("embeds", KEY, {}, [_payload()])
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o700
    for path in (tmp_path / "c").iterdir():
        if not path.name.startswith("."):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header", "garbage", "empty"])
def test_a_damaged_entry_is_a_miss_and_is_removed(tmp_path, damage):
    store = DiskStore(tmp_path)
    store.put("kv", KEY, {"n_past": 1}, [_payload(5000)])
    path = store.path("kv", KEY)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip_payload":
        data[-100] ^= 0x40
    elif damage == "flip_header":
        data[len(MAGIC) + 4 + 32 + 10] ^= 0x01   # inside the JSON header
    elif damage == "garbage":
        data = bytearray(_payload(300, 7))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert store.get("kv", KEY) is None
    assert not path.exists()


def test_an_entry_of_another_version_or_key_is_a_miss_and_is_left_alone(tmp_path):
    store = DiskStore(tmp_path)
    store.put("kv", KEY, {}, [_payload()])
    path = store.path("kv", KEY)
    data = path.read_bytes()
    start = len(MAGIC) + 4 + 32
    n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
    header = json.loads(data[start:start + n])
    for change in ({"version": FORMAT_VERSION + 1}, {"key": "another key"}):
        changed = json.dumps({**header, **change}).encode()
        path.write_bytes(MAGIC + len(changed).to_bytes(4, "little")
                         + hashlib.sha256(changed).digest() + changed + data[start + n:])
        assert store.get("kv", KEY) is None
        assert path.exists()


def test_least_recently_used_entries_go_past_the_bound(tmp_path):
    one = 10_000
    store = DiskStore(tmp_path, max_bytes=int(3.5 * one))
    for k in range(3):
        store.put("embeds", f"key{k}", {}, [_payload(one - 200, k)])
        time.sleep(0.02)
    assert store.get("embeds", "key0") is not None   # now the most recently used
    time.sleep(0.02)
    store.put("embeds", "key3", {}, [_payload(one - 200, 3)])
    assert store.has("embeds", "key0") and store.has("embeds", "key3")
    assert not store.has("embeds", "key1")           # the least recently used went first
    assert store.info()["bytes"] <= store.max_bytes
    assert store.put("embeds", "huge", {}, [_payload(4 * one)]) == 0  # larger than the bound
    assert not store.has("embeds", "huge")


def test_clear_removes_everything_and_stale_temporary_files_go(tmp_path):
    store = DiskStore(tmp_path)
    store.put("embeds", "a", {}, [b"x"])
    store.put("kv", "b", {}, [b"y"])
    stale = tmp_path / ".tmp-crashed"
    stale.write_bytes(b"half an entry")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert store.clear() == 2
    assert not stale.exists()
    assert store.info()["entries"] == 0 and store.info()["kinds"]["kv"]["hits"] == 0


def _writer(folder, key, seed, rounds):
    store = DiskStore(folder)
    for r in range(rounds):
        store.put("kv", key, {"seed": seed}, [_payload(200_000, seed)])
        store.get("kv", key)


def _reader(folder, keys, rounds, out):
    store = DiskStore(folder)
    bad = 0
    for _ in range(rounds):
        for key in keys:
            entry = store.get("kv", key)
            if entry is not None and entry.payload != _payload(200_000, entry.meta["seed"]):
                bad += 1
    out.put(bad)


def test_many_processes_write_and_read_one_folder_at_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    # Two writers per key: a reader sees one whole entry or none, never a mix.
    procs = [ctx.Process(target=_writer, args=(tmp_path, f"k{k % 2}", k, 15)) for k in range(4)]
    procs += [ctx.Process(target=_reader, args=(tmp_path, ["k0", "k1"], 30, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert [out.get(timeout=5), out.get(timeout=5)] == [0, 0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    counts = DiskStore(tmp_path).info()["kinds"]["kv"]
    assert counts["hits"] + counts["misses"] == 4 * 15 + 2 * 30 * 2  # no count lost


def test_sizes_parse_and_print():
    assert parse_size("2GiB") == 2 << 30 and parse_size("500MB") == 500_000_000
    assert parse_size("1.5g") == 1_500_000_000 and parse_size(1234) == 1234
    for bad in ("", "2 parsecs", "-1", "GiB"):
        with pytest.raises(ArgumentError, match="not a size"):
            parse_size(bad)
    assert human_size(40) == "40 B" and human_size(3 << 29) == "1.5 GiB"


def test_a_folder_that_cannot_be_made_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArgumentError, match="cache folder"):
        DiskStore(tmp_path / "file" / "cache")


# -- a later process starts from the disk -------------------------------------------------------
#
# A second Owl2 has none of the first one's memory caches: as far as caches go it is a new process.


def _picture(seed: int):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sp(tiny_ckpt):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=str(tiny_ckpt.tokenizer_model))


def _reference(ref, sp, prompt, images, n):
    import torch
    from owl2_edge.convert.reference_io import preprocess, tokenize
    pixels = np.stack([preprocess(im, ref.cfg.preprocess, "pad") for im in images])
    out = ref.greedy(tokenize(sp, prompt), ref.encode_images(torch.from_numpy(pixels)),
                     max_new_tokens=n)
    return [t for t in out if t != ref.cfg.text.eos_token_id]


def _load(folder, cache, **options):
    from owl2_edge.owl2 import Owl2
    return Owl2.load(folder, device="cpu", kv_type="f32", n_ctx=512, cache=str(cache), **options)


def _prefix_positions(owl, prompt: str, through) -> int:
    """Positions of the prompt's items up to `through`: "image" (just after the picture) or
    "eos" (just before the first end-of-answer token)."""
    ids = owl.tokenize(prompt)
    end = ids.index(-200) + 1 if through == "image" else ids.index(owl.tokenizer.eos_id)
    return sum(owl.manifest.n_visual if t == -200 else 1 for t in ids[:end])


def test_a_new_process_starts_from_the_picture_and_answers_as_the_reference(
        tiny_model_dir, tiny_ref, sp, tmp_path):
    from owl2_edge.prompt import Turn, render
    image = _picture(1)
    with _load(tiny_model_dir, tmp_path) as first:
        first.ask(image, "What is it?", temperature=0, max_tokens=4)
        assert first.stats.disk_positions == 0 and first.stats.images_encoded == 1
    info = DiskStore(tmp_path).info()
    assert info["kinds"]["embeds"]["entries"] == 1 and info["kinds"]["kv"]["entries"] == 1
    question = "Which colours are in the picture?"
    with _load(tiny_model_dir, tmp_path) as second:
        text = second.ask(image, question, temperature=0, max_tokens=12)
        stats = second.stats
        prompt = render([Turn(question)], 1)
        assert stats.tokens == _reference(tiny_ref, sp, prompt, [image], 12)
        assert text == sp.decode(stats.tokens).strip()
        # The template's start and the picture came from the disk; the vision model never ran.
        assert stats.disk_positions == stats.reused_positions == \
            _prefix_positions(second, prompt, "image")
        assert stats.evaluated_positions == stats.prompt_positions - stats.disk_positions
        assert stats.images_encoded == 0 and second.vision.n_runs == 0
        assert not second.vision.opened   # its session was never even created
    from owl2_edge.owl2 import Owl2
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=512) as plain:
        assert plain.ask(image, question, temperature=0, max_tokens=12) == text
        assert plain.disk is None


def test_a_chat_resumed_in_a_new_process_starts_after_its_first_answer(
        tiny_model_dir, tiny_ref, sp, tmp_path):
    from owl2_edge.prompt import Turn, render
    image = _picture(2)
    with _load(tiny_model_dir, tmp_path) as first:
        chat = first.chat(image)
        a1 = "".join(chat.send("Describe it.", temperature=0, max_tokens=6)).strip()
        a2 = "".join(chat.send("And the colours?", temperature=0, max_tokens=6)).strip()
    turns = [Turn("Describe it.", a1), Turn("And the colours?", a2), Turn("Anything else?")]
    prompt = render(turns, 1)
    with _load(tiny_model_dir, tmp_path) as later:
        later.ask(image, prompt, raw=True, temperature=0, max_tokens=8)
        stats = later.stats
        assert stats.tokens == _reference(tiny_ref, sp, prompt, [image], 8)
        # Kept by the first process's second turn: everything before the first answer's end.
        assert stats.disk_positions == _prefix_positions(later, prompt, "eos")
        assert stats.disk_positions > _prefix_positions(later, prompt, "image")


def test_damaged_entries_are_ignored_and_the_answer_is_the_same(tiny_model_dir, tmp_path):
    image = _picture(3)
    with _load(tiny_model_dir, tmp_path) as first:
        expected = first.ask(image, "What is it?", temperature=0, max_tokens=8)
    for path in tmp_path.iterdir():
        if path.suffix in (".kv", ".embeds"):
            data = bytearray(path.read_bytes())
            data[-1] ^= 0xFF
            path.write_bytes(bytes(data))
    with _load(tiny_model_dir, tmp_path) as second:
        assert second.ask(image, "What is it?", temperature=0, max_tokens=8) == expected
        assert second.stats.disk_positions == 0 and second.stats.images_encoded == 1
        second.disk.flush()
    # Read, found damaged, removed, and written again whole by the second process.
    with _load(tiny_model_dir, tmp_path) as third:
        assert third.ask(image, "What is it?", temperature=0, max_tokens=8) == expected
        assert third.stats.disk_positions > 0 and third.stats.images_encoded == 0


def test_another_cache_layout_does_not_take_the_cells_but_takes_the_embeddings(
        tiny_model_dir, tmp_path):
    image = _picture(4)
    with _load(tiny_model_dir, tmp_path) as first:
        first.ask(image, "What is it?", temperature=0, max_tokens=2)
    from owl2_edge.owl2 import Owl2
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f16", n_ctx=512,
                   cache=str(tmp_path)) as other:
        other.ask(image, "What is it now?", temperature=0, max_tokens=2)
        assert other.stats.disk_positions == 0      # f16 cells are not f32 cells
        assert other.stats.images_encoded == 0      # the same vision file's embeddings


def test_the_cache_is_off_by_default_in_the_api(tiny_model_dir, tmp_path, monkeypatch):
    from owl2_edge.owl2 import Owl2
    monkeypatch.setenv("OWL2_CACHE_DIR", str(tmp_path / "c"))
    with Owl2.load(tiny_model_dir, device="cpu", n_ctx=512) as owl:
        owl.ask(_picture(5), "What is it?", temperature=0, max_tokens=2)
        assert owl.disk is None
    assert not (tmp_path / "c").exists()
    with pytest.raises(ArgumentError, match="cache"):
        Owl2.load(tiny_model_dir, cache=3)


def test_a_vision_file_opened_late_is_still_checked_against_the_manifest(
        tiny_model_dir, tiny_ref, sp, tmp_path):
    """With the cache the vision session opens at the first picture; a file that disagrees with
    the manifest is refused there, in one line, and the object still answers text."""
    import shutil
    from owl2_edge import names
    from owl2_edge.errors import ModelFolderError
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    manifest = json.loads((folder / names.MANIFEST_FILE).read_text())
    manifest["n_visual"] += 1
    (folder / names.MANIFEST_FILE).write_text(json.dumps(manifest))
    with _load(folder, tmp_path / "cache") as owl:
        assert not owl.vision.opened
        with pytest.raises(ModelFolderError, match="manifest says"):
            owl.ask(_picture(7), "What is it?", max_tokens=2)
        text = owl.ask([], "Say something.", temperature=0, max_tokens=2)
        # ... and answers it as the reference does, not merely something.
        from owl2_edge.convert.reference_io import tokenize
        from owl2_edge.prompt import Turn, render
        expected = tiny_ref.greedy(tokenize(sp, render([Turn("Say something.")], 0)), None,
                                   max_new_tokens=2)
        assert owl.stats.tokens == expected and len(expected) == 2
        assert text == sp.decode(expected).strip()


def test_a_restarted_server_is_warm(start_server, tmp_path):
    """A server started again on the same cache folder answers a new question about a picture
    that the first one saw from its kept prefix, and as a server without the cache does."""
    import base64
    import io
    import urllib.request

    def ask(url, question):
        buf = io.BytesIO()
        _picture(8).save(buf, format="PNG")
        image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = json.dumps({"temperature": 0, "max_tokens": 8, "messages": [{"role": "user",
                           "content": [{"type": "image_url", "image_url": {"url": image}},
                                       {"type": "text", "text": question}]}]}).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            reply = json.loads(r.read())
        return reply["choices"][0]["message"]["content"], reply["timings"]["cache_n"]

    with start_server(cache=str(tmp_path)) as first:
        ask(first.url, "What is it?")
    with start_server(cache=str(tmp_path)) as again:
        text, reused = ask(again.url, "Which colours?")
        assert reused > again.owl.manifest.n_visual and again.owl.vision.n_runs == 0
    with start_server() as plain:
        assert ask(plain.url, "Which colours?") == (text, 0)


# -- the CLI --------------------------------------------------------------------------------------


def _owl2(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "owl2_edge.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_two_ask_processes_at_once_then_a_third_starts_from_the_disk(tiny_model_dir, tmp_path):
    picture = tmp_path / "photo.png"
    _picture(6).save(picture)
    cache = tmp_path / "cache"
    args = ["ask", "-m", str(tiny_model_dir), "--device", "cpu", "--temperature", "0", "-n", "6",
            "--json", "--cache-dir", str(cache), str(picture)]
    ctx = [subprocess.Popen([sys.executable, "-m", "owl2_edge.cli", *args, "What is it?"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in ctx]
    assert [p.returncode for p in ctx] == [0, 0], outs
    first = [json.loads(out) for out, _ in outs]
    assert first[0]["text"] == first[1]["text"]
    third = _owl2(*args, "What is it?")
    assert third.returncode == 0, third.stderr
    answer = json.loads(third.stdout)
    assert answer["text"] == first[0]["text"] and answer["disk_positions"] > 0
    plain = _owl2(*[a for a in args if a not in ("--cache-dir", str(cache))], "--no-cache",
                  "What is it?")
    assert json.loads(plain.stdout)["text"] == answer["text"]
    info = _owl2("cache", "info", "--cache-dir", str(cache), "--json")
    counts = json.loads(info.stdout)
    assert counts["kinds"]["kv"]["entries"] == 1 and counts["kinds"]["kv"]["hits"] >= 1
    assert "entries" in _owl2("cache", "info", "--cache-dir", str(cache)).stdout
    cleared = _owl2("cache", "clear", "--cache-dir", str(cache))
    assert cleared.returncode == 0 and "removed 2 entries" in cleared.stdout
    assert json.loads(_owl2("cache", "info", "--cache-dir", str(cache), "--json").stdout)[
        "entries"] == 0


def test_cache_options_are_checked_in_one_line(tiny_model_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    base = ["ask", "-m", str(tiny_model_dir), "--device", "cpu", "What?"]
    for extra, message in ((["--cache-size", "lots"], "not a size"),
                           (["--no-cache", "--cache-dir", str(tmp_path)], "contradict"),
                           (["--cache-dir", str(tmp_path / "file" / "sub")], "cache folder")):
        run = _owl2(*base[:-1], *extra, base[-1])
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
        assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
