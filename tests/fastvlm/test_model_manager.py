"""The model room end to end on the tiny model, driven by the engine: streaming, stopping,
sampling, the caches, bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lumen_vlm.engine import ClientGone, Engine, GenerationResult, TextDelta
from lumen_vlm.fastvlm.exceptions import ImageError, InputError, PromptError
from lumen_vlm.fastvlm.fastvlm_model import FastVLMModelManager, GenerationParams, GenerationRequest
from lumen_vlm.generation import FinishReason, SamplingParams
from lumen_vlm.resources.settings import CacheSettings, ModelSettings, VLMSettings

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


@pytest.fixture(scope="module")
def engine(manager: FastVLMModelManager) -> Iterator[Engine]:
    served = Engine(manager)
    yield served
    served.close()


def stream(engine: Engine, request: GenerationRequest) -> tuple[list[TextDelta], GenerationResult]:
    events = list(engine.submit(request))
    *deltas, result = events
    assert isinstance(result, GenerationResult)
    assert all(isinstance(d, TextDelta) for d in deltas)
    return deltas, result  # type: ignore[return-value]


def with_params(request: GenerationRequest, **params: Any) -> GenerationRequest:
    return GenerationRequest(request.messages, request.image, GenerationParams(**params), request.resize_mode)


def test_streamed_deltas_join_to_the_final_text(
    manager: FastVLMModelManager, engine: Engine, golden: dict[str, Any]
) -> None:
    for case in golden["cases"]:
        deltas, result = stream(engine, golden_request(case))
        assert "".join(d.text for d in deltas) == result.text == case["text"]
        counts = [d.generated_tokens for d in deltas]
        assert counts == sorted(counts) and counts[-1] <= result.generated_tokens


def test_stop_sequence_spanning_tokens(manager: FastVLMModelManager, engine: Engine, golden: dict[str, Any]) -> None:
    case = golden["cases"][0]
    tokens = [manager.tokenizer.decode([t]) for t in case["output_ids"]]
    # A stop sequence made of the end of token 3 and the start of token 4.
    assert len(tokens[3]) >= 2 and len(tokens[4]) >= 2, tokens
    prefix = "".join(tokens[:3]) + tokens[3][:-1]
    stop = tokens[3][-1:] + tokens[4][:2]
    assert case["text"].find(stop) == len(prefix), "the chosen stop must first occur at the boundary"
    deltas, result = stream(engine, with_params(golden_request(case), max_new_tokens=24, stop_sequences=(stop,)))
    assert result.finish_reason is FinishReason.STOP_SEQUENCE
    assert result.text == prefix
    assert "".join(d.text for d in deltas) == prefix
    assert result.generated_tokens == 5  # stopped as soon as token 4 completed the stop sequence


def test_stop_sequence_never_leaks(manager: FastVLMModelManager, engine: Engine, golden: dict[str, Any]) -> None:
    for case in golden["cases"]:
        text = case["text"]
        for start in range(0, len(text) - 3, 7):
            stop = text[start : start + 3]
            request = with_params(golden_request(case), max_new_tokens=24, stop_sequences=(stop,))
            deltas, result = stream(engine, request)
            assert result.text == text[: text.find(stop)]
            assert stop not in "".join(d.text for d in deltas)


def test_same_seed_same_text_and_seeds_differ(
    manager: FastVLMModelManager, engine: Engine, golden: dict[str, Any]
) -> None:
    request = golden_request(golden["cases"][1])
    sampled = [
        engine.submit(
            with_params(request, max_new_tokens=16, sampling=SamplingParams(temperature=1.0, top_p=0.95, seed=seed))
        )
        .result()
        .token_ids
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]


def test_multibyte_streaming_never_emits_a_broken_character(
    manager: FastVLMModelManager, engine: Engine, golden: dict[str, Any]
) -> None:
    case = next(c for c in golden["cases"] if c["name"] == "cjk_emoji")
    for seed in range(6):
        params = {"max_new_tokens": 40, "sampling": SamplingParams(temperature=1.5, seed=seed)}
        deltas, result = stream(engine, with_params(golden_request(case), **params))
        assert "".join(d.text for d in deltas) == result.text
        if "\ufffd" not in result.text:
            assert all("\ufffd" not in d.text for d in deltas)
        assert result.text == manager.tokenizer.decode(
            [t for t in result.token_ids if t not in manager.spec.text.eos_token_ids]
        )


def test_a_text_only_request_works(manager: FastVLMModelManager, engine: Engine) -> None:
    request = GenerationRequest([{"role": "user", "content": "Hello there"}], None, GenerationParams(max_new_tokens=5))
    result = engine.submit(request).result()
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
    long_text = "word " * (manager.spec.text.context_length + 10)
    with pytest.raises(PromptError, match="context"):
        manager.prepare(GenerationRequest([{"role": "user", "content": long_text}]))


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a" + b"\0" * 20]
)
def test_bad_images_are_image_errors(manager: FastVLMModelManager, data: bytes) -> None:
    with pytest.raises(ImageError):
        manager.prepare(GenerationRequest([{"role": "user", "content": "What is this?"}], data))
    assert issubclass(ImageError, InputError)


def test_generation_stops_when_the_caller_cancels(
    manager: FastVLMModelManager, golden: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = CallCounter(monkeypatch, manager, "decode")
    engine = Engine(manager)
    try:
        handle = engine.submit(with_params(golden_request(golden["cases"][0]), max_new_tokens=200))
        events = iter(handle)
        next(events)
        handle.cancel()
        with pytest.raises(ClientGone):
            list(events)
        assert engine.wait_idle(10)
    finally:
        engine.close()
    assert steps.calls < 200


def test_a_second_question_about_the_same_photo_reuses_features_and_prefix(
    tiny_model_dir, golden: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    cached = FastVLMModelManager.from_model_dir(tiny_model_dir)
    # The reference: every request from scratch.
    uncached = FastVLMModelManager.from_model_dir(tiny_model_dir, feature_cache_bytes=0, prefix_cache_bytes=0)
    engines = Engine(cached), Engine(uncached)
    encodes = CallCounter(monkeypatch, cached.backend, "encode_image")
    image = golden["cases"][0]["image_bytes"]
    questions = ["What do you see?", "Is it day or night?", "Count the shapes."]
    try:
        for question in questions:
            params = GenerationParams(max_new_tokens=12)
            request = GenerationRequest([{"role": "user", "content": question}], image, params)
            with_cache, without = (engine.submit(request).result() for engine in engines)
            assert with_cache.token_ids == without.token_ids
    finally:
        for engine in engines:
            engine.close()
    assert encodes.calls == 1
    assert cached.feature_cache.hits == 2
    assert (cached.prefix_cache.misses, cached.prefix_cache.hits) == (1, 2)


def test_the_configured_cache_budgets_bound_the_managers_caches(
    tiny_model_dir: Path, golden: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caches = CacheSettings(feature_cache_bytes=0, prefix_cache_bytes=12345)
    settings = VLMSettings(cache_dir=tmp_path, model=ModelSettings(alias="m", model=str(tiny_model_dir)), caches=caches)
    manager = FastVLMModelManager.from_settings(settings, tiny_model_dir)
    assert (manager.feature_cache.max_bytes, manager.prefix_cache.max_bytes) == (0, 12345)
    encodes = CallCounter(monkeypatch, manager.backend, "encode_image")
    for _ in range(2):
        manager.image_features(golden["cases"][0]["image_bytes"])
    assert encodes.calls == 2  # no feature cache: the photo is encoded again
    default = FastVLMModelManager.from_model_dir(tiny_model_dir)
    assert default.feature_cache.max_bytes == CacheSettings.feature_cache_bytes == 64 << 20
    assert default.prefix_cache.max_bytes == CacheSettings.prefix_cache_bytes == 256 << 20


def test_invalid_messages_fail_before_the_vision_encoder(
    manager: FastVLMModelManager, golden: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    encodes = CallCounter(monkeypatch, manager.backend, "encode_image")
    bad = [{"role": "user", "content": "<image> twice <image>"}]
    with pytest.raises(PromptError, match="2 times"):
        manager.prepare(GenerationRequest(bad, golden["cases"][0]["image_bytes"]))
    assert encodes.calls == 0
