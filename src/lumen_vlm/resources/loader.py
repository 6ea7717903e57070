"""Turn the configured ``model`` into a model directory on disk, downloading it when allowed.

``model`` is read, in this order, as:

1. **A local directory** that exists (absolute, ``~/...``, or relative to the config file's
   directory, then to the working directory). It is returned as is: never written, never
   checked against the network.
2. **A Hugging Face repo id** (``owner/name``, e.g. ``onnx-community/FastVLM-0.5B-ONNX``):
   ``huggingface_hub.snapshot_download`` fetches only the JSON/tokenizer files and the three
   graphs of the configured precision (with their ``.onnx_data`` side files) into
   ``<cache_dir>/models/<owner>--<name>``.
3. **A name from `KNOWN_MODELS`**. Each name says where it comes from:

   * ``fastvlm-0.5b`` is the public onnx-community export, fetched as in 2. It is the name to
     use: its listing is public, its layout is the one `model_files` reads and the tests cover,
     and Hugging Face serves it everywhere.
   * ``FastVLM-0.5B`` is the name the Lumen project's own configs use: a Lumen repo (with
     ``model_info.json``) fetched by lumen-resources' `Downloader` into
     ``<cache_dir>/models/FastVLM-0.5B``, the very directory other Lumen tools use, so a model
     the Lumen hub downloaded is found here too. lumen-resources currently routes every region
     to ModelScope, and that repo's contents cannot be checked from here, so it is kept for
     compatibility rather than recommended.

   Any other plain name is looked up as ``<cache_dir>/models/<name>`` (a model placed there by
   hand or by the lumen-resources CLI); if there is none, `ModelNotFoundError` lists the known
   names. Unknown names are never sent to a downloader: a typo should not turn into a search of
   somebody's model repositories.

Directories under ``<cache_dir>/models`` belong to whoever made them. lumen-resources'
`Downloader` deletes the whole model directory when its post-download check fails, and
``snapshot_download`` overwrites files, so a downloader only ever gets a directory that did not
exist or that holds our marker file (`MARKER_NAME`). The marker is written *before* a download
starts (claiming the new directory) and records each precision once it is complete: written only
after success, the leftovers of an interrupted download would look hand-made and stay stuck. A
directory without the marker is used read-only when `locate_model_files` accepts it, otherwise
the error says what is missing and that the directory was left alone. Symlinks are never ours.

Names cannot leave ``<cache_dir>/models``: backslashes, empty, ``.`` and ``..`` segments and
absolute paths that are not existing directories are refused, and the target is checked to lie
inside the models directory. With ``download=False`` nothing is fetched; a model that is not
already on disk is a `ModelNotFoundError` saying so.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import huggingface_hub
from lumen_resources import downloader as lumen_downloader
from lumen_resources.lumen_config import LumenConfig
from tqdm.auto import tqdm

from .config import single_service_config
from .exceptions import ModelFilesError, ModelNotFoundError
from .model_files import (
    GRAPHS,
    canonical_precision,
    declared_model_name,
    graph_candidates,
    locate_model_files,
    lumen_precision_name,
)
from .settings import VLMSettings

logger = logging.getLogger(__name__)

MARKER_NAME = ".lumen-vlm-download.json"
HUGGINGFACE = "huggingface"
LUMEN = "lumen"
# Everything small a model needs besides its graphs: config, generation, preprocessor and
# tokenizer JSON, merges.txt, chat_template.jinja. README and .gitattributes stay behind.
HF_SMALL_FILE_PATTERNS = ("*.json", "*.txt", "*.jinja")
# A name segment: what Hugging Face accepts for an owner or repo name.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# A directory under <cache_dir>/models: one segment, or owner--name.
_DIRNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


@dataclass(frozen=True)
class ModelSource:
    """Where a model is downloaded from."""

    kind: str  # HUGGINGFACE or LUMEN
    repo: str  # a Hugging Face repo id, or a Lumen repo name (lumen-resources adds the owner)

    @property
    def dirname(self) -> str:
        """The directory under <cache_dir>/models; a Lumen repo's is lumen-resources' own choice."""
        return self.repo.replace("/", "--") if self.kind == HUGGINGFACE else self.repo

    def describe(self) -> str:
        if self.kind == HUGGINGFACE:
            return f"Hugging Face {self.repo}"
        return f"Lumen repo {self.repo} via lumen-resources"


KNOWN_MODELS: dict[str, ModelSource] = {
    "fastvlm-0.5b": ModelSource(HUGGINGFACE, "onnx-community/FastVLM-0.5B-ONNX"),
    "FastVLM-0.5B": ModelSource(LUMEN, "FastVLM-0.5B"),
}


# --------------------------------------------------------------------------- public API


def resolve_model(settings: VLMSettings, download: bool = True, progress: bool = True) -> Path:
    """The directory holding the configured model; the caller then runs `locate_model_files` on it."""
    name = settings.model.model
    key = f"services.{settings.service_name}.models.{settings.model.alias}.model"
    local = existing_local_dir(name, settings.config_dir)
    if local is not None:
        return local
    models_root = settings.cache_dir.expanduser().absolute() / "models"
    if _is_repo_id(name, key):
        source = ModelSource(HUGGINGFACE, name)
    elif name in KNOWN_MODELS:
        source = KNOWN_MODELS[name]
    else:
        return _unknown_name(name, cache_target(models_root, name, key), settings.model.precision, key)
    target = cache_target(models_root, source.dirname, key)
    return _resolve_cached(source, target, settings, key, download, progress)


def served_model_id(settings: VLMSettings, model_dir: Path | str) -> str:
    """The model id a service reports: what a person configured, not where it landed on disk.

    The name in the directory's ``model_info.json`` (a Lumen model) if it has one, else the
    configured `model` when it is a name or a Hugging Face repo id (``fastvlm-0.5b`` rather than
    its cache directory ``onnx-community--FastVLM-0.5B-ONNX``), else, for a local path, the
    directory's name.
    """
    declared = declared_model_name(Path(model_dir))
    if declared:
        return declared
    name = settings.model.model
    if name.strip() and existing_local_dir(name, settings.config_dir) is None:
        return name
    return Path(model_dir).name


def existing_local_dir(name: str, config_dir: Path | None) -> Path | None:
    """`name` as an existing directory: absolute or ~, else relative to the config's dir, then cwd."""
    if not name.strip():
        return None  # Path("") is ".", which would silently mean the working directory
    path = Path(name).expanduser()
    bases = [config_dir, Path.cwd()] if not path.is_absolute() else [None]
    for base in bases:
        candidate = base / path if base is not None else path
        if candidate.is_dir():
            return candidate.absolute()
    return None


def cache_target(models_root: Path, dirname: str, key: str) -> Path:
    """<models_root>/<dirname>, refusing anything that would land elsewhere."""
    root = models_root.resolve()
    target = root / dirname
    if not _DIRNAME.fullmatch(dirname) or not Path(os.path.normpath(target)).is_relative_to(root) or target == root:
        raise ModelNotFoundError(f"{key}: {dirname!r} would leave the model cache {root}; refusing it")
    return target


# --------------------------------------------------------------------------- reading the name


def _is_repo_id(name: str, key: str) -> bool:
    """True for owner/name; False for a plain name; refuses what can only be a missing path."""
    if "\\" in name:
        raise ModelNotFoundError(f"{key}: {name!r} is not an existing directory (and backslashes are not allowed)")
    if name.startswith("~") or Path(name).is_absolute():
        raise ModelNotFoundError(f"{key}: model directory {name} does not exist")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ModelNotFoundError(
            f"{key}: {name!r} is not an existing directory, and a model name cannot have empty, '.' or '..' parts"
        )
    valid = all(_SEGMENT.fullmatch(part) and "--" not in part and ".." not in part for part in parts)
    if valid and len(parts) <= 2:
        return len(parts) == 2
    raise ModelNotFoundError(
        f"{key}: {name!r} is not an existing directory, a known model name or an owner/name Hugging Face repo id"
    )


def _unknown_name(name: str, target: Path, precision: str, key: str) -> Path:
    """A plain name we have no source for: only a model already in the cache can serve."""
    if target.exists() or target.is_symlink():
        return _use_foreign(target, precision, key)
    known = "; ".join(f"{known} ({source.describe()})" for known, source in KNOWN_MODELS.items())
    raise ModelNotFoundError(
        f"{key}: unknown model {name!r} (nothing at {target}). Known model names: {known}. "
        "Or set it to a local model directory, or to a Hugging Face repo id such as "
        "onnx-community/FastVLM-0.5B-ONNX."
    )


# --------------------------------------------------------------------------- the cache directory


def _resolve_cached(
    source: ModelSource, target: Path, settings: VLMSettings, key: str, download: bool, progress: bool
) -> Path:
    """`key` names the config entry in errors."""
    precision = canonical_precision(settings.model.precision)  # the marker records this spelling
    if (target.exists() or target.is_symlink()) and not _owns(target):
        return _use_foreign(target, precision, key)
    if _owns(target) and _is_complete(target, precision):
        return target
    if not download:
        raise ModelNotFoundError(
            f"{key}: {settings.model.model!r} ({precision}) is not downloaded yet (looked in {target}) "
            "and downloading is turned off"
        )
    _claim(target, source)
    logger.info("downloading %s (%s) into %s", source.describe(), precision, target)
    if source.kind == HUGGINGFACE:
        _download_huggingface(source, target, precision, progress, key)
    else:
        _download_lumen(source, target, settings, precision, progress, key)
    _check_download(target, precision, key)
    _record_complete(target, precision)
    return target


def _use_foreign(target: Path, precision: str, key: str) -> Path:
    """A directory lumen-vlm did not download: used read-only if complete, never touched."""
    if not target.is_dir():
        raise ModelFilesError(f"{key}: {target} exists but is not a directory; lumen-vlm leaves it alone")
    try:
        locate_model_files(target, precision)
    except ModelFilesError as exc:
        raise ModelFilesError(
            f"{key}: {target} already exists but was not downloaded by lumen-vlm (it has no {MARKER_NAME}), "
            f"so lumen-vlm neither downloads into it nor changes it. It is not a usable {precision} model: {exc}. "
            "Add the missing files, point `model` at another directory, or move it away to let lumen-vlm "
            "download the model."
        ) from exc
    return target


def _owns(target: Path) -> bool:
    marker = target / MARKER_NAME
    return target.is_dir() and not target.is_symlink() and marker.is_file() and not marker.is_symlink()


def _read_marker(target: Path) -> dict[str, Any]:
    try:
        data = json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged marker still says "ours"; it just vouches for no precision
    return data if isinstance(data, dict) else {}


def _write_marker(target: Path, data: dict[str, Any]) -> None:
    # Written aside then renamed, so a crash never leaves a half-written marker.
    temporary = target / (MARKER_NAME + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, target / MARKER_NAME)


def _is_complete(target: Path, precision: str) -> bool:
    """Our download finished for this precision, and its files are still there."""
    if precision not in _read_marker(target).get("complete_precisions", []):
        return False
    try:
        locate_model_files(target, precision)
    except ModelFilesError:
        return False
    return True


def _claim(target: Path, source: ModelSource) -> None:
    """Create the directory (if new) and mark it ours before any downloader may write to it."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        marker = _read_marker(target)
        marker.update(tool="lumen-vlm", source=source.kind, repo=source.repo)
        marker.setdefault("complete_precisions", [])
        _write_marker(target, marker)
    except OSError as exc:
        raise ModelFilesError(f"cannot prepare {target} for the download: {exc}") from exc


def _record_complete(target: Path, precision: str) -> None:
    marker = _read_marker(target)
    done = set(marker.get("complete_precisions", [])) | {precision}
    marker.update(complete_precisions=sorted(done), updated=datetime.now(timezone.utc).isoformat())
    try:
        _write_marker(target, marker)
    except OSError as exc:
        raise ModelFilesError(f"downloaded into {target} but cannot record it in {MARKER_NAME}: {exc}") from exc


def _check_download(target: Path, precision: str, key: str) -> None:
    try:
        locate_model_files(target, precision)
    except ModelFilesError as exc:
        raise ModelFilesError(f"{key}: the download into {target} finished but the model is incomplete: {exc}") from exc


# --------------------------------------------------------------------------- downloaders


def hf_allow_patterns(precision: str) -> list[str]:
    """The files of one precision in the onnx-community layout: small files, three graphs, their data."""
    patterns = list(HF_SMALL_FILE_PATTERNS)
    for graph in GRAPHS:
        for relative in graph_candidates("onnx-community", graph, precision):
            patterns += [relative.as_posix(), relative.as_posix() + "_data*"]  # .onnx_data, .onnx_data_1...
    return patterns


class _SilentTqdm(tqdm):
    """huggingface_hub's progress bars, switched off."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _download_huggingface(source: ModelSource, target: Path, precision: str, progress: bool, key: str) -> None:
    try:
        huggingface_hub.snapshot_download(
            repo_id=source.repo,
            local_dir=target,
            allow_patterns=hf_allow_patterns(precision),
            tqdm_class=None if progress else _SilentTqdm,  # None: huggingface_hub's own bars
        )
    except Exception as exc:  # network, auth, missing repo: all mean "not obtainable now"
        raise ModelNotFoundError(f"{key}: could not download {source.repo} from Hugging Face: {exc}") from exc


def _download_lumen(
    source: ModelSource, target: Path, settings: VLMSettings, precision: str, progress: bool, key: str
) -> None:
    config = _lumen_download_config(source, settings, precision)
    try:
        results = lumen_downloader.Downloader(config, verbose=progress).download_all()
    except Exception as exc:  # e.g. the platform's SDK is missing
        raise ModelNotFoundError(f"{key}: lumen-resources could not download {source.repo}: {exc}") from exc
    result = results.get(f"{settings.service_name}:{settings.model.alias}")
    if result is None or not result.success:
        error = result.error if result is not None else "no result"
        raise ModelNotFoundError(f"{key}: lumen-resources could not download {source.repo}: {error}")
    if result.model_path is None or result.model_path.resolve() != target.resolve():
        raise ModelFilesError(f"{key}: lumen-resources put {source.repo} in {result.model_path}, expected {target}")


def _lumen_download_config(source: ModelSource, settings: VLMSettings, precision: str) -> LumenConfig:
    """The smallest LumenConfig that makes lumen-resources fetch exactly this one model.

    lumen-resources fetches ``*.{precision}.onnx``, so the precision goes in the repos' own
    spelling (``q4fp16`` for q4f16).
    """
    model = {"model": source.repo, "runtime": "onnx", "precision": lumen_precision_name(precision)}
    config = single_service_config(
        settings.service_name,
        str(settings.cache_dir),
        settings.region,
        {"port": settings.server.port},
        {"models": {settings.model.alias: model}},
    )
    return LumenConfig.model_validate(config)
