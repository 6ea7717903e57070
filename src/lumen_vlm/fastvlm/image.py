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
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

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
    "image_limits",
    "image_to_pixels",
    "load_image",
    "preprocess",
    "sniff_image_mime",
]


@dataclass(frozen=True)
class ImageLimits:
    """Sizes above which an image is refused.

    `max_bytes` and `max_pixels` are checked before decoding. `max_work_pixels` bounds the
    intermediate image `preprocess` builds (the square canvas in PAD mode, the shortest-edge
    resize in CROP mode): both grow with the aspect ratio, so a small but extremely thin image
    would otherwise need gigabytes.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_work_pixels: int = 150_000_000


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
# The plugins Image.open may try; MPO is reached through the JPEG plugin.
_OPEN_FORMATS = ("JPEG", "PNG", "WEBP")

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


def load_image(data: bytes, limits: ImageLimits = _DEFAULT_LIMITS) -> Image.Image:
    """Decode untrusted image bytes into an upright RGB image.

    Raises `ImageError` for what `check_image_bytes` refuses, images with more than
    `limits.max_pixels` pixels (checked from the header alone), and files that are corrupt or
    truncated. Animated images give their first frame.
    """
    mime = check_image_bytes(data, limits)

    try:
        # PIL itself raises DecompressionBombError past 2x its MAX_IMAGE_PIXELS (and only warns
        # below that); our own max_pixels check, made from the header, is the real bound. No
        # warnings filter is changed: that would be process-wide and racy under threads.
        with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as img:
            # Image.open has read the header only: refuse absurd sizes before decoding.
            if img.format not in _PIL_FORMATS[mime]:
                raise ImageError(
                    f"image content ({img.format}) does not match its signature ({mime}); "
                    "only JPEG, PNG and WebP are accepted"
                )
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageError(f"image has an empty size ({width}x{height})")
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, "
                    f"more than the limit of {limits.max_pixels} pixels"
                )
            # Image.open leaves an animated image on its first frame, and load() decodes
            # only the current frame: animated images give their first frame.
            img.load()  # full decode: truncated or corrupt data fails here
            upright = ImageOps.exif_transpose(img)  # a new image, detached from the file
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is too large to decode safely: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError(f"cannot read the {_name(mime)} image: its header is not valid") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"cannot decode the {_name(mime)} image, it is corrupt or truncated ({exc})") from exc

    # Exactly what Apple's ml-fastvlm reference does (`Image.open(...).convert("RGB")`):
    # transparency is dropped as PIL's convert drops it (RGBA/LA keep their colour channels,
    # palette images take their palette colours), with no compositing over black or white.
    # (transformers' convert_to_rgb composites over white instead; we follow the model's
    # reference.)
    if upright.mode == "RGB":
        return upright
    try:
        return upright.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise ImageError(f"cannot convert the {_name(mime)} image to RGB ({exc})") from exc


def preprocess(image: Image.Image, spec: ImageSpec, limits: ImageLimits = _DEFAULT_LIMITS) -> np.ndarray:
    """The encoder input for `image`: C-contiguous float32 `[1, 3, spec.size, spec.size]`.

    PAD (Apple's ml-fastvlm): pad to a square with the mean colour, centred (`expand2square`),
    then the CROP steps, which on a square image are a plain resize.
    CROP (transformers' CLIPImageProcessor, PIL backend): resize so the shortest edge is
    `spec.size`, centre-crop, rescale, normalize. Results are bit-identical to
    `CLIPImageProcessorPil` on the same (padded) image.

    Raises `ImageError` if the aspect ratio is so extreme that the intermediate image would
    exceed `limits.max_work_pixels`.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    size = spec.size
    width, height = image.size

    if spec.mode == ResizeMode.PAD:
        side = max(width, height)
        _check_work_pixels(width, height, side * side, limits)
        if width != height:
            # ml-fastvlm's expand2square, with background tuple(int(x * 255) for x in image_mean).
            background = tuple(int(m * 255) for m in spec.image_mean)
            canvas = Image.new("RGB", (side, side), background)
            canvas.paste(image, ((side - width) // 2, (side - height) // 2))
            image = canvas
            width = height = side
    elif spec.mode != ResizeMode.CROP:
        raise ValueError(f"unknown resize mode {spec.mode!r}")

    # transformers' get_resize_output_image_size(default_to_square=False): the short side
    # becomes `size`, the long side int(size * long / short) (truncated, not rounded).
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    _check_work_pixels(width, height, new_width * new_height, limits)
    resized = image.resize((new_width, new_height), resample=spec.resample)
    pixels = np.asarray(resized)  # HWC uint8

    # transformers' center_crop: offsets floor((orig - crop) / 2). The short side already
    # equals `size`, so the crop never needs padding.
    top = (new_height - size) // 2
    left = (new_width - size) // 2
    pixels = pixels[top : top + size, left : left + size]

    # transformers' rescale: upcast to float64, multiply, downcast to float32.
    scaled = (pixels.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    # transformers' normalize: float32 throughout, (x - mean) / std per channel.
    mean = np.asarray(spec.image_mean, dtype=np.float32)
    std = np.asarray(spec.image_std, dtype=np.float32)
    normalized = (scaled - mean) / std

    return np.ascontiguousarray(normalized.transpose(2, 0, 1)[np.newaxis], dtype=np.float32)


def image_to_pixels(data: bytes, spec: ImageSpec, limits: ImageLimits = _DEFAULT_LIMITS) -> np.ndarray:
    """`load_image` then `preprocess`: untrusted bytes to the encoder's float32 `[1, 3, S, S]`."""
    return preprocess(load_image(data, limits), spec, limits)


def _check_work_pixels(width: int, height: int, work_pixels: int, limits: ImageLimits) -> None:
    if work_pixels > limits.max_work_pixels:
        raise ImageError(
            f"image aspect ratio {width}x{height} is too extreme: preprocessing it would need "
            f"{work_pixels} pixels, more than the limit of {limits.max_work_pixels} pixels"
        )


def _name(mime: str) -> str:
    return {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WebP"}[mime]
