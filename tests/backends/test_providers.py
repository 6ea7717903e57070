"""Execution provider lists as lumen-app writes them: the available ones in order, or a clear error."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
import yaml

from lumen_vlm.backends import onnxrt_backend
from lumen_vlm.backends.backend_exceptions import BackendLoadError
from lumen_vlm.backends.onnxrt_backend import select_providers
from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager

from ..conftest import GOLDEN, TINY_MODEL

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
COREML = "CoreMLExecutionProvider"
COREML_OPTIONS = {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL"}  # as lumen-app's Apple preset
# Providers ONNX Runtime knows of but this machine's build lacks (CoreML, OpenVINO, ... on Linux).
MISSING_HERE = [name for name in ort.get_all_providers() if name not in ort.get_available_providers()]


@pytest.fixture(autouse=True)
def fresh_warnings() -> Iterator[None]:
    """Each test sees the skip warning as a fresh process would (it is logged once per process)."""
    onnxrt_backend._warn_skipped.cache_clear()
    yield
    onnxrt_backend._warn_skipped.cache_clear()


def skip_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "skipping" in r.getMessage()]


def test_a_list_takes_the_available_providers_in_its_order() -> None:
    configured = [[CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}], [COREML, COREML_OPTIONS], CPU]
    assert select_providers("auto", configured, [CPU]) == [CPU]
    assert select_providers("auto", configured, [CPU, CUDA]) == [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU]
    assert select_providers("auto", [CPU, [CUDA, {}]], [CUDA, CPU]) == [CPU, CUDA]


def test_skipped_providers_are_logged_once_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    configured = [[COREML, COREML_OPTIONS], "NoSuchExecutionProvider", CPU]
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # the server checks before loading, then loads: one warning all the same
            assert select_providers("auto", configured, [CPU]) == [CPU]
    [record] = skip_warnings(caplog)
    message = record.getMessage()
    assert f"{COREML}: not in this onnxruntime build" in message
    assert "NoSuchExecutionProvider: not an ONNX Runtime provider name" in message
    assert f"available: {CPU}" in message
    assert "MLProgram" not in message  # options are the user's, not the log's


def test_nothing_skipped_nothing_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert select_providers("auto", [CUDA, CPU], [CUDA, CPU]) == [CUDA, CPU]
    assert skip_warnings(caplog) == []


def test_a_list_with_none_available_names_them_and_the_available_ones() -> None:
    with pytest.raises(BackendLoadError) as raised:
        select_providers("auto", [[COREML, COREML_OPTIONS], CUDA], [CPU])
    message = str(raised.value)
    assert f"none of the execution providers {COREML}, {CUDA} is available" in message
    assert message.endswith(f"available: {CPU}")


def test_a_single_named_provider_must_be_available(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(BackendLoadError, match=f"execution provider {COREML} is not available.*available: {CPU}"):
        select_providers("auto", [[COREML, COREML_OPTIONS]], [CPU])
    assert skip_warnings(caplog) == []


def test_lumen_apps_spellings_are_read_as_onnx_runtimes() -> None:
    """lumen-app's presets write TensorRTExecutionProvider and DMLExecutionProvider."""
    trt = "TensorrtExecutionProvider"
    options = {"trt_fp16_enable": True}
    configured = [["TensorRTExecutionProvider", options], CUDA, CPU]
    assert select_providers("auto", configured, [trt, CUDA, CPU]) == [(trt, options), CUDA, CPU]
    assert select_providers("auto", ["DMLExecutionProvider", CPU], ["DmlExecutionProvider", CPU]) == [
        "DmlExecutionProvider",
        CPU,
    ]


def test_the_tiny_model_loads_with_an_apple_preset_on_a_machine_without_coreml() -> None:
    if COREML in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CoreML: the list would not skip it")
    manager = FastVLMModelManager.from_model_dir(TINY_MODEL, providers=[[COREML, COREML_OPTIONS], CPU])
    try:
        assert manager.describe().providers == (CPU,)
    finally:
        manager.close()


# ------------------------------------------------------------------ through the command line


def describe_with_providers(tmp_path: Path, providers: list[Any]) -> subprocess.CompletedProcess[str]:
    config = {
        "cache_dir": str(tmp_path / "cache"),
        "services": {
            "vlm": {
                "models": {"fastvlm": {"model": str(TINY_MODEL), "runtime": "onnx"}},
                "backend_settings": {"onnx_providers": providers},
            }
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    image = GOLDEN / "portrait.jpg"
    command = [sys.executable, "-m", "lumen_vlm", "describe", str(image), "--config", str(path)]
    return subprocess.run([*command, "--max-new-tokens", "3"], capture_output=True, text=True, timeout=120, check=False)


def test_the_cli_serves_with_the_available_part_of_a_list_warning_once(tmp_path: Path) -> None:
    result = describe_with_providers(tmp_path, [[MISSING_HERE[0], {}], CPU])
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("skipping execution providers") == 1, result.stderr
    assert f"{MISSING_HERE[0]}: not in this onnxruntime build" in result.stderr


def test_the_cli_exits_2_when_no_listed_provider_is_available(tmp_path: Path) -> None:
    result = describe_with_providers(tmp_path, [[MISSING_HERE[0], {}], MISSING_HERE[1]])
    assert result.returncode == 2, result.stderr
    assert "services.vlm.backend_settings.onnx_providers" in result.stderr
    assert f"none of the execution providers {MISSING_HERE[0]}, {MISSING_HERE[1]} is available" in result.stderr
    assert "Traceback" not in result.stderr
