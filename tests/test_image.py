"""Reading pictures and preparing pixels (owl2_edge.image) against the reference preprocessing."""

import io

import numpy as np
import pytest
from PIL import Image

from owl2_edge.convert import reference_io
from owl2_edge.convert.config import PreprocessConfig
from owl2_edge.errors import ArgumentError, ImageError
from owl2_edge.image import ASPECT_MODES, content_hash, load_image, preprocess
from owl2_edge.model_dir import ImageSpec

SMALL = PreprocessConfig(image_size=28)   # fast; every size below is a different case against it
RELEASE = PreprocessConfig()              # 448, the release's preprocessor_config.json

# (width, height): wide, tall, square at S, odd differences (the pad offset floors), smaller and
# larger than S, and extreme aspect ratios.
# (29, 17) / (17, 29): S*long/short = 47.76, where a rounding long edge would differ from a floor.
SIZES = [(50, 20), (20, 50), (28, 28), (31, 12), (13, 9), (9, 13), (200, 90), (64, 64), (3, 40),
         (29, 17), (17, 29)]


def spec_of(cfg: PreprocessConfig) -> ImageSpec:
    return ImageSpec(size=cfg.image_size, mean=cfg.image_mean, std=cfg.image_std,
                     pad_color=cfg.pad_color)


def random_image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A noisy picture in `mode`, so that any misplaced pixel or wrong filter shows."""
    w, h = size
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgb = Image.fromarray(rgba[..., :3])
    if mode == "RGB":
        return rgb
    if mode == "RGBA":
        return Image.fromarray(rgba)
    if mode == "L":
        return rgb.convert("L")
    if mode == "LA":
        return Image.fromarray(rgba).convert("LA")
    if mode == "P":
        return rgb.quantize(colors=37)
    if mode == "1":
        return rgb.convert("1")
    if mode == "CMYK":
        return Image.frombytes("CMYK", (w, h), rgba.tobytes())
    if mode == "I;16":
        # Past 255 on purpose: both sides must clip the same way (upstream's convert).
        return Image.fromarray(rng.integers(0, 1200, (h, w), dtype=np.uint16))
    raise ValueError(mode)


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# preprocess == the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ASPECT_MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocess_equals_reference_for_every_shape(mode, size):
    image = random_image("RGB", size, seed=size[0] * 100 + size[1])
    out = preprocess(image, spec_of(SMALL), mode)
    assert out.shape == (3, 28, 28) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, reference_io.preprocess(image, SMALL, mode))


@pytest.mark.parametrize("mode", ASPECT_MODES)
@pytest.mark.parametrize("color_mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_preprocess_converts_every_colour_mode_like_upstream(mode, color_mode):
    image = random_image(color_mode, (45, 19), seed=3)
    assert image.mode == color_mode
    np.testing.assert_array_equal(preprocess(image, spec_of(SMALL), mode),
                                  reference_io.preprocess(image, SMALL, mode))


@pytest.mark.parametrize("mode", ASPECT_MODES)
@pytest.mark.parametrize("size", [(640, 480), (300, 1000), (448, 448), (100, 60), (60, 100)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocess_equals_reference_at_release_size(mode, size):
    image = random_image("RGB", size, seed=7)
    out = preprocess(image, spec_of(RELEASE), mode)
    assert out.shape == (3, 448, 448)
    np.testing.assert_array_equal(out, reference_io.preprocess(image, RELEASE, mode))


def test_pad_mode_fills_with_the_release_pad_colour():
    """A tall black strip: the columns beside it must be the normalised (122, 116, 104)."""
    image = Image.new("RGB", (10, 100), (0, 0, 0))
    out = preprocess(image, spec_of(SMALL), "pad")
    spec = spec_of(SMALL)
    assert spec.pad_color == (122, 116, 104)
    expected = [(np.float32(c * (1 / 255)) - np.float32(m)) / np.float32(s)
                for c, m, s in zip(spec.pad_color, spec.mean, spec.std)]
    np.testing.assert_allclose(out[:, :, 0], np.broadcast_to(np.array(expected)[:, None], (3, 28)),
                               rtol=0, atol=1e-6)


def test_preprocess_refuses_an_unknown_aspect_mode():
    with pytest.raises(ValueError, match="aspect must be one of pad, resize, crop"):
        preprocess(random_image("RGB", (10, 10)), spec_of(SMALL), "letterbox")


# ------------------------------------------------------------------------------------------------
# load_image
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("color_mode", ["L", "LA", "P", "RGBA", "RGB", "1"])
def test_load_image_gives_upstreams_rgb_for_8_bit_files(tmp_path, color_mode):
    path = tmp_path / f"picture-{color_mode}.png"
    random_image(color_mode, (33, 21), seed=5).save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (33, 21)
    with Image.open(path) as upstream:
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(upstream.convert("RGB")))


def test_load_image_reads_cmyk_jpeg_like_upstream(tmp_path):
    path = tmp_path / "print.jpg"
    random_image("CMYK", (40, 30)).save(path)
    with Image.open(path) as upstream:
        assert upstream.mode == "CMYK"
        np.testing.assert_array_equal(np.asarray(load_image(path)),
                                      np.asarray(upstream.convert("RGB")))


def test_load_image_scales_16_bit_greyscale_instead_of_clipping(tmp_path):
    """Upstream's convert('RGB') clips 16-bit samples at 255 (a 16-bit scan comes out white);
    load_image scales them to 8 bits instead."""
    samples = np.array([[0, 128, 257, 32768, 65535, 1000]], dtype=np.uint16)
    path = tmp_path / "scan16.png"
    Image.fromarray(samples).save(path)
    loaded = np.asarray(load_image(path))
    np.testing.assert_array_equal(loaded[..., 0], [[0, 0, 1, 128, 255, 4]])
    assert (loaded == loaded[..., :1]).all()  # grey stays grey
    with Image.open(path) as upstream:
        assert upstream.mode == "I;16"
        assert np.asarray(upstream.convert("RGB"))[0, 3, 0] == 255  # what we avoid


@pytest.mark.parametrize("mode", ["I", "F"])
def test_load_image_keeps_8_bit_range_32_bit_images_as_upstream(mode):
    samples = np.array([[0, 17, 128, 255]], dtype=np.int32 if mode == "I" else np.float32)
    image = Image.fromarray(samples)
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(load_image(image)), np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("mode", ["I", "F"])
def test_load_image_reads_32_bit_images_past_255_as_16_bit_data(mode):
    samples = np.array([[0, 257, 32768, 65535, 70000]], dtype=np.int32)
    image = Image.fromarray(samples.astype(np.float32) if mode == "F" else samples)
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(load_image(image))[..., 1], [[0, 1, 128, 255, 255]])


def test_load_image_accepts_path_bytes_file_object_and_pil_image(tmp_path):
    picture = random_image("RGB", (17, 11), seed=9)
    path = tmp_path / "p.png"
    picture.save(path)
    data = path.read_bytes()
    with open(path, "rb") as f:
        from_file_object = load_image(f)
    loaded = [load_image(str(path)), load_image(path), load_image(data), from_file_object,
              load_image(picture)]
    for image in loaded:
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), np.asarray(picture))


def test_load_image_refuses_a_source_that_is_no_image_container():
    with pytest.raises(ArgumentError, match="path, bytes"):
        load_image(42)


def _jpeg_with_orientation(orientation: int) -> bytes:
    """A 48x24 JPEG (flat blocks, so JPEG keeps them) stored with an EXIF orientation tag."""
    pixels = np.zeros((24, 48, 3), dtype=np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:12, 16:] = (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return png_bytes(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)


def test_exif_orientation_turns_the_picture_upright():
    data = _jpeg_with_orientation(6)  # 6: stored rotated; shown turned 90 degrees clockwise
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.getexif()[0x0112] == 6
    stored = np.asarray(load_image(data, exif_transpose=False))
    upright = np.asarray(load_image(data))
    assert stored.shape == (24, 48, 3) and upright.shape == (48, 24, 3)
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))


def test_exif_orientation_can_be_ignored_like_upstream(tmp_path):
    path = tmp_path / "phone.jpg"
    path.write_bytes(_jpeg_with_orientation(3))  # 3: upside down
    with Image.open(path) as upstream:
        np.testing.assert_array_equal(np.asarray(load_image(path, exif_transpose=False)),
                                      np.asarray(upstream.convert("RGB")))
        np.testing.assert_array_equal(np.asarray(load_image(path)),
                                      np.asarray(upstream.convert("RGB"))[::-1, ::-1])


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (12, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as gif:
        assert gif.n_frames == 3
    loaded = np.asarray(load_image(path))
    assert (loaded == (255, 0, 0)).all()


# ------------------------------------------------------------------------------------------------
# Errors: always ImageError, one line, the file named, no chained traceback
# ------------------------------------------------------------------------------------------------

def _image_error(source, match: str) -> ImageError:
    with pytest.raises(ImageError, match=match) as caught:
        load_image(source)
    error = caught.value
    assert "\n" not in str(error)
    # No chained traceback of some other exception type comes with it.
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return error


def test_missing_file_is_an_image_error(tmp_path):
    path = tmp_path / "nowhere.png"
    assert str(path) in str(_image_error(path, "no such file"))


def test_text_file_is_an_image_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n" * 5)
    assert str(path) in str(_image_error(path, "not an image"))


def test_folder_is_an_image_error(tmp_path):
    _image_error(tmp_path, "folder")


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_png_is_an_image_error(tmp_path, keep):
    data = png_bytes(random_image("RGB", (64, 64), seed=2))
    path = tmp_path / "cut.png"
    path.write_bytes(data[:int(len(data) * keep)])
    assert str(path) in str(_image_error(path, "damaged or truncated"))
    _image_error(path.read_bytes(), "image bytes: damaged or truncated")


def test_truncated_jpeg_is_an_image_error(tmp_path):
    data = png_bytes(random_image("RGB", (64, 64), seed=2), "JPEG")
    _image_error(data[:len(data) // 2], "damaged or truncated")


def test_decompression_bomb_guard_stays_on(monkeypatch):
    data = png_bytes(Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10 000 pixels > 2 x the limit
    _image_error(data, "too large")


# ------------------------------------------------------------------------------------------------
# content_hash
# ------------------------------------------------------------------------------------------------

def test_content_hash_is_the_same_for_the_same_picture_in_two_formats(tmp_path):
    picture = random_image("RGB", (23, 14), seed=4)
    picture.save(tmp_path / "a.png")
    picture.save(tmp_path / "b.bmp")
    key = content_hash(picture)
    assert content_hash(tmp_path / "a.png") == key == content_hash(load_image(tmp_path / "b.bmp"))
    assert content_hash((tmp_path / "a.png").read_bytes()) == key


def test_content_hash_changes_with_one_pixel_or_the_shape():
    picture = random_image("RGB", (20, 10), seed=4)
    changed = picture.copy()
    changed.putpixel((3, 3), tuple((v + 1) % 256 for v in picture.getpixel((3, 3))))
    reshaped = Image.frombytes("RGB", (10, 20), picture.tobytes())  # same bytes, other shape
    assert len({content_hash(picture), content_hash(changed), content_hash(reshaped)}) == 3


def test_content_hash_of_pixels_depends_on_the_aspect_mode():
    picture = random_image("RGB", (40, 20), seed=4)
    keys = {content_hash(preprocess(picture, spec_of(SMALL), m)) for m in ASPECT_MODES}
    assert len(keys) == 3
    again = preprocess(picture, spec_of(SMALL), "pad")
    assert content_hash(again) == content_hash(preprocess(picture.copy(), spec_of(SMALL), "pad"))
