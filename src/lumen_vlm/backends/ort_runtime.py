"""The one place that imports ONNX Runtime; every other module takes `ort` from here.

ONNX Runtime ships as several distributions (`onnxruntime`, `onnxruntime-gpu`,
`onnxruntime-openvino`, ...) that all install the same `onnxruntime` package, so two of them in
one environment overwrite each other's files. lumen-vlm's base install therefore brings none:
each of its runtime extras (RUNTIME_EXTRAS, declared in pyproject.toml) brings exactly one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from importlib import metadata

from ..resources.exceptions import ResourceError

log = logging.getLogger(__name__)

PACKAGE = "onnxruntime"
# lumen-vlm's extras that each bring one ONNX Runtime build, as lumen-app installs them, and
# what each is for. tests/test_packaging.py checks that pyproject.toml declares these.
RUNTIME_EXTRAS = {
    "cpu": "onnxruntime, any machine",
    "cuda": "onnxruntime-gpu, NVIDIA GPUs",
    "apple": "onnxruntime, whose macOS build has CoreML",
    "openvino": "onnxruntime-openvino, Intel CPUs and GPUs",
}


class OnnxRuntimeUnavailable(ResourceError, ImportError):
    """ONNX Runtime cannot be imported: lumen-vlm was installed without a runtime extra, or the
    runtime is broken. A ResourceError, so the command line reports it as a setup error (exit 2)."""


def extras_hint() -> str:
    """How to install a runtime, naming every runtime extra."""
    choices = "; ".join(f"lumen-vlm[{extra}] ({use})" for extra, use in RUNTIME_EXTRAS.items())
    return f"install lumen-vlm with the extra for this machine: {choices}"


def unavailable_message(error: ImportError) -> str:
    if isinstance(error, ModuleNotFoundError) and error.name == PACKAGE:
        return f"ONNX Runtime is not installed; {extras_hint()}"
    return f"ONNX Runtime is installed but cannot be imported ({error}); reinstall it: {extras_hint()}"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_distributions(packages: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The installed distributions that provide the `onnxruntime` package (normally one).

    `packages`: top-level package -> distributions, as importlib.metadata.packages_distributions()
    returns it (the default).
    """
    packages = metadata.packages_distributions() if packages is None else packages
    return sorted({_normalized(name) for name in packages.get(PACKAGE, ())})


def warn_if_several(distributions: Sequence[str]) -> None:
    """Two ONNX Runtime builds overwrite each other's files: a missing provider or a failed
    import follows, whichever was installed last. Say so once, where ORT is imported."""
    if len(distributions) > 1:
        log.warning(
            "several ONNX Runtime distributions are installed (%s); they overwrite each other's files, so "
            "providers may be missing or sessions fail. Keep one: pip uninstall %s, then %s",
            ", ".join(distributions),
            " ".join(distributions),
            extras_hint(),
        )


try:
    import onnxruntime as ort
except ImportError as exc:
    raise OnnxRuntimeUnavailable(unavailable_message(exc)) from exc

warn_if_several(runtime_distributions())


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


__all__ = ["RUNTIME_EXTRAS", "OnnxRuntimeUnavailable", "copy_options", "ort"]
