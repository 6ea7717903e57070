"""ONNX Runtime's optimized graphs, saved once and reloaded without the optimizer.

Loading a graph normally makes ORT parse every weight into memory and then build fused and
re-laid copies of many of them, keeping both: measured on FastVLM-0.5B's vision encoder at
1024 px, 960 MB resident for a 507 MB file, plus a ~520 MB transient while protobuf parses the
inline weights of the embedding and decoder files. A graph that ORT saved after optimizing,
with its weights in a side file, loads with the optimizer off and its weights memory-mapped:
one copy, no transient, same kernels, same numbers.

The saved graph may hold hardware-specific rewrites, so the cache key names the source file,
the ORT version and the machine; it is used for the CPU provider only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

GRAPH_NAME = "model.onnx"
WEIGHTS_NAME = "model.onnx.data"


def copy_options(options: ort.SessionOptions, **changes: object) -> ort.SessionOptions:
    """A new SessionOptions with the fields this project sets, then `changes` applied."""
    copy = ort.SessionOptions()
    for name in (
        "graph_optimization_level",
        "intra_op_num_threads",
        "inter_op_num_threads",
        "execution_mode",
        "log_severity_level",
        "enable_cpu_mem_arena",
    ):
        setattr(copy, name, changes.get(name, getattr(options, name)))
    return copy


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


def source_ids(source: Path) -> tuple[str, str]:
    """(the source graph's path, its version: size and mtime of it and its weight files)."""
    version = []
    for path in sorted(source.parent.glob(source.name + "*")):  # X.onnx, X.onnx_data, X.onnx.data
        stat = path.stat()
        version.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return _digest([str(source.resolve())]), _digest(version)


def environment_id(options: ort.SessionOptions) -> str:
    """Names what the optimized graph depends on besides its source."""
    return _digest([ort.__version__, str(options.graph_optimization_level), _machine_fingerprint()])


class OptimizedGraphCache:
    """Saved optimized graphs under `root`, one directory per source graph and environment."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, source: Path, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
        """A session on the saved optimized graph, saving it first if needed; the source graph
        itself when the cache cannot be used (read-only or full disk, a damaged entry)."""
        path_id, version_id = source_ids(source)
        target = self.root / f"{path_id}-{version_id}-{environment_id(options)}"
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

    def _save_optimized(self, source: Path, options: ort.SessionOptions, providers: list, target: Path) -> None:
        """Let ORT optimize `source` once and write the result; concurrent writers race harmlessly."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale(target)
        staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=self.root))
        try:
            saving = copy_options(options)
            saving.optimized_model_filepath = str(staging / GRAPH_NAME)
            saving.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS_NAME)
            saving.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            ort.InferenceSession(str(source), sess_options=saving, providers=providers)
            try:
                os.rename(staging, target)  # atomic; fails if another process got there first
            except OSError:
                pass
            else:
                log.info("saved ORT's optimized %s for faster, leaner loading", source.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _remove_stale(self, target: Path) -> None:
        """Drop older saves of the same source (another version of its files, of ORT, of the
        machine) and staging folders a killed process left behind, an hour or more old."""
        source_prefix = target.name.split("-", 1)[0] + "-"
        hour_ago = time.time() - 3600
        for entry in self.root.iterdir():
            stale_staging = entry.name.startswith(".saving-") and entry.stat().st_mtime < hour_ago
            if entry != target and (entry.name.startswith(source_prefix) or stale_staging):
                shutil.rmtree(entry, ignore_errors=True)
