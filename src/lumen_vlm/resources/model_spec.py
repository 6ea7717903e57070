"""Small typed records of facts read from a model's own files.

They are filled once, by the resources layer or the backend, and passed down; nothing
else opens the model's JSON files.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ResizeMode(str, Enum):
    """How a non-square photo becomes the model's square input."""

    PAD = "pad"  # Apple's reference rule: pad to a square with the mean colour, then resize.
    CROP = "crop"  # The HF processor's rule: resize the shortest edge, then centre-crop.


@dataclass(frozen=True)
class ImageSpec:
    """What the vision encoder expects, read from preprocessor_config.json (and the session)."""

    size: int  # square side in pixels
    image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rescale_factor: float = 1.0 / 255.0
    resample: int = 3  # PIL.Image.Resampling code, 3 = BICUBIC
    mode: ResizeMode = ResizeMode.PAD
