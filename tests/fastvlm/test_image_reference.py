"""`preprocess` against the reference pipelines, to within 1e-6 (in practice bit-identical).

CROP: transformers' CLIPImageProcessor (PIL backend).
PAD: Apple's ml-fastvlm `expand2square` with the mean colour, then the same processor.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lumen_vlm.fastvlm.image import image_to_pixels, preprocess
from lumen_vlm.resources.model_spec import ImageSpec, ResizeMode
from tools.make_test_model import import_reference_stack

pytestmark = pytest.mark.reference

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMS = {
    "fastvlm": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # FastVLM's preprocessor_config
    "clip": (CLIP_MEAN, CLIP_STD),
}
ATOL = 1e-6  # the observed difference is exactly 0: same PIL calls, same numpy dtypes

SHAPES = [(64, 64), (333, 517), (517, 333), (257, 255), (1, 1), (3, 700), (1000, 10), (1500, 999)]


def _clip_processor_class():
    import_reference_stack()
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil


@pytest.fixture(scope="module")
def processor_class():
    return _clip_processor_class()


def reference(processor_class, image: Image.Image, spec: ImageSpec) -> np.ndarray:
    if spec.mode == ResizeMode.PAD:
        image = expand2square(image, tuple(int(x * 255) for x in spec.image_mean))
    processor = processor_class(
        size={"shortest_edge": spec.size},
        crop_size={"height": spec.size, "width": spec.size},
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
        resample=spec.resample,
    )
    return processor(image, return_tensors="np")["pixel_values"]


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """As in apple/ml-fastvlm llava/mm_utils.py."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth(width: int, height: int) -> Image.Image:
    """Gradients, which bicubic resampling treats differently from noise (less clipping)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def assert_matches(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ref.shape == ours.shape
    assert ref.dtype == ours.dtype == np.float32
    diff = float(np.abs(ours - ref).max())
    assert diff <= ATOL, diff
    return diff


@pytest.mark.parametrize("mode", list(ResizeMode))
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize(("width", "height"), SHAPES)
def test_matches_reference(processor_class, mode, norm, size, width, height) -> None:
    mean, std = NORMS[norm]
    spec = ImageSpec(size=size, image_mean=mean, image_std=std, mode=mode)
    for image in (noise(width, height, seed=width * 7 + height), smooth(width, height)):
        assert_matches(preprocess(image, spec), reference(processor_class, image, spec))


@pytest.mark.parametrize("mode", list(ResizeMode))
@pytest.mark.parametrize(("width", "height"), [(1024, 1024), (1600, 1200), (900, 1333), (511, 513)])
def test_matches_reference_at_fastvlm_size(processor_class, mode, width, height) -> None:
    spec = ImageSpec(size=1024, mode=mode)
    image = noise(width, height, seed=width + height)
    assert_matches(preprocess(image, spec), reference(processor_class, image, spec))


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.LANCZOS])
def test_matches_reference_with_other_resample(processor_class, resample) -> None:
    for mode in ResizeMode:
        spec = ImageSpec(size=96, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=int(resample), mode=mode)
        image = noise(301, 157, seed=5)
        assert_matches(preprocess(image, spec), reference(processor_class, image, spec))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_bytes_match_apples_pipeline(processor_class, fmt) -> None:
    # ml-fastvlm: Image.open(...).convert("RGB"), expand2square, CLIP processor.
    buf = io.BytesIO()
    smooth(320, 200).save(buf, fmt)
    data = buf.getvalue()
    spec = ImageSpec(size=128, mode=ResizeMode.PAD)
    with Image.open(io.BytesIO(data)) as opened:
        decoded = opened.convert("RGB")
    assert_matches(image_to_pixels(data, spec), reference(processor_class, decoded, spec))
