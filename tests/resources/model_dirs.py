"""Model directories built from the committed tiny FastVLM, in the layouts the published files use.

* `lumen_model`: what lumen-resources downloads from a LumilioPhotos repo: ``model_info.json``
  (with the ``extra_metadata`` upstream lumen-vlm reads), ``onnx/{vision,embed,decoder}.PRECISION.onnx``
  and the tokenizer files, and no other config file.
* `community_model`: the onnx-community export's shape: the model config says
  ``image_aspect_ratio: pad``, the preprocessor resizes and centre-crops, and the generation
  config lists a single eos id.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx
from lumen_resources.model_info import ModelInfo

from tests.conftest import TINY_MODEL

COMMUNITY_NAMES = {"vision": "vision_encoder", "embed": "embed_tokens", "decoder": "decoder_model_merged"}
# Below the config's max_position_embeddings (1024), as the real tokenizer's 8192 is below 32768.
TOKENIZER_MAX_LENGTH = 512


def tiny_json(name: str) -> dict[str, Any]:
    return json.loads((TINY_MODEL / name).read_text(encoding="utf-8"))


def tiny_graph(graph: str) -> Path:
    return TINY_MODEL / "onnx" / f"{COMMUNITY_NAMES[graph]}.onnx"


def lumen_model_info(files: list[str]) -> dict[str, Any]:
    """A model_info.json shaped like a LumilioPhotos FastVLM one, with the tiny model's facts."""
    config, generation = tiny_json("config.json"), tiny_json("generation_config.json")
    text = config["text_config"]
    info = {
        "name": "FastVLM-tiny",
        "version": "1.0.0",
        "description": "tiny random-weight FastVLM in the Lumen layout",
        "model_type": "fastvlm",
        "source": {"format": "huggingface", "repo_id": "apple/FastVLM-0.5B"},
        "runtimes": {"onnx": {"available": True, "files": files}},
        "extra_metadata": {
            # The keys upstream lumen-vlm's GenerationConfig / KVCacheConfig / VisionConfig require.
            "generation_config": {
                "bos_token_id": text["bos_token_id"],
                "eos_token_id": text["eos_token_id"],  # one id, as upstream reads it
                "pad_token_id": generation["pad_token_id"],
                "image_token_index": config["image_token_index"],
                "vocab_size": text["vocab_size"],
                "max_position_embeddings": text["max_position_embeddings"],
            },
            "kv_cache_config": {
                "num_hidden_layers": text["num_hidden_layers"],
                "num_attention_heads": text["num_attention_heads"],
                "num_key_value_heads": text["num_key_value_heads"],
                "hidden_size": text["hidden_size"],
                "head_dim": text["head_dim"],
            },
            "vision_config": {"image_size": 256, "patch_size": 64, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        },
        "metadata": {"license": "Apple", "author": "Lumilio Photos", "created_at": "2025-10-16"},
    }
    ModelInfo.model_validate(info)  # what lumen-resources' Downloader checks it against
    return info


def lumen_model(target: Path, names: dict[str, str] | None = None, dynamic_vision: bool = False) -> Path:
    """The tiny model re-laid as a Lumen model; `names` maps a graph to its file name under onnx/
    (default ``{graph}.fp32.onnx``)."""
    names = {graph: f"{graph}.fp32.onnx" for graph in COMMUNITY_NAMES} | (names or {})
    (target / "onnx").mkdir(parents=True)
    shutil.copy(TINY_MODEL / "tokenizer.json", target / "tokenizer.json")
    tokenizer_config = tiny_json("tokenizer_config.json") | {"model_max_length": TOKENIZER_MAX_LENGTH}
    write_json(target / "tokenizer_config.json", tokenizer_config)
    for graph, name in names.items():
        shutil.copy(tiny_graph(graph), target / "onnx" / name)
    if dynamic_vision:
        make_vision_input_dynamic(target / "onnx" / names["vision"])
    write_json(target / "model_info.json", lumen_model_info([f"onnx/{name}" for name in names.values()]))
    return target


def community_model(target: Path, aspect_ratio: str | None = "pad") -> Path:
    """The tiny model with the onnx-community export's configs; `aspect_ratio` None leaves it out."""
    shutil.copytree(TINY_MODEL, target)
    config = tiny_json("config.json")
    if aspect_ratio is not None:
        config["image_aspect_ratio"] = aspect_ratio
    write_json(target / "config.json", config)
    write_json(target / "generation_config.json", tiny_json("generation_config.json") | {"eos_token_id": 4002})
    return target


def make_vision_input_dynamic(path: Path) -> None:
    """Rewrite a vision encoder so its input states no image size: [batch, 3, height, width]."""
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    onnx.save(model, str(path))


def edit_json(path: Path, change: Any) -> None:
    """Apply `change` (a function of the parsed document) to a JSON file in place."""
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    write_json(path, data)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
