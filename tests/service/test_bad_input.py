"""Every kind of bad request gets one final error response, and the stream carries on."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from PIL import Image

from lumen_vlm.proto import ml_service_pb2

from .conftest import MIB, Served, finals, good_request, image_bytes, infer, make_request, png_with_size, result_of

INVALID = ml_service_pb2.ERROR_CODE_INVALID_ARGUMENT
TEXT = [{"role": "user", "content": "Describe it."}]


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="GIF")
    return buffer.getvalue()


def bad(image: bytes | None = None, mime: str | None = None, task: str = "vlm_generate", **meta: Any) -> dict:
    return {"task": task, "image": image, "mime": mime, **meta}


PNG = image_bytes()
JPEG = image_bytes("portrait.jpg")

# name -> (request fields, words the error message must contain)
CASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "corrupt_image": (bad(PNG[:16] + b"\x00garbage" * 64), ("png",)),
    "empty_image": (bad(b"", "image/png"), ("empty",)),
    "truncated_image": (bad(JPEG[: len(JPEG) // 2], "image/jpeg"), ("jpeg",)),
    "oversized_payload": (bad(PNG[:8] + b"\x00" * (3 * MIB), "image/png"), ("bytes", "limit")),
    "decompression_bomb": (bad(png_with_size(100_000, 100_000), "image/png"), ("pixels",)),
    "too_many_pixels": (bad(png_with_size(9_000, 9_000), "image/png"), ("pixels", "limit")),
    "lying_mime": (bad(PNG, "image/jpeg"), ("image/jpeg", "image/png")),
    "unsupported_mime_gif": (bad(gif_bytes(), "image/gif"), ("image/gif", "accepted")),
    "gif_bytes_without_mime": (bad(gif_bytes(), ""), ("jpeg", "png", "webp")),
    "text_mime": (bad(PNG, "text/plain"), ("text/plain",)),
    "messages_not_json": (bad(PNG, messages="[{role: user"), ("messages", "json")),
    "messages_not_a_list": (bad(PNG, messages=json.dumps({"role": "user", "content": "hi"})), ("messages", "list")),
    "messages_empty": (bad(PNG, messages="[]"), ("messages", "empty")),
    "messages_bad_role": (bad(PNG, messages=json.dumps([{"role": "robot", "content": "hi"}])), ("role", "robot")),
    "messages_missing_content": (bad(PNG, messages=json.dumps([{"role": "user"}])), ("content",)),
    "messages_content_not_text": (bad(PNG, messages=json.dumps([{"role": "user", "content": 5}])), ("content",)),
    "two_image_placeholders": (
        bad(PNG, messages=json.dumps([{"role": "user", "content": "<image> and <image>"}])),
        ("<image>",),
    ),
    "image_placeholder_without_image": (
        bad(None, messages=json.dumps([{"role": "user", "content": "<image> what?"}])),
        ("<image>", "no image"),
    ),
    "no_messages_no_prompt": (bad(PNG, messages=""), ("messages", "prompt")),
    "max_new_tokens_not_a_number": (bad(PNG, max_new_tokens="abc"), ("max_new_tokens", "abc")),
    "max_new_tokens_zero": (bad(PNG, max_new_tokens="0"), ("max_new_tokens",)),
    "max_new_tokens_huge": (bad(PNG, max_new_tokens=str(10**9)), ("max_new_tokens", "1000000000")),
    "max_new_tokens_fraction": (bad(PNG, max_new_tokens="2.5"), ("max_new_tokens",)),
    "max_new_tokens_underscores": (bad(PNG, max_new_tokens="1_0"), ("max_new_tokens", "1_0")),
    "max_new_tokens_padded": (bad(PNG, max_new_tokens=" 4"), ("max_new_tokens", "ascii")),
    "temperature_arabic_indic_digits": (bad(PNG, temperature="٠.٥"), ("temperature", "ascii")),
    "temperature_negative": (bad(PNG, temperature="-1"), ("temperature",)),
    "temperature_word": (bad(PNG, temperature="hot"), ("temperature", "hot")),
    "temperature_nan": (bad(PNG, temperature="nan"), ("temperature",)),
    "temperature_too_high": (bad(PNG, temperature="50"), ("temperature",)),
    "top_p_zero": (bad(PNG, top_p="0"), ("top_p",)),
    "top_p_above_one": (bad(PNG, top_p="1.5"), ("top_p",)),
    "top_k_negative": (bad(PNG, top_k="-1"), ("top_k",)),
    "repetition_penalty_zero": (bad(PNG, repetition_penalty="0"), ("repetition_penalty",)),
    "seed_word": (bad(PNG, seed="x"), ("seed",)),
    "seed_negative": (bad(PNG, seed="-5"), ("seed",)),
    "do_sample_word": (bad(PNG, do_sample="maybe"), ("do_sample",)),
    "add_generation_prompt_word": (bad(PNG, add_generation_prompt="perhaps"), ("add_generation_prompt",)),
    "stop_sequences_not_json_list": (bad(PNG, stop_sequences="###"), ("stop_sequences", "list")),
    "stop_sequences_json_string": (bad(PNG, stop_sequences='"###"'), ("stop_sequences", "list")),
    "stop_sequences_too_many": (bad(PNG, stop_sequences=json.dumps([f"s{i}" for i in range(20)])), ("stop_sequences",)),
    "stop_alias_with_empty_string": (bad(PNG, stop=json.dumps([""])), ("stop",)),
    "resize_mode_unknown": (bad(PNG, resize_mode="stretch"), ("resize_mode",)),
    "messages_nested_too_deeply": (bad(PNG, messages="[" * 100_000), ("messages", "nested")),
    "stop_sequences_nested_too_deeply": (bad(PNG, stop_sequences="[" * 100_000), ("stop_sequences", "nested")),
    "messages_lone_surrogate": (
        bad(PNG, messages='[{"role": "user", "content": "hi \\ud800"}]'),
        ("messages[0].content", "surrogate"),
    ),
    "text_part_lone_surrogate": (
        bad(PNG, messages='[{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]'),
        ("messages[0].content[0].text", "surrogate"),
    ),
    "stop_sequences_lone_surrogate": (bad(PNG, stop_sequences='["\\ud800"]'), ("stop_sequences", "surrogate")),
    "response_format_unknown_word": (bad(PNG, response_format="xml"), ("response_format", '"json"', "json_schema")),
    "response_format_openai_form": (
        bad(PNG, response_format=json.dumps({"type": "json_object"})),
        ("response_format", "json_schema", "regex"),
    ),
    "response_format_not_json": (bad(PNG, response_format="{type: regex"), ("response_format", "not valid json")),
    "response_format_without_schema": (
        bad(PNG, response_format=json.dumps({"type": "json_schema"})),
        ("response_format", "json_schema"),
    ),
    "response_format_extra_key": (
        bad(PNG, response_format=json.dumps({"type": "json_schema", "schema": {}, "strict": True})),
        ("response_format",),
    ),
    "response_format_schema_not_object": (
        bad(PNG, response_format=json.dumps({"type": "json_schema", "schema": [1]})),
        ("schema", "json object"),
    ),
    "response_format_bad_type": (
        bad(PNG, response_format=json.dumps({"type": "json_schema", "schema": {"type": "strin"}})),
        ("response_format", "invalid type: strin"),
    ),
    "response_format_unsupported_keyword": (
        bad(PNG, response_format=json.dumps({"type": "json_schema", "schema": {"not": {"type": "string"}}})),
        ("response_format", "unimplemented keys", "not"),
    ),
    "response_format_dangling_ref": (
        bad(PNG, response_format=json.dumps({"type": "json_schema", "schema": {"$ref": "#/$defs/label"}})),
        ("response_format", "does not exist"),
    ),
    "response_format_schema_admitting_nothing": (
        bad(
            PNG,
            response_format=json.dumps(
                {"type": "json_schema", "schema": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}
            ),
        ),
        ("response_format", "admits no answer"),
    ),
    "response_format_bad_regex": (
        bad(PNG, response_format=json.dumps({"type": "regex", "pattern": "(cat|dog"})),
        ("response_format", "regex", "unclosed group"),
    ),
    "response_format_empty_pattern": (
        bad(PNG, response_format=json.dumps({"type": "regex", "pattern": ""})),
        ("pattern", "non-empty"),
    ),
    "response_format_lone_surrogate": (
        bad(PNG, response_format='{"type": "regex", "pattern": "\\ud800"}'),
        ("response_format", "surrogate"),
    ),
    "response_format_oversized": (
        bad(PNG, response_format=json.dumps({"type": "json_schema", "schema": {"enum": ["x" * 40_000]}})),
        ("response_format", "more than the limit of 32768"),
    ),
    "response_format_nested_too_deeply": (bad(PNG, response_format="[" * 30_000), ("response_format", "nested")),
    "unknown_task": (bad(PNG, task="vlm_translate"), ("vlm_translate", "vlm_generate", "vlm_generate_stream")),
    "empty_task": (bad(PNG, task=""), ("vlm_generate",)),
}


def build(fields: dict[str, Any]) -> ml_service_pb2.InferRequest:
    fields = dict(fields)
    meta = {key: value for key, value in fields.items() if key not in {"task", "image", "mime", "messages"}}
    messages = fields.get("messages", json.dumps(TEXT))  # "" is sent as is: an empty 'messages'
    return make_request(
        fields["task"], image=fields["image"], mime=fields["mime"], correlation_id="bad", messages=messages, **meta
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_request_is_refused_and_the_stream_goes_on(served: Served, name: str) -> None:
    fields, words = CASES[name]
    responses = infer(served, [build(fields), good_request("after")])
    by_id = finals(responses)
    assert set(by_id) == {"bad", "after"}
    assert [r.correlation_id for r in responses if r.correlation_id == "bad"] == ["bad"]  # exactly one answer
    error = by_id["bad"].error
    assert error.code == INVALID, (name, error)
    message = error.message.lower()
    for word in words:
        assert word.lower() in message, (name, error.message)
    assert not by_id["bad"].result
    assert result_of(by_id["after"])["generated_tokens"] == 4


def test_the_table_is_wide(served: Served) -> None:
    assert len(CASES) >= 20


def test_error_response_on_a_stream_request(served: Served) -> None:
    """The streaming task answers a bad request with one final error and no partials."""
    request = make_request("vlm_generate_stream", image=PNG, correlation_id="bad", temperature="hot")
    (response,) = infer(served, [request])
    assert response.is_final and response.error.code == INVALID


HUGE = "x" * 150_000  # under max_messages_chars, so the messages reach their validation


@pytest.mark.parametrize(
    "fields",
    [
        bad(PNG, messages=json.dumps([{"role": HUGE, "content": "hi"}])),
        bad(PNG, messages=json.dumps([{"role": "user", "content": [{"type": HUGE}]}])),
        bad(PNG, "image/" + HUGE),
        bad(PNG, task=HUGE),
        bad(PNG, temperature=HUGE),
        bad(PNG, resize_mode=HUGE),
    ],
    ids=["role", "part_type", "payload_mime", "task", "meta_value", "resize_mode"],
)
def test_error_messages_do_not_echo_unbounded_client_text(
    served: Served, fields: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="lumen_vlm")
    (response,) = infer(served, [build(fields)])
    assert response.error.code == INVALID
    assert "xxxx" in response.error.message and len(response.error.message) < 300, response.error.message[:400]
    assert all(len(record.getMessage()) < 500 for record in caplog.records)


# --------------------------------------------------------------------------- client strings in the log

FORGED = "12:00:00 ERROR lumen_vlm.server: FORGED"


def formatted(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Each captured record as the log handler writes it (none here carries a traceback)."""
    return [caplog.handler.format(record) for record in caplog.records]


def test_client_strings_cannot_forge_a_log_line(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """An id, task, meta key or message holding a newline stays inside its own record, at every level."""
    caplog.set_level("DEBUG", logger="lumen_vlm")
    forged = "\n" + FORGED
    answered = make_request(
        image=PNG,
        correlation_id="answered" + forged,
        messages=[{"role": "user", "content": "Describe it." + forged}],
        max_new_tokens="2",
        **{"client_key" + forged: "1"},
    )
    refused = make_request(image=PNG, correlation_id="refused" + forged, task="vlm_translate" + forged)
    unfinished = ml_service_pb2.InferRequest(  # chunk 0 of 2, never finished: answered when the stream ends
        correlation_id="unfinished" + forged, task="vlm_generate", payload=PNG[:64], seq=0, total=2, offset=0
    )
    by_id = finals(infer(served, [answered, refused, unfinished]))
    assert set(by_id) == {"answered" + forged, "refused" + forged, "unfinished" + forged}
    assert not by_id["answered" + forged].HasField("error")
    assert by_id["refused" + forged].error.code == INVALID and by_id["unfinished" + forged].error.code == INVALID

    assert not any(line.startswith(FORGED) for line in caplog.text.splitlines())
    assert all("\n" not in line for line in formatted(caplog))
    for name in ("answered", "refused", "unfinished"):  # each of them was logged, escaped
        assert any(repr(name + forged) in line for line in formatted(caplog)), name


def test_an_overlong_correlation_id_is_refused_and_logged_short(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="lumen_vlm")
    huge = "i" * MIB
    responses = infer(served, [good_request(huge), good_request("after")])
    by_id = finals(responses)
    assert len(responses) == 2
    error = by_id[huge].error  # the id is echoed as it was sent
    assert error.code == INVALID
    assert "correlation_id" in error.message and "256 bytes" in error.message, error.message
    assert result_of(by_id["after"])["generated_tokens"] == 4
    logged = [line for line in formatted(caplog) if "iiii" in line]
    assert logged and sum(len(line.encode("utf-8")) for line in logged) < 1024


@pytest.mark.parametrize("correlation_id", ["c" * 256, "é" * 128, "€" * 85 + "c"], ids=["ascii", "2-byte", "3-byte"])
def test_a_correlation_id_of_256_bytes_is_accepted(served: Served, correlation_id: str) -> None:
    assert len(correlation_id.encode("utf-8")) == 256
    (response,) = infer(served, [good_request(correlation_id)])
    assert response.correlation_id == correlation_id
    assert result_of(response)["generated_tokens"] == 4


@pytest.mark.parametrize("correlation_id", ["c" * 257, "€" * 86], ids=["ascii", "86-characters"])
def test_a_correlation_id_over_256_bytes_is_refused(served: Served, correlation_id: str) -> None:
    (response,) = infer(served, [good_request(correlation_id)])
    assert response.correlation_id == correlation_id
    assert response.error.code == INVALID
    assert f"correlation_id is {len(correlation_id.encode('utf-8'))} bytes" in response.error.message


def test_debug_lines_stay_short_for_long_messages(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """The messages and the rendered prompt are cut in DEBUG lines too."""
    caplog.set_level("DEBUG", logger="lumen_vlm")
    long_text = "word " * 30_000  # under max_messages_chars; more tokens than the tiny model's context
    (response,) = infer(
        served, [make_request(image=PNG, correlation_id="long", messages=[{"role": "user", "content": long_text}])]
    )
    assert response.error.code == INVALID
    debug = [record.getMessage() for record in caplog.records if record.levelname == "DEBUG"]
    assert any("messages=" in message for message in debug) and any("prompt" in message for message in debug)
    assert all(len(message) < 1000 for message in debug), max(len(message) for message in debug)
