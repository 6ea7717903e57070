"""Small typed records of facts read from a model's own files.

They are filled once, by the resources layer or the backend, and passed down; nothing
else opens the model's JSON files.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# The image placeholder token's text, as FastVLM's tokenizers and chat templates spell it.
IMAGE_PLACEHOLDER = "<image>"


class ResizeMode(str, Enum):
    """How a non-square photo becomes the model's square input.

    Which one a model gets by default is read from its files (`model_files.resize_rule`); a
    request's ``resize_mode`` overrides it.
    """

    PAD = "pad"  # Apple's reference rule: pad to a square with the mean colour, then resize.
    CROP = "crop"  # The HF processor's rule: resize the shortest edge, then centre-crop.


@dataclass(frozen=True)
class ImageSpec:
    """What the vision encoder expects, read from the model's files (and checked against its graph)."""

    size: int  # square side in pixels; 0 when no file states it (the vision graph's input shape then does)
    image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rescale_factor: float = 1.0 / 255.0
    resample: int = 3  # PIL.Image.Resampling code, 3 = BICUBIC
    mode: ResizeMode = ResizeMode.PAD
    patch_size: int | None = None  # pixels per image token along a side; None when no file states it

    def tokens_for(self, size: int) -> int | None:
        """Image tokens a `size`-pixel square gives, when the patch size is known."""
        return (size // self.patch_size) ** 2 if self.patch_size else None


@dataclass(frozen=True)
class KVCacheSpec:
    """The KV cache's shape as a Lumen ``model_info.json`` states it (``kv_cache_config``)."""

    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
