"""Image bytes -> pixels: decoding, limits, refusals and the shape of the result (no torch needed)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from lumen_vlm.fastvlm.exceptions import ImageError, InputError
from lumen_vlm.fastvlm.image import (
    ImageLimits,
    check_image_bytes,
    check_image_size,
    image_to_pixels,
    load_image,
    preprocess,
    sniff_image_mime,
)
from lumen_vlm.resources.model_spec import ImageSpec, ResizeMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# FastVLM's own preprocessor_config: no mean shift, unit std, so the pad colour is black.
FASTVLM_SPEC = ImageSpec(size=32, mode=ResizeMode.PAD)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def solid(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed, so only the size is a lie)."""
    data = encode(Image.new("RGB", (1, 1)), "PNG")
    assert data[12:16] == b"IHDR"
    chunk = bytearray(data[12:29])  # chunk type + 13 bytes of IHDR data
    chunk[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(chunk)))
    return data[:12] + bytes(chunk) + crc + data[33:]


def jpeg_with_size(width: int, height: int) -> bytes:
    """A valid 8x8 JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    assert struct.unpack(">HH", data[sof + 5 : sof + 9]) == (8, 8)  # height, then width
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def expected_norm(value: int, mean: float, std: float) -> np.float32:
    """One 8-bit value through transformers' rescale (float64 -> float32) and normalize (float32)."""
    scaled = np.float32(np.float64(value) * (1 / 255))
    return (scaled - np.float32(mean)) / np.float32(std)


# --- sniffing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/jpeg"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"RIFF\x24\x00\x00\x00WEBP", "image/webp"),
        (b"", None),
        (b"\xff\xd8", None),
        (b"\x89PNG\r\n", None),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
        (b"RIFF\x24\x00\x00\x00WEB", None),
        (b"GIF89a\x01\x00\x01\x00", None),
        (b"BM\x3a\x00\x00\x00", None),
        (b"II*\x00\x08\x00\x00\x00", None),
        (b"MM\x00*\x00\x00\x00\x08", None),
        (b"hello world", None),
    ],
)
def test_sniff_table(data: bytes, mime: str | None) -> None:
    assert sniff_image_mime(data) == mime


@pytest.mark.parametrize(("fmt", "mime"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")])
def test_sniff_real_files(fmt: str, mime: str) -> None:
    assert sniff_image_mime(encode(noise(8, 8), fmt)) == mime


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_sniff_other_formats(fmt: str) -> None:
    assert sniff_image_mime(encode(noise(8, 8), fmt)) is None


# --- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_load_formats(fmt: str) -> None:
    image = load_image(encode(noise(40, 30), fmt))
    assert image.mode == "RGB"
    assert image.size == (40, 30)


def test_png_and_lossless_webp_are_exact() -> None:
    source = noise(17, 9)
    for data in (encode(source, "PNG"), encode(source, "WEBP", lossless=True)):
        assert np.array_equal(np.asarray(load_image(data)), np.asarray(source))


def test_rgba_drops_alpha_without_compositing() -> None:
    # Apple's reference is a bare .convert("RGB"): a fully transparent pixel keeps its colour.
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (200, 100, 50, 255))
    image = load_image(encode(rgba, "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (10, 20, 30)
    assert image.getpixel((0, 0)) == (200, 100, 50)


def test_palette_png_with_transparency() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30, 240, 230, 220] + [0] * 762)
    pal.putpixel((3, 3), 1)
    data = encode(pal, "PNG", transparency=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P" and "transparency" in check.info
    image = load_image(data)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (10, 20, 30)  # the transparent index keeps its palette colour
    assert image.getpixel((3, 3)) == (240, 230, 220)


def test_grayscale() -> None:
    gray = Image.new("L", (5, 3), 77)
    for fmt in ("PNG", "JPEG"):
        image = load_image(encode(gray, fmt))
        assert image.mode == "RGB"
        assert image.size == (5, 3)
        r, g, b = image.getpixel((2, 1))
        assert r == g == b and abs(r - 77) <= 2


def test_cmyk_jpeg() -> None:
    image = load_image(encode(Image.new("CMYK", (6, 6), (0, 0, 0, 0)), "JPEG"))
    assert image.mode == "RGB"
    assert all(c >= 250 for c in image.getpixel((3, 3)))


def test_tiny_1x1() -> None:
    image = load_image(encode(solid(1, 1, (1, 2, 3)), "PNG"))
    assert image.size == (1, 1)
    assert image.getpixel((0, 0)) == (1, 2, 3)


def test_exif_orientation_is_applied() -> None:
    # 40 wide x 20 high: left half red, right half blue, tagged "rotate 90° clockwise to view".
    source = solid(40, 20, (255, 0, 0))
    source.paste(solid(20, 20, (0, 0, 255)), (20, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    data = encode(source, "JPEG", exif=exif, quality=95)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (40, 20) and raw.getexif()[0x0112] == 6

    image = load_image(data)
    assert image.size == (20, 40)  # transposed
    top = image.getpixel((10, 5))
    bottom = image.getpixel((10, 34))
    assert top[0] > 200 and top[2] < 60  # the left edge (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_images_give_the_first_frame() -> None:
    frames = [solid(8, 8, (255, 0, 0)), solid(8, 8, (0, 0, 255))]
    for fmt, kwargs in [("PNG", {}), ("WEBP", {"lossless": True})]:
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kwargs)
        with Image.open(io.BytesIO(data)) as check:
            assert getattr(check, "n_frames", 1) == 2
        image = load_image(data)
        assert image.size == (8, 8)
        assert image.getpixel((4, 4)) == (255, 0, 0)


def test_mpo_jpeg_is_accepted() -> None:
    # Phone cameras write JPEGs with a multi-picture index, which Pillow opens as "MPO".
    data = encode(solid(16, 8, (250, 0, 0)), "MPO", save_all=True, append_images=[solid(16, 8, (0, 0, 250))])
    assert sniff_image_mime(data) == "image/jpeg"
    with Image.open(io.BytesIO(data)) as check:
        assert check.format == "MPO"
    image = load_image(data)
    assert image.size == (16, 8)
    r, _, b = image.getpixel((8, 4))
    assert r > 200 and b < 50


# --- refusals -----------------------------------------------------------------------------------


def _bad_inputs() -> dict[str, bytes]:
    source = noise(64, 48, seed=3)
    jpeg = encode(source, "JPEG")
    png = encode(source, "PNG")
    webp = encode(source, "WEBP")
    return {
        "empty": b"",
        "random": np.random.default_rng(7).bytes(1000),
        "text": b"this is not an image, just some text\n" * 10,
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "truncated_png": png[: len(png) // 2],
        "truncated_webp": webp[: len(webp) // 2],
        "png_signature_only": png[:8],
        "jpeg_signature_then_garbage": b"\xff\xd8\xff" + np.random.default_rng(8).bytes(500),
        "gif": encode(source, "GIF"),
        "bmp": encode(source, "BMP"),
        "tiff": encode(source, "TIFF"),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_bad_inputs_raise_image_error(name: str) -> None:
    data = _bad_inputs()[name]
    with pytest.raises(ImageError) as info:
        load_image(data)
    assert isinstance(info.value, InputError)
    assert str(info.value)
    with pytest.raises(ImageError):
        image_to_pixels(data, FASTVLM_SPEC)


def test_corrupt_png_crc() -> None:
    data = bytearray(encode(noise(16, 16), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # damage the compressed pixels; the CRC no longer matches
    with pytest.raises(ImageError) as info:
        load_image(bytes(data))
    assert info.value.__cause__ is not None


def test_truncated_errors_keep_their_cause() -> None:
    jpeg = encode(noise(64, 48), "JPEG")
    with pytest.raises(ImageError, match="JPEG") as info:
        load_image(jpeg[: len(jpeg) // 2])
    assert isinstance(info.value.__cause__, OSError)


def test_unsupported_format_message() -> None:
    with pytest.raises(ImageError, match="JPEG, PNG and WebP"):
        load_image(encode(noise(8, 8), "GIF"))


def test_huge_png_header_is_rejected_before_decoding() -> None:
    data = png_with_size(100_000, 100_000)
    assert len(data) < 100
    with pytest.raises(ImageError, match="pixels"):
        load_image(data)


def test_pixel_limit_from_header() -> None:
    # 64 M pixels: under PIL's own bomb threshold, over our default limit.
    with pytest.raises(ImageError, match="8000x8000 = 64000000 pixels"):
        load_image(png_with_size(8000, 8000))
    with pytest.raises(ImageError, match="pixels"):
        load_image(encode(noise(20, 10), "PNG"), ImageLimits(max_pixels=199))
    assert load_image(encode(noise(20, 10), "PNG"), ImageLimits(max_pixels=200)).size == (20, 10)


def test_pil_bomb_error_becomes_image_error_without_global_changes() -> None:
    # 400 M pixels is over twice PIL's MAX_IMAGE_PIXELS, where PIL itself refuses in open().
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    with pytest.raises(ImageError, match="too large to decode safely") as error:
        load_image(png_with_size(20_000, 20_000), ImageLimits(max_pixels=10**12))
    assert "20000x20000 = 400000000 pixels" in str(error.value)
    assert max_pixels_before == Image.MAX_IMAGE_PIXELS
    assert warnings.filters == filters_before


def test_byte_limit() -> None:
    data = encode(noise(32, 32), "PNG")
    with pytest.raises(ImageError, match="bytes"):
        load_image(data, ImageLimits(max_bytes=len(data) - 1))
    assert load_image(data, ImageLimits(max_bytes=len(data))).size == (32, 32)


def test_extreme_aspect_ratio_is_refused_before_allocating() -> None:
    thin = Image.new("RGB", (50_000, 1))  # 50 k pixels, but its PAD canvas would be 2.5 G pixels
    for mode in ResizeMode:
        with pytest.raises(ImageError, match="aspect ratio"):
            preprocess(thin, ImageSpec(size=1024, mode=mode))
    with pytest.raises(ImageError, match="aspect ratio"):
        image_to_pixels(encode(thin, "PNG"), ImageSpec(size=1024, mode=ResizeMode.CROP))


@pytest.mark.parametrize("make", [png_with_size, jpeg_with_size])
def test_a_decompression_bomb_is_refused_naming_max_image_pixels(make) -> None:
    # 400 M pixels: PIL's own bomb check refuses it inside Image.open, before our header check.
    data = make(20_000, 20_000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError) as error:
        load_image(data)
    message = str(error.value)
    assert "20000x20000 = 400000000 pixels" in message
    assert "max_image_pixels = 50000000" in message
    assert "178956970" not in message  # PIL's limit is not ours
    assert max_pixels_before == Image.MAX_IMAGE_PIXELS


# --- the memory bound: no image preprocessing makes may exceed max_image_pixels -----------------

SMALL_LIMITS = ImageLimits(max_pixels=10_000)
MADE_LIMIT = "more than the limit of max_image_pixels = 10000 pixels"
READ_LIMIT = "more than the limit of 20000 pixels (it may read 2 x max_image_pixels = 10000 pixels)"


@pytest.mark.parametrize(
    ("mode", "under", "over", "needed", "limit"),
    [
        # Pad mode makes no padded square: a landscape image's largest image is the resize
        # temporary, 32 pixels wide and as tall as the square (under: 32x312).
        (ResizeMode.PAD, (312, 1), (313, 1), "need a 32x313 resize temporary = 10016 pixels", MADE_LIMIT),
        # A portrait image's strips read its whole square, which may be twice the limit (under: 141x141).
        (ResizeMode.PAD, (1, 141), (1, 142), "read a 142x142 padded square = 20164 pixels", READ_LIMIT),
        (ResizeMode.CROP, (1, 9), (1, 10), "need a 32x320 resized image = 10240 pixels", MADE_LIMIT),  # under: 32x288
        (ResizeMode.CROP, (9, 1), (10, 1), "need a 320x32 resized image = 10240 pixels", MADE_LIMIT),
    ],
)
def test_no_intermediate_image_may_exceed_max_image_pixels(
    mode: ResizeMode, under: tuple[int, int], over: tuple[int, int], needed: str, limit: str
) -> None:
    spec = ImageSpec(size=32, mode=mode)
    assert preprocess(noise(*under), spec, SMALL_LIMITS).shape == (1, 3, 32, 32)
    assert image_to_pixels(encode(noise(*under), "PNG"), spec, SMALL_LIMITS).shape == (1, 3, 32, 32)
    for refuse in (
        lambda: preprocess(noise(*over), spec, SMALL_LIMITS),
        lambda: image_to_pixels(encode(noise(*over), "PNG"), spec, SMALL_LIMITS),
    ):
        with pytest.raises(ImageError) as error:
            refuse()
        message = str(error.value)
        assert f"image {over[0]}x{over[1]} has too extreme an aspect ratio for {mode.value} mode" in message
        assert needed in message
        assert limit in message


def test_the_bound_is_checked_from_the_header_before_decoding() -> None:
    # The IHDR claims 48829x1 over a 1x1 image: decoding would fail, so only a check made from
    # the header alone can give this answer.
    data = png_with_size(48_829, 1)
    with pytest.raises(ImageError, match="1024x48829 resize temporary"):
        image_to_pixels(data, ImageSpec(size=1024, mode=ResizeMode.PAD))
    with pytest.raises(ImageError, match="corrupt or truncated"):  # without a spec: a decode error
        load_image(data)


@pytest.mark.parametrize(
    ("size", "pad_under", "crop_under", "crop_over"),
    # The tiny test model's input and FastVLM-0.5B's. PAD makes a size x w resize temporary for
    # w x 1; CROP resizes 1 x h to size x int(size * h).
    [(256, 195_312, 762, 763), (1024, 48_828, 47, 48)],
)
def test_the_thin_shapes_of_issue_9_at_the_default_limit(
    size: int, pad_under: int, crop_under: int, crop_over: int
) -> None:
    # Checked from the sizes alone: the thinnest accepted ones need ~200 MB to preprocess.
    limits = ImageLimits()
    pad, crop = ImageSpec(size=size, mode=ResizeMode.PAD), ImageSpec(size=size, mode=ResizeMode.CROP)
    check_image_size(pad_under, 1, limits, pad)  # a resize temporary of at most 50 000 000 pixels
    check_image_size(1, 10_000, limits, pad)  # a 10000x10000 square read in strips: 2 x 50 M pixels
    check_image_size(12_247, 1, limits, pad)  # issue 9's 115-byte PNG: now a 12.5 M-pixel temporary at most
    check_image_size(1, crop_under, limits, crop)
    check_image_size(crop_under, 1, limits, crop)
    refused = [
        (pad_under + 1, 1, pad),
        (1, 10_001, pad),
        (1, crop_over, crop),
        (crop_over, 1, crop),
        (1, 1464, crop),  # issue 9: an 86-byte PNG that cost 1.4 GB
    ]
    for width, height, spec in refused:
        with pytest.raises(ImageError, match="max_image_pixels = 50000000 pixels"):
            check_image_size(width, height, limits, spec)


ORDINARY_PHOTOS = [
    (6000, 4000),  # 24 MP, 3:2
    (5656, 4242),  # 24 MP, 4:3
    (4032, 3024),  # 12 MP phone
    (3840, 2160),  # 4K screenshot
    (8192, 5464),  # 45 MP, 3:2
    (8160, 6120),  # 50 MP, 4:3
    (10_000, 5000),  # 50 MP, 2:1: every image up to 2:1 within max_image_pixels is accepted
]


@pytest.mark.parametrize("mode", list(ResizeMode))
@pytest.mark.parametrize("size", [256, 1024])
def test_ordinary_photos_fit_the_default_limits(mode: ResizeMode, size: int) -> None:
    spec = ImageSpec(size=size, mode=mode)
    for width, height in ORDINARY_PHOTOS:
        check_image_size(width, height, ImageLimits(), spec)
        check_image_size(height, width, ImageLimits(), spec)


def test_a_phone_photo_is_preprocessed_in_pad_mode() -> None:
    # No padded square is made: the largest image made for it is the 1024x4032 resize temporary.
    data = encode(solid(4032, 3024, (200, 100, 50)), "PNG")
    pixels = image_to_pixels(data, ImageSpec(size=1024, mode=ResizeMode.PAD))
    assert pixels.shape == (1, 3, 1024, 1024)
    assert np.allclose(pixels[0, :, 512, 512], np.array([200, 100, 50]) / 255)


def test_the_models_input_square_is_allowed_under_a_lower_max_image_pixels() -> None:
    limits = ImageLimits(max_pixels=100)
    for mode in ResizeMode:
        spec = ImageSpec(size=32, mode=mode)
        assert preprocess(noise(10, 10), spec, limits).shape == (1, 3, 32, 32)  # upscaled to 32x32
    assert preprocess(noise(10, 5), ImageSpec(size=32, mode=ResizeMode.PAD), limits).shape == (1, 3, 32, 32)
    with pytest.raises(ImageError, match=r"35x32 resized image = 1120 pixels, more than the limit of 1024 pixels"):
        preprocess(noise(10, 9), ImageSpec(size=32, mode=ResizeMode.CROP), limits)


def test_an_image_the_exif_orientation_makes_portrait_is_checked_upright() -> None:
    # Stored 142x1 (a 32x142 resize temporary: accepted from the header), upright 1x142: its
    # 142x142 square would be read, more than twice SMALL_LIMITS. Refused before it is padded.
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees
    data = encode(solid(142, 1, (9, 9, 9)), "JPEG", exif=exif)
    spec = ImageSpec(size=32, mode=ResizeMode.PAD)
    with pytest.raises(ImageError, match="image 1x142 has too extreme an aspect ratio for pad mode"):
        image_to_pixels(data, spec, SMALL_LIMITS)
    assert image_to_pixels(encode(solid(142, 1, (9, 9, 9)), "JPEG"), spec, SMALL_LIMITS).shape == (1, 3, 32, 32)


# --- preprocessing ------------------------------------------------------------------------------


def expand2square(image: Image.Image, spec: ImageSpec) -> Image.Image:
    """ml-fastvlm's expand2square: the image centred on a square of int(mean * 255)."""
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in spec.image_mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


# Thin, portrait, landscape, odd, one strip and several (64 rows each, 32 for size 32), the image
# starting inside a strip, the square's side under, equal to and over the model's input.
PAD_SHAPES = [(1, 2), (2, 1), (1, 150), (150, 1), (7, 200), (200, 7), (63, 64), (64, 63), (31, 32), (32, 31)]
PAD_SHAPES += [(130, 97), (97, 130), (20, 31), (31, 20), (301, 150), (150, 301), (3, 129), (129, 3)]
PAD_SHAPES += [(100, 37), (37, 100)]
PAD_SHAPES += [(int(w), int(h)) for w, h in np.random.default_rng(9).integers(1, 320, (8, 2))]


# PIL's NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX and HAMMING: any of them a preprocessor_config may name.
@pytest.mark.parametrize("resample", range(6))
@pytest.mark.parametrize("size", [32, 100])
def test_pad_mode_is_bit_identical_to_resizing_the_padded_square(resample: int, size: int) -> None:
    # The square itself goes the plain way (a square image is only resized): the reference.
    for mean in [(0.0, 0.0, 0.0), CLIP_MEAN]:
        spec = ImageSpec(size=size, image_mean=mean, image_std=CLIP_STD, resample=resample, mode=ResizeMode.PAD)
        for seed, (width, height) in enumerate(PAD_SHAPES):
            image = noise(width, height, seed)
            expected = preprocess(expand2square(image, spec), spec)
            assert np.array_equal(preprocess(image, spec), expected), (width, height)


@pytest.mark.parametrize("mode", list(ResizeMode))
@pytest.mark.parametrize(("width", "height"), [(1, 1), (32, 32), (40, 30), (30, 40), (1000, 10), (10, 1000)])
def test_output_shape_and_dtype(mode: ResizeMode, width: int, height: int) -> None:
    spec = ImageSpec(size=32, image_mean=CLIP_MEAN, image_std=CLIP_STD, mode=mode)
    pixels = preprocess(noise(width, height), spec)
    assert pixels.shape == (1, 3, 32, 32)
    assert pixels.dtype == np.float32
    assert pixels.flags["C_CONTIGUOUS"]
    assert np.isfinite(pixels).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_image_to_pixels(fmt: str) -> None:
    pixels = image_to_pixels(encode(noise(50, 20), fmt), FASTVLM_SPEC)
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == np.float32
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0  # mean 0, std 1: just rescaled


def test_preprocess_accepts_non_rgb_images() -> None:
    gray = Image.new("L", (10, 10), 51)
    pixels = preprocess(gray, FASTVLM_SPEC)
    assert np.all(pixels == expected_norm(51, 0.0, 1.0))


def test_pad_black_bars_and_centred_image() -> None:
    # 100x50 landscape -> 100x100 canvas, image on rows 25..74 -> resized to 50: rows 12.5..37.5.
    colour = (200, 100, 50)
    spec = ImageSpec(size=50, mode=ResizeMode.PAD)
    pixels = preprocess(solid(100, 50, colour), spec)[0]
    # FastVLM's mean is 0: the bars are black, exactly (0 - mean) / std = 0.
    for row in (0, 5, 44, 49):
        assert np.all(pixels[:, row, :] == 0.0), row
    for c in range(3):
        assert pixels[c, 25, 25] == expected_norm(colour[c], 0.0, 1.0)
        assert np.all(pixels[c, 16:34, :] == expected_norm(colour[c], 0.0, 1.0))


def test_pad_portrait_bars_left_and_right() -> None:
    colour = (10, 240, 130)
    spec = ImageSpec(size=40, mode=ResizeMode.PAD)
    pixels = preprocess(solid(20, 80, colour), spec)[0]  # image on columns 15..24 of 40
    assert np.all(pixels[:, :, :10] == 0.0)
    assert np.all(pixels[:, :, 30:] == 0.0)
    for c in range(3):
        assert np.all(pixels[c, :, 17:23] == expected_norm(colour[c], 0.0, 1.0))


def test_pad_bars_use_the_mean_colour() -> None:
    # With a CLIP-style mean the canvas is int(mean * 255): after normalizing, the bars are
    # (int(m * 255) / 255 - m) / std, i.e. almost exactly zero.
    spec = ImageSpec(size=50, image_mean=CLIP_MEAN, image_std=CLIP_STD, mode=ResizeMode.PAD)
    pixels = preprocess(solid(100, 50, (255, 255, 255)), spec)[0]
    for c in range(3):
        bar = expected_norm(int(CLIP_MEAN[c] * 255), CLIP_MEAN[c], CLIP_STD[c])
        assert abs(bar) < 1 / 255 / CLIP_STD[c]
        assert np.all(pixels[c, :5, :] == bar)
        assert np.all(pixels[c, 45:, :] == bar)
        assert pixels[c, 25, 25] == expected_norm(255, CLIP_MEAN[c], CLIP_STD[c])


def test_crop_keeps_the_centre() -> None:
    # 90x30: left third red, middle green, right third blue -> shortest edge 30, crop the middle.
    image = solid(90, 30, (255, 0, 0))
    image.paste(solid(30, 30, (0, 255, 0)), (30, 0))
    image.paste(solid(30, 30, (0, 0, 255)), (60, 0))
    pixels = preprocess(image, ImageSpec(size=30, mode=ResizeMode.CROP))[0]
    assert np.all(pixels[1, :, 3:27] == 1.0)
    assert np.all(pixels[0, :, 3:27] == 0.0)
    assert np.all(pixels[2, :, 3:27] == 0.0)


def test_square_pad_and_crop_agree() -> None:
    image = noise(37, 37)
    spec = ImageSpec(size=24, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    pad = preprocess(image, spec)
    crop = preprocess(image, ImageSpec(size=24, image_mean=CLIP_MEAN, image_std=CLIP_STD, mode=ResizeMode.CROP))
    assert np.array_equal(pad, crop)


def test_same_size_square_is_only_rescaled_and_normalized() -> None:
    image = noise(16, 16)
    spec = ImageSpec(size=16, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    pixels = preprocess(image, spec)[0]
    raw = np.asarray(image).astype(np.float64) * (1 / 255)
    expected = (raw.astype(np.float32) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    assert np.array_equal(pixels, expected.transpose(2, 0, 1))


def test_check_image_bytes_is_the_one_pre_decode_check() -> None:
    png = encode(noise(8, 8), "PNG")
    assert check_image_bytes(png) == "image/png"
    assert check_image_bytes(png, declared_mime="image/png") == "image/png"
    with pytest.raises(ImageError, match="declared as 'image/jpeg' but its bytes are image/png"):
        check_image_bytes(png, declared_mime="image/jpeg")
    with pytest.raises(ImageError, match="limit of 10 bytes"):
        check_image_bytes(png, ImageLimits(max_bytes=10))
    with pytest.raises(ImageError, match="empty"):
        check_image_bytes(b"")
