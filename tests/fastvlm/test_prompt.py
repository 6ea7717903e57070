"""Prompt building: the chat template in a sandbox, image placement, expansion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from lumen_vlm.fastvlm.exceptions import PromptError
from lumen_vlm.fastvlm.prompt import ChatTemplate, encode_prompt, normalize_messages, place_image, render_messages
from lumen_vlm.resources.exceptions import ModelFilesError
from lumen_vlm.resources.model_files import locate_model_files, read_file_spec
from tools.make_test_model import import_reference_stack

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"}],
    [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Which colour? 颜色？🐱"},
    ],
]


@pytest.fixture(scope="module")
def template(tiny_model_dir: Path) -> ChatTemplate:
    files = locate_model_files(tiny_model_dir)
    text = read_file_spec(files, Tokenizer.from_file(str(files.tokenizer)).token_to_id).text
    return ChatTemplate(text.chat_template, text.special_tokens)


@pytest.mark.reference
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_matches_transformers(
    tiny_model_dir: Path, template: ChatTemplate, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    import_reference_stack()
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    has_image = any("<image>" in m["content"] for m in messages)
    assert render_messages(messages, template, has_image, add_generation_prompt) == expected


def test_default_system_prompt_is_the_templates(template: ChatTemplate) -> None:
    text = template.render([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")


def test_image_leads_the_first_user_turn_when_not_placed() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
    ]
    placed = place_image(messages, has_image=True)
    assert [m["content"] for m in placed] == ["s", "<image>\nfirst", "second"]
    assert messages[1]["content"] == "first", "the caller's messages are not modified"


# A template that shows the user's text (so it loads), and runs `action` when that text is "x".
WHEN_X = "{{% if messages[0]['content'] == 'x' %}}{action}{{% endif %}}{{{{ messages[0]['content'] }}}}"


def test_the_sandbox_refuses_unsafe_templates() -> None:
    template = ChatTemplate(WHEN_X.format(action="{{ messages.__class__.__mro__[1].__subclasses__() }}"))
    with pytest.raises(PromptError, match="unsafe"):
        template.render([{"role": "user", "content": "x"}])


def test_template_exceptions_become_prompt_errors() -> None:
    template = ChatTemplate(WHEN_X.format(action="{{ raise_exception('roles must alternate') }}"))
    with pytest.raises(PromptError, match="roles must alternate"):
        template.render([{"role": "user", "content": "x"}])


def test_a_template_error_quoting_the_client_is_cut_short() -> None:
    """A template may raise with the client's text in its message: the PromptError keeps it short."""
    template = ChatTemplate(
        "{% if messages[0]['content'][:1] == 'y' %}{{ raise_exception(messages[0]['content']) }}{% endif %}"
        "{{ messages[0]['content'] }}"
    )
    with pytest.raises(PromptError) as caught:
        template.render([{"role": "user", "content": "y" * 100_000}])
    assert len(str(caught.value)) < 400


def test_a_template_that_is_not_jinja_is_a_model_files_error() -> None:
    with pytest.raises(ModelFilesError, match="not valid Jinja"):
        ChatTemplate("{% for m in messages %}{{ m['content'] }")


def test_the_image_token_expands_in_place(tiny_model_dir: Path) -> None:
    files = locate_model_files(tiny_model_dir)
    tokenizer = Tokenizer.from_file(str(files.tokenizer))
    image_id = read_file_spec(files, tokenizer.token_to_id).text.image_token_id
    plain = encode_prompt(tokenizer, "a <image> b", image_id, 1)
    expanded = encode_prompt(tokenizer, "a <image> b", image_id, 5)
    at = int(np.flatnonzero(plain == image_id)[0])
    assert expanded.tolist() == plain[:at].tolist() + [image_id] * 5 + plain[at + 1 :].tolist()
    with pytest.raises(PromptError, match="no image"):
        encode_prompt(tokenizer, "a <image> b", image_id, 0)


def test_normalize_messages_refuses_text_that_is_not_unicode() -> None:
    with pytest.raises(PromptError, match=r"messages\[1\]\.content is not valid text.*lone surrogate"):
        normalize_messages([{"role": "system", "content": "ok"}, {"role": "user", "content": "x\ud800"}])
    with pytest.raises(PromptError, match=r"messages\[0\]\.content\[1\]\.text is not valid text"):
        normalize_messages([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\udfff"}]}])


def test_normalize_messages_does_not_echo_long_values() -> None:
    for message in ({"role": "r" * 10_000, "content": "hi"}, {"role": "user", "content": [{"type": "t" * 10_000}]}):
        with pytest.raises(PromptError) as caught:
            normalize_messages([message])
        assert len(str(caught.value)) < 200
    with pytest.raises(PromptError, match=r"role is a JSON list; expected one of"):
        normalize_messages([{"role": ["user"] * 10_000, "content": "hi"}])
