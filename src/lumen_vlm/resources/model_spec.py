"""The model spec: one frozen record of what a model's files and graphs state, read once at load.

Two readers each return their part, and nothing else reads either source:

- `model_files.read_file_spec` reads the JSON files into a `FileSpec` (the tokens, the chat
  template, the context, the image preprocessing, a Lumen ``kv_cache_config``);
- the runtime (`backends/`), the only one that opens the graphs, reads their inputs and outputs
  into a `GraphSpec` (the vision input's size and token count, the decoder's shape).

`model_spec(files, graphs)` joins them into the `ModelSpec` everyone else reads, after checking
that they describe one model. Consumers read `spec.text`, `spec.image` and `spec.decoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

from .exceptions import ModelFilesError

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
    """What the vision encoder expects: the image preprocessing, its square side and token count."""

    size: int  # square side in pixels; in a FileSpec 0 when no file states it (the vision graph's then does)
    image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rescale_factor: float = 1.0 / 255.0
    resample: int = 3  # PIL.Image.Resampling code, 3 = BICUBIC
    mode: ResizeMode = ResizeMode.PAD
    patch_size: int | None = None  # pixels per image token along a side; None when no file states it
    # Features per image: the vision graph's output, else (size / patch_size)^2; None when neither
    # says (a FileSpec's is always None: `model_spec` settles it).
    tokens: int | None = None

    def tokens_for(self, size: int) -> int | None:
        """Image tokens a `size`-pixel square gives, when the patch size is known."""
        return (size // self.patch_size) ** 2 if self.patch_size else None


@dataclass(frozen=True)
class TextSpec:
    """The language side: special tokens, the chat template and the context."""

    image_token_id: int
    eos_token_ids: frozenset[int]
    chat_template: str
    context_length: int  # positions the decoder was trained for
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... for templates


@dataclass(frozen=True)
class DecoderSpec:
    """The decoder's shape, as its graph (and the embedding graph) declare it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class KVCacheSpec:
    """The KV cache's shape as a Lumen ``model_info.json`` states it (``kv_cache_config``); only
    checked against the decoder graph's."""

    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int


@dataclass(frozen=True)
class FileSpec:
    """What the model's JSON files state (`model_files.read_file_spec`)."""

    model_id: str
    text: TextSpec
    image: ImageSpec
    kv_cache: KVCacheSpec | None = None  # a Lumen model_info.json's kv_cache_config, to check the decoder by


@dataclass(frozen=True)
class GraphSpec:
    """What the graphs' inputs and outputs state (the runtime reads them; see `BaseFastVLMBackend`)."""

    image_size: int  # the vision encoder's square input side, 0 when the graph leaves it dynamic
    image_tokens: int | None  # features per image, None when the graph leaves it dynamic
    decoder: DecoderSpec


@dataclass(frozen=True)
class ModelSpec:
    """Everything known about the loaded model, from its files and graphs together."""

    model_id: str
    text: TextSpec
    image: ImageSpec  # its size and tokens settled against the vision graph
    decoder: DecoderSpec


def model_spec(files: FileSpec, graphs: GraphSpec) -> ModelSpec:
    """The one spec, once the files and the graphs are known to describe one model.

    ModelFilesError where they contradict each other: the graphs are what runs, so a file that
    disagrees may describe another model (its image token, eos ids or context too).
    """
    _check_kv_cache(files.kv_cache, graphs.decoder)
    return ModelSpec(files.model_id, files.text, _settled_image(files.image, graphs), graphs.decoder)


def _settled_image(stated: ImageSpec, graphs: GraphSpec) -> ImageSpec:
    """The image spec the files state, with the size and token count settled against the vision graph.

    The graph's input shape is what the encoder accepts; where it leaves the size dynamic, the
    files' size (preprocessor_config.json, or model_info.json's vision_config) is used.
    """
    if graphs.image_size and stated.size and graphs.image_size != stated.size:
        raise ModelFilesError(
            f"the vision encoder graph takes {graphs.image_size}-pixel images, but the model's files state "
            f"{stated.size} (preprocessor_config.json or model_info.json's vision_config.image_size)"
        )
    size = graphs.image_size or stated.size
    if not size:
        raise ModelFilesError(
            "no image size: the vision encoder graph's input leaves it dynamic, and neither "
            "preprocessor_config.json nor model_info.json's extra_metadata.vision_config.image_size states it"
        )
    stated_tokens = stated.tokens_for(size)
    if graphs.image_tokens and stated_tokens and graphs.image_tokens != stated_tokens:
        raise ModelFilesError(
            f"the vision encoder graph gives {graphs.image_tokens} image tokens, but model_info.json's "
            f"vision_config (image_size {size}, patch_size {stated.patch_size}) means {stated_tokens}"
        )
    return replace(stated, size=size, tokens=graphs.image_tokens or stated_tokens)


def _check_kv_cache(stated: KVCacheSpec | None, decoder: DecoderSpec) -> None:
    """Refuse a model_info.json kv_cache_config that contradicts the decoder graph."""
    if stated is None:
        return
    for key, stated_value, graph_value in (
        ("num_hidden_layers", stated.num_hidden_layers, decoder.num_layers),
        ("num_key_value_heads", stated.num_key_value_heads, decoder.num_kv_heads),
        ("head_dim", stated.head_dim, decoder.head_dim),
    ):
        if stated_value != graph_value:
            raise ModelFilesError(
                f"model_info.json's kv_cache_config.{key} is {stated_value}, but the decoder graph's "
                f"is {graph_value}: the metadata and the graphs are not of one model"
            )
