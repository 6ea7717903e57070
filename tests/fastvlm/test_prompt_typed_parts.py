"""Transformers-format exports: a chat template that reads typed content parts.

transformers' FastVLM conversion (models/fast_vlm/convert_fastvlm_weights_to_hf.py) gives the
tokenizer a template that iterates ``message['content'] | selectattr('type', ...)``: images
first, then each text part after a newline. Given a plain string it renders nothing of it.
TYPED_PARTS_TEMPLATE below has that shape; the tiny model is copied with it as its
``chat_template.jinja``, the file transformers 5 saves a template in.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from lumen_vlm.fastvlm.exceptions import PromptError
from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager, GenerationRequest
from lumen_vlm.fastvlm.prompt import ChatTemplate, ContentForm, render_messages
from lumen_vlm.resources.exceptions import ModelFilesError
from tools.make_test_model import import_reference_stack

from ..parity import assert_case_matches, golden_request

TYPED_PARTS_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}"
    "{% endfor %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


IMAGE = {"type": "image"}

# (name, the request's messages, whether it has an image, the same conversation as typed parts:
# what transformers' apply_chat_template is given). Our rule: string content s is [text(s)], and
# an image no message places leads the first user turn's parts.
CONVERSATIONS = [
    ("text only", [{"role": "user", "content": "Hi there, how are you?"}], False, [
        {"role": "user", "content": [text("Hi there, how are you?")]},
    ]),
    ("image, string content", [{"role": "user", "content": "What do you see?"}], True, [
        {"role": "user", "content": [IMAGE, text("What do you see?")]},
    ]),
    ("image, typed parts", [{"role": "user", "content": [text("What are these?"), IMAGE]}], True, [
        {"role": "user", "content": [text("What are these?"), IMAGE]},
    ]),
    ("image in the string", [{"role": "user", "content": "<image>\nWhat is it?"}], True, [
        {"role": "user", "content": [text("<image>\nWhat is it?")]},
    ]),
    ("system prompt", [
        {"role": "system", "content": "You are a terse photo critic."},
        {"role": "user", "content": "Rate this photo from 1 to 10."},
    ], True, [
        {"role": "system", "content": [text("You are a terse photo critic.")]},
        {"role": "user", "content": [IMAGE, text("Rate this photo from 1 to 10.")]},
    ]),
    ("multi-turn", [
        {"role": "user", "content": [IMAGE, text("What is in the picture?")]},
        {"role": "assistant", "content": "A yellow sun over a green field."},
        {"role": "user", "content": "What colour is the sky? 颜色？🙂"},
    ], True, [
        {"role": "user", "content": [IMAGE, text("What is in the picture?")]},
        {"role": "assistant", "content": [text("A yellow sun over a green field.")]},
        {"role": "user", "content": [text("What colour is the sky? 颜色？🙂")]},
    ]),
]  # fmt: skip


def with_template(source: Path, target: Path, template: str) -> Path:
    """A copy of the model at `source` whose chat template is `template`, in chat_template.jinja."""
    shutil.copytree(source, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config, indent=1))
    (target / "chat_template.jinja").write_text(template)
    return target


@pytest.fixture(scope="module")
def typed_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return with_template(tiny_model_dir, tmp_path_factory.mktemp("typed") / "model", TYPED_PARTS_TEMPLATE)


@pytest.fixture(scope="module")
def typed_manager(typed_model_dir: Path):  # type: ignore[no-untyped-def]
    manager = FastVLMModelManager.from_model_dir(typed_model_dir)
    yield manager
    manager.close()


def test_the_content_form_is_read_from_what_the_template_renders(typed_manager, manager) -> None:  # type: ignore[no-untyped-def]
    assert typed_manager.template.content_form is ContentForm.PARTS
    assert typed_manager.template.image_part_renders_placeholder
    assert manager.template.content_form is ContentForm.STRING  # the committed model's ChatML


def test_a_text_only_request_keeps_the_users_words(typed_manager) -> None:  # type: ignore[no-untyped-def]
    prompt = typed_manager.render([{"role": "user", "content": "Hi there, how are you?"}], False, True)
    assert "<|im_start|>user\n\nHi there, how are you?<|im_end|>" in prompt


def test_an_image_request_gets_its_image_tokens(typed_manager, golden: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    case = golden["cases"][0]
    prepared = typed_manager.prepare(golden_request(case))
    assert int((prepared.input_ids == typed_manager.spec.text.image_token_id).sum()) == case["image_tokens"]


@pytest.mark.parametrize("name", ["describe", "describe_portrait", "cjk_emoji", "crop_mode"])
def test_golden_cases_generate_transformers_tokens(typed_manager, golden: dict[str, Any], name: str) -> None:  # type: ignore[no-untyped-def]
    # One user question and an unplaced image: this template writes the prompt Apple's rule
    # writes for the committed ChatML template, so transformers' goldens hold here too.
    case = next(case for case in golden["cases"] if case["name"] == name)
    assert_case_matches(typed_manager, case)


def test_an_image_part_the_template_does_not_write_goes_as_placeholder_text() -> None:
    # Renders an image part as nothing: the image reaches it as the text "<image>" instead.
    template = ChatTemplate(
        "{% for m in messages %}{% for c in m['content'] %}"
        "{% if c['type'] == 'text' %}[{{ c['text'] }}]{% endif %}"
        "{% endfor %}{% endfor %}"
    )
    assert template.content_form is ContentForm.PARTS and not template.image_part_renders_placeholder
    assert render_messages([{"role": "user", "content": "Hi"}], template, has_image=True) == "[<image>][Hi]"


def test_a_template_that_renders_no_user_text_is_refused_at_load(tmp_path: Path, tiny_model_dir: Path) -> None:
    # e.g. a template reading each part's 'content' key, which our parts do not have.
    model_dir = with_template(
        tiny_model_dir,
        tmp_path / "model",
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['content'] }}{% endfor %}"
        "<|im_end|>\n{% endfor %}",
    )
    with pytest.raises(ModelFilesError, match=r"chat template renders the user's text from neither"):
        FastVLMModelManager.from_model_dir(model_dir)


def test_two_images_in_typed_parts_are_refused(typed_manager) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": [IMAGE, text("a"), IMAGE]}]
    with pytest.raises(PromptError, match="one image per request"):
        typed_manager.render(messages, True, True)


@pytest.mark.reference
@pytest.mark.parametrize("name, messages, has_image, typed", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_prompts_match_transformers(
    typed_model_dir: Path,
    typed_manager: FastVLMModelManager,
    golden: dict[str, Any],
    name: str,
    messages: list[dict[str, Any]],
    has_image: bool,
    typed: list[dict[str, Any]],
) -> None:
    import_reference_stack()
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(str(typed_model_dir))
    expected_text = tokenizer.apply_chat_template(typed, tokenize=False, add_generation_prompt=True)
    assert typed_manager.render(messages, has_image, True) == expected_text

    # The ids, with the image token expanded as transformers' processor expands it.
    image_bytes = golden["cases"][0]["image_bytes"] if has_image else None
    prepared = typed_manager.prepare(GenerationRequest(messages, image_bytes))
    if has_image:
        preprocessor = json.loads((typed_model_dir / "preprocessor_config.json").read_text())
        image_tokens = typed_manager.backend.graph_spec.image_tokens
        processor = LlavaProcessor(
            tokenizer=tokenizer,
            image_processor=CLIPImageProcessor(**preprocessor),
            patch_size=typed_manager.spec.image.size // math.isqrt(image_tokens),  # image_tokens = (size / patch)^2
            vision_feature_select_strategy="full",
        )
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        expected_ids = processor(images=image, text=expected_text, return_tensors="np")["input_ids"][0].tolist()
        assert expected_ids.count(typed_manager.spec.text.image_token_id) == image_tokens
    else:
        expected_ids = tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    assert prepared.input_ids.tolist() == expected_ids


def test_a_template_failing_on_one_shape_is_given_the_other() -> None:
    # String concatenation with the content: typed parts make it raise a TypeError.
    template = ChatTemplate("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}")
    assert template.content_form is ContentForm.STRING
    messages = [{"role": "user", "content": [text("Hi"), IMAGE]}]
    assert render_messages(messages, template, has_image=True) == "<user>Hi<image>"
    # A template that fails in both shapes is refused when it loads.
    with pytest.raises(ModelFilesError, match=r"chat template renders the user's text from neither"):
        ChatTemplate("{{ 1 // 0 }}")
    # One that fails on some conversations only loads, and those requests get a PromptError.
    sometimes = ChatTemplate("{{ messages[0]['content'] }}{% if messages | length > 1 %}{{ 1 // 0 }}{% endif %}")
    with pytest.raises(PromptError, match="chat template failed"):
        sometimes.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
