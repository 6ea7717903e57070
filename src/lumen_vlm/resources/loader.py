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

A failed download raises `ModelNotFoundError` saying what failed (offline mode, the hub
unreachable, no such repo, the disk full, ...), naming the repo and what to do, including how to
download it on another machine and point ``model`` at that directory (`_failure`). If nothing of
the model arrived, the directory it claimed is removed again; what did arrive is kept for the
next start to complete (`_discard_if_nothing_arrived` says why that is safe).

Names cannot leave ``<cache_dir>/models``: backslashes, empty, ``.`` and ``..`` segments and
absolute paths that are not existing directories are refused, and the target is checked to lie
inside the models directory. With ``download=False`` nothing is fetched; a model that is not
already on disk is a `ModelNotFoundError` saying so.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeGuard

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.errors
from huggingface_hub.utils import filter_repo_objects
from lumen_resources import downloader as lumen_downloader
from lumen_resources.lumen_config import LumenConfig
from tqdm.auto import tqdm

from .config import single_service_config
from .exceptions import ModelFilesError, ModelNotFoundError, ResourceError
from .model_files import (
    GRAPHS,
    best_graph,
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
    found = _find(settings)
    if isinstance(found, Path):
        return found
    if not download:
        raise ModelNotFoundError(
            f"{found.key}: {settings.model.model!r} ({settings.model.precision}) is not downloaded yet "
            f"(looked in {found.target}) and downloading is turned off"
        )
    return _download(found, settings, progress)


def model_on_disk(settings: VLMSettings) -> Path | None:
    """The model's directory when no download is needed; None when `resolve_model` would download.

    Raises what `resolve_model` raises about the name and the directories, without any network:
    a server checks the configuration with it before it opens its port.
    """
    found = _find(settings)
    return found if isinstance(found, Path) else None


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


@dataclass(frozen=True)
class _PendingDownload:
    """A model that has to be downloaded into `target` before it can be used."""

    source: ModelSource
    target: Path
    key: str  # the config entry, named in errors
    precision: str  # in our spelling, which the marker records


def _find(settings: VLMSettings) -> Path | _PendingDownload:
    """The model's directory if it is on disk and usable, else the download it needs. No network."""
    name = settings.model.model
    key = f"{settings.model_key}.model"
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
    precision = canonical_precision(settings.model.precision)  # the marker records this spelling
    if (target.exists() or target.is_symlink()) and not _owns(target):
        return _use_foreign(target, precision, key)
    if _owns(target) and _is_complete(target, precision):
        return target
    return _PendingDownload(source, target, key, precision)


def _download(pending: _PendingDownload, settings: VLMSettings, progress: bool) -> Path:
    """Claim the target, download into it, check the result and record it complete.

    A failed download leaves no directory behind when nothing of the model arrived (see
    `_discard_if_nothing_arrived` for why what did arrive is kept).
    """
    source, target, key, precision = pending.source, pending.target, pending.key, pending.precision
    created = _missing_dirs(target)
    _claim(target, source)
    logger.info("downloading %s (%s) into %s", source.describe(), precision, target)
    try:
        if source.kind == HUGGINGFACE:
            _download_huggingface(source, target, precision, progress, key)
        else:
            _download_lumen(source, target, settings, precision, progress, key)
        _check_download(source, target, precision, key)
    except ResourceError:
        _discard_if_nothing_arrived(target, created)
        raise
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
            f"so lumen-vlm neither downloads into it nor changes it. It is not a usable model: {exc}. "
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


def _check_download(source: ModelSource, target: Path, precision: str, key: str) -> None:
    """The downloader reported no error: the files it fetched must make a model of this precision."""
    try:
        locate_model_files(target, precision)
    except ModelFilesError as exc:
        raise ModelFilesError(
            f"{key}: downloaded {source.describe()} into {target}, but it is not a usable model: {exc}. "
            f"The repo may not be a FastVLM export, or (a Lumen repo, fetched in {precision} only) may not "
            f"publish {precision} for every graph: choose a precision it has, or point {key} at a model "
            "directory you made."
        ) from exc


def _missing_dirs(target: Path) -> list[Path]:
    """`target` and those of its parents that do not exist yet, innermost first."""
    missing = []
    for path in (target, *target.parents):
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    return missing


def _discard_if_nothing_arrived(target: Path, created: list[Path]) -> None:
    """After a failed download: remove our directory when it holds nothing of the model.

    An empty claimed directory helps nobody and looks like a model to a person browsing the
    cache. Whatever did arrive is kept, and that is safe: the marker vouches for no precision
    until `_record_complete`, so no start serves it, and the next download reuses it (each file
    huggingface_hub keeps is whole: it writes to a temporary name and renames when done, and
    deletes the temporary file on failure; its metadata under ``.cache/huggingface`` makes the
    next snapshot skip files that are already there).
    """
    try:
        if _owns(target) and not _holds_model_files(target):
            shutil.rmtree(target)
        for parent in created[1:]:  # the cache and models directories, if this download made them
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
    except OSError as exc:
        logger.warning("could not remove %s after the failed download: %s", target, exc)


def _holds_model_files(target: Path) -> bool:
    """Any file besides bookkeeping: our marker and the downloaders' hidden top-level entries
    (huggingface_hub's ``.cache``, ModelScope's temporary folder)."""
    return any(path.is_file() and not path.relative_to(target).parts[0].startswith(".") for path in target.rglob("*"))


# --------------------------------------------------------------------------- downloaders


def hf_allow_patterns(precision: str, listing: Collection[str] = ()) -> list[str]:
    """What to fetch of an onnx-community repo: the small files, and each graph with its data files.

    Each graph in `precision`, or, where the repo's `listing` lacks it, in the precision that
    `locate_model_files` will load it in (`best_graph`): so a repo that publishes, say, q4 for
    the decoder only still downloads into a model that loads.
    """
    patterns = list(HF_SMALL_FILE_PATTERNS)
    present = set(listing)
    for graph in GRAPHS:
        best = best_graph("onnx-community", graph, precision, lambda relative: relative.as_posix() in present)
        chosen = [best[0]] if best else graph_candidates("onnx-community", graph, precision)
        for relative in chosen:
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
        # Asked first, and the commit then pinned: when the hub cannot be reached, snapshot_download
        # does not raise if its local_dir is not empty (ours holds the marker) but returns it as
        # it is, with the reason only in a warning.
        info = huggingface_hub.model_info(source.repo, files_metadata=True)
        patterns = hf_allow_patterns(precision, [sibling.rfilename for sibling in info.siblings or []])
        _check_disk_space(target, _bytes_to_fetch(target, info.siblings or [], patterns))
        huggingface_hub.snapshot_download(
            repo_id=source.repo,
            revision=info.sha,
            local_dir=target,
            allow_patterns=patterns,
            tqdm_class=None if progress else _SilentTqdm,  # None: huggingface_hub's own bars
        )
    except Exception as exc:  # network, auth, missing repo, full disk: explained by `_failure`
        raise _download_error(_hf_hub(source.repo), target, key, exc) from exc


def _bytes_to_fetch(target: Path, siblings: list[Any], patterns: list[str]) -> int:
    """The size of the selected repo files that are not already in `target` at their full size."""
    sizes = {sibling.rfilename: sibling.size or 0 for sibling in siblings}
    wanted = filter_repo_objects(list(sizes), allow_patterns=patterns)
    return sum(sizes[name] for name in wanted if not _has_size(target / name, sizes[name]))


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _check_disk_space(target: Path, needed: int) -> None:
    """Refuse before downloading what the disk cannot hold (huggingface_hub only warns)."""
    free = shutil.disk_usage(target).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"the download needs {_size(needed)} but only {_size(free)} is free", str(target))


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class _RecordingPlatform:
    """lumen-resources' Platform, keeping the exception of a failed download.

    The Downloader reports a failure only as ``result.error``, a string: the exception, whose
    causes say what failed (network, missing repo, full disk), is kept here.
    """

    def __init__(self, platform: Any) -> None:
        self._platform = platform
        self.error: BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._platform, name)

    def download_model(self, *args: Any, **kwargs: Any) -> Path:
        try:
            return self._platform.download_model(*args, **kwargs)
        except BaseException as exc:
            self.error = exc
            raise


class LumenDownloadFailed(Exception):
    """lumen-resources' Downloader failed after the download itself (its model_info.json checks)."""


def _download_lumen(
    source: ModelSource, target: Path, settings: VLMSettings, precision: str, progress: bool, key: str
) -> None:
    config = _lumen_download_config(source, settings, precision)
    try:
        downloader = lumen_downloader.Downloader(config, verbose=progress)
    except Exception as exc:  # e.g. the platform's SDK is missing
        raise _download_error(_lumen_hub(source.repo, None), target, key, exc) from exc
    platform = downloader.platform = _RecordingPlatform(downloader.platform)
    hub = _lumen_hub(source.repo, platform)
    try:
        results = downloader.download_all()
    except Exception as exc:
        raise _download_error(hub, target, key, exc) from exc
    result = results.get(f"{settings.service_name}:{settings.model.alias}")
    if result is None or not result.success:
        error = platform.error or LumenDownloadFailed(result.error if result is not None else "no result")
        raise _download_error(hub, target, key, error) from error
    if result.model_path is None or result.model_path.resolve() != target.resolve():
        raise ModelFilesError(f"{key}: lumen-resources put {source.repo} in {result.model_path}, expected {target}")


# --------------------------------------------------------------------------- download failures


@dataclass(frozen=True)
class _Hub:
    """Where a download comes from, as its errors name it."""

    failed: str  # "could not download REPO from HUB"
    command: str | None  # a command that downloads the repo on another machine, into DIR


def _hf_hub(repo: str) -> _Hub:
    name = f"Hugging Face ({huggingface_hub.constants.ENDPOINT})"
    return _Hub(f"could not download {repo} from {name}", f"hf download {repo} --local-dir DIR")


def _lumen_hub(repo: str, platform: Any) -> _Hub:
    """lumen-resources' hub for a Lumen repo: its platform (None if it could not be made) knows which."""
    if platform is None:
        return _Hub(f"lumen-resources could not download {repo}", None)
    repo_id = f"{platform.owner}/{repo}"
    if platform.platform_type.value == "modelscope":
        name, command = "ModelScope", f"modelscope download --model {repo_id} --local_dir DIR"
    else:
        name, command = "Hugging Face", f"hf download {repo_id} --local-dir DIR"
    return _Hub(f"lumen-resources could not download {repo} ({repo_id} on {name})", command)


@dataclass(frozen=True)
class _Failure:
    cause: str  # what failed
    remedy: str  # what to do about it on this machine ("" when there is nothing to say)


def _download_error(hub: _Hub, target: Path, key: str, exc: BaseException) -> ModelNotFoundError:
    """What failed, the repo, and what to do: the same for every hub."""
    failure = _failure(exc, target)
    elsewhere = (
        f"Or download it on another machine (`{hub.command}`), copy DIR here and set {key} to it."
        if hub.command
        else f"Or download it on another machine, copy the model directory here and set {key} to it."
    )
    remedy = f" {failure.remedy}" if failure.remedy else ""
    return ModelNotFoundError(f"{key}: {hub.failed}: {failure.cause}.{remedy} {elsewhere}")


def _failure(exc: BaseException, target: Path) -> _Failure:
    """Read what failed from the exception and the ones that caused it.

    huggingface_hub, ModelScope and the HTTP libraries under them each wrap the original error
    (the socket's, the disk's) in their own, so the whole chain is searched, the most telling
    case first.
    """
    chain = _exception_chain(exc)
    if any(isinstance(e, huggingface_hub.errors.OfflineModeIsEnabled) for e in chain):
        return _Failure(
            f"huggingface_hub is in offline mode (HF_HUB_OFFLINE is set) and {target} does not hold the model yet",
            "Unset HF_HUB_OFFLINE to let lumen-vlm download it.",
        )
    if any(isinstance(e, huggingface_hub.errors.GatedRepoError) for e in chain):
        return _Failure("the repo is gated", "Accept its terms on its web page and log in (`hf auth login`).")
    status = next((code for code in map(_http_status, chain) if code is not None), None)
    not_found = any(isinstance(e, huggingface_hub.errors.RepositoryNotFoundError) for e in chain)
    if not_found or status == 404:
        return _Failure("the hub has no such repo (or it is private)", "Check the model name in the config.")
    if status in (401, 403):
        return _Failure(f"the hub refused access to the repo (HTTP {status})", "Log in with a token that can read it.")
    if any(map(_is_disk_full, chain)):
        detail = next((e.strerror for e in chain if _is_disk_full_errno(e) and e.strerror), _NO_SPACE)
        return _Failure(
            f"not enough disk space: {detail} ({target.parent})",
            "Free some space there, or set cache_dir to a disk with room, and start again.",
        )
    denied = next((e for e in chain if isinstance(e, OSError) and e.errno in _NOT_WRITABLE), None)
    if denied is not None:
        return _Failure(
            f"cannot write into {target.parent}: {denied.strerror}",
            "Make it writable, or set cache_dir to a directory you can write, and start again.",
        )
    network = [e for e in chain if _is_network_error(e)]
    if network:
        return _Failure(
            f"the hub cannot be reached ({_os_detail(network[-1])})",  # the innermost: the socket's own words
            "Check the network connection, proxy and firewall, then start again.",
        )
    return _Failure(_first_line(exc), "")


_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.ENETDOWN}


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status an error carries: huggingface_hub's on its response, ModelScope's on itself."""
    for holder in (exc, getattr(exc, "response", None)):
        status = getattr(holder, "status_code", None)
        if isinstance(status, int):
            return status
    return None


_NO_SPACE = "No space left on device"


def _is_disk_full(exc: BaseException) -> bool:
    # hf_xet (Rust) reports I/O errors as text only: "No space left on device (os error 28)".
    return _is_disk_full_errno(exc) or _NO_SPACE in str(exc)


def _is_disk_full_errno(exc: BaseException) -> TypeGuard[OSError]:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    return isinstance(exc, OSError) and exc.errno in _UNREACHABLE


def _os_detail(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
