"""Every way a model directory can be broken is a ModelFilesError naming the config key and the
file, before loading where the JSON tells, at load where only the graphs can; the CLI exits 2."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import helper, numpy_helper

from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager
from lumen_vlm.resources.exceptions import ModelFilesError
from lumen_vlm.resources.settings import ModelSettings, VLMSettings
from tests.conftest import GOLDEN
from tests.server.test_server_process import free_port, write_config

from .model_dirs import community_model, edit_json, lumen_model, make_vision_input_dynamic, tiny_graph

KEY = "services.vlm.models.fastvlm"


def settings_for(model_dir: Path, cache_dir: Path, precision: str = "fp32") -> VLMSettings:
    return VLMSettings(
        cache_dir=cache_dir, model=ModelSettings(alias="fastvlm", model=str(model_dir), precision=precision)
    )


def vision_config(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda d: edit_json(d / "model_info.json", lambda info: change(info["extra_metadata"]["vision_config"]))


def write(name: str, text: str) -> Callable[[Path], None]:
    return lambda d: (d / name).write_text(text, encoding="utf-8")


# (layout, how the directory is broken, the file it names, what the message says)
BROKEN_FILES: dict[str, tuple[str, Callable[[Path], None], str, str]] = {
    "config-not-json": ("community", write("config.json", "{not json"), "config.json", "cannot read"),
    "config-not-an-object": ("community", write("config.json", "[1, 2]"), "config.json", "does not hold a JSON object"),
    "model-info-not-json": ("lumen", write("model_info.json", '{"name": '), "model_info.json", "cannot read"),
    "extra-metadata-not-an-object": (
        "lumen",
        lambda d: edit_json(d / "model_info.json", lambda info: info.update(extra_metadata=[])),
        "model_info.json",
        "extra_metadata must be a JSON object",
    ),
    "image-size-not-a-number": (
        "lumen",
        vision_config(lambda v: v.update(image_size="big")),
        "model_info.json",
        "extra_metadata.vision_config.image_size must be an integer >= 1, got 'big'",
    ),
    "mean-of-two": (
        "lumen",
        vision_config(lambda v: v.update(mean=[0.5, 0.5])),
        "model_info.json",
        "vision_config.mean must be a list of 3 numbers",
    ),
    "std-zero": (
        "lumen",
        vision_config(lambda v: v.update(std=[1.0, 0.0, 1.0])),
        "model_info.json",
        "vision_config.std must not hold 0",
    ),
    "kv-cache-incomplete": (
        "lumen",
        lambda d: edit_json(d / "model_info.json", lambda i: i["extra_metadata"]["kv_cache_config"].pop("head_dim")),
        "model_info.json",
        "kv_cache_config.head_dim is missing",
    ),
    "eos-not-an-id": (
        "community",
        lambda d: edit_json(d / "generation_config.json", lambda g: g.update(eos_token_id="</s>")),
        "generation_config.json",
        "eos_token_id must be a token id",
    ),
    "crop-size-negative": (
        "community",
        lambda d: edit_json(d / "preprocessor_config.json", lambda p: p.update(crop_size={"height": -1})),
        "preprocessor_config.json",
        "crop_size.height must be an integer >= 1",
    ),
    "aspect-ratio-unsupported": (
        "community",
        lambda d: edit_json(d / "config.json", lambda c: c.update(image_aspect_ratio="anyres")),
        "config.json",
        "image_aspect_ratio is not one this service can honour (pad, square, crop), got 'anyres'",
    ),
    "tokenizer-not-json": ("community", write("tokenizer.json", "{}"), "tokenizer.json", "cannot read"),
    "template-not-jinja": (
        "community",
        lambda d: edit_json(d / "tokenizer_config.json", lambda t: t.update(chat_template="{{ messages[0] }")),
        "chat template",
        "is not valid Jinja",
    ),
    "template-loses-the-users-text": (
        "community",
        lambda d: edit_json(d / "tokenizer_config.json", lambda t: t.update(chat_template="<|im_start|>user\n")),
        "chat template",
        "renders the user's text from neither string content nor typed text parts",
    ),
    "no-decoder-at-all": (
        "lumen",
        lambda d: (d / "onnx" / "decoder.fp32.onnx").unlink(),
        "decoder",
        "nor one in another precision",
    ),
}


def broken_model(tmp_path: Path, case: str) -> tuple[Path, str, str]:
    layout, breaks, file, message = BROKEN_FILES[case]
    model_dir = (lumen_model if layout == "lumen" else community_model)(tmp_path / "model")
    breaks(model_dir)
    return model_dir, file, message


@pytest.mark.parametrize("case", BROKEN_FILES)
def test_broken_json_and_files_are_refused_before_loading(tmp_path: Path, case: str) -> None:
    model_dir, file, message = broken_model(tmp_path, case)
    with pytest.raises(ModelFilesError) as caught:
        FastVLMModelManager.check_loadable(settings_for(model_dir, tmp_path / "cache"), model_dir)
    text = str(caught.value)
    assert text.startswith(f"{KEY}: ") and file in text and message in text, text


# (how the graphs are broken, what the message says): only loading the graphs can tell.
BROKEN_GRAPHS: dict[str, tuple[Callable[[Path], None], str]] = {
    "vision-not-onnx": (write("onnx/vision.fp32.onnx", "not a graph"), "cannot load .*vision.fp32.onnx.*Protobuf"),
    "embed-not-onnx": (write("onnx/embed.fp32.onnx", ""), "cannot load .*embed.fp32.onnx"),
    "decoder-not-onnx": (write("onnx/decoder.fp32.onnx", "\x08\x07junk"), "cannot load .*decoder.fp32.onnx"),
    "embed-weights-missing": (
        lambda d: save_without_its_weights(d / "onnx" / "embed.fp32.onnx"),
        "cannot load .*embed.fp32.onnx",
    ),
    "vision-is-another-graph": (
        lambda d: shutil.copy(tiny_graph("embed"), d / "onnx" / "vision.fp32.onnx"),
        r"vision.fp32.onnx is not a FastVLM vision encoder.*takes input_ids \['batch', 'sequence_length'\]",
    ),
    "decoder-is-another-graph": (
        lambda d: shutil.copy(tiny_graph("embed"), d / "onnx" / "decoder.fp32.onnx"),
        "decoder graphs' inputs and outputs are not a FastVLM export's",
    ),
    "vision-features-of-another-width": (
        lambda d: narrow_vision_features(d / "onnx" / "vision.fp32.onnx", 48),
        "the vision encoder gives 48-wide image features, but the decoder takes 64-wide embeddings: "
        "the graphs are not of one model",
    ),
    "no-image-size-anywhere": (
        lambda d: (
            make_vision_input_dynamic(d / "onnx" / "vision.fp32.onnx"),
            edit_json(d / "model_info.json", lambda i: i["extra_metadata"]["vision_config"].pop("image_size")),
        ),
        "no image size: the vision encoder graph's input leaves it dynamic",
    ),
}


def narrow_vision_features(graph: Path, width: int) -> None:
    """The vision encoder with its features cut to their first `width` columns: a graph that
    gives features of another width than the decoder's."""
    model = onnx.load(str(graph))
    output = model.graph.output[0]
    full = f"{output.name}_full"
    for node in model.graph.node:
        node.output[:] = [full if name == output.name else name for name in node.output]
    bounds = {"narrow_start": 0, "narrow_end": width, "narrow_axis": 2}
    model.graph.initializer.extend(numpy_helper.from_array(np.array([v], np.int64), n) for n, v in bounds.items())
    model.graph.node.append(helper.make_node("Slice", [full, *bounds], [output.name]))
    output.type.tensor_type.shape.dim[2].dim_value = width
    onnx.save(model, str(graph))


def save_without_its_weights(graph: Path) -> None:
    """The graph with its weights in a side file, then the side file gone (an interrupted copy)."""
    model = onnx.load(str(graph))
    onnx.save(model, str(graph), save_as_external_data=True, location=graph.name + ".data", size_threshold=0)
    (graph.parent / (graph.name + ".data")).unlink()


@pytest.mark.parametrize("case", BROKEN_GRAPHS)
def test_broken_graphs_are_a_model_files_error_at_load(tmp_path: Path, case: str) -> None:
    breaks, message = BROKEN_GRAPHS[case]
    model_dir = lumen_model(tmp_path / "model")
    breaks(model_dir)
    settings = settings_for(model_dir, tmp_path / "cache")
    FastVLMModelManager.check_loadable(settings, model_dir)  # the JSON is fine
    with pytest.raises(ModelFilesError, match=message) as caught:
        FastVLMModelManager.from_settings(settings, model_dir)
    assert str(caught.value).startswith(f"{KEY}: ")


# --------------------------------------------------------------------------- the command line


def edit_yaml(path: Path, change: Callable[[Any], object]) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # nothing may land in the real ~/.cache
    return subprocess.run(
        [sys.executable, "-m", "lumen_vlm", *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


@pytest.mark.parametrize("case", ["config-not-json", "image-size-not-a-number", "template-not-jinja"])
def test_describe_with_a_broken_model_exits_2_with_a_message(tmp_path: Path, case: str) -> None:
    model_dir, file, message = broken_model(tmp_path, case)
    image = str(GOLDEN / "portrait.jpg")
    result = run_cli(tmp_path, "describe", image, "--model", str(model_dir), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 2, result.stderr
    assert "services.vlm.models.cli" in result.stderr and file in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def test_serving_a_broken_model_exits_2_before_opening_the_port(tmp_path: Path) -> None:
    model_dir, file, message = broken_model(tmp_path, "config-not-json")
    config = write_config(tmp_path / "config.yaml", free_port(), model=str(model_dir))
    result = run_cli(tmp_path, "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert f"{KEY}: " in result.stderr and file in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    assert "port" not in result.stderr.split(KEY)[0], "nothing was started before the error"


def test_describe_with_a_graph_that_is_not_onnx_exits_2_with_a_message(tmp_path: Path) -> None:
    """A problem only loading the graphs shows is a config error too, not a traceback."""
    model_dir = lumen_model(tmp_path / "model")
    breaks, _ = BROKEN_GRAPHS["vision-not-onnx"]
    breaks(model_dir)
    image = str(GOLDEN / "portrait.jpg")
    result = run_cli(tmp_path, "describe", image, "--model", str(model_dir), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 2, result.stderr
    assert "services.vlm.models.cli: cannot load" in result.stderr and "vision.fp32.onnx" in result.stderr
    assert "Traceback" not in result.stderr


def test_serving_a_graph_that_is_not_onnx_exits_2_and_closes_the_port(tmp_path: Path) -> None:
    model_dir = lumen_model(tmp_path / "model")
    breaks, _ = BROKEN_GRAPHS["vision-not-onnx"]
    breaks(model_dir)
    port = free_port()
    config = write_config(tmp_path / "config.yaml", port, model=str(model_dir))
    result = run_cli(tmp_path, "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert f"{KEY}: cannot load" in result.stderr and "vision.fp32.onnx" in result.stderr
    assert "Traceback" not in result.stderr
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the port is still open"


def test_an_unavailable_device_exits_2_before_any_download(tmp_path: Path) -> None:
    """A model still to download is not fetched for a machine that cannot run the configured device."""
    config = write_config(tmp_path / "config.yaml", free_port(), model="fastvlm-0.5b")
    edit_yaml(config, lambda c: c["services"]["vlm"].update(backend_settings={"onnx_providers": ["NoSuchProvider"]}))
    env_offline = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # were a download attempted, it would fail elsewhere
    result = subprocess.run(
        [sys.executable, "-m", "lumen_vlm", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "HOME": str(tmp_path / "home"), **env_offline},
    )
    assert result.returncode == 2, result.stderr
    assert "services.vlm.backend_settings.onnx_providers" in result.stderr
    assert "download" not in result.stderr.lower()
    assert not (tmp_path / "cache" / "models").exists()
