"""The model manager end to end on the tiny model: streaming, stopping, sampling, bad input."""

from __future__ import annotations

from typing import Any

import pytest

from lumen_vlm.fastvlm.exceptions import ImageError, InputError, PromptError
from lumen_vlm.fastvlm.fastvlm_model import (
    FastVLMModelManager,
    GenerationParams,
    GenerationRequest,
    GenerationResult,
    TextDelta,
)
from lumen_vlm.generation import FinishReason, SamplingParams

from ..parity import golden_request


class CallCounter:
    """Counts the calls of one method of an object; monkeypatch puts the method back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
        self.calls = 0
        original = getattr(owner, name)

        def counted(*args: Any) -> Any:
            self.calls += 1
            return original(*args)

        monkeypatch.setattr(owner, name, counted)


def stream(manager: FastVLMModelManager, request: GenerationRequest) -> tuple[list[TextDelta], GenerationResult]:
    events = list(manager.generate(request))
    *deltas, result = events
    assert isinstance(result, GenerationResult)
    assert all(isinstance(d, TextDelta) for d in deltas)
    return deltas, result  # type: ignore[return-value]


def with_params(request: GenerationRequest, **params: Any) -> GenerationRequest:
    return GenerationRequest(request.messages, request.image, GenerationParams(**params), request.resize_mode)


def test_streamed_deltas_join_to_the_final_text(manager: FastVLMModelManager, golden: dict[str, Any]) -> None:
    for case in golden["cases"]:
        deltas, result = stream(manager, golden_request(case))
        assert "".join(d.text for d in deltas) == result.text == case["text"]
        counts = [d.generated_tokens for d in deltas]
        assert counts == sorted(counts) and counts[-1] <= result.generated_tokens


def test_stop_sequence_spanning_tokens(manager: FastVLMModelManager, golden: dict[str, Any]) -> None:
    case = golden["cases"][0]
    tokens = [manager.tokenizer.decode([t]) for t in case["output_ids"]]
    # A stop sequence made of the end of token 3 and the start of token 4.
    assert len(tokens[3]) >= 2 and len(tokens[4]) >= 2, tokens
    prefix = "".join(tokens[:3]) + tokens[3][:-1]
    stop = tokens[3][-1:] + tokens[4][:2]
    assert case["text"].find(stop) == len(prefix), "the chosen stop must first occur at the boundary"
    deltas, result = stream(manager, with_params(golden_request(case), max_new_tokens=24, stop_sequences=(stop,)))
    assert result.finish_reason is FinishReason.STOP_SEQUENCE
    assert result.text == prefix
    assert "".join(d.text for d in deltas) == prefix
    assert result.generated_tokens == 5  # stopped as soon as token 4 completed the stop sequence


def test_stop_sequence_never_leaks(manager: FastVLMModelManager, golden: dict[str, Any]) -> None:
    for case in golden["cases"]:
        text = case["text"]
        for start in range(0, len(text) - 3, 7):
            stop = text[start : start + 3]
            request = with_params(golden_request(case), max_new_tokens=24, stop_sequences=(stop,))
            deltas, result = stream(manager, request)
            assert result.text == text[: text.find(stop)]
            assert stop not in "".join(d.text for d in deltas)


def test_same_seed_same_text_and_seeds_differ(manager: FastVLMModelManager, golden: dict[str, Any]) -> None:
    request = golden_request(golden["cases"][1])
    sampled = [
        manager.generate_text(
            with_params(request, max_new_tokens=16, sampling=SamplingParams(temperature=1.0, top_p=0.95, seed=seed))
        ).token_ids
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]


def test_multibyte_streaming_never_emits_a_broken_character(
    manager: FastVLMModelManager, golden: dict[str, Any]
) -> None:
    case = next(c for c in golden["cases"] if c["name"] == "cjk_emoji")
    for seed in range(6):
        params = {"max_new_tokens": 40, "sampling": SamplingParams(temperature=1.5, seed=seed)}
        deltas, result = stream(manager, with_params(golden_request(case), **params))
        assert "".join(d.text for d in deltas) == result.text
        if "\ufffd" not in result.text:
            assert all("\ufffd" not in d.text for d in deltas)
        assert result.text == manager.tokenizer.decode(
            [t for t in result.token_ids if t not in manager.facts.eos_token_ids]
        )


def test_a_text_only_request_works(manager: FastVLMModelManager) -> None:
    request = GenerationRequest([{"role": "user", "content": "Hello there"}], None, GenerationParams(max_new_tokens=5))
    result = manager.generate_text(request)
    assert result.image_tokens == 0
    assert result.generated_tokens >= 1


def test_list_content_parts_equal_the_string_form(manager: FastVLMModelManager, golden: dict[str, Any]) -> None:
    case = next(c for c in golden["cases"] if c["name"] == "system_prompt")
    system, user = case["messages"]
    parts = [
        system,
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": user["content"].removeprefix("<image>")}],
        },
    ]
    request = golden_request(case)
    prepared = manager.prepare(GenerationRequest(parts, request.image, request.params, request.resize_mode))
    assert prepared.input_ids.tolist() == case["input_ids"]


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "robot", "content": "hi"}], r"messages\[0\].role"),
        ([{"role": "user"}], r"messages\[0\].content"),
        ([{"role": "user", "content": 5}], r"messages\[0\].content"),
        ([{"role": "user", "content": [{"type": "video"}]}], r"content\[0\] has type 'video'"),
        ([{"role": "system", "content": "be nice"}], "at least one message with role 'user'"),
        ([{"role": "user", "content": "<image> and <image>"}], "contain <image> 2 times"),
    ],
)
def test_bad_messages_are_prompt_errors(manager: FastVLMModelManager, golden: dict[str, Any], messages, message):  # type: ignore[no-untyped-def]
    image = golden["cases"][0]["image_bytes"]
    with pytest.raises(PromptError, match=message):
        manager.prepare(GenerationRequest(messages, image))


def test_a_placeholder_without_an_image_is_refused(manager: FastVLMModelManager) -> None:
    with pytest.raises(PromptError, match="has no image"):
        manager.prepare(GenerationRequest([{"role": "user", "content": "<image>\nWhat is this?"}]))


def test_a_prompt_longer_than_the_context_is_refused(manager: FastVLMModelManager) -> None:
    long_text = "word " * (manager.context_length + 10)
    with pytest.raises(PromptError, match="context"):
        manager.prepare(GenerationRequest([{"role": "user", "content": long_text}]))


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a" + b"\0" * 20]
)
def test_bad_images_are_image_errors(manager: FastVLMModelManager, data: bytes) -> None:
    with pytest.raises(ImageError):
        manager.prepare(GenerationRequest([{"role": "user", "content": "What is this?"}], data))
    assert issubclass(ImageError, InputError)


def test_generation_stops_when_the_caller_stops_iterating(
    manager: FastVLMModelManager, golden: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = CallCounter(monkeypatch, manager.backend, "decode_step")
    events = manager.generate(with_params(golden_request(golden["cases"][0]), max_new_tokens=200))
    next(events)
    next(events)
    events.close()
    assert steps.calls <= 3


def test_a_second_question_about_the_same_photo_reuses_features_and_prefix(
    tiny_model_dir, golden: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    cached = FastVLMModelManager.from_model_dir(tiny_model_dir)
    # The reference: every request from scratch.
    uncached = FastVLMModelManager.from_model_dir(tiny_model_dir, feature_cache_bytes=0, prefix_cache_bytes=0)
    encodes = CallCounter(monkeypatch, cached.backend, "encode_image")
    image = golden["cases"][0]["image_bytes"]
    questions = ["What do you see?", "Is it day or night?", "Count the shapes."]
    for question in questions:
        request = GenerationRequest([{"role": "user", "content": question}], image, GenerationParams(max_new_tokens=12))
        assert cached.generate_text(request).token_ids == uncached.generate_text(request).token_ids
    assert encodes.calls == 1
    assert cached.feature_cache.hits == 2
    prefix_cache = cached.backend.prefix_cache
    assert (prefix_cache.misses, prefix_cache.hits) == (1, 2)


def test_the_check_hook_stops_generation_before_the_next_decode_step(
    manager: FastVLMModelManager, golden: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Stop(Exception):
        pass

    checks = 0

    def check() -> None:
        nonlocal checks
        checks += 1
        if checks == 3:
            raise Stop

    steps = CallCounter(monkeypatch, manager.backend, "decode_step")
    request = with_params(golden_request(golden["cases"][0]), max_new_tokens=200)
    with pytest.raises(Stop):
        list(manager.generate_prepared(manager.prepare(request), request.params, check))
    assert steps.calls == 2  # the third check refused the third step


def test_invalid_messages_fail_before_the_vision_encoder(
    manager: FastVLMModelManager, golden: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    encodes = CallCounter(monkeypatch, manager.backend, "encode_image")
    bad = [{"role": "user", "content": "<image> twice <image>"}]
    with pytest.raises(PromptError, match="2 times"):
        manager.prepare(GenerationRequest(bad, golden["cases"][0]["image_bytes"]))
    assert encodes.calls == 0
