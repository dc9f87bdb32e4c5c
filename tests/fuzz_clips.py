"""Mutated clips (issue 40, docs/video.md "Safety"): valid clips written by PyAV and Pillow
(MP4, WebM, MKV, MOV, GIF), then bytes flipped, runs overwritten, cut, spliced from another
clip, repeated, or header fields set to extremes. Each mutant is read as a user's clip would be
(owl2_edge/clips.py, the child-process decoder): frames, or one ClipError / ImageError line;
never another exception, a crash of this process, or a read beyond the clip bounds' time.

    python tests/fuzz_clips.py [N] [SEED]      (tests/test_fuzz.py runs a bounded number)
"""

from __future__ import annotations

import base64
import json
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

from owl2_edge.tools.clip_files import write_gif, write_video

FORMATS = (".mp4", ".webm", ".mkv", ".mov", ".gif")


def seed_clips(folder: Path) -> dict[str, bytes]:
    """One small valid clip per format (6 frames of a moving square)."""
    frames = []
    for i in range(6):
        frame = Image.new("RGB", (48, 48), (20, 20, 20))
        frame.paste((200, 40, 40), (4 + 6 * i, 16, 16 + 6 * i, 28))
        frames.append(frame)
    out = {}
    for suffix in FORMATS:
        path = folder / f"seed{suffix}"
        if suffix == ".gif":
            write_gif(frames, path, frame_ms=100)
        else:
            write_video(frames, path, fps=6)
        out[suffix] = path.read_bytes()
    return out


def mutate(rng: random.Random, data: bytes, others: list[bytes]) -> tuple[str, bytes]:
    """One mutation, named."""
    b = bytearray(data)
    how = rng.choice(["flip", "overwrite", "cut", "splice", "repeat", "extreme", "zero"])
    if how == "flip":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif how == "overwrite":
        i = rng.randrange(len(b))
        n = rng.randint(1, 256)
        b[i:i + n] = bytes(rng.randrange(256) for _ in range(min(n, len(b) - i)))
    elif how == "cut":
        b = b[:rng.randrange(1, len(b))]
    elif how == "splice":
        other = rng.choice(others)
        i, j = rng.randrange(len(b)), rng.randrange(len(other))
        b = b[:i] + other[j:]
    elif how == "repeat":
        i = rng.randrange(len(b))
        n = rng.randint(1, 512)
        b = b[:i] + b[i:i + n] * rng.randint(2, 50) + b[i:]
    elif how == "extreme":
        # A 32-bit field set to 0, 1, or all ones: sizes, counts, dimensions, durations.
        i = rng.randrange(max(1, len(b) - 4))
        b[i:i + 4] = rng.choice([b"\x00\x00\x00\x00", b"\x00\x00\x00\x01", b"\xff\xff\xff\xff",
                                 b"\x7f\xff\xff\xff"])
    else:  # zero a run
        i = rng.randrange(len(b))
        n = rng.randint(1, 1024)
        b[i:i + n] = bytes(min(n, len(b) - i))
    return how, bytes(b)


def post_clip(url: str, data: bytes, question: str, max_tokens: int) -> int:
    """A clip's bytes as a video_url part of a chat request to the server at `url` (loopback):
    the reply's HTTP status."""
    body = {"model": "owl2", "max_tokens": max_tokens, "temperature": 0, "messages": [
        {"role": "user", "content": [
            {"type": "video_url",
             "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}},
            {"type": "text", "text": question}]}]}
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def fuzz(n: int, seed: int, folder: Path, log=print) -> dict:
    """n mutants read through clips.read_frames. Returns {"outcomes": {(format, outcome): k},
    "findings": [(format, how, what)], "slowest": seconds}."""
    from owl2_edge import clips
    from owl2_edge.errors import ImageError
    rng = random.Random(seed)
    seeds = seed_clips(folder)
    outcomes: dict[tuple[str, str], int] = {}
    findings, slowest = [], 0.0
    for k in range(n):
        suffix = rng.choice(FORMATS)
        how, data = mutate(rng, seeds[suffix], list(seeds.values()))
        t = time.monotonic()
        try:
            frames = clips.read_frames(clips.Clip(data, frames=rng.randint(1, 8)))
            outcome = "frames"
            if not frames or any(f.mode != "RGB" or f.width < 1 for f in frames):
                findings.append((suffix, how, "frames that are not whole RGB pictures"))
        except ImageError as e:  # ClipError is one
            outcome = "refused"
            if "\n" in str(e) or not str(e):
                findings.append((suffix, how, f"a refusal that is not one line: {e!r}"))
        except Exception as e:  # noqa: BLE001  (any other exception is a finding)
            outcome = "escaped"
            findings.append((suffix, how, f"{type(e).__name__}: {e}"))
        took = time.monotonic() - t
        slowest = max(slowest, took)
        if took > clips.BOUNDS.seconds + 5:
            findings.append((suffix, how, f"took {took:.1f} s"))
        outcomes[suffix, outcome] = outcomes.get((suffix, outcome), 0) + 1
        if findings and findings[-1][0] == suffix and outcome == "escaped":
            (folder / f"finding-{k}{suffix}").write_bytes(data)
        log(f"{k} {suffix} {how} {outcome} {took:.2f} s")
    return {"outcomes": outcomes, "findings": findings, "slowest": slowest}


if __name__ == "__main__":
    import tempfile
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    with tempfile.TemporaryDirectory() as folder:
        result = fuzz(n, seed, Path(folder), log=lambda line: None)
    print(result["outcomes"], f"slowest {result['slowest']:.2f} s")
    for finding in result["findings"]:
        print("FINDING", *finding)
