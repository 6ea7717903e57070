"""What installing lumen-vlm pulls, read from the installed package metadata (no network).

lumen-app installs every service as lumen-vlm[cpu], [cuda], [apple] or [openvino]. Each of
those must bring exactly one ONNX Runtime distribution: they all install the same `onnxruntime`
package, and two of them in one environment overwrite each other's files.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lumen_vlm.backends.ort_runtime import RUNTIME_EXTRAS, extras_hint, runtime_distributions, warn_if_several

from .conftest import REFERENCE_STACK, TINY_MODEL

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DIST = "lumen-vlm"
# The extra lumen-app asks for -> the one ONNX Runtime distribution it must bring.
EXPECTED_RUNTIME = {
    "cpu": "onnxruntime",
    "apple": "onnxruntime",  # macOS's onnxruntime wheel has CoreML
    "cuda": "onnxruntime-gpu",
    "openvino": "onnxruntime-openvino",
}
# Distributions that install the `onnxruntime` package (any one of them conflicts with the others).
ORT_DISTRIBUTIONS = {
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "onnxruntime-directml",
    "onnxruntime-qnn",
    "onnxruntime-rocm",
    "onnxruntime-migraphx",
    "onnxruntime-training",
    "onnxruntime-silicon",
    "onnxruntime-cann",
    *runtime_distributions(),
}
# The oldest tokenizers that reads a tokenizer.json whose BPE merges are [left, right] pairs
# (0.19.1 fails: "data did not match any variant of untagged enum ModelWrapper").
TOKENIZERS_READING_PAIRS = "0.20.0"


def applies(requirement: Requirement, extras: Iterable[str]) -> bool:
    """Whether pip installs `requirement` for a package installed with `extras`, here."""
    marker: Marker | None = requirement.marker
    return marker is None or any(marker.evaluate({"extra": extra}) for extra in {"", *extras})


def installed_requirements(name: str) -> list[Requirement] | None:
    """The installed distribution's requirements, or None when it is not installed."""
    try:
        return [Requirement(line) for line in metadata.requires(name) or []]
    except metadata.PackageNotFoundError:
        return None


def pulled(extras: Iterable[str] = ()) -> set[str]:
    """Every distribution that installing lumen-vlm[extras] pulls, walking each dependency's own
    requirements (with the extras asked of it) as far as they are installed here."""
    names: set[str] = set()
    todo, done = [(DIST, frozenset(extras))], set()
    while todo:
        name, asked = todo.pop()
        if (name, asked) in done:
            continue
        done.add((name, asked))
        for requirement in installed_requirements(name) or []:
            if applies(requirement, asked):
                dependency = canonicalize_name(requirement.name)
                names.add(dependency)
                todo.append((dependency, frozenset(requirement.extras)))
    return names


def requirement_key(requirement: Requirement) -> str:
    return f"{canonicalize_name(requirement.name)}{sorted(requirement.extras)}{requirement.specifier}"


def declared(extra: str | None) -> set[str]:
    """What pyproject.toml declares for the base install (None) or for one extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {requirement_key(Requirement(line)) for line in lines}


def installed(extra: str | None) -> set[str]:
    """What the installed metadata requires for the base install (None) or for one extra only."""
    requirements = installed_requirements(DIST) or []
    if extra is None:
        return {requirement_key(r) for r in requirements if applies(r, ())}
    return {requirement_key(r) for r in requirements if applies(r, [extra]) and not applies(r, ())}


def installed_from_elsewhere() -> str | None:
    """The checkout an editable install of lumen-vlm points at, when it is not this one."""
    direct_url = json.loads(metadata.distribution(DIST).read_text("direct_url.json") or "{}")
    url = direct_url.get("url", "")
    if not (direct_url.get("dir_info", {}).get("editable") and url.startswith("file://")):
        return None
    source = Path(url2pathname(urlparse(url).path)).resolve()
    return None if source == ROOT else str(source)


@pytest.fixture(scope="module")
def extras() -> list[str]:
    """The installed metadata's extras, once it is known to describe this checkout's pyproject.toml."""
    if elsewhere := installed_from_elsewhere():
        pytest.skip(f"lumen-vlm is installed from {elsewhere}: its metadata is not this checkout's")
    provided = metadata.metadata(DIST).get_all("Provides-Extra") or []
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    stale = "the installed lumen-vlm metadata is not this checkout's pyproject.toml: run pip install -e ."
    assert set(provided) == set(project["optional-dependencies"]), stale
    for extra in [None, *provided]:
        assert installed(extra) == declared(extra), f"{stale} ({extra or 'base'} requirements differ)"
    return provided


def test_the_runtime_extras_are_the_ones_lumen_app_installs(extras: list[str]) -> None:
    assert set(EXPECTED_RUNTIME) <= set(extras)
    assert set(RUNTIME_EXTRAS) == set(EXPECTED_RUNTIME), "the missing-runtime message names these extras"


@pytest.mark.parametrize("extra", sorted(EXPECTED_RUNTIME))
def test_each_runtime_extra_brings_exactly_one_onnx_runtime(extras: list[str], extra: str) -> None:
    assert pulled([extra]) & ORT_DISTRIBUTIONS == {EXPECTED_RUNTIME[extra]}


def test_cuda_does_not_also_pull_the_cpu_onnxruntime(extras: list[str]) -> None:
    everything = pulled(["cuda"])
    assert "onnxruntime-gpu" in everything
    assert "onnxruntime" not in everything


def test_the_base_install_pulls_no_onnx_runtime(extras: list[str]) -> None:
    assert pulled() & ORT_DISTRIBUTIONS == set()


@pytest.mark.parametrize("extra", ["test", "tools"])
def test_the_other_extras_pull_no_onnx_runtime_so_they_combine_with_any(extras: list[str], extra: str) -> None:
    assert pulled([extra]) & ORT_DISTRIBUTIONS == set()


def test_the_reference_tests_skip_on_what_the_tools_extra_adds(extras: list[str]) -> None:
    added = {canonicalize_name(Requirement(line).name) for line in declared("tools")} - {
        canonicalize_name(Requirement(line).name) for line in declared(None)
    }
    assert added == {canonicalize_name(name) for name in REFERENCE_STACK}


def test_the_test_extra_brings_what_the_q4_quantizer_imports(extras: list[str]) -> None:
    # onnxruntime's MatMulNBits quantizer imports onnx_ir without declaring it.
    assert "onnx-ir" in pulled(["test"])


# ------------------------------------------------------------------ tokenizers


def test_the_tokenizers_floor_reads_merges_written_as_pairs(extras: list[str]) -> None:
    [tokenizers] = [r for r in installed_requirements(DIST) or [] if r.name == "tokenizers"]
    assert "0.19.1" not in tokenizers.specifier
    assert tokenizers.specifier.contains(TOKENIZERS_READING_PAIRS)


def test_the_committed_tokenizer_writes_its_merges_as_pairs() -> None:
    """So every run of the suite reads the pairs form, the one that tokenizers 0.19 cannot."""
    merges = json.loads((TINY_MODEL / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert merges and all(isinstance(merge, list) and len(merge) == 2 for merge in merges)


# ------------------------------------------------------------------ at run time


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_without_onnx_runtime_the_cli_exits_2_naming_the_extras() -> None:
    # `None` in sys.modules makes `import onnxruntime` fail as if it were not installed.
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from lumen_vlm.cli import main\n"
        f"sys.exit(main(['describe', 'photo.jpg', '--model', {str(TINY_MODEL)!r}]))\n"
    )
    result = run_python(code)
    assert result.returncode == 2, result.stderr
    assert "ONNX Runtime is not installed" in result.stderr
    for extra in EXPECTED_RUNTIME:
        assert f"lumen-vlm[{extra}]" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_missing_runtime_message_names_every_runtime_extra() -> None:
    hint = extras_hint()
    assert [extra for extra in EXPECTED_RUNTIME if f"lumen-vlm[{extra}]" in hint] == list(EXPECTED_RUNTIME)


def test_two_runtime_distributions_are_found_by_the_package_they_both_install() -> None:
    packages = {"onnxruntime": ["onnxruntime", "onnxruntime_gpu"], "onnx": ["onnx"]}
    assert runtime_distributions(packages) == ["onnxruntime", "onnxruntime-gpu"]
    assert runtime_distributions({"onnx": ["onnx"]}) == []
    assert runtime_distributions() != [], "the installed runtime is found"


def test_two_runtime_distributions_are_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        warn_if_several(["onnxruntime"])
        assert caplog.records == []
        warn_if_several(["onnxruntime", "onnxruntime-gpu"])
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "onnxruntime, onnxruntime-gpu" in record.getMessage()


def test_importing_the_runtime_beside_a_second_distribution_warns_once() -> None:
    code = (
        "import logging; logging.basicConfig()\n"
        "from importlib import metadata\n"
        "real = metadata.packages_distributions()\n"
        "metadata.packages_distributions = lambda: {**real, 'onnxruntime': ['onnxruntime', 'onnxruntime-gpu']}\n"
        "import lumen_vlm.backends.ort_runtime\n"
        "import lumen_vlm.backends.onnxrt_backend\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("several ONNX Runtime distributions are installed") == 1, result.stderr
