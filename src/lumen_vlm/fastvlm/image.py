"""Image bytes -> the vision encoder's pixel array.

Three steps, each usable on its own:

* `check_image_bytes` makes the checks that need no decoding (size, signature, declared type);
  the request parser runs it before admission, `load_image` runs it first.
* `load_image` turns untrusted bytes into an RGB `PIL.Image.Image`, refusing anything that is
  not a JPEG, PNG or WebP, anything absurdly large (checked from the header, before decoding)
  and anything PIL cannot fully decode. Every refusal is an `ImageError`.
* `preprocess` turns an RGB image into the float32 `[1, 3, size, size]` array the encoder
  takes, bit for bit as the reference pipelines do (see `ResizeMode`).
* `image_to_pixels` is both in one call.

Memory: one rule bounds what an image may cost, `max_image_pixels` (`ImageLimits.max_pixels`).
The decoded image and every image preprocessing makes from it may each have at most that many
pixels; the model's own `size x size` input is always allowed. `check_image_size` applies it
from the header, before anything is decoded. In pad mode the padded square is never made: it is
resized in strips of rows (see `_pad_and_resize`), so what grows with the aspect ratio is the
resize temporary, `size` pixels wide and as tall as the square's side. The strips do still read
every padded row that holds the image, for a portrait image the whole square: that read may be
twice as large (`_READ_ALLOWANCE`), which bounds the time a thin portrait image costs. Without
these bounds a tiny, thin image (an 86-byte 1x1464 PNG) would cost gigabytes.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from ..resources.model_spec import ImageSpec, ResizeMode
from ..resources.settings import GenerationLimits
from ..text import shown
from .exceptions import ImageError

__all__ = [
    "IMAGE_MIMES",
    "ImageLimits",
    "check_image_bytes",
    "check_image_size",
    "image_limits",
    "image_to_pixels",
    "load_image",
    "preprocess",
    "sniff_image_mime",
]


@dataclass(frozen=True)
class ImageLimits:
    """Sizes above which an image is refused, both checked before decoding.

    `max_bytes` is the settings' `max_payload_bytes`. `max_pixels` is `max_image_pixels`: it
    bounds the decoded image and each image preprocessing makes from it (see `check_image_size`).
    """

    max_bytes: int = GenerationLimits.max_payload_bytes
    max_pixels: int = GenerationLimits.max_image_pixels


_DEFAULT_LIMITS = ImageLimits()


def image_limits(limits: GenerationLimits) -> ImageLimits:
    """The image limits the settings set: what the model manager decodes under, and what the
    service checks before admission and advertises."""
    return ImageLimits(max_bytes=limits.max_payload_bytes, max_pixels=limits.max_image_pixels)


# MIME type -> the formats PIL may report for it. Pillow opens a JPEG that carries a
# multi-picture index (common from phone cameras) as "MPO"; its first frame is the JPEG.
_PIL_FORMATS: dict[str, frozenset[str]] = {
    "image/jpeg": frozenset({"JPEG", "MPO"}),
    "image/png": frozenset({"PNG"}),
    "image/webp": frozenset({"WEBP"}),
}
IMAGE_MIMES = tuple(_PIL_FORMATS)  # what requests may send, and capabilities advertise
# MIME type -> the plugin that opens it; MPO is reached through the JPEG plugin.
_PLUGINS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
_OPEN_FORMATS = tuple(_PLUGINS.values())  # the plugins Image.open may try

# Errors PIL (and the zlib / struct code under it) raises on malformed input.
# UnidentifiedImageError is an OSError; DecompressionBombError is an Exception of its own.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
    zlib.error,
)


def sniff_image_mime(data: bytes) -> str | None:
    """The MIME type named by `data`'s magic bytes: JPEG, PNG or WebP, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_image_bytes(data: bytes, limits: ImageLimits = _DEFAULT_LIMITS, declared_mime: str = "") -> str:
    """The image's MIME type by its signature, after the checks that need no decoding.

    Raises `ImageError` for empty data, more than `limits.max_bytes` bytes, a signature that is
    not JPEG, PNG or WebP, and a signature that disagrees with `declared_mime` (one of
    `IMAGE_MIMES`, or "" when the sender declared none).
    """
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, more than the limit of {limits.max_bytes} bytes")
    mime = sniff_image_mime(data)
    if mime is None:
        said = f" (it is declared as {shown(declared_mime)})" if declared_mime else ""
        raise ImageError(f"unsupported image format: only JPEG, PNG and WebP are accepted{said}")
    if declared_mime and declared_mime != mime:
        raise ImageError(f"the image is declared as {shown(declared_mime)} but its bytes are {mime}")
    return mime


def check_image_size(
    width: int, height: int, limits: ImageLimits = _DEFAULT_LIMITS, spec: ImageSpec | None = None
) -> None:
    """Refuse, from its size alone, an image too large to decode or (given the `spec` it will be
    preprocessed for) to preprocess. This is the one memory rule, see the module's docstring.

    Raises `ImageError` for an empty size, more than `limits.max_pixels` pixels, and an image
    whose preprocessing would make one with more than `max(limits.max_pixels, spec.size ** 2)`
    pixels, or (pad mode) read a padded square with more than `_READ_ALLOWANCE` times that.
    """
    if width <= 0 or height <= 0:
        raise ImageError(f"image has an empty size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, "
            f"more than the limit of max_image_pixels = {limits.max_pixels} pixels"
        )
    if spec is None:
        return
    # The model's own input is always allowed, even under a max_image_pixels set below it.
    bound = max(limits.max_pixels, spec.size * spec.size)
    for work in _intermediate_images(width, height, spec):
        allowed = bound * _READ_ALLOWANCE if work.read_only else bound
        if work.pixels > allowed:
            raise ImageError(
                f"image {width}x{height} has too extreme an aspect ratio for {spec.mode.value} mode: preprocessing "
                f"it would {'read' if work.read_only else 'need'} a {work.width}x{work.height} {work.name} = "
                f"{work.pixels} pixels, more than the limit of {_limit_text(limits, spec, work.read_only)}"
            )


def _limit_text(limits: ImageLimits, spec: ImageSpec, read_only: bool) -> str:
    """The limit `check_image_size` holds a made (or, `read_only`, a read) image to, in words
    that always give max_image_pixels' value."""
    setting = f"max_image_pixels = {limits.max_pixels} pixels"
    model_input = spec.size * spec.size
    if read_only and model_input > limits.max_pixels:
        return (
            f"{_READ_ALLOWANCE * model_input} pixels (it may read {_READ_ALLOWANCE} x the model's "
            f"{spec.size}x{spec.size} input; {setting} is lower)"
        )
    if read_only:
        return f"{_READ_ALLOWANCE * limits.max_pixels} pixels (it may read {_READ_ALLOWANCE} x {setting})"
    if model_input > limits.max_pixels:
        return f"{model_input} pixels (the model's {spec.size}x{spec.size} input; {setting} is lower)"
    return setting


def load_image(data: bytes, limits: ImageLimits = _DEFAULT_LIMITS, spec: ImageSpec | None = None) -> Image.Image:
    """Decode untrusted image bytes into an upright RGB image.

    Raises `ImageError` for what `check_image_bytes` refuses, images `check_image_size` refuses
    (checked from the header alone, with `spec` when given), and files that are corrupt or
    truncated. Animated images give their first frame.
    """
    mime = check_image_bytes(data, limits)

    try:
        # PIL itself raises DecompressionBombError past 2x its MAX_IMAGE_PIXELS (and only warns
        # below that); our own check, made from the header, is the real bound. Neither PIL's
        # limit nor a warnings filter is changed: both are process-wide and racy under threads.
        # Never closed: its file is only our bytes in memory, and keeping the pixels past a
        # close would take a copy as large as the decoded image.
        img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
        # Image.open has read the header only: refuse absurd sizes before decoding.
        if img.format not in _PIL_FORMATS[mime]:
            raise ImageError(
                f"image content ({img.format}) does not match its signature ({mime}); "
                "only JPEG, PNG and WebP are accepted"
            )
        # The EXIF orientation applied below may swap width and height. That changes only pad
        # mode's read bound (a portrait image reads its whole padded square), and `preprocess`
        # checks the upright image again before it makes anything: such an image costs at most
        # its decoding, which max_image_pixels bounds.
        check_image_size(*img.size, limits, spec)
        # Image.open leaves an animated image on its first frame, and load() decodes only the
        # current frame: animated images give their first frame.
        img.load()  # full decode: truncated or corrupt data fails here
        ImageOps.exif_transpose(img, in_place=True)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb_error(data, mime, limits, spec, exc) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError(f"cannot read the {_name(mime)} image: its header is not valid") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"cannot decode the {_name(mime)} image, it is corrupt or truncated ({exc})") from exc

    # Exactly what Apple's ml-fastvlm reference does (`Image.open(...).convert("RGB")`):
    # transparency is dropped as PIL's convert drops it (RGBA/LA keep their colour channels,
    # palette images take their palette colours), with no compositing over black or white.
    # (transformers' convert_to_rgb composites over white instead; we follow the model's
    # reference.)
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise ImageError(f"cannot convert the {_name(mime)} image to RGB ({exc})") from exc


def preprocess(image: Image.Image, spec: ImageSpec, limits: ImageLimits = _DEFAULT_LIMITS) -> np.ndarray:
    """The encoder input for `image`: C-contiguous float32 `[1, 3, spec.size, spec.size]`.

    PAD (Apple's ml-fastvlm): pad to a square with the mean colour, centred (`expand2square`),
    then the CROP steps, which on a square image are a plain resize.
    CROP (transformers' CLIPImageProcessor, PIL backend): resize so the shortest edge is
    `spec.size`, centre-crop, rescale, normalize. Results are bit-identical to
    `CLIPImageProcessorPil` on the same (padded) image.

    Raises `ImageError` for an image `check_image_size` refuses (an aspect ratio so extreme
    that an image made on the way would be too large), before allocating anything.
    """
    if spec.mode not in (ResizeMode.PAD, ResizeMode.CROP):
        raise ValueError(f"unknown resize mode {spec.mode!r}")
    check_image_size(*image.size, limits, spec)
    if image.mode != "RGB":
        image = image.convert("RGB")
    pixels = _resized_centre(image, spec)  # HWC uint8; the larger images made for it are freed

    # transformers' rescale: upcast to float64, multiply, downcast to float32.
    scaled = (pixels.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    # transformers' normalize: float32 throughout, (x - mean) / std per channel.
    mean = np.asarray(spec.image_mean, dtype=np.float32)
    std = np.asarray(spec.image_std, dtype=np.float32)
    normalized = (scaled - mean) / std

    return np.ascontiguousarray(normalized.transpose(2, 0, 1)[np.newaxis], dtype=np.float32)


def image_to_pixels(data: bytes, spec: ImageSpec, limits: ImageLimits = _DEFAULT_LIMITS) -> np.ndarray:
    """`load_image` then `preprocess`: untrusted bytes to the encoder's float32 `[1, 3, S, S]`.

    The preprocessing for `spec` is checked from the header, before the image is decoded."""
    return preprocess(load_image(data, limits, spec), spec, limits)


def _resized_centre(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """The `spec.size` square centre of the resized (in PAD mode first padded) RGB image, as
    HWC uint8. The larger images made on the way die when this returns."""
    size = spec.size
    width, height = image.size
    if spec.mode == ResizeMode.PAD and width != height:
        return np.asarray(_pad_and_resize(image, spec))

    new_width, new_height = _shortest_edge_size(width, height, size)
    resized = image.resize((new_width, new_height), resample=spec.resample)
    # transformers' center_crop: offsets floor((orig - crop) / 2). The short side already
    # equals `size`, so the crop never needs padding. Cropped in PIL, so that only the
    # centre is copied into numpy, not the whole (in CROP mode, long) resized image.
    top = (new_height - size) // 2
    left = (new_width - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def _pad_and_resize(image: Image.Image, spec: ImageSpec) -> Image.Image:
    """ml-fastvlm's expand2square (the image centred on a square of the mean colour), resized to
    `spec.size x spec.size`: bit for bit `square.resize((size, size))`, without the square.

    Pillow resizes in two passes: a horizontal one into an 8-bit temporary `size` pixels wide
    and as tall as the input, then a vertical one. The horizontal pass treats each row on its
    own, so it is made here for the square's rows that hold the image a strip at a time (each
    strip resized alone, its height unchanged: a horizontal pass only), and for its rows of
    background alone once (they are all the same). The vertical pass is Pillow's own, on the
    stacked temporary. The largest image made is that temporary, `size x side` pixels.
    """
    size, resample = spec.size, spec.resample
    width, height = image.size
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    # ml-fastvlm's background: tuple(int(x * 255) for x in image_mean).
    background = tuple(int(m * 255) for m in spec.image_mean)
    rows = _strip_rows(size)
    temporary = Image.new("RGB", (size, side))
    if height < side:  # a landscape image: rows of background alone above and below it
        row = Image.new("RGB", (side, 1), background).resize((size, 1), resample)
        block = Image.new("RGB", (size, rows))
        for y in range(rows):
            block.paste(row, (0, y))
        for y in range(0, side, rows):  # everywhere; the image's rows are overwritten below
            temporary.paste(block, (0, y))  # Pillow clips the last one at the bottom edge
    for y in range(top, top + height, rows):
        strip = Image.new("RGB", (side, min(rows, top + height - y)), background)
        strip.paste(image, (left, top - y))  # only the image rows inside the strip are copied
        temporary.paste(strip.resize((size, strip.height), resample), (0, y))
    return temporary.resize((size, size), resample)


def _shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False): the short side
    becomes `size`, the long side int(size * long / short) (truncated, not rounded)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


# Rows of the padded square pad mode resizes at once (fewer for a model input under 64 pixels, so
# that a strip is never larger than the resize temporary).
_STRIP_ROWS = 64
# Pad mode's strips read every padded row that holds the image: a portrait image's whole square.
# That read may have this many times max_image_pixels: twice, so that every image within
# max_image_pixels up to 2:1 is accepted in either orientation (a 50 M-pixel 2:1 portrait image
# reads a 100 M-pixel square, about a second), while a thin portrait image cannot keep a core
# busy for long (Pillow's horizontal pass takes ~10 ns a pixel read: the 2.4 G-pixel square of a
# 1x48828 image would take half a minute).
_READ_ALLOWANCE = 2


class _WorkImage(NamedTuple):
    """An image `preprocess` makes (or, `read_only`, only reads in strips) on the way to the
    encoder's input."""

    name: str
    width: int
    height: int
    read_only: bool = False

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _strip_rows(size: int) -> int:
    """How many rows of the padded square `_pad_and_resize` resizes at once for a `size` input."""
    return min(_STRIP_ROWS, size)


def _intermediate_images(width: int, height: int, spec: ImageSpec) -> list[_WorkImage]:
    """The images `preprocess` makes, or reads, from a `width x height` image for `spec`."""
    size = spec.size
    if spec.mode == ResizeMode.PAD and width != height:
        side = max(width, height)  # see _pad_and_resize
        # Every row of a portrait image's square holds image pixels: the strips read it whole.
        # (A landscape image's strips read its own rows, and one row of background.)
        read = [_WorkImage("padded square", side, side, read_only=True)] if height > width else []
        return [
            *read,
            _WorkImage("strip of the padded square", side, min(_strip_rows(size), height)),
            _WorkImage("resize temporary", size, side),
            _WorkImage("resized image", size, size),
        ]
    images: list[_WorkImage] = []
    new_width, new_height = _shortest_edge_size(width, height, size)
    if new_width != width and new_height != height:
        # Pillow resizes in two passes, the horizontal one first, into a temporary of at most
        # new_width x height (only the rows the vertical pass reads).
        images.append(_WorkImage("resize temporary", new_width, height))
    images.append(_WorkImage("resized image", new_width, new_height))
    return images


def _bomb_error(
    data: bytes, mime: str, limits: ImageLimits, spec: ImageSpec | None, exc: Image.DecompressionBombError
) -> ImageError:
    """Our refusal of an image that PIL's own bomb check refused inside Image.open, before we saw its size.

    The header is read again by the format's plugin alone, which makes no bomb check, so that
    the message gives the image's size and our limit, like `check_image_size`'s.
    """
    Image.init()  # Image.open has registered every plugin already; this makes it certain
    factory, _accept = Image.OPEN[_PLUGINS[mime]]
    with factory(io.BytesIO(data), "") as header:
        width, height = header.size
    try:
        check_image_size(width, height, limits, spec)
    except ImageError as ours:
        return ours
    # Only when max_image_pixels is set above PIL's own limit.
    return ImageError(
        f"image is {width}x{height} = {width * height} pixels, too large to decode safely: max_image_pixels = "
        f"{limits.max_pixels} allows it, but the decoder does not ({exc})"
    )


def _name(mime: str) -> str:
    return {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WebP"}[mime]
