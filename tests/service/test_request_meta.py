"""Meta parsing without a server: the correlation_id, the payload checks, the lenient-but-bounded meta rules."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from lumen_vlm.fastvlm.chunks import CompleteRequest
from lumen_vlm.fastvlm.exceptions import ImageError, PromptError, RequestError
from lumen_vlm.fastvlm.fastvlm_model import GenerationParams
from lumen_vlm.fastvlm.image import ImageLimits
from lumen_vlm.fastvlm.request_meta import (
    DRAWN_SEED_BITS,
    MAX_CORRELATION_ID_BYTES,
    build_generation_request,
    check_correlation_id,
    check_image_payload,
    normalize_mime,
    parse_bool,
    parse_float,
    parse_generation_params,
    parse_int,
    parse_messages,
    parse_response_format,
    parse_sampling,
    parse_stop_sequences,
)
from lumen_vlm.generation import ResponseFormat
from lumen_vlm.resources.settings import GenerationLimits

from .conftest import image_bytes

LIMITS = GenerationLimits(default_max_new_tokens=100, max_new_tokens=500)


@pytest.mark.parametrize(("raw", "value"), [("256", 256), ("256.0", 256), ("256.00", 256), ("-3", -3), ("007", 7)])
def test_ints(raw: str, value: int) -> None:
    assert parse_int("n", raw, -10, 1000) == value


# Forms Python's int() or float() take that no client sends: padded, "1_0", other scripts'
# digits (Arabic-Indic, Devanagari, full-width), a sign, hex, exponents, inf/nan, half a number.
LENIENT_INTS = [" 256", "256 ", "\t256", "256\n", "1_0", "١٠", "१०", "１０", "+10", "0x10", "1e2", "10.", ".0", "-"]
LENIENT_FLOATS = [" 0.5", "0.5 ", "0_5", "0.5_0", "٠.٥", "０.５", "+0.5", ".5", "5.", "1e", "0x1p-1", "inf", "-inf"]
LENIENT_FLOATS += ["nan", "NaN", "Infinity", "infinity", "1,5", "0.5e1.0", ""]


@pytest.mark.parametrize("raw", ["abc", "2.5", "", "inf", "nan", "0x10", *LENIENT_INTS])
def test_ints_refused(raw: str) -> None:
    with pytest.raises(RequestError, match="'n'"):
        parse_int("n", raw, 0, 1000)


def test_a_huge_integer_is_out_of_range_with_a_short_message() -> None:
    with pytest.raises(RequestError, match="between 0 and 1000") as raised:
        parse_int("n", "9" * 100_000, 0, 1000)  # more digits than int() converts
    assert len(str(raised.value)) < 200


@pytest.mark.parametrize(
    ("raw", "value"), [("0.7", 0.7), (f"{0.7:.1f}", 0.7), ("1", 1.0), ("1e-1", 0.1), ("-0.0", 0.0)]
)
def test_floats(raw: str, value: float) -> None:
    assert parse_float("t", raw, 0.0, 2.0) == pytest.approx(value)


@pytest.mark.parametrize("raw", LENIENT_FLOATS)
def test_floats_refused(raw: str) -> None:
    with pytest.raises(RequestError, match="'t'"):
        parse_float("t", raw, -10.0, 10.0)


INT_KEYS = ["max_new_tokens", "top_k", "seed"]
FLOAT_KEYS = ["temperature", "top_p", "repetition_penalty"]


@pytest.mark.parametrize(
    ("key", "raw"),
    [(key, raw) for key in INT_KEYS for raw in LENIENT_INTS if raw.strip()]
    + [(key, raw) for key in FLOAT_KEYS for raw in LENIENT_FLOATS if raw.strip()],
)
def test_a_lenient_number_in_meta_is_refused_naming_its_key(key: str, raw: str) -> None:
    """Through the request's own path; a blank value is no value (the key's default), not an error."""
    with pytest.raises(RequestError, match=f"meta '{key}'"):
        parse_generation_params({key: raw}, LIMITS)


def go_sdk_meta(max_tokens: int, temperature: float, top_p: float, penalty: float, flag: bool) -> dict[str, str]:
    """The meta the Go SDK's generation options write (pkg/types/generation.go): max_new_tokens
    with "%d", temperature, top_p and repetition_penalty with "%.1f", do_sample and
    add_generation_prompt with strconv.FormatBool, stop_sequences with json.Marshal."""
    return {
        "max_new_tokens": f"{max_tokens:d}",
        "temperature": f"{temperature:.1f}",
        "top_p": f"{top_p:.1f}",
        "repetition_penalty": f"{penalty:.1f}",
        "do_sample": "true" if flag else "false",
        "add_generation_prompt": "true" if flag else "false",
        "stop_sequences": json.dumps(["\n\n", "###"], separators=(",", ":")),
    }


def test_every_form_the_go_sdk_sends_is_accepted() -> None:
    def params(**values: Any) -> GenerationParams:
        defaults: dict[str, Any] = {"max_tokens": 4, "temperature": 0.7, "top_p": 1.0, "penalty": 1.0, "flag": True}
        return parse_generation_params(go_sdk_meta(**{**defaults, **values}), LIMITS)

    tenths = [i / 10 for i in range(101)]  # 0.0 .. 10.0: every "%.1f" value in any of the ranges
    for max_tokens in range(1, LIMITS.max_new_tokens + 1):
        assert params(max_tokens=max_tokens).max_new_tokens == max_tokens
    for temperature in [-0.01, *(t for t in tenths if t <= 2.0)]:  # a tiny negative prints "-0.0"
        assert params(temperature=temperature, flag=False).sampling.temperature == pytest.approx(round(temperature, 1))
    for top_p in (p for p in tenths if 0.0 < p <= 1.0):
        assert params(top_p=top_p).sampling.top_p == pytest.approx(top_p)
    for penalty in (p for p in tenths if p > 0.0):
        assert params(penalty=penalty).sampling.repetition_penalty == pytest.approx(penalty)
    # The SDK's other integers (strconv.Itoa, e.g. top_k), and a reported seed sent back as it came.
    assert parse_sampling({"temperature": "0.7", "top_k": "40", "seed": str(2**63 - 1)}).seed == 2**63 - 1


def test_open_lower_bound() -> None:
    assert parse_float("p", "1", 0.0, 1.0, low_open=True) == 1.0
    with pytest.raises(RequestError, match=r"\(0, 1\]"):
        parse_float("p", "0", 0.0, 1.0, low_open=True)


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("TRUE", True), ("1", True), ("Yes", True)])
def test_true(raw: str, value: bool) -> None:
    assert parse_bool("b", raw) is value


@pytest.mark.parametrize("raw", ["false", "False", "0", "no", "NO"])
def test_false(raw: str) -> None:
    assert parse_bool("b", raw) is False


@pytest.mark.parametrize(
    ("meta", "temperature"),
    [
        ({}, 0.0),
        ({"do_sample": "true"}, 1.0),
        ({"do_sample": "false"}, 0.0),
        ({"do_sample": "false", "temperature": "0.7"}, 0.7),  # the Go SDK + Lumilio app
        ({"do_sample": "true", "temperature": "0.3"}, 0.3),
        ({"temperature": "0"}, 0.0),
    ],
)
def test_sampling_switch(meta: dict[str, str], temperature: float) -> None:
    assert parse_sampling(meta).temperature == pytest.approx(temperature)


def test_sampling_fields() -> None:
    sampling = parse_sampling(
        {"temperature": "0.5", "top_p": "0.9", "top_k": "40", "repetition_penalty": "1.1", "seed": "9"}
    )
    assert (sampling.top_p, sampling.top_k, sampling.repetition_penalty, sampling.seed) == (0.9, 40, 1.1, 9)


def test_an_unseeded_sampled_request_gets_a_seed_of_its_own() -> None:
    seeds = {parse_sampling({"temperature": "0.7"}).seed for _ in range(8)}
    assert None not in seeds and len(seeds) > 1
    assert all(0 <= seed < 2**DRAWN_SEED_BITS for seed in seeds)  # type: ignore[operator]
    assert parse_sampling({"do_sample": "true"}).seed is not None
    assert parse_sampling({"temperature": "0.7", "seed": "5"}).seed == 5


def test_a_greedy_request_reports_only_the_seed_it_was_given() -> None:
    assert parse_sampling({}).seed is None
    assert parse_sampling({"temperature": "0"}).seed is None
    assert parse_sampling({"temperature": "0", "seed": "5"}).seed == 5


def test_generation_defaults_come_from_the_settings() -> None:
    params = parse_generation_params({}, LIMITS)
    assert params.max_new_tokens == 100
    assert params.add_generation_prompt is True
    assert params.stop_sequences == ()
    with pytest.raises(RequestError, match="between 1 and 500"):
        parse_generation_params({"max_new_tokens": "501"}, LIMITS)


def test_stop_alias() -> None:
    assert parse_generation_params({"stop": json.dumps(["\n\n"])}, LIMITS).stop_sequences == ("\n\n",)
    same = json.dumps(["x"])
    assert parse_generation_params({"stop": same, "stop_sequences": same}, LIMITS).stop_sequences == ("x",)
    with pytest.raises(RequestError, match="both"):
        parse_generation_params({"stop": same, "stop_sequences": json.dumps(["y"])}, LIMITS)


def test_prompt_becomes_one_user_message() -> None:
    assert parse_messages({"prompt": "Describe."}, LIMITS) == [{"role": "user", "content": "Describe."}]


def test_messages_are_normalized_by_the_prompt_module() -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    parsed = parse_messages({"messages": json.dumps(messages), "prompt": "ignored"}, LIMITS)
    assert parsed == messages, "list content keeps its parts, for templates that read typed parts"
    with pytest.raises(PromptError, match=r"messages\[0\]\.role"):
        parse_messages({"messages": json.dumps([{"role": "robot", "content": "hi"}])}, LIMITS)


@pytest.mark.parametrize("key", ["messages", "stop_sequences", "stop"])
@pytest.mark.parametrize("nesting", ["[" * 100_000, '{"a":' * 30_000])
def test_deeply_nested_json_is_a_request_error(key: str, nesting: str) -> None:
    with pytest.raises(RequestError, match=f"meta '{key}' is nested too deeply"):
        parse_generation_params({key: nesting}, LIMITS) if key != "messages" else parse_messages({key: nesting}, LIMITS)


def test_lone_surrogates_in_messages_are_refused() -> None:
    content = '[{"role": "user", "content": "a\\ud800b"}]'
    assert json.loads(content)[0]["content"] == "a\ud800b"
    with pytest.raises(PromptError, match=r"messages\[0\]\.content is not valid text.*surrogate '\\ud800'"):
        parse_messages({"messages": content}, LIMITS)
    parts = '[{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]'
    with pytest.raises(PromptError, match=r"messages\[0\]\.content\[0\]\.text is not valid text"):
        parse_messages({"messages": parts}, LIMITS)
    pair = '[{"role": "user", "content": "\\ud83d\\udc31"}]'  # a complete pair is a real character
    assert parse_messages({"messages": pair}, LIMITS)[0]["content"] == "🐱"


def test_lone_surrogates_in_stop_sequences_are_refused() -> None:
    with pytest.raises(RequestError, match=r"meta 'stop_sequences'\[1\] is not valid text"):
        parse_stop_sequences({"stop_sequences": '["ok", "\\ud800"]'}, LIMITS)


def test_echoed_client_values_are_cut_short() -> None:
    huge = "x" * 100_000
    cases = [
        lambda: parse_messages({"messages": json.dumps([{"role": huge, "content": "hi"}])}, LIMITS),
        lambda: parse_messages({"messages": json.dumps([{"role": "user", "content": [{"type": huge}]}])}, LIMITS),
        lambda: check_image_payload(image_bytes(), "image/" + huge, ImageLimits()),
        lambda: check_image_payload(b"", huge, ImageLimits()),
        lambda: parse_int("n", huge, 0, 1),
    ]
    for case in cases:
        with pytest.raises(ValueError) as caught:
            case()
        assert len(str(caught.value)) < 200, str(caught.value)[:300]


def test_messages_length_is_bounded() -> None:
    limits = GenerationLimits(max_messages_chars=50)
    with pytest.raises(RequestError, match="limit of 50"):
        parse_messages({"prompt": "x" * 51}, limits)


@pytest.mark.parametrize(
    ("mime", "normal"),
    [("image/jpg", "image/jpeg"), ("IMAGE/PNG", "image/png"), ("image/webp; q=1", "image/webp"), ("", "")],
)
def test_mime_normalization(mime: str, normal: str) -> None:
    assert normalize_mime(mime) == normal


def test_payload_checks() -> None:
    png = image_bytes()
    limits = ImageLimits(max_bytes=10**7)
    assert check_image_payload(png, "", limits) is png  # no mime: the signature decides
    assert check_image_payload(b"", "", limits) is None  # text only
    with pytest.raises(ImageError, match=r"image/webp.*image/png"):
        check_image_payload(png, "image/webp", limits)


def test_the_payload_size_and_signature_are_checked_by_the_image_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """One owner: the pre-admission check calls image.check_image_bytes, with the settings' limits."""
    from lumen_vlm.fastvlm import request_meta

    calls = []

    def check(data: bytes, limits: ImageLimits, declared: str = "") -> str:
        calls.append((len(data), limits, declared))
        return "image/png"

    monkeypatch.setattr(request_meta, "check_image_bytes", check)
    png = image_bytes()
    request = CompleteRequest("c", "vlm_generate", {"prompt": "hi"}, png, "IMAGE/PNG")
    build_generation_request(request, GenerationLimits(max_payload_bytes=123, max_image_pixels=456))
    assert calls == [(len(png), ImageLimits(max_bytes=123, max_pixels=456), "image/png")]


def test_unknown_keys_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="lumen_vlm.fastvlm.request_meta")
    request = CompleteRequest("c", "vlm_generate", {"prompt": "hi", "client": "go-sdk"})
    build_generation_request(request, LIMITS)
    assert any("client" in record.getMessage() and record.levelname == "DEBUG" for record in caplog.records)


def test_unknown_keys_are_logged_escaped_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """A thousand made-up keys, each holding a newline, give one short line that names the first few."""
    caplog.set_level("DEBUG", logger="lumen_vlm.fastvlm.request_meta")
    keys = {f"key{i:04d}\n12:00:00 ERROR lumen_vlm.server: FORGED": "v" for i in range(1000)}
    build_generation_request(CompleteRequest("c\nid", "vlm_generate", {"prompt": "hi", **keys}), LIMITS)
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and len(message) < 1000, message[:2000]
    assert "'c\\nid'" in message and "key0000" in message and "1000 in all" in message


def test_correlation_id_bound_counts_utf8_bytes() -> None:
    assert MAX_CORRELATION_ID_BYTES == 256
    for accepted in ("", "c" * 256, "é" * 128):
        check_correlation_id(accepted)
    for refused in ("c" * 257, "é" * 129, "€" * 86):
        with pytest.raises(RequestError, match=f"correlation_id is {len(refused.encode())} bytes.*limit of 256"):
            check_correlation_id(refused)


def test_build_generation_request_is_quiet_about_known_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lumen_vlm.fastvlm.request_meta")
    build_generation_request(CompleteRequest("c", "vlm_generate", {"prompt": "hi", "seed": "1"}), LIMITS)
    assert not caplog.records


# --------------------------------------------------------------------------- response_format


@pytest.mark.parametrize("raw", ["json", "JSON", " json\n"])
def test_response_format_json(raw: str) -> None:
    assert parse_response_format({"response_format": raw}, LIMITS) == ResponseFormat("json")


def test_no_response_format_is_free_text() -> None:
    assert parse_response_format({}, LIMITS) is None
    assert parse_response_format({"response_format": " "}, LIMITS) is None
    assert parse_generation_params({}, LIMITS).response_format is None


def test_a_schema_is_kept_compact_in_its_own_key_order() -> None:
    """The key order is the answer's key order; the spacing is not part of the cache key."""
    schema = {"type": "object", "properties": {"zebra": {"type": "string"}, "apple": {"type": "integer"}}}
    raw = json.dumps({"type": "json_schema", "schema": schema}, indent=2)
    parsed = parse_response_format({"response_format": raw}, LIMITS)
    assert parsed == ResponseFormat("json_schema", json.dumps(schema, separators=(",", ":")))
    assert parsed is not None and parsed.source.index("zebra") < parsed.source.index("apple")


def test_a_pattern_is_kept_as_sent() -> None:
    raw = json.dumps({"type": "regex", "pattern": " (yes|no) "})
    assert parse_response_format({"response_format": raw}, LIMITS) == ResponseFormat("regex", " (yes|no) ")


def test_response_format_is_bounded() -> None:
    limits = GenerationLimits(max_response_format_chars=40)
    raw = json.dumps({"type": "regex", "pattern": "a" * 40})
    with pytest.raises(RequestError, match="more than the limit of 40"):
        parse_response_format({"response_format": raw}, limits)
