"""Clips in, frames out: a video (MP4, MOV, WebM, MKV) or an animated picture (GIF, APNG, WebP)
given where a picture goes becomes a few of its frames, each an image slot, in time order
(docs/video.md).

    clip_kind(source)               "video", "animation" or None (a picture), from its bytes
    Clip(source, frames, start, end)   a clip with how to sample it
    read_frames(clip)               -> RGB PIL images (decoded in a child process, kept)
    sampled(images, frames, ...)    bare clips among images -> Clips sampled so
    expand(prompt, images)          each clip's one <|image|> mark -> one per frame

A clip is recognised by its content, never by its file name. Its frames are decoded in a
child process (owl2_edge/clip_decode.py) under BOUNDS: a decoder that crashes, hangs or
allocates without end on hostile bytes costs that process, and the caller gets one ClipError
line. The frames then are pictures like any other: preprocessed, encoded by the vision worker
in batches, their embeddings and prompts keyed by their own content (so a second question
about the clip, in this process or a later one through the disk cache, encodes and prefills
nothing again).
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass

from PIL import Image

from owl2_edge import checks, names
from owl2_edge.checks import display_path
from owl2_edge.clip_decode import EXIT_REFUSED, FRAME_HEADER
from owl2_edge.errors import ArgumentError, ImageError
from owl2_edge.image import MAX_FILE_BYTES

# Frames a clip gives when not told: what the demo model is measured at, and for the 7B model
# 4 x 65 = 260 positions of a 2,048 context.
DEFAULT_FRAMES = 4
MAX_FRAMES = 32


@dataclass(frozen=True)
class ClipBounds:
    """What decoding one clip may cost (docs/video.md, "Safety")."""
    seconds: float = 30.0              # wall time, then the child is killed
    cpu_seconds: int = 60              # the child's CPU time (its decoder threads included)
    memory_bytes: int = 3 * 2**30      # the child's address space
    decoded_frames: int = 20_000       # frames demuxed or decoded (an endless stream ends here)
    side: int = 16_384                 # a frame's width or height (beyond: refused)
    frame_pixels: int = 1920 * 1080 * 2  # a frame with more is scaled down in the child


BOUNDS = ClipBounds()


class ClipError(ImageError):
    """A clip that cannot be read within BOUNDS (damaged, hostile, too long, no PyAV)."""


@dataclass(frozen=True)
class Clip:
    """A clip (a path or its bytes) and how to sample it: `frames` frames evenly spaced over
    [start, end) seconds (the whole clip by default)."""
    source: object
    frames: int = DEFAULT_FRAMES
    start: float | None = None
    end: float | None = None

    def __post_init__(self):
        checks.integer("frames", self.frames, 1, MAX_FRAMES)
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None:
                checks.number(name, value, 0.0, 1e9)
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ArgumentError(f"end ({self.end:g} s) must come after start ({self.start:g} s)")


# --- Recognising a clip -------------------------------------------------------------------------

_VIDEO_BOXES = (b"ftyp", b"moov", b"mdat", b"wide")  # an MP4 / MOV file's first box
_MATROSKA = b"\x1a\x45\xdf\xa3"                      # WebM and MKV (EBML)


def _head(source) -> bytes | None:
    """The first bytes of a path or bytes source; None for anything else (a PIL image, a file
    object) and for a path that cannot be read (the picture path then says why)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:64])
    if isinstance(source, (str, os.PathLike)):
        try:
            # Without blocking: a FIFO's open would wait for a writer (the picture path then
            # refuses it as not a regular file).
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    return None
                return f.read(64)
        except (OSError, ValueError, TypeError):
            return None
    return None


def clip_kind(source) -> str | None:
    """"video" (MP4, MOV, WebM, MKV), "animation" (a GIF, PNG or WebP of more than one frame) or
    None (a picture, or nothing readable: the picture path refuses it), from the content."""
    if isinstance(source, Clip):
        source = source.source
    head = _head(source)
    if not head:
        return None
    if head[4:8] in _VIDEO_BOXES or head.startswith(_MATROSKA):
        return "video"
    animated_format = (head.startswith((b"GIF87a", b"GIF89a", b"\x89PNG\r\n\x1a\n"))
                       or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"))
    if animated_format and _is_animated(source):
        return "animation"
    return None


def _is_animated(source) -> bool:
    """Whether Pillow sees more than one frame (it reads the headers and the start of the
    second frame, no pixels)."""
    import io
    stream = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) \
        else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(stream) as image:
                return bool(getattr(image, "is_animated", False))
    except Exception:  # a damaged picture: the picture path reads it and says why
        return False


# --- Decoding, in a child process ---------------------------------------------------------------

def _name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return display_path(os.fspath(source))
    return "clip bytes"


def _checked_source(source):
    """A path (a regular file of at most MAX_FILE_BYTES) or bytes of at most that."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > MAX_FILE_BYTES:
            raise ClipError(f"clip bytes: {len(source) / 2**20:.0f} MiB is more than a clip may "
                            f"hold here ({MAX_FILE_BYTES // 2**20} MiB)")
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.path.abspath(checks.path("clip", source))
        try:
            st = os.stat(path)
        except OSError as e:
            raise ClipError(f"{_name(source)}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ClipError(f"{_name(source)}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ClipError(f"{_name(source)}: {st.st_size / 2**20:.0f} MiB is more than a clip "
                            f"may hold here ({MAX_FILE_BYTES // 2**20} MiB)")
        return path
    raise ArgumentError(f"a clip is a path or its bytes, not a {type(source).__name__}")


def _decode(clip: Clip, kind: str, source) -> list[Image.Image]:
    name = _name(clip.source)
    if kind == "video" and importlib.util.find_spec("av") is None:
        raise ClipError(f"{name} is a video: reading videos needs PyAV "
                        f"(pip install 'owl2-edge[video]'; scripts/setup.sh installs it)")
    request = {"kind": kind, "path": source if isinstance(source, str) else None,
               "frames": clip.frames, "start": clip.start, "end": clip.end,
               "max_memory_bytes": BOUNDS.memory_bytes, "max_cpu_seconds": BOUNDS.cpu_seconds,
               "max_decoded_frames": BOUNDS.decoded_frames, "max_side": BOUNDS.side,
               "max_frame_pixels": BOUNDS.frame_pixels}
    payload = json.dumps(request).encode() + b"\n" + (source if isinstance(source, bytes) else b"")
    try:
        done = subprocess.run([sys.executable, "-m", "owl2_edge.clip_decode"], input=payload,
                              capture_output=True, timeout=BOUNDS.seconds)
    except subprocess.TimeoutExpired:
        raise ClipError(f"{name}: decoding took longer than {BOUNDS.seconds:g} s") from None
    why = " ".join(done.stderr.decode("utf-8", "replace").split())[-300:]
    if done.returncode == EXIT_REFUSED:
        raise ClipError(f"{name}: {why}")
    if done.returncode < 0:
        try:
            signame = signal.Signals(-done.returncode).name
        except ValueError:  # a signal without a name here
            signame = f"signal {-done.returncode}"
        if signame == "SIGXCPU":
            raise ClipError(f"{name}: decoding took more than {BOUNDS.cpu_seconds} s of CPU time")
        raise ClipError(f"{name}: the {kind} decoder crashed on it ({signame})")
    if done.returncode != 0:
        raise ClipError(f"{name}: the {kind} decoder failed (exit {done.returncode}"
                        f"{': ' + why if why else ''})")
    return _frames_of(done.stdout, name)


def _frames_of(out: bytes, name: str) -> list[Image.Image]:
    frames, at = [], 0
    while at < len(out):
        if at + FRAME_HEADER.size > len(out):
            raise ClipError(f"{name}: the decoder's output is cut short")
        width, height, _ = FRAME_HEADER.unpack_from(out, at)
        at += FRAME_HEADER.size
        size = width * height * 3
        if width * height > BOUNDS.frame_pixels or at + size > len(out):
            raise ClipError(f"{name}: the decoder's output is cut short")
        frames.append(Image.frombytes("RGB", (width, height), out[at:at + size]))
        at += size
    if not frames:
        raise ClipError(f"{name}: no frame could be decoded")
    return frames


# Decoded clips kept (a chat asks about the same clip turn after turn), least recent first: the
# last 8, within 256 MiB of frames (32 frames of 2 x 1080p are 400 MiB: such a clip is not kept).
_KEPT, _KEPT_BYTES = 8, 256 * 2**20
_kept: collections.OrderedDict = collections.OrderedDict()
_kept_lock = threading.Lock()


def _frames_bytes(frames: list[Image.Image]) -> int:
    return sum(f.width * f.height * 3 for f in frames)


def _identity(source) -> tuple:
    """What a decoded clip is kept under: its bytes' digest, or its file's path, size and
    modification time."""
    if isinstance(source, bytes):
        return ("bytes", hashlib.sha256(source).hexdigest())
    st = os.stat(source)
    return ("path", source, st.st_size, st.st_mtime_ns)


def read_frames(clip: Clip, kind: str | None = None) -> list[Image.Image]:
    """The clip's frames (RGB PIL images, in time order; fewer than clip.frames when the clip
    has fewer in its span). ClipError when it cannot be read within BOUNDS."""
    if not isinstance(clip, Clip):
        raise ArgumentError(f"read_frames takes a Clip, not a {type(clip).__name__}")
    source = _checked_source(clip.source)
    kind = kind or clip_kind(source)
    if kind is None:
        raise ClipError(f"{_name(clip.source)}: not a video or an animated picture")
    key = (_identity(source), clip.frames, clip.start, clip.end, BOUNDS)
    with _kept_lock:
        if key in _kept:
            _kept.move_to_end(key)
            return list(_kept[key])
    frames = _decode(clip, kind, source)
    with _kept_lock:
        _kept[key] = frames
        while len(_kept) > _KEPT or sum(map(_frames_bytes, _kept.values())) > _KEPT_BYTES:
            _kept.popitem(last=False)
    return list(frames)


# --- Clips in a prompt --------------------------------------------------------------------------

def sampled(images: list, frames: int | None = None, start: float | None = None,
            end: float | None = None) -> list:
    """`images` with each clip given bare (a path or bytes) wrapped in a Clip sampled as
    frames/start/end say. Given with no clip among the images, they are refused: they would
    be ignored."""
    if frames is None and start is None and end is None:
        return images
    out, any_clip = [], False
    for image in images:
        if isinstance(image, Clip):
            any_clip = True
            out.append(image)
        elif clip_kind(image) is not None:
            any_clip = True
            out.append(Clip(image, DEFAULT_FRAMES if frames is None else frames, start, end))
        else:
            out.append(image)
    if not any_clip:
        given = [n for n, v in (("frames", frames), ("start", start), ("end", end)) if v is not None]
        raise ArgumentError(f"{', '.join(given)} sample a clip (a video or an animated picture), "
                            f"and none of the images is one")
    return out


def expand(prompt: str, images) -> tuple[str, list, int]:
    """Each clip among `images` (a Clip, or a path / bytes whose content is a clip) -> its
    frames, and the clip's <|image|> mark in `prompt` -> one mark per frame, in a row (the form
    the demo model was trained on). A clip given bare gives DEFAULT_FRAMES over its whole
    length (a Clip says its own). Returns (prompt, images, the number of frames clips gave).
    Pictures pass unchanged. The marks are rewritten when there is one per image; otherwise
    the prompt is left for the image-count check to refuse."""
    images = list(images)
    per_image, out_images, from_clips = [], [], 0  # slots per image; the images; clips' frames
    for image in images:
        kind = clip_kind(image)
        if kind is None:
            per_image.append(1)
            out_images.append(image)
            continue
        clip_frames = read_frames(image if isinstance(image, Clip) else Clip(image), kind)
        per_image.append(len(clip_frames))
        out_images.extend(clip_frames)
        from_clips += len(clip_frames)
    parts = prompt.split(names.IMAGE_PLACEHOLDER)
    if len(parts) - 1 == len(images):
        prompt = parts[0] + "".join(names.IMAGE_PLACEHOLDER * n + part
                                    for n, part in zip(per_image, parts[1:]))
    return prompt, out_images, from_clips


__all__ = ["BOUNDS", "Clip", "ClipBounds", "ClipError", "DEFAULT_FRAMES", "MAX_FRAMES",
           "clip_kind", "expand", "read_frames", "sampled"]
