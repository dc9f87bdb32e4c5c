"""Images in, pixels out: reading a picture and preparing it for the vision ONNX (Pillow + numpy).

    load_image(source)            path / bytes / file object / PIL image -> RGB PIL image
    preprocess(image, spec, mode) RGB image -> float32 [3, S, S], as upstream prepares it
    content_hash(image)           key of the image-embedding cache

preprocess follows docs/architecture.md §6 to the bit: upstream's expand2square or bicubic
stretch, then CLIPImageProcessor (shortest edge to S with Pillow's bicubic back to uint8, centre
crop, rescale, normalise). Pillow's bicubic (a = -0.5, antialiased when shrinking) is part of
the result, so the resizing stays in Pillow; only the arithmetic after it is numpy.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import os
import stat
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from owl2_edge import checks
from owl2_edge.errors import ArgumentError, ImageError
from owl2_edge.checks import display_path
from owl2_edge.model_dir import ImageSpec

ASPECT_MODES = ("pad", "resize", "crop")
# The largest image file (or bytes) read: beyond any photo's size, and a bound on what a hostile
# input can make us hold. Pillow's decompression-bomb guard bounds the decoded pixels.
MAX_FILE_BYTES = 256 * 2**20
# The largest square canvas pad and resize build (Pillow's own decompression-bomb limit).
MAX_SQUARE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# What Pillow's decoders raise on damaged or hostile data. It is a long list because each format
# plugin fails its own way (a broken PNG chunk is a SyntaxError, a short zlib stream a zlib.error,
# a bad header a struct.error...); the try blocks around it call nothing but Pillow.
_DECODE_FAILURES = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                    IndexError, KeyError, TypeError, MemoryError, Image.DecompressionBombError)

# Modes whose samples are 16-bit by definition (Pillow's names for 16-bit greyscale).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


# ================================================================================================
# Reading
# ================================================================================================

def load_image(source, exif_transpose: bool = True) -> Image.Image:
    """Any picture Pillow can read -> a new RGB image, independent of the source.

    `source` is a path (str or os.PathLike), the bytes of an image file, a binary file object, or
    an open PIL image. A file we open is read at its first frame (an animated GIF/PNG/WebP gives
    frame 0); an open PIL image is taken at the frame it is on. Pillow's decompression-bomb guard
    stays on. Every failure to read the picture is an ImageError whose one-line message names
    the file.

    exif_transpose: turn the picture upright as its EXIF orientation tag says, as a phone's
    gallery shows it. Upstream never does this (it only calls convert('RGB')), so a sideways
    photo reaches upstream's model sideways; pass False to get exactly upstream's pixels.
    """
    # Pillow warns (on stderr) about the damage it works around in a file ("Corrupt EXIF data",
    # "Truncated File Read"): the picture is then either read or refused with one error line.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(source, Image.Image):
            return _decoded_rgb(source, "image", exif_transpose)
        name, stream = _open_source(source)
        try:
            with Image.open(stream) as image:
                return _decoded_rgb(image, name, exif_transpose)
        except _DECODE_FAILURES as e:
            raise _read_error(name, e) from None


def _open_source(source) -> tuple[str, object]:
    """(name for messages, what Image.open takes) for each kind of source. A path must name a
    regular file (a FIFO or a device would block open() or never end) of at most MAX_FILE_BYTES;
    bytes are held to the same limit."""
    if isinstance(source, (str, os.PathLike)):
        path = checks.path("image", source)
        name = display_path(path)
        try:
            st = os.stat(path)
        except OSError as e:
            raise _read_error(name, e) from None
        if not stat.S_ISREG(st.st_mode):
            why = "is a folder, not an image" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ImageError(f"{name}: {why}")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(f"{name}: {st.st_size / 2**20:.0f} MiB is more than an image file may "
                             f"hold here ({MAX_FILE_BYTES // 2**20} MiB)")
        return name, path
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > MAX_FILE_BYTES:
            raise ImageError(f"image bytes: {len(source) / 2**20:.0f} MiB is more than an image "
                             f"may hold here ({MAX_FILE_BYTES // 2**20} MiB)")
        return "image bytes", io.BytesIO(source)
    if hasattr(source, "read"):
        return display_path(str(getattr(source, "name", "image file"))), source
    raise ArgumentError(f"cannot read an image from a {type(source).__name__}; give a path, "
                        f"bytes, a binary file object or a PIL image")


def _decoded_rgb(image: Image.Image, name: str, exif_transpose: bool) -> Image.Image:
    try:
        # Image.open only reads the header: decoding here is where truncation shows up.
        image.load()
        if exif_transpose:
            image = _upright(image)
        return to_rgb(image)
    except _DECODE_FAILURES as e:
        raise _read_error(name, e) from None


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except _DECODE_FAILURES:
        # A damaged EXIF block says nothing reliable about orientation; the pixels are still
        # good, so the picture is used as stored rather than refused.
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image, converted as upstream's convert('RGB') does, except for samples deeper
    than 8 bits.

    Alpha is dropped, not composited (LA/RGBA/PA keep the colour stored under transparent
    pixels), CMYK uses Pillow's plain formula, P and 1 expand their palette: all exactly
    upstream's, because the model was trained on what that gives.

    16-bit and 32-bit greyscale (I;16*, I, F) are where we deviate on purpose. Pillow's convert
    clips their samples at 255, so a 16-bit PNG or TIFF, whose mid-grey is 32768, comes out
    almost all white and the model sees nothing of it. Instead:
      - I;16* (16-bit by definition) is scaled to 8 bits: round(v / 257), 65535 -> 255;
      - I and F carry no declared range: when a sample exceeds 255 they are read as 16-bit data
        and scaled the same way (clipped to 0..65535 first); when all samples fit in 0..255
        they go through convert('RGB') like upstream (which then changes nothing but rounding).
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        samples = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode in _SIXTEEN_BIT_MODES or samples.max(initial=0) > 255:
            grey = np.rint(np.clip(samples, 0, 65535) / 257).astype(np.uint8)
            return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def _read_error(name: str, e: BaseException) -> ImageError:
    if isinstance(e, FileNotFoundError):
        why = "no such file"
    elif isinstance(e, IsADirectoryError):
        why = "is a folder, not an image"
    elif isinstance(e, PermissionError):
        why = "permission denied"
    elif isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
        why = "file name too long"
    elif isinstance(e, UnidentifiedImageError):
        why = "not an image (Pillow does not recognise the format)"
    elif isinstance(e, Image.DecompressionBombError):
        why = f"too large to decode safely ({_one_line(e)})"
    elif isinstance(e, MemoryError):
        why = "not enough memory to decode it"
    else:
        why = f"damaged or truncated image ({type(e).__name__}: {_one_line(e)})"
    return ImageError(f"{name}: {why}")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


# ================================================================================================
# Preprocessing (docs/architecture.md §6)
# ================================================================================================

def preprocess(image: Image.Image, spec: ImageSpec, mode: str = "pad") -> np.ndarray:
    """One picture -> float32 [3, S, S] for the vision ONNX.

    pad    : the upstream CLI's default; the picture centred on a square of the pad colour
    resize : upstream's README and evaluate scripts; bicubic stretch to a max(W, H) square
    crop   : the plain CLIP processor (model_worker); shortest edge to S, centre crop

    A non-RGB image is converted with plain convert('RGB'), exactly as upstream; load_image's
    result is RGB already (and handles 16-bit pictures better, see to_rgb).
    """
    checks.choice("aspect", mode, ASPECT_MODES)
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except _DECODE_FAILURES as e:
            raise ImageError(f"image: cannot convert mode {image.mode} to RGB "
                             f"({_one_line(e)})") from None
    if min(image.size) == 0:
        raise ImageError(f"image: empty picture ({image.size[0]}x{image.size[1]})")
    side = max(image.size)
    if mode in ("pad", "resize") and side * side > MAX_SQUARE_PIXELS:
        # Upstream makes the picture square at its long side before resizing: a 32x65535 GIF
        # would need a 65535² canvas (13 GB). Refused, with the mode that does not need one.
        raise ImageError(f"image: {image.size[0]}x{image.size[1]} is too long and thin to make "
                         f"square ({side}x{side} would be over {MAX_SQUARE_PIXELS // 10**6} "
                         f"megapixels); use aspect 'crop' (--aspect crop)")
    if mode == "pad":
        image = expand_to_square(image, spec.pad_color)
    elif mode == "resize":
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    return clip_pixels(image, spec)


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Upstream's expand2square: the short axis is centred with offset (long - short) // 2."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new("RGB", (side, side), tuple(color))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def clip_pixels(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """CLIPImageProcessor on an RGB image: shortest edge -> S, centre crop S x S, normalise, CHW."""
    s = spec.size
    w, h = image.size
    # transformers computes the long edge as int(S * long / short): a floor, which integer
    # division gives exactly for any real image size.
    size = (s, s * h // w) if w <= h else (s * w // h, s)
    # Pillow's bicubic with uint8 output: that rounding is part of what the model was fed.
    image = image.resize(size, Image.Resampling.BICUBIC)
    top, left = (size[1] - s) // 2, (size[0] - s) // 2
    levels = np.asarray(image, dtype=np.uint8)[top:top + s, left:left + s]
    # A uint8 sample has 256 possible values per channel, so the normalisation is a table.
    table = _normalisation_table(spec)
    return np.stack([table[c][levels[:, :, c]] for c in range(3)])


@functools.lru_cache(maxsize=8)
def _normalisation_table(spec: ImageSpec) -> np.ndarray:
    """[3, 256] float32: value of level v in channel c after rescale and normalise.

    Computed with upstream's arithmetic so it matches bit for bit: transformers rescales by
    multiplying with 1/255 in float64 and casts to float32, then normalises in float32."""
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None]
    table = (scaled[None, :] - mean) / std
    table.setflags(write=False)
    return table


# ================================================================================================
# Cache key
# ================================================================================================

def content_hash(image) -> str:
    """Hex key of what an image looks like, for the image-embedding cache.

    Hashes decoded pixels, not file bytes: the same picture as a PNG, a re-saved copy or a PIL
    image a program made itself gets one key, and the key changes when decoding changes what
    the model sees (EXIF orientation on or off). A numpy array (preprocessed pixels) is hashed
    with its dtype and shape, so it also captures the aspect mode and normalisation. An RGB PIL
    image is hashed as it is; anything else load_image accepts is loaded first.
    Cost: blake2b over the pixels, ~10 ms for a 12-megapixel photo, small beside the vision run.
    """
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(image, np.ndarray):
        array = np.ascontiguousarray(image)
        digest.update(f"array {array.dtype.str} {array.shape}\n".encode())
        digest.update(array.data)
        return digest.hexdigest()
    if not (isinstance(image, Image.Image) and image.mode == "RGB"):
        image = load_image(image)
    digest.update(f"RGB {image.size[0]}x{image.size[1]}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
