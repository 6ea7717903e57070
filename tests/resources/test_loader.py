"""Model resolution: local directories, Hugging Face repos, Lumen names, and never touching what isn't ours.

No test reaches the network. Most replace huggingface_hub's calls and lumen-resources' platform
by fakes that write files the way the real ones lay them out. The download failures run the real
clients in a process of their own (they read their endpoint and offline switch from the
environment at import), against loopback endpoints, with every cache in a temporary directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import huggingface_hub
import pytest
from huggingface_hub.utils import filter_repo_objects
from lumen_resources import downloader as lumen_downloader

from lumen_vlm.resources.exceptions import ModelFilesError, ModelNotFoundError
from lumen_vlm.resources.loader import (
    KNOWN_MODELS,
    MARKER_NAME,
    cache_target,
    hf_allow_patterns,
    resolve_model,
    served_model_id,
)
from lumen_vlm.resources.model_files import locate_model_files
from lumen_vlm.resources.settings import ModelSettings, VLMSettings
from tests.conftest import TINY_MODEL
from tests.resources.loopback_hub import LoopbackHub, loopback_hub

HF_REPO = "onnx-community/FastVLM-0.5B-ONNX"
HF_DIRNAME = "onnx-community--FastVLM-0.5B-ONNX"
_PRECISION_SUFFIXES = ("", "_bnb4", "_fp16", "_int8", "_q4", "_q4f16", "_quantized", "_uint8")
# The file listing of onnx-community/FastVLM-0.5B-ONNX as its public page shows it (the small
# files, every graph in eight precisions), plus external-data side files such as larger exports
# carry (that repository keeps its graphs inline), to check that those come along too.
ONNX_COMMUNITY_LISTING = [
    ".gitattributes",
    "LICENSE",
    "README.md",
    "added_tokens.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    *(
        f"onnx/{graph}{suffix}.onnx"
        for graph in ("decoder_model_merged", "embed_tokens", "vision_encoder")
        for suffix in _PRECISION_SUFFIXES
    ),
    "onnx/decoder_model_merged.onnx_data",
    "onnx/decoder_model_merged_fp16.onnx_data",
    "onnx/embed_tokens.onnx_data",
]
# What a model needs besides its graphs: the listing's top-level files but the repository's own.
SMALL_FILES = {name for name in ONNX_COMMUNITY_LISTING if "/" not in name} - {".gitattributes", "LICENSE", "README.md"}


def make_settings(
    model: str, cache_dir: Path, precision: str = "fp32", config_dir: Path | None = None, alias: str = "fastvlm"
) -> VLMSettings:
    return VLMSettings(
        cache_dir=cache_dir,
        model=ModelSettings(alias=alias, model=model, precision=precision),
        config_dir=config_dir,
    )


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and directory under root (hidden ones too), with file contents hashed."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture
def tiny_copy(tmp_path: Path) -> Path:
    """The tiny model copied out, so no test can modify the committed fixture."""
    return Path(shutil.copytree(TINY_MODEL, tmp_path / "my-model"))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache dir, with the working directory somewhere that holds no model-like paths."""
    workdir = tmp_path / "work" / "cwd"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    return tmp_path / "cache"


FAKE_COMMIT = "f" * 40


class FakeHub:
    """huggingface_hub over the real repo listing: model_info lists it, snapshot_download writes
    the files allow_patterns select (each file's content is its name)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.error: OSError | None = None  # raised by snapshot_download after `files_before_error` files
        self.files_before_error = 0

    def model_info(self, repo_id: str, *, files_metadata: bool = False, **kwargs: Any) -> SimpleNamespace:
        siblings = [SimpleNamespace(rfilename=name, size=len(name)) for name in ONNX_COMMUNITY_LISTING]
        return SimpleNamespace(id=repo_id, sha=FAKE_COMMIT, siblings=siblings if files_metadata else None)

    def __call__(self, repo_id: str, *, local_dir: Path, allow_patterns: list[str], **kwargs: Any) -> str:
        self.calls.append(
            {"repo_id": repo_id, "local_dir": Path(local_dir), "allow_patterns": allow_patterns, **kwargs}
        )
        for count, name in enumerate(filter_repo_objects(ONNX_COMMUNITY_LISTING, allow_patterns=allow_patterns)):
            if self.error is not None and count == self.files_before_error:
                raise self.error
            path = Path(local_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(name, encoding="utf-8")
        return str(local_dir)

    def downloaded(self, local_dir: Path) -> set[str]:
        return {str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file() and p.name != MARKER_NAME}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(huggingface_hub, "model_info", fake.model_info)
    return fake


class FakePlatform:
    """lumen-resources' Platform, writing a Lumen-layout model; cleanup deletes like the real one."""

    instances: ClassVar[list[FakePlatform]] = []
    broken_model_info: ClassVar[bool] = False
    error: ClassVar[Exception | None] = None  # raised by download_model, as the real one would

    def __init__(self, platform_type: Any, owner: str) -> None:
        self.platform_type, self.owner = platform_type, owner
        self.downloads: list[dict[str, Any]] = []
        self.cleanups: list[Path] = []
        FakePlatform.instances.append(self)

    def download_model(self, repo_name: str, cache_dir: Path, allow_patterns: list[str], force: bool = False) -> Path:
        target = cache_dir / "models" / repo_name
        self.downloads.append({"repo_name": repo_name, "target": target, "allow_patterns": allow_patterns})
        if self.error is not None:
            raise lumen_downloader.DownloadError(f"Failed to download {self.owner}/{repo_name}: {self.error}") from (
                self.error
            )
        files = ["onnx/vision.fp32.onnx", "onnx/embed.fp32.onnx", "onnx/decoder.fp32.onnx", "tokenizer.json"]
        for name in [*files, "config.json"]:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_text(name, encoding="utf-8")
        # A broken model_info.json offers no onnx runtime, which fails the Downloader's own check.
        runtime = "rknn" if self.broken_model_info else "onnx"
        runtimes = {runtime: {"available": True, "files": files}}
        info = {
            "name": repo_name,
            "version": "1.0.0",
            "description": "FastVLM for Lumen",
            "model_type": "vlm",
            "source": {"format": "huggingface", "repo_id": "apple/FastVLM-0.5B"},
            "runtimes": runtimes,
        }
        (target / "model_info.json").write_text(json.dumps(info), encoding="utf-8")
        return target

    def cleanup_model(self, repo_name: str, cache_dir: Path) -> None:
        target = cache_dir / "models" / repo_name
        self.cleanups.append(target)
        shutil.rmtree(target)


@pytest.fixture
def lumen_platform(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakePlatform]]:
    """The real lumen-resources Downloader, over a fake platform."""
    FakePlatform.instances = []
    FakePlatform.broken_model_info = False
    FakePlatform.error = None
    monkeypatch.setattr(lumen_downloader, "Platform", FakePlatform)
    yield FakePlatform


@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no download expected")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "model_info", refuse)
    monkeypatch.setattr(lumen_downloader, "Downloader", refuse)


# --------------------------------------------------------------------------- local directories


@pytest.mark.usefixtures("no_downloads")
def test_local_dir_is_used_as_is(tiny_copy: Path, cache: Path) -> None:
    before = tree_digest(tiny_copy)
    assert resolve_model(make_settings(str(tiny_copy), cache)) == tiny_copy
    assert tree_digest(tiny_copy) == before  # nothing written, not even a marker
    assert not cache.exists()


@pytest.mark.usefixtures("no_downloads")
def test_local_dir_relative_to_config_dir_then_cwd(tiny_copy: Path, cache: Path, tmp_path: Path) -> None:
    assert resolve_model(make_settings("my-model", cache, config_dir=tmp_path)) == tiny_copy
    assert resolve_model(make_settings("../../my-model", cache)) == Path.cwd() / "../../my-model"


@pytest.mark.usefixtures("no_downloads")
def test_local_dir_with_tilde(tiny_copy: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model(make_settings("~/my-model", cache)) == tiny_copy


# --------------------------------------------------------------------------- Hugging Face


def test_hf_allow_patterns_select_exactly_one_precision() -> None:
    int8 = set(filter_repo_objects(ONNX_COMMUNITY_LISTING, allow_patterns=hf_allow_patterns("int8")))
    graphs = {"onnx/vision_encoder_int8.onnx", "onnx/embed_tokens_int8.onnx", "onnx/decoder_model_merged_int8.onnx"}
    assert int8 == SMALL_FILES | graphs
    assert "onnx/decoder_model_merged_q4.onnx" not in int8
    fp32 = set(filter_repo_objects(ONNX_COMMUNITY_LISTING, allow_patterns=hf_allow_patterns("fp32")))
    assert fp32 - SMALL_FILES == {
        "onnx/vision_encoder.onnx",
        "onnx/embed_tokens.onnx",
        "onnx/embed_tokens.onnx_data",
        "onnx/decoder_model_merged.onnx",
        "onnx/decoder_model_merged.onnx_data",
    }
    fp16 = set(filter_repo_objects(ONNX_COMMUNITY_LISTING, allow_patterns=hf_allow_patterns("fp16")))
    assert "onnx/decoder_model_merged_fp16.onnx_data" in fp16
    assert "onnx/decoder_model_merged.onnx_data" not in fp16


def test_hf_allow_patterns_take_the_best_precision_the_repo_has_for_each_graph() -> None:
    """A repo without the requested precision for some graph: that graph comes in the precision
    locate_model_files will load it in, the others in the one asked for."""
    listing = [name for name in ONNX_COMMUNITY_LISTING if name not in {"onnx/vision_encoder_q4.onnx"}]
    listing.remove("onnx/embed_tokens_q4.onnx")
    listing.remove("onnx/embed_tokens.onnx")
    listing.remove("onnx/embed_tokens.onnx_data")
    chosen = set(filter_repo_objects(listing, allow_patterns=hf_allow_patterns("q4", listing)))
    assert chosen - SMALL_FILES == {
        "onnx/vision_encoder.onnx",  # no q4 vision encoder: fp32, the first of the fallback order
        "onnx/embed_tokens_fp16.onnx",  # neither q4 nor fp32 embedding: fp16
        "onnx/decoder_model_merged_q4.onnx",
    }
    # Without a listing (or with one that has the requested precision throughout), the requested one.
    assert hf_allow_patterns("q4") == hf_allow_patterns("q4", ONNX_COMMUNITY_LISTING)


def test_hf_repo_downloads_one_precision_once(hub: FakeHub, cache: Path) -> None:
    settings = make_settings(HF_REPO, cache, precision="int8")
    target = resolve_model(settings, progress=False)
    assert target == cache.resolve() / "models" / HF_DIRNAME
    (call,) = hub.calls
    assert call["repo_id"] == HF_REPO
    assert call["local_dir"] == target
    assert call["local_dir"].is_relative_to(cache.resolve() / "models")
    assert call["tqdm_class"] is not None  # progress=False: silent bars
    assert hub.downloaded(target) == SMALL_FILES | {
        "onnx/vision_encoder_int8.onnx",
        "onnx/embed_tokens_int8.onnx",
        "onnx/decoder_model_merged_int8.onnx",
    }
    assert locate_model_files(target, "int8").precision == "int8"
    marker = json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))
    assert marker["complete_precisions"] == ["int8"]

    assert resolve_model(settings) == target  # complete: no second download
    assert len(hub.calls) == 1

    fp16 = resolve_model(make_settings(HF_REPO, cache, precision="fp16"))  # our dir: another precision joins
    assert fp16 == target and len(hub.calls) == 2
    assert hub.calls[1]["tqdm_class"] is None  # progress=True: huggingface_hub's own bars
    assert json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))["complete_precisions"] == ["fp16", "int8"]


def test_known_name_maps_to_hf_repo(hub: FakeHub, cache: Path) -> None:
    assert KNOWN_MODELS["fastvlm-0.5b"].repo == HF_REPO
    target = resolve_model(make_settings("fastvlm-0.5b", cache, precision="q4"))
    assert target.name == HF_DIRNAME  # the alias and the repo id share one download
    assert hub.calls[0]["repo_id"] == HF_REPO
    assert "onnx/decoder_model_merged_q4.onnx" in hub.downloaded(target)


def test_failed_hf_download_keeps_what_arrived_and_completes_it_next_time(hub: FakeHub, cache: Path) -> None:
    settings = make_settings(HF_REPO, cache, precision="int8")
    hub.error, hub.files_before_error = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), 3
    with pytest.raises(ModelNotFoundError, match=re.escape("could not download onnx-community/FastVLM-0.5B-ONNX")):
        resolve_model(settings)
    target = cache.resolve() / "models" / HF_DIRNAME
    assert (target / MARKER_NAME).is_file()  # claimed before downloading: the leftovers stay ours
    assert len(hub.downloaded(target)) == 3
    with pytest.raises(ModelNotFoundError, match="not downloaded yet"):  # and vouch for nothing
        resolve_model(settings, download=False)
    hub.error = None
    assert resolve_model(settings) == target
    assert len(hub.calls) == 2


def test_failed_hf_download_with_nothing_arrived_leaves_nothing_behind(hub: FakeHub, cache: Path) -> None:
    hub.error = OSError(errno.ENETUNREACH, "Network is unreachable")
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(make_settings(HF_REPO, cache, precision="int8"))
    message = str(caught.value)
    assert "the hub cannot be reached (network is unreachable)" in message
    assert f"hf download {HF_REPO} --local-dir DIR" in message
    assert not cache.exists()  # neither the claimed model directory nor the cache it made


def test_a_full_disk_during_the_download_is_named(hub: FakeHub, cache: Path) -> None:
    hub.error, hub.files_before_error = OSError(errno.ENOSPC, "No space left on device"), 2
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(make_settings(HF_REPO, cache, precision="int8"))
    message = str(caught.value)
    assert f"could not download {HF_REPO}" in message
    assert "not enough disk space: No space left on device" in message
    assert "set cache_dir to a disk with room" in message


# --------------------------------------------------------------------------- Lumen names


def test_lumen_name_downloads_through_lumen_resources(lumen_platform: type[FakePlatform], cache: Path) -> None:
    settings = make_settings("FastVLM-0.5B", cache)
    target = resolve_model(settings, progress=False)
    assert target == cache.resolve() / "models" / "FastVLM-0.5B"
    (platform,) = lumen_platform.instances
    (download,) = platform.downloads
    assert download["repo_name"] == "FastVLM-0.5B"
    assert "*.fp32.onnx" in download["allow_patterns"]
    assert locate_model_files(target, "fp32").layout == "lumen"
    assert json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))["complete_precisions"] == ["fp32"]
    assert resolve_model(settings) == target  # complete: the Downloader is not run again
    assert len(lumen_platform.instances) == 1


@pytest.mark.parametrize("precision", ["q4f16", "q4fp16"])
def test_lumen_resources_gets_the_lumen_repos_spelling_of_q4f16(
    lumen_platform: type[FakePlatform], cache: Path, precision: str
) -> None:
    # lumen-resources fetches *.{precision}.onnx, and the LumilioPhotos repos name it q4fp16.
    target = resolve_model(make_settings("FastVLM-0.5B", cache, precision=precision), progress=False)
    (download,) = lumen_platform.instances[0].downloads
    assert "*.q4fp16.onnx" in download["allow_patterns"]
    assert not any("q4f16" in pattern for pattern in download["allow_patterns"])
    assert json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))["complete_precisions"] == ["q4f16"]
    # Hugging Face's onnx-community repos spell it q4f16.
    assert "onnx/decoder_model_merged_q4f16.onnx" in hf_allow_patterns("q4f16")


def test_a_failed_lumen_download_reads_like_a_hugging_face_one(lumen_platform: type[FakePlatform], cache: Path) -> None:
    """lumen-resources' Downloader keeps only the error's text; the cause is still found and named."""
    lumen_platform.error = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(make_settings("FastVLM-0.5B", cache))
    message = str(caught.value)
    assert "lumen-resources could not download FastVLM-0.5B (LumilioPhotos/FastVLM-0.5B on ModelScope)" in message
    assert "not enough disk space: No space left on device" in message
    assert "modelscope download --model LumilioPhotos/FastVLM-0.5B --local_dir DIR" in message
    assert "services.vlm.models.fastvlm.model to it" in message
    assert not (cache / "models" / "FastVLM-0.5B").exists()


def test_lumen_rollback_only_removes_our_own_new_directory(lumen_platform: type[FakePlatform], cache: Path) -> None:
    lumen_platform.broken_model_info = True  # the Downloader's check fails and it deletes the directory
    with pytest.raises(ModelNotFoundError, match=re.escape("lumen-resources could not download FastVLM-0.5B")):
        resolve_model(make_settings("FastVLM-0.5B", cache))
    (platform,) = lumen_platform.instances
    assert platform.cleanups == [cache.resolve() / "models" / "FastVLM-0.5B"]
    assert not platform.cleanups[0].exists()


# --------------------------------------------------------------------------- directories that are not ours


@pytest.mark.parametrize("name", [HF_REPO, "FastVLM-0.5B", "my-own-model"])
@pytest.mark.usefixtures("no_downloads")
def test_user_made_incomplete_dir_is_never_touched(name: str, cache: Path) -> None:
    dirname = HF_DIRNAME if name == HF_REPO else name
    user_dir = cache / "models" / dirname
    (user_dir / "onnx").mkdir(parents=True)
    (user_dir / "config.json").write_text("{}", encoding="utf-8")
    (user_dir / "notes.txt").write_text("mine", encoding="utf-8")
    before = tree_digest(user_dir)
    with pytest.raises(ModelFilesError) as caught:
        resolve_model(make_settings(name, cache, precision="int8"))
    message = str(caught.value)
    assert "not downloaded by lumen-vlm" in message and MARKER_NAME in message
    assert "no int8 vision graph (expected onnx/vision_encoder_int8.onnx)" in message  # what is missing
    assert "services.vlm.models.fastvlm.model" in message
    assert tree_digest(user_dir) == before


@pytest.mark.parametrize("name", [HF_REPO, "FastVLM-0.5B", "my-own-model"])
@pytest.mark.usefixtures("no_downloads")
def test_user_made_complete_dir_is_used_read_only(name: str, cache: Path) -> None:
    dirname = HF_DIRNAME if name == HF_REPO else name
    user_dir = Path(shutil.copytree(TINY_MODEL, cache / "models" / dirname))
    before = tree_digest(user_dir)
    assert resolve_model(make_settings(name, cache)) == cache.resolve() / "models" / dirname
    assert tree_digest(user_dir) == before


@pytest.mark.usefixtures("no_downloads")
def test_symlinked_cache_entry_is_never_ours(tiny_copy: Path, cache: Path) -> None:
    (cache / "models").mkdir(parents=True)
    link = cache / "models" / HF_DIRNAME
    link.symlink_to(tiny_copy, target_is_directory=True)
    (tiny_copy / MARKER_NAME).write_text("{}", encoding="utf-8")  # even a marker behind a link does not count
    before = tree_digest(tiny_copy)
    # Not ours, so nothing is downloaded for int8 (no_downloads would fail the test): the
    # directory is used as it is, its graphs falling back to fp32.
    assert resolve_model(make_settings(HF_REPO, cache, precision="int8")) == link
    assert resolve_model(make_settings(HF_REPO, cache)) == link  # complete in fp32: used as is
    assert tree_digest(tiny_copy) == before


# --------------------------------------------------------------------------- names that resolve to nothing


@pytest.mark.usefixtures("no_downloads")
def test_unknown_name_lists_known_names(cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(make_settings("fastvlm-2b", cache))
    message = str(caught.value)
    assert "services.vlm.models.fastvlm.model: unknown model 'fastvlm-2b'" in message
    for known in KNOWN_MODELS:
        assert known in message
    assert "local model directory" in message and "Hugging Face repo id" in message
    assert not cache.exists()


@pytest.mark.parametrize(
    "name",
    [
        "../etc",
        "../../etc/passwd",
        "/nonexistent/lumen-model",
        "~/no-such-model",
        "owner/../escape",
        "owner//name",
        "./name",
        "name/",
        "a/b/c",
        "owner\\name",
        "..\\etc",
        "owner--x/name",
        "na me",
        "",
    ],
)
@pytest.mark.usefixtures("no_downloads")
def test_names_that_could_escape_are_refused(
    name: str, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names that are not existing directories never map outside <cache>/models (an existing
    directory, even '..', is the user's own path and is used read-only)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config_dir = tmp_path / "work" / "cwd" / "conf"
    with pytest.raises(ModelNotFoundError, match=re.escape("services.vlm.models.fastvlm.model")):
        resolve_model(make_settings(name, cache, config_dir=config_dir))
    assert not cache.exists()


def test_cache_target_stays_inside(tmp_path: Path) -> None:
    root = tmp_path / "models"
    assert cache_target(root, "FastVLM-0.5B", "k") == root.resolve() / "FastVLM-0.5B"
    for dirname in ("..", ".", "a/b", "../x", "", "/etc"):
        with pytest.raises(ModelNotFoundError, match="would leave the model cache"):
            cache_target(root, dirname, "k")


# --------------------------------------------------------------------------- download=False


@pytest.mark.usefixtures("no_downloads")
def test_download_false_never_downloads(cache: Path) -> None:
    for name in (HF_REPO, "fastvlm-0.5b", "FastVLM-0.5B"):
        with pytest.raises(ModelNotFoundError, match=r"not downloaded yet .* downloading is turned off"):
            resolve_model(make_settings(name, cache), download=False)
    assert not cache.exists()


def test_download_false_uses_what_is_there(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = resolve_model(make_settings(HF_REPO, cache, precision="int8"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", None)  # any call would fail
    assert resolve_model(make_settings(HF_REPO, cache, precision="int8"), download=False) == target
    with pytest.raises(ModelNotFoundError, match="downloading is turned off"):
        resolve_model(make_settings(HF_REPO, cache, precision="fp16"), download=False)
    user_dir = Path(shutil.copytree(TINY_MODEL, cache / "models" / "FastVLM-0.5B"))
    assert resolve_model(make_settings("FastVLM-0.5B", cache), download=False) == user_dir.resolve()


# --------------------------------------------------------------------------- the served model id


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("fastvlm-0.5b", "fastvlm-0.5b"),  # a known name, not its cache directory's name
        (HF_REPO, HF_REPO),  # a repo id, as configured
        ("my-model", "my-model"),  # a plain name of a model placed in the cache
    ],
)
def test_the_served_model_id_is_the_configured_name(cache: Path, model: str, expected: str) -> None:
    model_dir = cache / "models" / HF_DIRNAME
    model_dir.mkdir(parents=True)
    assert served_model_id(make_settings(model, cache), model_dir) == expected


def test_a_local_path_is_served_under_its_directory_name(tiny_copy: Path, cache: Path) -> None:
    assert served_model_id(make_settings(str(tiny_copy), cache), tiny_copy) == "my-model"
    relative = make_settings("my-model", cache, config_dir=tiny_copy.parent)  # a path relative to the config
    assert served_model_id(relative, tiny_copy) == "my-model"


def test_model_info_names_the_served_model(lumen_platform: type[FakePlatform], cache: Path) -> None:
    settings = make_settings("FastVLM-0.5B", cache)
    target = resolve_model(settings, progress=False)
    info = json.loads((target / "model_info.json").read_text(encoding="utf-8"))
    (target / "model_info.json").write_text(json.dumps({**info, "name": "FastVLM 0.5B (Lumen)"}), encoding="utf-8")
    assert served_model_id(settings, target) == "FastVLM 0.5B (Lumen)"
    assert served_model_id(make_settings(str(target), cache), target) == "FastVLM 0.5B (Lumen)"  # even for a path


# --------------------------------------------------------------------------- failures, with the real clients

RESOLVE_SCRIPT = """
import os
import sys
from pathlib import Path
from lumen_vlm.resources.exceptions import ResourceError
from lumen_vlm.resources.loader import resolve_model
from lumen_vlm.resources.settings import ModelSettings, VLMSettings
model, cache = sys.argv[1], Path(sys.argv[2])
precision = os.environ.get("LUMEN_TEST_PRECISION", "fp32")
try:
    settings = VLMSettings(cache_dir=cache, model=ModelSettings("fastvlm", model, precision=precision))
    print(resolve_model(settings, progress=False))
except ResourceError as exc:
    print(exc)
    sys.exit(2)
"""
# Every endpoint, switch and cache the clients read from the environment; a test sets its own.
CLIENT_ENVIRONMENT = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN")


def resolve_in_own_process(model: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`resolve_model(model)` with the real huggingface_hub and ModelScope clients, which read
    their endpoints and offline switch once, at import: so each case gets a process of its own."""
    base = {name: value for name, value in os.environ.items() if name not in CLIENT_ENVIRONMENT}
    caches = {
        "HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "hf-home"),
        "MODELSCOPE_CACHE": str(tmp_path / "modelscope"),
        "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "1",  # a refused connection fails at once
    }
    command = [sys.executable, "-c", RESOLVE_SCRIPT, model, str(tmp_path / "cache")]
    return subprocess.run(
        command, env={**base, **caches, **env}, capture_output=True, text=True, timeout=120, check=False
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_explained(result: subprocess.CompletedProcess[str], tmp_path: Path, *phrases: str) -> None:
    """Exit 2 with one message naming the config key, the repo, the cause and the way out; no
    directory left behind."""
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stdout
    for phrase in (*phrases, "Or download it on another machine", "set services.vlm.models.fastvlm.model to it"):
        assert phrase in message, message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists(), sorted(str(p) for p in (tmp_path / "cache").rglob("*"))


def test_offline_mode_is_named(tmp_path: Path) -> None:
    result = resolve_in_own_process(HF_REPO, tmp_path, HF_HUB_OFFLINE="1")
    assert_explained(
        result,
        tmp_path,
        f"could not download {HF_REPO} from Hugging Face",
        "offline mode (HF_HUB_OFFLINE is set)",
        "Unset HF_HUB_OFFLINE",
        f"`hf download {HF_REPO} --local-dir DIR`",
    )


def test_an_unreachable_hub_is_named(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    result = resolve_in_own_process(HF_REPO, tmp_path, HF_ENDPOINT=endpoint)
    assert_explained(
        result,
        tmp_path,
        f"could not download {HF_REPO} from Hugging Face ({endpoint})",
        "the hub cannot be reached (connection refused)",
        "Check the network connection",
    )


@pytest.fixture
def tiny_hub() -> Iterator[LoopbackHub]:
    with loopback_hub("lumen-test/tiny-fastvlm", TINY_MODEL) as hub:
        yield hub


def test_a_repo_the_hub_does_not_have_is_named(tiny_hub: LoopbackHub, tmp_path: Path) -> None:
    result = resolve_in_own_process("lumen-test/no-such-model", tmp_path, HF_ENDPOINT=tiny_hub.url)
    assert_explained(
        result,
        tmp_path,
        "could not download lumen-test/no-such-model",
        "the hub has no such repo (or it is private)",
        "Check the model name",
    )


def test_a_download_larger_than_the_free_disk_is_refused_before_it_starts(
    tiny_hub: LoopbackHub, tmp_path: Path
) -> None:
    tiny_hub.reported_size["onnx/decoder_model_merged.onnx"] = 10**18  # an exabyte: no disk has it free
    result = resolve_in_own_process(tiny_hub.repo, tmp_path, HF_ENDPOINT=tiny_hub.url)
    assert_explained(
        result,
        tmp_path,
        "not enough disk space: the download needs 1000000000.0 GB but only",
        "set cache_dir to a disk with room",
    )
    assert not any("/resolve/" in request for request in tiny_hub.requests), "no file was fetched"


def test_a_download_from_a_loopback_hub_is_served_from_the_cache_afterwards(
    tiny_hub: LoopbackHub, tmp_path: Path
) -> None:
    """The whole path with the real client: the commit asked first, then pinned for every file."""
    result = resolve_in_own_process(tiny_hub.repo, tmp_path, HF_ENDPOINT=tiny_hub.url)
    assert result.returncode == 0, result.stdout + result.stderr
    target = Path(result.stdout.strip())
    assert target == (tmp_path / "cache").resolve() / "models" / "lumen-test--tiny-fastvlm"
    assert locate_model_files(target, "fp32").layout == "onnx-community"
    assert json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))["complete_precisions"] == ["fp32"]
    assert tree_digest(target / "onnx") == tree_digest(TINY_MODEL / "onnx")
    fetched = [request for request in tiny_hub.requests if "/resolve/" in request]
    assert fetched and all("/resolve/0123456789abcdef" in request for request in fetched)


def test_a_precision_the_repo_lacks_downloads_what_it_has(tiny_hub: LoopbackHub, tmp_path: Path) -> None:
    """The tiny repo publishes fp32 only: asking for q4 fetches the fp32 graphs, and the model loads."""
    result = resolve_in_own_process(tiny_hub.repo, tmp_path, HF_ENDPOINT=tiny_hub.url, LUMEN_TEST_PRECISION="q4")
    assert result.returncode == 0, result.stdout + result.stderr
    target = Path(result.stdout.strip())
    assert json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))["complete_precisions"] == ["q4"]
    assert locate_model_files(target, "q4").graph_precisions == {"vision": "fp32", "embed": "fp32", "decoder": "fp32"}


@pytest.mark.parametrize(
    ("hub_answer", "cause"),
    [("refused", "the hub cannot be reached (connection refused)"), ("404", "the hub has no such repo")],
)
def test_a_failed_lumen_download_through_modelscope_is_named(
    tiny_hub: LoopbackHub, tmp_path: Path, hub_answer: str, cause: str
) -> None:
    """lumen-resources downloads FastVLM-0.5B from ModelScope; the loopback hub has no such repo."""
    endpoint = tiny_hub.url if hub_answer == "404" else f"http://127.0.0.1:{closed_port()}"
    result = resolve_in_own_process("FastVLM-0.5B", tmp_path, MODELSCOPE_ENDPOINT=endpoint)
    assert_explained(
        result,
        tmp_path,
        "lumen-resources could not download FastVLM-0.5B (LumilioPhotos/FastVLM-0.5B on ModelScope)",
        cause,
        "`modelscope download --model LumilioPhotos/FastVLM-0.5B --local_dir DIR`",
    )
