"""The on-disk cache of derived graphs, and ONNX Runtime's optimized graphs saved in it.

Loading a graph normally makes ORT parse every weight into memory and then build fused and
re-laid copies of many of them, keeping both: measured on FastVLM-0.5B's vision encoder at
1024 px, 960 MB resident for a 507 MB file, plus a ~520 MB transient while protobuf parses the
inline weights of the embedding and decoder files. A graph that ORT saved after optimizing,
with its weights in a side file, loads with the optimizer off and its weights memory-mapped:
one copy, no transient, same kernels, same numbers.

The saved graph may hold hardware-specific rewrites, so the cache key names the source file,
the ORT version and the machine; it is used for the CPU provider only.

The decoder is not saved that way (see FastVLMONNXBackend) but rewritten by this project
(decoder.py); its copy lives in the same cache, as an entry of its own kind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..backends.ort_runtime import copy_options, ort
from ..resources.model_files import graph_files

log = logging.getLogger(__name__)

GRAPH_NAME = "model.onnx"
WEIGHTS_NAME = "model.onnx.data"
# The kinds of entry, spelled as the end of their folder's name.
OPTIMIZED_KIND = ""  # ORT's optimized graph
DECODER_KIND = "-decoder"  # this project's rewritten decoder
# Execution providers as InferenceSession takes them: names, or (name, options) pairs.
Providers = Sequence[str | tuple[str, dict[str, Any]]]


def _machine_fingerprint() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _source_ids(source: Path) -> tuple[str, str]:
    """(the source graph's path, its version: size and mtime of it and its weight files)."""
    version = []
    for path in graph_files(source):
        stat = path.stat()
        version.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return _digest([str(source.resolve())]), _digest(version)


def _environment(options: ort.SessionOptions) -> list[str]:
    """What ORT's optimized graph depends on besides its source."""
    return [ort.__version__, str(options.graph_optimization_level), _machine_fingerprint()]


def _kind(entry_name: str) -> str:
    return DECODER_KIND if entry_name.endswith(DECODER_KIND) else OPTIMIZED_KIND


class OptimizedGraphCache:
    """Saved derived graphs under `root`: one folder per source graph, kind of derived graph, and
    what the derived graph depends on besides its source."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, source: Path, options: ort.SessionOptions, providers: Providers) -> ort.InferenceSession:
        """A session on the saved optimized graph, saving it first if needed; the source graph
        itself when the cache cannot be used (read-only or full disk, a damaged entry)."""
        target = self.entry(source, _environment(options), OPTIMIZED_KIND)
        try:
            if not (target / GRAPH_NAME).is_file():
                self._save_optimized(source, options, providers, target)
            return ort.InferenceSession(
                str(target / GRAPH_NAME),
                sess_options=copy_options(options, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                providers=providers,
            )
        except Exception as exc:  # the cache is an optimization: never a reason to fail a load
            log.warning("not using a saved optimized %s (%s)", source.name, exc)
            shutil.rmtree(target, ignore_errors=True)
            return ort.InferenceSession(str(source), sess_options=options, providers=providers)

    def entry(self, source: Path, depends_on: list[str], kind: str) -> Path:
        """The folder of `source`'s derived graph of `kind`, made with what `depends_on` names."""
        path_id, version_id = _source_ids(source)
        return self.root / f"{path_id}-{version_id}-{_digest(depends_on)}{kind}"

    def write_entry(self, target: Path, what: str, write: Callable[[Path], None]) -> None:
        """Write an entry in a staging folder, then rename it into place; concurrent writers race
        harmlessly (the first rename wins)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale(target)
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=self.root))
        try:
            write(staging)
            try:
                os.rename(staging, target)  # atomic; fails if another process got there first
            except OSError:
                pass
            else:
                log.info("saved a derived copy of %s in %s", what, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _save_optimized(self, source: Path, options: ort.SessionOptions, providers: Providers, target: Path) -> None:
        """Let ORT optimize `source` once and write the result."""

        def save(staging: Path) -> None:
            saving = copy_options(options)
            saving.optimized_model_filepath = str(staging / GRAPH_NAME)
            saving.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS_NAME)
            saving.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            ort.InferenceSession(str(source), sess_options=saving, providers=providers)

        self.write_entry(target, source.name, save)

    def _remove_stale(self, target: Path) -> None:
        """Drop older entries of the same kind for the same source (another version of its
        files, of ORT, of the machine) and staging folders a killed process left, an hour old."""
        source_prefix = target.name.split("-", 1)[0] + "-"
        kind = _kind(target.name)
        hour_ago = time.time() - 3600
        for entry in self.root.iterdir():
            stale_staging = entry.name.startswith(".saving-") and entry.stat().st_mtime < hour_ago
            same_kind = entry.name.startswith(source_prefix) and _kind(entry.name) == kind
            if entry != target and (same_kind or stale_staging):
                shutil.rmtree(entry, ignore_errors=True)
