"""Find a model's files on disk and read the facts they state.

Two layouts are understood:

* onnx-community (the public FastVLM export): ``config.json``, ``generation_config.json``,
  ``preprocessor_config.json``, ``tokenizer.json``, ``tokenizer_config.json`` and
  ``onnx/{vision_encoder,embed_tokens,decoder_model_merged}[_PRECISION].onnx``;
* Lumen: ``model_info.json`` (its ``extra_metadata`` may carry the config, generation and
  vision facts) + ``onnx/{vision,embed,decoder}.PRECISION.onnx`` + the tokenizer files.

Only this module opens a model's JSON files; everything else receives `ModelFacts`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .exceptions import ModelFilesError
from .model_spec import ImageSpec, ResizeMode

PRECISIONS = ("fp32", "fp16", "int8", "uint8", "q4", "q4f16", "bnb4", "quantized")
GRAPHS = ("vision", "embed", "decoder")
_COMMUNITY_NAMES = {"vision": "vision_encoder", "embed": "embed_tokens", "decoder": "decoder_model_merged"}
DEFAULT_CONTEXT_LENGTH = 32768


@dataclass(frozen=True)
class ModelFiles:
    """The files one loaded model uses, in one precision."""

    root: Path
    layout: str  # "onnx-community" or "lumen"
    precision: str  # the decoder's precision
    graphs: dict[str, Path]  # "vision" / "embed" / "decoder" -> .onnx file
    graph_precisions: dict[str, str]  # the precision each graph was actually found in
    tokenizer: Path


@dataclass(frozen=True)
class ModelFacts:
    """What the model's JSON files say about it."""

    model_id: str
    image_token_id: int
    eos_token_ids: frozenset[int]
    chat_template: str
    context_length: int
    image: ImageSpec
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... for templates


# --------------------------------------------------------------------------- locating files


def graph_file(root: Path, layout: str, graph: str, precision: str) -> Path:
    """Where a graph of a given precision lives in a layout."""
    if layout == "lumen":
        return root / "onnx" / f"{graph}.{precision}.onnx"
    base = _COMMUNITY_NAMES[graph]
    suffix = "" if precision == "fp32" else f"_{precision}"
    return root / "onnx" / f"{base}{suffix}.onnx"


def graph_files(graph: Path) -> list[Path]:
    """A graph file and its external-weight side files (``X.onnx_data``, ``X.onnx.data``, ...)."""
    return sorted(p for p in graph.parent.glob(graph.name + "*") if p.is_file())


def detect_layout(root: Path) -> str:
    if (root / "model_info.json").is_file():
        return "lumen"
    if (root / "config.json").is_file():
        return "onnx-community"
    raise ModelFilesError(
        f"{root} is not a FastVLM model directory: it has neither config.json (onnx-community layout) "
        "nor model_info.json (Lumen layout)"
    )


def available_precisions(root: Path, layout: str) -> list[str]:
    """Precisions whose decoder graph exists."""
    return [p for p in PRECISIONS if graph_file(root, layout, "decoder", p).is_file()]


def locate_model_files(root: Path, precision: str = "fp32") -> ModelFiles:
    """Pick the graphs of one precision.

    The precision names the decoder, which is most of the model's weight and time; the vision
    encoder and embedding use the same precision when the directory has it, else fp32.
    """
    root = root.expanduser()
    if not root.is_dir():
        raise ModelFilesError(f"model directory {root} does not exist")
    if precision not in PRECISIONS:
        raise ModelFilesError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    layout = detect_layout(root)
    graphs: dict[str, Path] = {}
    found: dict[str, str] = {}
    for graph in GRAPHS:
        candidates = [precision] if graph == "decoder" else [precision, "fp32"]
        for candidate in candidates:
            path = graph_file(root, layout, graph, candidate)
            if path.is_file():
                graphs[graph], found[graph] = path, candidate
                break
        else:
            have = ", ".join(available_precisions(root, layout)) or "none"
            expected = graph_file(root, layout, graph, precision).relative_to(root)
            raise ModelFilesError(
                f"{root} has no {precision} {graph} graph (expected {expected}); precisions present: {have}"
            )
    tokenizer = root / "tokenizer.json"
    if not tokenizer.is_file():
        raise ModelFilesError(f"{root} has no tokenizer.json")
    return ModelFiles(root, layout, precision, graphs, found, tokenizer)


# --------------------------------------------------------------------------- reading facts


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFilesError(f"{path} does not hold a JSON object")
    return data


def _model_jsons(files: ModelFiles) -> dict[str, dict[str, Any]]:
    """The JSON documents by role, whichever layout holds them."""
    root = files.root
    docs = {
        "config": _read_json(root / "config.json"),
        "generation": _read_json(root / "generation_config.json"),
        "preprocessor": _read_json(root / "preprocessor_config.json"),
        "tokenizer_config": _read_json(root / "tokenizer_config.json"),
        "model_info": _read_json(root / "model_info.json"),
    }
    # A Lumen model_info.json may carry the same documents in extra_metadata.
    extra = docs["model_info"].get("extra_metadata") or {}
    for role, key in (
        ("config", "config"),
        ("generation", "generation_config"),
        ("preprocessor", "vision_config"),
        ("preprocessor", "preprocessor_config"),
    ):
        if not docs[role] and isinstance(extra.get(key), dict):
            docs[role] = extra[key]
    return docs


def _declared_name(model_info: dict[str, Any]) -> str | None:
    name = model_info.get("name")
    return str(name) if name else None


def declared_model_name(root: Path) -> str | None:
    """The name a Lumen ``model_info.json`` in `root` gives the model, None without one."""
    return _declared_name(_read_json(root / "model_info.json"))


def _token_text(value: Any) -> str | None:
    """tokenizer_config's special tokens are plain strings or AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(root: Path, tokenizer_config: dict[str, Any]) -> str:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template and (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    if not template and (root / "chat_template.json").is_file():
        template = _read_json(root / "chat_template.json").get("chat_template")
    if not isinstance(template, str) or not template:
        raise ModelFilesError(f"{root} has no chat template (tokenizer_config.json or chat_template.jinja)")
    return template


def _image_spec(preprocessor: dict[str, Any]) -> ImageSpec:
    crop = preprocessor.get("crop_size")
    size = preprocessor.get("size")
    side = None
    if isinstance(crop, dict):
        side = crop.get("height")
    elif isinstance(crop, int):
        side = crop
    if side is None and isinstance(size, dict):
        side = size.get("shortest_edge") or size.get("height")
    elif side is None and isinstance(size, int):
        side = size
    return ImageSpec(
        size=int(side) if side else 0,  # 0: take it from the vision encoder's input shape
        image_mean=tuple(preprocessor.get("image_mean", (0.0, 0.0, 0.0))),  # type: ignore[arg-type]
        image_std=tuple(preprocessor.get("image_std", (1.0, 1.0, 1.0))),  # type: ignore[arg-type]
        rescale_factor=float(preprocessor.get("rescale_factor", 1 / 255)),
        resample=int(preprocessor.get("resample", 3)),
        mode=ResizeMode.PAD,
    )


def _eos_ids(generation: dict[str, Any], config: dict[str, Any], eos_from_tokenizer: int | None) -> frozenset[int]:
    ids: set[int] = set()
    text_config = config.get("text_config") or {}
    for source in (generation.get("eos_token_id"), config.get("eos_token_id"), text_config.get("eos_token_id")):
        if source is None:
            continue
        ids.update(source if isinstance(source, list) else [source])
        break  # the first document that names them is authoritative, as in transformers
    if eos_from_tokenizer is not None:
        ids.add(eos_from_tokenizer)
    return frozenset(int(i) for i in ids)


def read_model_facts(files: ModelFiles, token_to_id: Any) -> ModelFacts:
    """Read the facts; `token_to_id` maps a token's text to its id (the tokenizer's)."""
    docs = _model_jsons(files)
    config, tok_config = docs["config"], docs["tokenizer_config"]
    image_token_id = config.get("image_token_index", config.get("image_token_id"))
    if image_token_id is None:
        image_token_id = token_to_id("<image>")
    if image_token_id is None:
        raise ModelFilesError(f"{files.root}: neither config.json nor the tokenizer names the image token")
    specials = {
        key: text for key in ("bos_token", "eos_token", "pad_token") if (text := _token_text(tok_config.get(key)))
    }
    eos_text = specials.get("eos_token")
    eos_ids = _eos_ids(docs["generation"], config, token_to_id(eos_text) if eos_text else None)
    if not eos_ids:
        raise ModelFilesError(f"{files.root}: no end-of-sequence token id in the generation or tokenizer config")
    text_config = config.get("text_config") or config
    context = text_config.get("max_position_embeddings") or tok_config.get("model_max_length")
    if not isinstance(context, int) or context <= 0 or context > 10_000_000:
        context = DEFAULT_CONTEXT_LENGTH
    return ModelFacts(
        model_id=_declared_name(docs["model_info"]) or files.root.name,
        image_token_id=int(image_token_id),
        eos_token_ids=eos_ids,
        chat_template=_chat_template(files.root, tok_config),
        context_length=int(context),
        image=_image_spec(docs["preprocessor"]),
        special_tokens=specials,
    )
