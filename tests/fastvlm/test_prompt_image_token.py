"""A tokenizer without ``<image>`` while the config names image_token_index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager
from lumen_vlm.fastvlm.prompt import IMAGE_PLACEHOLDER
from lumen_vlm.resources.exceptions import ModelFilesError
from lumen_vlm.resources.model_files import load_tokenizer

from ..parity import assert_case_matches


def without_image_token(source: Path, target: Path) -> Path:
    """A copy of the model whose tokenizer files do not know ``<image>``."""
    shutil.copytree(source, target)
    tokenizer_path = target / "tokenizer.json"
    tokenizer = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != IMAGE_PLACEHOLDER]
    tokenizer_path.write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    decoder = config["added_tokens_decoder"]
    config["added_tokens_decoder"] = {i: t for i, t in decoder.items() if t["content"] != IMAGE_PLACEHOLDER}
    config_path.write_text(json.dumps(config, indent=1))
    assert load_tokenizer(tokenizer_path).token_to_id(IMAGE_PLACEHOLDER) is None
    return target


def set_image_token_index(model_dir: Path, token_id: int) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config["image_token_index"] = token_id
    path.write_text(json.dumps(config, indent=1))


def test_the_image_token_is_added_at_the_configs_id(
    tmp_path: Path, tiny_model_dir: Path, golden: dict[str, Any]
) -> None:
    model_dir = without_image_token(tiny_model_dir, tmp_path / "model")
    manager = FastVLMModelManager.from_model_dir(model_dir)
    assert manager.tokenizer.token_to_id(IMAGE_PLACEHOLDER) == manager.spec.text.image_token_id
    for case in golden["cases"][:2]:
        assert_case_matches(manager, case)


def test_an_id_the_token_cannot_be_added_at_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    model_dir = without_image_token(tiny_model_dir, tmp_path / "model")
    next_id = load_tokenizer(model_dir / "tokenizer.json").get_vocab_size(with_added_tokens=True)
    set_image_token_index(model_dir, next_id + 5)
    with pytest.raises(ModelFilesError, match=rf"no <image> token and no token {next_id + 5}.*next id, {next_id}"):
        FastVLMModelManager.from_model_dir(model_dir)


def test_a_config_that_disagrees_with_the_tokenizer_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    image_id = load_tokenizer(model_dir / "tokenizer.json").token_to_id(IMAGE_PLACEHOLDER)
    set_image_token_index(model_dir, image_id + 100)
    with pytest.raises(ModelFilesError, match=rf"<image> at id {image_id}, but the config's image_token_index"):
        FastVLMModelManager.from_model_dir(model_dir)


def test_a_negative_image_token_index_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    set_image_token_index(model_dir, -200)
    with pytest.raises(ModelFilesError, match="image_token_index must be an integer >= 0, got -200"):
        FastVLMModelManager.from_model_dir(model_dir)


def test_an_unreadable_tokenizer_is_a_model_files_error(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(ModelFilesError, match=r"cannot read .*tokenizer\.json"):
        load_tokenizer(path)
