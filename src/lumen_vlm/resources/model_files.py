"""Find a model's files on disk and read the facts they state.

Two layouts are understood:

* onnx-community (the public FastVLM export): ``config.json``, ``generation_config.json``,
  ``preprocessor_config.json``, ``tokenizer.json``, ``tokenizer_config.json`` and
  ``onnx/{vision_encoder,embed_tokens,decoder_model_merged}[_PRECISION].onnx``;
* Lumen (what lumen-resources downloads from the LumilioPhotos repos): ``model_info.json``,
  ``onnx/{vision,embed,decoder}.PRECISION.onnx`` (``{graph}.onnx`` is fp32 too, and ``q4f16`` is
  spelt ``q4fp16``), the tokenizer files and whichever ``*config*.json`` files the repo has. The
  facts upstream lumen-vlm reads from ``model_info.json``'s ``extra_metadata`` are read here too:
  ``vision_config`` (``image_size``, ``patch_size``, ``mean``, ``std``), ``generation_config``
  (``image_token_index``, ``eos_token_id``, ``max_position_embeddings``) and ``kv_cache_config``.
  A JSON file on disk wins over the same document in ``extra_metadata``.

Each graph is looked for in the requested precision, then in `FALLBACK_ORDER`, independently of
the others, so a directory that mixes precisions (an fp16 vision encoder beside an fp32 decoder)
loads. Every problem with the files is a `ModelFilesError` naming the file and key.

Only this module opens a model's JSON files: it returns what they state as a `FileSpec`, the
files' part of the model spec (`model_spec.py`).
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .exceptions import ModelFilesError
from .model_spec import IMAGE_PLACEHOLDER, FileSpec, ImageSpec, KVCacheSpec, ResizeMode, TextSpec

# Other spellings accepted in configs: lumen-resources and the LumilioPhotos repos write q4f16 as q4fp16.
PRECISION_ALIASES = {"q4fp16": "q4f16"}
# Where a graph is missing in the requested precision, the first of these present is used: the
# most accurate first. fp32 is what every export starts from and every provider runs.
FALLBACK_ORDER = ("fp32", "fp16", "int8", "uint8", "quantized", "q4", "q4f16", "bnb4")
PRECISIONS = FALLBACK_ORDER  # every precision a graph file may be in
GRAPHS = ("vision", "embed", "decoder")
_COMMUNITY_NAMES = {"vision": "vision_encoder", "embed": "embed_tokens", "decoder": "decoder_model_merged"}
DEFAULT_CONTEXT_LENGTH = 32768
# tokenizer_config's model_max_length above this is transformers' "no limit" placeholder.
_MAX_PLAUSIBLE_CONTEXT = 10_000_000
# The model config's image_aspect_ratio values this service can honour (see `resize_rule`).
_ASPECT_RATIO_RULES = {"pad": ResizeMode.PAD, "square": ResizeMode.CROP, "crop": ResizeMode.CROP}


@dataclass(frozen=True)
class ModelFiles:
    """The files one loaded model uses."""

    root: Path
    layout: str  # "onnx-community" or "lumen"
    requested_precision: str
    # "vision" / "embed" / "decoder" -> .onnx file; and "prefill", the decoder graph prompts run
    # through, where one in another precision than the decoder's was asked for.
    graphs: dict[str, Path]
    graph_precisions: dict[str, str]  # the precision each graph was actually found in
    tokenizer: Path

    @property
    def precision(self) -> str:
        """The decoder's precision: most of the model's weight and time."""
        return self.graph_precisions["decoder"]


# --------------------------------------------------------------------------- precisions


def canonical_precision(name: str) -> str:
    """`name` in the spelling used here (``q4fp16`` -> ``q4f16``); ModelFilesError if unknown."""
    precision = PRECISION_ALIASES.get(name, name)
    if precision not in PRECISIONS:
        raise ModelFilesError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}")
    return precision


def lumen_precision_name(precision: str) -> str:
    """How the LumilioPhotos repos and lumen-resources' downloader spell `precision`."""
    return next((alias for alias, canonical in PRECISION_ALIASES.items() if canonical == precision), precision)


def fallback_precisions(requested: str) -> list[str]:
    """The precisions a graph is looked for in, in order: the requested one, then FALLBACK_ORDER."""
    return [requested, *(p for p in FALLBACK_ORDER if p != requested)]


# --------------------------------------------------------------------------- locating files


def graph_candidates(layout: str, graph: str, precision: str) -> list[Path]:
    """The names, relative to the model directory, a graph of one precision may have in a layout.

    Lumen: ``{graph}.{precision}.onnx`` in the repos' spelling (``q4fp16``) or ours, and plain
    ``{graph}.onnx`` for fp32, as upstream lumen-vlm reads them. onnx-community:
    ``{name}_{precision}.onnx``, plain ``{name}.onnx`` for fp32.
    """
    if layout == "lumen":
        names = list(
            dict.fromkeys(f"{graph}.{spelling}.onnx" for spelling in (lumen_precision_name(precision), precision))
        )
        if precision == "fp32":
            names.append(f"{graph}.onnx")
    else:
        base = _COMMUNITY_NAMES[graph]
        names = [f"{base}.onnx" if precision == "fp32" else f"{base}_{precision}.onnx"]
    return [Path("onnx") / name for name in names]


def graph_files(graph: Path) -> list[Path]:
    """A graph file and its external-weight side files (``X.onnx_data``, ``X.onnx.data``, ...)."""
    return sorted(p for p in graph.parent.glob(graph.name + "*") if p.is_file())


def remove_graph(graph: Path) -> None:
    """Remove a graph file with its side files, before a tool writes it anew: onnx appends
    external weights to a side file that exists, so the new graph would carry the old bytes too."""
    for path in graph_files(graph):
        path.unlink()


def detect_layout(root: Path) -> str:
    if (root / "model_info.json").is_file():
        return "lumen"
    if (root / "config.json").is_file():
        return "onnx-community"
    raise ModelFilesError(
        f"{root} is not a FastVLM model directory: it has neither config.json (onnx-community layout) "
        "nor model_info.json (Lumen layout)"
    )


def best_graph(layout: str, graph: str, requested: str, present: Callable[[Path], bool]) -> tuple[Path, str] | None:
    """(relative file, precision) of the best `graph` for which `present` is true, or None.

    The one rule for "best", used on a directory and on a repo's file listing alike: the
    requested precision, then `FALLBACK_ORDER`.
    """
    for precision in fallback_precisions(requested):
        for relative in graph_candidates(layout, graph, precision):
            if present(relative):
                return relative, precision
    return None


def _find_graph(root: Path, layout: str, graph: str, requested: str) -> tuple[Path, str] | None:
    """(file, precision) of the best `graph` present in `root`, or None."""
    best = best_graph(layout, graph, requested, lambda relative: (root / relative).is_file())
    return (root / best[0], best[1]) if best else None


def locate_model_files(
    root: Path, precision: str = "fp32", vision_precision: str | None = None, prefill_precision: str | None = None
) -> ModelFiles:
    """Pick each graph in `precision` (the vision graph in `vision_precision`, where given), or in
    the best precision present (`fallback_precisions`); and, for `prefill_precision`, a second
    decoder graph for prompts (`find_prefill_decoder`)."""
    root = root.expanduser()
    if not root.is_dir():
        raise ModelFilesError(f"model directory {root} does not exist")
    requested = canonical_precision(precision)
    layout = detect_layout(root)
    graphs: dict[str, Path] = {}
    found: dict[str, str] = {}
    wanted = {graph: requested for graph in GRAPHS}
    if vision_precision is not None:
        wanted["vision"] = canonical_precision(vision_precision)
    for graph in GRAPHS:
        best = _find_graph(root, layout, graph, wanted[graph])
        if best is None:
            expected = _expected_names(layout, graph, wanted[graph])
            present = sorted(p.name for p in (root / "onnx").glob("*.onnx")) if (root / "onnx").is_dir() else []
            raise ModelFilesError(
                f"{root} has no {wanted[graph]} {graph} graph (expected {expected}), nor one in another precision; "
                f"graphs present: {', '.join(present) or 'none'}"
            )
        graphs[graph], found[graph] = best
    if prefill_precision is not None:
        prefill = find_prefill_decoder(root, layout, canonical_precision(prefill_precision), found["decoder"])
        if prefill is not None:
            graphs["prefill"], found["prefill"] = prefill
    tokenizer = root / "tokenizer.json"
    if not tokenizer.is_file():
        raise ModelFilesError(f"{root} has no tokenizer.json")
    return ModelFiles(root, layout, requested, graphs, found, tokenizer)


def find_prefill_decoder(root: Path, layout: str, precision: str, decoder_precision: str) -> tuple[Path, str] | None:
    """(file, precision) of the decoder graph that runs prompts, or None where the decoder itself
    is in `precision` (one graph does both).

    Exactly the asked precision, no fallback: the graph is there to prefill faster than the
    decoder does, and another precision would not."""
    if precision == decoder_precision:
        return None
    for relative in graph_candidates(layout, "decoder", precision):
        if (root / relative).is_file():
            return root / relative, precision
    expected = _expected_names(layout, "decoder", precision)
    raise ModelFilesError(f"{root} has no {precision} decoder graph for prompts (expected {expected})")


def _expected_names(layout: str, graph: str, precision: str) -> str:
    """The file names a missing graph could have had, for an error message."""
    return " or ".join(p.as_posix() for p in graph_candidates(layout, graph, precision))


def load_tokenizer(path: Path) -> Tokenizer:
    """The model's tokenizer.json; ModelFilesError when it cannot be read."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for every unreadable file
        raise ModelFilesError(f"cannot read {path}: {exc}") from exc


# --------------------------------------------------------------------------- the JSON documents


@dataclass(frozen=True)
class _Doc:
    """One JSON document and where it came from, so errors name the file and key."""

    file: str  # the file's path
    prefix: str  # the document's key path inside the file, "" for the whole file
    data: dict[str, Any]

    def value(self, *path: str) -> Any:
        node: Any = self.data
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    def sub(self, key: str) -> _Doc:
        """The object at `key` as a document of its own (empty when absent)."""
        value = self.value(key)
        if value is not None and not isinstance(value, dict):
            raise self.error((key,), "must be a JSON object", value)
        return _Doc(self.file, self.key(key), value or {})

    def key(self, *path: str) -> str:
        return ".".join([self.prefix, *path] if self.prefix else path)

    def error(self, path: tuple[str, ...], problem: str, value: Any = None) -> ModelFilesError:
        got = "" if value is None else f", got {reprlib.repr(value)}"
        return ModelFilesError(f"{self.file} {self.key(*path)} {problem}{got}")

    def integer(self, *path: str, minimum: int = 0) -> int | None:
        value = self.value(*path)
        if value is None:
            return None
        if not _is_integer(value) or value < minimum:
            raise self.error(path, f"must be an integer >= {minimum}", value)
        return value

    def number(self, *path: str) -> float | None:
        value = self.value(*path)
        if value is None:
            return None
        if not _is_number(value):
            raise self.error(path, "must be a number", value)
        return float(value)

    def triple(self, *path: str) -> tuple[float, float, float] | None:
        value = self.value(*path)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != 3 or not all(_is_number(v) for v in value):
            raise self.error(path, "must be a list of 3 numbers", value)
        return (float(value[0]), float(value[1]), float(value[2]))


def _is_integer(value: Any) -> bool:
    """A JSON integer: Python's bool is an int, JSON's true is not."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_integer(value) or isinstance(value, float)


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


def _documents(root: Path) -> dict[str, _Doc]:
    """The JSON documents by role, whichever layout holds them."""

    def read(name: str) -> _Doc:
        return _Doc(str(root / name), "", _read_json(root / name))

    info = read("model_info.json")
    extra = info.sub("extra_metadata")
    docs = {
        "config": read("config.json"),
        "generation": read("generation_config.json"),
        "preprocessor": read("preprocessor_config.json"),
        "tokenizer_config": read("tokenizer_config.json"),
        "model_info": info,
        # Only a Lumen model_info.json carries these two.
        "vision": extra.sub("vision_config"),
        "kv_cache": extra.sub("kv_cache_config"),
    }
    # A Lumen model_info.json may carry the other documents in extra_metadata too.
    for role, key in (
        ("config", "config"),
        ("generation", "generation_config"),
        ("preprocessor", "preprocessor_config"),
    ):
        if not docs[role].data:
            docs[role] = extra.sub(key)
    return docs


def _declared_name(model_info: dict[str, Any]) -> str | None:
    name = model_info.get("name")
    return str(name) if name else None


def declared_model_name(root: Path) -> str | None:
    """The name a Lumen ``model_info.json`` in `root` gives the model, None without one."""
    return _declared_name(_read_json(root / "model_info.json"))


# --------------------------------------------------------------------------- reading facts


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
    jinja = root / "chat_template.jinja"
    if not template and jinja.is_file():
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise ModelFilesError(f"cannot read {jinja}: {exc}") from exc
    if not template and (root / "chat_template.json").is_file():
        template = _read_json(root / "chat_template.json").get("chat_template")
    if not isinstance(template, str) or not template:
        raise ModelFilesError(f"{root} has no chat template (tokenizer_config.json or chat_template.jinja)")
    return template


def _text_config(config: _Doc) -> _Doc:
    """The language model's config: ``text_config`` in transformers' format, the config itself in Apple's."""
    return config.sub("text_config") if config.value("text_config") is not None else config


def _image_token_id(docs: dict[str, _Doc], token_to_id: Any) -> int | None:
    config, generation = docs["config"], docs["generation"]
    for doc, key in ((config, "image_token_index"), (config, "image_token_id"), (generation, "image_token_index")):
        value = doc.integer(key)
        if value is not None:
            return value
    found = token_to_id(IMAGE_PLACEHOLDER)
    return int(found) if found is not None else None


def _eos_ids(docs: dict[str, _Doc], eos_from_tokenizer: int | None) -> frozenset[int]:
    """The generation config's eos ids, else the model config's; plus the tokenizer config's eos token."""
    ids: set[int] = set()
    config = docs["config"]
    for doc in (docs["generation"], config, _text_config(config)):
        value = doc.value("eos_token_id")
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not values or not all(_is_integer(v) and v >= 0 for v in values):
            raise doc.error(("eos_token_id",), "must be a token id or a non-empty list of them", value)
        ids.update(values)
        break  # the first document that names them is authoritative, as in transformers
    if eos_from_tokenizer is not None:
        ids.add(eos_from_tokenizer)
    return frozenset(ids)


def _context_length(docs: dict[str, _Doc]) -> int:
    """The language model's max_position_embeddings (its config's, else a Lumen generation_config's),
    else the tokenizer's model_max_length, else DEFAULT_CONTEXT_LENGTH."""
    for doc in (_text_config(docs["config"]), docs["generation"]):
        value = doc.integer("max_position_embeddings", minimum=1)
        if value is not None:
            return value
    model_max = docs["tokenizer_config"].value("model_max_length")
    if _is_number(model_max) and 0 < model_max <= _MAX_PLAUSIBLE_CONTEXT:
        return int(model_max)
    return DEFAULT_CONTEXT_LENGTH


def resize_rule(config: _Doc, vision: _Doc, preprocessor: _Doc) -> ResizeMode:
    """How a non-square photo becomes the model's square input, by default; a request's
    ``resize_mode`` overrides it.

    1. The model config's ``image_aspect_ratio`` wins: it records how the model was trained.
       That is ``config.json``'s (or a Lumen ``extra_metadata.config``'s), else a Lumen
       ``extra_metadata.vision_config``'s, which upstream lumen-vlm reads as ``pad`` when it
       names none. ``pad`` is Apple's pad-to-square; ``square`` (LLaVA's name for "the image
       processor alone") and ``crop`` are the processor's resize and centre-crop. Other values
       (LLaVA's ``anyres``) are refused: this service cannot reproduce them.
    2. Otherwise the preprocessor config: a centre-crop (``do_center_crop``, or a ``crop_size``
       without it, as CLIPImageProcessor defaults) means CROP, as transformers runs the export.
    3. Otherwise PAD: Apple's reference rule.
    """
    stated, source = config.value("image_aspect_ratio"), config
    if stated is None and vision.data:
        stated, source = vision.value("image_aspect_ratio") or "pad", vision
    if stated is not None:
        if stated not in _ASPECT_RATIO_RULES:
            choices = ", ".join(_ASPECT_RATIO_RULES)
            raise source.error(("image_aspect_ratio",), f"is not one this service can honour ({choices})", stated)
        return _ASPECT_RATIO_RULES[stated]
    crops = preprocessor.value("do_center_crop")
    if crops is None:
        crops = preprocessor.value("crop_size") is not None
    return ResizeMode.CROP if crops else ResizeMode.PAD


def _preprocessor_side(preprocessor: _Doc) -> int | None:
    """The square side a preprocessor config states: its crop size, else its resize target."""
    for path in (("crop_size", "height"), ("crop_size",), ("size", "shortest_edge"), ("size", "height"), ("size",)):
        if isinstance(preprocessor.value(*path), dict):
            continue
        side = preprocessor.integer(*path, minimum=1)
        if side is not None:
            return side
    return None


def _image_spec(docs: dict[str, _Doc]) -> ImageSpec:
    pre, vision = docs["preprocessor"], docs["vision"]
    std_doc, std_key = (pre, "image_std") if pre.value("image_std") is not None else (vision, "std")
    std = std_doc.triple(std_key) or (1.0, 1.0, 1.0)
    if 0.0 in std:
        raise std_doc.error((std_key,), "must not hold 0", list(std))
    resample = pre.integer("resample")
    return ImageSpec(
        size=_preprocessor_side(pre) or vision.integer("image_size", minimum=1) or 0,  # 0: the vision graph's
        image_mean=pre.triple("image_mean") or vision.triple("mean") or (0.0, 0.0, 0.0),
        image_std=std,
        rescale_factor=pre.number("rescale_factor") or 1 / 255,
        resample=3 if resample is None else resample,  # PIL's BICUBIC, CLIPImageProcessor's default
        mode=resize_rule(docs["config"], vision, pre),
        patch_size=vision.integer("patch_size", minimum=1),
    )


def _kv_cache(doc: _Doc) -> KVCacheSpec | None:
    if not doc.data:
        return None
    values = {}
    for key in ("num_hidden_layers", "num_key_value_heads", "head_dim"):
        value = doc.integer(key, minimum=1)
        if value is None:
            raise doc.error((key,), "is missing")
        values[key] = value
    return KVCacheSpec(**values)


def read_file_spec(files: ModelFiles, token_to_id: Any) -> FileSpec:
    """What the model's files state; `token_to_id` maps a token's text to its id (the tokenizer's)."""
    docs = _documents(files.root)
    tok_config = docs["tokenizer_config"].data
    image_token_id = _image_token_id(docs, token_to_id)
    if image_token_id is None:
        raise ModelFilesError(f"{files.root}: neither the model config nor the tokenizer names the image token")
    specials = {
        key: text for key in ("bos_token", "eos_token", "pad_token") if (text := _token_text(tok_config.get(key)))
    }
    eos_text = specials.get("eos_token")
    eos_ids = _eos_ids(docs, token_to_id(eos_text) if eos_text else None)
    if not eos_ids:
        raise ModelFilesError(f"{files.root}: no end-of-sequence token id in the generation or tokenizer config")
    text = TextSpec(
        image_token_id=image_token_id,
        eos_token_ids=eos_ids,
        chat_template=_chat_template(files.root, tok_config),
        context_length=_context_length(docs),
        special_tokens=specials,
    )
    return FileSpec(
        model_id=_declared_name(docs["model_info"].data) or files.root.name,
        text=text,
        image=_image_spec(docs),
        kv_cache=_kv_cache(docs["kv_cache"]),
    )
